"""The one place that declares cadenza's JetStream topology: streams, consumers, key-value buckets.

Names derive from the subject prefix, so two cadenza installations (or two tests) with different
prefixes share a server without sharing state. :meth:`Topology.ensure` creates what is missing and
upgrades what changed in place (``update_stream`` keeps the stored messages); a change the server
cannot make in place (retention, storage) raises :class:`TopologyError` naming the stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from schemas import DEFAULT_PREFIX, Subjects

from ._exceptions import TopologyError

__all__ = ("BucketSpec", "ConsumerSpec", "StreamSpec", "Topology")

DAY: Final = 86_400.0
GIB: Final = 1024**3


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One stream: which domain it stores and its limits (seconds, bytes)."""

    domain: str
    description: str
    max_age: float
    max_bytes: int
    max_msgs_per_subject: int = -1
    duplicate_window: float = 120.0
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_msg_size: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One key-value bucket."""

    key: str
    description: str
    history: int = 1
    ttl: float | None = None
    max_bytes: int = GIB


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable pull consumer and its redelivery policy.

    Attributes:
        durable: durable name (unique in its stream).
        filter_subject: what it takes from the stream.
        max_deliver: deliveries before a message that keeps failing is dead-lettered.
        backoff: nak delays (seconds) for the 1st, 2nd, ... failed delivery; the last repeats.
        ack_wait: seconds the server waits for an ack before redelivering (handlers that run
            longer keep it alive with in-progress acks).
        max_ack_pending: messages out at once for this consumer (across all its processes).
        deliver_new: start at new messages rather than the whole stream.
        inactive_threshold: seconds without a pull after which the server deletes the consumer
            (a crashed worker's inbox consumer; None keeps it).
        ack_sync: wait for the server to confirm each ack (False: send it and go on; a lost ack
            means a redelivery, which a handler that is idempotent per event id absorbs).
    """

    durable: str
    filter_subject: str
    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.1, 0.5, 2.0, 5.0)
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    deliver_new: bool = False
    inactive_threshold: float | None = None
    ack_sync: bool = True

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW if self.deliver_new else DeliverPolicy.ALL,
            max_deliver=self.max_deliver,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            inactive_threshold=self.inactive_threshold,
        )

    def delay_for(self, deliveries: int) -> float:
        """Nak delay after the ``deliveries``-th failed delivery."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(max(deliveries, 1), len(self.backoff)) - 1]


#: Every stream cadenza uses, by domain. ``rpc`` is core request/reply and is not stored.
STREAMS: Final[tuple[StreamSpec, ...]] = (
    StreamSpec("session", "session lifecycle events", max_age=7 * DAY, max_bytes=2 * GIB),
    StreamSpec(
        "worker", "worker lifecycle and heartbeats (last of each per worker)", max_age=1 * DAY,
        max_bytes=GIB, max_msgs_per_subject=1,
    ),
    StreamSpec(
        "task", "activity tasks, removed once a worker acknowledges them", max_age=1 * DAY,
        max_bytes=2 * GIB, retention=RetentionPolicy.WORK_QUEUE,
    ),
    StreamSpec("activity", "tracked activity events", max_age=30 * DAY, max_bytes=8 * GIB),
    StreamSpec(
        "cancel", "cancellation requests with their cause (last per target)", max_age=1 * DAY,
        max_bytes=GIB, max_msgs_per_subject=1,
    ),
    StreamSpec("dlq", "rejected input with the reason", max_age=30 * DAY, max_bytes=2 * GIB, max_msg_size=-1),
)  # fmt: skip

#: Every key-value bucket cadenza uses.
BUCKETS: Final[tuple[BucketSpec, ...]] = (
    BucketSpec("sessions", "session state (broker), compare-and-set", history=5),
    BucketSpec("workers", "live workers and their slots (broker), compare-and-set", history=5),
    BucketSpec("activities", "materialised activity state (recorder), compare-and-set", history=5),
    # Only the broker user may read it (deploy/nats/accounts.conf): the generated token key lives here.
    BucketSpec("broker", "broker-only secrets (the generated recreate-token key)", history=1, max_bytes=1024**2),
)


def _upper(prefix: str) -> str:
    return prefix.replace(".", "_").replace("-", "_").upper()


@dataclass(slots=True)
class Topology:
    """The streams and buckets of one cadenza installation (one prefix).

    Args:
        prefix: subject prefix; stream and bucket names derive from it.
        replicas: 1 on a single server, 3 on a cluster (``CADENZA_REPLICAS`` overrides).
    """

    prefix: str = DEFAULT_PREFIX
    replicas: int = field(default_factory=lambda: int(os.environ.get("CADENZA_REPLICAS", "1")))
    subjects: Subjects = field(init=False)

    def __post_init__(self) -> None:
        self.subjects = Subjects(self.prefix)
        if self.replicas not in (1, 3, 5):
            raise TopologyError(f"replicas must be 1, 3 or 5, not {self.replicas}")

    def stream_name(self, domain: str) -> str:
        """The stream that stores ``domain`` (``CADENZA_SESSION`` for the default prefix)."""
        return f"{_upper(self.prefix)}_{domain.upper()}"

    def bucket_name(self, key: str) -> str:
        """The key-value bucket ``key`` (``cadenza_sessions`` for the default prefix)."""
        return f"{_upper(self.prefix).lower()}_{key}"

    def stream_spec(self, domain: str) -> StreamSpec:
        for spec in STREAMS:
            if spec.domain == domain:
                return spec
        raise TopologyError(f"no stream stores the {domain!r} domain")

    def stream_config(self, spec: StreamSpec) -> StreamConfig:
        return StreamConfig(
            name=self.stream_name(spec.domain),
            description=spec.description,
            subjects=[self.subjects.domain_wildcard(spec.domain)],
            retention=spec.retention,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=spec.max_age,
            max_bytes=spec.max_bytes,
            max_msgs_per_subject=spec.max_msgs_per_subject,
            max_msg_size=spec.max_msg_size,
            duplicate_window=spec.duplicate_window,
            num_replicas=self.replicas,
        )

    def table(self) -> list[tuple[str, str, str, str]]:
        """(subject filter, stream, limits, what) rows for docs and ``cadenza subjects``."""
        rows: list[tuple[str, str, str, str]] = []
        for spec in STREAMS:
            limits = f"age {spec.max_age / DAY:g}d, {spec.max_bytes / GIB:g} GiB"
            if spec.max_msgs_per_subject > 0:
                limits += f", {spec.max_msgs_per_subject}/subject"
            if spec.retention == RetentionPolicy.WORK_QUEUE:
                limits += ", work-queue"
            rows.append((self.subjects.domain_wildcard(spec.domain), self.stream_name(spec.domain), limits,
                         spec.description))  # fmt: skip
        rows.append((self.subjects.domain_wildcard("rpc"), "(core request/reply)", "not stored",
                     "service endpoints"))  # fmt: skip
        rows += [
            (f"$KV.{self.bucket_name(b.key)}.>", f"KV_{self.bucket_name(b.key)}", f"history {b.history}", b.description)
            for b in BUCKETS
        ]
        return rows

    async def ensure(self, js: JetStreamContext) -> None:
        """Create every stream and bucket that is missing; upgrade limits that changed.

        Idempotent: running it at every start-up of every process is the intended use.

        Raises:
            TopologyError: the server refused a declaration (the message names it and why).
        """
        for spec in STREAMS:
            await self._ensure_stream(js, self.stream_config(spec))
        for b in BUCKETS:
            await self._ensure_bucket(js, b)

    async def _ensure_stream(self, js: JetStreamContext, cfg: StreamConfig) -> None:
        assert cfg.name is not None
        try:
            info = await js.stream_info(cfg.name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(cfg)
            except nats.js.errors.BadRequestError as exc:
                # Another process may have created it a moment ago; that is fine if it matches.
                if exc.err_code != 10058:  # stream name already in use
                    raise TopologyError(f"cannot create stream {cfg.name}: {exc.description}") from exc
            except nats.errors.Error as exc:
                raise TopologyError(f"cannot create stream {cfg.name}: {exc}") from exc
            return
        except nats.errors.Error as exc:
            raise TopologyError(f"cannot read stream {cfg.name}: {exc}") from exc
        if not _same_limits(info.config, cfg):
            try:
                await js.update_stream(cfg)
            except nats.errors.Error as exc:
                raise TopologyError(
                    f"stream {cfg.name} exists with other settings the server cannot change in place "
                    f"({exc}); migrate it by hand (nats stream edit / backup and restore)"
                ) from exc

    async def _ensure_bucket(self, js: JetStreamContext, b: BucketSpec) -> None:
        name = self.bucket_name(b.key)
        try:
            await js.key_value(name)
            return
        except nats.js.errors.BucketNotFoundError:
            pass
        except nats.errors.Error as exc:
            raise TopologyError(f"cannot read key-value bucket {name}: {exc}") from exc
        try:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=name, description=b.description, history=b.history, ttl=b.ttl,
                    max_bytes=b.max_bytes, storage=StorageType.FILE, replicas=self.replicas,
                )
            )  # fmt: skip
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:
                raise TopologyError(f"cannot create key-value bucket {name}: {exc.description}") from exc
        except nats.errors.Error as exc:
            raise TopologyError(f"cannot create key-value bucket {name}: {exc}") from exc

    async def ensure_consumer(self, js: JetStreamContext, domain: str, spec: ConsumerSpec) -> None:
        """Create or update one durable consumer on ``domain``'s stream.

        Raises:
            TopologyError: the server refused it.
        """
        stream = self.stream_name(domain)
        try:
            await js.add_consumer(stream, spec.config())
        except nats.errors.Error as exc:
            raise TopologyError(f"cannot declare consumer {spec.durable} on {stream}: {exc}") from exc


def _same_limits(have: StreamConfig, want: StreamConfig) -> bool:
    fields = ("subjects", "max_age", "max_bytes", "max_msgs_per_subject", "max_msg_size", "duplicate_window",
              "num_replicas", "description", "discard")  # fmt: skip
    return all(getattr(have, f) == getattr(want, f) for f in fields)
