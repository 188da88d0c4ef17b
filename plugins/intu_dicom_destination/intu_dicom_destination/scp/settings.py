"""Settings of the `dicom` source (C-STORE SCP): parsing, defaults and validation.

```yaml
source:
  type: dicom
  dicom:
    port: 11113                  # required, 1..65535
    ae_title: INTU_SCP           # our AE title (default INTU_SCP)
    host: 0.0.0.0                # bind address (default: every interface, as DICOM SCPs do)
    calling_ae_titles: [CT1]     # allow-list of calling AE titles; empty = anyone
    require_called_ae_title: true  # the called AE title must be ae_title (default true)
    max_pdu_length: 65536        # largest PDU we accept (default 65536; 0 = no limit)
    max_associations: 10         # simultaneous associations (default 10)
    stop_grace_ms: 10000         # at shutdown, how long open associations may go on (default 10 s)
    tls: {enabled: false, cert: ..., key: ..., ca_cert: ..., require_client_cert: false}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intu_core import Section
from intu_dicom_destination.shared.ae_title import ae_title_problem, read_ae_title
from intu_dicom_destination.shared.tls import TlsServerSettings, parse_tls_server

DEFAULT_AE_TITLE = "INTU_SCP"
DEFAULT_HOST = "0.0.0.0"
# Larger than DCMTK's 16 KiB default: fewer PDUs (and Python-level writes) per instance, while a
# bounded size keeps each PDU's buffer small (0 = unlimited would let a peer send a 1 GiB PDU).
DEFAULT_MAX_PDU_LENGTH = 65536
DEFAULT_MAX_ASSOCIATIONS = 10
# At shutdown a modality in the middle of a study gets this long to finish before its association
# is aborted (a C-STORE being handled is always answered first); it sends the rest again later.
DEFAULT_STOP_GRACE_MS = 10_000


@dataclass(frozen=True)
class SourceSettings:
    """Parsed settings of one `dicom` source."""

    port: int
    ae_title: str = DEFAULT_AE_TITLE
    host: str = DEFAULT_HOST
    calling_ae_titles: tuple[str, ...] = ()
    require_called_ae_title: bool = True
    max_pdu_length: int = DEFAULT_MAX_PDU_LENGTH
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    stop_grace_ms: int = DEFAULT_STOP_GRACE_MS
    tls: TlsServerSettings = field(default_factory=TlsServerSettings)


def parse_source_settings(section: Section) -> SourceSettings:
    """Read a `dicom` source block; problems are recorded on ``section``, never raised."""
    port = section.int("port", min=1, max=65535)
    ae_title = read_ae_title(section, "ae_title", DEFAULT_AE_TITLE)
    host = section.str("host", DEFAULT_HOST)
    if host is not None and not host.strip():
        section.error("host", "expected a bind address such as 0.0.0.0 or 127.0.0.1, found ''")
    calling = section.str_list("calling_ae_titles", [])
    for title in calling or []:
        if (problem := ae_title_problem(title)) is not None:
            section.error("calling_ae_titles", problem)
    require_called = section.bool("require_called_ae_title", True)
    max_pdu = section.int("max_pdu_length", DEFAULT_MAX_PDU_LENGTH, min=0, max=0xFFFFFFFF)
    max_assocs = section.int("max_associations", DEFAULT_MAX_ASSOCIATIONS, min=1, max=1000)
    stop_grace = section.int("stop_grace_ms", DEFAULT_STOP_GRACE_MS, min=0)
    tls = parse_tls_server(section.section("tls"))
    section.done()
    return SourceSettings(
        port=port if port is not None else 0,
        ae_title=(ae_title or DEFAULT_AE_TITLE).strip(),
        host=(host or DEFAULT_HOST).strip(),
        calling_ae_titles=tuple(t.strip() for t in calling or ()),
        require_called_ae_title=True if require_called is None else require_called,
        max_pdu_length=DEFAULT_MAX_PDU_LENGTH if max_pdu is None else max_pdu,
        max_associations=max_assocs or DEFAULT_MAX_ASSOCIATIONS,
        stop_grace_ms=DEFAULT_STOP_GRACE_MS if stop_grace is None else stop_grace,
        tls=tls,
    )
