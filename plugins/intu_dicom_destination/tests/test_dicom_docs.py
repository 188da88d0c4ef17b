"""The DICOM plugin's settings and commands are documented (docs/guide.md, the README).

The plugin is loaded the way intu loads it, through its entry point, so this test does not depend
on the package's module layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from intu_core.cli import cli
from intu_core.plugins import load_plugins
from intu_core.testing.docs import markdown_section, undocumented_commands, undocumented_settings

REPO = Path(__file__).resolve().parents[3]
GUIDE = (REPO / "docs" / "guide.md").read_text()
# Keys read only when TLS is on (the CA, the certificates) are found with this block too.
WITH_TLS = {"tls": {"enabled": True}}


@pytest.fixture(scope="module")
def registry():  # type: ignore[no-untyped-def]
    registry = load_plugins()
    assert "dicom" in registry.destination_types and "dicom" in registry.source_types, registry.errors
    return registry


@pytest.mark.parametrize(
    ("kind", "heading"), [("destination", "The DICOM destination"), ("source", "The DICOM source")]
)
def test_every_dicom_setting_is_in_the_guide(registry, kind, heading):
    registered, why = registry.lookup(kind, "dicom")
    assert registered is not None, why
    section = markdown_section(GUIDE, heading)
    assert undocumented_settings(registered.parse_settings, section, [WITH_TLS]) == []


def test_every_dicom_command_is_documented(registry):
    info = registry.destination_types["dicom"].plugin
    registry.commands()  # fills in the commands each plugin provides
    assert info.commands == ["dicom"]
    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    assert undocumented_commands(cli, docs, keep=lambda path: path[0] in info.commands) == []
