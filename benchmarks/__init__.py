"""Benchmarks of the archive against DCMTK's storescp and Orthanc (see README.md)."""
