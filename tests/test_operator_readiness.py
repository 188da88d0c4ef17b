"""Operator actions on a running engine (``EngineView.operator()``) and its readiness
(``EngineView.ready()``), in-process with the ``manual`` source and a destination a test controls."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from project_files import wait_for, write

from intu_core import DestinationType, Message, SendResult, hookimpl
from intu_core.config.section import Section
from intu_core.queue import EntryState
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine


class Gate:
    """A destination that refuses (permanently) until a test opens it: a PACS that said no."""

    open = threading.Event()
    sent: list[str] = []

    def __init__(self, settings: Any, runtime: Any) -> None:
        pass

    def send(self, message: Message) -> SendResult:
        if not Gate.open.is_set():
            return SendResult.permanent("refused by the test", code=0xC000)
        Gate.sent.append(message.id)
        return SendResult.success()

    def close(self) -> None:
        pass


def _parse(section: Section) -> None:
    section.done()


@hookimpl
def intu_destination_types() -> list[DestinationType]:
    return [DestinationType("gate", _parse, Gate, "refuses until opened")]


gate_plugin = SimpleNamespace(intu_destination_types=intu_destination_types, __name__="gate_plugin")


class Listener:
    """A source that listens (``listening()``) until a test says it stopped."""

    bound = True

    def __init__(self, settings: Any, runtime: Any) -> None:
        pass

    def start(self, deliver: Any) -> None:
        pass

    def stop(self) -> None:
        pass

    def listening(self) -> bool:
        return Listener.bound


@hookimpl
def intu_source_types() -> list[Any]:
    from intu_core import SourceType

    return [SourceType("listener", _parse, Listener, "listens until told otherwise")]


listener_plugin = SimpleNamespace(intu_source_types=intu_source_types, __name__="listener_plugin")


def project(tmp_path: Path, *, min_free_disk_mb: int = 0, source: str = "manual") -> Path:
    write(
        tmp_path / "intu.yaml",
        f"""
        min_free_disk_mb: {min_free_disk_mb}
        destinations:
          pacs: {{type: gate, retry: {{max_attempts: 1}}, queue: {{threads: 1}}}}
        """,
    )
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        f"source: {{type: {source}}}\ndestinations: [pacs]\n",
    )
    return tmp_path


def test_retry_puts_a_dead_letter_back_and_wakes_its_workers(tmp_path: Path) -> None:
    Gate.open.clear()
    Gate.sent.clear()
    with running_engine(project(tmp_path), registry_with(manual_source, gate_plugin)) as engine:
        view = engine.view
        message = Message(body={"n": 1})
        engine_deliver(engine, "inbound", message)
        assert wait_for(lambda: view.entries(state=EntryState.DEAD))
        (dead,) = view.entries(state=EntryState.DEAD)
        assert dead.queue == "pacs" and dead.message.id == message.id and view.entry(dead.id) == dead

        assert view.operator().retry(["no-such-entry"]) == 0
        Gate.open.set()
        assert view.operator().retry([dead.id]) == 1
        # Woken at once (not on the next poll): delivered, and the entry is gone.
        assert wait_for(lambda: Gate.sent == [message.id])
        assert wait_for(lambda: view.entry(dead.id) is None)
        assert view.operator().retry([dead.id]) == 0  # delivered: nothing to retry


def test_purge_deletes_a_dead_letter(tmp_path: Path) -> None:
    Gate.open.clear()
    with running_engine(project(tmp_path), registry_with(manual_source, gate_plugin)) as engine:
        view = engine.view
        engine_deliver(engine, "inbound", Message(body={"n": 2}))
        assert wait_for(lambda: view.entries(state=EntryState.DEAD))
        (dead,) = view.entries(state=EntryState.DEAD)
        assert view.operator().purge([dead.id]) == 1
        assert view.entry(dead.id) is None
        assert view.operator().purge([dead.id]) == 0


def test_ready_when_running_and_why_not_when_the_disk_is_below_its_reserve(tmp_path: Path) -> None:
    with running_engine(project(tmp_path / "ok"), registry_with(manual_source, gate_plugin)) as engine:
        assert engine.view.ready() == []
    huge = 1 << 40  # MiB: more than any disk has
    with running_engine(
        project(tmp_path / "full", min_free_disk_mb=huge), registry_with(manual_source, gate_plugin)
    ) as engine:
        (problem,) = engine.view.ready()
        assert problem.startswith("disk nearly full: ") and f"below min_free_disk_mb={huge}" in problem


def test_not_ready_when_a_listener_is_not_listening_or_the_engine_stops(tmp_path: Path) -> None:
    Listener.bound = True
    registry = registry_with(listener_plugin, gate_plugin)
    with running_engine(project(tmp_path, source="listener"), registry) as engine:
        assert engine.view.ready() == []
        Listener.bound = False
        assert engine.view.ready() == ["channel inbound: its listener source is not listening"]
    assert engine.view.ready() == ["the engine is stopping"]
