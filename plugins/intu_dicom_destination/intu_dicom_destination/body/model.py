"""The message body's JSON model: a stored Part-10 file parsed into the DICOM JSON model, with
bulk values left on disk as ``BulkDataURI`` references (``file:///abs/path.dcm?offset=N&length=M``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from intu_dicom_destination import internals
from intu_dicom_destination.body import rawscan

#: Binary values (OB, OW, OF, OD, OL, OV, UN) longer than this many bytes become BulkDataURI
#: references; Pixel Data (7FE0,0010) always does. Smaller ones are inlined as InlineBinary.
BULK_THRESHOLD = 1024

PIXEL_DATA = 0x7FE00010
# Elements whose dictionary VR is "US or OW" / "US or SS or OW" and that hold LUT samples (pixel-like
# data): in implicit VR they are read as OW. Other ambiguous numeric VRs ("US or SS") are small
# single values (pixel padding, descriptors) and are never treated as bulk binary.
_PIXEL_LIKE_AMBIGUOUS = frozenset({0x00281200, 0x00283006})  # Gray LUT Data, LUT Data
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
# Explicit VR encodings with a 12-byte header: 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_KNOWN_VRS = frozenset(
    {"AT", "FD", "FL", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SQ", "SS", "SV", "UL", "UN", "US", "UV"}
)
# VRs whose value is text: an unconvertible one is shown to transformers as its strings.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


class InvalidBody(Exception):
    """A message body that cannot be turned into a DICOM instance; the message says why."""


def dataset_digest(dataset: Any) -> str:
    """SHA-256 of the canonical JSON (sorted keys, compact) of a DICOM JSON model."""
    text = json.dumps(dataset, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def element_fingerprint(element: Any) -> str:
    """A short hash of one element's DICOM JSON (canonical form): equal fingerprints mean the
    transformer left the element as it was, so its received bytes can be copied as they are."""
    text = json.dumps(element, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def bulk_data_uri(path: Path, offset: int, length: int, *, undefined: bool = False) -> str:
    """``file:///abs/path?offset=N&length=M`` (``&undefined=1`` for encapsulated pixel data)."""
    uri = f"file://{quote(str(Path(path).resolve()))}?offset={offset}&length={length}"
    return uri + "&undefined=1" if undefined else uri


@dataclass(frozen=True)
class BulkRef:
    """Where a bulk value's bytes are: a byte range of a file (``undefined``: encapsulated)."""

    path: Path
    offset: int
    length: int
    undefined: bool


def parse_bulk_uri(uri: Any, where: str) -> BulkRef:
    """The byte range a ``file://`` BulkDataURI names, checked against the file's size; raises
    ``InvalidBody`` (``where`` names the element) when it is unusable."""
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
    return BulkRef(path, offset, length, undefined)


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
    return _dictionary_bulk_vr(int(raw.tag))


def body_from_file(path: Path) -> dict[str, Any]:
    """Parse a stored Part-10 file into a message body, leaving bulk values on disk.

    Besides the JSON model, the body records where each top-level element's bytes are in the
    file (``raw_elements``), so that an edited instance is written with every untouched element
    copied as received. A value pydicom cannot convert (IS '1A', DS 'abc') does not stop the
    parse: the model shows it as its strings and ``invalid_elements`` names it.

    Raises ``InvalidBody`` when the file is not a DICOM instance that can be parsed.
    """
    path, size, ds, meta, ts = _read_stored(path)
    little_endian = UID(ts).is_little_endian
    implicit = UID(ts).is_implicit_VR

    dataset: dict[str, Any] = {}
    invalid: list[str] = []
    spans: list[_Span] = []
    copyable = True  # False: every element is re-encoded when the dataset is edited
    elements = internals.raw_elements(ds)
    key = ""
    try:
        with open(path, "rb") as fp:
            for tag in sorted(ds.keys()):
                raw = elements[tag]  # deferred values stay raw: never read into memory here
                key = f"{int(tag):08X}"
                try:
                    span = _span_of(key, raw, implicit, little_endian)
                except _EncodingMismatch:
                    span, copyable = None, False
                if span is not None:
                    spans.append(span)
                if isinstance(raw, RawDataElement):
                    vr = _bulk_vr(raw)
                    is_bulk = tag == PIXEL_DATA or (
                        vr in _BINARY_VRS and (raw.length == 0xFFFFFFFF or raw.length > BULK_THRESHOLD)
                    )
                    if is_bulk and raw.length != 0:
                        undefined = raw.length == 0xFFFFFFFF
                        if undefined:
                            length = _encapsulated_length(fp, raw.value_tell, little_endian, size)
                            if span is not None:  # the value, then its 8-byte delimiter
                                span.end = raw.value_tell + length + 8
                        else:
                            length = raw.length
                        if raw.value_tell + length > size:
                            raise InvalidBody(
                                f"{path} is not a DICOM dataset that can be parsed: element "
                                f"({key[:4]},{key[4:]}) "
                                f"claims {length} bytes at offset {raw.value_tell}, past the end of the file "
                                f"({size} bytes)"
                            )
                        dataset[key] = {
                            "vr": vr,
                            "BulkDataURI": bulk_data_uri(path, raw.value_tell, length, undefined=undefined),
                        }
                        continue
                    if raw.length != 0xFFFFFFFF and raw.value_tell + raw.length > size:
                        raise InvalidBody(
                            f"{path} is not a DICOM dataset that can be parsed: element "
                            f"({key[:4]},{key[4:]}) "
                            f"claims {raw.length} bytes at offset {raw.value_tell}, past the end of the file "
                            f"({size} bytes)"
                        )
                if tag.element == 0:
                    continue  # group lengths are retired and go stale as soon as anything changes
                dataset[key] = _element_json(ds, tag, key, invalid)
            raw_elements = _raw_index(fp, spans, dataset, size) if copyable else {}
    except InvalidBody:
        raise
    except Exception as exc:
        where = f" at element ({key[:4]},{key[4:]})" if key else ""
        raise InvalidBody(f"{path} is not a DICOM dataset that can be parsed{where}: {exc}") from None

    sop_class = _uid_from(dataset, "00080016") or str(meta.get("MediaStorageSOPClassUID", "") or "")
    sop_instance = _uid_from(dataset, "00080018") or str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    if not sop_class or not sop_instance:
        raise InvalidBody(f"{path} has no SOP Class UID (0008,0016) or SOP Instance UID (0008,0018)")
    body = {
        "dataset": dataset,
        "sop_class_uid": sop_class,
        "sop_instance_uid": sop_instance,
        "transfer_syntax_uid": ts,
        "file": str(path),
        "dataset_digest": dataset_digest(dataset),
        "raw_elements": raw_elements,
    }
    if invalid:
        body["invalid_elements"] = invalid
    return body


#: At most this many elements in the history's summary of an instance (``history_fields``).
HISTORY_TAGS = 40
# Text VRs worth a line in the summary (not the long-text ones), and those of them in ASCII.
_SUMMARY_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
# The identifiers the history keeps and searches by, by DICOM keyword.
_IDENTIFIERS = {
    "PatientID": "patient_id",
    "AccessionNumber": "accession_number",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "Modality": "modality",
}

# The body keys ``DicomBody`` has from the start; the others come with the JSON model.
_LIGHT_KEYS = ("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "file")


class DicomBody(dict):  # type: ignore[type-arg]
    """A message body whose JSON model is built only when a stage reads it (``DeferredBody``).

    It starts with ``sop_class_uid``, ``sop_instance_uid``, ``transfer_syntax_uid`` and ``file``
    (the stored file was checked by ``scan_file``); ``materialize()`` adds what
    ``body_from_file`` would have (``dataset``, ``dataset_digest``, ``raw_elements``, ...). The
    engine calls it before any filter or transformer runs; a body that no stage reads is queued
    without a ``dataset`` and sent as the stored file, byte for byte (``prepare_for_send``).
    Building the model is most of the receiving side's per-instance work in Python (about 1.5 ms
    of a 512 KiB CT instance's ~2 ms on this machine), and a plain router never needs it.
    """

    def materialize(self) -> None:
        """Add the JSON model and its indexes (once; raises ``InvalidBody`` like ``body_from_file``)."""
        if "dataset" not in self:
            self.update(body_from_file(Path(self["file"])))


class ScannedInstance:
    """What ``scan_file`` read: the file's UIDs and its top-level elements (bulk values not read).

    A file the raw walk understood keeps the walk's index (``elements``); the checks and the
    history read their few values from it, and the pydicom ``dataset`` is built from it only
    when something asks for it (a value only pydicom can convert). A file pydicom read has its
    ``dataset`` from the start."""

    def __init__(
        self,
        path: Path,
        dataset: Dataset | None,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        elements: tuple[rawscan.TopElement, ...] | None = None,
        size: int = -1,
    ) -> None:
        if dataset is None and elements is None:
            raise ValueError("a ScannedInstance needs a dataset or the walk's elements")
        self.path = path
        self.transfer_syntax_uid = transfer_syntax_uid
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        #: The file's size in bytes when it was read (-1: not known).
        self.size = size
        self._dataset = dataset
        # The walk's elements by tag, as a dict like pydicom's (a repeated tag: its first
        # place, its last value).
        self._by_tag = None if elements is None else {e.tag: e for e in elements}

    @property
    def dataset(self) -> Dataset:
        """The parsed dataset: top-level raw elements, values over ``BULK_THRESHOLD`` deferred."""
        if self._dataset is None:
            assert self._by_tag is not None
            self._dataset = _dataset_of(self._by_tag.values(), self.transfer_syntax_uid)
        return self._dataset

    def model_of(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The JSON model of those top-level elements (8-hex-digit keys) that the dataset has,
        bulk values as references: for checks that read a few elements."""
        model: dict[str, Any] = {}
        for key in keys:
            tag = int(key, 16)
            if self._by_tag is not None:
                e = self._by_tag.get(tag)
                if e is None:
                    continue
                vr = _VR_NAMES[e.vr] if e.vr else _dictionary_bulk_vr(tag)
                if tag == PIXEL_DATA:
                    undefined = e.length == 0xFFFFFFFF
                    uri = bulk_data_uri(
                        self.path, e.value_offset, 0 if undefined else e.length, undefined=undefined
                    )
                    model[key] = {"vr": vr, "BulkDataURI": uri}
                    continue
                plain = _plain_json_of(vr, e.value, True) if e.value is not None else None
                if plain is not None:
                    model[key] = plain
                    continue
            ds = self.dataset
            raw = internals.raw_elements(ds).get(tag)
            if raw is None:
                continue
            if tag == PIXEL_DATA and isinstance(raw, RawDataElement):
                # The range as the body has it; an encapsulated one's length is not needed here.
                undefined = raw.length == 0xFFFFFFFF
                length = 0 if undefined else raw.length
                uri = bulk_data_uri(self.path, raw.value_tell, length, undefined=undefined)
                model[key] = {"vr": _bulk_vr(raw), "BulkDataURI": uri}
                continue
            model[key] = _plain_json(raw) or _element_json(ds, ds[tag].tag, key, [])
        return model

    def pixel_data(self) -> tuple[int, bool] | None:
        """Pixel Data's length in the file and whether it is undefined (encapsulated; the length
        then 0), as its BulkDataURI in ``model_of`` says, without building and parsing the URI;
        None when the dataset has none or pydicom converted it while reading."""
        if self._by_tag is not None:
            e = self._by_tag.get(PIXEL_DATA)
            if e is None:
                return None
            length = e.length
        else:
            raw = internals.raw_elements(self.dataset).get(PIXEL_DATA)
            if not isinstance(raw, RawDataElement):
                return None
            length = raw.length
        undefined = length == 0xFFFFFFFF
        return (0 if undefined else length), undefined

    def body(self) -> DicomBody:
        """A ``DicomBody`` of the scanned file, its model not built yet."""
        return DicomBody(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            file=str(self.path),
        )

    def history_fields(self) -> dict[str, Any]:
        """What the message history keeps of this instance (``metadata["history"]``, less its
        ``source``): the identifiers people search by, and a short summary of the top-level
        elements by keyword for the dashboard (text values of at most 64 characters, no binary
        values or sequences, at most ``HISTORY_TAGS`` of them)."""
        if self._by_tag is None:
            return self._history_from_dataset()
        by_tag = self._by_tag
        identifiers: dict[str, str] = {}
        tags: dict[str, str] = {}
        charset = by_tag.get(0x00080005)
        ascii_text = charset is None or (
            charset.value is not None and charset.value.strip(b" \0") in _ASCII_COMPATIBLE
        )
        for tag, e in by_tag.items():
            if len(tags) >= HISTORY_TAGS and tag > 0x0020000E:
                break  # the identifiers are all in groups 0008-0020
            vr = _VR_NAMES[e.vr] if e.vr else _dictionary_bulk_vr(tag)
            if vr not in _SUMMARY_VRS or not 0 < e.length <= 64:
                continue
            keyword = _keyword(tag)
            if not keyword:
                continue
            assert e.value is not None  # (64 bytes or less: read by the walk)
            text = _summary_text(e.value, vr, ascii_text, tag, self._converted)
            if text is not None:
                _summarize(identifiers, tags, keyword, text)
        identifiers.setdefault("sop_instance_uid", self.sop_instance_uid)
        return {"identifiers": identifiers, "tags": tags}

    def _converted(self, tag: int) -> Any:
        """The value of the top-level element ``tag`` as pydicom converts it."""
        return self.dataset[tag].value

    def _history_from_dataset(self) -> dict[str, Any]:
        """``history_fields`` of a file pydicom read (some of its elements converted already)."""
        ds = self.dataset
        identifiers: dict[str, str] = {}
        tags: dict[str, str] = {}
        charset = internals.raw_elements(ds).get(0x00080005)
        ascii_text = charset is None or (
            isinstance(charset, RawDataElement)
            and isinstance(charset.value, bytes)
            and charset.value.strip(b" \0") in _ASCII_COMPATIBLE
        )
        for tag, raw in internals.raw_elements(ds).items():
            if len(tags) >= HISTORY_TAGS and int(tag) > 0x0020000E:
                break  # the identifiers are all in groups 0008-0020
            vr = str(raw.VR) if raw.VR else _bulk_vr(raw) if isinstance(raw, RawDataElement) else "UN"
            if isinstance(raw, RawDataElement):
                length = raw.length
            else:  # converted already (by pydicom while reading, or the SOP UIDs by a check)
                length = len(_as_text(raw.value)) if vr in _SUMMARY_VRS else 0
            if vr not in _SUMMARY_VRS or not 0 < length <= 64:
                continue
            keyword = _keyword(int(tag))
            if not keyword:
                continue
            value = raw.value if isinstance(raw, RawDataElement) else None
            text = _summary_text(value, vr, ascii_text, tag, self._converted)
            if text is not None:
                _summarize(identifiers, tags, keyword, text)
        identifiers.setdefault("sop_instance_uid", self.sop_instance_uid)
        return {"identifiers": identifiers, "tags": tags}

    def has_dataset(self) -> bool:
        """Any element besides the file meta group."""
        if self._by_tag is not None:
            return bool(self._by_tag)  # (the walk refuses file meta elements in the dataset)
        return any(int(tag) >> 16 != 0x0002 for tag in self.dataset.keys())


def scan_file(path: Path) -> ScannedInstance:
    """Read a stored Part-10 file as ``body_from_file`` does, with the same checks and errors
    (``InvalidBody``: not DICOM, deflated, no transfer syntax, a value claiming bytes past the end
    of the file, malformed encapsulated pixel data, no SOP UIDs), without building the JSON model.

    A file the raw walk (``rawscan``) fully understands gets its dataset from the walk's index;
    any other is read by pydicom, which says what is wrong with it."""
    # abspath, not resolve(): no lstat per path component (~0.15 ms a file, for the folders the
    # engine made itself).
    text = os.fspath(path)
    absolute = os.path.abspath(text)
    # The caller's Path when it is absolute and normal already (the source's are): no new one.
    return _scan_raw(
        path if absolute == text and isinstance(path, Path) else Path(absolute)
    ) or _scan_pydicom(path)


def _scan_pydicom(path: Path) -> ScannedInstance:
    path, size, ds, meta, ts = _read_stored(path)
    little_endian = UID(ts).is_little_endian
    elements = internals.raw_elements(ds)
    key = ""
    try:
        with open(path, "rb") as fp:
            for tag, raw in elements.items():
                if not isinstance(raw, RawDataElement):
                    continue  # converted while reading (e.g. Specific Character Set): all there
                length = raw.length
                if length == 0xFFFFFFFF:
                    if tag != PIXEL_DATA and _bulk_vr(raw) not in _BINARY_VRS:
                        continue  # an undefined-length sequence: pydicom read it whole
                    key = f"{int(tag):08X}"
                    length = _encapsulated_length(fp, raw.value_tell, little_endian, size)
                if raw.value_tell + length > size:
                    key = f"{int(tag):08X}"
                    raise InvalidBody(
                        f"{path} is not a DICOM dataset that can be parsed: element "
                        f"({key[:4]},{key[4:]}) claims {length} bytes at offset {raw.value_tell}, past "
                        f"the end of the file ({size} bytes)"
                    )
            sop_class = _uid_of(ds, 0x00080016) or str(meta.get("MediaStorageSOPClassUID", "") or "")
            sop_instance = _uid_of(ds, 0x00080018) or str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    except InvalidBody:
        raise
    except Exception as exc:
        where = f" at element ({key[:4]},{key[4:]})" if key else ""
        raise InvalidBody(f"{path} is not a DICOM dataset that can be parsed{where}: {exc}") from None
    if not sop_class or not sop_instance:
        raise InvalidBody(f"{path} has no SOP Class UID (0008,0016) or SOP Instance UID (0008,0018)")
    return ScannedInstance(path, ds, ts, sop_class, sop_instance, size=size)


# VRs whose JSON model ``_plain_json`` writes from the raw bytes (PS3.18 F.2.3: strings, and IS and
# US as numbers; IS is left as its text, which the checks parse as pydicom would).
_PLAIN_TEXT_VRS = frozenset({"AE", "CS", "DA", "IS", "TM", "UI"})


def _plain_json(raw: Any) -> dict[str, Any] | None:
    """The JSON model of a raw text or US element, without pydicom's conversion (~40 us each, most
    of the source's checks); None for anything else (then pydicom converts it)."""
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
        return None
    vr = str(raw.VR) if raw.VR else _bulk_vr(raw)
    return _plain_json_of(vr, raw.value, raw.is_little_endian)


def _plain_json_of(vr: str, value: bytes, little_endian: bool) -> dict[str, Any] | None:
    """``_plain_json`` of a value of ``vr``."""
    if vr == "US" and len(value) % 2 == 0:
        fmt = "<" if little_endian else ">"
        numbers = list(struct.unpack(f"{fmt}{len(value) // 2}H", value))
        return {"vr": vr, "Value": numbers} if numbers else {"vr": vr}
    if vr in _PLAIN_TEXT_VRS:
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        texts = [t.strip("\0 ") for t in text.split("\\")]
        return {"vr": vr, "Value": texts} if text.strip("\0 ") else {"vr": vr}
    return None


# Specific Character Sets in which printable ASCII bytes are ASCII text (ISO_IR 13, for one, puts
# a Yen sign at 0x5C, ISO 2022 escapes switch repertoires).
_ASCII_COMPATIBLE = frozenset({b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 6"})
_PRINTABLE = bytes(range(0x20, 0x7F))


def _plain_text(value: bytes | None, vr: str, ascii_text: bool) -> str | None:
    """A LO, SH or PN value of printable ASCII as pydicom converts it, without its conversion
    (~40 us each); None for anything else. LO and SH: each value without trailing spaces and NULs
    (``convert_text``). PN: the value less its trailing spaces and NULs, each name as it is
    (``convert_PN``; ``str(PersonName)`` of an ASCII name is its text, ``^`` kept); one with
    component groups (``=``, whose empty trailing groups pydicom drops) is left to pydicom."""
    if not ascii_text or value is None:
        return None
    if vr in ("LO", "SH"):
        if value.rstrip(b"\0").translate(None, _PRINTABLE):
            return None
        return "\\".join(v.rstrip(" \0") for v in value.decode("ascii").split("\\"))
    if vr == "PN":
        value = value.rstrip(b"\0 ")
        if value.translate(None, _PRINTABLE) or b"=" in value:
            return None
        return value.decode("ascii")
    return None


def _summary_text(
    value: bytes | None, vr: str, ascii_text: bool, tag: int, converted: Callable[[int], Any]
) -> str | None:
    """A value as the history's summary shows it: the stored text of a VR whose repertoire is
    ASCII whatever the Specific Character Set (no conversion per value), plain LO, SH or PN text,
    else pydicom's conversion (``converted(tag)``); None for a value pydicom cannot convert."""
    if vr in _ASCII_VRS and isinstance(value, bytes):
        return value.decode("latin-1").strip(" \0")
    plain = _plain_text(value, vr, ascii_text)
    if plain is not None:
        return plain
    try:
        return _as_text(converted(tag))
    except Exception:  # noqa: BLE001 - an invalid value: not worth a line in the summary
        return None


def _summarize(identifiers: dict[str, str], tags: dict[str, str], keyword: str, text: str) -> None:
    if keyword in _IDENTIFIERS:
        identifiers[_IDENTIFIERS[keyword]] = text
    if len(tags) < HISTORY_TAGS:
        tags[keyword] = text


def _as_text(value: Any) -> str:
    """A converted value as the history's summary shows it (several values joined by backslashes)."""
    if value is None:
        return ""
    many = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    return "\\".join(str(v) for v in value) if many else str(value)


# The walk's VRs as pydicom names them.
_VR_NAMES = {vr: vr.decode("ascii") for vr in rawscan.KNOWN_VRS}


@functools.lru_cache(maxsize=4096)  # bounded: a sender chooses its private tags
def _keyword(tag: int) -> str:
    """``keyword_for_tag``, once per tag (its dictionary lookups cost ~5 us a call)."""
    return keyword_for_tag(tag)


@functools.lru_cache(maxsize=4096)
def _dictionary_bulk_vr(tag: int) -> str:
    """``_bulk_vr`` of an implicit VR element of ``tag``, once per tag."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if " or " not in vr:
        return vr
    choices = vr.split(" or ")
    if "OW" in choices and ("OB" in choices or tag in _PIXEL_LIKE_AMBIGUOUS):
        return "OW"
    return vr


def _scan_raw(path: Path) -> ScannedInstance | None:
    """``scan_file`` from the raw walk (~10x less CPU than pydicom's reading;
    ``tests/test_rawscan.py`` holds the two to the same answers). None when the walk is unsure."""
    try:
        found = rawscan.scan(path, small=BULK_THRESHOLD)
    except OSError:
        return None  # pydicom's reading says what is wrong
    if found is None:
        return None
    return ScannedInstance(
        path,
        None,
        found.transfer_syntax_uid,
        found.sop_class_uid,
        found.sop_instance_uid,
        elements=found.elements,
        size=found.size,
    )


def _dataset_of(elements: Iterable[rawscan.TopElement], transfer_syntax: str) -> Dataset:
    """The dataset pydicom's ``dcmread(path, defer_size=BULK_THRESHOLD)`` would give (top-level
    raw elements, larger values deferred), from the walk's index."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
    ds = Dataset()
    raw = internals.raw_elements(ds)
    for e in elements:
        tag = BaseTag(e.tag)
        vr = e.vr.decode("ascii") if e.vr else None
        raw[tag] = RawDataElement(tag, vr, e.length, e.value, e.value_offset, implicit, True)
    ds.set_original_encoding(implicit, True)
    return ds


def _uid_of(ds: Dataset, tag: int) -> str:
    """A UID element's value as text (an unconvertible value as its raw text), '' when absent."""
    if tag not in ds:
        return ""
    raw = internals.raw_elements(ds)[tag]
    if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
        # Read, not converted: the dataset stays as read (the history's summary sees it so).
        return raw.value.decode("latin-1").split("\\")[0].strip("\0 ")
    try:
        value = ds[tag].value
    except Exception:  # noqa: BLE001 - an invalid value: its raw bytes
        value = internals.raw_elements(ds)[tag].value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value or "").strip("\0 ")


def _read_stored(path: Path) -> tuple[Path, int, Dataset, FileMetaDataset, str]:
    """(absolute path, size, dataset with bulk values deferred, file meta, transfer syntax) of a
    stored Part-10 file; ``InvalidBody`` when it is not one, has no transfer syntax or is deflated."""
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
    return path, size, ds, meta, ts


class _EncodingMismatch(Exception):
    """The dataset is not encoded in its file's transfer syntax: nothing can be copied raw."""


@dataclass
class _Span:
    """Where one top-level element is in the stored file (``end`` None: not known yet)."""

    key: str
    start: int
    end: int | None
    little_endian: bool


def _span_of(key: str, elem: Any, implicit: bool, little_endian: bool) -> _Span | None:
    """The start (first header byte) and, for a defined length, the end of a top-level element."""
    value_tell: int | None
    length: int | None
    if isinstance(elem, RawDataElement):
        if (elem.is_implicit_VR, elem.is_little_endian) != (implicit, little_endian):
            # Encoded otherwise than the transfer syntax says (pydicom guessed it): bytes that
            # cannot be copied into a file that declares the transfer syntax.
            raise _EncodingMismatch
        value_tell, length = elem.value_tell, elem.length
        vr = elem.VR
    else:  # converted while reading (Specific Character Set, undefined-length sequences)
        value_tell, length = getattr(elem, "file_tell", None), None
        vr = getattr(elem, "VR", None)
    if value_tell is None:
        return None
    header = 8 if implicit or vr not in LONG_HEADER_VRS else 12
    end = None if length is None or length == 0xFFFFFFFF else value_tell + length
    return _Span(key, value_tell - header, end, little_endian)


def _raw_index(fp: BinaryIO, spans: list[_Span], dataset: dict[str, Any], size: int) -> dict[str, list[Any]]:
    """``{key: [offset, length, fingerprint]}`` of every top-level element whose bytes in the
    stored file are certain: its tag is found at its start and it ends where the next element
    starts (elements are contiguous). An element missing here is re-encoded when written."""
    index: dict[str, list[Any]] = {}
    spans = sorted(spans, key=lambda s: s.start)
    for i, span in enumerate(spans):
        following = spans[i + 1].start if i + 1 < len(spans) else None
        end = span.end
        if end is None:
            end = following if following is not None else size
        if (following is not None and end != following) or end > size or span.start < 0:
            continue  # a gap or an overlap (e.g. a duplicate tag): not a range to trust
        fp.seek(span.start)
        group, elem = struct.unpack("<HH" if span.little_endian else ">HH", fp.read(4))
        if f"{group:04X}{elem:04X}" != span.key:
            continue
        model = dataset.get(span.key)
        index[span.key] = [span.start, end - span.start, element_fingerprint(model) if model else ""]
    return index


def _element_json(ds: Dataset, tag: Any, where: str, invalid: list[str]) -> dict[str, Any]:
    """One element's DICOM JSON as pydicom writes it, or, for a value pydicom cannot convert,
    its strings (text VRs) or its raw bytes as ``InlineBinary``: one bad value never fails the
    dataset. Sequences are converted item by item, so a bad value deep inside stays local."""
    raw = internals.raw_elements(ds)[tag]
    try:
        elem = ds[tag]
    except Exception:
        invalid.append(where)
        return _unconverted_json(raw)
    try:
        return elem.to_json_dict(None, BULK_THRESHOLD)  # type: ignore[no-any-return]
    except Exception:
        if elem.VR == "SQ":
            return {
                "vr": "SQ",
                "Value": [
                    {
                        f"{int(t):08X}": _element_json(item, t, f"{where}/{n}/{int(t):08X}", invalid)
                        for t in item.keys()
                    }
                    for n, item in enumerate(elem.value)
                ],
            }
        invalid.append(where)
        return _unconverted_json(raw if isinstance(raw, RawDataElement) else elem)


def _unconverted_json(elem: RawDataElement | DataElement) -> dict[str, Any]:
    vr = str(elem.VR) if elem.VR else _bulk_vr(elem) if isinstance(elem, RawDataElement) else "UN"
    if vr not in _TEXT_VRS and vr not in _KNOWN_VRS:
        vr = "UN"  # e.g. a VR of 'ZZ' in the file: the raw bytes are still copied as received
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        if vr not in _TEXT_VRS:
            return {"vr": vr, "InlineBinary": base64.b64encode(bytes(value)).decode("ascii")}
        value = bytes(value).decode("latin-1")
    strings = [part.strip(" \0") for part in str(value or "").split("\\")]
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": s} for s in strings]}
    return {"vr": vr, "Value": strings}


def _uid_from(dataset: Any, key: str) -> str:
    elem = dataset.get(key) if isinstance(dataset, dict) else None
    if isinstance(elem, dict):
        value = elem.get("Value")
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0].strip("\0 ")
    return ""
