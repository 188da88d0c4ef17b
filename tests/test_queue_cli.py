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
from intu_core.queue.sqlite import (
    DB_NAME,
    SqliteQueueStore,
    SqliteSettings,
    open_sqlite,
    parse_sqlite_settings,
)
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


# -- unknown ids -----------------------------------------------------------------------------
def test_retry_and_purge_of_unknown_ids_fail_and_change_nothing(
    data_dir: Path, filled: dict[str, str]
) -> None:
    result = run(data_dir, "retry", filled["dead"], "no-such-id")
    assert result.exit_code == 1 and "no queue entry no-such-id; nothing was changed" in result.output
    result = run(data_dir, "purge", "--yes", filled["dead"], "typo-1", "typo-2")
    assert result.exit_code == 1 and "no queue entries typo-1, typo-2" in result.output
    with SqliteQueueStore(data_dir) as store:
        assert store.get(filled["dead"]).state is EntryState.DEAD  # type: ignore[union-attr]
    # Known but not in a state the command acts on: said, and not a success either.
    result = run(data_dir, "retry", filled["pending"])
    assert result.exit_code == 1 and "were not retried" in result.output
    result = run(data_dir, "purge", "--yes", filled["flying"])
    assert result.exit_code == 1 and "in flight" in result.output


# -- recover ---------------------------------------------------------------------------------
@hookimpl
def intu_message_from_file(source_type: str, path: Path, channel: str) -> Message | None:
    """What a plugin whose source wrote text files would answer."""
    if source_type != "manual":
        return None
    text = path.read_text()
    if text.startswith("junk"):
        raise ValueError("not a message file")
    return Message(body={"text": text}, channel=channel, files=(str(path),))


class RecoverState(State):
    """A project with channel ``inbound`` (a manual source) queueing to a file destination."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        (self.root / "intu.yaml").write_text(
            f"data_dir: {data_dir.name}\ndestinations:\n  archive:\n    type: file\n"
            "    file: {directory: out}\n    queue: {enabled: true, threads: 1}\n"
        )
        channel = self.root / "channels" / "inbound" / "channel.yaml"
        channel.parent.mkdir(parents=True)
        channel.write_text("source: {type: manual}\ndestinations: [archive]\n")

    def registry(self) -> PluginRegistry:
        from intu_core.testing import manual_source

        plugin = SimpleNamespace(intu_message_from_file=intu_message_from_file, __name__="textfiles")
        return registry_with(manual_source, plugin)


def test_recover_queues_quarantined_and_orphaned_files_through_their_channel(data_dir: Path) -> None:
    from intu_core.testing import running_engine

    state = RecoverState(data_dir)
    quarantined = data_dir / "quarantine" / "2026-01-02" / "inbound" / "a.txt"
    orphan = data_dir / "spool" / "inbound" / "b.txt"
    junk = data_dir / "quarantine" / "2026-01-02" / "inbound" / "c.txt"
    gone = data_dir / "quarantine" / "2026-01-02" / "old-channel" / "d.txt"
    for path, text in ((quarantined, "first"), (orphan, "second"), (junk, "junk"), (gone, "fourth")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    dry = run(data_dir, "recover", "--dry-run", obj=state)
    assert dry.exit_code == 1, dry.output  # two files cannot be recovered: said, with why
    assert "1 spooled file(s) no queued message refers to would be recovered" in dry.output
    assert "1 quarantined file(s) would be queued" in dry.output
    assert f"{junk}: left in quarantine: cannot rebuild its message: not a message file" in dry.output
    assert f"{gone}: left in quarantine: no channel named 'old-channel'" in dry.output
    assert quarantined.exists() and orphan.exists() and not (data_dir / DB_NAME).exists()

    result = run(data_dir, "recover", obj=state)
    assert result.exit_code == 1, result.output
    assert "moved 1 spooled file(s)" in result.output and "2 file(s) queued" in result.output
    assert junk.exists() and gone.exists() and not quarantined.exists()
    with SqliteQueueStore(data_dir) as store:
        entries = store.list_entries(queue=channel_queue("inbound"))
    assert sorted(e.message.body["text"] for e in entries) == ["first", "second"]
    assert all(Path(e.message.files[0]).parent == data_dir / "spool" / "inbound" for e in entries)

    # The engine runs them through the channel (its replay worker) to the destination.
    with running_engine(state.root, state.registry()) as engine:
        assert wait_for(lambda: len(list((state.root / "out").glob("*"))) == 2)
        stats = {s.queue: s for s in engine.store.stats()}
    assert stats["archive"].delivered == 2 and stats[channel_queue("inbound")].depth == 0
    assert sorted(json.loads(p.read_text())["body"]["text"] for p in (state.root / "out").glob("*")) == [
        "first",
        "second",
    ]
    assert not list((data_dir / "spool" / "inbound").glob("*"))  # delivered: released


def test_recover_while_serve_runs_leaves_the_spool_alone(data_dir: Path) -> None:
    from intu_core.testing import running_engine

    state = RecoverState(data_dir)
    quarantined = data_dir / "quarantine" / "2026-01-02" / "inbound" / "a.txt"
    quarantined.parent.mkdir(parents=True)
    quarantined.write_text("first")
    with running_engine(state.root, state.registry()):
        receiving = data_dir / "spool" / "inbound" / "being-received.txt"
        receiving.parent.mkdir(parents=True)
        receiving.write_text("a source wrote it and has not handed it over yet")
        result = run(data_dir, "recover", obj=state)
        assert result.exit_code == 0, result.output
        assert "intu serve is running" in result.output and "1 file(s) queued" in result.output
        assert receiving.exists()
        assert wait_for(lambda: len(list((state.root / "out").glob("*"))) == 1)
        receiving.unlink()


def test_recover_refuses_a_damaged_queue(data_dir: Path, filled: dict[str, str]) -> None:
    state = RecoverState(data_dir)
    (data_dir / DB_NAME).write_bytes(b"junk" * 2000)
    result = run(data_dir, "recover", obj=state)
    assert result.exit_code == 1 and "is damaged" in result.output and "move it aside" in result.output


def wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
