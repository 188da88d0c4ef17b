"""Deflated Part-10 streams: inflated on receipt, because bulk-data references cannot point into
a deflated stream."""

from __future__ import annotations

import zlib
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from intu_dicom_destination import internals
from intu_dicom_destination.body.model import InvalidBody
from intu_dicom_destination.body.part10 import file_meta_for

_CHUNK = 1024 * 1024


def inflate_part10(src: BinaryIO, dest: BinaryIO) -> None:
    """Copy a Deflated Explicit VR Little Endian Part-10 stream to ``dest`` as Explicit VR LE.

    ``src`` is positioned at the start of the file. Bulk-data references cannot point into a
    deflated stream, so received deflated instances are stored inflated (chunk by chunk: memory
    stays bounded however much the stream expands, so a "deflate bomb" only costs disk).

    Raises ``InvalidBody`` when the file meta is missing or unusable or the deflate stream is
    corrupt; ``OSError`` when reading or writing fails.
    """
    preamble = src.read(132)
    if preamble[128:132] != b"DICM":
        raise InvalidBody("not a DICOM Part-10 stream (no 'DICM' prefix at offset 128)")
    src.seek(0)
    try:
        meta = read_file_meta_info_from(src)
        start = src.tell()
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many kinds of errors for a bad file meta group
        raise InvalidBody(f"the file meta group cannot be read: {type(exc).__name__}: {exc}") from None
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dest.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        DicomFileLike(dest),
        file_meta_for(sop_class, sop_instance, ExplicitVRLittleEndian, meta),
    )
    src.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while chunk := src.read(_CHUNK):
            # max_length bounds each output piece; what did not fit waits in unconsumed_tail.
            while chunk:
                dest.write(inflater.decompress(chunk, _CHUNK))
                chunk = inflater.unconsumed_tail
        dest.write(inflater.flush())
    except zlib.error as exc:
        raise InvalidBody(f"the deflated dataset is corrupt: {exc}") from None


def read_file_meta_info_from(fp: BinaryIO) -> FileMetaDataset:
    """The file meta group of an open Part-10 stream; leaves ``fp`` at the first dataset byte."""
    fp.seek(132)
    return internals.read_file_meta_group(fp)
