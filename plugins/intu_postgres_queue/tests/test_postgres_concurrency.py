"""Two nodes enqueueing, claiming and completing at once on one schema: every entry is given out
to one worker at a time, delivered exactly once, its file there until the last entry that needs
it is delivered, and nothing is left behind (the guard against a lost or stranded entry)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from intu_postgres_queue import PostgresQueueStore

from intu_core.message import SendResult
from intu_core.testing.queue_contract import make_file, msg

PER_PRODUCER = 60
QUEUES = ("q1", "q2")  # each message fanned out to both: its file is needed by two entries


def test_two_nodes_at_once_deliver_every_entry_exactly_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    nodes = [PostgresQueueStore(pg_dsn, schema=pg_schema, node_id=f"node-{n}") for n in "ab"]
    lock = threading.Lock()
    enqueued: list[str] = []
    delivered: Counter[str] = Counter()
    held: set[str] = set()
    problems: list[str] = []
    producing = threading.Event()
    producing.set()

    def produce(store: PostgresQueueStore, tag: str) -> None:
        spool = tmp_path / tag
        spool.mkdir()
        for i in range(PER_PRODUCER):
            path = make_file(spool, f"{i}.dcm")
            message = msg(i, (path,))
            ids = store.enqueue([(q, message) for q in QUEUES])
            with lock:
                enqueued.extend(ids)
            store.release_files([path])  # as the engine after its hand-over: the entries keep it

    def work(store: PostgresQueueStore, queue: str) -> None:
        idle_since: float | None = None
        while True:
            entry = store.claim(queue, lease_s=300)
            if entry is None:
                if not producing.is_set():
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 1.0:
                        return
                time.sleep(0.002)
                continue
            idle_since = None
            with lock:
                if entry.id in held:
                    problems.append(f"{entry.id} claimed while another worker held it")
                held.add(entry.id)
            if not all(Path(p).exists() for p in entry.message.files):
                problems.append(f"{entry.id}: its file was deleted before it was delivered")
            with lock:
                held.discard(entry.id)
            if store.complete(entry.id, SendResult.success()):
                with lock:
                    delivered[entry.id] += 1
            else:
                problems.append(f"{entry.id}: complete by its lease holder changed nothing")

    producers = [
        threading.Thread(target=produce, args=(store, f"{store.node_id}-{k}"))
        for store in nodes
        for k in range(2)
    ]
    workers = [
        threading.Thread(target=work, args=(store, queue))
        for store in nodes
        for queue in QUEUES
        for _ in range(2)
    ]
    try:
        for thread in producers + workers:
            thread.start()
        for thread in producers:
            thread.join(120)
        producing.clear()
        for thread in workers:
            thread.join(120)
        assert not any(t.is_alive() for t in producers + workers)
        assert problems == []
        assert len(enqueued) == 2 * 2 * PER_PRODUCER * len(QUEUES)
        assert set(delivered) == set(enqueued)
        assert set(delivered.values()) == {1}
        assert nodes[0].list_entries(limit=10_000) == []
        assert sum(s.delivered for s in nodes[0].stats()) == len(enqueued)
        assert [p for p in tmp_path.rglob("*.dcm")] == []  # each deleted with its last entry
    finally:
        for store in nodes:
            store.close()
