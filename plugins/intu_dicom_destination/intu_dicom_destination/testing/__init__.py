"""Test support for intu's DICOM plugin: real peers, a test PKI, synthetic studies and `intu serve`
as a process. Plain modules (no pytest at import), used by the tests and the benchmark; the pytest
fixtures over them are in ``pytest_plugin`` (loaded through the ``pytest11`` entry point)."""

from intu_dicom_destination.testing.peers import (
    INTEROP_ENV,
    UNCOMPRESSED_ONLY,
    Peer,
    PeerMissing,
    Received,
    Scp,
    find_tool,
    free_port,
    require_tool,
    start_orthanc,
    start_process,
    start_storescp,
    stop_process,
    wait_for_port,
)
from intu_dicom_destination.testing.pki import make_pki
from intu_dicom_destination.testing.recording import RecordingEngine
from intu_dicom_destination.testing.samples import ct_instance, write_ct_series, write_garbage_instance
from intu_dicom_destination.testing.serve import IntuProcess, intu_command, wait_until, write_router_project

__all__ = [
    "INTEROP_ENV",
    "UNCOMPRESSED_ONLY",
    "IntuProcess",
    "Peer",
    "PeerMissing",
    "Received",
    "RecordingEngine",
    "Scp",
    "ct_instance",
    "find_tool",
    "free_port",
    "intu_command",
    "make_pki",
    "require_tool",
    "start_orthanc",
    "start_process",
    "start_storescp",
    "stop_process",
    "wait_for_port",
    "wait_until",
    "write_ct_series",
    "write_garbage_instance",
    "write_router_project",
]
