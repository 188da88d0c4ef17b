"""DIMSE command sets and the PDUs of the data phase, encoded and decoded by hand.

The C-STORE data path on both sides (``scu.direct``, ``scp.direct``) exchanges only a few fixed
command sets (PS3.7 9.3.1, 9.3.5, E.1: implicit VR little endian, group 0000 with its group
length) and P-DATA-TF, A-RELEASE and A-ABORT PDUs (PS3.8 9.3, E.2). Building each as a pydicom
dataset and pynetdicom primitive cost more CPU than sending the instance (issue 12's table), so
they are encoded here with ``struct``; pynetdicom keeps association negotiation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

#: Message control header bits of a PDV item (PS3.8 E.2).
COMMAND = 0x01
LAST = 0x02

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
#: Command Data Set Type: no dataset follows the command (any other value: one does).
NO_DATASET = 0x0101

# Command set tags, as (group << 16 | element).
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
RESPONDING_TO = 0x00000120
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000


class MalformedCommand(ValueError):
    """A command set that cannot be walked as implicit VR little endian elements."""


def element(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element; an odd value is padded (UIDs with NUL, text with space
    by the caller)."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command_set(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return element(0x00000000, struct.pack("<L", len(body))) + body


def store_command(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """A C-STORE-RQ command set with a dataset to follow (PS3.7 9.3.1.1)."""
    return _command_set(
        element(AFFECTED_SOP_CLASS, sop_class.encode("ascii")),
        element(COMMAND_FIELD, _us(C_STORE_RQ)),
        element(MESSAGE_ID, _us(message_id)),
        element(0x00000700, _us(priority)),
        element(DATASET_TYPE, _us(0x0000)),
        element(AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii")),
    )


def response_command(
    field: int,
    responding_to: int,
    status: int,
    sop_class: str = "",
    sop_instance: str = "",
    comment: str = "",
) -> bytes:
    """A response command set without a dataset (C-STORE-RSP, C-ECHO-RSP, ... PS3.7 9.3.1.2).
    ``comment`` becomes the Error Comment (LO: at most 64 characters, no backslash)."""
    parts = []
    if sop_class:
        parts.append(element(AFFECTED_SOP_CLASS, sop_class.encode("ascii")))
    parts += [
        element(COMMAND_FIELD, _us(field)),
        element(RESPONDING_TO, _us(responding_to)),
        element(DATASET_TYPE, _us(NO_DATASET)),
        element(STATUS, _us(status)),
    ]
    if comment:
        text = comment.replace("\\", "/")[:64].encode("latin-1", "replace")
        parts.append(element(ERROR_COMMENT, text + b" " if len(text) % 2 else text))
    if sop_instance:
        parts.append(element(AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii")))
    return _command_set(*parts)


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set by tag; ``MalformedCommand`` if it cannot be walked."""
    elements: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise MalformedCommand("malformed command set")
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if pos + length > len(data):
            raise MalformedCommand("malformed command set")
        elements[group << 16 | elem] = bytes(data[pos : pos + length])
        pos += length
    return elements


def us_value(elements: dict[int, bytes], tag: int) -> int | None:
    """An US element's value, None when absent or too short."""
    value = elements.get(tag)
    if value is None or len(value) < 2:
        return None
    return int(struct.unpack_from("<H", value)[0])


def text_value(elements: dict[int, bytes], tag: int) -> str:
    """A UI/LO element's value without its padding ("" when absent)."""
    return elements.get(tag, b"").decode("latin-1").strip(" \0")


def p_data_header(context_id: int, control: int, length: int) -> bytes:
    """The PDU header and PDV item header for one PDV of ``length`` bytes of data."""
    return struct.pack(">BBLLBB", P_DATA_TF, 0, length + 6, length + 2, context_id, control)


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU carrying one PDV item."""
    return p_data_header(context_id, control, len(data)) + data


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> Iterator[bytes]:
    """A command set as P-DATA-TF PDUs no longer than the peer's ``max_pdu`` (0: no limit)."""
    room = max(2, (max_pdu or len(command) + 6) - 6)  # a PDV item header is 6 bytes
    for start in range(0, len(command), room):
        last = start + room >= len(command)
        yield p_data(context_id, COMMAND | (LAST if last else 0), command[start : start + room])


def release_rp() -> bytes:
    """An A-RELEASE-RP PDU."""
    return struct.pack(">BBLL", A_RELEASE_RP, 0, 4, 0)


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    """An A-ABORT PDU (source 2: service provider; reason 0: not specified, 6: invalid parameter)."""
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, reason)
