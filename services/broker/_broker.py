"""The session broker: places sessions on workers, frees slots, fails sessions of lost workers.

State lives in two key-value buckets, changed by compare-and-set only:

* ``workers``: one :class:`~schemas.WorkerRecord` per live session worker; its ``sessions`` list is
  the slots in use. A session id is added before the session opens (never past ``max_sessions``)
  and removed after the session ended and the worker was told.
* ``sessions``: one :class:`~schemas.SessionRecord` per session: ``pending`` -> ``open`` ->
  ``completed`` / ``failed``, or ``pending`` -> ``rejected``.

Every step is idempotent, so a request redelivered to a restarted broker (or to another replica)
continues where the last one stopped. Outcomes are announced with fixed event ids, so the stream
stores each once. Every replica follows both buckets (:class:`bus.transport.Bucket` watches) and
the workers' heartbeats; the sweep fails the sessions of silent workers, ends expired sessions,
releases slots whose session ended, and announces outcomes a crash cut off.

Liveness: the worker stream keeps each worker's last heartbeat; a (re)started broker reads the
server's timestamps of those, so it does not declare a worker lost merely because it was down.

:class:`Broker` is the coordinator: it holds what the jobs share (the two buckets and their
caches, the workers' signs of life, the requests waiting, locks, the "something changed" event) and
runs them. Each job is a module of its own:

* ``_placement``: requests -> candidates -> reserve a slot -> open (or reject); slots given back.
* ``_liveness``: following the workers' events, silence, probes, a worker stopped or forgotten.
* ``_sweeping``: the sweep loop: lost workers' sessions, expiry, slots of ended sessions, pruning.
* ``_announcing``: a session opened or ended, told to its worker and announced; ending sessions.
* ``_keys``: the recreate-token key, from the configuration or the broker-only bucket.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

import bus
from bus import ConsumerSpec
from bus.transport import Bucket
from schemas import SessionCompleteRequested, SessionRecord, SessionRequested, SessionState, WorkerRecord

from ._announcing import Announcing
from ._errors import STEP_ERRORS
from ._keys import token_key
from ._liveness import Liveness, Seen
from ._placement import Placement
from ._sweeping import Sweeping
from ._tokens import TokenSigner

__all__ = ("Broker", "BrokerConfig", "BrokerState")

_log = logging.getLogger("cadenza.broker")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Knobs of the broker.

    Attributes:
        sweep_interval: seconds between checks for lost workers and expired sessions (the detection
            latency is at most the session's ``heartbeat_timeout`` plus this).
        placeable_factor: a worker silent for more than this many heartbeat intervals gets no new session.
        forget_factor: a worker silent this many intervals, with no session left, is removed.
        request_concurrency: creation requests handled at once (each may wait for a slot).
        request_ack_wait: seconds before a request held by a dead broker is handed to another.
        token_key: key of the recreate tokens (default: ``CADENZA_TOKEN_KEY``, else one generated
            and kept in the broker-only bucket; see :func:`services.broker._keys.token_key`).
        orphan_grace: seconds a slot reserved for a session that has no record is kept before it is freed.
        retention: seconds an ended session's record is kept (then deleted from the bucket).
        token_max_age: seconds a recreate token stays valid after it was issued.
    """

    sweep_interval: float = 0.1
    placeable_factor: float = 2.5
    forget_factor: float = 6.0
    request_concurrency: int = 4096
    request_ack_wait: float = 5.0
    token_key: bytes | None = None
    orphan_grace: float = 60.0
    retention: float = 7 * 86_400.0
    token_max_age: float = 7 * 86_400.0


class BrokerState(enum.Enum):
    """Where a :class:`Broker` is in its life (it runs once)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Broker:
    """Run with ``await tg.start(Broker(b).run)``; several replicas may run at once."""

    def __init__(self, bus_: bus.Bus, config: BrokerConfig | None = None) -> None:
        self.bus = bus_
        self.config = config or BrokerConfig()
        self.state = BrokerState.NEW
        self._ran = False
        self.session_store = Bucket(bus_, "sessions", SessionRecord, consumer="broker-sessions", on_change=self.notify)
        self.worker_store = Bucket(bus_, "workers", WorkerRecord, consumer="broker-workers", on_change=self.notify)
        #: The buckets' caches, kept by their watches (and by this broker's own writes).
        self.sessions = self.session_store.cache
        self.workers = self.worker_store.cache
        #: The workers' last signs of life (see :mod:`._liveness`).
        self.seen: dict[str, Seen] = {}
        #: Requests looking for a slot now (session id -> tasklist).
        self.waiting: dict[str, str] = {}
        #: Sessions some task is ending now (so the sweep does not start another).
        self.ending: set[str] = set()
        self.signer: TokenSigner | None = None
        self._changed = anyio.Event()
        self._locks: dict[str, anyio.Lock] = {}
        self._tg: TaskGroup | None = None
        self.liveness = Liveness(self)
        self.placement = Placement(self)
        self.announcing = Announcing(self)
        self.sweeping = Sweeping(self)
        # Sessions open, slots free on live workers, requests waiting for a slot (OpenTelemetry API:
        # recorded only if the application set a meter provider).
        metrics.get_meter("cadenza.broker").create_observable_gauge(
            "cadenza.broker.sessions", callbacks=[self._observe], description="sessions open / slots free / waiting"
        )

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the buckets and the workers, take requests and completions, sweep; until cancelled.

        Raises:
            bus.UsageError: the broker ran already (a broker runs once).
            bus.CadenzaError: no token key is given and the environment requires one.
        """
        if self._ran:
            raise bus.UsageError(f"a Broker runs once (this one is {self.state.value}); make another")
        self._ran = True
        try:
            await self._run(task_status)
        finally:
            self.state = BrokerState.STOPPED

    async def _run(self, task_status: TaskStatus[None]) -> None:
        b = self.bus
        await self.session_store.open()
        await self.worker_store.open()
        self.signer = TokenSigner(await token_key(b, self.session_store, self.config.token_key))
        s, c = b.subjects, self.config
        requests = ConsumerSpec(
            durable="broker-requests", filter_subject=s.filter("session", event="requested"),
            ack_wait=c.request_ack_wait, max_ack_pending=50_000, max_deliver=50,
            backoff=(0.1, 0.5, 1.0, 2.0), deliver_new=True,
        )  # fmt: skip
        control = ConsumerSpec(
            durable="broker-control", filter_subject=s.filter("session", event="complete"),
            ack_wait=10.0, max_ack_pending=50_000, max_deliver=50, backoff=(0.1, 0.5, 1.0, 2.0), deliver_new=True,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(bus.run_restarting, "workers watcher", self.worker_store.watch)
            await tg.start(bus.run_restarting, "sessions watcher", self.session_store.watch)
            await tg.start(bus.run_restarting, "heartbeat follower", self.liveness.follow)
            await tg.start(lambda task_status: b.consume(
                requests, [SessionRequested], self.placement.on_request, concurrency=c.request_concurrency,
                task_status=task_status))  # fmt: skip
            await tg.start(lambda task_status: b.consume(
                control, [SessionCompleteRequested], self.announcing.on_complete, concurrency=256,
                task_status=task_status))  # fmt: skip
            tg.start_soon(self.sweeping.loop)
            self.state = BrokerState.RUNNING
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self.state = BrokerState.STOPPING  # the jobs wind down (cancelled) before the group exits

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        open_ = sum(1 for c in self.sessions.values() if c.value.state is SessionState.OPEN)
        free = sum(max(0, w.max_sessions - len(w.sessions)) for c in self.workers.values()
                   if self.placeable((w := c.value).worker_id))  # fmt: skip
        yield Observation(open_, {"cadenza.metric": "sessions_open"})
        yield Observation(free, {"cadenza.metric": "slots_free"})
        yield Observation(len(self.waiting), {"cadenza.metric": "requests_waiting"})

    # ------------------------------------------------------------ shared by the jobs

    def notify(self) -> None:
        """Wake whoever waits for a change (a request waiting for a slot)."""
        event, self._changed = self._changed, anyio.Event()
        event.set()

    @property
    def changed(self) -> anyio.Event:
        """Set at the next change of the caches or the workers' signs of life."""
        return self._changed

    def lock(self, key: str) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the broker's task group; a failure is logged, and a later sweep retries."""
        assert self._tg is not None
        self._tg.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        # A step of the sweep that fails is taken again by a later sweep (every step is idempotent):
        # an engine error (a node restart, an election) must never end the broker's task group.
        try:
            await fn(*args)
        except STEP_ERRORS as exc:
            _log.warning("%s failed; the next sweep retries: %r", fn.__name__, exc)
        except Exception:
            _log.exception("%s failed unexpectedly; the next sweep retries", fn.__name__)

    # ------------------------------------------------------------ the records

    def worker(self, wid: str) -> WorkerRecord | None:
        return self.worker_store.cached(wid)

    def session(self, sid: str) -> SessionRecord | None:
        return self.session_store.cached(sid)

    async def session_record(self, sid: str) -> tuple[SessionRecord | None, int]:
        """The session's record as stored now (the cache takes it too) and its revision."""
        return await self.session_store.get(sid)

    def silence(self, wid: str) -> float:
        """Seconds since this broker last heard from worker ``wid`` (inf: never)."""
        return self.liveness.silence(wid)

    def placeable(self, wid: str) -> bool:
        """Whether worker ``wid`` may get a new session (heard from lately, not stopped)."""
        return self.liveness.placeable(wid)

    async def end(self, sid: str, state: SessionState, cause: str, message: str) -> bool:
        """End an open session (completed or failed); False if it was not open. Idempotent."""
        return await self.announcing.end(sid, state, cause, message)

    async def sweep(self) -> None:
        """One pass of the sweep (see :meth:`services.broker._sweeping.Sweeping.sweep`)."""
        await self.sweeping.sweep()
