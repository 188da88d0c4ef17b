"""The users' guide documents every setting of the ``postgres`` queue backend."""

from __future__ import annotations

from pathlib import Path

from intu_postgres_queue import parse_postgres_settings

from intu_core.testing.docs import markdown_section, undocumented_settings

GUIDE = (Path(__file__).resolve().parents[3] / "docs" / "guide.md").read_text()


def test_every_setting_is_documented() -> None:
    section = markdown_section(GUIDE, "Several nodes on PostgreSQL")
    assert "at-least-once" in section
    assert undocumented_settings(parse_postgres_settings, section) == []
