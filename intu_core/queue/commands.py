"""``intu queue``: look at, retry and purge the durable queues, also while ``intu serve`` runs,
and ``recover`` the received files kept in quarantine.

The commands open the project's queue with ``open_queue``, as the engine does, whatever its
backend; with SQLite that is a second connection to the database, and they take turns with the
engine to write (``queue.db-write-lock``; each waits at most the busy timeout for the other's short
transactions). Looking (``list``, ``show``)
creates and writes nothing. A running engine picks up entries put back by ``intu queue retry``
within a few seconds.

The command object in ``ctx.obj`` must have ``project() -> Project`` and
``registry() -> PluginRegistry`` methods (the ``intu`` CLI's state object does).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from intu_core.commandkit import one_line, open_store, print_table
from intu_core.config.problems import ConfigError
from intu_core.queue import Entry, EntryState, QueueNotFound, QueueStats, QueueStore, QueueUnavailable
from intu_core.queue.opener import open_queue
from intu_core.spool import orphans, quarantine_orphans, recover_quarantined, spool_files

#: The file ``intu serve`` holds locked while it uses a data folder.
ENGINE_LOCK = "engine.lock"

_STATES = [s.value for s in EntryState]
_PURGEABLE = [s.value for s in EntryState if s is not EntryState.IN_FLIGHT]


def _queue_option(fn: Any) -> Any:
    return click.option(
        "--destination",
        "--queue",
        "-d",
        "queue_name",
        metavar="NAME",
        help="Only this destination's queue (or a channel's error queue, channel:NAME).",
    )(fn)


@click.group()
def queue() -> None:
    """Look at, retry and purge the delivery queues (also while intu serve runs)."""


@queue.command("list")
@_queue_option
@click.option("--state", "-s", type=click.Choice(_STATES), help="List the entries in this state.")
@click.option("--limit", default=100, show_default=True, help="At most this many entries (with --state).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def list_command(
    ctx: click.Context, queue_name: str | None, state: str | None, limit: int, as_json: bool
) -> None:
    """Per queue: pending, in flight, dead, errored, oldest age. With --state: the entries."""
    with open_store(ctx, must_exist=False) as store:
        if state is None:
            stats = store.stats() if store is not None else []
            if queue_name is not None:
                stats = [s for s in stats if s.queue == queue_name] or [QueueStats(queue_name)]
            _print_stats(stats, as_json)
            return
        entries = store.list_entries(queue_name, EntryState(state), limit) if store is not None else []
        _print_entries(entries, as_json)


def _print_stats(stats: list[QueueStats], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([{**vars(s), "depth": s.depth} for s in stats], indent=2))
        return
    if not stats:
        click.echo("no queued messages")
        return
    header = ("QUEUE", "PENDING", "IN-FLIGHT", "DEAD", "ERRORED", "OLDEST", "DELIVERED")
    rows = [
        (
            s.queue,
            str(s.pending),
            str(s.in_flight),
            str(s.dead),
            str(s.errored),
            _age(s.oldest_age_s),
            str(s.delivered),
        )
        for s in stats
    ]
    print_table(header, rows)


def _print_entries(entries: list[Entry], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([_entry_json(e, body=False) for e in entries], indent=2))
        return
    if not entries:
        click.echo("no entries")
        return
    header = ("ID", "QUEUE", "STATE", "ATTEMPTS", "LAST ERROR")
    rows = [(e.id, e.queue, e.state.value, str(e.attempts), one_line(e.last_error, 80)) for e in entries]
    print_table(header, rows)


@queue.command("show")
@click.argument("entry_id")
@click.option("--body", "full_body", is_flag=True, help="Print the whole message body, not a summary.")
@click.pass_context
def show_command(ctx: click.Context, entry_id: str, full_body: bool) -> None:
    """One entry as JSON: state, attempt history, message metadata and a body summary."""
    with open_store(ctx) as store:
        assert store is not None
        entry = store.get(entry_id)
    if entry is None:
        raise click.ClickException(f"no queue entry {entry_id} (see: intu queue list --state dead)")
    click.echo(json.dumps(_entry_json(entry, body=True, full_body=full_body), indent=2, default=str))


@queue.command("retry")
@click.argument("entry_ids", nargs=-1)
@_queue_option
@click.option("--all-dead", is_flag=True, help="Every dead entry of every queue.")
@click.option("--all-errored", is_flag=True, help="Every errored entry (run through its channel again).")
@click.pass_context
def retry_command(
    ctx: click.Context, entry_ids: tuple[str, ...], queue_name: str | None, all_dead: bool, all_errored: bool
) -> None:
    """Put dead or errored entries back in their queue, to be sent (or re-run) now.

    With IDs: those entries (dead or errored). With --destination only: its dead entries.
    Errored entries of a channel (a transformer raised) run through the channel again, so fix the
    transformer and restart `intu serve` first.
    """
    if not entry_ids and queue_name is None and not all_dead and not all_errored:
        raise click.UsageError("name entry IDs, or --destination NAME, or --all-dead, or --all-errored")
    with open_store(ctx) as store:
        assert store is not None
        if entry_ids:
            _require_known(store, entry_ids)
            count = store.retry(queue_name, list(entry_ids), state=None)
        else:
            count = 0
            if all_dead or (queue_name is not None and not all_errored):
                count += store.retry(queue_name, None, state=EntryState.DEAD)
            if all_errored:
                count += store.retry(queue_name, None, state=EntryState.ERRORED)
    click.echo(f"{count} entr{'y' if count == 1 else 'ies'} put back in the queue")
    if entry_ids and count < len(entry_ids):
        click.echo(
            f"{len(entry_ids) - count} of the given entries were not retried: neither dead nor errored"
            + (f", or not in {queue_name}" if queue_name else ""),
            err=True,
        )
        ctx.exit(1)


@queue.command("purge")
@click.argument("entry_ids", nargs=-1)
@_queue_option
@click.option("--state", "-s", type=click.Choice(_PURGEABLE), help="Only entries in this state.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge_command(
    ctx: click.Context,
    entry_ids: tuple[str, ...],
    queue_name: str | None,
    state: str | None,
    yes: bool,
) -> None:
    """Delete entries for good, with their files (never entries being sent right now)."""
    if not entry_ids and queue_name is None and state is None:
        raise click.UsageError("name entry IDs, or --destination NAME, or --state STATE")
    with open_store(ctx) as store:
        assert store is not None
        if entry_ids:
            _require_known(store, entry_ids)
        if not yes:
            what = [f"{len(entry_ids)} given entries" if entry_ids else "entries"]
            if queue_name:
                what.append(f"of {queue_name}")
            if state:
                what.append(f"in state {state}")
            click.confirm(f"Delete {' '.join(what)} and their files for good?", abort=True)
        count = store.purge(
            queue_name, EntryState(state) if state else None, list(entry_ids) if entry_ids else None
        )
    click.echo(f"{count} entr{'y' if count == 1 else 'ies'} purged")
    if entry_ids and count < len(entry_ids):
        click.echo(
            f"{len(entry_ids) - count} of the given entries were not purged: in flight (being sent"
            " now; try again once settled), or not matching --destination/--state",
            err=True,
        )
        ctx.exit(1)


def _require_known(store: QueueStore, entry_ids: Sequence[str]) -> None:
    """Stop before changing anything when an id is not in the queue (a typo, or already gone)."""
    unknown = [i for i in dict.fromkeys(entry_ids) if store.get(i) is None]
    if unknown:
        raise click.ClickException(
            f"no queue entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; nothing was"
            " changed (see: intu queue list --state dead)"
        )


@queue.command("recover")
@click.option("--dry-run", is_flag=True, help="Only say what would be queued; change nothing.")
@click.pass_context
def recover_command(ctx: click.Context, dry_run: bool) -> None:
    """Queue again the received files kept in the data folder's quarantine.

    At start `intu serve` moves files of its spool folders that no queued message refers to into
    data/quarantine/<day>/<channel>/ (never deleting them): left by a crash before they were
    queued, or by a lost or replaced queue database. This command moves each back, rebuilds its
    message from the file itself (through the plugin of the channel's source) and queues it in
    the channel's queue: intu serve runs it through the channel like a message just received.
    When intu serve is not running, it first does that start-up sweep itself, so after a damaged
    queue.db was moved aside the instances in the spool folders are recovered too.
    """
    try:
        project = ctx.obj.project()
        registry = ctx.obj.registry()
    except ConfigError as err:
        click.echo(err.report(), err=True)
        ctx.exit(2)
    data_dir = project.data_dir
    if not data_dir.is_dir():
        raise click.ClickException(f"no data folder at {data_dir}: nothing to recover")
    with _engine_lock(data_dir) as engine_stopped:
        try:
            store = open_queue(project, registry, create=not dry_run)
        except QueueNotFound:
            store = None  # a dry run on a folder without a queue: every spooled file is an orphan
        except ConfigError as err:
            click.echo(err.report(), err=True)
            ctx.exit(2)
        except QueueUnavailable as exc:
            raise click.ClickException(f"cannot open the queue: {exc}") from None
        try:
            if engine_stopped and dry_run:
                found = orphans(store, spool_files(data_dir))
                if found:
                    click.echo(f"{len(found)} spooled file(s) no queued message refers to would be recovered")
            elif engine_stopped:
                assert store is not None
                moved = quarantine_orphans(store, data_dir)
                if moved.count:
                    click.echo(
                        f"moved {moved.count} spooled file(s) no queued message refers to to {moved.folder}"
                    )
            else:
                click.echo("intu serve is running: recovering what its start-up put in quarantine")
            results = recover_quarantined(store, project, registry.hook, dry_run=dry_run)
        except QueueUnavailable as exc:
            raise click.ClickException(f"cannot use the queue right now: {exc}") from None
        finally:
            if store is not None:
                store.close()
    failed = [r for r in results if r.problem]
    for r in failed:
        click.echo(f"{r.path}: left in quarantine: {r.problem}", err=True)
    done = len(results) - len(failed)
    if dry_run:
        click.echo(f"{done} quarantined file(s) would be queued in their channel's queue (dry run)")
    else:
        click.echo(
            f"{done} file(s) queued in their channel's queue; intu serve runs them through the"
            " channel (now if it runs, else when it starts)"
        )
    if failed:
        ctx.exit(1)


@contextmanager
def _engine_lock(data_dir: Path) -> Iterator[bool]:
    """Whether no engine uses ``data_dir`` (its lock taken, and held, for the block)."""
    with open(data_dir / ENGINE_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


# -- formatting ----------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _entry_json(entry: Entry, *, body: bool, full_body: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": entry.id,
        "queue": entry.queue,
        "state": entry.state.value,
        "attempts": entry.attempts,
        "next_attempt_at": _when(entry.next_attempt_at),
        "created_at": _when(entry.created_at),
        "updated_at": _when(entry.updated_at),
        "last_error": entry.last_error,
    }
    if entry.lease_owner is not None:
        data["leased_to"] = entry.lease_owner
    if entry.lease_expires_at is not None:
        data["lease_expires_at"] = _when(entry.lease_expires_at)
    if not body:
        data["message_id"] = entry.message.id
        return data
    data["history"] = [{**h, "at": _when(h["at"])} for h in entry.history]
    message = entry.message.to_json()
    summary = {k: v for k, v in message.items() if k != "body"}
    summary["body"] = message["body"] if full_body else _summarise(message["body"])
    data["message"] = summary
    return data


def _summarise(value: Any, depth: int = 0) -> Any:
    """Short values as they are; long strings, big mappings and lists as a description."""
    if isinstance(value, str):
        return value if len(value) <= 120 else f"<text, {len(value)} characters>"
    if isinstance(value, dict):
        if depth >= 1:
            return f"<mapping, {len(value)} keys>"
        return {str(k): _summarise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return f"<list, {len(value)} items>"
    return value
