"""The message history end to end: a study routed by `intu serve` through a PACS outage is found
by accession afterwards (`intu messages`, a second process while serve runs), with every attempt
and the PACS's final status, and what the PACS (DCMTK storescp) received is what was sent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intu_dicom_destination.testing import (
    INTEROP_ENV,
    IntuProcess,
    ct_instance,
    free_port,
    require_tool,
    start_storescp,
    wait_until,
    write_router_project,
)
from pydicom.uid import generate_uid

pytestmark = pytest.mark.interop

DESTINATION = "hospital-pacs"


def write_study(folder: Path, count: int, accession: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = ct_instance(
            study_uid=study_uid, series_uid=series_uid, number=number, size_kib=32, patient_id="HIST-1"
        )
        ds.AccessionNumber = accession
        path = folder / f"CT{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def found(intu: IntuProcess, accession: str) -> list[dict[str, Any]]:
    result = intu.intu("messages", "--accession", accession, "--json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def failed_attempts(record: dict[str, Any]) -> int:
    pacs = record["destinations"][DESTINATION]
    return int(pacs["attempts"]) - (1 if pacs["state"] == "delivered" else 0)


def test_a_study_through_a_pacs_outage_is_found_by_accession_with_every_attempt(tmp_path: Path) -> None:
    accession = f"H{generate_uid()[-10:]}"
    files = write_study(tmp_path / "study", 3, accession)
    sent = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in files}
    router_port, pacs_port = free_port(), free_port()
    project = write_router_project(
        tmp_path / "project",
        router_port=router_port,
        pacs_port=pacs_port,
        retry="{max_attempts: 0, backoff: constant, initial_delay_ms: 300, max_delay_ms: 300, jitter: 0}",
    )
    storescu = require_tool("storescu")
    with IntuProcess(project) as intu:
        before = intu.intu("messages", "--accession", accession)
        assert before.returncode == 0 and before.stdout == "no messages\n", before  # no queue yet

        intu.start(router_port)
        sender = subprocess.run(
            [storescu, "-aet", "MODALITY", "-aec", "INTU_SCP", "127.0.0.1", str(router_port)]
            + [str(f) for f in files],
            env=INTEROP_ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sender.returncode == 0, sender.stdout + sender.stderr

        # The PACS is down: the first sends fail, and the history says so while serve runs.
        assert wait_until(lambda: any(failed_attempts(r) for r in found(intu, accession)), 60, 0.5)
        pacs = start_storescp(
            tmp_path / "pacs", "PACS", fork=False, port=pacs_port, log=tmp_path / "pacs.log"
        )
        try:
            delivered = wait_until(
                lambda: [r["status"] for r in found(intu, accession)] == ["delivered"] * 3, 120, 0.5
            )
            records = found(intu, accession)
            assert delivered, json.dumps(records, indent=2)
            shown = intu.intu("messages", "show", records[0]["id"])
            unknown = intu.intu("messages", "show", "no-such-message")
            malformed = intu.intu("messages", "--since", "last tuesday")
        finally:
            pacs.stop()

    assert {r["identifiers"]["sop_instance_uid"] for r in records} == set(sent)
    for record in records:
        assert record["channel"] == "dicom-router" and record["source"].startswith("MODALITY@127.0.0.1:")
        ids = record["identifiers"]
        assert (ids["accession_number"], ids["patient_id"], ids["modality"]) == (accession, "HIST-1", "CT")
        assert ids["study_uid"] == str(sent[ids["sop_instance_uid"]].StudyInstanceUID)
        assert record["tags"]["PatientName"] == "Doe^Jane"
        final = record["destinations"][DESTINATION]
        assert final["state"] == "delivered" and final["last"]["kind"] == "delivered"
        assert (final["last"]["status"], final["last"]["code"]) == ("success", 0x0000)  # the PACS's answer
        assert final["last"]["attempt"] == final["attempts"]
    assert sum(failed_attempts(r) for r in records) >= 1  # the outage is in the history

    assert shown.returncode == 0, shown.stderr
    assert "from MODALITY@127.0.0.1:" in shown.stdout and accession in shown.stdout
    for word in ("received", "queued", "delivered", "0x0000"):
        assert word in shown.stdout, shown.stdout
    assert unknown.returncode == 1 and "no message no-such-message in the history" in unknown.stderr
    assert malformed.returncode == 2 and "--since" in malformed.stderr

    # On the PACS's side: every instance, under the SOP Instance UID sent, pixel data untouched.
    received = {
        str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted((tmp_path / "pacs").iterdir()))
    }
    assert set(received) == set(sent)
    for uid, ds in received.items():
        assert ds.PixelData == sent[uid].PixelData
        assert ds.AccessionNumber == accession and ds.PatientName == sent[uid].PatientName
