"""Which settings keys exist: the core's top-level keys, and the keys a settings parser asks for.

A plugin's schema is its ``parse_settings`` function, not a declaration beside it, so the only
faithful list of its keys is what that function reads. ``settings_keys`` runs a parser on a block
(empty by default) through a ``RecordingSection`` and returns every key path it asked for; the
docs tests use it to fail when a setting is not documented.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from intu_core.config.problems import Problems
from intu_core.config.section import Section
from intu_core.config.yamlfile import line_of

# The top-level keys of intu.yaml that the core reads; a plugin's settings block cannot use them.
CORE_TOP_LEVEL_KEYS = frozenset(
    {"channels_dir", "data_dir", "min_free_disk_mb", "destinations", "queue", "history", "delivery"}
)


class RecordingSection(Section):
    """A ``Section`` that also records, in ``asked``, the full key path of every key read.

    Nested sections share the list. Everything else (values, defaults, problems) is as in
    ``Section``.
    """

    def __init__(self, data: Any, *, asked: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.asked: list[str] = asked if asked is not None else []

    def _ask(self, key: str) -> None:
        path = self.key_path(key)
        if path not in self.asked:
            self.asked.append(path)

    def has(self, key: str) -> bool:
        self._ask(key)
        return super().has(key)

    def raw(self, key: str, default: Any = None) -> Any:
        self._ask(key)
        return super().raw(key, default)

    def _value(self, key: str, default: Any) -> tuple[bool, Any]:
        self._ask(key)
        return super()._value(key, default)

    def section(self, key: str) -> Section:
        self._ask(key)
        self._read.add(key)
        return RecordingSection(
            self.data.get(key),
            asked=self.asked,
            file=self.file,
            path=self.key_path(key),
            problems=self.problems,
            line=line_of(self.data, key) or self.line,
        )


def settings_keys(
    parse_settings: Callable[[Section], Any], data: Mapping[str, Any] | None = None
) -> list[str]:
    """Every key path ``parse_settings`` asks for when given ``data`` (an empty block by default).

    Nested blocks give dotted paths (``tls.enabled``); a block itself is listed too (``tls``).
    A key read only under a condition (``tls.ca_cert`` once ``tls.enabled`` is true) is found
    when ``data`` meets it: call again with ``{"tls": {"enabled": True}}``. Problems (a missing
    required key) are ignored.
    """
    section = RecordingSection(dict(data or {}), file=Path("<keys>"), path="", problems=Problems())
    parse_settings(section)
    return list(section.asked)


__all__ = ["CORE_TOP_LEVEL_KEYS", "RecordingSection", "settings_keys"]
