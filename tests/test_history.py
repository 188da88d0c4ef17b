"""The message history through the engine (every event kind), its retention sweep and settings,
and ``intu messages`` on a real queue database."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from project_files import write

from intu_core import DestinationType, Message, SendResult, hookimpl
from intu_core.config.problems import ConfigError
from intu_core.config.project import Project, load_project
from intu_core.config.section import Section
from intu_core.history import EventKind, Journey, MessageQuery
from intu_core.history_commands import messages, parse_when
from intu_core.message import AcceptanceStatus
from intu_core.plugins import PluginRegistry
from intu_core.queue import EntryState
from intu_core.queue.sqlite import DB_NAME, SqliteQueueStore
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine


class Scripted:
    """A destination answering each message as its body's ``plan`` says, one outcome per send
    (``retryable``, ``permanent``, then ``success`` for ever); ``audit`` always succeeds."""

    calls: dict[str, int] = {}
    lock = threading.Lock()

    def __init__(self, settings: Any, runtime: Any) -> None:
        self.name = runtime.name

    def send(self, message: Message) -> SendResult:
        if self.name == "audit":
            return SendResult.success("logged", code=0)
        with Scripted.lock:
            n = Scripted.calls.get(message.id, 0)
            Scripted.calls[message.id] = n + 1
        plan = message.body.get("plan", [])
        outcome = plan[n] if n < len(plan) else "success"
        if outcome == "retryable":
            return SendResult.retryable("PACS busy", code=0xA700)
        if outcome == "permanent":
            return SendResult.permanent("SOP class refused", code=0xA900)
        return SendResult.success("stored", code=0x0000)

    def close(self) -> None:
        pass


def _parse(section: Section) -> None:
    section.done()


@hookimpl
def intu_destination_types() -> list[DestinationType]:
    return [DestinationType("scripted", _parse, Scripted, "answers as the message says")]


scripted_plugin = SimpleNamespace(intu_destination_types=intu_destination_types, __name__="scripted_plugin")
RETRY = "retry: {backoff: constant, initial_delay_ms: 10, max_delay_ms: 10, jitter: 0}"


def router(tmp_path: Path, history: str = "") -> Path:
    write(
        tmp_path / "intu.yaml",
        f"""
        destinations:
          pacs: {{type: scripted, queue: {{threads: 1}}, {RETRY}}}
          audit: {{type: scripted, queue: {{enabled: false}}}}
        {history}
        """,
    )
    write(
        tmp_path / "channels" / "router" / "channel.yaml",
        "source: {type: manual}\ndestinations: [pacs, audit]\n",
    )
    write(
        tmp_path / "channels" / "router" / "filter.py",
        "def filter(msg, ctx):\n    return not msg.body.get('drop')\n",
    )
    write(
        tmp_path / "channels" / "router" / "transformer.py",
        "def transform(msg, ctx):\n"
        "    if msg.body.get('boom'):\n"
        "        raise KeyError('boom')\n"
        "    return msg\n",
    )
    return tmp_path


def instance(accession: str, **body: Any) -> Message:
    """A message as the DICOM source hands it over (``metadata["history"]`` filled in)."""
    history = {
        "source": "CT1@127.0.0.1:40000",
        "identifiers": {"accession_number": accession, "patient_id": "P1", "modality": "CT"},
        "tags": {"PatientName": "DOE^JANE"},
    }
    return Message(body=body, metadata={"history": history})


def wait_for(engine: Any, message_id: str, done: Callable[[Journey], bool]) -> Journey:
    deadline = time.monotonic() + 20
    while True:
        journey = engine.store.journey(message_id)
        if journey is not None and done(journey):
            return journey
        assert time.monotonic() < deadline, journey
        time.sleep(0.02)


def kinds(journey: Journey) -> list[tuple[str, str]]:
    return [(e.kind.value, e.destination) for e in journey.events]


def test_every_event_kind_through_the_engine(tmp_path: Path) -> None:
    Scripted.calls.clear()
    registry = registry_with(manual_source, scripted_plugin)
    with running_engine(router(tmp_path), registry) as engine:
        dropped = instance("F1", drop=True)
        assert engine_deliver(engine, "router", dropped).status is AcceptanceStatus.FILTERED
        errored = instance("E1", boom=True)
        assert engine_deliver(engine, "router", errored).status is AcceptanceStatus.FAILED
        late = instance("D1", plan=["retryable"])
        refused = instance("X1", plan=["permanent"])
        purged = instance("P1", plan=["permanent"])
        for m in (late, refused, purged):
            assert engine_deliver(engine, "router", m).status is AcceptanceStatus.ACCEPTED

        journey = wait_for(engine, dropped.id, lambda j: True)
        assert journey.message.status == "filtered" and kinds(journey) == [("received", ""), ("filtered", "")]
        assert journey.events[1].detail == "filter.py:filter"
        assert journey.message.identifiers["accession_number"] == "F1"  # never discarded unseen
        assert journey.message.source == "CT1@127.0.0.1:40000" and journey.message.channel == "router"

        journey = wait_for(engine, errored.id, lambda j: True)
        assert journey.message.status == "errored" and kinds(journey) == [
            ("received", ""),
            ("errored", "channel:router"),
        ]
        assert "KeyError" in journey.events[1].detail and len(journey.entries) == 1

        journey = wait_for(engine, late.id, lambda j: j.message.status == "delivered")
        assert kinds(journey) == [
            ("received", ""),
            ("transformed", ""),
            ("sent", "audit"),
            ("queued", "pacs"),
            ("attempt", "pacs"),
            ("delivered", "pacs"),
        ]
        assert journey.events[1].detail == "transformer.py:transform"
        attempt, delivered = journey.events[4], journey.events[5]
        assert (attempt.attempt, attempt.status, attempt.code, attempt.detail) == (
            1,
            "retryable",
            0xA700,
            "PACS busy",
        )
        assert (delivered.attempt, delivered.status, delivered.code) == (2, "success", 0)
        assert journey.message.destinations == {"audit": "sent", "pacs": "delivered"}
        assert journey.entries == ()

        journey = wait_for(engine, refused.id, lambda j: j.message.status == "partial")
        assert journey.message.destinations == {"audit": "sent", "pacs": "dead"}
        dead = journey.events[-1]
        assert (dead.kind, dead.code, dead.attempt) == (EventKind.DEAD, 0xA900, 1)
        assert engine.view.operator().retry(list(journey.entries)) == 1
        journey = wait_for(engine, refused.id, lambda j: j.message.status == "delivered")
        assert kinds(journey)[-3:] == [("dead", "pacs"), ("retried", "pacs"), ("delivered", "pacs")]

        journey = wait_for(engine, purged.id, lambda j: j.message.status == "partial")
        assert engine.store.purge(entry_ids=list(journey.entries), state=EntryState.DEAD) == 1
        journey = wait_for(engine, purged.id, lambda j: j.message.destinations["pacs"] == "purged")
        assert kinds(journey)[-1] == ("purged", "pacs") and journey.entries == ()

        found = engine.view.find_messages(MessageQuery(channel="router"))
        assert {r.id for r in found} == {m.id for m in (dropped, errored, late, refused, purged)}
        assert [r.id for r in engine.view.find_messages(MessageQuery(accession_number="D1"))] == [late.id]
        assert engine.view.journey(late.id) == engine.store.journey(late.id)


def test_a_destination_filter_that_drops_one_destination_is_recorded(tmp_path: Path) -> None:
    router(tmp_path)
    write(
        tmp_path / "channels" / "router" / "channel.yaml",
        "source: {type: manual}\ndestinations: [pacs, {name: audit, filter: audit_filter.py}]\n",
    )
    write(tmp_path / "channels" / "router" / "audit_filter.py", "def filter(msg, ctx):\n    return False\n")
    with running_engine(tmp_path, registry_with(manual_source, scripted_plugin)) as engine:
        m = instance("A1")
        assert engine_deliver(engine, "router", m).status is AcceptanceStatus.ACCEPTED
        journey = wait_for(engine, m.id, lambda j: j.message.status == "delivered")
    assert kinds(journey)[:4] == [
        ("received", ""),
        ("transformed", ""),
        ("filtered", "audit"),
        ("queued", "pacs"),
    ]
    assert journey.events[2].detail == "audit_filter.py:filter"
    assert journey.message.destinations == {"pacs": "delivered"}


def test_the_engine_forgets_finished_messages_after_the_retention(tmp_path: Path) -> None:
    router(tmp_path, "history: {retention_days: 1}")
    store = SqliteQueueStore(tmp_path / "data")
    old, waiting = instance("OLD"), instance("WAIT")
    store.record(old, [])
    store.enqueue([("elsewhere", waiting)], origin=waiting)  # a queue no worker takes from
    store.close()
    conn = sqlite3.connect(tmp_path / "data" / DB_NAME)
    conn.execute("UPDATE messages SET received_at = ?, updated_at = ?", (time.time() - 2 * 86400,) * 2)
    conn.commit()
    conn.close()
    with running_engine(tmp_path, registry_with(manual_source, scripted_plugin)) as engine:
        deadline = time.monotonic() + 20
        while engine.store.journey(old.id) is not None:  # the sweep at start
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert engine.store.journey(waiting.id) is not None  # still queued: kept
    assert load_project(tmp_path, registry_with(manual_source, scripted_plugin)).history.retention_days == 1


def test_history_settings_are_checked(tmp_path: Path) -> None:
    router(tmp_path, "history: {retention_days: -1, keep: 3}")
    with pytest.raises(ConfigError) as err:
        load_project(tmp_path, registry_with(manual_source, scripted_plugin))
    text = err.value.report()
    assert "history.retention_days" in text and "history.keep" in text
    router(tmp_path)
    assert load_project(tmp_path, registry_with(manual_source, scripted_plugin)).history.retention_days == 7


# -- intu messages ---------------------------------------------------------------------------
class State:
    """What the intu CLI puts in ctx.obj, for a project whose data folder is ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.parent
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "intu.yaml").write_text(f"data_dir: {data_dir.name}\n")

    def registry(self) -> PluginRegistry:
        return registry_with()

    def project(self) -> Project:
        return load_project(self.root, self.registry())


def run(data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(messages, list(args), obj=State(data_dir))


@pytest.fixture
def history(tmp_path: Path) -> dict[str, str]:
    """A queue with a delivered study instance (after a retry) and a dead one of another study."""
    store = SqliteQueueStore(tmp_path / "data")
    ids = {}
    for name, accession, outcome in (("delivered", "ACC1", "success"), ("dead", "ACC2", "permanent")):
        m = instance(accession)
        ids[name] = m.id
        store.enqueue([("pacs", m)], origin=m)
        entry = store.claim("pacs")
        assert entry is not None
        store.retry_later(entry.id, SendResult.retryable("PACS busy", code=0xA700), 0.0)
        entry = store.claim("pacs")
        assert entry is not None
        if outcome == "success":
            store.complete(entry.id, SendResult.success("stored", code=0))
        else:
            store.dead_letter(entry.id, SendResult.permanent("refused", code=0xA900))
    store.close()
    return ids


def test_messages_searches_by_accession_as_json(tmp_path: Path, history: dict[str, str]) -> None:
    result = run(tmp_path / "data", "--accession", "ACC1", "--json")
    assert result.exit_code == 0, result.output
    [found] = json.loads(result.output)
    assert found["id"] == history["delivered"] and found["status"] == "delivered"
    assert found["identifiers"]["accession_number"] == "ACC1" and found["source"] == "CT1@127.0.0.1:40000"
    pacs = found["destinations"]["pacs"]
    assert pacs["state"] == "delivered" and pacs["attempts"] == 2
    assert (pacs["last"]["kind"], pacs["last"]["code"], pacs["last"]["detail"]) == ("delivered", 0, "stored")


def test_messages_lists_a_table_and_filters(tmp_path: Path, history: dict[str, str]) -> None:
    result = run(tmp_path / "data")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["RECEIVED", "STATUS", "ACCESSION"]
    assert len(lines) == 3
    assert "pacs: dead after 2 attempts (0xA900)" in result.output
    assert "pacs: delivered after 2 attempts (0x0000)" in result.output
    dead = run(tmp_path / "data", "--status", "dead", "--json")
    assert [m["id"] for m in json.loads(dead.output)] == [history["dead"]]
    assert json.loads(run(tmp_path / "data", "--since", "1h", "--patient-id", "P1", "--json").output) != []
    assert json.loads(run(tmp_path / "data", "--until", "1h", "--json").output) == []
    assert run(tmp_path / "data", "--accession", "NONE").output == "no messages\n"


def test_messages_show_prints_the_journey(tmp_path: Path, history: dict[str, str]) -> None:
    result = run(tmp_path / "data", "show", history["dead"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "from CT1@127.0.0.1:40000" in text and "status      dead" in text
    assert "accession_number ACC2" in text.replace("  ", " ") or "ACC2" in text
    events = [line.split()[2] for line in text.splitlines() if line[:4].isdigit()]
    assert events == ["received", "queued", "attempt", "dead"]
    assert "0xA700" in text and "0xA900" in text and "still in the queue:" in text
    as_json = json.loads(run(tmp_path / "data", "show", history["dead"], "--json").output)
    assert [e["kind"] for e in as_json["events"]] == ["received", "queued", "attempt", "dead"]
    assert as_json["events"][-1]["code_hex"] == "0xA900" and len(as_json["entries"]) == 1


def test_bad_input_is_refused_clearly(tmp_path: Path, history: dict[str, str]) -> None:
    unknown = run(tmp_path / "data", "show", "nope")
    assert unknown.exit_code == 1 and "no message nope in the history" in unknown.output
    malformed = run(tmp_path / "data", "--since", "yesterday-ish")
    assert malformed.exit_code == 2
    assert "neither an ISO 8601 time" in malformed.output and "--since" in malformed.output
    assert run(tmp_path / "data", "--status", "lost").exit_code == 2
    assert run(tmp_path / "data", "--limit", "0").exit_code == 2


def test_without_a_queue_yet(tmp_path: Path) -> None:
    result = run(tmp_path / "empty")
    assert result.exit_code == 0 and result.output == "no messages\n"
    shown = run(tmp_path / "empty", "show", "abc")
    assert shown.exit_code == 1 and "no queue database yet" in shown.output
    assert not (tmp_path / "empty" / DB_NAME).exists()  # looking creates nothing


def test_times_are_iso_or_ago() -> None:
    now = 1_800_000_000.0
    assert parse_when("2h", now) == now - 7200
    assert parse_when("90s", now) == now - 90
    assert parse_when("1.5d", now) == now - 1.5 * 86400
    assert parse_when("2026-12-03T09:30:00+00:00") == 1796290200.0
    with pytest.raises(ValueError, match="neither"):
        parse_when("2 hours")


def test_what_a_source_puts_in_metadata_is_taken_with_care() -> None:
    from intu_core.history import TAG_LIMIT, TAG_VALUE_LIMIT, history_of

    weird = Message(
        body={},
        channel="c",
        metadata={
            "history": {
                "source": 42,
                "identifiers": {"patient_id": ["A", "B"], "accession_number": "", "unknown": "x"},
                "tags": {**{f"T{i}": "v" * 100 for i in range(TAG_LIMIT + 5)}, 7: "not a keyword"},
            }
        },
    )
    record = history_of(weird)
    assert record.source == "42" and record.identifiers == {"patient_id": "A\\B"}
    assert len(record.tags) == TAG_LIMIT and all(len(v) == TAG_VALUE_LIMIT for v in record.tags.values())
    assert history_of(Message(body={}, metadata={"history": "junk"})).identifiers == {}
