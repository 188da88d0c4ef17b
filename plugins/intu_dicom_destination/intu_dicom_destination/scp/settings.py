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
    max_pdu_length: 65536        # largest PDU we accept (default 65536; 0 = no limit, else >= 4096)
    max_associations: 64         # simultaneous established associations (default 64)
    max_associations_per_peer: 16  # ... from one IP address (default 16)
    max_connections: 256         # open TCP connections; when full the oldest not yet associated
                                 # one is closed to make room (default 256)
    max_pending_per_peer: 8      # connections from one IP address not associated yet; beyond
                                 # this, new ones from that address are closed at once (default 8)
    association_request_timeout_ms: 30000  # connect (and TLS handshake) to a complete A-ASSOCIATE-RQ
    read_timeout_ms: 30000       # a PDU, once started, must arrive whole within this
    write_timeout_ms: 30000      # a peer must take each PDU we send within this
    idle_timeout_ms: 300000      # an association with no PDU for this long is aborted
    dimse_timeout_ms: 600000     # one DIMSE message (command + dataset), once started, must
                                 # arrive whole within this (default 10 min; size it for the
                                 # largest instance at the slowest sender's rate)
    max_instance_mb: 4096        # largest instance accepted, checked while receiving (0 = no limit)
    max_inflate_ratio: 200       # a deflated instance may inflate to at most this x its size
    sop_classes: []              # storage SOP classes accepted; empty = any, retired and private too
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
# Counted over established associations (a TCP connection that never negotiates does not count):
# 30 modalities sending at once must all be served with the defaults.
DEFAULT_MAX_ASSOCIATIONS = 64
# One address (a misbehaving modality, an attacker) cannot take every association.
DEFAULT_MAX_ASSOCIATIONS_PER_PEER = 16
# Bounds the threads a connection flood can create; the oldest unassociated one makes room.
DEFAULT_MAX_CONNECTIONS = 256
# Connections from one address still without an association: a flood from one address is refused
# at once instead of taking the slots (and the "make room" closes) of every other sender.
DEFAULT_MAX_PENDING_PER_PEER = 8
# PS3.8's ARTIM timer, DCMTK's default: a connection has this long to send its A-ASSOCIATE-RQ.
DEFAULT_ASSOCIATION_REQUEST_TIMEOUT_MS = 30_000
DEFAULT_READ_TIMEOUT_MS = 30_000
DEFAULT_WRITE_TIMEOUT_MS = 30_000
# Modalities keep an association open between series; 5 minutes frees a forgotten one.
DEFAULT_IDLE_TIMEOUT_MS = 300_000
# From the first PDU of a DIMSE message to its last fragment: a peer dripping one PDU just under
# read_timeout_ms cannot hold an association for ever. 10 minutes is 1 GiB at under 2 MB/s.
DEFAULT_DIMSE_TIMEOUT_MS = 600_000
DEFAULT_MAX_INSTANCE_MB = 4096
# Real images deflate 2-20x (mostly-zero masks more); a deflate bomb is 1000x.
DEFAULT_MAX_INFLATE_RATIO = 200
#: The smallest max_pdu_length accepted (DCMTK's ASC_MINIMUMPDUSIZE): below it every PDU is overhead.
MIN_PDU_LENGTH = 4096
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
    max_associations_per_peer: int = DEFAULT_MAX_ASSOCIATIONS_PER_PEER
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER
    association_request_timeout_ms: int = DEFAULT_ASSOCIATION_REQUEST_TIMEOUT_MS
    read_timeout_ms: int = DEFAULT_READ_TIMEOUT_MS
    write_timeout_ms: int = DEFAULT_WRITE_TIMEOUT_MS
    idle_timeout_ms: int = DEFAULT_IDLE_TIMEOUT_MS
    dimse_timeout_ms: int = DEFAULT_DIMSE_TIMEOUT_MS
    max_instance_mb: int = DEFAULT_MAX_INSTANCE_MB
    max_inflate_ratio: int = DEFAULT_MAX_INFLATE_RATIO
    sop_classes: tuple[str, ...] = ()
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
    if max_pdu and max_pdu < MIN_PDU_LENGTH:
        section.error(
            "max_pdu_length", f"expected 0 (no limit) or at least {MIN_PDU_LENGTH}, found {max_pdu}"
        )
        max_pdu = DEFAULT_MAX_PDU_LENGTH
    max_assocs = section.int("max_associations", DEFAULT_MAX_ASSOCIATIONS, min=1, max=1000)
    per_peer = section.int("max_associations_per_peer", DEFAULT_MAX_ASSOCIATIONS_PER_PEER, min=1, max=1000)
    max_conns = section.int("max_connections", DEFAULT_MAX_CONNECTIONS, min=2, max=10_000)
    max_pending = section.int("max_pending_per_peer", DEFAULT_MAX_PENDING_PER_PEER, min=1, max=10_000)
    if max_assocs and max_conns and max_conns < max_assocs:
        section.error(
            "max_connections", f"expected at least max_associations ({max_assocs}), found {max_conns}"
        )
    request_timeout = section.int(
        "association_request_timeout_ms", DEFAULT_ASSOCIATION_REQUEST_TIMEOUT_MS, min=100, max=3_600_000
    )
    read_timeout = section.int("read_timeout_ms", DEFAULT_READ_TIMEOUT_MS, min=100, max=3_600_000)
    write_timeout = section.int("write_timeout_ms", DEFAULT_WRITE_TIMEOUT_MS, min=100, max=3_600_000)
    idle_timeout = section.int("idle_timeout_ms", DEFAULT_IDLE_TIMEOUT_MS, min=100, max=86_400_000)
    dimse_timeout = section.int("dimse_timeout_ms", DEFAULT_DIMSE_TIMEOUT_MS, min=100, max=86_400_000)
    if read_timeout and dimse_timeout and dimse_timeout < read_timeout:
        section.error(
            "dimse_timeout_ms", f"expected at least read_timeout_ms ({read_timeout}), found {dimse_timeout}"
        )
    max_instance = section.int("max_instance_mb", DEFAULT_MAX_INSTANCE_MB, min=0)
    inflate_ratio = section.int("max_inflate_ratio", DEFAULT_MAX_INFLATE_RATIO, min=2, max=100_000)
    sop_classes = section.str_list("sop_classes", [])
    for uid in sop_classes or []:
        if not _is_uid(uid):
            section.error(
                "sop_classes", f"expected SOP Class UIDs such as 1.2.840.10008.5.1.4.1.1.2, found {uid!r}"
            )
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
        max_associations_per_peer=per_peer or DEFAULT_MAX_ASSOCIATIONS_PER_PEER,
        max_connections=max_conns or DEFAULT_MAX_CONNECTIONS,
        max_pending_per_peer=max_pending or DEFAULT_MAX_PENDING_PER_PEER,
        association_request_timeout_ms=request_timeout or DEFAULT_ASSOCIATION_REQUEST_TIMEOUT_MS,
        read_timeout_ms=read_timeout or DEFAULT_READ_TIMEOUT_MS,
        write_timeout_ms=write_timeout or DEFAULT_WRITE_TIMEOUT_MS,
        idle_timeout_ms=idle_timeout or DEFAULT_IDLE_TIMEOUT_MS,
        dimse_timeout_ms=dimse_timeout or DEFAULT_DIMSE_TIMEOUT_MS,
        max_instance_mb=DEFAULT_MAX_INSTANCE_MB if max_instance is None else max_instance,
        max_inflate_ratio=inflate_ratio or DEFAULT_MAX_INFLATE_RATIO,
        sop_classes=tuple(u.strip() for u in sop_classes or ()),
        stop_grace_ms=DEFAULT_STOP_GRACE_MS if stop_grace is None else stop_grace,
        tls=tls,
    )


def _is_uid(text: str) -> bool:
    """A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters."""
    parts = text.strip().split(".")
    return (
        len(text.strip()) <= 64
        and len(parts) > 1
        and all(p.isdigit() and (p == "0" or p[0] != "0") for p in parts)
    )
