"""Pieces both sides of the DICOM plugin use: AE titles, TLS, pynetdicom's log level."""
