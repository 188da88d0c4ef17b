"""Loading plugins: entry points, the type registry, and errors that name the distribution.

One broken plugin never stops the others: its error is recorded with its distribution name and
version, and only channels that need a type it should have provided fail validation.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The standard library's (EntryPoint.dist since Python 3.10), not the importlib_metadata backport
# when that happens to be installed: ~10 ms less at every `intu` start (measured 2026-12-03).
from importlib import metadata
from types import ModuleType
from typing import Any

import click
import pluggy

from intu_core import hookspecs
from intu_core.queue import QueueBackend
from intu_core.types import DestinationType, SettingsBlock, SourceType

log = logging.getLogger("intu.plugins")


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin."""

    name: str  # entry-point name, or the module/object name for directly registered plugins
    distribution: str
    version: str
    destination_types: list[str] = field(default_factory=list)
    source_types: list[str] = field(default_factory=list)
    queue_backends: list[str] = field(default_factory=list)
    settings_blocks: list[str] = field(default_factory=list)  # top-level keys of intu.yaml
    commands: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass(frozen=True)
class Registered:
    type: Any  # DestinationType | SourceType | QueueBackend | SettingsBlock
    plugin: PluginInfo


class PluginRegistry:
    """The plugin manager plus what the plugins provide, by type name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.destination_types: dict[str, Registered] = {}
        self.source_types: dict[str, Registered] = {}
        self.queue_backends: dict[str, Registered] = {}
        self.settings_blocks: dict[str, Registered] = {}  # by top-level key of intu.yaml
        # type name -> why it cannot be used (provided twice, ...)
        self.unusable: dict[tuple[str, str], str] = {}
        self._info_by_plugin: dict[int, PluginInfo] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    @property
    def errors(self) -> list[str]:
        problems = [f"plugin {p.name!r} from {p.label}: {p.error}" for p in self.plugins if p.error]
        problems += list(self.unusable.values())
        return problems

    # -- registration ----------------------------------------------------------------------
    def register(self, plugin: object, info: PluginInfo) -> None:
        """Register one plugin object; on any problem record it on ``info`` and carry on."""
        self.plugins.append(info)
        try:
            self.pm.register(plugin, name=f"{info.distribution}:{info.name}")
        except Exception as exc:  # pluggy validates hook signatures here
            info.error = f"{type(exc).__name__}: {exc}"
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            info.error = f"unknown hook: {exc} (hook names must match intu_core.hookspecs)"
            return
        self._info_by_plugin[id(plugin)] = info

    def collect(self) -> None:
        """Ask every registered plugin for its types; duplicates make a type unusable."""
        self._collect("destination", "intu_destination_types", DestinationType, self.destination_types)
        self._collect("source", "intu_source_types", SourceType, self.source_types)
        self._collect("queue", "intu_queue_backends", QueueBackend, self.queue_backends)
        self._collect("settings", "intu_settings_blocks", SettingsBlock, self.settings_blocks)

    def _collect(self, kind: str, hook_name: str, expected: type, table: dict[str, Registered]) -> None:
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # registration order
            info = self._info_by_plugin.get(id(impl.plugin))
            if info is None or info.error:
                continue
            try:
                provided = list(impl.function() or ())
                for item in provided:
                    if not isinstance(item, expected):
                        raise TypeError(f"{hook_name} returned {item!r}, expected {expected.__name__}")
            except Exception as exc:
                info.error = f"{hook_name}() failed: {type(exc).__name__}: {exc}"
                log.debug("plugin %s failed:\n%s", info.name, traceback.format_exc())
                continue
            for item in provided:
                names = {
                    "destination": info.destination_types,
                    "source": info.source_types,
                    "queue": info.queue_backends,
                    "settings": info.settings_blocks,
                }[kind]
                names.append(item.name)
                if item.name in table:
                    first = table.pop(item.name).plugin
                    self.unusable[(kind, item.name)] = (
                        f"{_KIND_TEXT.get(kind, kind + ' type')} {item.name!r} is provided twice: by "
                        f"{first.label} and by "
                        f"{info.label}; uninstall one of them"
                    )
                elif (kind, item.name) not in self.unusable:
                    table[item.name] = Registered(item, info)

    # -- look-ups --------------------------------------------------------------------------
    def lookup(self, kind: str, name: str) -> tuple[Any | None, str]:
        """The registered type, or None and a sentence saying why it is not available.

        ``kind`` is ``"destination"``, ``"source"``, ``"queue"`` (a queue backend) or
        ``"settings"`` (a top-level settings block, by key)."""
        table = {
            "destination": self.destination_types,
            "queue": self.queue_backends,
            "settings": self.settings_blocks,
        }.get(kind, self.source_types)
        if name in table:
            return table[name].type, ""
        if (kind, name) in self.unusable:
            return None, self.unusable[(kind, name)]
        broken = [p for p in self.plugins if p.error]
        known = ", ".join(f"{n} ({r.plugin.distribution})" for n, r in sorted(table.items())) or "none"
        reason = f"unknown {kind} type {name!r}; installed {kind} types: {known}"
        suspects = [p for p in broken if p.name == name] or broken
        if suspects:
            reason += "; " + "; ".join(
                f"plugin {p.name!r} from {p.label} failed to load and may provide it: {p.error}"
                for p in suspects
            )
        else:
            import difflib

            close = difflib.get_close_matches(name, list(table), n=1)
            if close:
                reason += f" (did you mean {close[0]!r}?)"
            else:
                reason += f"; install the plugin that provides it (e.g. pip install intu-{name}-{kind})"
        return None, reason

    def commands(self) -> list[click.Command]:
        """Every plugin's click commands; a plugin whose hook fails or returns something else is
        recorded as broken (its commands are left out) instead of breaking the command line."""
        found = []
        for impl in reversed(self.pm.hook.intu_cli_commands.get_hookimpls()):
            info = self._info_by_plugin.get(id(impl.plugin))
            if info is None or info.error:
                continue
            try:
                cmds: list[Any] = list(impl.function() or ())  # type: ignore[call-overload]
                for cmd in cmds:
                    if not isinstance(cmd, click.Command):
                        raise TypeError(f"returned {cmd!r}, expected a click.Command")
            except Exception as exc:
                info.error = f"intu_cli_commands() failed: {type(exc).__name__}: {exc}"
                continue
            info.commands = [c.name for c in cmds]
            found.extend(cmds)
        return found


# How the duplicate-name message calls each kind of registration.
_KIND_TEXT = {"settings": "settings block"}


def _entry_points() -> Iterable[Any]:
    return metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)


def load_plugins(*, entry_points: bool = True, extra: Sequence[object] = ()) -> PluginRegistry:
    """Build a registry from the built-in types, installed entry points and ``extra`` objects.

    ``extra`` lets tests (and plugin authors, through ``intu_core.testing``) register a plugin
    module or object without installing it.
    """
    from intu_core import __version__, builtin

    registry = PluginRegistry()
    # Built-in types come in through the same hooks as everybody else's.
    registry.register(builtin, PluginInfo("builtin", "intu-core", __version__))
    if entry_points:
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.name if dist else "?", dist.version if dist else "")
            try:
                plugin = ep.load()
            except Exception as exc:
                info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
                registry.plugins.append(info)
                log.debug("plugin %s failed to import:\n%s", ep.name, traceback.format_exc())
                continue
            registry.register(plugin, info)
    for plugin in extra:
        name = getattr(plugin, "__name__", type(plugin).__name__)
        version = getattr(plugin, "__version__", "")
        dist = f"{name} (not installed)" if isinstance(plugin, ModuleType) else name
        registry.register(plugin, PluginInfo(name, dist, str(version)))
    registry.collect()
    return registry
