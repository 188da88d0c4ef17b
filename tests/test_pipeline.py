"""The stages of a channel: filters, transformers, and failures that stay with one message."""

from __future__ import annotations

import json
import logging

from project_files import write

from intu_core.message import AcceptanceStatus, Message
from intu_core.queue import EntryState
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine

ROOT = """
    destinations:
      archive:
        type: file
        file: {directory: out}
        queue: {enabled: false}
      copies:
        type: file
        file: {directory: copies}
        queue: {enabled: false}
"""

CHANNEL = """
    name: inbound
    source: {type: manual}
    destinations:
      - archive
      - name: copies
        filter: only_copies.py
        transformer: mark_copy.py
"""

TRANSFORMER = """
    def transform(msg, ctx):
        if msg.body.get("explode"):
            raise ValueError("cannot handle this one")
        if msg.body.get("garbage"):
            return {"not": "a message"}
        if msg.body.get("drop"):
            return None
        ctx.logger.info("transforming %s in %s", ctx.message_id, ctx.channel)
        return msg.replace(body={**msg.body, "seen_by": ctx.channel})
"""


def make_project(tmp_path):
    write(tmp_path / "intu.yaml", ROOT)
    folder = tmp_path / "channels" / "inbound"
    write(folder / "channel.yaml", CHANNEL)
    write(folder / "transformer.py", TRANSFORMER)
    write(folder / "only_copies.py", "def filter(msg, ctx):\n    return msg.body.get('copy', False)\n")
    write(
        folder / "mark_copy.py",
        "def transform(msg, ctx):\n"
        "    return msg.replace(body={**msg.body, 'destination': ctx.destination})\n",
    )
    return tmp_path


def written(folder):
    return (
        [json.loads(p.read_text())["body"] for p in sorted(folder.glob("*.json"))] if folder.exists() else []
    )


def test_stages_run_in_order_with_context(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with running_engine(make_project(tmp_path), registry_with(manual_source)) as engine:
        plain = engine_deliver(engine, "inbound", Message(body={"n": 1}))
        copied = engine_deliver(engine, "inbound", Message(body={"n": 2, "copy": True}))
    assert plain.status is AcceptanceStatus.ACCEPTED and copied.status is AcceptanceStatus.ACCEPTED
    assert sorted(b["n"] for b in written(tmp_path / "out")) == [1, 2]
    assert all(b["seen_by"] == "inbound" for b in written(tmp_path / "out"))
    (copy,) = written(tmp_path / "copies")
    assert copy == {"n": 2, "copy": True, "seen_by": "inbound", "destination": "copies"}
    assert "transforming" in caplog.text


def test_a_transformer_that_raises_errors_that_message_only(tmp_path, caplog):
    with running_engine(make_project(tmp_path), registry_with(manual_source)) as engine:
        bad = engine_deliver(engine, "inbound", Message(body={"explode": True}))
        good = engine_deliver(engine, "inbound", Message(body={"n": 3}))
        kept = engine.store.list_entries(state=EntryState.ERRORED)
    assert bad.status is AcceptanceStatus.FAILED
    assert "transformer.py:transform: ValueError: cannot handle this one" in bad.detail
    assert good.status is AcceptanceStatus.ACCEPTED
    assert [b["n"] for b in written(tmp_path / "out")] == [3]
    (entry,) = kept
    assert entry.message.body == {"explode": True}
    assert "Traceback" in entry.last_error and "cannot handle this one" in entry.last_error
    assert "errored in transformer.py:transform" in caplog.text


def test_garbage_from_a_transformer_is_an_error_not_a_crash(tmp_path):
    with running_engine(make_project(tmp_path), registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body={"garbage": True}))
    assert result.status is AcceptanceStatus.FAILED
    assert "returned dict; expected a Message" in result.detail


def test_returning_none_filters(tmp_path):
    with running_engine(make_project(tmp_path), registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body={"drop": True}))
    assert result.status is AcceptanceStatus.FILTERED
    assert written(tmp_path / "out") == []


class Deferred(dict):
    """A DeferredBody: gains "full" when materialized, counting how often."""

    calls = 0

    def materialize(self):
        if "full" not in self:
            Deferred.calls += 1
            self["full"] = True


def test_a_deferred_body_is_completed_once_before_the_first_stage(tmp_path):
    Deferred.calls = 0
    with running_engine(make_project(tmp_path), registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "inbound", Message(body=Deferred(n=4, copy=True)))
    assert result.status is AcceptanceStatus.ACCEPTED
    assert Deferred.calls == 1  # the source's transformer saw it complete; later stages did not redo it
    (copy,) = written(tmp_path / "copies")
    assert copy == {"n": 4, "copy": True, "full": True, "seen_by": "inbound", "destination": "copies"}


def test_a_deferred_body_that_no_stage_reads_is_kept_as_it_is(tmp_path):
    write(tmp_path / "intu.yaml", ROOT)
    channel = "name: plain\nsource: {type: manual}\ndestinations: [archive]\n"
    write(tmp_path / "channels" / "plain" / "channel.yaml", channel)
    Deferred.calls = 0
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        result = engine_deliver(engine, "plain", Message(body=Deferred(n=5)))
    assert result.status is AcceptanceStatus.ACCEPTED
    assert Deferred.calls == 0
    assert written(tmp_path / "out") == [{"n": 5}]
