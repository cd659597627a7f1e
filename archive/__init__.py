"""A document-oriented DICOM archive: DICOM JSON metadata in MongoDB, originals in GridFS."""

__version__ = "0.1.0"
