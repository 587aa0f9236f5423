"""Encoding events to messages and decoding (validating) messages back to events."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

import pydantic

from schemas import Event

from ._exceptions import ValidationError

__all__ = ("CONTENT_TYPE", "HDR_EVENT_TYPE", "HDR_SCHEMA_VERSION", "MAX_EVENT_BYTES", "decode", "encode")

CONTENT_TYPE: Final = "application/json"
HDR_SCHEMA_VERSION: Final = "Cadenza-Schema-Version"
HDR_EVENT_TYPE: Final = "Cadenza-Event-Type"
HDR_MSG_ID: Final = "Nats-Msg-Id"
#: Largest event body cadenza accepts (bytes); larger input is rejected as ``oversize``.
MAX_EVENT_BYTES: Final = 256 * 1024

E = TypeVar("E", bound=Event)


def encode(event: Event) -> tuple[bytes, dict[str, str]]:
    """The JSON body and cadenza headers of ``event``.

    Raises:
        ValidationError: the encoded event is larger than :data:`MAX_EVENT_BYTES`.
    """
    body = event.model_dump_json().encode()
    if len(body) > MAX_EVENT_BYTES:
        raise ValidationError(
            f"{event.type} event is {len(body)} bytes, more than the {MAX_EVENT_BYTES} allowed",
            kind="oversize",
        )
    headers = {
        HDR_MSG_ID: event.event_id,
        "Content-Type": CONTENT_TYPE,
        HDR_SCHEMA_VERSION: str(event.schema_version),
        HDR_EVENT_TYPE: event.type,
    }
    return body, headers


def _short(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "(body)"
        parts.append(f"{loc}: {e['msg']}")
    more = err.error_count() - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def decode(
    data: bytes,
    headers: Mapping[str, str] | None,
    accept: Sequence[type[E]],
    *,
    max_bytes: int = MAX_EVENT_BYTES,
) -> E:
    """Validate a message body as one of the ``accept`` event classes (chosen by its ``type``).

    Raises:
        ValidationError: with ``kind`` ``oversize``, ``bad_json``, ``bad_shape``, ``unknown_type``
            or ``unknown_version`` and a message that says what was wrong.
    """
    if len(data) > max_bytes:
        raise ValidationError(f"message is {len(data)} bytes, more than the {max_bytes} allowed", kind="oversize")
    try:
        raw: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValidationError(f"not JSON: {exc}", kind="bad_json") from None
    if not isinstance(raw, dict):
        raise ValidationError(f"expected a JSON object, got {type(raw).__name__}", kind="bad_shape")
    by_type = {cls.type_name(): cls for cls in accept}
    claimed = raw.get("type") or (headers or {}).get(HDR_EVENT_TYPE)
    if len(by_type) == 1 and not claimed:
        cls = next(iter(by_type.values()))
    elif not isinstance(claimed, str) or claimed not in by_type:
        raise ValidationError(
            f"event type {claimed!r} is not taken here; expected one of {', '.join(sorted(by_type))}",
            kind="unknown_type",
        )
    else:
        cls = by_type[claimed]
    version = raw.get("schema_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > cls.SCHEMA_VERSION:
        raise ValidationError(
            f"{cls.type_name()} schema version {version} is newer than the {cls.SCHEMA_VERSION} this consumer "
            "understands; upgrade the consumer",
            kind="unknown_version",
        )
    try:
        return cls.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ValidationError(f"not a valid {cls.type_name()} event: {_short(exc)}", kind="bad_shape") from None
