"""Writing a message body back as a Part-10 file: the stored file itself when the dataset is
unchanged, else a new file in which only the elements the transformer added or changed are
encoded (by pydicom; bulk values get a header and their bytes copied) and every other element is
copied byte for byte, in chunks, from the stored file."""

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
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)

from intu_core import fsync_dir, fsync_path
from intu_dicom_destination.body import rawscan
from intu_dicom_destination.body.model import (
    LONG_HEADER_VRS,
    PIXEL_DATA,
    BulkRef,
    InvalidBody,
    dataset_digest,
    element_fingerprint,
    parse_bulk_uri,
)

_CHARSET = "00080005"
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
        return _rewrite(dataset, stored, work_dir, body.get("raw_elements"))
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
        # Read without pydicom when the file meta is plain (~25x less CPU: it was 0.6 ms of each
        # delivery); pydicom reads anything else and says what is wrong.
        fast = rawscan.file_meta(path)
    except OSError:
        fast = None
    if fast is not None:
        return PreparedInstance(
            Path(path), fast.sop_class_uid, fast.sop_instance_uid, fast.transfer_syntax_uid, temporary
        )
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


def _untouched(model: dict[str, Any], raw_index: Any) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """What to copy as received, and which group lengths to count anew.

    The first: ``{key: (offset, length)}`` of the stored elements whose JSON still has the
    fingerprint it had when the body was built, and the group lengths (gggg,0000) of groups in
    which nothing was added, changed or removed. The second: the group lengths of the other
    groups. Nothing is copied without a usable ``raw_elements`` index, or when the Specific
    Character Set changed: copied text would then be read in the wrong character set."""
    if not isinstance(raw_index, dict):
        return {}, set()
    keep: dict[str, tuple[int, int]] = {}
    group_lengths: dict[str, tuple[int, int]] = {}
    touched: set[str] = set()
    for key, entry in raw_index.items():
        if not (
            isinstance(key, str)
            and len(key) == 8
            and isinstance(entry, list)
            and len(entry) == 3
            and all(isinstance(n, int) and n >= 0 for n in entry[:2])
        ):
            return {}, set()
        if key.endswith("0000"):
            group_lengths[key] = (entry[0], entry[1])
        elif key not in model:
            touched.add(key)  # removed by the transformer
        elif entry[2] and entry[2] == element_fingerprint(model[key]):
            keep[key] = (entry[0], entry[1])
    touched.update(key for key in model if key not in keep)
    if _CHARSET in touched:
        return {}, set(group_lengths)
    touched_groups = {key[:4] for key in touched}
    keep.update((k, v) for k, v in group_lengths.items() if k[:4] not in touched_groups)
    return keep, {k for k in group_lengths if k[:4] in touched_groups}


# One element of the written dataset: ("copy", offset, length) of the stored file, ("bytes",
# encoded element) or ("bulk", header, BulkRef).
_Piece = tuple[Any, ...]


def _piece_size(piece: _Piece) -> int:
    if piece[0] == "copy":
        return int(piece[2])
    if piece[0] == "bytes":
        return len(piece[1])
    ref: BulkRef = piece[2]
    return len(piece[1]) + ref.length + (8 if ref.undefined else 0)


def _rewrite(model: dict[str, Any], stored: Path, work_dir: Path, raw_index: Any = None) -> PreparedInstance:
    """Write the edited dataset: untouched elements are copied from the stored file as received,
    changed and added ones are encoded by pydicom, changed bulk values are copied in chunks."""
    try:
        base_meta = read_file_meta_info(stored)
    except Exception as exc:
        raise InvalidBody(f"the stored DICOM file {stored} cannot be read: {exc}") from None
    ts = UID(str(base_meta.get("TransferSyntaxUID", "") or ""))
    if not ts.is_transfer_syntax or ts == DeflatedExplicitVRLittleEndian:
        raise InvalidBody(f"the stored DICOM file {stored} has an unusable transfer syntax {str(ts)!r}")
    for key, elem in model.items():
        if not isinstance(key, str) or len(key) != 8 or not isinstance(elem, dict) or "vr" not in elem:
            raise InvalidBody(
                f"the body's dataset is not a DICOM JSON model: key {key!r} must be 8 hex digits "
                "mapping to {'vr': ..., 'Value': [...]}"
            )
    sop_class = _model_uid(model, "00080016", "SOPClassUID")
    sop_instance = _model_uid(model, "00080018", "SOPInstanceUID")

    keep, recount = _untouched(model, raw_index)
    pieces: dict[int, _Piece] = {int(key, 16): ("copy", *span) for key, span in keep.items()}
    small: dict[str, Any] = {}
    for key, elem in model.items():
        if key in keep:
            continue
        if "BulkDataURI" in elem:
            try:
                tag = int(key, 16)
            except (TypeError, ValueError):
                raise InvalidBody(f"the body's dataset key {key!r} is not 8 hex digits") from None
            ref = parse_bulk_uri(elem["BulkDataURI"], f"element {key}")
            pieces[tag] = ("bulk", _bulk_header(tag, str(elem.get("vr") or "OB"), ref, ts), ref)
        else:
            small[key] = elem
    ds = _dataset_from_json(small)
    if ts.is_compressed and PIXEL_DATA in ds:
        ds[PIXEL_DATA].is_undefined_length = True
    charset = model.get(_CHARSET, {}).get("Value")
    encodings = convert_encodings(charset) if charset else [default_encoding]
    try:
        for elem in ds:
            if elem.tag.element == 0:
                continue  # a group length in the model: counted anew below if the file had one
            buf = DicomBytesIO()
            buf.is_little_endian = ts.is_little_endian
            buf.is_implicit_VR = ts.is_implicit_VR
            write_data_element(buf, elem, encodings)
            pieces[int(elem.tag)] = ("bytes", buf.getvalue())
    except Exception as exc:
        raise InvalidBody(f"the body's dataset cannot be encoded as DICOM: {exc}") from None
    for key in recount:  # a group length the stored file had, for a group that changed
        group = int(key[:4], 16)
        total = sum(_piece_size(p) for t, p in pieces.items() if t >> 16 == group and t & 0xFFFF)
        if total:
            pieces[group << 16] = ("bytes", _group_length_element(group, total, ts))

    path = _temp_path(work_dir)
    try:
        with open(path, "wb") as out, open(stored, "rb") as src:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(DicomFileLike(out), file_meta_for(sop_class, sop_instance, ts, base_meta))
            pending: list[int] = []  # [offset, length] of stored bytes not yet copied
            for tag in sorted(pieces):
                piece = pieces[tag]
                if piece[0] == "copy":
                    if pending and pending[0] + pending[1] == piece[1]:
                        pending[1] += piece[2]  # adjacent in the stored file: one copy
                        continue
                    _copy_range(src, out, pending, stored)
                    pending = [piece[1], piece[2]]
                    continue
                _copy_range(src, out, pending, stored)
                pending = []
                if piece[0] == "bytes":
                    out.write(piece[1])
                else:
                    _write_bulk(out, tag, piece[1], piece[2], ts)
            _copy_range(src, out, pending, stored)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return PreparedInstance(path, sop_class, sop_instance, str(ts), True)


def _model_uid(model: dict[str, Any], key: str, keyword: str) -> str:
    value = model.get(key, {}).get("Value")
    uid = value[0] if isinstance(value, list) and value and isinstance(value[0], str) else ""
    if not uid.strip("\0 "):
        raise InvalidBody(
            f"the body's dataset has no {keyword} ({key[:4]},{key[4:]}); a DICOM instance needs one"
        )
    return uid.strip("\0 ")


def _group_length_element(group: int, length: int, ts: UID) -> bytes:
    endian = "<" if ts.is_little_endian else ">"
    if ts.is_implicit_VR:
        return struct.pack(f"{endian}HHLL", group, 0, 4, length)
    return struct.pack(f"{endian}HH2sHL", group, 0, b"UL", 4, length)


def _copy_range(src: BinaryIO, out: BinaryIO, span: list[int], stored: Path) -> None:
    """Copy ``span`` ([offset, length], or empty: nothing) of the stored file, in chunks."""
    if not span:
        return
    src.seek(span[0])
    remaining = span[1]
    while remaining:
        chunk = src.read(min(_CHUNK, remaining))
        if not chunk:
            raise InvalidBody(f"{stored} ended before the element at offset {span[0]} did")
        out.write(chunk)
        remaining -= len(chunk)


def _bulk_header(tag: int, vr: str, ref: BulkRef, ts: UID) -> bytes:
    endian = "<" if ts.is_little_endian else ">"
    length = 0xFFFFFFFF if ref.undefined else ref.length
    if ref.length % 2 and not ref.undefined:
        raise InvalidBody(
            f"element {tag:08X}: BulkDataURI length {ref.length} is odd; DICOM values have even length"
        )
    header = struct.pack(f"{endian}HH", tag >> 16, tag & 0xFFFF)
    if ts.is_implicit_VR:
        return header + struct.pack(f"{endian}L", length)
    if vr in LONG_HEADER_VRS:
        return header + vr.encode("ascii") + b"\x00\x00" + struct.pack(f"{endian}L", length)
    if length > 0xFFFF:
        raise InvalidBody(f"element {tag:08X}: a {vr} value of {length} bytes does not fit explicit VR")
    return header + vr.encode("ascii") + struct.pack(f"{endian}H", length)


def _write_bulk(out: BinaryIO, tag: int, header: bytes, ref: BulkRef, ts: UID) -> None:
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
        out.write(struct.pack("<HHL" if ts.is_little_endian else ">HHL", 0xFFFE, 0xE0DD, 0))
