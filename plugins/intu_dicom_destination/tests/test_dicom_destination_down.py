"""A PACS that is down: the DICOM destination says "unreachable" and probes with a C-ECHO; through
`intu serve`, an outage costs one line down and one line up, and the backlog arrives as soon as the
PACS is back (checked on the PACS's side: SOP Instance UIDs and pixel data)."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import pydicom
from intu_dicom_destination.scu.destination import DicomDestination
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.testing import (
    INTEROP_ENV,
    IntuProcess,
    Scp,
    free_port,
    require_tool,
    wait_until,
    write_ct_series,
    write_router_project,
)
from intu_dicom_destination.testing.peers import start_storescp

from intu_core.message import SendStatus
from intu_core.types import Runtime

OUTAGE_S = 10.0


def test_probe_is_a_c_echo_and_a_refused_connection_is_unreachable(tmp_path, ct_files) -> None:
    port = free_port()  # nothing listens here yet
    settings = DestinationSettings(host="127.0.0.1", port=port, called_ae_title="TEST_SCP", timeout_ms=5000)
    dest = DicomDestination(settings, Runtime("pacs", tmp_path / "data", logging.getLogger("test")))
    sender = DicomSender(settings, work_dir=tmp_path)
    scp = None
    try:
        [path] = ct_files(1)
        refused = sender.send_file(path)
        assert refused.peer_unreachable and "cannot connect to 127.0.0.1" in refused.detail
        down = dest.probe()
        assert down.peer_unreachable and "cannot connect" in down.detail
        scp = Scp(port=port).start()
        up = dest.probe()
        assert up.status is SendStatus.SUCCESS and up.code == 0, up.detail
        assert scp.associations and not scp.received  # a C-ECHO, nothing stored
        # A PACS that rejects our AE title is reachable but the probe cannot tell: permanent.
        wrong = DicomDestination(
            DestinationSettings(host="127.0.0.1", port=port, called_ae_title="NOT_THERE"),
            Runtime("other", tmp_path / "data", logging.getLogger("test")),
        )
        try:
            assert wrong.probe().status is SendStatus.PERMANENT
        finally:
            wrong.close()
    finally:
        dest.close()
        sender.close()
        if scp is not None:
            scp.stop()


def stored_at(folder: Path) -> dict[str, pydicom.Dataset]:
    """What storescp wrote, by SOP Instance UID (files still being written are skipped)."""
    found = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - a file storescp is still writing
            continue
        found[str(ds.SOPInstanceUID)] = ds
    return found


def test_a_pacs_outage_is_one_line_down_one_line_up_and_the_backlog_arrives_when_it_is_back(tmp_path) -> None:
    storescu = require_tool("storescu")
    require_tool("storescp")
    router_port, pacs_port = free_port(), free_port()
    # A per-entry back-off no test waits for: what arrives within the waits below was sent
    # because the probe found the PACS back, not because each entry's own delay ran out.
    project = write_router_project(
        tmp_path / "project",
        router_port=router_port,
        pacs_port=pacs_port,
        pacs_ae="DCMTK_SCP",
        dicom={"timeout_ms": 5000},
        retry="{max_attempts: 0, backoff: constant, initial_delay_ms: 600000, max_delay_ms: 600000}",
    )
    files = write_ct_series(tmp_path / "study", 30, size_kib=64)
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    pacs = None
    with IntuProcess(project, tmp_path / "logs") as serve:
        serve.start(router_port)
        began = time.monotonic()
        modality = subprocess.run(
            [storescu, "-aet", "MODALITY", "-aec", "INTU_SCP", "127.0.0.1", str(router_port), *files],
            env=INTEROP_ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert modality.returncode == 0, modality.stdout + modality.stderr
        assert wait_until(lambda: "is down" in serve.log_text(), 30), serve.log_text()[-3000:]
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - began)))
        queued = json.loads(serve.intu("queue", "list", "--json").stdout)
        assert sum(q["pending"] + q["in_flight"] for q in queued if q["queue"] == "hospital-pacs") == 30

        pacs = start_storescp(tmp_path / "pacs", "DCMTK_SCP", port=pacs_port, log=tmp_path / "storescp.log")
        try:
            assert wait_until(lambda: stored_at(pacs.folder).keys() == sent.keys(), 60, 0.2), (
                f"{len(stored_at(pacs.folder))} of 30 at the PACS\n{serve.log_text()[-3000:]}"
            )
            assert wait_until(lambda: "is up again" in serve.log_text(), 30)
        finally:
            pacs.stop()
        log = serve.log_text()

    for uid, ds in stored_at(pacs.folder).items():
        original = sent[uid]
        assert ds.StudyInstanceUID == original.StudyInstanceUID and ds.PatientID == original.PatientID
        assert ds.PixelData == original.PixelData
    lines = log.splitlines()
    down = [line for line in lines if "destination hospital-pacs is down" in line]
    up = [line for line in lines if "destination hospital-pacs is up again" in line]
    assert len(down) == 1 and "WARNING" in down[0] and "cannot connect" in down[0], down
    assert len(up) == 1 and "INFO" in up[0], up
    # Not one line per entry and retry: the attempts while down are recorded, not logged.
    assert not [line for line in lines if "not delivered" in line], log[-3000:]
    assert not [line for line in lines if "still down" in line]  # no summary within 5 minutes
