"""``intu queue list/show/retry/purge`` through click's CliRunner, on a real queue database."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from intu_core.config.problems import ConfigError, Problem
from intu_core.config.project import Project, load_project
from intu_core.hookspecs import hookimpl
from intu_core.message import Message, SendResult
from intu_core.plugins import PluginRegistry
from intu_core.queue import EntryState, QueueBackend, QueueRuntime, QueueStore, channel_queue
from intu_core.queue.commands import queue
from intu_core.queue.sqlite import SqliteQueueStore, SqliteSettings, open_sqlite, parse_sqlite_settings
from intu_core.testing import registry_with


class State:
    """What the intu CLI puts in ctx.obj: something with project() and registry(); the project's
    intu.yaml (all defaults) is next to its data folder, ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.parent
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "intu.yaml").write_text(f"data_dir: {data_dir.name}\n")

    def registry(self) -> PluginRegistry:
        return registry_with()

    def project(self) -> Project:
        return load_project(self.root, self.registry())


class BrokenState:
    def registry(self) -> PluginRegistry:
        return registry_with()

    def project(self) -> Project:
        raise ConfigError([Problem(Path("intu.yaml"), "data_dir", "expected a string, found a list", 3)])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def filled(data_dir: Path, tmp_path: Path) -> dict[str, str]:
    """A queue database with a pending, an in-flight, a dead and an errored entry."""
    dicom = tmp_path / "in.dcm"
    dicom.write_bytes(b"DICM")
    store = SqliteQueueStore(data_dir)
    body = {
        "dataset": {"00100020": {"vr": "LO", "Value": ["P1"]}},
        "sop_instance_uid": "1.2.3",
        "big": "x" * 500,
    }
    pending, flying, dead = store.enqueue(
        [
            ("pacs", Message(body=body, channel="router", files=(str(dicom),))),
            ("pacs", Message(body={"n": 2})),
            ("archive", Message(body={"n": 3})),
        ]
    )
    for at in (0.0, 0.0, 4e9):  # three failed attempts; due at 0.0 it comes first again, then far away
        assert store.claim("pacs").id == pending  # type: ignore[union-attr]
        store.retry_later(pending, SendResult.retryable("association rejected", code=0xA700), at)
    assert store.claim("pacs").id == flying  # type: ignore[union-attr]
    assert store.claim("archive").id == dead  # type: ignore[union-attr]
    store.dead_letter(dead, SendResult.permanent("SOP class not supported", code=0x0122))
    errored = store.record_error(
        Message(body={"n": 4}),
        channel_queue("router"),
        "transformer: KeyError\nTraceback (most recent call last):\n  File ...\nKeyError: '00100010'",
    )
    store.close()
    return {"pending": pending, "flying": flying, "dead": dead, "errored": errored, "file": str(dicom)}


def run(data_dir: Path, *args: str, input: str | None = None, obj: object | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(queue, list(args), obj=obj or State(data_dir), input=input)


def test_list_without_a_database(data_dir: Path) -> None:
    result = run(data_dir, "list")
    assert result.exit_code == 0 and "no queued messages" in result.output
    assert not data_dir.exists()  # looking does not create anything
    result = run(data_dir, "show", "abc")
    assert result.exit_code == 1 and "no queue database yet" in result.output


def test_configuration_errors_are_printed(data_dir: Path) -> None:
    result = run(data_dir, "list", obj=BrokenState())
    assert result.exit_code == 2
    assert "intu.yaml:3: data_dir: expected a string, found a list" in result.output


def test_list_shows_each_queue(data_dir: Path, filled: dict[str, str]) -> None:
    result = run(data_dir, "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["QUEUE", "PENDING", "IN-FLIGHT", "DEAD", "ERRORED", "OLDEST", "DELIVERED"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["pacs"][:4] == ["1", "1", "0", "0"]
    assert rows["pacs"][4].endswith("s")
    assert rows["archive"] == ["0", "0", "1", "0", "-", "0"]
    assert rows["channel:router"] == ["0", "0", "0", "1", "-", "0"]

    result = run(data_dir, "list", "--destination", "archive", "--json")
    [item] = json.loads(result.output)
    assert item["queue"] == "archive" and item["dead"] == 1 and item["depth"] == 0


def test_list_entries_in_a_state(data_dir: Path, filled: dict[str, str]) -> None:
    result = run(data_dir, "list", "--state", "dead")
    assert result.exit_code == 0, result.output
    assert filled["dead"] in result.output and "SOP class not supported" in result.output
    assert filled["pending"] not in result.output
    result = run(data_dir, "list", "--state", "errored")
    assert "KeyError: '00100010'" in result.output  # the traceback's last line
    result = run(data_dir, "list", "-s", "pending", "-d", "archive")
    assert result.output.strip() == "no entries"
    result = run(data_dir, "list", "--state", "in_flight", "--json")
    assert [e["id"] for e in json.loads(result.output)] == [filled["flying"]]


def test_show_prints_history_and_a_body_summary(data_dir: Path, filled: dict[str, str]) -> None:
    result = run(data_dir, "show", filled["pending"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["state"] == "pending" and data["attempts"] == 3
    assert [h["code"] for h in data["history"]] == [0xA700] * 3
    assert data["history"][0]["at"].endswith("+00:00")
    message = data["message"]
    assert message["channel"] == "router" and message["files"] == [filled["file"]]
    assert message["body"]["sop_instance_uid"] == "1.2.3"
    assert message["body"]["dataset"] == "<mapping, 1 keys>"
    assert message["body"]["big"] == "<text, 500 characters>"
    full = json.loads(run(data_dir, "show", filled["pending"], "--body").output)
    assert full["message"]["body"]["dataset"]["00100020"]["Value"] == ["P1"]
    flying = json.loads(run(data_dir, "show", filled["flying"]).output)
    assert flying["state"] == "in_flight" and flying["leased_to"].startswith("sqlite-")
    assert flying["lease_expires_at"].endswith("+00:00") and "leased_to" not in data
    missing = run(data_dir, "show", "nope")
    assert missing.exit_code == 1 and "no queue entry nope" in missing.output


def test_retry(data_dir: Path, filled: dict[str, str]) -> None:
    assert run(data_dir, "retry").exit_code == 2  # says what to name
    result = run(data_dir, "retry", "--all-dead")
    assert result.exit_code == 0 and "1 entry put back in the queue" in result.output
    store = SqliteQueueStore(data_dir)
    assert store.get(filled["dead"]).state is EntryState.PENDING  # type: ignore[union-attr]
    store.close()
    # The channel's errored entry goes back too (the engine runs it through the channel again);
    # a pending entry is not retried, and the command says so.
    result = run(data_dir, "retry", filled["errored"], filled["pending"])
    assert "1 entry put back" in result.output
    assert "1 of the given entries were not retried" in result.output


def test_retry_one_destination(data_dir: Path, filled: dict[str, str]) -> None:
    assert "0 entries" in run(data_dir, "retry", "--destination", "pacs").output
    assert "1 entry" in run(data_dir, "retry", "-d", "archive").output


def test_purge(data_dir: Path, filled: dict[str, str]) -> None:
    assert run(data_dir, "purge", "--yes").exit_code == 2
    aborted = run(data_dir, "purge", "--state", "dead", input="n\n")
    assert aborted.exit_code == 1 and "Delete entries in state dead" in aborted.output
    result = run(data_dir, "purge", "--state", "dead", "--yes")
    assert result.exit_code == 0 and "1 entry purged" in result.output
    # In-flight entries are never purged; the pending entry goes with its file.
    result = run(data_dir, "purge", "-d", "pacs", "--yes")
    assert "1 entry purged" in result.output
    assert not Path(filled["file"]).exists()
    result = run(data_dir, "purge", filled["errored"], input="y\n")
    assert "1 entry purged" in result.output
    listing = run(data_dir, "list", "--json")
    by_queue = {s["queue"]: s for s in json.loads(listing.output)}
    assert by_queue["pacs"]["in_flight"] == 1 and by_queue["pacs"]["pending"] == 0
    assert "channel:router" not in by_queue


def test_retry_all_errored(data_dir: Path, filled: dict[str, str]) -> None:
    # With a destination named, --all-errored retries only that queue's errored entries: the
    # archive's dead letter stays dead.
    assert "0 entries" in run(data_dir, "retry", "-d", "archive", "--all-errored").output
    result = run(data_dir, "retry", "--all-errored")
    assert result.exit_code == 0 and "1 entry put back" in result.output
    store = SqliteQueueStore(data_dir)
    assert store.get(filled["errored"]).state is EntryState.PENDING  # type: ignore[union-attr]
    assert store.get(filled["dead"]).state is EntryState.DEAD  # type: ignore[union-attr]
    store.close()


def test_the_commands_open_the_backend_chosen_in_intu_yaml(data_dir: Path, filled: dict[str, str]) -> None:
    """`intu queue` knows no backend: it opens whatever `queue: {backend: ...}` names, for looking."""
    opened: list[QueueRuntime] = []

    def open_spy(settings: SqliteSettings, runtime: QueueRuntime) -> QueueStore:
        opened.append(runtime)
        return open_sqlite(settings, runtime)

    @hookimpl
    def intu_queue_backends() -> list[QueueBackend]:
        return [QueueBackend("spy", parse_sqlite_settings, open_spy)]

    class SpyState(State):
        def registry(self) -> PluginRegistry:
            return registry_with(SimpleNamespace(intu_queue_backends=intu_queue_backends, __name__="spy"))

    state = SpyState(data_dir)
    (state.root / "intu.yaml").write_text(f"data_dir: {data_dir.name}\nqueue: {{backend: spy}}\n")
    result = run(data_dir, "list", "--json", obj=state)
    assert result.exit_code == 0, result.output
    assert {s["queue"] for s in json.loads(result.output)} == {"pacs", "archive", "channel:router"}
    assert opened == [QueueRuntime(data_dir, None, create=False)]
