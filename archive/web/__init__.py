"""DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS, a second front end over the core.

The HTTP service depends only on the core and acl: it receives the archive's
:class:`archive.context.Context` -- the same object the DICOM node serves -- and never
imports the DICOM front end nor the command line.  ``archive serve`` runs it beside the
DICOM port (``http:``).
"""
