"""One message through a channel's stages.

source filter → transformer → for each destination: filter → destination transformer. Stages are
plain Python files in the channel folder: a transformer defines ``transform(msg, ctx)`` and returns
the new message (or ``None`` to drop it); a filter defines ``filter(msg, ctx)`` and returns a bool.
A stage that raises or returns something else errors that message only.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from intu_core.config.project import ChannelConfig
from intu_core.message import Context, Message, materialize_body


class StageError(Exception):
    """A stage failed; ``detail`` is the traceback, ``stage`` names the file and function."""

    def __init__(self, stage: str, summary: str, detail: str) -> None:
        super().__init__(f"{stage}: {summary}")
        self.stage = stage
        self.summary = summary
        self.detail = detail


def load_stage(path: Path, function: str) -> Callable[..., Any]:
    """Import ``function`` from the Python file at ``path`` (a fresh module per file)."""
    module_name = f"intu_stage_{abs(hash(str(path.resolve())))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # lets dataclasses and pickling inside the file work
    spec.loader.exec_module(module)
    return _function(module, function, path)


def _function(module: ModuleType, name: str, path: Path) -> Callable[..., Any]:
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ImportError(f"{path} must define a function {name}(msg, ctx)")
    return fn  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Stage:
    name: str  # e.g. "transformer.py:transform"
    kind: str  # "transform" or "filter"
    fn: Callable[..., Any]

    @classmethod
    def load(cls, path: Path | None, kind: str) -> Stage | None:
        if path is None:
            return None
        return cls(f"{path.name}:{kind}", kind, load_stage(path, kind))

    def run(self, message: Message, ctx: Context) -> Message | None:
        try:
            materialize_body(message)
            result = self.fn(message, ctx)
        except Exception as exc:
            raise StageError(self.name, f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc
        if self.kind == "filter":
            if not isinstance(result, bool):
                raise StageError(self.name, f"returned {type(result).__name__}; expected True or False", "")
            return message if result else None
        if result is None or isinstance(result, Message):
            return result
        raise StageError(
            self.name,
            f"returned {type(result).__name__}; expected a Message (msg.replace(body=...)) or None",
            "",
        )


@dataclass(frozen=True)
class DestinationStages:
    name: str
    filter: Stage | None
    transformer: Stage | None


@dataclass
class PipelineResult:
    """What the channel's stages made of one message: one message per destination to send."""

    outputs: list[tuple[str, Message]] = field(default_factory=list)
    error: StageError | None = None
    # Which stage dropped the message, as (destination, stage): destination "" for the whole of
    # it, else the one destination a destination stage dropped it for (the message history).
    dropped: list[tuple[str, str]] = field(default_factory=list)
    # Which transformers ran on it, as (destination, stage), likewise (the message history).
    transformed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def filtered(self) -> bool:
        return self.error is None and not self.outputs


class Pipeline:
    """The stages of one channel, loaded once."""

    def __init__(self, channel: ChannelConfig, logger: logging.Logger) -> None:
        self.channel = channel.name
        self.logger = logger
        self.source_filter = Stage.load(channel.source.filter, "filter")
        self.transformer = Stage.load(channel.transformer, "transform")
        self.destinations = [
            DestinationStages(
                d.destination.name,
                Stage.load(d.filter, "filter"),
                Stage.load(d.transformer, "transform"),
            )
            for d in channel.destinations
        ]

    def run(self, message: Message) -> PipelineResult:
        ctx = Context(self.logger, self.channel, message.id, stage="source")
        transformed: list[tuple[str, str]] = []
        try:
            current: Message | None = message
            for stage in (self.source_filter, self.transformer):
                if stage is not None and current is not None:
                    current = stage.run(current, ctx)
                    if current is None:
                        return PipelineResult(dropped=[("", stage.name)], transformed=transformed)
                    if stage.kind == "transform":
                        transformed.append(("", stage.name))
            if current is None:
                return PipelineResult()
            outputs = []
            dropped: list[tuple[str, str]] = []
            for dest in self.destinations:
                dest_ctx = Context(self.logger, self.channel, message.id, dest.name, stage="destination")
                out: Message | None = current
                for stage in (dest.filter, dest.transformer):
                    if stage is not None and out is not None:
                        out = stage.run(out, dest_ctx)
                        if out is None:
                            dropped.append((dest.name, stage.name))
                        elif stage.kind == "transform":
                            transformed.append((dest.name, stage.name))
                if out is not None:
                    outputs.append((dest.name, out))
            return PipelineResult(outputs, dropped=dropped, transformed=transformed)
        except StageError as err:
            return PipelineResult(error=err)
