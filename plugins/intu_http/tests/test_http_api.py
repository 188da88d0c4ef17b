"""The HTTP API, metrics and health, in-process: an engine with the ``manual`` source, its server
on a free loopback port, real HTTP requests; every JSON answer is checked against openapi.json."""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import intu_http
import pytest
from intu_http.api import Throughput
from intu_http.testing import check_schema, request
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families

from intu_core import DestinationType, Message, SendResult, hookimpl
from intu_core.config.section import Section
from intu_core.metrics import EngineMetrics, MetricsRegistry
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine

TOKEN = "test-token-0123456789abcdef"


class Gate:
    """A destination that refuses (permanently, 0xC000) until a test opens it."""

    open = threading.Event()

    def __init__(self, settings: Any, runtime: Any) -> None:
        pass

    def send(self, message: Message) -> SendResult:
        if Gate.open.is_set():
            return SendResult.success()
        return SendResult.permanent("refused by the test", code=0xC000)

    def close(self) -> None:
        pass


def _parse(section: Section) -> None:
    section.done()


@hookimpl
def intu_destination_types() -> list[DestinationType]:
    return [DestinationType("gate", _parse, Gate, "refuses until opened")]


gate = SimpleNamespace(intu_destination_types=intu_destination_types, __name__="gate")


def wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "intu.yaml").write_text(
        textwrap.dedent(
            f"""\
            min_free_disk_mb: 0
            http: {{listen: "127.0.0.1:0", token: "{TOKEN}"}}
            destinations:
              pacs: {{type: gate, retry: {{max_attempts: 1}}, queue: {{threads: 1}}}}
              audit: {{type: log, queue: {{enabled: false}}}}
            """
        )
    )
    channel = tmp_path / "channels" / "inbound"
    channel.mkdir(parents=True)
    (channel / "channel.yaml").write_text("source: {type: manual}\ndestinations: [pacs, audit]\n")
    Gate.open.clear()
    with running_engine(tmp_path, registry_with(intu_http, manual_source, gate)) as running:
        yield running


def port_of(engine: Any) -> int:
    server = intu_http.running_server(engine.view)
    assert server is not None
    return server.port


def test_the_openapi_description_is_valid_and_served(engine: Any) -> None:
    answer = request(port_of(engine), "GET", "/api/v1/openapi.json")
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    validate_openapi(answer.body)
    assert answer.body["openapi"].startswith("3.1")


def test_channels_and_destinations_with_a_dead_letter_then_retried(engine: Any) -> None:
    port = port_of(engine)
    message = Message(body={"n": 1})
    engine_deliver(engine, "inbound", message)

    dead = wait_for(lambda: request(port, "GET", "/api/v1/dead-letters").body["dead_letters"])
    check_schema({"dead_letters": dead}, "#/paths/~1dead-letters/get/responses/200")
    (letter,) = dead
    assert letter["message_id"] == message.id and letter["queue"] == "pacs" and letter["code"] == 0xC000
    assert "refused by the test" in letter["reason"]

    channels = request(port, "GET", "/api/v1/channels")
    check_schema(channels.body, "#/paths/~1channels/get/responses/200")
    assert channels.body["channels"] == [
        {
            "name": "inbound",
            "source_type": "manual",
            "state": "running",
            "destinations": ["pacs", "audit"],
            "listening": None,  # the manual source does not listen on a port
            "received": 1,
            "accepted": 1,
            "filtered": 0,
            "refused": 0,
        }
    ]
    destinations = request(port, "GET", "/api/v1/destinations")
    check_schema(destinations.body, "#/paths/~1destinations/get/responses/200")
    by_name = {d["name"]: d for d in destinations.body["destinations"]}
    assert by_name["pacs"]["dead"] == 1 and by_name["pacs"]["depth"] == 0 and by_name["pacs"]["failed"] == 1
    assert by_name["pacs"]["state"]["up"] is True and by_name["pacs"]["state"]["last_error"] == ""
    assert by_name["audit"]["queued"] is False and by_name["audit"]["depth"] == 0

    # The operator: no token, a wrong one, then the right one.
    path = f"/api/v1/entries/{letter['id']}/retry"
    missing = request(port, "POST", path)
    assert missing.status == 401 and "Bearer" in missing.body["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = request(port, "POST", path, token="not-the-token-at-all")
    assert wrong.status == 403 and wrong.body == {"error": "wrong operator token"}
    Gate.open.set()
    done = request(port, "POST", path, token=TOKEN)
    assert done.status == 200, done.body
    check_schema(done.body, "#/paths/~1entries~1{id}~1retry/post/responses/200")
    assert done.body == {"retried": 1, "entry": letter["id"], "queue": "pacs"}
    wait_for(lambda: request(port, "GET", "/api/v1/destinations").body["destinations"][1]["delivered"] == 1)
    assert request(port, "GET", "/api/v1/dead-letters").body == {"dead_letters": []}
    gone = request(port, "POST", path, token=TOKEN)
    assert gone.status == 404 and letter["id"] in gone.body["error"]


def test_purge_needs_the_token_and_deletes_the_entry(engine: Any) -> None:
    port = port_of(engine)
    engine_deliver(engine, "inbound", Message(body={"n": 2}))
    (letter,) = wait_for(lambda: request(port, "GET", "/api/v1/dead-letters").body["dead_letters"])
    path = f"/api/v1/entries/{letter['id']}/purge"
    assert request(port, "POST", path, headers={"Authorization": "Basic abc"}).status == 401
    done = request(port, "POST", path, token=TOKEN)
    assert done.status == 200 and done.body["purged"] == 1
    assert request(port, "POST", path, token=TOKEN).status == 404


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("limit=abc", "limit must be a whole number from 1 to 1000, not 'abc'"),
        ("limit=0", "limit must be a whole number from 1 to 1000, not '0'"),
        ("since=yesterday", "since must be epoch seconds or an ISO 8601 time"),
        ("status=lost", "status must be one of received, filtered"),
        ("accesion_number=A1", "unknown query parameter 'accesion_number'"),
        ("patient_id=1&patient_id=2", "patient_id given 2 times"),
        ("since=2026-01-02T00:00:00Z&until=2026-01-01", "until must be later than since"),
    ],
)
def test_malformed_query_parameters_are_400_with_the_reason(engine: Any, query: str, expected: str) -> None:
    answer = request(port_of(engine), "GET", f"/api/v1/messages?{query}")
    assert answer.status == 400 and expected in answer.body["error"], answer.body
    check_schema(answer.body, "#/components/schemas/Error")


def test_unknown_paths_methods_and_ids(engine: Any) -> None:
    port = port_of(engine)
    for path in ("/api/v1/nothing", "/api/v2/channels", "/static/../openapi.json", "/static/%2e%2e/api.py"):
        answer = request(port, "GET", path)
        assert answer.status == 404 and answer.body["error"], path
    method = request(port, "DELETE", "/api/v1/channels")
    assert method.status == 405 and method.headers["allow"] == "GET, HEAD"
    post_only = request(port, "GET", "/api/v1/entries/x/retry")
    assert post_only.status == 405 and post_only.headers["allow"] == "POST"
    unknown = request(port, "POST", "/api/v1/entries/no-such-entry/retry", token=TOKEN)
    assert unknown.status == 404 and "no-such-entry" in unknown.body["error"]


def test_health_readiness_and_metrics(engine: Any) -> None:
    port = port_of(engine)
    assert request(port, "GET", "/healthz").body == {"alive": True}
    ready = request(port, "GET", "/readyz")
    assert ready.status == 200 and ready.body == {"ready": True, "problems": []}
    check_schema(ready.body, "#/components/schemas/Ready")
    engine_deliver(engine, "inbound", Message(body={"n": 3}))
    wait_for(lambda: request(port, "GET", "/api/v1/dead-letters").body["dead_letters"])

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        answer = request(port, "GET", "/metrics")
        assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.raw.decode())
            for s in family.samples
        }

    # The worker counts the dead letter just after the store shows it (the delivery's histogram
    # before): wait for that count, then read them all.
    dead = ("intu_messages_dead_lettered_total", (("destination", "pacs"),))
    samples = wait_for(lambda: (found := scrape()).get(dead) and found)
    assert samples[("intu_messages_received_total", (("channel", "inbound"),))] == 1
    assert samples[("intu_messages_dead_lettered_total", (("destination", "pacs"),))] == 1
    assert samples[("intu_queue_dead_letters", (("queue", "pacs"),))] == 1
    assert samples[("intu_queue_entries", (("queue", "pacs"), ("state", "dead")))] == 1
    assert samples[("intu_queue_depth", (("queue", "pacs"),))] == 0
    assert samples[("intu_queue_up", ())] == 1 and samples[("intu_ready", ())] == 1
    assert samples[("intu_channel_running", (("channel", "inbound"),))] == 1
    # A refusal is an answer: the destination is up (down is for one that cannot be reached).
    assert samples[("intu_destination_up", (("destination", "pacs"),))] == 1
    assert samples[("intu_delivery_seconds_count", (("destination", "pacs"),))] == 1


def test_the_dashboard_and_its_static_files(engine: Any) -> None:
    port = port_of(engine)
    page = request(port, "GET", "/")
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert b"<html" in page.raw
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        answer = request(port, "GET", f"/static/{name}")
        assert answer.status == 200 and answer.headers["content-type"].startswith(kind), name
    assert request(port, "HEAD", "/static/dashboard.js").raw == b""


def test_a_request_addressed_to_another_host_name_is_refused(engine: Any) -> None:
    # DNS rebinding: a page at attacker.example resolving its name to 127.0.0.1.
    port = port_of(engine)
    rebound = request(port, "GET", "/api/v1/messages", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status == 403 and "not a loopback address" in rebound.body["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        answer = request(port, "GET", "/api/v1/channels", headers={"Host": host})
        assert answer.status == 200, host
        assert answer.headers["cache-control"] == "no-store"  # patient identifiers: never cached


def test_a_queue_that_cannot_be_reached_is_503_and_not_ready(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PostgreSQL server that went away; shown here by the one exception every backend raises.
    from intu_core.queue import QueueUnavailable

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise QueueUnavailable("connection refused by db.example.org:5432")

    monkeypatch.setattr(engine.store, "stats", unreachable)
    monkeypatch.setattr(engine.store, "list_entries", unreachable)
    port = port_of(engine)
    for path in ("/api/v1/destinations", "/api/v1/dead-letters"):
        answer = request(port, "GET", path)
        assert answer.status == 503 and answer.headers["retry-after"] == "5", path
        assert answer.body == {
            "error": "the queue cannot be reached now: connection refused by db.example.org:5432"
        }
    ready = request(port, "GET", "/readyz")
    assert ready.status == 503
    assert ready.body["problems"] == ["the queue cannot be read: connection refused by db.example.org:5432"]
    assert request(port, "GET", "/metrics").status == 200  # intu_queue_up 0, the rest as usual


def test_throughput_is_the_increase_over_the_last_minute() -> None:
    registry = MetricsRegistry()
    delivered = EngineMetrics.register(registry).delivered.labels("pacs")
    throughput = Throughput(window_s=60)
    throughput.sample(registry.collect(), now=1000.0)
    delivered.inc(30)
    assert throughput.rates(registry.collect(), now=1010.0) == {"pacs": 3.0}
    delivered.inc(60)  # the first sample is out of the window now: 60 since the one at 1010
    assert throughput.rates(registry.collect(), now=1070.0) == {"pacs": 1.0}
