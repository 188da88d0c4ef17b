"""``type: log``: logs one line per message. Handy while building a channel."""

from __future__ import annotations

import json
from dataclasses import dataclass

from intu_core.config.section import Section
from intu_core.message import Message, SendResult
from intu_core.types import DestinationType, Runtime


@dataclass(frozen=True)
class LogSettings:
    level: str
    show_body: bool


def parse_log_settings(section: Section) -> LogSettings:
    level = section.str("level", "info", choices=["debug", "info", "warning"])
    show_body = section.bool("show_body", False)
    section.done()
    return LogSettings(level=level, show_body=show_body)


class LogDestination:
    def __init__(self, settings: LogSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.logger = runtime.logger

    def send(self, message: Message) -> SendResult:
        body = message.body
        if self.settings.show_body:
            shown = json.dumps(body, default=str)[:2000]
        elif isinstance(body, dict):
            shown = "{" + ", ".join(sorted(map(str, body)))[:200] + "}"
        else:
            shown = f"{type(body).__name__} of {len(body) if hasattr(body, '__len__') else '?'}"
        getattr(self.logger, self.settings.level)(
            "message %s from %s: %s", message.id, message.channel, shown
        )
        return SendResult.success()

    def close(self) -> None:
        pass


LOG_DESTINATION = DestinationType(
    name="log",
    parse_settings=parse_log_settings,
    create=LogDestination,
    description="Logs one line per message.",
)
