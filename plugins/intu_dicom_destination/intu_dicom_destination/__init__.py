"""intu's DICOM plugin: the `dicom` destination (C-STORE SCU), the `dicom` source (C-STORE SCP)
and the `intu dicom` commands, registered through the `intu` entry-point group."""

from __future__ import annotations

from intu_core import hookimpl

__version__ = "0.1.0"


@hookimpl
def intu_destination_types():  # type: ignore[no-untyped-def]
    from intu_dicom_destination.destination import DESTINATION_TYPE

    return [DESTINATION_TYPE]


@hookimpl
def intu_source_types():  # type: ignore[no-untyped-def]
    from intu_dicom_destination.receiver import SOURCE_TYPE

    return [SOURCE_TYPE]


@hookimpl
def intu_cli_commands():  # type: ignore[no-untyped-def]
    from intu_dicom_destination.cli import dicom

    return [dicom]
