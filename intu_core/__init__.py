"""intu: a small integration engine core. This module is the public API for plugin authors."""

from intu_core.config import REQUIRED, ConfigError, Problem, Problems, Section
from intu_core.fsutil import fsync_dir, fsync_path, write_durably
from intu_core.history import Event, EventKind, Journey, MessageQuery, MessageRecord
from intu_core.hookspecs import hookimpl
from intu_core.message import (
    Acceptance,
    AcceptanceStatus,
    Context,
    DeferredBody,
    Message,
    SendResult,
    SendStatus,
)
from intu_core.metrics import MetricsRegistry
from intu_core.types import (
    DeliverCallback,
    Destination,
    DestinationType,
    Runtime,
    SettingsBlock,
    Source,
    SourceType,
)
from intu_core.view import EngineView

__version__ = "0.1.0"

__all__ = [
    "REQUIRED",
    "Acceptance",
    "AcceptanceStatus",
    "ConfigError",
    "Context",
    "DeferredBody",
    "DeliverCallback",
    "Destination",
    "DestinationType",
    "EngineView",
    "Event",
    "EventKind",
    "Journey",
    "Message",
    "MessageQuery",
    "MessageRecord",
    "MetricsRegistry",
    "Problem",
    "Problems",
    "Runtime",
    "SendResult",
    "SendStatus",
    "SettingsBlock",
    "Section",
    "Source",
    "SourceType",
    "fsync_dir",
    "fsync_path",
    "hookimpl",
    "write_durably",
]
