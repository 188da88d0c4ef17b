"""`intu dicom echo`: C-ECHO a destination and print what was negotiated."""

from __future__ import annotations

from typing import TextIO

from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings


def run_echo(settings: DestinationSettings, out: TextIO) -> int:
    """C-ECHO the destination and print what was negotiated; 0 when the echo succeeded."""
    sender = DicomSender(settings)
    try:
        echo = sender.echo()
    finally:
        sender.close()
    who = f"{settings.ae_title} -> {settings.called_ae_title} at {settings.address}"
    if not echo.ok:
        print(f"C-ECHO {who}: FAILED\n  {echo.detail}", file=out)
        return 1
    print(f"C-ECHO {who}: OK", file=out)
    print(
        f"  round trip:        {echo.round_trip_ms:.1f} ms (association {echo.association_ms:.1f} ms)",
        file=out,
    )
    print(f"  peer AE title:     {echo.their_ae_title}", file=out)
    print(f"  peer max PDU:      {echo.peer_max_pdu or 'unlimited'}", file=out)
    print(f"  our max PDU:       {echo.our_max_pdu or 'unlimited'}", file=out)
    impl = echo.implementation_class_uid + (
        f" ({echo.implementation_version_name})" if echo.implementation_version_name else ""
    )
    print(f"  peer implementation: {impl}", file=out)
    print(f"  TLS:               {'yes' if echo.tls else 'no'}", file=out)
    return 0
