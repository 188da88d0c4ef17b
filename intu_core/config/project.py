"""A project on disk: root ``intu.yaml``, ``channels/<name>/channel.yaml`` and Python stage files.

``load_project`` reads everything, lets each plugin parse its own settings block, and raises one
``ConfigError`` listing every problem found (``intu validate`` prints them all).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intu_core.config.keys import CORE_TOP_LEVEL_KEYS
from intu_core.config.problems import ConfigError, Problems
from intu_core.config.section import Section, did_you_mean
from intu_core.config.yamlfile import line_of, load_yaml, read_dotenv
from intu_core.delivery import QueueSettings, RetryPolicy, parse_queue, parse_retry
from intu_core.history import HistorySettings
from intu_core.plugins import PluginRegistry

CONFIG_FILE = "intu.yaml"
CHANNEL_FILE = "channel.yaml"
# Stage files picked up by convention when channel.yaml does not name them.
DEFAULT_TRANSFORMER = "transformer.py"
DEFAULT_FILTER = "filter.py"
DEFAULT_QUEUE_BACKEND = "sqlite"
#: What a channel may be called: its name names folders under the data folder (spool/<name>/).
CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    type: str
    settings: Any
    queue: QueueSettings
    retry: RetryPolicy
    file: Path


@dataclass(frozen=True)
class QueueConfig:
    """The top-level ``queue:`` block: which backend keeps the queues, and its own settings
    (parsed by the backend; None when the backend is not installed)."""

    backend: str = DEFAULT_QUEUE_BACKEND
    settings: Any = None


@dataclass(frozen=True)
class DeliverySettings:
    """The top-level ``delivery:`` block. ``process``: queued destinations are sent to from a
    process of their own (``intu_core.delivery_process``), so that receiving and delivering run
    on two cores instead of taking turns on one interpreter lock."""

    process: bool = False


@dataclass(frozen=True)
class ChannelDestination:
    """A destination as one channel uses it, with its own filter and transformer."""

    destination: DestinationConfig
    filter: Path | None = None
    transformer: Path | None = None


@dataclass(frozen=True)
class SourceConfig:
    type: str
    settings: Any
    filter: Path | None = None


@dataclass(frozen=True)
class ChannelConfig:
    name: str
    description: str
    enabled: bool
    folder: Path
    source: SourceConfig
    transformer: Path | None
    destinations: tuple[ChannelDestination, ...]


@dataclass(frozen=True)
class Project:
    root: Path
    config_file: Path
    data_dir: Path
    min_free_disk_mb: int
    destinations: Mapping[str, DestinationConfig]
    queue: QueueConfig
    channels: tuple[ChannelConfig, ...] = field(default_factory=tuple)
    # The top-level blocks that plugins contribute (intu_settings_blocks), parsed, by key; only
    # those the project has.
    plugin_settings: Mapping[str, Any] = field(default_factory=dict)
    # The top-level history: block (how long the message history is kept).
    history: HistorySettings = field(default_factory=HistorySettings)
    # The top-level delivery: block (where queued destinations are sent to from).
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    def destination(self, name: str) -> DestinationConfig:
        try:
            return self.destinations[name]
        except KeyError:
            known = ", ".join(sorted(self.destinations)) or "none"
            raise KeyError(f"no destination named {name!r} in {self.config_file} (known: {known})") from None

    def destination_settings(self, name: str) -> tuple[str, Any]:
        dest = self.destination(name)
        return dest.type, dest.settings


def find_config(path: Path) -> Path:
    return path / CONFIG_FILE if path.is_dir() else path


def load_project(path: Path, registry: PluginRegistry, env: Mapping[str, str] | None = None) -> Project:
    """Load and validate the project at ``path`` (a folder holding intu.yaml, or the file)."""
    config_file = find_config(path).resolve()
    root = config_file.parent
    problems = Problems()
    merged_env = {**read_dotenv(root / ".env"), **(env if env is not None else os.environ)}
    data = load_yaml(config_file, problems, merged_env)
    if data is None and problems:
        raise ConfigError(problems)
    top = Section(data, file=config_file, path="", problems=problems)

    channels_dir = root / top.str("channels_dir", "channels")
    data_dir = Path(top.str("data_dir", "data"))
    data_dir = data_dir if data_dir.is_absolute() else root / data_dir
    _check_data_dir(top, data_dir)
    min_free = top.int("min_free_disk_mb", 512, min=0)
    queue = _parse_queue(top.section("queue"), registry)
    history = _parse_history(top.section("history"))
    delivery = _parse_delivery(top.section("delivery"))

    destinations: dict[str, DestinationConfig] = {}
    dest_section = top.section("destinations")
    for name in dest_section.data:
        parsed = _parse_destination(str(name), dest_section.section(str(name)), registry)
        if parsed is not None:
            destinations[str(name)] = parsed
    dest_section.done(also_allowed=list(dest_section.data))
    plugin_settings = _parse_plugin_blocks(top, registry)
    top.done(also_allowed=registry.settings_blocks)  # so "did you mean" knows the plugins' keys

    channels: list[ChannelConfig] = []
    if not channels_dir.is_dir():
        if top.has("channels_dir"):
            top.error("channels_dir", f"expected a folder of channels, found no folder at {channels_dir}")
    else:
        for folder in sorted(p for p in channels_dir.iterdir() if p.is_dir()):
            if not (folder / CHANNEL_FILE).is_file():
                continue
            channel = _parse_channel(
                folder, destinations, set(dest_section.data), registry, problems, merged_env
            )
            if channel is not None:
                channels.append(channel)
    names = [c.name for c in channels]
    for channel in channels:
        if names.count(channel.name) > 1:
            problems.add_text(
                channel.folder / CHANNEL_FILE, "name", f"channel name {channel.name!r} is used twice"
            )

    if problems:
        raise ConfigError(problems)
    return Project(
        root=root,
        config_file=config_file,
        data_dir=data_dir,
        min_free_disk_mb=min_free,
        destinations=destinations,
        queue=queue,
        channels=tuple(channels),
        plugin_settings=plugin_settings,
        history=history,
        delivery=delivery,
    )


def _check_data_dir(top: Section, data_dir: Path) -> None:
    """A data folder that is a file, or that intu cannot write to (or create), is a configuration
    error now rather than a traceback when ``intu serve`` starts."""
    key = "data_dir" if top.has("data_dir") else None
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == data_dir else f"cannot be created: {existing} is a file"
        top.error(key, f"the data folder {data_dir} {where}; expected a folder intu can write to")
    elif not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "is not writable" if existing == data_dir else f"cannot be created in {existing} (not writable)"
        )
        top.error(key, f"the data folder {data_dir} {what} by this user (uid {os.geteuid()})")


def _parse_queue(section: Section, registry: PluginRegistry) -> QueueConfig:
    """Read ``backend`` and let the backend that owns it parse the rest of the block."""
    name = section.str("backend", DEFAULT_QUEUE_BACKEND)
    registered, why = registry.lookup("queue", name) if name is not None else (None, "")
    if registered is None:
        if name is not None:
            section.error("backend", why)
        section.done(also_allowed=list(section.data))  # the rest belongs to the missing backend
        return QueueConfig(name or DEFAULT_QUEUE_BACKEND)
    try:
        settings = registered.parse_settings(section)
    except Exception as exc:  # a plugin bug must not hide every other problem
        section.error(None, f"the {name!r} queue backend failed to parse its settings: {exc!r}")
        settings = None
    return QueueConfig(name, settings)


def _parse_history(section: Section) -> HistorySettings:
    """The top-level ``history:`` block: ``retention_days`` (0: keep the history for ever)."""
    settings = HistorySettings(
        retention_days=section.float("retention_days", HistorySettings.retention_days, min=0.0)
    )
    section.done()
    return settings


def _parse_delivery(section: Section) -> DeliverySettings:
    """The top-level ``delivery:`` block: ``process`` (send to queued destinations from a process
    of their own)."""
    settings = DeliverySettings(process=section.bool("process", DeliverySettings.process))
    section.done()
    return settings


def _parse_plugin_blocks(top: Section, registry: PluginRegistry) -> dict[str, Any]:
    """Parse each top-level block that a plugin contributes with that plugin's parser.

    A block the project does not have is not parsed: installing a plugin must not make every
    project that ignores it invalid (its parser may require keys)."""
    parsed: dict[str, Any] = {}
    for key in list(top.data):
        if key in CORE_TOP_LEVEL_KEYS:
            continue
        registered, why = registry.lookup("settings", str(key))
        if registered is None:
            if ("settings", key) in registry.unusable:  # provided twice: say so, not "unknown"
                top.raw(key)
                top.error(key, why)
            continue  # an unknown key: top.done() reports it with "did you mean"
        try:
            parsed[key] = registered.parse_settings(top.section(key))
        except Exception as exc:  # a plugin bug must not hide every other problem
            top.error(key, f"the plugin providing {key!r} failed to parse its settings: {exc!r}")
    return parsed


def _parse_typed(kind: str, section: Section, registry: PluginRegistry) -> tuple[str | None, Any]:
    """Read ``type`` and let the plugin that owns it parse the block named after it."""
    type_name = section.str("type")
    if type_name is None:
        return None, None
    registered, why = registry.lookup(kind, type_name)
    if registered is None:
        section.error("type", why)
        section.raw(type_name)  # the block belongs to the missing type: do not call it unknown
        return None, None
    before = len(section.problems)
    try:
        settings = registered.parse_settings(section.section(type_name))
    except Exception as exc:  # a plugin bug must not hide every other problem
        section.error(type_name, f"the {type_name!r} plugin failed to parse its settings: {exc!r}")
        return None, None
    if len(section.problems) > before:
        return None, None
    return type_name, settings


def _parse_destination(name: str, section: Section, registry: PluginRegistry) -> DestinationConfig | None:
    type_name, settings = _parse_typed("destination", section, registry)
    queue = parse_queue(section.section("queue"))
    retry = parse_retry(section.section("retry"))
    section.str("description", "")
    section.done()
    if type_name is None:
        return None
    return DestinationConfig(name, type_name, settings, queue, retry, section.file)


def _stage_file(section: Section, key: str, folder: Path, default: str | None) -> Path | None:
    if section.has(key):
        path = section.path(key)
        return path if isinstance(path, Path) and path.exists() else None
    if default and (folder / default).is_file():
        return folder / default
    return None


def _parse_channel(
    folder: Path,
    destinations: Mapping[str, DestinationConfig],
    declared: set[str],
    registry: PluginRegistry,
    problems: Problems,
    env: Mapping[str, str],
) -> ChannelConfig | None:
    file = folder / CHANNEL_FILE
    before = len(problems)
    data = load_yaml(file, problems, env)
    if data is None:
        return None
    top = Section(data, file=file, path="", problems=problems)
    name = top.str("name", folder.name)
    if isinstance(name, str) and not CHANNEL_NAME.fullmatch(name):
        # The name becomes a folder (spool/<name>/): "../x" would write outside the data folder.
        top.error(
            "name" if top.has("name") else None,
            f"channel name {name!r} must be letters, digits, '.', '_' or '-', starting with a letter or"
            " a digit, at most 64 characters"
            + ("" if top.has("name") else f" (it is the folder's name; set 'name' or rename {folder})"),
        )
    description = top.str("description", "")
    enabled = top.bool("enabled", True)

    source_section = top.section("source")
    if not top.has("source"):
        top.error(None, "missing required key 'source'")
    source_type, source_settings = _parse_typed("source", source_section, registry)
    source_filter = _stage_file(source_section, "filter", folder, None)
    source_section.done()

    transformer = _stage_file(top, "transformer", folder, DEFAULT_TRANSFORMER)
    top.raw("filter")  # a channel-level filter is the source filter's other spelling
    if top.has("filter") and source_section.has("filter"):
        top.error("filter", "the source filter is given twice (here and as source.filter): keep one")
    elif top.has("filter"):
        source_filter = _stage_file(top, "filter", folder, None)
    elif source_filter is None:
        source_filter = _stage_file(top, "filter", folder, DEFAULT_FILTER)

    used: list[ChannelDestination] = []
    raw_list = top.raw("destinations")
    if not raw_list:
        top.error(
            None, "missing required key 'destinations' (a list of destination names or inline destinations)"
        )
    elif not isinstance(raw_list, list):
        top.error("destinations", "expected a list of destination names or inline destinations")
    else:
        for index, item in enumerate(raw_list):
            where = f"destinations[{index}]"
            used_dest = _parse_channel_destination(
                item, where, top, folder, name, destinations, declared, registry
            )
            if used_dest is not None:
                used.append(used_dest)
    top.done()
    if len(problems) > before or source_type is None:
        return None
    return ChannelConfig(
        name=name,
        description=description,
        enabled=enabled,
        folder=folder,
        source=SourceConfig(source_type, source_settings, source_filter),
        transformer=transformer,
        destinations=tuple(used),
    )


def _parse_channel_destination(
    item: Any,
    where: str,
    top: Section,
    folder: Path,
    channel: str,
    destinations: Mapping[str, DestinationConfig],
    declared: set[str],
    registry: PluginRegistry,
) -> ChannelDestination | None:
    if isinstance(item, str):
        item = {"name": item}
    section = Section(
        item, file=top.file, path=where, problems=top.problems, line=line_of(top.data, "destinations")
    )
    if not isinstance(item, Mapping):
        return None
    name = section.str("name")
    filter_file = _stage_file(section, "filter", folder, None)
    transformer = _stage_file(section, "transformer", folder, None)
    if name is None:
        section.done()
        return None
    if section.has("type"):  # an inline destination, private to this channel
        inline = _parse_destination(f"{channel}.{name}", section, registry)
        if inline is None:
            return None
        return ChannelDestination(inline, filter_file, transformer)
    section.done()
    if name in declared and name not in destinations:
        return None  # declared in intu.yaml but invalid: that error is reported there
    if name not in destinations:
        known = sorted(declared)
        hint = did_you_mean(name, known)
        section.error(
            "name",
            f"unknown destination {name!r}: expected a name defined under 'destinations' in "
            f"{CONFIG_FILE} ({', '.join(known) or 'none defined'}) or an inline destination with "
            f"'type'{hint}",
        )
        return None
    return ChannelDestination(destinations[name], filter_file, transformer)
