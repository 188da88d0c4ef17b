"""Plugin discovery through real entry points, and plugins that go wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from project_files import fake_distribution, write

from intu_core.cli import cli
from intu_core.config.problems import ConfigError
from intu_core.config.project import load_project
from intu_core.plugins import load_plugins

REPO = Path(__file__).resolve().parents[1]

GOOD_PLUGIN = """
from intu_core import DestinationType, SendResult, hookimpl

def parse(section):
    section.done()

class Nothing:
    def __init__(self, settings, runtime): pass
    def send(self, message): return SendResult.success()
    def close(self): pass

@hookimpl
def intu_destination_types():
    return [DestinationType("{name}", parse, Nothing)]
"""


def test_types_are_discovered_from_an_installed_distribution(site):
    fake_distribution(
        site,
        "intu-nothing",
        "1.2.3",
        {"nothing": "fakeplugin_nothing"},
        {"fakeplugin_nothing": GOOD_PLUGIN.replace("{name}", "nothing")},
    )
    registry = load_plugins()
    assert registry.destination_types["nothing"].plugin.label == "intu-nothing 1.2.3"
    assert "file" in registry.destination_types and "log" in registry.destination_types


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_goes_on(site, tmp_path):
    fake_distribution(
        site,
        "intu-broken",
        "0.9",
        {"broken": "fakeplugin_broken"},
        {"fakeplugin_broken": "import a_module_that_does_not_exist\n"},
    )
    registry = load_plugins()
    (broken,) = [p for p in registry.plugins if p.distribution == "intu-broken"]
    assert "ModuleNotFoundError" in broken.error and "a_module_that_does_not_exist" in broken.error
    assert "file" in registry.destination_types  # the others still load

    # A channel that needs the missing type fails validation naming the plugin that should provide it.
    write(tmp_path / "intu.yaml", "destinations:\n  x:\n    type: broken\n    broken: {}\n")
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path, registry)
    (problem,) = info.value.problems
    text = str(problem)
    assert "intu.yaml:3: destinations.x.type: unknown destination type 'broken'" in text
    assert "plugin 'broken' from intu-broken 0.9 failed to load" in text


def test_duplicate_type_names_name_both_distributions(site):
    fake_distribution(
        site,
        "intu-one",
        "1.0",
        {"one": "fakeplugin_one"},
        {"fakeplugin_one": GOOD_PLUGIN.replace("{name}", "twin")},
    )
    fake_distribution(
        site,
        "intu-two",
        "2.0",
        {"two": "fakeplugin_two"},
        {"fakeplugin_two": GOOD_PLUGIN.replace("{name}", "twin")},
    )
    registry = load_plugins()
    assert "twin" not in registry.destination_types
    _, why = registry.lookup("destination", "twin")
    assert "provided twice" in why and "intu-one 1.0" in why and "intu-two 2.0" in why


def test_a_misspelled_hook_is_caught(site):
    source = GOOD_PLUGIN.replace("{name}", "typo").replace(
        "def intu_destination_types", "def intu_destinaton_types"
    )
    fake_distribution(site, "intu-typo", "0.1", {"typo": "fakeplugin_typo"}, {"fakeplugin_typo": source})
    registry = load_plugins()
    (typo,) = [p for p in registry.plugins if p.distribution == "intu-typo"]
    assert "unknown hook" in typo.error and "intu_destinaton_types" in typo.error


def test_a_plugin_whose_hook_raises_is_isolated(site):
    source = (
        "from intu_core import hookimpl\n"
        "@hookimpl\ndef intu_destination_types():\n    raise RuntimeError('boom')\n"
    )
    fake_distribution(
        site, "intu-raises", "0.1", {"raises": "fakeplugin_raises"}, {"fakeplugin_raises": source}
    )
    registry = load_plugins()
    (bad,) = [p for p in registry.plugins if p.distribution == "intu-raises"]
    assert "intu_destination_types() failed: RuntimeError: boom" in bad.error


def test_intu_plugins_lists_plugins_versions_and_types(site):
    fake_distribution(
        site,
        "intu-nothing",
        "1.2.3",
        {"nothing": "fakeplugin_nothing"},
        {"fakeplugin_nothing": GOOD_PLUGIN.replace("{name}", "nothing")},
    )
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "intu-core 0.1.0" in result.output and "destination types: file, log" in result.output
    assert "intu-nothing 1.2.3 (entry point 'nothing')" in result.output
    assert "destination types: nothing" in result.output


NOT_A_COMMAND_PLUGIN = """
import click
from intu_core import hookimpl

@click.command()
def fine():
    "A command that works."

@hookimpl
def intu_cli_commands():
    return [fine, "not a command"]
"""


def test_a_plugin_returning_something_else_than_a_click_command_is_reported(site):
    fake_distribution(
        site,
        "intu-badcli",
        "0.3",
        {"badcli": "fakeplugin_badcli"},
        {"fakeplugin_badcli": NOT_A_COMMAND_PLUGIN},
    )
    registry = load_plugins()
    assert "fine" not in [c.name for c in registry.commands()]  # a broken plugin adds no command
    (bad,) = [p for p in registry.plugins if p.distribution == "intu-badcli"]
    assert bad.error == (
        "intu_cli_commands() failed: TypeError: returned 'not a command', expected a click.Command"
    )

    helped = CliRunner().invoke(cli, ["--help"])
    assert helped.exit_code == 0, helped.output
    assert "validate" in helped.output and "fine" not in helped.output
    listed = CliRunner().invoke(cli, ["plugins"])
    assert listed.exit_code == 0, listed.output
    assert "intu-badcli 0.3 (entry point 'badcli')\n  ERROR: intu_cli_commands() failed: TypeError" in (
        listed.output
    )


def test_the_documented_example_plugin_installs_and_runs(tmp_path):
    """docs/example-plugin is a complete third-party plugin: install it for real and run a channel."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(REPO / "docs" / "example-plugin"),
        ],
        check=True,
        capture_output=True,
    )
    project = tmp_path / "project"
    write(
        project / "intu.yaml",
        "destinations:\n  lines:\n    type: jsonl\n    jsonl: {path: out.jsonl}\n"
        "    queue: {enabled: false}\n",
    )
    write(project / "channels" / "c" / "channel.yaml", "source: {type: manual}\ndestinations: [lines]\n")
    script = f"""
import sys
from intu_core.message import Message
from intu_core.testing import engine_deliver, manual_source, running_engine
from intu_core.plugins import load_plugins
registry = load_plugins(extra=[manual_source])
with running_engine({str(project)!r}, registry) as engine:
    print(engine_deliver(engine, "c", Message(body={{"hello": "world"}})).status.value)
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    listed = subprocess.run(["intu", "plugins"], env=env, capture_output=True, text=True, check=True)
    assert "intu-jsonl-destination 0.1.0" in listed.stdout and "destination types: jsonl" in listed.stdout
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=project)
    assert run.stdout.strip() == "accepted", run.stderr
    assert '"body": {"hello": "world"}' in (project / "out.jsonl").read_text()
