"""``/metrics``: the engine's metrics registry and queue statistics in Prometheus's text format.

A custom ``prometheus_client`` collector, so that nothing is counted twice: each scrape turns
``EngineView.metrics()`` (every family the engine and plugins declared, unchanged: names, help,
labels, histogram buckets) and ``EngineView.queue_stats()`` into metric families, and
``prometheus_client`` writes the exposition format. Gauges computed here, per scrape:

- ``intu_queue_depth{queue}``: entries still to deliver (pending + in flight);
- ``intu_queue_entries{queue,state}``: entries by state (``pending``, ``in_flight``, ``dead``,
  ``errored``); ``intu_queue_dead_letters{queue}``: the dead ones, for an alert rule;
- ``intu_queue_oldest_age_seconds{queue}``: age of the oldest entry still to deliver (0: none);
- ``intu_queue_up``: 1 when the queue could be read for this scrape, else 0;
- ``intu_channel_running{channel}``: 1 while the channel's source runs;
- ``intu_destination_up{destination}``: 1 while a destination is reachable
  (``EngineView.destination_states()``);
- ``intu_ready``: 1 when ``/readyz`` would answer 200.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from intu_core.metrics import FamilySnapshot
from intu_core.queue import QueueUnavailable
from intu_core.view import ChannelState, EngineView

#: The Content-Type of ``/metrics`` (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector(Collector):
    """Collects one ``EngineView`` for ``prometheus_client`` (see the module docstring)."""

    def __init__(self, view: EngineView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        for family in self._view.metrics():
            yield _translate(family)
        yield from self._queue_families()
        yield from self._state_families()

    def _queue_families(self) -> Iterator[Metric]:
        up = Metric("intu_queue_up", "1 when the queue could be read for this scrape.", "gauge")
        try:
            stats = self._view.queue_stats()
        except QueueUnavailable:
            up.add_sample("intu_queue_up", {}, 0.0)
            yield up
            return
        up.add_sample("intu_queue_up", {}, 1.0)
        yield up
        depth = Metric("intu_queue_depth", "Entries still to deliver (pending + in flight).", "gauge")
        entries = Metric("intu_queue_entries", "Queue entries by state.", "gauge")
        dead = Metric("intu_queue_dead_letters", "Entries given up on, kept for an operator.", "gauge")
        age = Metric(
            "intu_queue_oldest_age_seconds", "Age of the oldest entry still to deliver (0: none).", "gauge"
        )
        for s in stats:
            labels = {"queue": s.queue}
            depth.add_sample("intu_queue_depth", labels, float(s.depth))
            dead.add_sample("intu_queue_dead_letters", labels, float(s.dead))
            age.add_sample("intu_queue_oldest_age_seconds", labels, float(s.oldest_age_s or 0.0))
            for state, count in (
                ("pending", s.pending),
                ("in_flight", s.in_flight),
                ("dead", s.dead),
                ("errored", s.errored),
            ):
                entries.add_sample("intu_queue_entries", {**labels, "state": state}, float(count))
        yield from (depth, entries, dead, age)

    def _state_families(self) -> Iterator[Metric]:
        running = Metric("intu_channel_running", "1 while the channel's source runs.", "gauge")
        for channel in self._view.channels():
            value = 1.0 if channel.state is ChannelState.RUNNING else 0.0
            running.add_sample("intu_channel_running", {"channel": channel.name}, value)
        yield running
        up = Metric("intu_destination_up", "1 while the destination is reachable.", "gauge")
        for name, state in sorted(self._view.destination_states().items()):
            up.add_sample("intu_destination_up", {"destination": name}, 1.0 if state.up else 0.0)
        yield up
        ready = Metric("intu_ready", "1 when the engine can take messages (/readyz answers 200).", "gauge")
        ready.add_sample("intu_ready", {}, 0.0 if self._view.ready() else 1.0)
        yield ready


def _translate(family: FamilySnapshot) -> Metric:
    """One family of intu's registry as a ``prometheus_client`` metric, samples unchanged."""
    name, kind = family.name, family.kind
    if kind == "counter":
        # prometheus_client names a counter family without _total and adds it when writing; a
        # counter named otherwise is exported untyped so that its samples keep their name.
        if name.endswith("_total"):
            name = name[: -len("_total")]
        else:
            kind = "unknown"
    metric = Metric(name, family.help, kind)
    for sample in family.samples:
        metric.add_sample(sample.name, dict(sample.labels), sample.value)
    return metric


def exposition(view: EngineView) -> bytes:
    """The text ``/metrics`` answers for ``view`` (``CONTENT_TYPE``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(view))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "EngineCollector", "exposition"]
