"""`intu dicom echo DESTINATION` and `intu dicom send DESTINATION PATH...`.

The click commands are thin: they load the project's destination settings and call
``run_echo`` / ``run_send``, which take settings and an output stream (and are what tests call).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from intu_core.cli import exit_at_once
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.shared.imports import deferred_imports, send_imports
from intu_dicom_destination.shared.tls import TlsConfigError, client_context

if TYPE_CHECKING:
    from intu_dicom_destination.cli.echo import run_echo
    from intu_dicom_destination.cli.send import run_send

__all__ = ["dicom", "run_echo", "run_send"]


def __getattr__(name: str) -> Any:
    # run_echo and run_send import pynetdicom and pydicom (~0.5 s of CPU): only when a command
    # runs, not whenever `intu` lists its commands (`intu --help`, `intu plugins`).
    if name == "run_echo":
        from intu_dicom_destination.cli.echo import run_echo

        return run_echo
    if name == "run_send":
        from intu_dicom_destination.cli.send import run_send

        return run_send
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    exit_at_once()  # nothing left running when it returns (pynetdicom's threads are daemons)
    with deferred_imports("requests"):
        from intu_dicom_destination.cli.echo import run_echo

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
    # Its children are reaped and its thread pools joined before it returns.
    exit_at_once()
    from intu_dicom_destination.cli.files import walk
    from intu_dicom_destination.cli.lookahead import Lookahead

    settings = _settings(ctx, destination)
    # The files are looked at in a child process while this one imports pynetdicom and pydicom.
    ahead = Lookahead.start(list(walk(paths)))
    # pynetdicom and pydicom imported here, once: the forked workers share them.
    try:
        with send_imports():
            from intu_dicom_destination.cli.send import run_send
    except BaseException:
        if ahead is not None:
            ahead.results()  # the child stopped and reaped, not left behind
        raise

    code = run_send(
        settings, paths, sys.stdout, progress=not no_progress, associations=associations, ahead=ahead
    )
    ctx.exit(code)
