"""The `dicom` destination and source types as the plugin registers them, without pydicom.

Every `intu` command loads every plugin's types (to read intu.yaml, or to list commands), but only
`intu serve` and the DICOM commands talk DICOM. The types therefore carry the settings parsers
(plain Python) and a ``create`` that imports the DICOM machinery (pynetdicom, pydicom and what
pydicom pulls in: numpy, requests, pylibjpeg; ~0.5 s of CPU at start-up, measured 2026-12-03) only
when a destination or source is created. ``test_registration.py`` pins that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from intu_core import DestinationType, Runtime, SourceType
from intu_dicom_destination.scp.settings import SourceSettings, parse_source_settings
from intu_dicom_destination.scu.settings import DestinationSettings, parse_destination_settings

if TYPE_CHECKING:
    from intu_dicom_destination.scp.source import DicomSource
    from intu_dicom_destination.scu.destination import DicomDestination

__all__ = ["DESTINATION_TYPE", "SOURCE_TYPE"]


def _create_destination(settings: DestinationSettings, runtime: Runtime) -> DicomDestination:
    from intu_dicom_destination.scu.destination import DicomDestination

    return DicomDestination(settings, runtime)


def _create_source(settings: SourceSettings, runtime: Runtime) -> DicomSource:
    from intu_dicom_destination.scp.source import DicomSource

    return DicomSource(settings, runtime)


DESTINATION_TYPE = DestinationType(
    name="dicom",
    parse_settings=parse_destination_settings,
    create=_create_destination,
    description="C-STORE SCU: send DICOM instances to a PACS/VNA (association pool, TLS, transcoding)",
)
SOURCE_TYPE = SourceType(
    name="dicom",
    parse_settings=parse_source_settings,
    create=_create_source,
    description="DICOM C-STORE SCP: receives images, stores them durably, answers C-ECHO",
)
