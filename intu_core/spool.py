"""The spool folders (``<data_dir>/spool/<channel>/``) and the quarantine next to them.

Sources keep the files their messages refer to in their spool folder (``Runtime.spool_dir``). At
start the engine moves files there that no queue entry refers to into
``<data_dir>/quarantine/<YYYY-MM-DD>/<channel>/``: never deletes them, because a lost, emptied or
replaced queue database makes every acknowledged instance look like such an orphan. ``intu queue
recover`` puts quarantined files back: it moves each into its channel's spool folder, asks the
plugin of the channel's source type to rebuild the message (``intu_message_from_file``), and
queues it in the channel's own queue (``channel:<name>``), which the engine runs through the
channel like a message just received.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from intu_core.config.project import Project
from intu_core.fsutil import fsync_dir
from intu_core.message import Message
from intu_core.queue import QueueStore, channel_queue

SPOOL = "spool"
QUARANTINE = "quarantine"


@runtime_checkable
class KnowsFiles(Protocol):
    """A queue store that can say which files no entry refers to without reading every entry
    (the SQLite store can). Other stores are asked through their entries."""

    def unreferenced(self, paths: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class Quarantined:
    """What ``quarantine_orphans`` moved: how many files, into which folder."""

    count: int
    folder: Path


@dataclass(frozen=True)
class Recovered:
    """One file ``recover_quarantined`` looked at: queued as ``entry_id`` (None in a dry run or
    when it could not be), or left where it was because of ``problem``."""

    path: Path
    channel: str
    entry_id: str | None = None
    problem: str = ""


def spool_files(data_dir: Path) -> list[Path]:
    """Every file under the spool folders, sorted."""
    spool = data_dir / SPOOL
    return sorted(p for p in spool.rglob("*") if p.is_file()) if spool.is_dir() else []


def orphans(store: QueueStore | None, files: Sequence[Path]) -> list[Path]:
    """Those of ``files`` that no entry of ``store`` refers to (all of them without a store)."""
    if store is None:
        return list(files)
    names = [str(p) for p in files]
    if isinstance(store, KnowsFiles):
        unused = set(store.unreferenced(names))
    else:
        referenced = {f for e in store.list_entries(limit=sys.maxsize) for f in e.message.files}
        unused = {n for n in names if n not in referenced}
    return [p for p in files if str(p) in unused]


def quarantine_orphans(store: QueueStore, data_dir: Path, *, day: str | None = None) -> Quarantined:
    """Move spooled files no entry refers to into ``quarantine/<day>/<channel>/``.

    Only while no source runs (the engine at start, ``intu queue recover`` holding the engine's
    lock): a source's file is unreferenced until its message is queued."""
    folder = data_dir / QUARANTINE / (day or time.strftime("%Y-%m-%d", time.gmtime()))
    spool = data_dir / SPOOL
    moved = 0
    touched: set[Path] = set()
    for path in orphans(store, spool_files(data_dir)):
        target = _free_name(folder / path.relative_to(spool))
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(path, target)  # one filesystem: a rename, never a copy that could half-fail
        touched.update((path.parent, target.parent))
        moved += 1
    _fsync_dirs(touched)
    return Quarantined(moved, folder)


def quarantined_files(data_dir: Path) -> list[Path]:
    """Every file under the quarantine folder, sorted (oldest day first)."""
    root = data_dir / QUARANTINE
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def recover_quarantined(
    store: QueueStore | None, project: Project, hook: Any, *, dry_run: bool = False
) -> list[Recovered]:
    """Queue the message of every quarantined file in its channel's queue (see the module
    docstring); with ``dry_run`` only say what would be done (``store`` may then be None).

    A file whose channel is gone, or that its plugin cannot read, stays in quarantine."""
    root = project.data_dir / QUARANTINE
    channels = {c.name: c for c in project.channels}
    results: list[Recovered] = []
    touched: set[Path] = set()
    for path in quarantined_files(project.data_dir):
        parts = path.relative_to(root).parts
        name = parts[1] if len(parts) >= 3 else ""
        channel = channels.get(name)
        if channel is None:
            why = f"no channel named {name!r} in the project" if name else "not under <day>/<channel>/"
            results.append(Recovered(path, name, problem=why))
            continue
        source_type = channel.source.type
        if dry_run:
            message, problem = _rebuild(hook, source_type, path, name)
            results.append(Recovered(path, name, problem=problem))
            continue
        assert store is not None
        target = _free_name(project.data_dir / SPOOL / name / Path(*parts[2:]))
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(path, target)
        message, problem = _rebuild(hook, source_type, target, name)
        if message is None:
            os.replace(target, path)
            results.append(Recovered(path, name, problem=problem))
            continue
        files = tuple(dict.fromkeys((*message.files, str(target))))
        [entry_id] = store.enqueue([(channel_queue(name), message.replace(channel=name, files=files))])
        touched.update((path.parent, target.parent))
        results.append(Recovered(target, name, entry_id))
    _fsync_dirs(touched)
    return results


def _rebuild(hook: Any, source_type: str, path: Path, channel: str) -> tuple[Message | None, str]:
    try:
        message = hook.intu_message_from_file(source_type=source_type, path=path, channel=channel)
    except Exception as exc:  # a file the plugin cannot read: it stays where it is
        return None, f"cannot rebuild its message: {exc}"
    if message is None:
        return None, f"no installed plugin rebuilds messages of {source_type!r} sources from files"
    return message, ""


def _free_name(path: Path) -> Path:
    """``path``, or ``<stem>-N<suffix>`` beside it when it is taken."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _fsync_dirs(folders: Iterable[Path]) -> None:
    # The renames must survive a power cut before anyone counts on where the files are.
    for folder in folders:
        if folder.is_dir():
            fsync_dir(folder)


__all__ = [
    "QUARANTINE",
    "SPOOL",
    "KnowsFiles",
    "Quarantined",
    "Recovered",
    "orphans",
    "quarantine_orphans",
    "quarantined_files",
    "recover_quarantined",
    "spool_files",
]
