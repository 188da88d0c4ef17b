"""Shared by the DICOM plugin's tests: a stand-in for the engine and in-process DICOM sources on
real sockets, and a fix for a pynetdicom race that test SCUs would otherwise hit.

pynetdicom's requestor has a race in pausing its reactor that the source's fast answers expose
(see ``internals.pause_reactor``): every ``send_c_store`` of the tests waits for a truly paused
reactor first. intu's own SCU parks its reactor and is not affected."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from intu_dicom_destination import internals
from intu_dicom_destination.scp.settings import SourceSettings
from intu_dicom_destination.scp.source import DicomSource
from intu_dicom_destination.testing import RecordingEngine, free_port
from pynetdicom.association import Association

from intu_core.types import Runtime


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def start_source(tmp_path: Path, engine: RecordingEngine) -> Iterator[Callable[..., DicomSource]]:
    """``start_source(logger_name, **settings)``: a started DICOM source on 127.0.0.1 and a free
    port, delivering to ``engine``; stopped after the test."""
    started: list[DicomSource] = []

    def make(logger_name: str, **kw: Any) -> DicomSource:
        settings = SourceSettings(**{"port": free_port(), "host": "127.0.0.1", **kw})
        runtime = Runtime("dicom-router", tmp_path / "data", logging.getLogger(logger_name))
        src = DicomSource(settings, runtime)
        src.start(engine.deliver)
        started.append(src)
        return src

    yield make
    for src in started:
        src.stop()


@pytest.fixture(autouse=True)
def _c_store_waits_for_a_paused_reactor(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    send = Association.send_c_store

    def send_c_store(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.is_established and self.is_requestor:
            internals.pause_reactor(self)
        return send(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", send_c_store)
    yield
