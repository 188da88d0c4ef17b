"""The DICOM message body: what the `dicom` source produces and the `dicom` destination sends.

A public codec: it imports pydicom and intu_core only (no networking, no CLI), so that another
plugin (e.g. a DICOMweb STOW-RS destination) can read and write the same bodies.

A body is a JSON-serialisable dict (documented in ``docs/dicom-message-body.md``)::

    {"dataset": {<DICOM JSON model, PS3.18 F.2>},
     "sop_class_uid": "...", "sop_instance_uid": "...",
     "transfer_syntax_uid": "<transfer syntax of the stored bytes>",
     "file": "/abs/path/of/the/stored/part10.dcm",
     "dataset_digest": "<sha256 of the canonical JSON of 'dataset' at receive time>",
     "raw_elements": {"<tag>": [offset, length, "<fingerprint of its JSON>"], ...},
     "invalid_elements": ["<tag or path of a value pydicom could not convert>", ...]}  # if any

Pixel data and large binary values never enter the JSON: they are ``BulkDataURI`` references
(``file:///abs/path.dcm?offset=N&length=M``) to the value bytes inside the stored file, and they
are copied byte for byte, in chunks, when the instance is written again. When a transformer
edited the dataset, only the elements it added or changed are encoded again; every other element
is copied from the stored file as received (``raw_elements`` says where). Neither building a body
nor writing an edited instance reads pixel data into memory as a whole.

``model`` parses a Part-10 file into a body, ``part10`` writes a body back as a Part-10 file,
``deflate`` inflates received Deflated Explicit VR Little Endian streams.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from intu_dicom_destination.body.deflate import inflate_part10, read_file_meta_info_from
    from intu_dicom_destination.body.model import (
        BULK_THRESHOLD,
        BulkRef,
        DicomBody,
        InvalidBody,
        ScannedInstance,
        body_from_file,
        bulk_data_uri,
        dataset_digest,
        element_fingerprint,
        parse_bulk_uri,
        scan_file,
    )
    from intu_dicom_destination.body.part10 import (
        PreparedInstance,
        prepare_for_send,
        write_part10_from_body,
    )

# Each name is imported from its module when first used (PEP 562): importing the package, or its
# raw walk (``body.rawscan``, which needs no pydicom), does not import pydicom. `intu dicom send`
# walks files while it still imports pydicom and pynetdicom (``cli.lookahead``).
_MODULE_OF = {
    "inflate_part10": "deflate",
    "read_file_meta_info_from": "deflate",
    "PreparedInstance": "part10",
    "prepare_for_send": "part10",
    "write_part10_from_body": "part10",
    **dict.fromkeys(
        (
            "BULK_THRESHOLD",
            "BulkRef",
            "DicomBody",
            "InvalidBody",
            "ScannedInstance",
            "body_from_file",
            "bulk_data_uri",
            "dataset_digest",
            "element_fingerprint",
            "parse_bulk_uri",
            "scan_file",
        ),
        "model",
    ),
}


if not TYPE_CHECKING:  # (for mypy, the imports above: a misspelt name stays an error)

    def __getattr__(name: str) -> Any:
        module = _MODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # once: later uses are plain attribute reads
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "BULK_THRESHOLD",
    "BulkRef",
    "DicomBody",
    "InvalidBody",
    "PreparedInstance",
    "body_from_file",
    "bulk_data_uri",
    "dataset_digest",
    "element_fingerprint",
    "inflate_part10",
    "parse_bulk_uri",
    "prepare_for_send",
    "ScannedInstance",
    "read_file_meta_info_from",
    "scan_file",
    "write_part10_from_body",
]
