"""Dead letters: a copy of rejected input, stored on ``<prefix>.dlq.<consumer>.rejected`` once per
consumer and stored message."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from schemas import DeadLetter, check_token, new_event_id

from ._publish import publish_raw
from ._tracing import instruments

if TYPE_CHECKING:
    from ._bus import Bus

__all__ = ("dead_letter", "dead_letter_id")

_log = logging.getLogger("cadenza.bus")


async def dead_letter(
    bus: Bus,
    *,
    consumer: str,
    subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    reason: str,
    error_type: str,
    stream: str = "",
    stream_seq: int = 0,
    deliveries: int = 1,
) -> None:
    """Store a copy of rejected input on ``<prefix>.dlq.<consumer>.rejected``.

    A stored message rejected by one consumer has one entry, whatever the redeliveries (its event
    id is ``dlq-<consumer>-<stream>-<seq>``, deduped by the stream); two consumers rejecting the
    same message store two entries. Input that came from no stream (a core subscription, a
    request) gets a fresh id: every rejection is one entry.

    Raises:
        PublishError: the copy could not be stored (the caller must not drop the input then).
    """
    try:
        text = data.decode("utf-8")
        encoding = "utf-8"
        copy = text[: DeadLetter.MAX_COPY]
    except UnicodeDecodeError:
        encoding = "base64"
        copy = base64.b64encode(data[: DeadLetter.MAX_COPY]).decode()
    consumer = _token(consumer)
    letter = DeadLetter(
        event_id=dead_letter_id(consumer, stream, stream_seq),
        consumer=consumer, stream=stream, stream_seq=stream_seq, subject=subject, reason=reason[:4000],
        error_type=error_type, deliveries=deliveries,
        headers={k: str(v)[:1024] for k, v in list((headers or {}).items())[:64]},
        payload=copy, payload_encoding=encoding, payload_size=len(data),
        payload_sha256=hashlib.sha256(data).hexdigest(), truncated=len(data) > DeadLetter.MAX_COPY,
        source=bus.source,
    )  # fmt: skip
    dlq_subject = bus.subjects.build("dlq", consumer, "rejected")
    body = letter.model_dump_json().encode()
    hdrs = {"Nats-Msg-Id": letter.event_id, "Content-Type": "application/json",
            "Cadenza-Event-Type": letter.type, "Cadenza-Schema-Version": "1"}  # fmt: skip
    await publish_raw(bus, dlq_subject, body, hdrs, bus.timeouts.publish)
    bus.stats.dead_letters += 1
    instruments.dead_letters.add(1, {"consumer": consumer, "error.type": error_type})
    bus.stats.reasons[error_type] = bus.stats.reasons.get(error_type, 0) + 1
    _log.warning("dead-lettered %s from %s (%s): %s", subject, consumer, error_type, reason[:300])


def dead_letter_id(consumer: str, stream: str, stream_seq: int) -> str:
    """The dead-letter entry's event id (its ``Nats-Msg-Id``): one per consumer and stored message."""
    if not stream_seq:
        return new_event_id()
    letter_id = f"dlq-{consumer}-{stream}-{stream_seq}"
    if len(letter_id) <= 128:
        return letter_id
    # Event ids are at most 128 characters: a long consumer or stream name stands as its digest.
    digest = hashlib.sha256(f"{consumer}\0{stream}".encode()).hexdigest()[:32]
    return f"dlq-{digest}-{stream_seq}"


def _token(value: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in value)[:200] or "unknown"
    return check_token(cleaned)
