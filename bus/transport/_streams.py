"""What the streams hold, read as cadenza types: for every reader outside ``bus.transport``.

* :func:`stream_status` / :func:`account_usage`: a stream's state and the JetStream account's usage.
* :func:`open_reader`: a short-lived :class:`StreamReader` of one stream under a filter (an ephemeral
  pull consumer: no acks, in memory, forgotten by the server 30 s after its last use).
* :func:`follow_events`: an ordered follower of a stream (:func:`bus.transport.follow_stream`) whose
  handler gets a :class:`Received`, from a position on.
* :func:`stored_events`: what a stream still stores on one subject, oldest first, by "next message
  on this subject from sequence N" gets, without a consumer (a work-queue stream allows one consumer
  per subject, and a worker's inbox has its own): the recorder reads a lost worker's leftover tasks so.
* :func:`purge_subject`, :func:`purge_below`, :func:`delete_consumer`, :func:`ensure_topology`: the few
  management calls the services make.

A message comes out as a :class:`Received` (not nats-py's ``Msg``) and an engine error as a
:class:`~bus.BusError` (:class:`~bus.NotFoundError` for a missing message, stream or consumer) raised
``from`` the engine's error (``engine_errors``), so :func:`bus.is_transient` still sees what it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import Event

from .._exceptions import NotFoundError, ValidationError
from ._bus import Bus
from ._codec import decode
from ._direct import ack_fields
from ._errors import engine_errors, translate
from ._follow import follow_stream
from ._retry import retry_transient
from ._topology import Topology

__all__ = (
    "AccountUsage",
    "Received",
    "StreamPeer",
    "StreamReader",
    "StreamStatus",
    "account_usage",
    "delete_consumer",
    "ensure_topology",
    "follow_events",
    "open_reader",
    "purge_below",
    "purge_subject",
    "stored_events",
    "stream_status",
)

#: A peer's ``active`` beyond a year means "never" (the server's zero time).
_NEVER_NS = 1e9 * 86_400 * 365


@dataclass(frozen=True, slots=True)
class Received:
    """One message as a reader gets it.

    Attributes:
        subject: the subject it was published on.
        data: its body.
        headers: its headers (None: none).
        seq: its stream sequence (0: a core message, not stored).
        pending: messages left after it for the consumer that delivered it (0: caught up, or unknown).
        time: when the server stored it (None: a core message).
    """

    subject: str
    data: bytes
    headers: Mapping[str, str] | None = None
    seq: int = 0
    pending: int = 0
    time: datetime | None = None


def received(msg: Msg) -> Received:
    """The :class:`Received` of a message a JetStream consumer delivered."""
    fields = ack_fields(msg.reply)
    if fields is None:
        meta = msg.metadata
        return Received(msg.subject, msg.data, msg.headers, meta.sequence.stream, meta.num_pending, meta.timestamp)
    seq, _, pending, ns = fields
    return Received(msg.subject, msg.data, msg.headers, seq, pending, datetime.fromtimestamp(ns / 1e9, UTC))


@dataclass(frozen=True, slots=True)
class StreamPeer:
    """A follower of a replicated stream: whether it is current, how far behind, when last active."""

    name: str
    current: bool
    offline: bool
    lag: int
    active_s: float | None


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """A stream (or a bucket's stream) as the server reports it."""

    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int
    replicas: int
    max_bytes: int
    leader: str | None
    followers: tuple[StreamPeer, ...]


@dataclass(frozen=True, slots=True)
class AccountUsage:
    """The JetStream account's usage and limits (bytes; -1: no limit)."""

    memory: int
    storage: int
    streams: int
    consumers: int
    max_storage: int
    max_memory: int


async def stream_status(bus: Bus, name: str, *, timeout: float | None = None) -> StreamStatus:
    """The state of stream ``name`` (a bucket's stream is ``KV_<bucket>``), within ``timeout``
    (default ``Timeouts.request``).

    Raises:
        NotFoundError: no such stream.
        BusError: the server did not answer in time (transient) or refused.
    """
    with engine_errors(f"reading stream {name}"), anyio.fail_after(timeout or bus.timeouts.request):
        info = await bus.js.stream_info(name)
    cluster, state, config = info.cluster, info.state, info.config
    followers = tuple(
        StreamPeer(name=p.name or "", current=bool(p.current), offline=bool(p.offline), lag=p.lag or 0,
                   active_s=round((p.active or 0) / 1e9, 3) if (p.active or 0) < _NEVER_NS else None)
        for p in ((cluster.replicas or []) if cluster else [])
    )  # fmt: skip
    return StreamStatus(
        name=name, messages=state.messages, bytes=state.bytes, first_seq=state.first_seq, last_seq=state.last_seq,
        consumers=state.consumer_count, replicas=config.num_replicas or 1,
        max_bytes=-1 if config.max_bytes is None else config.max_bytes,
        leader=cluster.leader if cluster else None, followers=followers,
    )  # fmt: skip


async def account_usage(bus: Bus) -> AccountUsage:
    """The JetStream account's usage, within ``Timeouts.request``.

    Raises:
        BusError: JetStream did not answer (transient) or is not enabled for the account.
    """
    with engine_errors("reading the JetStream account"), anyio.fail_after(bus.timeouts.request):
        acct = await bus.js.account_info()
    return AccountUsage(memory=acct.memory, storage=acct.storage, streams=acct.streams, consumers=acct.consumers,
                        max_storage=acct.limits.max_storage, max_memory=acct.limits.max_memory)  # fmt: skip


async def purge_subject(bus: Bus, domain: str, subject: str) -> None:
    """Remove every message stored on ``subject`` (a filter) from ``domain``'s stream.

    Raises:
        BusError: the server did not do it.
    """
    with engine_errors(f"purging {subject}"):
        await bus.js.purge_stream(bus.topology.stream_name(domain), subject=subject)


async def purge_below(bus: Bus, domain: str, seq: int) -> None:
    """Remove every message ``domain``'s stream stores below sequence ``seq`` (one request, whatever
    their number and subjects).

    Raises:
        BusError: the server did not do it.
    """
    with engine_errors(f"purging {domain} below sequence {seq}"):
        await bus.js.purge_stream(bus.topology.stream_name(domain), seq=seq)


async def delete_consumer(bus: Bus, domain: str, name: str) -> None:
    """Delete the consumer ``name`` of ``domain``'s stream.

    Raises:
        NotFoundError: no such consumer (or stream).
        BusError: the server did not do it.
    """
    with engine_errors(f"deleting consumer {name}"):
        await bus.js.delete_consumer(bus.topology.stream_name(domain), name)


async def ensure_topology(bus: Bus, topology: Topology) -> None:
    """Declare (or upgrade) ``topology``'s streams and buckets, riding out transient errors."""
    js: JetStreamContext = bus.js
    await retry_transient(lambda: topology.ensure(js), what="declare the streams and buckets")


class StreamReader:
    """A short-lived reader of one stream's messages under a filter (see :func:`open_reader`)."""

    def __init__(self, bus: Bus, stream: str, psub: JetStreamContext.PullSubscription) -> None:
        self.bus = bus
        self.stream = stream
        self._psub = psub

    async def pending(self) -> int:
        """Messages not delivered yet (as the server counts them now)."""
        with engine_errors(f"reading {self.stream}"):
            return (await self._psub.consumer_info()).num_pending or 0

    async def fetch(self, batch: int, timeout: float) -> list[Received]:
        """Up to ``batch`` messages, oldest first; ``[]`` when none came within ``timeout``.

        Raises:
            BusError: the connection dropped, or the server forgot the consumer.
        """
        try:
            msgs = await self._psub.fetch(batch, timeout=timeout)
        except TimeoutError:  # nats-py raises its own TimeoutError, or asyncio's (the builtin) from a wait_for
            return []
        except nats.errors.Error as exc:
            raise translate(exc, f"reading {self.stream}") from exc
        return [received(m) for m in msgs]

    async def close(self, *, forget: bool = True) -> None:
        """Stop reading (shielded, bounded by ``Timeouts.shutdown``); with ``forget``, delete the
        consumer too rather than leave it to the server's inactivity threshold."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            if forget:
                with contextlib.suppress(Exception):
                    info = await self._psub.consumer_info()
                    await self.bus.js.delete_consumer(self.stream, info.name)


async def open_reader(
    bus: Bus, stream: str, filter_subject: str, *, start_seq: int = 0, start_time: datetime | None = None
) -> StreamReader:
    """A :class:`StreamReader` of stream ``stream`` under ``filter_subject``, from ``start_seq`` (or
    ``start_time``; neither: from the start). Close it with :meth:`StreamReader.close`.

    Raises:
        NotFoundError: the stream is not declared.
        BusError: the server did not answer (transient) or refused.
    """
    policy: dict[str, Any]
    if start_seq:
        policy = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
    elif start_time is not None:
        policy = {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start_time}
    else:
        policy = {"deliver_policy": DeliverPolicy.ALL}
    config = ConsumerConfig(**policy, ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True,
                            filter_subject=filter_subject)  # fmt: skip
    with engine_errors(f"reading {stream}"):
        psub = await bus.js.pull_subscribe(filter_subject, stream=stream, config=config)
    return StreamReader(bus, stream, psub)


async def follow_events(
    bus: Bus,
    domain: str,
    accept: Sequence[type[Event]],
    on_msg: Callable[[Received, Event | None], None],
    *,
    after: int = 0,
    last_per_subject: bool = False,
    consumer: str | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`~bus.transport.follow_stream` with a :class:`Received` for the handler: every message
    stored on ``domain``'s stream after sequence ``after`` (or each subject's last, with
    ``last_per_subject``), then live; ``event`` is None for input that does not validate (or when
    ``accept`` is empty: raw messages). Ready once the messages stored before the start were handled.
    """

    def handle(msg: Msg, event: Event | None) -> None:
        on_msg(received(msg), event)

    policy: dict[str, Any]
    if last_per_subject:
        policy = {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
    elif after > 0:
        policy = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after + 1}
    else:
        policy = {"deliver_policy": DeliverPolicy.ALL}
    await follow_stream(bus, domain, accept, handle, consumer, task_status, **policy)


async def stored_events(
    bus: Bus, domain: str, subject: str, accept: Sequence[type[Event]], *, limit: int = 1000
) -> list[tuple[int, Event | None]]:
    """``(stream sequence, event)`` of the messages ``domain``'s stream stores on ``subject``, oldest
    first, at most ``limit``; ``None`` for a message that does not validate.

    Raises:
        BusError: the engine did not answer (transient ones retry in the caller's loop).
    """
    stream = bus.topology.stream_name(domain)
    found: list[tuple[int, Event | None]] = []
    seq = 1
    while len(found) < limit:
        try:
            with engine_errors(f"reading {subject}"), anyio.fail_after(bus.timeouts.request):
                msg = await bus.js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break  # nothing more on the subject
        try:
            event: Event | None = decode(msg.data or b"", msg.headers, accept)
        except ValidationError:
            event = None
        at = msg.seq or seq
        found.append((at, event))
        seq = at + 1
    return found

