"""The ``intu`` command line: serve, validate, plugins, queue, and commands from plugins."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading
from pathlib import Path

import click

from intu_core import __version__, logfmt
from intu_core.config.problems import ConfigError
from intu_core.config.project import Project, find_config, load_project
from intu_core.plugins import PluginRegistry, load_plugins

LOG_FORMAT = logfmt.TEXT_FORMAT


class CliState:
    """What every command can ask for: the project folder, the plugins, the loaded project."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else Path.cwd()
        self._registry: PluginRegistry | None = None
        self._project: Project | None = None

    def registry(self) -> PluginRegistry:
        if self._registry is None:
            self._registry = load_plugins()
        return self._registry

    def project(self) -> Project:
        if self._project is None:
            self._project = load_project(self.directory, self.registry())
        return self._project

    def data_dir(self) -> Path:
        return self.project().data_dir


def load_project_from_context(ctx: click.Context) -> Project:
    """The project of the running command, or exit with every configuration error printed."""
    state: CliState = ctx.find_object(CliState)  # type: ignore[assignment]
    try:
        return state.project()
    except ConfigError as err:
        print_problems(err)
        ctx.exit(2)
        raise  # unreachable; keeps type checkers content


def print_problems(err: ConfigError) -> None:
    click.echo(err.report(), err=True)


def _dir_option(fn):  # type: ignore[no-untyped-def]
    """``--dir`` on sub-commands too, so ``intu serve --dir examples`` reads naturally."""

    def set_dir(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(CliState).directory = Path(value)

    return click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=True),
        expose_value=False,
        callback=set_dir,
        is_eager=True,
        help="Project folder holding intu.yaml (default: the current folder).",
    )(fn)


# Core command groups imported only when they run or are listed (`intu --help`): name -> module
# and attribute. `intu dicom send` then does not import the queue and history commands.
_LAZY_COMMANDS = {
    "messages": ("intu_core.history_commands", "messages"),
    "queue": ("intu_core.queue.commands", "queue"),
}


class IntuGroup(click.Group):
    """Adds the commands that plugins provide, once, when the command line is built, and the
    core's ``_LAZY_COMMANDS`` when they are asked for."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._plugins_added = False

    def _add_plugin_commands(self, ctx: click.Context) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        # The registry the command will use too: entry points are read and hooks called once.
        for command in ctx.ensure_object(CliState).registry().commands():
            if command.name in self.commands or command.name in _LAZY_COMMANDS:
                logging.getLogger("intu.plugins").warning("command %r already exists; skipped", command.name)
                continue
            self.add_command(command)

    def _lazy_command(self, name: str) -> click.Command | None:
        if name not in self.commands and name in _LAZY_COMMANDS:
            module, attribute = _LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return self.commands.get(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands(ctx)
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if self._lazy_command(name) is None:
            self._add_plugin_commands(ctx)
        return super().get_command(ctx, name)


@click.group(cls=IntuGroup)
@click.version_option(__version__, prog_name="intu")
@click.option(
    "--dir",
    "directory",
    type=click.Path(),
    default=None,
    envvar="INTU_DIR",
    help="Project folder holding intu.yaml (default: the current folder).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="INTU_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    envvar="INTU_LOG_FORMAT",
    type=click.Choice(list(logfmt.FORMATS), case_sensitive=False),
    help="text for people; json (one object per line) for log shippers.",
)
@click.pass_context
def cli(ctx: click.Context, directory: str | None, log_level: str, log_format: str) -> None:
    """intu: a small integration engine. Channels live as files in git; plugins add types."""
    logfmt.configure(log_level, log_format.lower())
    state = ctx.ensure_object(CliState)
    if directory is not None:
        state.directory = Path(directory)


@cli.command()
@_dir_option
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Check intu.yaml, every channel and its stage files; print every error at once."""
    from intu_core.engine import Engine

    state: CliState = ctx.find_object(CliState)  # type: ignore[assignment]
    registry = state.registry()
    try:
        project = state.project()
        Engine(project, registry).check_stages()
    except ConfigError as err:
        print_problems(err)
        ctx.exit(1)
    for problem in registry.errors:
        click.echo(f"warning: {problem}", err=True)
    click.echo(
        f"{find_config(state.directory)}: OK: {len(project.destinations)} destination(s), "
        f"{len(project.channels)} channel(s)"
    )


@cli.command()
@_dir_option
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run every enabled channel until SIGINT or SIGTERM."""
    from intu_core.engine import Engine

    state: CliState = ctx.find_object(CliState)  # type: ignore[assignment]
    project = load_project_from_context(ctx)
    for problem in state.registry().errors:
        logging.getLogger("intu.plugins").warning("%s", problem)
    engine = Engine(project, state.registry())
    try:
        engine.build()
        engine.serve_forever()
    except ConfigError as err:
        print_problems(err)
        ctx.exit(2)
    except (OSError, RuntimeError) as exc:  # a port taken, a damaged queue: one clear line, no traceback
        logging.getLogger("intu.engine").debug("start failed", exc_info=True)
        click.echo(f"intu serve: {exc}", err=True)
        ctx.exit(1)
    if engine.failure is not None:  # e.g. its delivery process ended
        click.echo(f"intu serve: {engine.failure}", err=True)
        ctx.exit(1)


@cli.command("delivery-process", hidden=True)
@click.option("--wake-fd", type=int, required=True, help="Read queue names to wake; end of file: stop.")
@click.option("--status-fd", type=int, required=True, help="Write a JSON report twice a second.")
@click.pass_context
def delivery_process(ctx: click.Context, wake_fd: int, status_fd: int) -> None:
    """The process that `intu serve` starts to send to queued destinations (delivery.process)."""
    from intu_core.delivery_process import run_delivery_process

    state: CliState = ctx.find_object(CliState)  # type: ignore[assignment]
    project = load_project_from_context(ctx)
    ctx.exit(run_delivery_process(project, state.registry(), wake_fd, status_fd))


@cli.command()
@click.pass_context
def plugins(ctx: click.Context) -> None:
    """List installed plugins, their versions and the types they provide."""
    state: CliState = ctx.ensure_object(CliState)
    registry = state.registry()
    registry.commands()  # fills in each plugin's commands
    for info in registry.plugins:
        click.echo(f"{info.distribution} {info.version} (entry point {info.name!r})")
        if info.error:
            click.echo(f"  ERROR: {info.error}")
            continue
        if info.destination_types:
            click.echo(f"  destination types: {', '.join(info.destination_types)}")
        if info.source_types:
            click.echo(f"  source types: {', '.join(info.source_types)}")
        if info.queue_backends:
            click.echo(f"  queue backends: {', '.join(info.queue_backends)}")
        if info.settings_blocks:
            click.echo(f"  intu.yaml blocks: {', '.join(info.settings_blocks)}")
        if info.commands:
            click.echo(f"  commands: {', '.join(info.commands)}")
    for problem in registry.unusable.values():
        click.echo(f"ERROR: {problem}")


_exit_at_once = False


def exit_at_once() -> None:
    """Let the `intu` process end as soon as the running command has returned and its output is
    flushed, without the interpreter's teardown (10-20 ms with pydicom and numpy loaded, of a
    command that runs for well under a second). For one-shot commands that leave no unflushed
    file, non-daemon thread or unfinished child process behind: ``atexit`` handlers still run,
    but objects' finalizers (``__del__``, weakref callbacks) do not, nor do daemon threads get
    to finish; where a non-daemon thread is alive or the output cannot be flushed, the process
    ends as usual, as it does under a profiler, a debugger, coverage or ``python -i``. Only
    ``main`` (the console script) acts on it: a command run by click's test runner, or by a
    program that calls ``cli`` itself, is not affected."""
    global _exit_at_once
    _exit_at_once = True


def main() -> None:
    """The `intu` command (console script and ``python -m intu_core``)."""
    global _exit_at_once
    _exit_at_once = False
    try:
        cli(obj=None, auto_envvar_prefix=None)
    except SystemExit as exc:  # click ends every command with it (standalone mode)
        if _exit_at_once:
            _end_now(exc.code)
        raise


def _end_now(code: object) -> None:
    """``os._exit`` with the status ``sys.exit(code)`` would give, after what the interpreter's
    exit does that can be seen from outside: returns instead when that is not certain."""
    if code is None:
        code = 0
    if not isinstance(code, int) or not 0 <= code <= 255:  # Python prints a message, or wraps
        return
    if sys.getprofile() or sys.gettrace() or sys.flags.interactive:
        return  # a profiler, a debugger, coverage or `python -i` acts after the command
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return  # the interpreter would wait for it
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's; also clears them
    if run_exitfuncs is None:
        return
    run_exitfuncs()  # logging.shutdown (flushes the log handlers), multiprocessing's, ...
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # e.g. a closed pipe: the interpreter reports it as usual
        return
    os._exit(code)


if __name__ == "__main__":
    # Under `python -m intu_core.cli` this file is a second module; plugins import the real one.
    from intu_core.cli import main as _main

    _main()
