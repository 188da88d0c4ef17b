"""``type: file``: writes each message to a folder (a local archive, a drop folder, a test sink)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from intu_core.config.section import Section
from intu_core.fsutil import write_durably
from intu_core.message import Message, SendResult
from intu_core.types import DestinationType, Runtime


@dataclass(frozen=True)
class FileSettings:
    directory: Path


def parse_file_settings(section: Section) -> FileSettings:
    directory = section.path("directory", must_exist=False)
    section.done()
    return FileSettings(directory=directory)


class FileDestination:
    """Writes a message with the first plugin that knows its body format, else as JSON or bytes."""

    def __init__(self, settings: FileSettings, runtime: Runtime) -> None:
        self.directory = settings.directory
        self.hook = runtime.hook

    def send(self, message: Message) -> SendResult:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = None
            if self.hook is not None:
                path = self.hook.intu_write_message_file(message=message, directory=self.directory)
            if path is None:
                path = self._write_plain(message)
        except OSError as exc:
            return SendResult.retryable(f"cannot write to {self.directory}: {exc.strerror or exc}")
        except Exception as exc:  # a body no writer can handle: retrying will not help
            return SendResult.permanent(f"cannot write message {message.id}: {exc}")
        return SendResult.success(f"written to {path}", data={"path": str(path)})

    def _write_plain(self, message: Message) -> Path:
        body = message.body
        if isinstance(body, (bytes, bytearray)):
            path, data = self.directory / f"{message.id}.bin", bytes(body)
        elif isinstance(body, str):
            path, data = self.directory / f"{message.id}.txt", body.encode()
        else:
            path = self.directory / f"{message.id}.json"
            data = json.dumps(message.to_json(), indent=2, default=str).encode()
        write_durably(path, data)
        return path

    def close(self) -> None:
        pass


FILE_DESTINATION = DestinationType(
    name="file",
    parse_settings=parse_file_settings,
    create=FileDestination,
    description="Writes each message as a file in a folder (DICOM bodies as Part-10 files).",
)
