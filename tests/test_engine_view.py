"""The read-only view of the engine that the lifecycle hooks are given."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from project_files import write

from intu_core import EngineView, Message, hookimpl
from intu_core import view as view_module
from intu_core.history import MessageQuery
from intu_core.queue import QueueStats, QueueUnavailable
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine
from intu_core.view import CONCURRENT_READS, ChannelState, ChannelView, DestinationView


def project(tmp_path):
    write(
        tmp_path / "intu.yaml",
        """
        destinations:
          archive: {type: file, file: {directory: out}, queue: {threads: 1}}
          audit: {type: log, queue: {enabled: false}}
        """,
    )
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        "source: {type: manual}\ndestinations: [archive, audit]\n",
    )
    write(
        tmp_path / "channels" / "off" / "channel.yaml",
        "enabled: false\nsource: {type: manual}\ndestinations: [audit]\n",
    )
    return tmp_path


def test_the_lifecycle_hooks_get_a_view_of_channels_destinations_queues_and_metrics(tmp_path):
    seen: dict[str, object] = {}

    @hookimpl
    def intu_engine_started(engine: EngineView) -> None:
        seen["started"] = engine
        seen["channels at start"] = engine.channels()

    @hookimpl
    def intu_engine_stopping(engine: EngineView) -> None:
        seen["channels when stopping"] = engine.channels()
        seen["stats"] = engine.queue_stats()
        seen["delivered"] = engine.metrics().value("intu_messages_received_total", channel="inbound")

    watcher = SimpleNamespace(
        intu_engine_started=intu_engine_started, intu_engine_stopping=intu_engine_stopping, __name__="watcher"
    )
    with running_engine(project(tmp_path), registry_with(manual_source, watcher)) as engine:
        engine_deliver(engine, "inbound", Message(body={"n": 1}))

    view = seen["started"]
    assert isinstance(view, EngineView) and view is engine.view
    assert view.data_dir == tmp_path / "data"
    running = ChannelView("inbound", "manual", ChannelState.RUNNING, ("archive", "audit"))
    assert seen["channels at start"] == (running,)  # disabled channels are not in the engine
    assert seen["channels when stopping"] == (running,)  # sources stop after the hook
    assert view.channels() == (ChannelView("inbound", "manual", ChannelState.STOPPED, ("archive", "audit")),)
    assert view.destinations() == (
        DestinationView("archive", "file", True),
        DestinationView("audit", "log", False),
    )
    stats = seen["stats"]
    assert isinstance(stats, list) and all(isinstance(s, QueueStats) for s in stats)
    assert seen["delivered"] == 1


def test_a_view_of_an_engine_not_built_yet_is_empty(tmp_path):
    from intu_core.config.project import load_project
    from intu_core.engine import Engine

    registry = registry_with(manual_source)
    view = Engine(load_project(project(tmp_path), registry), registry).view
    assert view.channels() == () and view.destinations() == () and view.queue_stats() == []
    assert view.settings("metrics") is None


def test_a_channel_says_whether_its_listener_is_bound_when_its_source_listens(tmp_path):
    from intu_core.testing import ManualSource
    from intu_core.types import SourceType

    class ListeningSource(ManualSource):
        """A source with the optional ``listening()`` of a source that listens on a port."""

        bound = True

        def listening(self) -> bool:
            return self.bound and not self.stopped

    plugin = SimpleNamespace(
        intu_source_types=hookimpl(
            lambda: [SourceType("listening", lambda section: section.done(), ListeningSource, "A test.")]
        ),
        __name__="listening_source",
    )
    write(tmp_path / "intu.yaml", "destinations:\n  audit: {type: log, queue: {enabled: false}}\n")
    for name, source in (("ears", "listening"), ("hands", "manual")):
        channel = f"source: {{type: {source}}}\ndestinations: [audit]\n"
        write(tmp_path / "channels" / name / "channel.yaml", channel)
    with running_engine(tmp_path, registry_with(manual_source, plugin)) as engine:
        listening = {c.name: c.listening for c in engine.view.channels()}
        assert listening == {"ears": True, "hands": None}  # a source without listening(): None
        ListeningSource.bound = False
        assert {c.name: c.listening for c in engine.view.channels()}["ears"] is False


class _SlowStore:
    """A queue store whose searches wait until released, counting how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = self.most = 0
        self._lock = threading.Lock()

    def find_messages(self, query: MessageQuery) -> list[object]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(30)
        with self._lock:
            self.running -= 1
        return []


def test_a_burst_of_plugin_reads_runs_a_few_at_a_time(monkeypatch) -> None:
    """A dashboard or script asking many slow searches at once must not take every connection of
    the queue store (PostgreSQL's pool is shared with the enqueues C-STOREs wait for): at most
    CONCURRENT_READS run, the others wait their turn, and past READ_WAIT_S a read is refused."""
    store = _SlowStore()
    view = EngineView(SimpleNamespace(store=store))  # type: ignore[arg-type]
    results: list[object] = []
    search = lambda: results.append(view.find_messages(MessageQuery()))  # noqa: E731
    readers = [threading.Thread(target=search) for _ in range(6)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 30
    while store.running < CONCURRENT_READS and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.setattr(view_module, "READ_WAIT_S", 0.05)
    with pytest.raises(QueueUnavailable, match="reads of the queue"):
        view.journey("x")  # no turn within READ_WAIT_S: refused, not queued for ever
    store.release.set()
    for reader in readers:
        reader.join(30)
    assert results == [[]] * 6 and store.most == CONCURRENT_READS
