"""Configuration errors name the file, the key path, the line, what was expected and what was found."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from project_files import fake_distribution, write

from intu_core.cli import cli
from intu_core.config.problems import ConfigError
from intu_core.config.project import load_project
from intu_core.testing import manual_source, registry_with

GOOD_ROOT = """
    channels_dir: channels
    destinations:
      archive:
        type: file
        file:
          directory: out
        queue: {enabled: true, threads: 1}
        retry: {max_attempts: 3, backoff: linear, initial_delay_ms: 100, max_delay_ms: 1000}
"""

GOOD_CHANNEL = """
    name: inbound
    source:
      type: manual
    destinations:
      - archive
      - name: audit
        type: log
        log: {level: info}
"""


def project(tmp_path: Path, root: str = GOOD_ROOT, channel: str = GOOD_CHANNEL) -> Path:
    write(tmp_path / "intu.yaml", root)
    write(tmp_path / "channels" / "inbound" / "channel.yaml", channel)
    return tmp_path


def problems_of(tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path, registry_with(manual_source))
    return [str(p) for p in info.value.problems]


def test_a_valid_project_loads_with_named_and_inline_destinations(tmp_path):
    loaded = load_project(project(tmp_path), registry_with(manual_source))
    (channel,) = loaded.channels
    assert [d.destination.name for d in channel.destinations] == ["archive", "inbound.audit"]
    archive = loaded.destination("archive")
    assert archive.settings.directory == tmp_path / "out"
    assert archive.retry.max_attempts == 3 and archive.retry.backoff == "linear"
    assert loaded.data_dir == tmp_path / "data"


def test_unknown_key_names_file_line_path_and_suggests(tmp_path):
    root = GOOD_ROOT.replace("directory: out", "directroy: out")
    found = problems_of(project(tmp_path, root))
    file = tmp_path.resolve() / "intu.yaml"
    assert (
        f"{file}:6: destinations.archive.file.directroy: unknown key 'directroy' (did you mean 'directory'?)"
        in found
    )
    assert f"{file}:5: destinations.archive.file: missing required key 'directory'" in found


def test_wrong_type_says_expected_and_found(tmp_path):
    root = GOOD_ROOT.replace("threads: 1", "threads: many")
    (problem,) = problems_of(project(tmp_path, root))
    assert "intu.yaml:7: destinations.archive.queue.threads: expected an integer" in problem
    assert "found 'many'" in problem


def test_every_error_is_reported_at_once(tmp_path):
    root = GOOD_ROOT.replace("type: file", "type: fiel").replace("backoff: linear", "backoff: sideways")
    channel = GOOD_CHANNEL.replace("- archive", "- archiv").replace(
        "type: manual", "type: manual\n      colour: red"
    )
    found = problems_of(project(tmp_path, root, channel))
    text = "\n".join(found)
    assert (
        "destinations.archive.type: unknown destination type 'fiel'" in text and "did you mean 'file'" in text
    )
    assert (
        "destinations.archive.retry.backoff: expected one of constant, linear, exponential, found 'sideways'"
        in text
    )
    assert "source.colour: unknown key 'colour'" in text
    assert "destinations[0].name: unknown destination 'archiv'" in text and "did you mean 'archive'" in text
    assert len(found) >= 4


def test_yaml_syntax_error_names_the_line(tmp_path):
    (problem,) = problems_of(project(tmp_path, "destinations:\n  archive: [unclosed\n"))
    assert "intu.yaml:3: invalid YAML" in problem or "intu.yaml:2: invalid YAML" in problem


def test_environment_and_dotenv_substitution(tmp_path, monkeypatch):
    root = GOOD_ROOT.replace("directory: out", "directory: ${OUT_DIR}").replace(
        "threads: 1", "threads: '${THREADS:-4}'"
    )
    project(tmp_path, root)
    write(tmp_path / ".env", "OUT_DIR=from-dotenv\n")
    monkeypatch.delenv("OUT_DIR", raising=False)
    loaded = load_project(tmp_path, registry_with(manual_source))
    assert loaded.destination("archive").settings.directory == tmp_path / "from-dotenv"
    assert loaded.destination("archive").queue.threads == 4
    monkeypatch.setenv("OUT_DIR", "from-env")  # the process environment wins over .env
    loaded = load_project(tmp_path, registry_with(manual_source))
    assert loaded.destination("archive").settings.directory == tmp_path / "from-env"


def test_unset_variable_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    root = GOOD_ROOT.replace("directory: out", "directory: ${NOT_SET_ANYWHERE}")
    (problem,) = problems_of(project(tmp_path, root))
    assert (
        "destinations.archive.file.directory: environment variable 'NOT_SET_ANYWHERE' is not set" in problem
    )


def test_missing_source_and_destinations(tmp_path):
    found = problems_of(project(tmp_path, channel="name: inbound\n"))
    text = "\n".join(found)
    assert "channel.yaml:1: missing required key 'source'" in text
    assert "missing required key 'destinations'" in text


@pytest.fixture
def installed_manual_source(site):
    """`intu validate` reads installed plugins only: install the test source as a distribution."""
    fake_distribution(site, "intu-testing", "0.0", {"manual": "intu_core.testing:manual_source"})


def test_intu_validate_prints_all_errors_and_exits_non_zero(tmp_path, installed_manual_source):
    root = GOOD_ROOT.replace("type: file", "type: fiel").replace("threads: 1", "threads: -1")
    project(tmp_path, root)
    result = CliRunner().invoke(cli, ["validate", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "configuration error(s)" in result.output
    assert "unknown destination type 'fiel'" in result.output
    assert "destinations.archive.queue.threads: expected an integer" in result.output


def test_intu_validate_says_ok(tmp_path, installed_manual_source):
    project(tmp_path)
    result = CliRunner().invoke(cli, ["validate", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "OK: 1 destination(s), 1 channel(s)" in result.output


def test_intu_validate_reports_a_broken_transformer(tmp_path, installed_manual_source):
    project(
        tmp_path,
        GOOD_ROOT.replace("type: file", "type: log").replace("file:\n          directory: out", "log: {}"),
    )
    write(tmp_path / "channels" / "inbound" / "transformer.py", "def transform(msg, ctx)\n    return msg\n")
    result = CliRunner().invoke(cli, ["validate", "--dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "cannot load a stage file: SyntaxError" in result.output


def test_a_source_filter_given_twice_is_an_error(tmp_path):
    channel = GOOD_CHANNEL.replace("type: manual", "type: manual\n      filter: a.py") + "    filter: b.py\n"
    project(tmp_path, channel=channel)
    write(tmp_path / "channels" / "inbound" / "a.py", "def filter(msg, ctx):\n    return True\n")
    write(tmp_path / "channels" / "inbound" / "b.py", "def filter(msg, ctx):\n    return True\n")
    (problem,) = problems_of(tmp_path)
    assert "channel.yaml:10: filter: the source filter is given twice" in problem


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "", "x" * 65, "spa ce"])
def test_a_channel_name_that_is_not_a_safe_folder_name_is_an_error(tmp_path, name):
    project(tmp_path, channel=GOOD_CHANNEL.replace("name: inbound", f"name: {name!r}"))
    [problem] = problems_of(tmp_path)
    assert problem.startswith(f"{tmp_path / 'channels' / 'inbound' / 'channel.yaml'}:1: name: channel name")
    assert "letters, digits" in problem
    assert not (tmp_path.parent / "escape").exists()


def test_safe_channel_names_load(tmp_path):
    project(tmp_path, channel=GOOD_CHANNEL.replace("name: inbound", "name: CT_2.router-1"))
    assert load_project(tmp_path, registry_with(manual_source)).channels[0].name == "CT_2.router-1"


def test_a_channel_folder_with_an_unsafe_name_and_no_name_key_says_where(tmp_path):
    write(tmp_path / "intu.yaml", GOOD_ROOT)
    write(tmp_path / "channels" / "two words" / "channel.yaml", GOOD_CHANNEL.replace("name: inbound", ""))
    [problem] = problems_of(tmp_path)
    assert "channel name 'two words'" in problem and "rename" in problem


@pytest.mark.parametrize("where", ["data", "blocked/data"])
def test_a_data_dir_that_is_a_file_is_found_by_validate(tmp_path, where):
    project(tmp_path, root=GOOD_ROOT + f"    data_dir: {where}\n")
    (tmp_path / where.split("/")[0]).write_text("a file, not a folder")
    [problem] = problems_of(tmp_path)
    assert problem.startswith(f"{tmp_path / 'intu.yaml'}:9: data_dir: the data folder")
    assert ("is a file" if where == "data" else "cannot be created") in problem
    result = CliRunner().invoke(cli, ["--dir", str(tmp_path), "validate"])
    assert result.exit_code == 1 and "data_dir: the data folder" in result.output


def test_a_data_dir_that_cannot_be_written_is_found_by_validate(tmp_path, monkeypatch):
    import os

    project(tmp_path)
    # Root may write anywhere: ask os.access the question a service user would get "no" to.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    [problem] = problems_of(tmp_path)
    assert "data folder" in problem and "not writable" in problem
