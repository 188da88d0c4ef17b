"""A one-pass walk of a Part-10 file's raw element headers, without pydicom.

Reading a file with pydicom to check it and to find a few values costs ~1 ms of CPU per 512 KiB
instance (its element generator is Python per element, and a Dataset per file), more than
receiving or sending the instance. Here the element headers are walked with ``struct`` (values
are skipped by their lengths, pixel data is never read) and the top-level elements are indexed.

The walk is conservative: it answers only for files it fully understands (little-endian,
uncompressed or encapsulated, every length consistent with the file's size, even fragments, SOP
UIDs that are plain UIDs and agree with the file meta). For anything else (a deflated or
big-endian file, an unknown VR, a truncated or damaged file, UIDs that differ) it answers None
and the caller reads the file with pydicom, which gives the refusal and its reason.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Encapsulated transfer syntaxes (PS3.5 A.4): explicit VR little endian, fragments in Pixel Data.
ENCAPSULATED = frozenset(
    ["1.2.840.10008.1.2.5"]  # RLE Lossless
    + [f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81, 90, 91, 201, 202, 203)]
)
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
#: Every VR the walk reads (any other makes it unsure).
KNOWN_VRS = _LONG_VRS | _SHORT_VRS
_UID = re.compile(rb"[0-9][0-9.]{0,63}")

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_META_SOP_CLASS = 0x00020002
_META_SOP_INSTANCE = 0x00020003
_META_TRANSFER_SYNTAX = 0x00020010
_HEADER = struct.Struct("<HH2sHL")
_WINDOW = 16 * 1024  # bytes read at a time: a CT's header in one read, little of its pixels
_MAX_DEPTH = 32  # nested sequences; deeper is left to pydicom


class TopElement(NamedTuple):
    """One top-level element: its tag, VR (b"" in implicit VR), where its value starts, its length
    (0xFFFFFFFF: undefined) and its value when it is no longer than the walk's ``small``. (A
    tuple: a frozen dataclass's ``__init__`` cost more than the rest of the walk per element.)"""

    tag: int
    vr: bytes
    value_offset: int
    length: int
    value: bytes | None


@dataclass(frozen=True)
class Scanned:
    """A file the walk fully understood: its UIDs, transfer syntax, where the dataset starts and
    its top-level elements in file order, and the file's size."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int
    elements: tuple[TopElement, ...] = ()
    size: int = -1


class _Unsure(Exception):
    """Something the walk does not decide: pydicom reads the file instead."""


class _Reader:
    """Random access to a file through one cached window (``os.pread``)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.start, self.data = 0, b""

    def at(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos``."""
        if pos + n > self.size:
            raise _Unsure("past the end of the file")
        offset = pos - self.start
        if offset < 0 or offset + n > len(self.data):
            self._fill(pos, n)
            offset = 0
        return self.data[offset : offset + n]

    def header(self, pos: int) -> tuple[int, int, bytes, int, int]:
        """The 12 bytes at ``pos`` as an element header: group, element, VR, 2-byte length,
        4-byte length (the bytes past the end of the file read as zeros)."""
        offset = pos - self.start
        if offset < 0 or offset + 12 > len(self.data):
            self._fill(pos, 12)
            offset = 0
        return _HEADER.unpack_from(self.data, offset)  # type: ignore[return-value]

    def _fill(self, pos: int, n: int) -> None:
        data = os.pread(self.fd, max(n, _WINDOW), pos)
        if len(data) < min(n, self.size - pos):
            raise _Unsure("the file changed while it was read")
        # Zeros after the end, so that a header near the end unpacks; lengths are checked
        # against the file's size, never against this padding.
        self.start, self.data = pos, data + bytes(12) if pos + len(data) >= self.size else data


def scan(path: Path, small: int = 0) -> Scanned | None:
    """The file's UIDs and layout when it can certainly be sent as it is; None when unsure (the
    caller then reads it with pydicom). Top-level values of at most ``small`` bytes are read.
    Raises ``OSError`` when it cannot be opened or read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _Reader(fd, os.fstat(fd).st_size)
        try:
            return _scan(reader, small)
        except (_Unsure, struct.error):
            return None
    finally:
        os.close(fd)


def _uid(value: bytes) -> str:
    value = value.rstrip(b"\0 ")
    if not _UID.fullmatch(value):
        raise _Unsure("not a plain UID")
    return value.decode("ascii")


@dataclass(frozen=True)
class FileMeta:
    """The file meta group's UIDs and where the dataset starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int


def file_meta(path: Path) -> FileMeta | None:
    """The file meta's UIDs (plain UIDs, all three present) and the dataset's offset, read without
    pydicom and without walking the dataset; None when unsure. Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _Reader(fd, os.fstat(fd).st_size)
        try:
            pos, meta = _meta(reader)
        except (_Unsure, struct.error):
            return None
        return FileMeta(meta[_META_SOP_CLASS], meta[_META_SOP_INSTANCE], meta[_META_TRANSFER_SYNTAX], pos)
    finally:
        os.close(fd)


def _meta(r: _Reader) -> tuple[int, dict[int, str]]:
    if r.at(128, 4) != b"DICM":
        raise _Unsure("no DICM prefix")
    pos, meta = 132, {}
    while pos + 8 <= r.size:
        group, elem, vr, short, long = r.header(pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if pos + 12 > r.size:
                raise _Unsure("file meta length")
            length = long
            pos += 12
        elif vr in _SHORT_VRS:
            length = short
            pos += 8
        else:
            raise _Unsure("unknown VR in the file meta")
        if length == _UNDEFINED or pos + length > r.size:
            raise _Unsure("file meta length")
        tag = group << 16 | elem
        if tag in (_META_SOP_CLASS, _META_SOP_INSTANCE, _META_TRANSFER_SYNTAX):
            meta[tag] = _uid(r.at(pos, length))
        pos += length
    if len(meta) != 3:
        raise _Unsure("file meta without the SOP class, SOP instance or transfer syntax")
    return pos, meta


def _scan(r: _Reader, small: int) -> Scanned:
    pos, meta = _meta(r)
    syntax = meta[_META_TRANSFER_SYNTAX]
    if syntax not in (IMPLICIT_LE, EXPLICIT_LE) and syntax not in ENCAPSULATED:
        raise _Unsure("a transfer syntax pydicom should read")
    found: dict[int, str] = {}
    top: list[TopElement] = []
    explicit = syntax != IMPLICIT_LE
    end = _walk(r, pos, r.size, explicit, encapsulated=syntax in ENCAPSULATED, found=found, top=(top, small))
    if end != r.size:
        raise _Unsure("bytes after the dataset")
    sop_class, sop_instance = found.get(_SOP_CLASS), found.get(_SOP_INSTANCE)
    if sop_class != meta[_META_SOP_CLASS] or sop_instance != meta[_META_SOP_INSTANCE]:
        raise _Unsure("missing UIDs, or UIDs that differ from the file meta's")
    return Scanned(sop_class, sop_instance, syntax, pos, tuple(top), r.size)


def _walk(
    r: _Reader,
    pos: int,
    limit: int,
    explicit: bool,
    *,
    delimited: bool = False,
    encapsulated: bool = False,
    found: dict[int, str] | None = None,
    top: tuple[list[TopElement], int] | None = None,
    depth: int = 0,
) -> int:
    """Walk the elements from ``pos`` to ``limit`` exactly (the dataset, an item of defined
    length) or, ``delimited``, to an item delimitation item before ``limit`` (an item of undefined
    length). Returns the position after the last element or the delimiter. ``found`` collects
    the top level's SOP UIDs, ``top`` (a list and the ``small`` size) its elements."""
    if depth > _MAX_DEPTH:
        raise _Unsure("deeply nested")
    unpack = _HEADER.unpack_from
    while pos < limit:
        if pos + 8 > limit:
            raise _Unsure("an element header runs past its end")
        # ``r.header`` inlined for a header in the window (most are): a call less per element.
        offset = pos - r.start
        if 0 <= offset <= len(r.data) - 12:
            group, elem, vr, short, long = unpack(r.data, offset)
        else:
            group, elem, vr, short, long = r.header(pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            if not delimited or vr != b"\0\0" or short:
                raise _Unsure("a stray item delimiter")
            return pos + 8
        if group in (0x0002, 0xFFFE):
            raise _Unsure("file meta or item tags inside the dataset")
        if not explicit:
            length = int.from_bytes(vr, "little") | short << 16
            vr = b""
            pos += 8
        elif vr in _LONG_VRS:
            length = long
            pos += 12
        elif vr in _SHORT_VRS:
            length = short
            pos += 8
        else:
            raise _Unsure("unknown VR")
        if top is not None:
            value = None
            if length != _UNDEFINED and length <= top[1] and pos + length <= limit:
                value = r.at(pos, length)
            top[0].append(TopElement(tag, vr, pos, length, value))
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and encapsulated and depth == 0:
                pos = _fragments(r, pos, limit)
            elif vr in (b"SQ", b""):  # implicit VR: only a sequence has an undefined length
                pos = _sequence(r, pos, limit, explicit, depth)
            else:
                raise _Unsure("an undefined length pydicom should read")
            continue
        if pos + length > limit:
            raise _Unsure("a value runs past its end (truncated?)")
        if found is not None and tag in (_SOP_CLASS, _SOP_INSTANCE):
            if tag in found:
                raise _Unsure("a repeated element")
            found[tag] = _uid(r.at(pos, length))
        elif tag == _PIXEL_DATA and encapsulated and depth == 0:
            raise _Unsure("native pixel data in an encapsulated transfer syntax")
        elif vr == b"SQ" or (not explicit and length and _is_sequence_start(r, pos)):
            _items(r, pos, pos + length, explicit, depth)
        pos += length
    if delimited or pos != limit:
        raise _Unsure("no item delimiter, or elements that overrun their item")
    return pos


def _elements(r: _Reader, pos: int, length: int, stop: int, explicit: bool, depth: int) -> int:
    """The elements of one item (of ``length``, or undefined: up to its delimiter within ``stop``);
    the position after the item."""
    if length == _UNDEFINED:
        return _walk(r, pos, stop, explicit, delimited=True, depth=depth + 1)
    if pos + length > stop:
        raise _Unsure("an item runs past its end")
    return _walk(r, pos, pos + length, explicit, depth=depth + 1)


def _is_sequence_start(r: _Reader, pos: int) -> bool:
    # An implicit VR sequence of defined length: pydicom knows it by its dictionary VR; a value
    # that starts with an item tag is one.
    return r.at(pos, 4) == b"\xfe\xff\x00\xe0"


def _items(r: _Reader, pos: int, stop: int, explicit: bool, depth: int) -> None:
    """The items of a sequence of defined length."""
    while pos < stop:
        tag, length = _item_header(r, pos, stop)
        if tag != _ITEM:
            raise _Unsure("not an item in a sequence")
        pos = _elements(r, pos + 8, length, stop, explicit, depth)
    if pos != stop:
        raise _Unsure("items overrun their sequence")


def _sequence(r: _Reader, pos: int, stop: int, explicit: bool, depth: int) -> int:
    """The items of a sequence of undefined length; the position after its delimiter."""
    while True:
        tag, length = _item_header(r, pos, stop)
        pos += 8
        if tag == _SEQUENCE_END:
            if length:
                raise _Unsure("a sequence delimiter with a length")
            return pos
        if tag != _ITEM:
            raise _Unsure("not an item in a sequence")
        pos = _elements(r, pos, length, stop, explicit, depth)


def _fragments(r: _Reader, pos: int, stop: int) -> int:
    """Encapsulated Pixel Data: items of even length (PS3.5 A.4) up to the sequence delimiter."""
    while True:
        tag, length = _item_header(r, pos, stop)
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM or length == _UNDEFINED or length % 2 or pos + length > stop:
            raise _Unsure("a damaged or odd fragment")
        pos += length


def _item_header(r: _Reader, pos: int, stop: int) -> tuple[int, int]:
    if pos + 8 > stop:
        raise _Unsure("an item header runs past the end")
    group, elem, length = struct.unpack("<HHL", r.at(pos, 8))
    return group << 16 | elem, length
