"""`intu` starts with less work: the ``queue`` and ``messages`` groups are imported when they run or
are listed, and a one-shot command may end the process without the interpreter's teardown
(``exit_at_once``). What every command prints, and its exit status, are unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from intu_core import cli as cli_module
from intu_core.cli import _LAZY_COMMANDS, cli


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_lazy_groups_and_they_run() -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0, res.output
    for name in _LAZY_COMMANDS:
        assert f"  {name} " in res.output
    assert "Look at, retry and purge the delivery queues" in res.output
    for name in _LAZY_COMMANDS:
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, res.output
        assert f"Usage: cli {name}" in res.output


# A process with the `intu` command line and no installed plugin (the core's tests run without
# them), a command ``probe`` added and its options passed as arguments.
PROBE = """
import atexit, os, sys, threading, time
import click
from intu_core import cli as c, plugins
plugins._entry_points = lambda: []

class Teardown:
    def __del__(self):  # runs only in the interpreter's teardown
        os.write(2, b"teardown\\n")

keep = Teardown()
atexit.register(lambda: print("atexit ran", flush=True))

@c.cli.command()
@click.option("--code", type=int, default=0)
@click.option("--thread", is_flag=True)
@click.option("--interrupt", is_flag=True)
@click.option("--lazy", is_flag=True)
def probe(code, thread, interrupt, lazy):
    c.exit_at_once()
    if lazy:
        lazy_modules = ("intu_core.queue.commands", "intu_core.history_commands")
        print(sorted(m for m in lazy_modules if m in sys.modules))
    print("to stdout")
    click.echo("to stderr", err=True)
    if thread:  # a non-daemon thread: the interpreter waits for it, so must we
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread done", flush=True))).start()
    if interrupt:
        raise KeyboardInterrupt
    sys.exit(code)

sys.argv = ["intu", "probe", *sys.argv[1:]]
c.main()
"""


def test_a_one_shot_command_ends_at_once_with_its_output_and_exit_status() -> None:
    for code in (0, 3):
        res = _python(PROBE, "--code", str(code))  # stdout and stderr are pipes here
        assert res.returncode == code
        assert res.stdout == "to stdout\natexit ran\n"
        assert res.stderr == "to stderr\n"  # no "teardown": os._exit, after atexit and a flush


def test_ctrl_c_in_a_one_shot_command_still_says_aborted_and_exits_1() -> None:
    res = _python(PROBE, "--interrupt")
    assert res.returncode == 1
    assert res.stdout == "to stdout\natexit ran\n"
    assert res.stderr == "to stderr\n\nAborted!\n"


def test_a_non_daemon_thread_still_alive_means_the_usual_exit() -> None:
    res = _python(PROBE, "--thread", "--code", "4")
    assert res.returncode == 4
    assert res.stdout == "to stdout\nthread done\natexit ran\n"
    assert "teardown" in res.stderr


def test_a_usage_error_ends_the_usual_way_when_no_command_asked_to_end_at_once() -> None:
    res = _python(PROBE, "--code", "nan")  # refused before the command's body asks
    assert res.returncode == 2
    assert "Invalid value for '--code'" in res.stderr
    assert "teardown" in res.stderr


def test_other_commands_do_not_import_the_lazy_groups() -> None:
    res = _python(PROBE, "--lazy")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "[]"


def test_exit_at_once_is_only_acted_on_by_main() -> None:
    # The test runner's invocation leaves the flag set; only main() reads it (and resets it).
    cli_module.exit_at_once()
    try:
        res = CliRunner().invoke(cli, ["--help"])
        assert res.exit_code == 0
    finally:
        cli_module._exit_at_once = False


def test_a_plugin_command_named_like_a_lazy_group_is_skipped_with_a_warning() -> None:
    plugin = """
        import click, sys
        from intu_core import cli as c
        from intu_core.hookspecs import hookimpl
        from intu_core.testing import registry_with

        @click.command("queue", help="The plugin's queue command.")
        def impostor():
            print("the plugin's queue ran")

        class Plugin:
            @hookimpl
            def intu_cli_commands(self):
                return [impostor]

        c.load_plugins = lambda: registry_with(Plugin())
        sys.argv = ["intu", *sys.argv[1:]]
        c.main()
        """
    listed = _python(plugin, "--help")
    assert listed.returncode == 0, listed.stderr
    assert "Look at, retry and purge the delivery queues" in listed.stdout  # the core's group
    assert "The plugin's queue command" not in listed.stdout
    assert "command 'queue' already exists; skipped" in listed.stderr
    ran = _python(plugin, "queue", "list", "--help")
    assert ran.returncode == 0, ran.stderr
    assert "Usage: intu queue list" in ran.stdout and "the plugin's queue ran" not in ran.stdout


def test_without_cpythons_atexit_runner_the_exit_is_the_usual_one() -> None:
    res = _python(PROBE.replace("import click", "import click\ndel atexit._run_exitfuncs"), "--code", "5")
    assert res.returncode == 5
    assert res.stdout == "to stdout\natexit ran\n"
    assert "teardown" in res.stderr  # the interpreter's own exit, atexit and all


def test_output_that_cannot_be_flushed_ends_as_it_would_without_exit_at_once() -> None:
    # stdout a pipe whose reader is gone: exit status and messages as without exit_at_once.
    def run(probe: str) -> tuple[int, str]:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(probe)], stdout=write_end, stderr=subprocess.PIPE,
                text=True, timeout=120,
            )  # fmt: skip
        finally:
            os.close(write_end)
        return proc.returncode, re.sub(r" at 0x[0-9a-f]+", "", proc.stderr)

    at_once, usual = run(PROBE), run(PROBE.replace("c.exit_at_once()", "pass"))
    assert "BrokenPipeError" in at_once[1]
    assert at_once == (usual[0], usual[1].replace("teardown\n", ""))


def test_under_a_profiler_or_tracer_the_exit_is_the_usual_one() -> None:
    # `python -m cProfile -m intu_core ...` prints its profile once main() has raised SystemExit.
    for hook in ("sys.setprofile(lambda *a: None)", "sys.settrace(lambda *a: None)", "pass"):
        probe = PROBE.replace("c.main()", f"{hook}\ntry:\n    c.main()\nfinally:\n    print('after main')")
        res = _python(probe, "--code", "6")
        assert res.returncode == 6, (hook, res.stderr)
        after = "to stdout\nafter main\natexit ran\n"
        assert res.stdout == (after if hook != "pass" else "to stdout\natexit ran\n"), hook
