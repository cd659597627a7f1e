"""DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS, a second front end over the core.

The HTTP service depends only on the core (storage, query, find, access rules, audit):
it receives one object typed :class:`archive.web.core.Core` and never imports the
DICOM front end.  ``archive serve`` runs it beside the DICOM port (``http:``).
"""
