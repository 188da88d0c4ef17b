"""A stand-in for the engine when a source is tested on its own."""

from __future__ import annotations

import threading

from intu_core.message import Acceptance, AcceptanceStatus, Message


class RecordingEngine:
    """The engine's ``deliver`` for a source under test: records each message and answers
    ``answer`` (accepted unless a test sets another ``Acceptance``)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.answer = Acceptance(AcceptanceStatus.ACCEPTED)
        self.lock = threading.Lock()

    def deliver(self, message: Message) -> Acceptance:
        """Record ``message``; the chosen answer."""
        with self.lock:
            self.messages.append(message)
        return self.answer
