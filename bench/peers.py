"""The peers intu is measured against: DCMTK storescu/storescp and Orthanc, started through the
test support (``intu_dicom_destination.testing``) with the benchmark's names and folders."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from intu_dicom_destination.testing import INTEROP_ENV, Peer, find_tool, start_orthanc, start_storescp
from measure import cmd_output

SCP_AET = "STORESCP"
# Orthanc's DicomAssociationCloseDelay: with storescp --fork a lingering association stalls nothing
# (0, 1 and 5 measured within noise of each other for N = 300 and 1000).
ORTHANC_CLOSE_DELAY = int(os.environ.get("INTU_BENCH_ORTHANC_CLOSE_DELAY", "1"))
ORTHANC_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'target')
end
"""


def peer_env() -> dict[str, str]:
    """The environment of every peer (TCP_NODELAY=1: Debian's DCMTK otherwise waits ~40 ms per
    image on delayed ACKs)."""
    return dict(INTEROP_ENV)


class Peers:
    """Which peers this machine has, and their versions (for the report)."""

    def __init__(self, skip_orthanc: bool) -> None:
        # The system tools, never pynetdicom's apps of the same names that pyenv shims put on PATH.
        self.storescu = find_tool("storescu")
        self.dcmtk = self.storescu is not None and find_tool("storescp") is not None
        self.dcmtk_version = _version(self.storescu) if self.dcmtk else None
        if self.dcmtk and "dcmtk" not in (self.dcmtk_version or "").lower():
            self.dcmtk = False  # not DCMTK (e.g. a pynetdicom app of the same name)
        self.orthanc = None if skip_orthanc else find_tool("Orthanc")
        self.orthanc_version = _version(self.orthanc)
        self.orthanc_skipped = skip_orthanc

    def storescu_cmd(self, port: int, called: str, *sources: Path) -> list[str]:
        """storescu sending files, and folders' files (``+sd``), over one association."""
        args = [self.storescu or "storescu", "-aec", called, "127.0.0.1", str(port)]
        for source in sources:
            args += ["+sd", str(source)] if source.is_dir() else [str(source)]
        return args


def _version(exe: str | None) -> str | None:
    return cmd_output([exe, "--version"]).splitlines()[0] if exe else None


def storescp(base: Path, tag: str, *, ignore: bool, extra: tuple[str, ...] = ()) -> Peer:
    """``storescp --fork`` (a process per association, as senders with several associations need)
    writing into ``base/scp-TAG``, its log in ``base/storescp-TAG.log``."""
    return start_storescp(
        base / f"scp-{tag}", SCP_AET, ignore=ignore, extra=extra, log=base / f"storescp-{tag}.log"
    )


def orthanc(folder: Path, scp_port: int, *, lua: bool) -> Peer:
    """Orthanc with storescp as its modality ``target``; with ``lua``, it forwards every instance
    as it is stored (``OnStoredInstance`` -> ``SendToModality``)."""
    return start_orthanc(
        folder,
        lua=ORTHANC_LUA if lua else None,
        close_delay=ORTHANC_CLOSE_DELAY,
        extra={
            "Name": "intu-bench",
            "DicomModalities": {"target": [SCP_AET, "127.0.0.1", scp_port]},
            "SaveJobs": False,
            "JobsHistorySize": 10,
        },
    )


def orthanc_rest_forward(http_port: int, timeout: float) -> None:
    """Ask Orthanc to send every study it holds to ``target``, and wait until it has."""
    base_url = f"http://127.0.0.1:{http_port}"
    with urllib.request.urlopen(f"{base_url}/studies", timeout=30) as resp:
        studies = json.load(resp)
    body = json.dumps({"Resources": studies, "Synchronous": True}).encode()
    req = urllib.request.Request(
        f"{base_url}/modalities/target/store",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
