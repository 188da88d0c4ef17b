"""`intu dicom echo DESTINATION` and `intu dicom send DESTINATION PATH...`.

The click commands are thin: they load the project's destination settings and call
``run_echo`` / ``run_send``, which take settings and an output stream (and are what tests call).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import click
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from intu_core.message import SendStatus
from intu_dicom_destination.parallel import can_fork, plan, send_all
from intu_dicom_destination.sender import DicomSender
from intu_dicom_destination.settings import DestinationSettings
from intu_dicom_destination.tls import TlsConfigError, client_context


def run_echo(settings: DestinationSettings, out: TextIO) -> int:
    """C-ECHO the destination and print what was negotiated; 0 when the echo succeeded."""
    sender = DicomSender(settings)
    try:
        echo = sender.echo()
    finally:
        sender.close()
    who = f"{settings.ae_title} -> {settings.called_ae_title} at {settings.address}"
    if not echo.ok:
        print(f"C-ECHO {who}: FAILED\n  {echo.detail}", file=out)
        return 1
    print(f"C-ECHO {who}: OK", file=out)
    print(
        f"  round trip:        {echo.round_trip_ms:.1f} ms (association {echo.association_ms:.1f} ms)",
        file=out,
    )
    print(f"  peer AE title:     {echo.their_ae_title}", file=out)
    print(f"  peer max PDU:      {echo.peer_max_pdu or 'unlimited'}", file=out)
    print(f"  our max PDU:       {echo.our_max_pdu or 'unlimited'}", file=out)
    impl = echo.implementation_class_uid + (
        f" ({echo.implementation_version_name})" if echo.implementation_version_name else ""
    )
    print(f"  peer implementation: {impl}", file=out)
    print(f"  TLS:               {'yes' if echo.tls else 'no'}", file=out)
    return 0


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def _meta(path: Path) -> tuple[str, str, str] | str:
    """(SOP class, SOP instance, transfer syntax) of a Part-10 file, or why it is not one."""
    try:
        # Only the file meta group (0002): not the rest of the header (2x faster per file).
        meta = read_file_meta_info(path)
        return (
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
    except (InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
        return f"not a DICOM Part-10 file ({type(exc).__name__})"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"


def run_send(
    settings: DestinationSettings,
    paths: Iterable[Path],
    out: TextIO,
    progress: bool = True,
    associations: int | None = None,
) -> int:
    """Send files and folders (recursively) to the destination; print a summary.

    Non-DICOM files are skipped with a note. Returns 0 when every instance was delivered (success
    or warning), 1 when any failed, 2 when there was nothing to send."""
    if associations:
        settings = replace(settings, max_associations=associations)
    workers = settings.max_associations
    files, skipped = [], []
    for path in _walk(Path(p) for p in paths):
        meta = _meta(path)
        if isinstance(meta, str):
            skipped.append((path, meta))
        else:
            files.append((path, meta))
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=out)
    if not files:
        print("nothing to send: no DICOM Part-10 files found", file=out)
        return 2
    from tqdm import tqdm

    show = progress and sys.stderr.isatty()
    counts: Counter[SendStatus] = Counter()
    problems: list[tuple[Path, SendStatus, str]] = []
    # Worker processes (one association each, up to the core count) when we can fork safely.
    processes = len(plan(workers, len(files))) > 1 and can_fork()
    tqdm.monitor_interval = 0  # no monitor thread: the workers are forked inside the with block
    with tqdm(total=len(files), unit="img", disable=not show, file=sys.stderr) as bar:

        def report(index: int, status: SendStatus, detail: str) -> None:
            counts[status] += 1
            if status is not SendStatus.SUCCESS:
                problems.append((files[index][0], status, detail))
            bar.update(1)

        send_all(settings, files, report, processes=processes)
    failed = counts[SendStatus.RETRYABLE] + counts[SendStatus.PERMANENT]
    for path, status, detail in sorted(problems, key=lambda p: str(p[0])):
        label = "warning" if status is SendStatus.WARNING else f"FAILED ({status.value})"
        print(f"{label}: {path}: {detail}", file=out)
    print(
        f"sent {counts[SendStatus.SUCCESS] + counts[SendStatus.WARNING]} of {len(files)} to "
        f"{settings.called_ae_title} at {settings.address}: {counts[SendStatus.SUCCESS]} ok, "
        f"{counts[SendStatus.WARNING]} with warnings, {failed} failed"
        + (f", {len(skipped)} non-DICOM files skipped" if skipped else ""),
        file=out,
    )
    return 1 if failed else 0


def _settings(ctx: click.Context, name: str) -> DestinationSettings:
    from intu_core.cli import load_project_from_context

    project = load_project_from_context(ctx)
    try:
        type_name, settings = project.destination_settings(name)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    if type_name != "dicom":
        raise click.UsageError(f"destination {name!r} is of type {type_name!r}, not dicom")
    if settings.tls.enabled:
        try:  # fail here, once, rather than in every worker
            client_context(settings.tls)
        except TlsConfigError as exc:
            raise click.ClickException(f"destination {name!r}: {exc}") from None
    return settings


@click.group()
def dicom() -> None:
    """DICOM tools: C-ECHO and C-STORE to a configured destination."""


@dicom.command()
@click.argument("destination")
@click.pass_context
def echo(ctx: click.Context, destination: str) -> None:
    """C-ECHO DESTINATION (from intu.yaml) and show the negotiated parameters."""
    ctx.exit(run_echo(_settings(ctx, destination), sys.stdout))


@dicom.command()
@click.argument("destination")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--associations",
    "-j",
    type=click.IntRange(1, 64),
    default=None,
    help="parallel associations (default: the destination's max_associations); one worker "
    "process per association up to the number of cores",
)
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.pass_context
def send(
    ctx: click.Context, destination: str, paths: tuple[Path, ...], associations: int | None, no_progress: bool
) -> None:
    """Send DICOM files and folders (recursively) to DESTINATION (from intu.yaml)."""
    settings = _settings(ctx, destination)
    ctx.exit(run_send(settings, paths, sys.stdout, progress=not no_progress, associations=associations))
