"""A plugin's own top-level block of intu.yaml: parsed by the plugin, errors like every other."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from project_files import fake_distribution, write

from intu_core import EngineView, Section, SettingsBlock, hookimpl
from intu_core.cli import cli
from intu_core.config.problems import ConfigError
from intu_core.config.project import load_project
from intu_core.testing import manual_source, registry_with, running_engine


@dataclass(frozen=True)
class MetricsSettings:
    port: int
    host: str


def parse_metrics(section: Section) -> MetricsSettings:
    settings = MetricsSettings(section.int("port", min=1, max=65535), section.str("host", "127.0.0.1"))
    section.done()
    return settings


@hookimpl
def intu_settings_blocks() -> list[SettingsBlock]:
    return [SettingsBlock("metrics", parse_metrics, "a /metrics endpoint")]


metrics_plugin = SimpleNamespace(intu_settings_blocks=intu_settings_blocks, __name__="metrics_plugin")

ROOT = """
    destinations:
      archive: {type: log}
"""


def project(tmp_path, extra=""):
    write(tmp_path / "intu.yaml", ROOT + extra)
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        "source: {type: manual}\ndestinations: [archive]\n",
    )
    return tmp_path


def problems_of(tmp_path, *plugins):
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path, registry_with(manual_source, *plugins))
    return [str(p) for p in info.value.problems]


def test_a_plugin_block_is_parsed_by_the_plugin(tmp_path):
    project(tmp_path, "metrics: {port: 9464}\n")
    loaded = load_project(tmp_path, registry_with(manual_source, metrics_plugin))
    assert loaded.plugin_settings == {"metrics": MetricsSettings(9464, "127.0.0.1")}


def test_a_missing_block_is_not_parsed(tmp_path):
    # The parser requires 'port': installing the plugin must not make other projects invalid.
    loaded = load_project(project(tmp_path), registry_with(manual_source, metrics_plugin))
    assert loaded.plugin_settings == {}


def test_a_bad_value_is_reported_with_file_line_and_key_path(tmp_path):
    project(tmp_path, "metrics:\n  port: abc\n  hots: x\n")
    file = tmp_path / "intu.yaml"
    assert problems_of(tmp_path, metrics_plugin) == [
        f"{file}:4: metrics.port: expected an integer from 1 to 65535, found 'abc'",
        f"{file}:5: metrics.hots: unknown key 'hots' (did you mean 'host'?)",
    ]


def test_an_unknown_top_level_key_suggests_a_plugin_key(tmp_path):
    project(tmp_path, "metrcs: {port: 1}\n")
    (problem,) = problems_of(tmp_path, metrics_plugin)
    assert "metrcs: unknown key 'metrcs' (did you mean 'metrics'?)" in problem
    # Without the plugin the key is simply unknown.
    (problem,) = problems_of(project(tmp_path, "metrics: {port: 1}\n"))
    assert "unknown key 'metrics'" in problem


def test_a_parser_that_raises_is_reported_and_the_rest_is_checked(tmp_path):
    def broken(section: Section) -> None:
        raise RuntimeError("boom")

    plugin = SimpleNamespace(
        intu_settings_blocks=hookimpl(lambda: [SettingsBlock("metrics", broken)]), __name__="broken_plugin"
    )
    project(tmp_path, "metrics: {}\nmin_free_disk_mb: -1\n")
    problems = problems_of(tmp_path, plugin)
    assert any("metrics: the plugin providing 'metrics' failed to parse its settings" in p for p in problems)
    assert any("min_free_disk_mb: expected an integer of at least 0" in p for p in problems)


@pytest.mark.parametrize(
    ("key", "why"),
    [("queue", "one of intu.yaml's own keys"), ("data_dir", "own keys"), ("Metrics", "lowercase")],
)
def test_core_keys_and_bad_keys_are_refused(key, why):
    with pytest.raises(ValueError, match=why):
        SettingsBlock(key, parse_metrics)
    plugin = SimpleNamespace(
        intu_settings_blocks=hookimpl(lambda: [SettingsBlock(key, parse_metrics)]), __name__="bad_plugin"
    )
    registry = registry_with(plugin)
    (info,) = [p for p in registry.plugins if p.name == "bad_plugin"]
    assert info.error and "intu_settings_blocks() failed: ValueError" in info.error
    assert key not in registry.settings_blocks


PLUGIN_MODULE = """
from intu_core import SettingsBlock, hookimpl

def parse(section):
    port = section.int("port", min=1, max=65535)
    section.done()
    return port

@hookimpl
def intu_settings_blocks():
    return [SettingsBlock("metrics", parse)]
"""


def install(site, dist, module):
    fake_distribution(site, dist, "1.0", {module: module}, {module: PLUGIN_MODULE})
    fake_distribution(site, "intu-testing", "0.0", {"manual": "intu_core.testing:manual_source"})


def test_intu_validate_reports_a_bad_value_in_a_plugin_block(site, tmp_path):
    install(site, "intu-metrics", "fakeplugin_metrics")
    project(tmp_path, "metrics:\n  port: 70000\n")
    result = CliRunner().invoke(cli, ["validate", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'intu.yaml'}:4: metrics.port: expected an integer from 1 to 65535, found 70000" in (
        result.output
    )
    listed = CliRunner().invoke(cli, ["plugins"])
    assert "intu-metrics 1.0" in listed.output and "intu.yaml blocks: metrics" in listed.output


def test_a_key_provided_twice_names_both_distributions(site, tmp_path):
    install(site, "intu-metrics", "fakeplugin_metrics")
    install(site, "intu-other-metrics", "fakeplugin_other_metrics")
    project(tmp_path, "metrics: {port: 9464}\n")
    result = CliRunner().invoke(cli, ["validate", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "intu.yaml:3: metrics: settings block 'metrics' is provided twice: by " in result.output
    assert "intu-metrics 1.0" in result.output and "intu-other-metrics 1.0" in result.output


def test_the_engine_view_hands_the_settings_to_the_plugin(tmp_path):
    seen: list[object] = []

    @hookimpl
    def intu_engine_started(engine: EngineView) -> None:
        seen.append(engine.settings("metrics"))
        seen.append(engine.settings("absent", "default"))

    plugin = SimpleNamespace(
        intu_settings_blocks=intu_settings_blocks, intu_engine_started=intu_engine_started, __name__="watcher"
    )
    project(tmp_path, "metrics: {port: 9464, host: 0.0.0.0}\n")
    with running_engine(tmp_path, registry_with(manual_source, plugin)):
        assert seen == [MetricsSettings(9464, "0.0.0.0"), "default"]
