"""``intu messages``: search the message history, and one message's journey (``show``), also
while ``intu serve`` runs.

The history lives in the queue store (``intu_core.history``), opened with ``open_queue`` as ``intu
queue`` does: looking creates and writes nothing, and with SQLite it is a second connection that
waits for the engine's short transactions.

The command object in ``ctx.obj`` must have ``project() -> Project`` and
``registry() -> PluginRegistry`` methods (the ``intu`` CLI's state object does).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

import click

from intu_core.commandkit import one_line, open_store, print_table
from intu_core.history import (
    STATUSES,
    Event,
    Journey,
    MessageQuery,
    MessageRecord,
    destination_summaries,
)

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds of ``text``: an ISO 8601 date or time (``2026-12-03``, ``2026-12-03T09:30``,
    with or without a zone; without one it is local time) or a time ago (``90s``, ``30m``,
    ``2h``, ``7d``, ``1w``). Raises ``ValueError`` saying what is accepted."""
    match = _RELATIVE.match(text)
    if match:
        ago = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        return (time.time() if now is None else now) - ago
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2026-12-03T09:30, 2026-12-03) nor a time ago"
            " (30m, 2h, 7d)"
        ) from None
    return when.timestamp()  # a naive time is local, as people type it


class _When(click.ParamType):
    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_when(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group(invoke_without_command=True)
@click.option("--accession", "accession_number", metavar="NUMBER", help="Accession number (0008,0050).")
@click.option("--patient-id", metavar="ID", help="Patient ID (0010,0020).")
@click.option("--study-uid", metavar="UID", help="Study Instance UID (0020,000D).")
@click.option("--sop-instance-uid", metavar="UID", help="SOP Instance UID (0008,0018).")
@click.option("--status", type=click.Choice(STATUSES), help="Where the message is now.")
@click.option("--channel", metavar="NAME", help="The channel that received it.")
@click.option("--since", type=_When(), help="Received at or after: ISO time (2026-12-03T09:30) or ago (2h).")
@click.option("--until", type=_When(), help="Received before: ISO time or ago (30m).")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(min=1), help="At most this many."
)
@click.option(
    "--json", "as_json", is_flag=True, help="JSON, with each destination's attempts and last answer."
)
@click.pass_context
def messages(
    ctx: click.Context,
    accession_number: str | None,
    patient_id: str | None,
    study_uid: str | None,
    sop_instance_uid: str | None,
    status: str | None,
    channel: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """Search the message history (newest first), also while intu serve runs.

    Every received message is kept with its DICOM identifiers, where it went, each attempt and
    the peer's answer, until history.retention_days after it is finished. `intu messages show ID`
    prints one message's journey.
    """
    if ctx.invoked_subcommand is not None:
        return
    query = MessageQuery(
        accession_number=accession_number,
        patient_id=patient_id,
        study_uid=study_uid,
        sop_instance_uid=sop_instance_uid,
        channel=channel,
        status=status,
        since=since,
        until=until,
        limit=limit,
    )
    with open_store(ctx, must_exist=False, using="read the message history") as store:
        found: list[Journey] = []
        if store is not None:
            for record in store.find_messages(query):
                journey = store.journey(record.id)
                found.append(journey if journey is not None else Journey(record, ()))
    if as_json:
        click.echo(json.dumps([_summary_json(j) for j in found], indent=2))
        return
    if not found:
        click.echo("no messages")
        return
    header = ("RECEIVED", "STATUS", "ACCESSION", "PATIENT", "MOD", "DESTINATIONS", "ID")
    rows = [
        (
            _local(j.message.received_at),
            j.message.status,
            j.message.identifiers.get("accession_number", ""),
            j.message.identifiers.get("patient_id", ""),
            j.message.identifiers.get("modality", ""),
            ", ".join(
                _destination_text(s.destination, s.state, s.attempts, s.last)
                for s in destination_summaries(j)
            )
            or "-",
            j.message.id,
        )
        for j in found
    ]
    print_table(header, rows)


@messages.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@click.pass_context
def show_command(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """One message's journey: where it came from, its identifiers and tags, every event."""
    with open_store(
        ctx, must_exist=True, missing=": no message was received yet", using="read the message history"
    ) as store:
        assert store is not None
        journey = store.journey(message_id)
    if journey is None:
        raise click.ClickException(
            f"no message {message_id} in the history (finished messages are forgotten after"
            " history.retention_days; see: intu messages --since 1d)"
        )
    if as_json:
        click.echo(json.dumps(journey_json(journey), indent=2))
        return
    record = journey.message
    click.echo(f"message     {record.id}")
    click.echo(f"channel     {record.channel}")
    click.echo(
        f"received    {_local(record.received_at)}" + (f" from {record.source}" if record.source else "")
    )
    click.echo(f"status      {record.status}")
    for summary in destination_summaries(journey):
        text = _destination_text(summary.destination, summary.state, summary.attempts, summary.last)
        click.echo(f"destination {text}")
    for key, value in record.identifiers.items():
        click.echo(f"{key:<11} {value}")
    if record.tags:
        click.echo("tags        " + ", ".join(f"{k}={v}" for k, v in record.tags.items()))
    click.echo("")
    rows = [
        (
            _local(e.at),
            e.kind.value,
            e.destination or "-",
            "" if e.attempt is None else str(e.attempt),
            e.status,
            _code(e.code),
            one_line(e.detail, 90, traceback_last=False),  # "stage: summary" comes first
        )
        for e in journey.events
    ]
    print_table(("AT", "EVENT", "DESTINATION", "ATTEMPT", "STATUS", "CODE", "DETAIL"), rows)
    if journey.entries:
        click.echo("")
        click.echo(
            "still in the queue: "
            + ", ".join(journey.entries)
            + " (see: intu queue show ID; intu queue retry ID)"
        )


# -- JSON ------------------------------------------------------------------------------------
def record_json(record: MessageRecord) -> dict[str, Any]:
    """A record as JSON (times as ISO 8601 UTC), as ``intu messages --json`` prints it."""
    return {
        "id": record.id,
        "channel": record.channel,
        "received_at": _iso(record.received_at),
        "source": record.source,
        "status": record.status,
        "identifiers": dict(record.identifiers),
        "tags": dict(record.tags),
        "destinations": dict(record.destinations),
        "updated_at": _iso(record.updated_at),
    }


def event_json(event: Event) -> dict[str, Any]:
    """An event as JSON; ``code`` is the peer's status as a number (``code_hex``: as DICOM writes it)."""
    data: dict[str, Any] = {
        "at": _iso(event.at),
        "kind": event.kind.value,
        "destination": event.destination,
        "attempt": event.attempt,
        "status": event.status,
        "code": event.code,
        "detail": event.detail,
    }
    if event.code is not None:
        data["code_hex"] = _code(event.code)
    return data


def journey_json(journey: Journey) -> dict[str, Any]:
    """A journey as JSON: the record, its events oldest first, its entries still queued."""
    return {
        **record_json(journey.message),
        "events": [event_json(e) for e in journey.events],
        "entries": list(journey.entries),
    }


def _summary_json(journey: Journey) -> dict[str, Any]:
    data = record_json(journey.message)
    data["destinations"] = {
        s.destination: {
            "state": s.state,
            "attempts": s.attempts,
            "last": event_json(s.last) if s.last is not None else None,
        }
        for s in destination_summaries(journey)
    }
    data["entries"] = list(journey.entries)
    return data


# -- text ------------------------------------------------------------------------------------
def _destination_text(name: str, state: str, attempts: int, last: Event | None) -> str:
    text = f"{name}: {state}"
    if attempts:
        text += f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    if last is not None and last.code is not None:
        text += f" ({_code(last.code)})"
    return text


def _code(code: int | None) -> str:
    return "" if code is None else f"0x{code:04X}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds")


__all__ = ["event_json", "journey_json", "messages", "parse_when", "record_json"]
