"""What the `intu queue` and `intu messages` commands share: opening the project's queue store
for a command (it may not exist yet; the engine may hold it), and printing plain tables."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import click

from intu_core.config import ConfigError
from intu_core.queue import QueueNotFound, QueueStore, QueueUnavailable
from intu_core.queue.opener import open_queue


@contextmanager
def open_store(
    ctx: click.Context, must_exist: bool = True, *, missing: str = "", using: str = "use the queue"
) -> Iterator[QueueStore | None]:
    """The project's queue, or None when there is none yet and ``must_exist`` is False.
    ``missing`` is added to the error when it must exist; ``using`` says what a busy store stopped."""
    try:
        store = open_queue(ctx.obj.project(), ctx.obj.registry(), create=False)
    except ConfigError as err:
        click.echo(err.report(), err=True)
        ctx.exit(2)
    except QueueNotFound as exc:
        if must_exist:
            raise click.ClickException(f"{exc}{missing}") from None
        yield None
        return
    except QueueUnavailable as exc:
        raise click.ClickException(f"cannot open the queue: {exc}") from None
    try:
        yield store
    except QueueUnavailable as exc:  # e.g. the engine held the write lock past the busy timeout
        raise click.ClickException(f"cannot {using} right now: {exc}") from None
    finally:
        store.close()


def print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns as wide as their widest cell; numbers right-aligned (except in the first column)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if i == 0 or not cell.isdigit() else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        click.echo("  ".join(cells).rstrip())


def one_line(text: str, width: int, *, traceback_last: bool = True) -> str:
    """One line of ``text`` cut to ``width``: the first, or for a traceback (``traceback_last``)
    its last, which says what went wrong."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tb = traceback_last and (text.startswith("Traceback") or "\nTraceback" in text)
    line = (lines[-1] if tb else lines[0]) if lines else ""
    return line if len(line) <= width else line[: width - 1] + "…"
