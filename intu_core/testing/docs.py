"""Checks that documentation keeps up with the code: settings keys and CLI commands.

Used by intu's own docs tests and by a plugin's (``tests/test_docs.py``), in the manner of
datasette's: the code is the list of what exists (a parser's keys, click's command tree), the
Markdown is searched for each of them, and the test fails naming what is missing::

    from intu_core.testing.docs import markdown_section, undocumented_commands, undocumented_settings

    guide = markdown_section(Path("docs/guide.md").read_text(), "The jsonl destination")
    assert undocumented_settings(registered.parse_settings, guide) == []
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import click

from intu_core.config.keys import settings_keys
from intu_core.config.section import Section

_HEADING = re.compile(r"^(#+)\s+(.*)$")


def markdown_section(text: str, heading: str) -> str:
    """The part of a Markdown ``text`` under the first heading that contains ``heading``, up to
    the next heading of the same or a higher level (its sub-sections included)."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        match = _HEADING.match(line)
        if match and heading in match.group(2):
            level = len(match.group(1))
            end = next(
                (
                    i
                    for i in range(start + 1, len(lines))
                    if (m := _HEADING.match(lines[i])) and len(m.group(1)) <= level
                ),
                len(lines),
            )
            return "\n".join(lines[start:end])
    raise LookupError(f"no heading containing {heading!r}")


def markdown_headings(text: str) -> list[str]:
    """The text of every heading of a Markdown document."""
    return [m.group(2) for line in text.splitlines() if (m := _HEADING.match(line))]


def is_key_documented(path: str, text: str) -> bool:
    """True when ``text`` names the key path as inline code: ```tls.enabled``` (or, for a block
    such as ``tls``, any of its keys: ```tls.ca_cert```)."""
    return f"`{path}`" in text or f"`{path}." in text


def undocumented_settings(
    parse_settings: Callable[[Section], Any],
    text: str,
    variants: Iterable[Mapping[str, Any]] = (),
) -> list[str]:
    """The key paths ``parse_settings`` asks for that ``text`` does not document.

    The parser runs on an empty block and on each of ``variants`` (e.g. ``{"tls": {"enabled":
    True}}``, to reach keys read only when TLS is on)."""
    asked: list[str] = []
    for data in (None, *variants):
        asked += [k for k in settings_keys(parse_settings, data) if k not in asked]
    return [key for key in asked if not is_key_documented(key, text)]


def command_paths(
    group: click.Group, ctx: click.Context | None = None
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under ``group``, with its path of names (``("queue", "list")``)."""
    ctx = ctx or click.Context(group, info_name=group.name)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        yield (name,), command
        if isinstance(command, click.Group):
            for sub, inner in command_paths(command, click.Context(command, info_name=name, parent=ctx)):
                yield (name, *sub), inner


def is_command_documented(path: tuple[str, ...], text: str, program: str = "intu") -> bool:
    """True when ``text`` shows the command, spelled out (``intu queue show``) or among
    alternatives (``intu queue list|show|retry``, with ``\\|`` inside a Markdown table)."""
    *parents, name = path
    prefix = " ".join((program, *parents))
    pattern = rf"\b{re.escape(prefix)} (?:[\w-]+\\?\|)*{re.escape(name)}\b"
    return re.search(pattern, text) is not None


def undocumented_commands(
    group: click.Group,
    text: str,
    program: str = "intu",
    keep: Callable[[tuple[str, ...]], bool] | None = None,
) -> list[str]:
    """The commands under ``group`` that ``text`` does not show; ``keep(path)`` picks which to
    check (``path[0] == "dicom"``: a plugin's own)."""
    return [
        " ".join((program, *path))
        for path, _command in command_paths(group)
        if (keep is None or keep(path)) and not is_command_documented(path, text, program)
    ]


__all__ = [
    "command_paths",
    "is_command_documented",
    "is_key_documented",
    "markdown_headings",
    "markdown_section",
    "undocumented_commands",
    "undocumented_settings",
]
