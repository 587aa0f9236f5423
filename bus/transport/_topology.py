"""The one place that declares cadenza's JetStream topology: streams, consumers, key-value buckets.

Names derive from the subject prefix, so two cadenza installations (or two tests) with different
prefixes share a server without sharing state. :meth:`Topology.ensure` creates what is missing and
upgrades what changed in place (``update_stream`` keeps the stored messages); a change the server
cannot make in place (retention, storage) raises :class:`TopologyError` naming the stream.

Storage: every stream and bucket reserves its ``max_bytes`` against the server's ``max_file_store``
on each node that holds a replica, when it is declared, whether or not it is ever filled. The
defaults below add up to 19 GiB per node (:meth:`Topology.storage_needed`). ``storage`` (or
``CADENZA_STORAGE``, e.g. ``4GiB``) is a total budget split across the streams and buckets in the
default proportions; a server that refuses a declaration for lack of store gets a one-line
:class:`TopologyError` saying how much is needed and how to lower it.
"""

from __future__ import annotations

import os
import re
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
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from schemas import DEFAULT_PREFIX, Subjects

from .._exceptions import TopologyError

__all__ = ("BucketSpec", "ConsumerSpec", "StreamSpec", "Topology", "format_size", "parse_size")

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
    # Only the broker user may read it (deploy/nats/accounts.conf): the generated token key lives here.
    BucketSpec("broker", "broker-only secrets (the generated recreate-token key)", history=1, max_bytes=1024**2),
)


#: The default reservation of everything above, per node (bytes).
DEFAULT_STORAGE: Final = sum(s.max_bytes for s in STREAMS) + sum(b.max_bytes for b in BUCKETS)
#: No stream or bucket is given less than this, whatever the budget.
MIN_BYTES: Final = 1024**2

_UNITS: Final = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
                 "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4,
                 "TIB": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of ``"4GiB"``, ``"500MB"``, ``"4G"`` (powers of 1000) or ``"123"``.

    Raises:
        TopologyError: not a size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m[2].upper() if m else ""
    if m is None or unit not in _UNITS:
        raise TopologyError(f"not a storage size: {text!r} (write e.g. 4GiB, 500MB or a number of bytes)")
    return int(float(m[1]) * _UNITS[unit])


def _storage_from_env() -> int | None:
    text = os.environ.get("CADENZA_STORAGE", "").strip()
    return parse_size(text) if text else None


def _replicas_from_env() -> int | None:
    text = os.environ.get("CADENZA_REPLICAS", "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise TopologyError(f"CADENZA_REPLICAS must be 1, 3 or 5, not {text!r}") from None


def _upper(prefix: str) -> str:
    return prefix.replace(".", "_").replace("-", "_").upper()


@dataclass(slots=True)
class Topology:
    """The streams and buckets of one cadenza installation (one prefix).

    Args:
        prefix: subject prefix; stream and bucket names derive from it.
        replicas: 1 on a single server, 3 on a cluster (default: ``CADENZA_REPLICAS``). None
            creates with 1 and leaves an existing stream's replicas as they are, so a process
            started without the setting never scales down what ``cadenza setup`` declared.
        storage: bytes of file store the streams and buckets may reserve per node, split in the
            default proportions (default: ``CADENZA_STORAGE``). None creates with the defaults
            (19 GiB in all) and leaves an existing stream's ``max_bytes`` as it is.

    Raises:
        TopologyError: replicas not 1, 3 or 5; a storage budget below ``MIN_BYTES`` per stream.
    """

    prefix: str = DEFAULT_PREFIX
    replicas: int | None = field(default_factory=_replicas_from_env)
    storage: int | None = field(default_factory=_storage_from_env)
    subjects: Subjects = field(init=False)

    def __post_init__(self) -> None:
        self.subjects = Subjects(self.prefix)
        if self.replicas not in (None, 1, 3, 5):
            raise TopologyError(f"replicas must be 1, 3 or 5, not {self.replicas}")
        parts = len(STREAMS) + len(BUCKETS)
        if self.storage is not None and self.storage < parts * MIN_BYTES:
            raise TopologyError(f"a storage budget of {self.storage} bytes is too small: give at least "
                                f"{parts} MiB (1 MiB per stream and bucket)")  # fmt: skip

    def max_bytes(self, default: int) -> int:
        """A stream's or bucket's limit: its default, or its share of the ``storage`` budget
        (``MIN_BYTES`` each, and what is left split in the proportions of the defaults, so the
        shares never add up to more than the budget)."""
        if self.storage is None:
            return default
        parts = len(STREAMS) + len(BUCKETS)
        return MIN_BYTES + (self.storage - parts * MIN_BYTES) * default // DEFAULT_STORAGE

    def storage_needed(self) -> int:
        """Bytes of file store every node holding a replica must have free for :meth:`ensure`."""
        return sum(self.max_bytes(s.max_bytes) for s in STREAMS) + sum(self.max_bytes(b.max_bytes) for b in BUCKETS)

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
            max_bytes=self.max_bytes(spec.max_bytes),
            max_msgs_per_subject=spec.max_msgs_per_subject,
            max_msg_size=spec.max_msg_size,
            duplicate_window=spec.duplicate_window,
            num_replicas=self.replicas or 1,
            republish=self.done_republish() if spec.domain == "activity" else None,
        )

    def done_republish(self) -> RePublish:
        """The activity stream's republish of each stored completion to its caller (docs/DESIGN.md, "The
        completion republished to its caller"): ``<prefix>.activity.<id>.completed`` goes on to
        ``<prefix>.done.<id with ~ as dots>`` once stored, so the completion of a caller-made id
        ``<user>~<client>~<uuid>`` reaches ``<prefix>.done.<user>.<client>.<uuid>``, which only that
        user may read; an id without ``~`` goes to ``<prefix>.done.<id>``, where nobody listens."""
        return RePublish(src=f"{self.prefix}.activity.*.completed", dest=f"{self.prefix}.done.{{{{split(1,~)}}}}")

    def done_filter(self, route: str) -> str:
        """The subject a caller whose activity ids start with ``route`` (``<user>~<client>~``) hears
        their stored completions on."""
        return f"{self.prefix}.done.{route.rstrip('~').replace('~', '.')}.>"

    def table(self) -> list[tuple[str, str, str, str]]:
        """(subject filter, stream, limits, what) rows for docs and ``cadenza subjects``."""
        rows: list[tuple[str, str, str, str]] = []
        for spec in STREAMS:
            limits = f"age {spec.max_age / DAY:g}d, {format_size(self.max_bytes(spec.max_bytes))}"
            if spec.max_msgs_per_subject > 0:
                limits += f", {spec.max_msgs_per_subject}/subject"
            if spec.retention == RetentionPolicy.WORK_QUEUE:
                limits += ", work-queue"
            rows.append((self.subjects.domain_wildcard(spec.domain), self.stream_name(spec.domain), limits,
                         spec.description))  # fmt: skip
        rows.append((self.subjects.domain_wildcard("rpc"), "(core request/reply)", "not stored",
                     "service endpoints"))  # fmt: skip
        rows.append((f"{self.prefix}.done.>", f"(republished by {self.stream_name('activity')})", "not stored",
                     "each stored completion, for the caller whose id it carries"))  # fmt: skip
        rows += [
            (f"$KV.{self.bucket_name(b.key)}.>", f"KV_{self.bucket_name(b.key)}",
             f"history {b.history}, {format_size(self.max_bytes(b.max_bytes))}", b.description)
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
            except nats.js.errors.APIError as exc:
                # Another process may have created it a moment ago; that is fine if it matches.
                if exc.err_code != 10058:  # stream name already in use
                    raise self._refused("stream", cfg.name, exc) from exc
            except nats.errors.Error as exc:
                raise TopologyError(f"cannot create stream {cfg.name}: {exc}") from exc
            return
        except nats.errors.Error as exc:
            raise TopologyError(f"cannot read stream {cfg.name}: {exc}") from exc
        if not _same_limits(info.config, cfg, replicas=self.replicas is not None, size=self.storage is not None):
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
                    max_bytes=self.max_bytes(b.max_bytes), storage=StorageType.FILE, replicas=self.replicas or 1,
                )
            )  # fmt: skip
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10058:
                raise self._refused("key-value bucket", name, exc) from exc
        except nats.errors.Error as exc:
            raise TopologyError(f"cannot create key-value bucket {name}: {exc}") from exc

    def _refused(self, what: str, name: str, exc: nats.js.errors.APIError) -> TopologyError:
        """The server's refusal as one line; a lack of file store says what is needed and how to lower it."""
        if exc.err_code in _NO_STORAGE or "insufficient" in (exc.description or ""):
            need = self.storage_needed()
            return TopologyError(
                f"cannot create {what} {name}: the server has not enough JetStream file store "
                f"({exc.description}); cadenza reserves {format_size(need)} per node in all (every stream's and "
                f"bucket's max_bytes, `cadenza subjects` lists them): raise max_file_store in the server's "
                f"jetstream block, or set CADENZA_STORAGE (or `cadenza setup --storage`) to a smaller total, "
                f"e.g. CADENZA_STORAGE=2GiB"
            )
        return TopologyError(f"cannot create {what} {name}: {exc.description}")

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


#: JetStream error codes for "not enough store": insufficient resources, storage resources exceeded,
#: (a cluster where no node has room says "insufficient resources" too).
_NO_STORAGE: Final = frozenset({10023, 10047})


def format_size(n: float) -> str:
    """``19 GiB``, ``512 MiB``, ``12.3 KiB``, ``80 B``."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _same_limits(have: StreamConfig, want: StreamConfig, *, replicas: bool, size: bool) -> bool:
    """Does ``have`` match ``want``? Replicas and max_bytes count only when they were set explicitly."""
    fields = ["subjects", "max_age", "max_msgs_per_subject", "max_msg_size", "duplicate_window", "description",
              "discard", "republish"]  # fmt: skip
    fields += ["num_replicas"] if replicas else []
    fields += ["max_bytes"] if size else []
    return all(getattr(have, f) == getattr(want, f) for f in fields)
