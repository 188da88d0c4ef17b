"""The metrics registry, and what the engine and plugins count in it."""

from __future__ import annotations

import threading
import time

import pytest
from project_files import write

from intu_core import DestinationType, Message, MetricsRegistry, Runtime, SendResult, hookimpl
from intu_core.message import AcceptanceStatus
from intu_core.metrics import EngineMetrics
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine


def test_a_counter_counts_per_label_values_and_only_goes_up():
    registry = MetricsRegistry()
    family = registry.counter("intu_things_total", "Things.", ["channel"])
    family.labels("a").inc()
    family.labels("a").inc(2)
    family.labels("b").inc()
    snapshot = registry.collect()
    assert snapshot.value("intu_things_total", channel="a") == 3
    assert snapshot.value("intu_things_total", channel="b") == 1
    assert snapshot.value("intu_things_total", channel="never") == 0
    with pytest.raises(ValueError, match="only goes up"):
        family.labels("a").inc(-1)
    with pytest.raises(ValueError, match="has labels"):
        family.labels("a", "b")


def test_declaring_again_returns_the_family_and_a_different_shape_is_refused():
    registry = MetricsRegistry()
    first = registry.counter("intu_x_total", "X.", ["destination"])
    assert registry.counter("intu_x_total", "X, again.", ["destination"]) is first
    with pytest.raises(ValueError, match="already declared as a counter"):
        registry.counter("intu_x_total", "X.", ["channel"])
    with pytest.raises(ValueError, match="already declared"):
        registry.gauge("intu_x_total", "X.", ["destination"])


@pytest.mark.parametrize(("name", "labels"), [("intu-x", ()), ("1x", ()), ("x", ("le",)), ("x", ("__a",))])
def test_names_follow_prometheus_rules(name, labels):
    with pytest.raises(ValueError):
        MetricsRegistry().counter(name, "bad", labels)


def test_a_gauge_goes_up_and_down():
    registry = MetricsRegistry()
    gauge = registry.gauge("intu_open_associations", "Open.", ["destination"]).labels("pacs")
    gauge.inc(3)
    gauge.dec()
    assert registry.collect().value("intu_open_associations", destination="pacs") == 2
    gauge.set(7)
    assert gauge.value == 7


def test_a_histogram_exports_cumulative_buckets_sum_and_count():
    registry = MetricsRegistry()
    child = registry.histogram("intu_send_seconds", "Sends.", ["destination"], buckets=[0.1, 1.0]).labels("p")
    for value in (0.05, 0.1, 0.5, 3.0):
        child.observe(value)
    (family,) = registry.collect()
    assert family.kind == "histogram" and family.label_names == ("destination",)
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("intu_send_seconds_bucket", {"destination": "p", "le": "0.1"}, 2.0),  # le: 0.1 falls in 0.1
        ("intu_send_seconds_bucket", {"destination": "p", "le": "1.0"}, 3.0),
        ("intu_send_seconds_bucket", {"destination": "p", "le": "+Inf"}, 4.0),
        ("intu_send_seconds_sum", {"destination": "p"}, 3.65),
        ("intu_send_seconds_count", {"destination": "p"}, 4.0),
    ]


def test_updates_from_many_threads_are_all_counted():
    registry = MetricsRegistry()
    family = registry.counter("intu_n_total", "N.", ["t"])

    def work() -> None:
        child = family.labels("shared")  # every thread creates-or-gets the same child
        for _ in range(10_000):
            child.inc()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.collect().value("intu_n_total", t="shared") == 80_000


def test_the_engine_families_can_be_declared_twice():
    registry = MetricsRegistry()
    assert EngineMetrics.register(registry).delivered is EngineMetrics.register(registry).delivered
    names = [family.name for family in registry.collect()]
    assert names == sorted(names) and "intu_messages_received_total" in names


# -- the engine reports, and so do plugins ---------------------------------------------------------

SENT: list[int] = []


class CountingDestination:
    """Fails its first send (retryable), then delivers and counts bytes through runtime.metrics."""

    def __init__(self, settings: object, runtime: Runtime) -> None:
        self.bytes_sent = runtime.metrics.counter(
            "intu_bytes_sent_total", "Bytes destinations sent.", ["destination"]
        ).labels(runtime.name)
        self.calls = 0

    def send(self, message: Message) -> SendResult:
        self.calls += 1
        if self.calls == 1:
            return SendResult.retryable("not yet")
        if message.body.get("bad"):
            return SendResult.permanent("refused")
        self.bytes_sent.inc(100)
        return SendResult.success()

    def close(self) -> None:
        pass


def _parse(section):  # type: ignore[no-untyped-def]
    section.done()


@hookimpl
def intu_destination_types() -> list[DestinationType]:
    return [DestinationType("counting", _parse, CountingDestination)]


class counting_plugin:  # noqa: N801 - a plugin object, named like the module it stands for
    intu_destination_types = staticmethod(intu_destination_types)


def test_the_engine_counts_each_stage_and_the_plugin_counts_bytes(tmp_path):
    write(
        tmp_path / "intu.yaml",
        """
        destinations:
          pacs:
            type: counting
            queue: {threads: 1}
            retry: {backoff: constant, initial_delay_ms: 10, max_delay_ms: 10, jitter: 0}
        """,
    )
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml", "source: {type: manual}\ndestinations: [pacs]\n"
    )
    write(
        tmp_path / "channels" / "inbound" / "filter.py",
        "def filter(msg, ctx):\n    return not msg.body.get('skip')\n",
    )
    with running_engine(tmp_path, registry_with(manual_source, counting_plugin)) as engine:
        statuses = [
            engine_deliver(engine, "inbound", Message(body=body)).status
            for body in ({"n": 1}, {"skip": True}, {"n": 2}, {"bad": True})
        ]
        assert (
            statuses
            == [AcceptanceStatus.ACCEPTED, AcceptanceStatus.FILTERED] + [AcceptanceStatus.ACCEPTED] * 2
        )
        deadline = time.monotonic() + 10
        # Both settled: the first send's retry (10 ms later) may come after the dead letter.
        while (
            engine.view.metrics().value("intu_messages_dead_lettered_total", destination="pacs") < 1
            or engine.view.metrics().value("intu_messages_delivered_total", destination="pacs") < 2
        ):
            assert time.monotonic() < deadline, engine.view.metrics()
            time.sleep(0.02)
        snapshot = engine.view.metrics()
    channel, pacs = {"channel": "inbound"}, {"destination": "pacs"}
    assert snapshot.value("intu_messages_received_total", **channel) == 4
    assert snapshot.value("intu_messages_accepted_total", **channel) == 3
    assert snapshot.value("intu_messages_filtered_total", **channel) == 1
    assert snapshot.value("intu_messages_retried_total", **pacs) == 1
    assert snapshot.value("intu_messages_delivered_total", **pacs) == 2
    assert snapshot.value("intu_messages_dead_lettered_total", **pacs) == 1
    assert snapshot.value("intu_delivery_seconds_count", **pacs) == 4
    assert snapshot.value("intu_bytes_sent_total", **pacs) == 200


def test_refusals_are_counted_by_reason(tmp_path):
    write(
        tmp_path / "intu.yaml",
        "destinations:\n  archive: {type: log, queue: {max_size: 1, threads: 1}}\n",
    )
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        "source: {type: manual}\ndestinations: [archive]\n",
    )
    write(
        tmp_path / "channels" / "inbound" / "transformer.py",
        """
        def transform(msg, ctx):
            if msg.body.get("boom"):
                raise ValueError("boom")
            return msg
        """,
    )
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        for worker in engine.workers.values():
            worker.request_stop()  # nothing is delivered, so the queue stays full
        statuses = [
            engine_deliver(engine, "inbound", Message(body=body)).status
            for body in ({"boom": True}, {"n": 1}, {"n": 2})
        ]
        snapshot = engine.view.metrics()
    assert statuses == [AcceptanceStatus.FAILED, AcceptanceStatus.ACCEPTED, AcceptanceStatus.BUSY]
    assert snapshot.value("intu_messages_refused_total", channel="inbound", reason="busy") == 1
    assert snapshot.value("intu_messages_refused_total", channel="inbound", reason="failed") == 1
    assert snapshot.value("intu_messages_received_total", channel="inbound") == 3


def test_a_runtime_outside_an_engine_has_a_registry_of_its_own(tmp_path):
    import logging

    runtime = Runtime("x", tmp_path, logging.getLogger("x"))
    runtime.metrics.counter("intu_y_total", "Y.").labels().inc()
    assert runtime.metrics.collect().value("intu_y_total") == 1


def test_a_gauge_can_read_its_value_from_a_function_at_each_collect():
    registry = MetricsRegistry()
    held = [2]
    registry.gauge("intu_open", "Open now.", ["pool"]).labels("a").set_function(lambda: held[0])
    assert registry.collect().value("intu_open", pool="a") == 2
    held[0] = 0
    assert registry.collect().value("intu_open", pool="a") == 0
