"""Operator actions on a running engine's queue: retry or purge entries, by id.

``intu queue retry|purge`` does the same from another process; its delivery workers notice on
their next poll. An ``Operator`` runs inside ``intu serve`` (the HTTP API's ``POST
/api/v1/entries/{id}/retry``), so it also wakes the workers of each queue it put entries back
in, and delivery starts at once. The store records the ``retried`` and ``purged`` history
events in the same transaction as the change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from intu_core.queue import EntryState, QueueStore

#: Wake at most this many workers per queue: a queue has ``queue.threads`` of them, all woken.
_MAX_WAKES = 64


class Operator:
    """Retry and purge queue entries of a running engine (``EngineView.operator()``).

    ``wake(queue)`` tells the delivery workers of ``queue`` (a destination's name, or a
    channel's error queue ``channel:<name>``) that an entry is due now; the engine passes one
    that does nothing for a queue without workers in this process.
    """

    def __init__(self, store: QueueStore, wake: Callable[[str], None]) -> None:
        self._store = store
        self._wake = wake

    def retry(self, entry_ids: Sequence[str]) -> int:
        """Put these dead or errored entries back to pending now, attempts reset; how many were.

        Unknown ids and entries in other states (pending, in flight) are left alone. Raises
        ``QueueUnavailable`` when the queue cannot be written."""
        queues = self._queues_of(entry_ids, (EntryState.DEAD, EntryState.ERRORED))
        if not queues:
            return 0
        count = self._store.retry(entry_ids=list(entry_ids), state=None)
        for queue, n in queues.items():
            for _ in range(min(n, _MAX_WAKES)):
                self._wake(queue)
        return count

    def purge(self, entry_ids: Sequence[str]) -> int:
        """Delete these entries (pending, dead or errored; never one being sent) and release
        their files; how many were. Raises ``QueueUnavailable`` when the queue cannot be written."""
        if not entry_ids:
            return 0
        return self._store.purge(entry_ids=list(entry_ids))

    def _queues_of(self, entry_ids: Sequence[str], states: tuple[EntryState, ...]) -> Counter[str]:
        """How many of ``entry_ids`` each queue holds in one of ``states``."""
        queues: Counter[str] = Counter()
        for entry_id in entry_ids:
            entry = self._store.get(entry_id)
            if entry is not None and entry.state in states:
                queues[entry.queue] += 1
        return queues


__all__ = ["Operator"]
