"""The documentation keeps up with the code: hooks, intu.yaml and channel.yaml keys, the built-in
destinations' settings and the core's commands each fail a test when they are not documented."""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from pathlib import Path

import pytest
from project_files import write

from intu_core import hookspecs
from intu_core.cli import cli
from intu_core.config import project as project_module
from intu_core.config.keys import RecordingSection
from intu_core.config.project import load_project
from intu_core.plugins import load_plugins
from intu_core.testing import manual_source, registry_with
from intu_core.testing.docs import (
    is_key_documented,
    markdown_headings,
    markdown_section,
    undocumented_commands,
    undocumented_settings,
)

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "guide.md").read_text()
PLUGINS = (REPO / "docs" / "plugins.md").read_text()
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("intu_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_in_the_plugin_docs(hook):
    assert any(f"`{hook}`" in heading for heading in markdown_headings(PLUGINS)), (
        f"docs/plugins.md has no heading for {hook}"
    )


def keys_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every key path load_project asks for, by file name, for a project that uses every kind of
    destination entry (named, with stages, inline)."""
    write(
        tmp_path / "intu.yaml",
        """
        destinations:
          archive: {type: log}
        """,
    )
    write(
        tmp_path / "channels" / "inbound" / "channel.yaml",
        """
        source: {type: manual}
        destinations:
          - archive
          - {name: archive, filter: f.py, transformer: t.py}
          - {name: audit, type: log}
        """,
    )
    for stage in ("f.py", "t.py"):
        write(tmp_path / "channels" / "inbound" / stage, "def filter(m, c):\n    return True\n")
    asked: dict[str, list[str]] = defaultdict(list)

    def recording(data, *, file, **kwargs):  # type: ignore[no-untyped-def]
        return RecordingSection(data, asked=asked[file.name], file=file, **kwargs)

    monkeypatch.setattr(project_module, "Section", recording)
    load_project(tmp_path, registry_with(manual_source))
    return asked


def destination_key(path: str, type_name: str) -> str | None:
    """``queue.enabled`` for ``destinations.archive.queue.enabled``; None for the destination
    itself and for the type's own block (its settings are the plugin's, checked apart)."""
    parts = path.split(".")
    key = ".".join(parts[2:]) if parts[0] == "destinations" else re.sub(r"^destinations\[\d+\]\.", "", path)
    if not key or key == path or key.split(".")[0] == type_name:
        return None
    return key


def test_every_intu_yaml_key_is_in_the_guide(tmp_path, monkeypatch):
    asked = keys_read(tmp_path, monkeypatch)["intu.yaml"]
    table = markdown_section(GUIDE, "intu.yaml")
    top = [key for key in asked if "." not in key]
    assert {"data_dir", "destinations", "queue"} <= set(top)
    assert [key for key in top if not is_key_documented(key, table)] == []
    nested = [key for key in asked if "." in key and not key.startswith("destinations")]
    assert [key for key in nested if not is_key_documented(key, GUIDE)] == []


def test_every_destination_key_is_in_the_guide(tmp_path, monkeypatch):
    asked = keys_read(tmp_path, monkeypatch)
    keys = {destination_key(path, "log") for path in asked["intu.yaml"] if path.startswith("destinations.")}
    keys.discard(None)
    assert {"type", "queue.enabled", "retry.max_attempts", "description"} <= keys
    assert sorted(k for k in keys if k and not is_key_documented(k, GUIDE)) == []


def test_every_channel_yaml_key_is_in_the_guide(tmp_path, monkeypatch):
    asked = keys_read(tmp_path, monkeypatch)["channel.yaml"]
    example = markdown_section(GUIDE, "channel.yaml")
    missing = []
    for path in asked:
        key = destination_key(path, "log") if path.startswith("destinations[") else path
        if key is None or path == "source.manual":  # the source type's own block
            continue
        leaf = key.rsplit(".", 1)[-1]
        if f"{leaf}:" not in example and not is_key_documented(key, GUIDE):
            missing.append(path)
    assert "source.type" in asked and "destinations[1].filter" in asked
    assert missing == []


@pytest.mark.parametrize("type_name", ["file", "log"])
def test_every_setting_of_a_builtin_destination_is_in_the_guide(type_name):
    registry = load_plugins(entry_points=False)
    registered = registry.destination_types[type_name].type
    section = markdown_section(GUIDE, f"The `{type_name}` destination")
    assert undocumented_settings(registered.parse_settings, section) == []


def test_every_core_command_is_documented():
    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    plugin_commands = {command.name for command in load_plugins().commands()}
    missing = undocumented_commands(cli, docs, keep=lambda path: path[0] not in plugin_commands)
    assert missing == []
