"""The dead-letter event: input a consumer could not take, with the reason."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ._envelope import Event
from ._subjects import TOKEN_PATTERN

__all__ = ["DeadLetter"]


class DeadLetter(Event):
    """A message a consumer terminated, copied with why and with its original headers.

    ``payload`` holds the original bytes as text when they were UTF-8, else base64
    (``payload_encoding``). Copies are cut at ``MAX_COPY`` bytes; ``payload_size`` and
    ``payload_sha256`` always describe the whole original.
    """

    DOMAIN = "dlq"
    EVENT = "rejected"
    MAX_COPY: ClassVar[int] = 256 * 1024

    consumer: str = Field(
        pattern=TOKEN_PATTERN, description="durable name of the consumer (or service endpoint) that refused it"
    )
    stream: str = Field(default="", description="stream it came from; empty for core subscriptions")
    stream_seq: int = Field(default=0, ge=0)
    subject: str
    reason: str = Field(description="what was wrong, readable")
    error_type: str = Field(description="class of the error: bad_json, bad_shape, unknown_version, ...")
    deliveries: int = Field(default=1, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)
    payload: str = ""
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    payload_size: int = Field(default=0, ge=0)
    payload_sha256: str = ""
    truncated: bool = False

    def subject_id(self) -> str:
        return self.consumer
