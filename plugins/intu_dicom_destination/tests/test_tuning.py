"""The latency tuning of pooled associations (internals.py, scu/pool.py) and the forked send workers
(cli/workers.py)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from intu_dicom_destination import internals
from intu_dicom_destination.cli import workers as parallel
from intu_dicom_destination.cli.send import _meta, run_send
from intu_dicom_destination.scu import pool
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.shared.logs import quiet_pynetdicom

from intu_core.message import SendStatus


def settings_for(peer, **kw) -> DestinationSettings:
    base = DestinationSettings(
        host="127.0.0.1",
        port=peer.port,
        called_ae_title=peer.ae_title,
        timeout_ms=10000,
        idle_timeout_ms=5000,
    )
    return replace(base, **kw)


def _pooled(sender: DicomSender):
    return sender.pool.idle()


def test_pooled_association_is_parked_and_idles_at_the_default_poll(scp_factory, ct_files):
    scp = scp_factory()
    sender = DicomSender(settings_for(scp))
    try:
        for path in ct_files(3):
            assert sender.send_file(path).status is SendStatus.SUCCESS
        (pooled,) = _pooled(sender)
        assoc = pooled.assoc
        assert internals.is_parked(assoc)
        assert assoc._reactor_checkpoint.parked()  # the reactor thread waits in the gate
        assert assoc.dul._run_loop_delay == pool.IDLE_DUL_DELAY  # back in the pool: not busy
        assert len(scp.associations) == 1  # reused throughout
    finally:
        sender.close()
    # close() unparks before releasing: the association's reactor thread ends.
    assoc.join(5)
    assert not assoc.is_alive()
    assert not assoc.dul.is_alive()


def test_parked_association_aborted_by_the_peer_while_idle_is_replaced(scp_factory, ct_files):
    scp = scp_factory()
    sender = DicomSender(settings_for(scp))
    try:
        first, second = ct_files(2)
        assert sender.send_file(first).delivered
        (pooled,) = _pooled(sender)
        for assoc in scp.server.active_associations:
            assoc.abort()
        deadline = time.monotonic() + 3
        while internals.healthy(pooled.assoc) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The parked reactor did not notice; our own check at checkout does.
        assert not internals.healthy(pooled.assoc)
        assert sender.send_file(second).status is SendStatus.SUCCESS
        assert len(scp.associations) == 2
    finally:
        sender.close()
    pooled.assoc.join(5)
    assert not pooled.assoc.is_alive()


def test_quiet_pynetdicom_keeps_its_per_instance_info_lines_out(monkeypatch):
    pn = logging.getLogger("pynetdicom")
    monkeypatch.setattr(pn, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    quiet_pynetdicom()
    assert pn.level == logging.WARNING
    # At debug level they stay.
    monkeypatch.setattr(pn, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    quiet_pynetdicom()
    assert pn.level == logging.NOTSET


@pytest.mark.parametrize(
    ("associations", "files", "cpus", "shares"),
    [
        (1, 100, 2, [1]),
        (2, 100, 2, [1, 1]),
        (3, 100, 2, [2, 1]),
        (4, 100, 2, [2, 2]),
        (8, 1, 4, [8]),
        (2, 5, 1, [2]),
    ],
)
def test_plan(associations, files, cpus, shares):
    assert parallel.plan(associations, files, cpus) == shares


def _items(paths: list[Path]):
    out = []
    for path in paths:
        meta = _meta(path)
        assert not isinstance(meta, str)
        out.append((path, meta))
    return out


def test_forked_workers_send_everything_and_report_each_file(storescp, ct_files):
    peer = storescp()
    files = ct_files(12)
    reported: dict[int, SendStatus] = {}
    parallel.send_all(
        settings_for(peer, max_associations=2),
        _items(files),
        lambda i, status, detail: reported.__setitem__(i, status),
        processes=True,
        cpus=2,
    )
    assert reported == {i: SendStatus.SUCCESS for i in range(12)}
    deadline = time.monotonic() + 10
    while len(list(peer.folder.glob("*"))) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(peer.folder.glob("*"))) == 12


def test_a_worker_that_dies_leaves_its_files_failed_not_lost(storescp, ct_files, monkeypatch):
    peer = storescp()
    files = ct_files(6)
    real = parallel._send_threads

    def dies_in_the_second_worker(settings, items, report):
        if items and items[0][0] == 1:  # the worker that got file 1 (interleaved: 1, 3, 5)
            os._exit(3)
        real(settings, items, report)

    monkeypatch.setattr(parallel, "_send_threads", dies_in_the_second_worker)
    reported: dict[int, tuple[SendStatus, str]] = {}
    parallel.send_all(
        settings_for(peer, max_associations=2),
        _items(files),
        lambda i, status, detail: reported.__setitem__(i, (status, detail)),
        processes=True,
        cpus=2,
    )
    assert sorted(reported) == list(range(6))
    assert {i for i, (s, _) in reported.items() if s is SendStatus.SUCCESS} == {0, 2, 4}
    for i in (1, 3, 5):
        status, detail = reported[i]
        assert status is SendStatus.RETRYABLE and "exit code 3" in detail


def test_run_send_summary_with_several_associations(storescp, ct_files, capsys):
    import io

    peer = storescp()
    files = ct_files(9)
    (files[0].parent / "notes.txt").write_text("not DICOM")
    out = io.StringIO()
    code = run_send(settings_for(peer), [files[0].parent], out, progress=False, associations=2)
    text = out.getvalue()
    assert code == 0, text
    assert "sent 9 of 9" in text and "9 ok" in text and "1 non-DICOM files skipped" in text


def test_an_association_idle_for_a_while_polls_slowly_and_still_sends(scp_factory, ct_files, monkeypatch):
    monkeypatch.setattr(pool, "DEEP_IDLE_AFTER", 0.1)
    scp = scp_factory()
    sender = DicomSender(settings_for(scp))
    try:
        first, second = ct_files(2)
        assert sender.send_file(first).delivered
        (pooled,) = _pooled(sender)
        deadline = time.monotonic() + 3
        while pooled.assoc.dul._run_loop_delay != pool.DEEP_IDLE_DUL_DELAY and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pooled.assoc.dul._run_loop_delay == pool.DEEP_IDLE_DUL_DELAY
        assert sender.send_file(second).status is SendStatus.SUCCESS
        assert len(scp.associations) == 1
        (again,) = _pooled(sender)
        assert again is pooled and not again.deep_idle
    finally:
        sender.close()
