"""Settings of the `dicom` destination: parsing, defaults and validation.

Keys (under ``dicom:`` of a ``type: dicom`` destination), as in the seed: ``host`` (required),
``port`` (104), ``ae_title`` (INTU_SCU), ``called_ae_title`` (required), ``timeout_ms`` (60000),
``max_pdu_length`` (16384: the largest PDU we offer to receive; 0 = unlimited) and ``tls``
{``enabled`` (false), ``ca_cert``, ``client_cert``, ``client_key``}. Beyond the seed:
``idle_timeout_ms`` (an unused pooled association is released after this long, 5000),
``max_associations`` (parallel associations per destination, 2) and ``duplicate_is_success``
(a 0x0111 "duplicate SOP instance" answer counts as delivered, true).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intu_core import Section
from intu_dicom_destination.shared.ae_title import read_ae_title
from intu_dicom_destination.shared.tls import TlsClientSettings, parse_tls_client

DEFAULT_PORT = 104
DEFAULT_AE_TITLE = "INTU_SCU"
DEFAULT_TIMEOUT_MS = 60_000
DEFAULT_MAX_PDU_LENGTH = 16_384
DEFAULT_IDLE_TIMEOUT_MS = 5_000
DEFAULT_MAX_ASSOCIATIONS = 2


@dataclass(frozen=True)
class DestinationSettings:
    """A parsed ``dicom`` destination block."""

    host: str
    called_ae_title: str
    port: int = DEFAULT_PORT
    ae_title: str = DEFAULT_AE_TITLE
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_pdu_length: int = DEFAULT_MAX_PDU_LENGTH
    tls: TlsClientSettings = field(default_factory=TlsClientSettings)
    idle_timeout_ms: int = DEFAULT_IDLE_TIMEOUT_MS
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    duplicate_is_success: bool = True

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_destination_settings(section: Section) -> DestinationSettings:
    """Parse the ``dicom:`` block of a ``type: dicom`` destination, recording every problem
    in ``section``."""
    host = section.str("host")
    port = section.int("port", DEFAULT_PORT, min=1, max=65535)
    ae_title = read_ae_title(section, "ae_title", DEFAULT_AE_TITLE)
    called = read_ae_title(section, "called_ae_title")
    timeout_ms = section.int("timeout_ms", DEFAULT_TIMEOUT_MS, min=1)
    max_pdu = section.int("max_pdu_length", DEFAULT_MAX_PDU_LENGTH, min=0)
    if max_pdu and max_pdu < 4096:
        # PS3.8: a maximum PDU length below the minimum fragment size is not workable.
        section.error("max_pdu_length", f"expected 0 (unlimited) or at least 4096, found {max_pdu}")
        max_pdu = DEFAULT_MAX_PDU_LENGTH
    tls = parse_tls_client(section.section("tls"))
    idle = section.int("idle_timeout_ms", DEFAULT_IDLE_TIMEOUT_MS, min=0)
    max_assoc = section.int("max_associations", DEFAULT_MAX_ASSOCIATIONS, min=1, max=64)
    dup = section.bool("duplicate_is_success", True)
    section.done()
    return DestinationSettings(
        host=host or "",
        called_ae_title=called,
        port=port,
        ae_title=ae_title,
        timeout_ms=timeout_ms,
        max_pdu_length=max_pdu,
        tls=tls,
        idle_timeout_ms=idle,
        max_associations=max_assoc,
        duplicate_is_success=dup,
    )
