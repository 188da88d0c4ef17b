"""intu's DICOM plugin: the `dicom` destination (C-STORE SCU), the `dicom` source (C-STORE SCP)
and the `intu dicom` commands, registered through the `intu` entry-point group."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from intu_core import DestinationType, Message, SourceType, hookimpl

if TYPE_CHECKING:  # click is imported only when the commands are asked for
    import click

__version__ = "0.1.0"

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1; at most 64 characters, checked below


@hookimpl
def intu_destination_types() -> list[DestinationType]:
    """The `dicom` destination type (C-STORE SCU); pydicom is imported when one is created."""
    from intu_dicom_destination.registration import DESTINATION_TYPE

    return [DESTINATION_TYPE]


@hookimpl
def intu_source_types() -> list[SourceType]:
    """The `dicom` source type (C-STORE SCP); pydicom is imported when one is created."""
    from intu_dicom_destination.registration import SOURCE_TYPE

    return [SOURCE_TYPE]


@hookimpl
def intu_cli_commands() -> list[click.Command]:
    """`intu dicom echo|send`."""
    from intu_dicom_destination.cli import dicom

    return [dicom]


@hookimpl
def intu_message_from_file(source_type: str, path: Path, channel: str) -> Message | None:
    """The message a `dicom` source makes of a stored Part-10 file (for `intu queue recover`);
    raises ValueError for a file that is not a DICOM instance that can be parsed."""
    if source_type != "dicom":
        return None
    from intu_dicom_destination.body import InvalidBody, body_from_file, scan_file

    try:
        body = body_from_file(path)
        history = {"source": f"recovered from {path.name}", **scan_file(path).history_fields()}
    except InvalidBody as exc:
        raise ValueError(str(exc)) from None
    # What the source knew of the association is gone; the identifiers are in the file itself.
    metadata = {
        "dicom": {
            "sop_class_uid": body["sop_class_uid"],
            "sop_instance_uid": body["sop_instance_uid"],
            "transfer_syntax_uid": body["transfer_syntax_uid"],
            "recovered_from_file": True,
        },
        "history": history,  # so that the message history can find it again (intu messages)
    }
    return Message(body=body, channel=channel, metadata=metadata, files=(str(path),))


@hookimpl
def intu_write_message_file(message: Message, directory: Path) -> Path | None:
    """Write a DICOM body as ``<SOPInstanceUID>.dcm`` (a Part-10 file) for the `file` destination."""
    body = message.body
    # A body with its model, or one no stage read (a DicomBody: the stored file and its UIDs).
    if not (isinstance(body, dict) and ("dataset" in body or "file" in body) and "sop_instance_uid" in body):
        return None
    from intu_dicom_destination.body import write_part10_from_body

    uid = str(body["sop_instance_uid"])
    # The UID comes from the sender: only a well-formed one may name a file (no "../").
    name = uid if len(uid) <= 64 and _UID.fullmatch(uid) else message.id
    # Written atomically and fsynced (file and folder) before it returns.
    return write_part10_from_body(body, directory / f"{name}.dcm")
