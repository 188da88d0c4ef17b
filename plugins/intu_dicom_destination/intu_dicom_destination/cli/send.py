"""`intu dicom send`: send files and folders to a destination, with a progress bar and a summary."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from intu_core import SendStatus
from intu_dicom_destination.cli.files import meta as _meta  # noqa: F401 - tests use this name
from intu_dicom_destination.cli.files import walk
from intu_dicom_destination.cli.lookahead import Lookahead
from intu_dicom_destination.cli.workers import Item, can_fork, plan, send_all
from intu_dicom_destination.scu.settings import DestinationSettings

__all__ = ["run_send"]


def run_send(
    settings: DestinationSettings,
    paths: Iterable[Path],
    out: TextIO,
    progress: bool = True,
    associations: int | None = None,
    ahead: Lookahead | None = None,
) -> int:
    """Send files and folders (recursively) to the destination; print a summary.

    Non-DICOM files are skipped with a note. Returns 0 when every instance was delivered (success
    or warning), 1 when any failed, 2 when there was nothing to send. ``ahead``: the files of
    ``paths``, already being looked at (``cli.lookahead``)."""
    if associations:
        settings = replace(settings, max_associations=associations)
    # Only the names here: each file is looked at by the worker that sends it, so that the
    # workers start at once and share that work (~0.2 ms per file) instead of waiting for it,
    # unless the lookahead already did while the command was starting.
    items: list[Item]
    if ahead is not None:
        files = ahead.files
        items = list(zip(files, ahead.results(), strict=True))
    else:
        files = list(walk(Path(p) for p in paths))
        items = [(path, None) for path in files]
    if not files:
        print("nothing to send: no DICOM Part-10 files found", file=out)
        return 2
    show = progress and sys.stderr.isatty()
    counts: Counter[SendStatus] = Counter()
    problems: list[tuple[Path, SendStatus, str]] = []
    skipped: list[tuple[int, str]] = []
    # Worker processes (one association each, up to the core count) when we can fork safely.
    processes = len(plan(settings.max_associations, len(files))) > 1 and can_fork()
    with _progress_bar(len(files), show) as bar:

        def report(index: int, status: SendStatus | None, detail: str) -> None:
            if status is None:
                skipped.append((index, detail))
            else:
                counts[status] += 1
                if status is not SendStatus.SUCCESS:
                    problems.append((files[index], status, detail))
            bar.update(1)

        send_all(settings, items, report, processes=processes)
    for index, why in sorted(skipped):
        print(f"skipped {files[index]}: {why}", file=out)
    sent = len(files) - len(skipped)
    if not sent:
        print("nothing to send: no DICOM Part-10 files found", file=out)
        return 2
    failed = counts[SendStatus.RETRYABLE] + counts[SendStatus.PERMANENT]
    for path, status, detail in sorted(problems, key=lambda p: str(p[0])):
        label = "warning" if status is SendStatus.WARNING else f"FAILED ({status.value})"
        print(f"{label}: {path}: {detail}", file=out)
    print(
        f"sent {counts[SendStatus.SUCCESS] + counts[SendStatus.WARNING]} of {sent} to "
        f"{settings.called_ae_title} at {settings.address}: {counts[SendStatus.SUCCESS]} ok, "
        f"{counts[SendStatus.WARNING]} with warnings, {failed} failed"
        + (f", {len(skipped)} non-DICOM files skipped" if skipped else ""),
        file=out,
    )
    return 1 if failed else 0


class _NoBar:
    """The progress bar when none is shown (tqdm is not even imported)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        """Nothing to show."""


def _progress_bar(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: the workers are forked inside the with block
    return tqdm(total=total, unit="file", file=sys.stderr)
