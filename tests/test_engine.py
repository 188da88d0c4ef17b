"""The engine's hand-over: durable queues, back-pressure, file ownership and graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from project_files import fake_distribution, wait_for, write

from intu_core import hookimpl
from intu_core.engine import QueueDepth
from intu_core.message import AcceptanceStatus, Message
from intu_core.queue import EntryState
from intu_core.queue.sqlite import SqliteQueueStore
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine


def queued_project(tmp_path, directory="out", extra=""):
    write(
        tmp_path / "intu.yaml",
        f"""
        destinations:
          archive:
            type: file
            file: {{directory: {directory}}}
            queue: {{enabled: true, threads: 1, max_size: 2}}
            retry: {{max_attempts: 0, backoff: constant, initial_delay_ms: 50, max_delay_ms: 50}}
        {extra}
        """,
    )
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        "source: {type: manual}\ndestinations: [archive]\n",
    )
    return tmp_path


def test_accepted_means_queued_durably_then_delivered_and_files_released(tmp_path):
    attachment = tmp_path / "attachment.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(queued_project(tmp_path), registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body={"n": 1}, files=(str(attachment),)))
        assert result.status is AcceptanceStatus.ACCEPTED
        assert wait_for(lambda: list((tmp_path / "out").glob("*.json")))
        assert wait_for(lambda: engine.store.size("archive") == 0)
        # The message's file was kept while queued and deleted once delivered.
        assert wait_for(lambda: not attachment.exists())
    (written,) = (tmp_path / "out").glob("*.json")
    assert json.loads(written.read_text())["body"] == {"n": 1}


def test_a_full_queue_answers_busy_and_keeps_what_it_accepted(tmp_path):
    # "out" is a file, so the destination cannot write: entries stay queued and the queue fills up.
    queued_project(tmp_path, directory="blocked/out")
    (tmp_path / "blocked").write_text("not a folder")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        results = [engine_deliver(engine, "inbound", Message(body={"n": n})) for n in range(3)]
        assert [r.status for r in results] == [AcceptanceStatus.ACCEPTED] * 2 + [AcceptanceStatus.BUSY]
        assert "queue archive is full (2 messages)" in results[2].detail
        assert engine.store.size("archive") == 2
        kept = engine.store.list_entries(queue="archive")
        assert sorted(e.message.body["n"] for e in kept) == [0, 1]
        assert all("cannot write to" in (e.last_error or "") for e in kept if e.attempts)


def test_a_nearly_full_disk_answers_busy_and_releases_the_files(tmp_path):
    queued_project(tmp_path, extra="min_free_disk_mb: 1000000000")
    attachment = tmp_path / "attachment.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body={}, files=(str(attachment),)))
    assert result.status is AcceptanceStatus.BUSY and "disk nearly full" in result.detail
    assert not attachment.exists()


def test_queued_messages_survive_a_restart(tmp_path):
    queued_project(tmp_path, directory="blocked/out")
    (tmp_path / "blocked").write_text("not a folder")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        assert engine_deliver(engine, "inbound", Message(body={"n": 7})).ok
    (tmp_path / "blocked").unlink()  # the destination is fixed while the engine is down
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        assert wait_for(lambda: list((tmp_path / "blocked" / "out").glob("*.json")))
        assert wait_for(lambda: engine.store.size("archive") == 0)


def test_errored_messages_are_kept_with_their_files(tmp_path):
    queued_project(tmp_path)
    write(
        tmp_path / "channels" / "inbound" / "transformer.py",
        "def transform(msg, ctx):\n    raise KeyError('x')\n",
    )
    attachment = tmp_path / "attachment.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body={}, files=(str(attachment),)))
        (entry,) = engine.store.list_entries(state=EntryState.ERRORED)
    assert result.status is AcceptanceStatus.FAILED
    assert attachment.exists() and entry.message.files == (str(attachment),)


def test_intu_serve_stops_gracefully_on_sigterm(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "intu-testing", "0.0", {"manual": "intu_core.testing:manual_source"})
    queued_project(tmp_path / "project")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "intu_core.cli", "--dir", str(tmp_path / "project"), "serve"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "intu is serving" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "received SIGTERM: stopping" in rest and "engine stopped" in rest


def test_two_engines_cannot_share_a_data_folder(tmp_path):
    import pytest

    from intu_core.config.problems import ConfigError

    queued_project(tmp_path)
    with running_engine(tmp_path, registry_with(manual_source)):
        with pytest.raises(ConfigError, match="another intu engine is already using"):
            with running_engine(tmp_path, registry_with(manual_source)):
                pass


def test_a_retried_errored_message_runs_through_the_fixed_channel(tmp_path):
    """A transformer bug errors a message; after the fix, `intu queue retry` re-runs it."""
    queued_project(tmp_path)
    transformer = tmp_path / "channels" / "inbound" / "transformer.py"
    write(transformer, "def transform(msg, ctx):\n    raise KeyError('not yet')\n")
    attachment = tmp_path / "attachment.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body={"n": 9}, files=(str(attachment),)))
        (entry,) = engine.store.list_entries(state=EntryState.ERRORED)
    assert result.status is AcceptanceStatus.FAILED
    write(transformer, "def transform(msg, ctx):\n    return msg.replace(body={**msg.body, 'fixed': True})\n")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        assert engine.store.retry(entry_ids=[entry.id], state=None) == 1
        engine.workers["channel:inbound"].notify()
        assert wait_for(lambda: list((tmp_path / "out").glob("*.json")))
        assert wait_for(lambda: not attachment.exists())  # released once delivered
        assert engine.store.list_entries() == []
    (written,) = (tmp_path / "out").glob("*.json")
    assert json.loads(written.read_text())["body"] == {"n": 9, "fixed": True}


def test_a_retried_message_that_errors_again_is_kept_as_dead(tmp_path):
    queued_project(tmp_path)
    write(
        tmp_path / "channels" / "inbound" / "transformer.py",
        "def transform(msg, ctx):\n    raise KeyError('still')\n",
    )
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        engine_deliver(engine, "inbound", Message(body={}))
        (entry,) = engine.store.list_entries(state=EntryState.ERRORED)
        engine.store.retry(entry_ids=[entry.id], state=None)
        engine.workers["channel:inbound"].notify()
        assert wait_for(lambda: engine.store.list_entries(state=EntryState.DEAD))
        (dead,) = engine.store.list_entries(state=EntryState.DEAD)
    assert "KeyError: 'still'" in dead.last_error


def test_a_transformer_that_builds_a_new_message_keeps_the_received_files(tmp_path):
    queued_project(tmp_path, directory="blocked/out")
    (tmp_path / "blocked").write_text("not a folder")  # keep it queued
    write(
        tmp_path / "channels" / "inbound" / "transformer.py",
        "from intu_core import Message\n"
        "def transform(msg, ctx):\n    return Message(body={'new': True}, channel=msg.channel)\n",
    )
    attachment = tmp_path / "attachment.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        assert engine_deliver(engine, "inbound", Message(body={}, files=(str(attachment),))).ok
        (entry,) = engine.store.list_entries(queue="archive")
    assert attachment.exists() and entry.message.files == (str(attachment),)


def test_files_of_queued_outputs_are_kept_and_those_only_an_unqueued_send_used_are_released(tmp_path):
    # The engine knows what the entries it just committed hold, so it asks the store only about
    # the rest: here a file that a destination's transformer added for an unqueued destination.
    queued_project(tmp_path, directory="blocked/out")
    (tmp_path / "blocked").write_text("not a folder")  # keep it queued
    with (tmp_path / "intu.yaml").open("a") as config:
        config.write("  copies:\n    type: file\n    file: {directory: copies}\n")
        config.write("    queue: {enabled: false}\n")
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        "source: {type: manual}\ndestinations: [archive, {name: copies, transformer: add_file.py}]\n",
    )
    write(
        tmp_path / "channels" / "inbound" / "add_file.py",
        """
        def transform(msg, ctx):
            with open(msg.body["extra"], "w") as extra:
                extra.write("made for the copy")
            return msg.replace(files=(*msg.files, msg.body["extra"]))
        """,
    )
    attachment, extra = tmp_path / "attachment.bin", tmp_path / "extra.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        message = Message(body={"extra": str(extra)}, files=(str(attachment),))
        assert engine_deliver(engine, "inbound", message).status is AcceptanceStatus.ACCEPTED
        (entry,) = engine.store.list_entries(queue="archive")
        assert entry.message.files == (str(attachment),)
        assert attachment.exists(), "held by the queued entry"
        assert not extra.exists(), "used by the unqueued send only: released"
        assert list((tmp_path / "copies").glob("*.json"))


def test_sends_to_an_unqueued_destination_are_counted_like_queued_ones(tmp_path):
    write(
        tmp_path / "intu.yaml",
        """
        destinations:
          copies:
            type: file
            file: {directory: copies}
            queue: {enabled: false}
          refused:
            type: file
            file: {directory: blocked/out}
            queue: {enabled: false}
        """,
    )
    (tmp_path / "blocked").write_text("not a folder")  # every send to "refused" fails
    write(tmp_path / "channels" / "ok" / "channel.yaml", "source: {type: manual}\ndestinations: [copies]\n")
    write(tmp_path / "channels" / "ko" / "channel.yaml", "source: {type: manual}\ndestinations: [refused]\n")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        for n in range(3):
            assert engine_deliver(engine, "ok", Message(body={"n": n})).status is AcceptanceStatus.ACCEPTED
        assert engine_deliver(engine, "ko", Message(body={"n": 9})).status is AcceptanceStatus.BUSY
        snapshot = engine.metrics.collect()
    assert len(list((tmp_path / "copies").glob("*.json"))) == 3
    assert snapshot.value("intu_messages_delivered_total", destination="copies") == 3
    assert snapshot.value("intu_delivery_seconds_count", destination="copies") == 3
    # A failed unqueued send is the sender's to retry: timed, not delivered.
    assert snapshot.value("intu_messages_delivered_total", destination="refused") == 0
    assert snapshot.value("intu_delivery_seconds_count", destination="refused") == 1


def test_queue_depth_is_counted_again_at_the_limit_and_when_stale(tmp_path):
    store = SqliteQueueStore(tmp_path / "data")
    other = SqliteQueueStore(tmp_path / "data")  # `intu queue retry` in another process
    counts: list[str] = []
    size = store.size
    store.size = lambda queue: counts.append(queue) or size(queue)  # type: ignore[method-assign]
    try:
        depth = QueueDepth(store, "archive", recount_s=3600.0)
        assert not depth.full(3) and counts == ["archive"]
        for n in range(2):
            store.enqueue([("archive", Message(body={"n": n}))])
            depth.added(1)
        assert not depth.full(3) and counts == ["archive"], "below the limit: not counted again"
        store.enqueue([("archive", Message(body={"n": 2}))])
        depth.added(1)
        assert depth.full(3) and len(counts) == 2, "a refusal is decided on a fresh count"
        store.purge("archive")
        assert not depth.full(3) and len(counts) == 3, "delivered meanwhile: counted again, room"
        # Entries another process adds are seen once the count is stale.
        other.enqueue([("archive", Message(body={"n": n})) for n in range(3)])
        assert not depth.full(3), "within recount_s: the estimate"
        depth.recount_s = 0.0
        assert depth.full(3)
    finally:
        store.close()
        other.close()


def test_files_left_in_the_spool_by_a_crash_are_quarantined_at_start(tmp_path, caplog):
    queued_project(tmp_path, directory="blocked/out")
    (tmp_path / "blocked").write_text("not a folder")
    spool = tmp_path / "data" / "spool" / "inbound"
    spool.mkdir(parents=True)
    kept, orphan = spool / "kept.dcm", spool / "orphan.dcm"
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        kept.write_bytes(b"received while the engine ran, then queued")
        assert engine_deliver(engine, "inbound", Message(body={}, files=(str(kept),))).ok
    orphan.write_bytes(b"written, then the engine died before queueing it")
    with running_engine(tmp_path, registry_with(manual_source)):
        pass
    # Moved aside, never deleted: a lost queue database would make every file look like this one.
    [moved] = (tmp_path / "data" / "quarantine").glob("*/inbound/orphan.dcm")
    assert kept.exists() and not orphan.exists() and moved.read_bytes().startswith(b"written")
    [line] = [r for r in caplog.records if "quarantine" in r.getMessage()]
    assert line.levelname == "WARNING" and "moved 1 file(s)" in line.getMessage()
    assert "intu queue recover" in line.getMessage()


def test_the_data_folder_and_queue_are_private_and_tightened_at_start(tmp_path, caplog):
    queued_project(tmp_path)
    with running_engine(tmp_path, registry_with(manual_source)):
        pass
    data = tmp_path / "data"
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "queue.db").stat().st_mode & 0o777 == 0o600
    assert not [r for r in caplog.records if "private" in r.getMessage()]
    data.chmod(0o755)
    (data / "queue.db").chmod(0o644)
    with running_engine(tmp_path, registry_with(manual_source)):
        pass
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "queue.db").stat().st_mode & 0o777 == 0o600
    lines = [r.getMessage() for r in caplog.records if "private" in r.getMessage()]
    assert len(lines) == 2 and "was 755" in lines[0] and "was 644" in lines[1], lines


@pytest.mark.parametrize("damage", ["header", "page"])
def test_a_damaged_queue_database_stops_the_start_and_keeps_every_file(tmp_path, damage):
    from intu_core.queue import QueueDamaged

    queued_project(tmp_path, directory="blocked/out")
    (tmp_path / "blocked").write_text("not a folder")  # nothing is delivered: the files stay queued
    files = []
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        for n in range(2):
            path = tmp_path / "data" / "spool" / "inbound" / f"{n}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            assert engine_deliver(engine, "inbound", Message(body={}, files=(str(path),))).ok
            files.append(path)
    db = tmp_path / "data" / "queue.db"
    with open(db, "r+b") as f:
        f.seek(0 if damage == "header" else 4096)  # the header, or the first page after it
        f.write(b"junk, not what SQLite wrote" * 100)
    with pytest.raises(QueueDamaged, match="is damaged .*intu queue recover"):
        with running_engine(tmp_path, registry_with(manual_source)):
            pass
    assert all(p.exists() for p in files)
    assert not (tmp_path / "data" / "quarantine").exists()


def test_a_destination_that_cannot_be_created_is_a_configuration_error(tmp_path):
    import pytest

    from intu_core.config.problems import ConfigError
    from intu_core.types import DestinationType

    def refuse(settings, runtime):
        raise ValueError("cannot load /etc/pacs-ca.pem: no certificate in it")

    broken = SimpleNamespace(
        intu_destination_types=hookimpl(
            lambda: [DestinationType("broken", lambda section: section.done(), refuse)]
        ),
        __name__="broken_plugin",
    )
    write(tmp_path / "intu.yaml", "destinations:\n  pacs:\n    type: broken\n    broken: {}\n")
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml", "source: {type: manual}\ndestinations: [pacs]\n"
    )
    with pytest.raises(ConfigError, match="destinations.pacs: cannot create the destination: cannot load"):
        with running_engine(tmp_path, registry_with(manual_source, broken)):
            pass
    # The data folder is not left locked.
    with pytest.raises(ConfigError):
        with running_engine(tmp_path, registry_with(manual_source, broken)):
            pass
