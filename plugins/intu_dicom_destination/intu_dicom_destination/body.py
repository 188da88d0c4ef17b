"""The DICOM message body: what the `dicom` source produces and the `dicom` destination sends.

A body is a JSON-serialisable dict (documented in ``docs/dicom-message-body.md``)::

    {"dataset": {<DICOM JSON model, PS3.18 F.2>},
     "sop_class_uid": "...", "sop_instance_uid": "...",
     "transfer_syntax_uid": "<transfer syntax of the stored bytes>",
     "file": "/abs/path/of/the/stored/part10.dcm",
     "dataset_digest": "<sha256 of the canonical JSON of 'dataset' at receive time>"}

Pixel data and large binary values never enter the JSON: they are ``BulkDataURI`` references
(``file:///abs/path.dcm?offset=N&length=M``) to the value bytes inside the stored file, and they
are copied byte for byte, in chunks, when the instance is written again. Neither building a body
nor writing an edited instance reads pixel data into memory as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
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

from intu_core.fsutil import fsync_dir, fsync_path

__all__ = [
    "BULK_THRESHOLD",
    "InvalidBody",
    "PreparedInstance",
    "body_from_file",
    "dataset_digest",
    "prepare_for_send",
    "write_part10_from_body",
]

#: Binary values (OB, OW, OF, OD, OL, OV, UN) longer than this many bytes become BulkDataURI
#: references; Pixel Data (7FE0,0010) always does. Smaller ones are inlined as InlineBinary.
BULK_THRESHOLD = 1024

PIXEL_DATA = 0x7FE00010
# Elements whose dictionary VR is "US or OW" / "US or SS or OW" and that hold LUT samples (pixel-like
# data): in implicit VR they are read as OW. Other ambiguous numeric VRs ("US or SS") are small
# single values (pixel padding, descriptors) and are never treated as bulk binary.
_PIXEL_LIKE_AMBIGUOUS = frozenset({0x00281200, 0x00283006})  # Gray LUT Data, LUT Data
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
# Explicit VR encodings where the length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_CHUNK = 1024 * 1024
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD


class InvalidBody(Exception):
    """A message body that cannot be turned into a DICOM instance; the message says why."""


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


# -- JSON model ---------------------------------------------------------------------------------


def dataset_digest(dataset: Any) -> str:
    """SHA-256 of the canonical JSON (sorted keys, compact) of a DICOM JSON model."""
    text = json.dumps(dataset, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bulk_data_uri(path: Path, offset: int, length: int, *, undefined: bool = False) -> str:
    """``file:///abs/path?offset=N&length=M`` (``&undefined=1`` for encapsulated pixel data)."""
    uri = f"file://{quote(str(Path(path).resolve()))}?offset={offset}&length={length}"
    return uri + "&undefined=1" if undefined else uri


@dataclass(frozen=True)
class _BulkRef:
    path: Path
    offset: int
    length: int
    undefined: bool


def _parse_bulk_uri(uri: Any, where: str) -> _BulkRef:
    if not isinstance(uri, str):
        raise InvalidBody(f"{where}: BulkDataURI must be a string, found {uri!r}")
    parts = urlsplit(uri)
    if parts.scheme != "file" or not parts.path:
        raise InvalidBody(
            f"{where}: BulkDataURI {uri!r} is not supported; expected "
            "'file:///abs/path.dcm?offset=N&length=M'"
        )
    query = parse_qs(parts.query)
    try:
        offset = int(query["offset"][0])
        length = int(query["length"][0])
    except (KeyError, ValueError, IndexError):
        raise InvalidBody(
            f"{where}: BulkDataURI {uri!r} needs integer 'offset' and 'length' query parameters"
        ) from None
    if offset < 0 or length < 0:
        raise InvalidBody(f"{where}: BulkDataURI {uri!r} has a negative offset or length")
    undefined = query.get("undefined", ["0"])[0] in ("1", "true")
    path = Path(unquote(parts.path))
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidBody(
            f"{where}: the file behind BulkDataURI {uri!r} cannot be read ({exc.strerror})"
        ) from None
    if offset + length > size:
        raise InvalidBody(f"{where}: BulkDataURI {uri!r} points past the end of {path} ({size} bytes)")
    return _BulkRef(path, offset, length, undefined)


def _encapsulated_length(fp: BinaryIO, start: int, little_endian: bool, size: int) -> int:
    """Bytes of the items of an undefined-length value, up to (not including) its delimiter."""
    fmt = "<HHL" if little_endian else ">HHL"
    pos = start
    while pos + 8 <= size:
        fp.seek(pos)
        group, elem, length = struct.unpack(fmt, fp.read(8))
        tag = group << 16 | elem
        if tag == _SEQUENCE_DELIMITER:
            return pos - start
        if tag != _ITEM or length == 0xFFFFFFFF:
            break
        pos += 8 + length
    raise InvalidBody(
        f"encapsulated Pixel Data at offset {start} is malformed: expected items ending in a "
        "sequence delimiter"
    )


def _bulk_vr(raw: RawDataElement) -> str:
    """The VR to decide bulkness by (and to report for a bulk value) of a raw element.

    Implicit VR files do not say; the data dictionary does, sometimes ambiguously. "OB or OW"
    (pixel data, overlay, waveform, ...) is OW in implicit VR (PS3.5 A.1), and so is LUT data
    ("US or OW", "US or SS or OW"). Numeric ambiguities ("US or SS") stay as they are: not a
    binary VR, so never bulk; pydicom resolves them from Pixel Representation.
    """
    if raw.VR:
        return str(raw.VR)
    try:
        vr = dictionary_VR(raw.tag)
    except KeyError:
        return "UN"
    if " or " not in vr:
        return vr
    choices = vr.split(" or ")
    if "OW" in choices and ("OB" in choices or int(raw.tag) in _PIXEL_LIKE_AMBIGUOUS):
        return "OW"
    return vr


def body_from_file(path: Path) -> dict[str, Any]:
    """Parse a stored Part-10 file into a message body, leaving bulk values on disk.

    Raises ``InvalidBody`` when the file is not a DICOM instance that can be parsed.
    """
    path = Path(path).resolve()
    try:
        size = path.stat().st_size
        ds = dcmread(path, defer_size=BULK_THRESHOLD)
    except FileNotFoundError:
        raise InvalidBody(f"DICOM file {path} does not exist") from None
    except Exception as exc:  # pydicom raises many kinds of errors for bad data
        raise InvalidBody(f"{path} is not a DICOM file that can be parsed: {exc}") from None

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if not ts:
        raise InvalidBody(f"{path} has no Transfer Syntax UID (0002,0010) in its file meta")
    if ts == DeflatedExplicitVRLittleEndian:
        raise InvalidBody(
            f"{path} is deflated; bulk data cannot point into a deflated stream "
            "(inflate it first, e.g. with inflate_part10)"
        )
    little_endian = UID(ts).is_little_endian

    dataset: dict[str, Any] = {}
    try:
        with open(path, "rb") as fp:
            for tag in sorted(ds.keys()):
                # The private mapping: get_item() would read a deferred value into memory.
                raw = ds._dict[tag]
                key = f"{int(tag):08X}"
                if isinstance(raw, RawDataElement):
                    vr = _bulk_vr(raw)
                    is_bulk = tag == PIXEL_DATA or (
                        vr in _BINARY_VRS and (raw.length == 0xFFFFFFFF or raw.length > BULK_THRESHOLD)
                    )
                    if is_bulk and raw.length != 0:
                        undefined = raw.length == 0xFFFFFFFF
                        if undefined:
                            length = _encapsulated_length(fp, raw.value_tell, little_endian, size)
                        else:
                            length = raw.length
                        if raw.value_tell + length > size:
                            raise InvalidBody(
                                f"{path}: element ({key[:4]},{key[4:]}) claims {length} bytes at "
                                f"offset {raw.value_tell}, past the end of the file ({size} bytes)"
                            )
                        dataset[key] = {
                            "vr": vr,
                            "BulkDataURI": bulk_data_uri(path, raw.value_tell, length, undefined=undefined),
                        }
                        continue
                    if raw.length != 0xFFFFFFFF and raw.value_tell + raw.length > size:
                        raise InvalidBody(
                            f"{path}: element ({key[:4]},{key[4:]}) claims {raw.length} bytes at "
                            f"offset {raw.value_tell}, past the end of the file ({size} bytes)"
                        )
                if tag.element == 0:
                    continue  # group lengths are retired and go stale as soon as anything changes
                dataset[key] = ds[tag].to_json_dict(None, BULK_THRESHOLD)
    except InvalidBody:
        raise
    except Exception as exc:
        raise InvalidBody(f"{path} is not a DICOM dataset that can be parsed: {exc}") from None

    sop_class = _uid_from(dataset, "00080016") or str(meta.get("MediaStorageSOPClassUID", "") or "")
    sop_instance = _uid_from(dataset, "00080018") or str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    if not sop_class or not sop_instance:
        raise InvalidBody(f"{path} has no SOP Class UID (0008,0016) or SOP Instance UID (0008,0018)")
    return {
        "dataset": dataset,
        "sop_class_uid": sop_class,
        "sop_instance_uid": sop_instance,
        "transfer_syntax_uid": ts,
        "file": str(path),
        "dataset_digest": dataset_digest(dataset),
    }


def _uid_from(dataset: Any, key: str) -> str:
    elem = dataset.get(key) if isinstance(dataset, dict) else None
    if isinstance(elem, dict):
        value = elem.get("Value")
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0].strip("\0 ")
    return ""


# -- writing instances --------------------------------------------------------------------------


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


def _read_bulk(ref: _BulkRef) -> bytes:
    with open(ref.path, "rb") as fp:
        fp.seek(ref.offset)
        data = fp.read(ref.length)
    if ref.undefined:
        return data + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return data


_NESTED_BULK_LIMIT = 64 * 1024 * 1024


def _bulk_handler(tag: str, vr: str, uri: str) -> bytes:
    # Bulk values inside sequences (rare) are read into memory: they are small in practice.
    ref = _parse_bulk_uri(uri, f"element {tag}")
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
    ds.file_meta = _file_meta(sop_class, sop_instance, ts_uid)
    if ts_uid.is_compressed and PIXEL_DATA in ds:
        ds[PIXEL_DATA].is_undefined_length = True
    path = _temp_path(work_dir)
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise InvalidBody(f"the body's dataset cannot be written as DICOM: {exc}") from None
    return PreparedInstance(path, sop_class, sop_instance, str(ts_uid), True)


def _file_meta(
    sop_class: str, sop_instance: str, ts: str, base: FileMetaDataset | None = None
) -> FileMetaDataset:
    meta = FileMetaDataset()
    if base is not None:
        for elem in base:
            if elem.tag.element != 0:
                meta.add(elem)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
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

    bulk: dict[int, tuple[str, _BulkRef]] = {}
    small: dict[str, Any] = {}
    for key, elem in model.items():
        if isinstance(elem, dict) and "BulkDataURI" in elem:
            try:
                tag = int(key, 16)
            except (TypeError, ValueError):
                raise InvalidBody(f"the body's dataset key {key!r} is not 8 hex digits") from None
            vr = str(elem.get("vr") or "OB")
            bulk[tag] = (vr, _parse_bulk_uri(elem["BulkDataURI"], f"element {key}"))
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
            write_file_meta_info(fp, _file_meta(sop_class, sop_instance, ts, base_meta))
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


def _write_bulk(out: BinaryIO, tag: int, vr: str, ref: _BulkRef, ts: UID) -> None:
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


# -- deflate --------------------------------------------------------------------------------------


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
        _file_meta(sop_class, sop_instance, ExplicitVRLittleEndian, meta),
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
    from pydicom.filereader import _read_file_meta_info

    fp.seek(132)
    return _read_file_meta_info(fp)
