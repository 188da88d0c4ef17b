"""intu-jsonl-destination: appends each message to a JSON Lines file.

A complete third-party intu plugin in one file: settings parsed and validated by the plugin,
a destination whose ``send`` returns an explicit result, and the hook that registers it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from intu_core import DestinationType, Message, Runtime, Section, SendResult, hookimpl

__version__ = "0.1.0"


@dataclass(frozen=True)
class JsonlSettings:
    path: Path
    fsync: bool


def parse_settings(section: Section) -> JsonlSettings:
    # Each getter reports a problem (file, key path, line, expected vs found) instead of raising.
    path = section.path("path", must_exist=False)
    fsync = section.bool("fsync", True)
    section.done()  # unknown keys are errors, with a "did you mean" hint
    return JsonlSettings(path=path, fsync=fsync)


class JsonlDestination:
    def __init__(self, settings: JsonlSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.lock = threading.Lock()  # send() may be called from several queue workers at once

    def send(self, message: Message) -> SendResult:
        line = json.dumps({"id": message.id, "channel": message.channel, "body": message.body})
        try:
            with self.lock, open(self.settings.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                if self.settings.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:  # a full disk may clear up: let the queue retry
            return SendResult.retryable(f"cannot append to {self.settings.path}: {exc.strerror}")
        return SendResult.success()

    def close(self) -> None:
        pass


@hookimpl
def intu_destination_types() -> list[DestinationType]:
    return [
        DestinationType("jsonl", parse_settings, JsonlDestination, "Appends messages to a JSON Lines file.")
    ]
