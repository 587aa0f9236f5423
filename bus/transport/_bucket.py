"""Key-value buckets of the topology, typed: records under keys, followed into a cache, changed by compare-and-set.

The services keep their state in buckets (``sessions``, ``workers``, ``broker``) and change it by
compare-and-set only, so several replicas may write at once. The idea is written once here:

* :class:`RawBucket`: the bytes under the keys. :meth:`~RawBucket.read` (a missing key is None, a
  delete marker a :class:`Stored` without a value), :meth:`~RawBucket.write` at a revision (0:
  create), :meth:`~RawBucket.delete`, :meth:`~RawBucket.purge`, :meth:`~RawBucket.keys`, and
  :meth:`~RawBucket.follow`: every key as stored, then each change, live.
* :class:`Bucket` ``[T]``: pydantic records ``T`` under the keys, with an in-memory cache that
  :meth:`~Bucket.watch` keeps (a value that does not validate is skipped, logged and dead-lettered
  under the bucket's consumer name) and the bucket's own writes update at once.
  :meth:`~Bucket.update` applies a change function by compare-and-set, re-reading and retrying on
  a conflict (bounded).
* :func:`last_event`: the last event stored on one subject of a stream, with the server's time of
  storing (a worker's last heartbeat, read by the broker and ``cadenza workers``).

Keys starting with ``_`` are the services' own bookkeeping: followers and :meth:`~RawBucket.keys`
skip them. Engine errors come out as cadenza's (:func:`~bus.transport.engine_errors`: a missing key
:class:`~bus.NotFoundError`, a lost compare-and-set :class:`~bus.ConflictError`, anything else
:class:`~bus.BusError`), transient ones retried with backoff first (:func:`~bus.retry_transient`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import anyio
import nats.js.errors
import pydantic
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from schemas import Event

from .._exceptions import CadenzaError, ConflictError, NotFoundError, ValidationError
from ._bus import Bus
from ._codec import decode
from ._errors import engine_errors
from ._retry import retry_transient

__all__ = ("Bucket", "Entry", "RawBucket", "Stored", "StoredEvent", "last_event")

_log = logging.getLogger("cadenza.bus")

T = TypeVar("T", bound=pydantic.BaseModel)

#: Compare-and-set attempts of one :meth:`Bucket.update` before it gives up.
UPDATE_ATTEMPTS = 64

#: Seconds between the server's idle heartbeats to an ordered consumer (a bucket watch, a stream
#: follower). nats-py starts the consumer again after two missed ones; at its default of 5 s, a
#: follower whose consumer died with its node (an ordered consumer has one replica) stayed silent
#: for 10-20 s: a broker heard no worker's heartbeat and placed no session.
IDLE_HEARTBEAT = 1.0


def ended(bus: Bus, sub: Any) -> bool:
    """Whether the nats-py subscription ``sub`` of a follower (or the bus's connection) has closed:
    nats-py gives no event for it, so followers look every second (its private ``_closed`` flag,
    read here only)."""
    return bool(sub._closed) or bus.nc.is_closed


def _operation(headers: dict[str, str] | None) -> str | None:
    """``PUT``, ``DEL`` or ``PURGE`` of a bucket message (None: a marker of a kind not known here),
    as nats-py's watch reads it (a server-placed expiry marker says so in ``Nats-Marker-Reason``)."""
    headers = headers or {}
    if "KV-Operation" in headers:
        return headers["KV-Operation"]
    reason = headers.get("Nats-Marker-Reason")
    if reason is None:
        return "PUT"
    return {"MaxAge": "PURGE", "Purge": "PURGE", "Remove": "DEL"}.get(reason)


@dataclass(frozen=True, slots=True)
class Stored:
    """What a bucket holds under a key: ``value`` None for a delete or purge marker (``operation``
    ``DEL`` / ``PURGE``; a delete leaves the older revisions readable in the history, a purge does
    not) or an empty value."""

    key: str
    value: bytes | None
    revision: int
    operation: str = "PUT"


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """A record of a :class:`Bucket`'s cache and the revision it was stored at."""

    value: T
    revision: int


class RawBucket:
    """The bytes under the keys of the topology's bucket ``key`` (``sessions``, ``workers``, ``broker``).

    Opened on first use (:meth:`open` opens it at once, to fail early).
    """

    def __init__(self, bus: Bus, key: str) -> None:
        self.bus = bus
        self.key = key
        #: The bucket's name on the server (``cadenza_sessions`` for the default prefix).
        self.name = bus.topology.bucket_name(key)
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        """Open the bucket now. Raises BusError: it is not available."""
        await self._open()

    async def _open(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.kv(self.key)
        return self._kv

    async def read(self, key: str) -> Stored | None:
        """What is stored under ``key`` now: None if nothing ever was (or it was purged long ago)."""
        kv = await self._open()

        async def get() -> Stored | None:
            with engine_errors(f"read {key} from the {self.key} bucket"):
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError as exc:  # nats-py reports a deleted key so, with its op
                    if exc.op is None:
                        return None
                    revision = exc.entry.revision if exc.entry is not None else 0
                    return Stored(key, None, revision or 0, str(exc.op))
            return Stored(key, entry.value or None, entry.revision or 0)

        return await retry_transient(get, what=f"read {key}")

    async def write(self, key: str, data: bytes, revision: int = 0) -> int:
        """Store ``data`` under ``key`` if the key is still at ``revision`` (0: if there is none, or
        only a delete marker); returns the new revision.

        Raises:
            ConflictError: the key is not at ``revision`` (or exists, for 0).
        """
        kv = await self._open()

        async def put() -> int:
            with engine_errors(f"write {key} to the {self.key} bucket"):
                return await kv.update(key, data, last=revision) if revision else await kv.create(key, data)

        # A write retried after a lost answer may find its own first try stored: the conflict that
        # follows makes the caller re-read, and an idempotent change then changes nothing.
        return await retry_transient(put, what=f"write {key}")

    async def delete(self, key: str, *, revision: int = 0, budget: float = 30.0) -> None:
        """Delete ``key`` (only if still at ``revision``, when given). Raises ConflictError: it moved on."""
        kv = await self._open()

        async def delete() -> None:
            with engine_errors(f"delete {key} from the {self.key} bucket"):
                await kv.delete(key, last=revision or None)

        await retry_transient(delete, what=f"delete {key}", budget=budget)

    async def purge(self, key: str, *, budget: float = 30.0) -> None:
        """Remove ``key`` and every older revision of it (a delete keeps them in the history)."""
        kv = await self._open()

        async def purge() -> None:
            with engine_errors(f"purge {key} from the {self.key} bucket"):
                await kv.purge(key)

        await retry_transient(purge, what=f"purge {key}", budget=budget)

    async def keys(self) -> list[str]:
        """The keys that hold a value now (not the ``_`` bookkeeping ones)."""
        kv = await self._open()

        async def keys() -> list[str]:
            with engine_errors(f"list the {self.key} bucket"):
                try:
                    return await kv.keys()
                except nats.js.errors.NoKeysError:
                    return []

        return [k for k in await retry_transient(keys, what=f"list {self.key}") if not k.startswith("_")]

    async def follow(
        self, on_change: Callable[[Stored], Awaitable[None]],
        *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """Await ``on_change(stored)`` for every stored key, then for each change, until cancelled
        (or the engine ends the watch: run it under :func:`~bus.run_restarting`).

        Ready (``task_status.started()``) once the stored keys were delivered. A deleted or purged
        key (or an empty value) comes with ``value`` None.

        Raises:
            BusError: the bucket is not available or the watch failed.
        """
        await self._open()
        send, receive = anyio.create_memory_object_stream[Stored | None](math.inf)
        sub, last = await self._subscribe(send)
        try:
            ready = last == 0
            if ready:
                task_status.started()
            while not ended(self.bus, sub):
                stored: Stored | bool | None = False  # False: nothing within a second (look at the subscription)
                with anyio.move_on_after(1.0):
                    stored = await receive.receive()
                if isinstance(stored, Stored):
                    await on_change(stored)
                elif stored is None and not ready:
                    ready = True
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _subscribe(self, send: MemoryObjectSendStream[Stored | None]) -> tuple[Any, int]:
        """The watch's subscription, sending each key's last value then each change to ``send`` (and
        None once caught up with the last message stored now), and that message's seq (0: none)."""
        # nats-py's KeyValue.watch, on an ordered consumer of our own: its idle heartbeat is not
        # settable there, and at nats-py's 5 s a watch whose consumer died with its node stayed
        # silent for 10-20 s (a broker's cache of the workers' slots then went stale).
        stream, prefix = f"KV_{self.name}", f"$KV.{self.name}."
        with engine_errors(f"watch the {self.key} bucket"):
            state = (await self.bus.js.stream_info(stream)).state
            last = state.last_seq if state.messages else 0

            async def arrive(msg: Msg) -> None:
                meta = msg.metadata
                key, operation = msg.subject[len(prefix) :], _operation(msg.headers)
                if operation is not None and not key.startswith("_"):
                    gone = operation != "PUT" or not msg.data
                    send.send_nowait(Stored(key, None if gone else msg.data, meta.sequence.stream, operation))
                if meta.sequence.stream >= last or meta.num_pending == 0:
                    send.send_nowait(None)  # caught up with what was stored at the start

            sub = await self.bus.js.subscribe(
                prefix + ">", stream=stream, cb=arrive, ordered_consumer=True, idle_heartbeat=IDLE_HEARTBEAT,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, inactive_threshold=300.0,
                pending_msgs_limit=1_000_000, pending_bytes_limit=256 * 1024 * 1024,
            )  # fmt: skip
        return sub, last


class Bucket(RawBucket, Generic[T]):
    """Records ``model`` under the keys of the topology's bucket ``key``, and a cache of them.

    Args:
        bus: the connection.
        key: the bucket of the topology (``sessions``, ``workers``).
        model: the record type; a stored value that does not validate as one is bad input.
        consumer: the name bad values are dead-lettered under by :meth:`watch` (None: only logged).
        on_change: called after each change the cache takes (a watched change or the bucket's own write).
    """

    def __init__(
        self, bus: Bus, key: str, model: type[T], *, consumer: str | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(bus, key)
        self.model = model
        self.consumer = consumer
        self._on_change = on_change
        #: The records by key, as last seen (never replaced: hold on to it).
        self.cache: dict[str, Entry[T]] = {}

    def cached(self, key: str) -> T | None:
        """The cached record under ``key`` (None: none)."""
        entry = self.cache.get(key)
        return entry.value if entry is not None else None

    def remember(self, key: str, value: T, revision: int) -> None:
        """Put ``value`` in the cache unless it holds a later revision of ``key`` already."""
        cur = self.cache.get(key)
        if cur is None or revision > cur.revision:
            self.cache[key] = Entry(value, revision)
            self._changed()

    def forget(self, key: str) -> None:
        """Drop ``key`` from the cache (after deleting it)."""
        if self.cache.pop(key, None) is not None:
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _validate(self, stored: Stored) -> T:
        assert stored.value is not None
        try:
            return self.model.model_validate_json(stored.value)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "(value)"
            raise ValidationError(f"not a {self.model.__name__}: {first['msg']} at {where}") from exc

    async def get(self, key: str) -> tuple[T | None, int]:
        """The stored record under ``key`` and its revision, read now (cached too); ``(None, 0)`` if none.

        Raises:
            ValidationError: the stored value is not a ``model``.
            BusError: the server did not answer (transient errors are retried first).
        """
        stored = await self.read(key)
        if stored is None or stored.operation != "PUT":
            return None, 0  # (a deleted key is created again on top of its marker)
        if stored.value is None:
            return None, stored.revision
        value = self._validate(stored)
        self.remember(key, value, stored.revision)
        return value, stored.revision

    async def create(self, key: str, value: T) -> int:
        """Store ``value`` under ``key`` if there is none; its revision. Raises ConflictError: there is one."""
        revision = await self.write(key, value.model_dump_json().encode())
        self.remember(key, value, revision)
        return revision

    async def update(
        self, key: str, change: Callable[[T | None], T | None], *, attempts: int = UPDATE_ATTEMPTS
    ) -> T | None:
        """Apply ``change`` to the stored record by compare-and-set, re-reading and retrying on conflicts.

        ``change`` gets the current record (None: no key), from the cache first, and returns the new
        one, or None for "no change"; it may run several times, so it must be idempotent. Returns the
        record stored afterwards (None if there is none).

        Raises:
            BusError: still conflicting after ``attempts`` writes, or the server failed.
            ValidationError: the stored value is not a ``model``.
        """
        cached = self.cache.get(key)
        current, revision = (cached.value, cached.revision) if cached is not None else (None, 0)
        for _attempt in range(attempts):
            new = change(current)
            if new is None:
                return current
            try:
                revision = await self.write(key, new.model_dump_json().encode(), revision)
            except (ConflictError, NotFoundError):
                current, revision = await self.get(key)
                continue
            self.remember(key, new, revision)
            return new
        raise ConflictError(f"could not update {key} in the {self.key} bucket after {attempts} conflicting writes")

    async def delete(self, key: str, *, revision: int = 0, budget: float = 30.0) -> None:
        await super().delete(key, revision=revision, budget=budget)
        self.forget(key)

    async def purge(self, key: str, *, budget: float = 30.0) -> None:
        await super().purge(key, budget=budget)
        self.forget(key)

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep :attr:`cache` up to date: every key as stored, then each change, until cancelled.

        Ready once the stored keys are in the cache. A change older than what the cache holds (the
        bucket's own write got there first) is skipped; a value that is no ``model`` is skipped,
        logged and dead-lettered (:attr:`consumer`). Run it under :func:`~bus.run_restarting`.
        """
        await self.follow(self._apply, task_status=task_status)

    async def _apply(self, stored: Stored) -> None:
        cur = self.cache.get(stored.key)
        if cur is not None and stored.revision <= cur.revision:
            return
        if stored.value is None:
            self.cache.pop(stored.key, None)
        else:
            try:
                self.cache[stored.key] = Entry(self._validate(stored), stored.revision)
            except ValidationError as exc:
                await self._bad_value(stored, exc)
        self._changed()

    async def _bad_value(self, stored: Stored, exc: ValidationError) -> None:
        """A value that is no record: left out of the cache, dead-lettered with the reason."""
        _log.error("%s bucket: key %s does not hold a %s", self.name, stored.key, self.model.__name__)
        if self.consumer is None or stored.value is None:
            return
        with contextlib.suppress(CadenzaError):  # the watch goes on; the error is logged above
            await self.bus.dead_letter(
                consumer=self.consumer, subject=f"$KV.{self.name}.{stored.key}", data=stored.value, headers=None,
                reason=exc.message, error_type="bad_shape", stream=f"KV_{self.name}", stream_seq=stored.revision,
            )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """The last message stored on a subject: ``event`` None if it is none of the accepted events."""

    event: Event | None
    stored_at: datetime | None
    seq: int


async def last_event(bus: Bus, domain: str, subject: str, accept: Sequence[type[Event]]) -> StoredEvent | None:
    """The last message stored on ``subject`` of ``domain``'s stream (None: none), within the request timeout.

    Raises:
        BusError: the server did not answer in time, or failed.
    """
    stream = bus.topology.stream_name(domain)
    with engine_errors(f"read the last event on {subject}"), anyio.fail_after(bus.timeouts.request):
        try:
            msg = await bus.js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
    try:
        event: Event | None = decode(msg.data or b"", msg.headers, accept)
    except ValidationError:
        event = None
    return StoredEvent(event, msg.time, msg.seq or 0)
