"""The common envelope every cadenza event carries, and the registry of event types."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

__all__ = ["Event", "event_types", "lookup_event_type", "new_event_id", "utcnow"]

_REGISTRY: dict[str, type[Event]] = {}
#: The modules of this package that declare events: imported by :func:`event_types` and
#: :func:`lookup_event_type` (the package imports its modules lazily; tests/test_public_api.py checks
#: the list).
_EVENT_MODULES = ("_activity", "_cancel", "_dlq", "_session", "_task", "_worker")


#: The random bytes of the next event ids, 16 for each: one ``os.urandom`` call per 256 ids, not
#: one per id (a system call, a third of an id's cost; a caller makes two per activity). Taken with
#: ``next``, which is atomic in CPython: two threads never get the same bytes (both may refill; the
#: ids one of them leaves are dropped). A forked child starts with none of its parent's.
_RANDOM: Iterator[bytes] = iter(())


def _forget_random() -> None:
    global _RANDOM
    _RANDOM = iter(())


os.register_at_fork(after_in_child=_forget_random)


def new_event_id() -> str:
    """A fresh event id (UUID4, lower-case hex with dashes): ``str(uuid.uuid4())`` without the UUID
    object, which costs twice as much, for every event made."""
    global _RANDOM
    block = next(_RANDOM, None)
    if block is None:
        pool = os.urandom(4096)
        _RANDOM = iter([pool[i : i + 16] for i in range(0, 4096, 16)])
        block = next(_RANDOM)
    raw = bytearray(block)
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every event on the wire.

    Subclasses set ``DOMAIN`` and ``EVENT`` (the first and last words after the prefix of their
    subject) and implement :meth:`subject_id` (the identifier token of their subject).
    ``SCHEMA_VERSION`` is the newest version of the shape this code understands; a message that
    claims a newer one is rejected by consumers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    DOMAIN: ClassVar[str] = ""
    EVENT: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1
    #: False keeps a class out of the registry (test fixtures, private events).
    REGISTER: ClassVar[bool] = True
    #: False: cadenza sends it without the ``Cadenza-Schema-Version`` / ``Cadenza-Event-Type``
    #: headers (docs/wire.md: optional; the body says both). For the messages of every activity (its
    #: task, result and ``activity.*`` events): nats-py parses every header of a message it receives
    #: character by character (a sixth of a worker's Python calls per task, half the recorder's).
    TYPE_HEADERS: ClassVar[bool] = True
    #: False: cadenza stores it without ``Nats-Msg-Id`` (the stream's duplicate check costs its
    #: server about 3.5 µs a message, measured): for an event whose store refuses a second copy by
    #: itself (an activity's completion: the first one wins, docs/wire.md).
    DEDUPE: ClassVar[bool] = True

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=128)
    type: str = Field(default="", description="'<domain>.<event>', fixed per event class")
    schema_version: int = Field(default=1, ge=1, strict=True)
    time: datetime = Field(default_factory=utcnow)
    source: str = Field(default="", max_length=256, description="who published it (service or host)")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.DOMAIN and cls.EVENT and cls.__dict__.get("REGISTER", True):
            name = cls.type_name()
            other = _REGISTRY.get(name)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"event type {name!r} is declared twice ({other!r} and {cls!r})")
            _REGISTRY[name] = cls
        if cls.DOMAIN and cls.EVENT:
            # The type's default is the class's own type name (filled in without a validator call).
            fields = cls.__pydantic_fields__
            fields["type"] = FieldInfo.merge_field_infos(fields["type"], default=cls.type_name())
            if cls.__pydantic_complete__:  # built already (not deferred): build it with the new default
                cls.model_rebuild(force=True)

    @field_validator("type", mode="before")
    @classmethod
    def _check_type(cls, claimed: Any) -> Any:
        # The type is implied by the class (the field's default: callers never spell it); a payload
        # may leave it empty, and must not claim another type. A field validator, not a model one:
        # it runs only when the type is given (decoding), not for every event this code builds.
        if not cls.DOMAIN:
            return claimed
        name = cls.type_name()
        if claimed in ("", None):
            return name
        if claimed != name:
            raise ValueError(f"type is {claimed!r} but this is a {name!r} event")
        return claimed

    @classmethod
    def type_name(cls) -> str:
        """'<domain>.<event>' of this class."""
        return f"{cls.DOMAIN}.{cls.EVENT}"

    def subject_id(self) -> str:
        """The identifier token of this event's subject (an activity id, a session id, ...)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its subject id")

    def subject_event(self) -> str:
        """The last token of this event's subject (``EVENT`` unless a class routes by content)."""
        return self.EVENT

    @classmethod
    def subject_pattern(cls) -> str:
        """Where events of this class travel, for docs: ``<prefix>.<domain>.<id>.<event>``."""
        return f"<prefix>.{cls.DOMAIN}.<id>.{cls.EVENT}"


def event_types() -> dict[str, type[Event]]:
    """Every registered event class by its type name, sorted."""
    _import_event_modules()
    return dict(sorted(_REGISTRY.items()))


def lookup_event_type(name: str) -> type[Event] | None:
    """The event class registered under ``name`` ('<domain>.<event>'), or None."""
    _import_event_modules()
    return _REGISTRY.get(name)


def _import_event_modules() -> None:
    for module in _EVENT_MODULES:
        importlib.import_module(f"{__package__}.{module}")
