"""The HTTP side of a real ``intu serve``: DCMTK storescu sends a study through the DICOM router to
a PACS (DCMTK storescp, or an in-process pynetdicom SCP that refuses one instance); the API,
``/metrics`` and the message history must agree with what the PACS received, instance by
instance; ``/readyz`` says why the engine cannot take messages; bad settings stop it."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intu_dicom_destination.testing import (
    INTEROP_ENV,
    IntuProcess,
    Scp,
    free_port,
    require_tool,
    start_storescp,
    wait_until,
    write_ct_series,
    write_router_project,
)
from intu_http.testing import check_schema, request
from prometheus_client.parser import text_string_to_metric_families

from intu_core.testing import registry_with, running_engine

TOKEN = "serve-test-token-0123456789"
PACS = "hospital-pacs"
CHANNEL = "dicom-router"


def append(project: Path, line: str) -> None:
    with (project / "intu.yaml").open("a") as f:
        f.write(line + "\n")


def add_http(project: Path, port: int) -> None:
    """The ``http:`` block, its token from the environment as a deployment would give it."""
    append(project, f'http: {{listen: "127.0.0.1:{port}", token: "${{INTU_HTTP_TOKEN}}"}}')


def storescu(port: int, files: list[Path]) -> None:
    exe = require_tool("storescu")
    done = subprocess.run(
        [exe, "-aet", "MODALITY", "-aec", "INTU_SCP", "127.0.0.1", str(port), *map(str, files)],
        env=INTEROP_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def metric_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = request(port, "GET", "/metrics")
    assert answer.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.raw.decode())
        for s in family.samples
    }


def destination(port: int, name: str = PACS) -> dict[str, Any]:
    answer = request(port, "GET", "/api/v1/destinations")
    assert answer.status == 200, answer.body
    check_schema(answer.body, "#/paths/~1destinations/get/responses/200")
    (found,) = [d for d in answer.body["destinations"] if d["name"] == name]
    return found


DELIVERY_PROCESS = pytest.mark.parametrize(
    "delivery_process", [False, True], ids=["one-process", "delivery-process"]
)


def delivered_metric(port: int) -> float:
    return metric_samples(port).get(("intu_messages_delivered_total", (("destination", PACS),)), 0.0)


@DELIVERY_PROCESS
def test_api_metrics_and_history_match_what_storescp_received(
    tmp_path: Path, storescp: Callable[..., Any], delivery_process: bool
) -> None:
    pacs = storescp("PACS")
    router_port, http_port = free_port(), free_port()
    project = write_router_project(tmp_path / "project", router_port=router_port, pacs_port=pacs.port)
    add_http(project, http_port)
    if delivery_process:  # its metrics and states reach the engine's API (docs/guide.md)
        append(project, "delivery: {process: true}")
    files = write_ct_series(tmp_path / "study", 3, size_kib=16)
    sent = [pydicom.dcmread(f) for f in files]
    study_uid = str(sent[0].StudyInstanceUID)

    with IntuProcess(project, tmp_path / "logs", env={"INTU_HTTP_TOKEN": TOKEN}) as intu:
        intu.start(router_port, http_port)
        ready = request(http_port, "GET", "/readyz")
        assert ready.status == 200 and ready.body == {"ready": True, "problems": []}, intu.log_text()
        channels = request(http_port, "GET", "/api/v1/channels").body
        check_schema(channels, "#/paths/~1channels/get/responses/200")
        assert [(c["name"], c["state"], c["listening"]) for c in channels["channels"]] == [
            (CHANNEL, "running", True)
        ]
        storescu(router_port, files)
        assert wait_until(lambda: destination(http_port)["delivered"] == 3, timeout=90), intu.log_text()

        # What the PACS has, read from its own files.
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in pacs.folder.iterdir()}
        assert sorted(arrived) == sorted(str(ds.SOPInstanceUID) for ds in sent)
        for original in sent:
            assert pydicom.dcmread(arrived[str(original.SOPInstanceUID)]).PixelData == original.PixelData

        state = destination(http_port)
        assert (state["depth"], state["dead"], state["failed"], state["queued"]) == (0, 0, 0, True)
        assert state["state"]["up"] is True, state
        # A delivery process reports its counts twice a second.
        assert wait_until(lambda: delivered_metric(http_port) == 3, timeout=10)
        samples = metric_samples(http_port)
        assert samples[("intu_messages_received_total", (("channel", CHANNEL),))] == 3
        assert samples[("intu_messages_delivered_total", (("destination", PACS),))] == 3
        assert samples[("intu_delivery_seconds_count", (("destination", PACS),))] == 3
        assert samples[("intu_queue_depth", (("queue", PACS),))] == 0
        assert samples[("intu_ready", ())] == 1

        # The history, searched as an operator would: by study, then by accession number.
        found = request(http_port, "GET", f"/api/v1/messages?study_uid={study_uid}")
        assert found.status == 200, found.body
        check_schema(found.body, "#/paths/~1messages/get/responses/200")
        records = found.body["messages"]
        assert sorted(r["identifiers"]["sop_instance_uid"] for r in records) == sorted(arrived)
        assert {(r["status"], r["channel"], r["destinations"][PACS]) for r in records} == {
            ("delivered", CHANNEL, "delivered")
        }
        assert all(r["source"].startswith("MODALITY@127.0.0.1:") for r in records), records
        by_accession = request(http_port, "GET", "/api/v1/messages?accession_number=ACC0001&limit=2")
        assert len(by_accession.body["messages"]) == 2  # the limit holds
        none = request(http_port, "GET", "/api/v1/messages?accession_number=NOT-SENT")
        assert none.status == 200 and none.body == {"messages": []}

        journey = request(http_port, "GET", f"/api/v1/messages/{records[0]['id']}")
        assert journey.status == 200
        check_schema(journey.body, "#/paths/~1messages~1{id}/get/responses/200")
        kinds = [e["kind"] for e in journey.body["events"]]
        assert kinds[0] == "received" and kinds[-1] == "delivered" and "queued" in kinds, kinds
        assert journey.body["message"]["tags"]["PatientName"] == "Doe^Jane"
        unknown = request(http_port, "GET", "/api/v1/messages/no-such-message")
        assert unknown.status == 404 and "no-such-message" in unknown.body["error"]


@DELIVERY_PROCESS
def test_a_refused_instance_is_a_dead_letter_until_the_operator_retries_it(
    tmp_path: Path, scp_factory: Callable[..., Scp], delivery_process: bool
) -> None:
    # The PACS refuses the second C-STORE it sees (0xA900: permanent), then takes everything.
    pacs = scp_factory(ae_title="PACS", status=lambda n, event: 0xA900 if n == 2 else 0x0000)
    router_port, http_port = free_port(), free_port()
    project = write_router_project(
        tmp_path / "project",
        router_port=router_port,
        pacs_port=pacs.port,
        queue="{enabled: true, threads: 1}",  # in order: the second instance is the refused one
    )
    add_http(project, http_port)
    if delivery_process:  # the operator's retry wakes the delivery process through its pipe
        append(project, "delivery: {process: true}")
    files = write_ct_series(tmp_path / "study", 3, size_kib=16)
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}

    with IntuProcess(project, tmp_path / "logs", env={"INTU_HTTP_TOKEN": TOKEN}) as intu:
        intu.start(router_port, http_port)
        storescu(router_port, files)
        assert wait_until(lambda: destination(http_port)["dead"] == 1, timeout=90), intu.log_text()
        assert wait_until(lambda: destination(http_port)["delivered"] == 2, timeout=60), intu.log_text()

        dead = request(http_port, "GET", "/api/v1/dead-letters").body["dead_letters"]
        (letter,) = dead
        refused_uid = letter["identifiers"]["sop_instance_uid"]
        assert refused_uid in sent and refused_uid not in {r.sop_instance_uid for r in pacs.received}
        assert letter["code"] == 0xA900 and letter["queue"] == PACS
        dead_record = request(http_port, "GET", "/api/v1/messages?status=dead").body["messages"]
        assert [r["id"] for r in dead_record] == [letter["message_id"]]

        path = f"/api/v1/entries/{letter['id']}/retry"
        assert request(http_port, "POST", path).status == 401
        assert request(http_port, "POST", path, token="a-wrong-token-of-some-length").status == 403
        retried = request(http_port, "POST", path, token=TOKEN)
        assert retried.status == 200 and retried.body["retried"] == 1, retried.body
        assert wait_until(lambda: destination(http_port)["delivered"] == 3, timeout=60), intu.log_text()

        # The PACS has every instance once, the refused one included, pixel data unchanged.
        received = {r.sop_instance_uid: r.dataset for r in pacs.received}
        assert sorted(received) == sorted(sent) and len(pacs.received) == 3
        assert received[refused_uid].PixelData == sent[refused_uid].PixelData

        journey = request(http_port, "GET", f"/api/v1/messages/{letter['message_id']}").body
        kinds = [e["kind"] for e in journey["events"]]
        assert kinds[0] == "received" and kinds[-1] == "delivered", kinds
        assert kinds.index("dead") < kinds.index("retried") < len(kinds) - 1, kinds
        (refusal,) = [e for e in journey["events"] if e["kind"] == "dead"]
        assert refusal["code"] == 0xA900 and journey["message"]["status"] == "delivered"
        assert wait_until(lambda: delivered_metric(http_port) == 3, timeout=10)
        samples = metric_samples(http_port)
        assert samples[("intu_messages_dead_lettered_total", (("destination", PACS),))] == 1
        assert samples[("intu_messages_delivered_total", (("destination", PACS),))] == 3
        assert samples[("intu_queue_dead_letters", (("queue", PACS),))] == 0
        # Open associations, from both sides: storescu has gone; the destination's pool holds at
        # most its one association (threads: 1) to the PACS, which sees as many.
        assert wait_until(
            lambda: (
                metric_samples(http_port)[("intu_dicom_scp_open_associations", (("channel", CHANNEL),))] == 0
            )
        )
        open_now = samples[("intu_dicom_scu_open_associations", (("destination", PACS),))]
        assert open_now in (0, 1) and pacs.max_active == 1


@DELIVERY_PROCESS
def test_a_pacs_down_then_back_is_shown_down_then_up_with_its_backlog_delivered(
    tmp_path: Path, delivery_process: bool
) -> None:
    router_port, http_port, pacs_port = free_port(), free_port(), free_port()
    project = write_router_project(
        tmp_path / "project", router_port=router_port, pacs_port=pacs_port, pacs_ae="DCMTK_SCP"
    )
    add_http(project, http_port)
    if delivery_process:  # the up/down state is the delivery process's, reported to the engine
        append(project, "delivery: {process: true}")
    files = write_ct_series(tmp_path / "study", 2, size_kib=16)

    with IntuProcess(project, tmp_path / "logs", env={"INTU_HTTP_TOKEN": TOKEN}) as intu:
        intu.start(router_port, http_port)
        storescu(router_port, files)  # nothing listens at the PACS's port yet
        assert wait_until(lambda: destination(http_port)["state"]["up"] is False, timeout=30), intu.log_text()
        down = destination(http_port)
        assert f"127.0.0.1:{pacs_port}" in down["state"]["last_error"] and down["depth"] == 2, down
        samples = metric_samples(http_port)
        assert samples[("intu_destination_up", (("destination", PACS),))] == 0

        pacs = start_storescp(tmp_path / "pacs", "DCMTK_SCP", port=pacs_port, log=tmp_path / "storescp.log")
        try:
            assert wait_until(lambda: destination(http_port)["delivered"] == 2, timeout=60), intu.log_text()
            assert wait_until(lambda: destination(http_port)["state"]["up"] is True, timeout=10)
            assert wait_until(
                lambda: metric_samples(http_port)[("intu_destination_up", (("destination", PACS),))] == 1,
                timeout=10,
            )
        finally:
            pacs.stop()
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in pacs.folder.iterdir()}
        assert arrived == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}


def test_readyz_is_503_with_the_reason_when_the_disk_is_below_its_reserve(tmp_path: Path) -> None:
    router_port, http_port = free_port(), free_port()
    huge = 1 << 40  # MiB: more than any disk has
    project = write_router_project(
        tmp_path / "project", router_port=router_port, pacs_port=free_port(), min_free_disk_mb=huge
    )
    add_http(project, http_port)
    with IntuProcess(project, tmp_path / "logs", env={"INTU_HTTP_TOKEN": TOKEN}) as intu:
        intu.start(router_port, http_port)
        answer = request(http_port, "GET", "/readyz")
        assert answer.status == 503, answer.body
        check_schema(answer.body, "#/components/schemas/Ready")
        (problem,) = answer.body["problems"]
        assert problem.startswith("disk nearly full: ") and f"below min_free_disk_mb={huge}" in problem
        assert request(http_port, "GET", "/healthz").status == 200  # alive all the same
        assert metric_samples(http_port)[("intu_ready", ())] == 0


def test_readyz_is_503_when_a_listener_stops_listening(tmp_path: Path) -> None:
    router_port, http_port = free_port(), free_port()
    project = write_router_project(tmp_path / "project", router_port=router_port, pacs_port=free_port())
    append(project, f'http: {{listen: "127.0.0.1:{http_port}"}}')
    with running_engine(project, registry_with(entry_points=True)) as engine:
        assert request(http_port, "GET", "/readyz").status == 200
        engine.channel(CHANNEL).source.stop()  # the listener goes away; the engine runs on
        answer = request(http_port, "GET", "/readyz")
        assert answer.status == 503
        assert answer.body["problems"] == [f"channel {CHANNEL}: its dicom source is not listening"]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", router_port), timeout=5).close()


def test_serve_refuses_an_address_other_hosts_reach_and_a_port_in_use(tmp_path: Path) -> None:
    project = write_router_project(tmp_path / "remote", router_port=free_port(), pacs_port=free_port())
    append(project, 'http: {listen: "0.0.0.0:8080"}')
    intu = IntuProcess(project, tmp_path / "logs-remote")
    checked = intu.intu("validate")
    assert checked.returncode == 1
    line = len((project / "intu.yaml").read_text().splitlines())
    assert f"intu.yaml:{line}" in checked.stderr + checked.stdout, checked
    assert "http.listen" in checked.stderr + checked.stdout and "allow_remote: true" in checked.stderr
    refused = intu.intu("serve")
    assert refused.returncode == 2 and "http.listen" in refused.stderr, refused

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = write_router_project(tmp_path / "busy", router_port=free_port(), pacs_port=free_port())
        add_http(busy, port)
        serve = IntuProcess(busy, tmp_path / "logs-busy", env={"INTU_HTTP_TOKEN": TOKEN})
        serve.start()
        assert serve.proc is not None and serve.proc.wait(timeout=60) == 1
    log = serve.log_text()
    assert f"intu serve: http: cannot listen on 127.0.0.1:{port}: Address already in use" in log, log
    assert "Traceback" not in log
