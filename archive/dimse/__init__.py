"""The DICOM front end: the node (AE, slots, timeouts, TLS), its DIMSE services and
what they need of pynetdicom; it serves the core's :class:`archive.context.Context`."""
