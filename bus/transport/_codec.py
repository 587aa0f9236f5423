"""Encoding events to messages and decoding (validating) messages back to events.

What a consumer takes (docs/wire.md, "Headers"): a UTF-8 JSON object of at most :data:`MAX_EVENT_BYTES`
bytes that validates as one of the accepted event types. The headers are optional, but each one given
must agree with the body: ``Cadenza-Schema-Version`` with ``schema_version`` (and both be a version this
code knows), ``Cadenza-Event-Type`` with ``type``, ``Nats-Msg-Id`` with ``event_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar, cast

import pydantic

from schemas import Event
from schemas._json import parse_json

from .._exceptions import ValidationError

__all__ = (
    "CONTENT_TYPE",
    "HDR_DONE",
    "HDR_EVENT_TYPE",
    "HDR_SCHEMA_VERSION",
    "HDR_STORE_ACK_TO",
    "HDR_TASK_ACK",
    "INPUT_ERRORS",
    "MAX_EVENT_BYTES",
    "decode",
    "encode",
)

CONTENT_TYPE: Final = "application/json"
HDR_SCHEMA_VERSION: Final = "Cadenza-Schema-Version"
HDR_EVENT_TYPE: Final = "Cadenza-Event-Type"
HDR_MSG_ID: Final = "Nats-Msg-Id"
#: On a task: the subject the worker routes its stored completion's acknowledgement to (the caller's
#: inbox), leaving the task's ack to the caller (docs/DESIGN.md, "The tracked round trip").
HDR_STORE_ACK_TO: Final = "Cadenza-Store-Ack-To"
#: On a result: the task's ack subject (``$JS.ACK.…``), which the caller acks once the completion's
#: store is acknowledged. A result without it means the completion is stored (or not tracked).
HDR_TASK_ACK: Final = "Cadenza-Task-Ack"
#: On a task: the caller hears the activity's stored completion where the activity stream republishes
#: it (``<prefix>.done.…``, from the id's ``~``-separated route): a worker whose activity succeeds
#: stores the completion with the acknowledgement routed to itself, acks the task on it and sends
#: no result (docs/wire.md). Any other outcome is answered as without it.
HDR_DONE: Final = "Cadenza-Done"
#: The ``error_type`` of a dead letter for input that did not decode (what :func:`decode` raises).
INPUT_ERRORS: Final = frozenset({"oversize", "bad_json", "bad_shape", "unknown_type", "bad_version",
                                 "unknown_version", "version_mismatch", "type_mismatch", "id_mismatch"})  # fmt: skip
#: Largest event body cadenza accepts (bytes); larger input is rejected as ``oversize``.
MAX_EVENT_BYTES: Final = 256 * 1024

E = TypeVar("E", bound=Event)

#: The accepted classes by type name, as text and as bytes (:func:`_laid_out`), per ``accept``
#: sequence seen (bounded: consumers pass a few).
_BY_TYPE: dict[tuple[type[Event], ...], tuple[dict[str, type[Event]], dict[bytes, type[Event]]]] = {}


def encode(event: Event) -> tuple[bytes, dict[str, str]]:
    """The JSON body and cadenza headers of ``event``: ``Nats-Msg-Id`` (not for a class whose ``DEDUPE``
    is False: an activity's completion), ``Cadenza-Schema-Version`` and ``Cadenza-Event-Type`` (not for
    a class whose ``TYPE_HEADERS`` is False: the messages every activity causes); no ``Content-Type``:
    every cadenza message is JSON, and each header costs about 2 µs to write and read in nats-py, per
    message.

    Raises:
        ValidationError: the encoded event is larger than :data:`MAX_EVENT_BYTES`.
    """
    # The serializer's bytes as they are (``model_dump_json`` is the same call behind a wrapper that
    # hands its bytes back as text, which would be encoded again here: 1 µs a completion, measured).
    body = type(event).__pydantic_serializer__.to_json(event)
    if len(body) > MAX_EVENT_BYTES:
        raise ValidationError(
            f"{event.type} event is {len(body)} bytes, more than the {MAX_EVENT_BYTES} allowed",
            kind="oversize",
        )
    headers = {HDR_MSG_ID: event.event_id} if event.DEDUPE else {}
    if event.TYPE_HEADERS:
        headers[HDR_SCHEMA_VERSION] = str(event.schema_version)
        headers[HDR_EVENT_TYPE] = event.type
    return body, headers


def _short(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "(body)"
        parts.append(f"{loc}: {e['msg']}")
    more = err.error_count() - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _version(value: object, where: str, cls: type[Event]) -> int:
    """The schema version ``value`` claims (from ``where``), or a ValidationError saying why not.

    The body's is a JSON integer; the header's, being a header, its decimal digits.
    """
    if isinstance(value, str) and where != "body" and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError(
            f"{cls.type_name()} schema version {value!r} in the {where} is not a version: use an integer >= 1 "
            f"(this consumer understands {cls.SCHEMA_VERSION})",
            kind="bad_version",
        )
    if value > cls.SCHEMA_VERSION:
        raise ValidationError(
            f"{cls.type_name()} schema version {value} in the {where} is newer than the {cls.SCHEMA_VERSION} this "
            "consumer understands; upgrade the consumer",
            kind="unknown_version",
        )
    return value


def _check_version(cls: type[Event], raw: dict[str, Any], headers: Mapping[str, str] | None) -> None:
    # The body and the Cadenza-Schema-Version header must both be versions this consumer knows, and
    # agree when both are given. Either may be left out (`nats pub` sends no header; a body without
    # schema_version is version 1).
    header = (headers or {}).get(HDR_SCHEMA_VERSION)
    body = _version(raw["schema_version"], "body", cls) if "schema_version" in raw else None
    if header is None:
        return
    head = _version(header, f"{HDR_SCHEMA_VERSION} header", cls)
    if body is not None and body != head:
        raise ValidationError(
            f"the {HDR_SCHEMA_VERSION} header says {head} but the body's schema_version is {body}; they must agree",
            kind="version_mismatch",
        )


def _check_headers(cls: type[Event], raw: dict[str, Any], headers: Mapping[str, str] | None) -> None:
    # A header that contradicts the body would make the stream (which dedupes on Nats-Msg-Id) and
    # the consumers (which are idempotent by event_id) disagree about what the message is.
    if not headers:
        return
    kind = headers.get(HDR_EVENT_TYPE)
    if kind is not None and kind != cls.type_name():
        raise ValidationError(
            f"the {HDR_EVENT_TYPE} header says {kind!r} but the body is a {cls.type_name()} event",
            kind="type_mismatch",
        )
    msg_id, event_id = headers.get(HDR_MSG_ID), raw.get("event_id")
    if msg_id is not None and event_id is not None and msg_id != event_id:
        raise ValidationError(
            f"the {HDR_MSG_ID} header {msg_id!r} is not the body's event_id {event_id!r}; send the event id as "
            f"{HDR_MSG_ID} (or leave the header out)",
            kind="id_mismatch",
        )


def _plain(cls: type[Event], name: str, raw: dict[str, Any], headers: Mapping[str, str] | None) -> bool:
    """True when the body and headers pass the version and header rules at a glance (what cadenza
    itself sends: a known integer version, headers that repeat the body); anything else goes
    through :func:`_check_version` and :func:`_check_headers`, which say what is wrong."""
    version = raw.get("schema_version", 1)
    if type(version) is not int or not 1 <= version <= cls.SCHEMA_VERSION:
        return False
    return _headers_repeat(headers, name, version, "schema_version" in raw, raw.get("event_id"))


def _headers_repeat(headers: Mapping[str, str] | None, name: str, version: int, version_given: bool,
                    event_id: object) -> bool:  # fmt: skip
    """Whether each cadenza header given repeats the body: the version (only if the body gives one),
    the type, the event id (if the body has one)."""
    if not headers:
        return True
    header = headers.get(HDR_SCHEMA_VERSION)
    kind = headers.get(HDR_EVENT_TYPE)
    msg_id = headers.get(HDR_MSG_ID)
    return (
        (header is None or (version_given and header == str(version)))
        and (kind is None or kind == name)
        and (msg_id is None or event_id is None or msg_id == event_id)
    )


_EVENT_ID_FIRST: Final = b'{"event_id":"'
_TYPE_NEXT: Final = b'","type":"'


def _laid_out(data: bytes, by_type: Mapping[bytes, type[Event]]) -> type[Event] | None:
    """The accepted class named by a body that begins as :func:`encode` writes one,
    ``{"event_id":"<id>","type":"<name>",`` (so ``type`` is the object's own key, not one nested in
    a value), or None: no such beginning (another publisher's key order, an escape in the id), or
    a type not accepted here."""
    if not data.startswith(_EVENT_ID_FIRST):
        return None
    end = data.find(b'"', len(_EVENT_ID_FIRST))
    if end < 0 or data[end - 1] == 0x5C or not data.startswith(_TYPE_NEXT, end):  # 0x5C: a backslash
        return None
    start = end + len(_TYPE_NEXT)
    return by_type.get(data[start : data.find(b'"', start)])


def _plain_event(cls: type[Event], event: Event, headers: Mapping[str, str] | None) -> bool:
    """:func:`_plain` for an event validated from its bytes (the body's version is a JSON integer
    there: ``schema_version`` is a strict int): a version this code knows, headers that repeat the
    body."""
    if event.schema_version > cls.SCHEMA_VERSION:
        return False
    return _headers_repeat(headers, cls.type_name(), event.schema_version,
                           "schema_version" in event.model_fields_set, event.event_id)  # fmt: skip


def decode(
    data: bytes,
    headers: Mapping[str, str] | None,
    accept: Sequence[type[E]],
    *,
    max_bytes: int = MAX_EVENT_BYTES,
) -> E:
    """Validate a message body as one of the ``accept`` event classes (chosen by its ``type``).

    Raises:
        ValidationError: with ``kind`` ``oversize``, ``bad_json``, ``bad_shape``, ``unknown_type``,
            ``bad_version``, ``unknown_version``, ``version_mismatch``, ``type_mismatch`` or ``id_mismatch``
            and a message that says what was wrong. The rules are docs/wire.md's "Headers".
    """
    if len(data) > max_bytes:
        raise ValidationError(f"message is {len(data)} bytes, more than the {max_bytes} allowed", kind="oversize")
    key = tuple(accept)
    classes = _BY_TYPE.get(key)
    if classes is None:
        classes = ({c.type_name(): c for c in accept}, {c.type_name().encode(): c for c in accept})
        if len(_BY_TYPE) < 1024:
            _BY_TYPE[key] = classes
    cls = _laid_out(data, classes[1])
    if cls is not None:
        # Laid out as cadenza writes it: validated in one pass from the bytes (3-6 µs less than
        # parsing, then validating the dict), and taken only if it passes every rule below at a
        # glance; anything else (an error included) goes the long way, which says what is wrong.
        try:
            event = cls.__pydantic_validator__.validate_json(data)  # model_validate_json without its wrapper
        except pydantic.ValidationError:
            pass
        else:
            if _plain_event(cls, event, headers):
                return cast(E, event)
    return cast(E, _decode_parsed(data, headers, classes[0]))


def _decode_parsed(data: bytes, headers: Mapping[str, str] | None, by_type: Mapping[str, type[Event]]) -> Event:
    """:func:`decode` the long way: parsed, the class chosen by the parsed ``type``, every rule
    checked, then validated (what the one pass takes, this takes too: tests/test_bus_fastpath.py)."""
    raw: Any
    try:
        raw = parse_json(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValidationError(f"not JSON: {exc}", kind="bad_json") from None
    if not isinstance(raw, dict):
        raise ValidationError(f"expected a JSON object, got {type(raw).__name__}", kind="bad_shape")
    claimed = raw.get("type") or (headers.get(HDR_EVENT_TYPE) if headers else None)
    if len(by_type) == 1 and not claimed:
        name, cls = next(iter(by_type.items()))
    elif not isinstance(claimed, str) or claimed not in by_type:
        raise ValidationError(
            f"event type {claimed!r} is not taken here; expected one of {', '.join(sorted(by_type))}",
            kind="unknown_type",
        )
    else:
        name, cls = claimed, by_type[claimed]
    if not _plain(cls, name, raw, headers):
        _check_version(cls, raw, headers)
        _check_headers(cls, raw, headers)
    try:
        return cls.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ValidationError(f"not a valid {cls.type_name()} event: {_short(exc)}", kind="bad_shape") from None
