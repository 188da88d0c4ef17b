"""The small value types that the engine and plugins exchange.

``Message`` travels through the pipeline, ``Context`` goes with it into every stage,
``SendResult`` says what a destination did with it, and ``Acceptance`` tells a source
what the engine did with what it handed over (so a source can answer its sender truthfully).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable


def new_message_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Message:
    """One unit of work: what a source received, after any transformation.

    Immutable in spirit: stages return a new message (``msg.replace(body=...)``) rather than
    editing one in place. ``body`` and ``metadata`` must be JSON-serialisable, because a queued
    message is stored on disk.

    ``files`` lists files on disk that the body refers to (for example a received DICOM instance
    whose pixel data the body references). The engine keeps them while any copy of the message is
    queued or kept as an error, and deletes them once every copy is done.
    """

    body: Any
    channel: str = ""
    id: str = field(default_factory=new_message_id)
    correlation_id: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=_now)
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.correlation_id:
            object.__setattr__(self, "correlation_id", self.id)

    def replace(self, **changes: Any) -> Message:
        """A copy with the given fields changed (``msg.replace(body=new_body)``)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "correlation_id": self.correlation_id,
            "channel": self.channel,
            "body": _encode_body(self.body),
            "metadata": dict(self.metadata),
            "created_at": self.created_at.isoformat(),
            "files": list(self.files),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Message:
        return cls(
            body=_decode_body(data["body"]),
            channel=data.get("channel", ""),
            id=data["id"],
            correlation_id=data.get("correlation_id", ""),
            metadata=data.get("metadata", {}),
            created_at=datetime.fromisoformat(data["created_at"]),
            files=tuple(data.get("files", ())),
        )


@runtime_checkable
class DeferredBody(Protocol):
    """A body that a source builds in part, because completing it costs time that is wasted when
    no stage reads it (a DICOM instance's JSON model: about 1.5 ms per instance on the route
    benchmark). The engine calls ``materialize()`` once before the first filter or transformer
    sees the message; it completes the body in place (a dict gains its missing keys). A body that
    no stage reads is queued and delivered as it is."""

    def materialize(self) -> None: ...


def materialize_body(message: Message) -> None:
    """Complete ``message.body`` if it is a ``DeferredBody`` (idempotent); for the engine."""
    if isinstance(message.body, DeferredBody):
        message.body.materialize()


def _encode_body(body: Any) -> Any:
    # A Part-10 file handed over as bytes must survive the trip through the JSON queue.
    if isinstance(body, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(body).decode("ascii")}
    return body


def _decode_body(body: Any) -> Any:
    if isinstance(body, dict) and set(body) == {"$bytes"}:
        return base64.b64decode(body["$bytes"])
    return body


@dataclass(frozen=True)
class Context:
    """What a transformer, a filter or a destination knows about where it runs."""

    logger: logging.Logger
    channel: str
    message_id: str
    destination: str | None = None
    stage: str = ""


#: The ``SendResult.data`` key that marks a retryable result as "the peer cannot be reached".
UNREACHABLE = "unreachable"


class SendStatus(enum.Enum):
    """The four things that can happen when a destination sends a message."""

    SUCCESS = "success"
    WARNING = "warning"  # delivered, with something worth recording
    RETRYABLE = "retryable"  # not delivered; trying again later may work
    PERMANENT = "permanent"  # not delivered; trying again will not help


@dataclass(frozen=True)
class SendResult:
    """What a destination's ``send`` returns. Results are values: exceptions mean bugs.

    ``detail`` is a sentence for a person; ``code`` is a protocol status where one exists
    (a DICOM status such as 0xA700); ``data`` carries anything else worth keeping.
    """

    status: SendStatus
    detail: str = ""
    code: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def delivered(self) -> bool:
        return self.status in (SendStatus.SUCCESS, SendStatus.WARNING)

    @classmethod
    def success(cls, detail: str = "", **kw: Any) -> SendResult:
        return cls(SendStatus.SUCCESS, detail, **kw)

    @classmethod
    def warning(cls, detail: str, **kw: Any) -> SendResult:
        return cls(SendStatus.WARNING, detail, **kw)

    @classmethod
    def retryable(cls, detail: str, **kw: Any) -> SendResult:
        return cls(SendStatus.RETRYABLE, detail, **kw)

    @classmethod
    def permanent(cls, detail: str, **kw: Any) -> SendResult:
        return cls(SendStatus.PERMANENT, detail, **kw)

    @classmethod
    def unreachable(cls, detail: str, **kw: Any) -> SendResult:
        """Retryable because the peer could not be reached at all (connection refused, no answer,
        an association refused for now), not because of this message: the delivery workers mark
        the destination down and its entries wait for one probe instead of each backing off."""
        data = {**kw.pop("data", {}), UNREACHABLE: True}
        return cls(SendStatus.RETRYABLE, detail, data=data, **kw)

    @property
    def peer_unreachable(self) -> bool:
        """True for a result made by ``SendResult.unreachable`` (``data["unreachable"]``)."""
        return self.status is SendStatus.RETRYABLE and self.data.get(UNREACHABLE) is True


class AcceptanceStatus(enum.Enum):
    """The engine's answer to a source, which the source turns into its protocol's answer."""

    ACCEPTED = "accepted"  # durably queued, or delivered, to every destination
    FILTERED = "filtered"  # a filter or transformer dropped it on purpose: nothing to do
    BUSY = "busy"  # out of resources (disk nearly full, queue over its limit): try later
    FAILED = "failed"  # a transformer raised, or a destination failed for good


@dataclass(frozen=True)
class Acceptance:
    """What the engine did with a message a source handed to it."""

    status: AcceptanceStatus
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (AcceptanceStatus.ACCEPTED, AcceptanceStatus.FILTERED)
