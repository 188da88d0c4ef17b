"""Writing a message body back as a Part-10 file: the stored file itself when the dataset is
unchanged, else a new file whose small elements pydicom encodes and whose bulk values are copied
byte for byte, in chunks, from the stored file."""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)

from intu_core import fsync_dir, fsync_path
from intu_dicom_destination.body.model import (
    PIXEL_DATA,
    BulkRef,
    InvalidBody,
    dataset_digest,
    parse_bulk_uri,
)

# Explicit VR encodings where the length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_CHUNK = 1024 * 1024


@dataclass
class PreparedInstance:
    """A Part-10 file ready to send, and whether it is ours to delete afterwards."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    temporary: bool

    def cleanup(self) -> None:
        """Delete the file if it was written only for this send."""
        if self.temporary:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def prepare_for_send(body: Any, work_dir: Path) -> PreparedInstance:
    """Turn a message body into a Part-10 file to send.

    Accepts the body dict built by ``body_from_file`` (the stored file itself when the dataset is
    unchanged, else a new file in ``work_dir`` with bulk values streamed from the original), a
    body dict with InlineBinary values and no ``file``, or a Part-10 file as ``bytes`` or a path.
    Raises ``InvalidBody`` with the reason when the body is unusable.
    """
    work_dir = Path(work_dir)
    if isinstance(body, (bytes, bytearray, memoryview)):
        return _prepare_bytes(bytes(body), work_dir)
    if isinstance(body, (str, os.PathLike)):
        return _prepare_path(Path(body), temporary=False)
    if not isinstance(body, dict):
        raise InvalidBody(
            f"a DICOM message body must be a dict with a 'dataset', Part-10 bytes or a file path; "
            f"found {type(body).__name__}"
        )
    dataset = body.get("dataset")
    file = body.get("file")
    if dataset is None:
        if file:
            return _prepare_path(Path(file), temporary=False)
        raise InvalidBody("the DICOM message body has no 'dataset' (and no 'file')")
    if not isinstance(dataset, dict):
        raise InvalidBody(
            f"the body's 'dataset' must be a DICOM JSON model (a dict), found {type(dataset).__name__}"
        )
    if file:
        stored = Path(file)
        if not stored.is_file():
            raise InvalidBody(f"the stored DICOM file {stored} named by the body does not exist")
        if body.get("dataset_digest") and body.get("dataset_digest") == dataset_digest(dataset):
            return _prepare_path(stored, temporary=False, body=body)
        return _rewrite(dataset, stored, work_dir)
    return _from_inline(dataset, body.get("transfer_syntax_uid"), work_dir)


def write_part10_from_body(body: Any, dest: Path) -> Path:
    """Write the Part-10 instance that ``body`` describes to ``dest``; return ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prepared = prepare_for_send(body, dest.parent)
    if prepared.temporary:
        # A new file in dest's folder: make its bytes durable, then rename it into place.
        try:
            fsync_path(prepared.path)
            os.replace(prepared.path, dest)
        except BaseException:
            prepared.cleanup()
            raise
        fsync_dir(dest.parent)
    elif prepared.path.resolve() != dest.resolve():
        # Copy to a temporary file next to dest and rename it: a crash or a full disk never
        # leaves a truncated dest behind (dest is either absent, its old self, or complete).
        tmp = _temp_path(dest.parent)
        try:
            with open(prepared.path, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
    return dest


def _temp_path(work_dir: Path) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir / f".intu-{uuid.uuid4().hex}.dcm"


def _prepare_bytes(data: bytes, work_dir: Path) -> PreparedInstance:
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InvalidBody("the body's bytes are not a DICOM Part-10 file (no 'DICM' prefix at offset 128)")
    path = _temp_path(work_dir)
    try:
        path.write_bytes(data)
        return _prepare_path(path, temporary=True)
    except BaseException:  # InvalidBody, or a write that failed half-way (disk full)
        path.unlink(missing_ok=True)
        raise


def _prepare_path(path: Path, *, temporary: bool, body: dict[str, Any] | None = None) -> PreparedInstance:
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError:
        raise InvalidBody(f"DICOM file {path} does not exist") from None
    except Exception as exc:
        raise InvalidBody(f"{path} is not a DICOM Part-10 file: {exc}") from None
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if body is not None:
        sop_class = sop_class or str(body.get("sop_class_uid") or "")
        sop_instance = sop_instance or str(body.get("sop_instance_uid") or "")
        ts = ts or str(body.get("transfer_syntax_uid") or "")
    if not sop_class or not sop_instance or not ts:
        raise InvalidBody(
            f"{path} lacks Media Storage SOP Class UID, SOP Instance UID or Transfer Syntax UID "
            "in its file meta (0002,0002/0003/0010)"
        )
    return PreparedInstance(Path(path), sop_class, sop_instance, ts, temporary)


def _read_bulk(ref: BulkRef) -> bytes:
    with open(ref.path, "rb") as fp:
        fp.seek(ref.offset)
        data = fp.read(ref.length)
    if ref.undefined:
        return data + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return data


_NESTED_BULK_LIMIT = 64 * 1024 * 1024


def _bulk_handler(tag: str, vr: str, uri: str) -> bytes:
    # Bulk values inside sequences (rare) are read into memory: they are small in practice.
    ref = parse_bulk_uri(uri, f"element {tag}")
    if ref.length > _NESTED_BULK_LIMIT:
        raise InvalidBody(f"element {tag}: BulkDataURI value of {ref.length} bytes is too large to nest")
    return _read_bulk(ref)


def _dataset_from_json(model: dict[str, Any]) -> Dataset:
    for key, elem in model.items():
        if not isinstance(key, str) or len(key) != 8 or not isinstance(elem, dict) or "vr" not in elem:
            raise InvalidBody(
                f"the body's dataset is not a DICOM JSON model: key {key!r} must be 8 hex digits "
                "mapping to {'vr': ..., 'Value': [...]}"
            )
    try:
        return Dataset.from_json(model, bulk_data_uri_handler=_bulk_handler)
    except InvalidBody:
        raise
    except Exception as exc:
        raise InvalidBody(f"the body's dataset is not a valid DICOM JSON model: {exc}") from None


def _required_uid(ds: Dataset, keyword: str, tag: str) -> str:
    value = str(ds.get(keyword, "") or "").strip("\0 ")
    if not value:
        raise InvalidBody(f"the body's dataset has no {keyword} ({tag}); a DICOM instance needs one")
    return value


def _from_inline(model: dict[str, Any], ts: Any, work_dir: Path) -> PreparedInstance:
    ds = _dataset_from_json(model)
    sop_class = _required_uid(ds, "SOPClassUID", "0008,0016")
    sop_instance = _required_uid(ds, "SOPInstanceUID", "0008,0018")
    ts_uid = UID(str(ts)) if ts else ExplicitVRLittleEndian
    if not ts_uid.is_transfer_syntax:
        raise InvalidBody(f"the body's transfer_syntax_uid {str(ts)!r} is not a known transfer syntax")
    ds.file_meta = file_meta_for(sop_class, sop_instance, ts_uid)
    if ts_uid.is_compressed and PIXEL_DATA in ds:
        ds[PIXEL_DATA].is_undefined_length = True
    path = _temp_path(work_dir)
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise InvalidBody(f"the body's dataset cannot be written as DICOM: {exc}") from None
    return PreparedInstance(path, sop_class, sop_instance, str(ts_uid), True)


def file_meta_for(
    sop_class: str, sop_instance: str, ts: str, base: FileMetaDataset | None = None
) -> FileMetaDataset:
    """A file meta group for an instance (keeping ``base``'s other elements, group lengths
    aside: they are written anew)."""
    meta = FileMetaDataset()
    if base is not None:
        for elem in base:
            if elem.tag.element != 0:
                meta.add(elem)
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _rewrite(model: dict[str, Any], stored: Path, work_dir: Path) -> PreparedInstance:
    """Write the edited dataset: pydicom encodes the small elements, bulk values are copied."""
    try:
        base_meta = read_file_meta_info(stored)
    except Exception as exc:
        raise InvalidBody(f"the stored DICOM file {stored} cannot be read: {exc}") from None
    ts = UID(str(base_meta.get("TransferSyntaxUID", "") or ""))
    if not ts.is_transfer_syntax or ts == DeflatedExplicitVRLittleEndian:
        raise InvalidBody(f"the stored DICOM file {stored} has an unusable transfer syntax {str(ts)!r}")

    bulk: dict[int, tuple[str, BulkRef]] = {}
    small: dict[str, Any] = {}
    for key, elem in model.items():
        if isinstance(elem, dict) and "BulkDataURI" in elem:
            try:
                tag = int(key, 16)
            except (TypeError, ValueError):
                raise InvalidBody(f"the body's dataset key {key!r} is not 8 hex digits") from None
            vr = str(elem.get("vr") or "OB")
            bulk[tag] = (vr, parse_bulk_uri(elem["BulkDataURI"], f"element {key}"))
        else:
            small[key] = elem
    ds = _dataset_from_json(small)
    sop_class = _required_uid(ds, "SOPClassUID", "0008,0016")
    sop_instance = _required_uid(ds, "SOPInstanceUID", "0008,0018")
    if ts.is_compressed and PIXEL_DATA in ds:
        ds[PIXEL_DATA].is_undefined_length = True
    charset = ds.get("SpecificCharacterSet")
    encodings = convert_encodings(charset) if charset else [default_encoding]

    path = _temp_path(work_dir)
    try:
        with open(path, "wb") as raw:
            raw.write(b"\x00" * 128 + b"DICM")
            fp = DicomFileLike(raw)
            write_file_meta_info(fp, file_meta_for(sop_class, sop_instance, ts, base_meta))
            fp.is_little_endian = ts.is_little_endian
            fp.is_implicit_VR = ts.is_implicit_VR
            for tag in sorted({int(t) for t in ds.keys()} | set(bulk)):
                if tag in bulk:
                    vr, ref = bulk[tag]
                    _write_bulk(raw, tag, vr, ref, ts)
                else:
                    elem = ds[Tag(tag)]
                    if elem.tag.element == 0:
                        continue  # stale group length
                    write_data_element(fp, elem, encodings)
    except InvalidBody:
        path.unlink(missing_ok=True)
        raise
    except OSError:
        path.unlink(missing_ok=True)
        raise
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise InvalidBody(f"the body's dataset cannot be encoded as DICOM: {exc}") from None
    return PreparedInstance(path, sop_class, sop_instance, str(ts), True)


def _write_bulk(out: BinaryIO, tag: int, vr: str, ref: BulkRef, ts: UID) -> None:
    endian = "<" if ts.is_little_endian else ">"
    length = 0xFFFFFFFF if ref.undefined else ref.length
    if ref.length % 2 and not ref.undefined:
        raise InvalidBody(
            f"element {tag:08X}: BulkDataURI length {ref.length} is odd; DICOM values have even length"
        )
    header = struct.pack(f"{endian}HH", tag >> 16, tag & 0xFFFF)
    if ts.is_implicit_VR:
        header += struct.pack(f"{endian}L", length)
    elif vr in _LONG_LENGTH_VRS:
        header += vr.encode("ascii") + b"\x00\x00" + struct.pack(f"{endian}L", length)
    else:
        if length > 0xFFFF:
            raise InvalidBody(f"element {tag:08X}: a {vr} value of {length} bytes does not fit explicit VR")
        header += vr.encode("ascii") + struct.pack(f"{endian}H", length)
    out.write(header)
    with open(ref.path, "rb") as src:
        src.seek(ref.offset)
        remaining = ref.length
        while remaining:
            chunk = src.read(min(_CHUNK, remaining))
            if not chunk:
                raise InvalidBody(f"element {tag:08X}: {ref.path} ended before the bulk value did")
            out.write(chunk)
            remaining -= len(chunk)
    if ref.undefined:
        out.write(struct.pack(f"{endian}HHL", 0xFFFE, 0xE0DD, 0))
