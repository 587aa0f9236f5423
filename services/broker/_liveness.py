"""The broker's liveness job: the workers' signs of life, silence, probes, a worker stopped or forgotten.

Every replica follows the ``worker`` stream from each worker's last event on (started, heartbeat,
stopped), with the server's time of storing, so a broker that was down sees how old a beat is. A
worker with sessions enabled gets a record in the ``workers`` bucket the first time it is heard
from. A worker whose heartbeat is late is asked on its ping subject (:meth:`Liveness.probe`);
before one is declared lost, the server's own timestamps of its last events are read
(:meth:`Liveness.stored_silence`), so a broker behind on the stream does not fail a live worker.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

import bus
from bus.transport import WORKER_EVENTS, follow_worker_events, last_event, link_status, nobody_subscribed
from schemas import (
    SessionFailure,
    WorkerHeartbeat,
    WorkerPing,
    WorkerPong,
    WorkerRecord,
    WorkerStarted,
    WorkerStopped,
    utcnow,
)

from ._errors import STEP_ERRORS

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ("Liveness", "Seen")


@dataclass
class Seen:
    """A worker's last sign of life, on this broker's monotonic clock."""

    at: float
    interval: float
    stopped: str = ""
    #: Set once two pings in a row found nobody on the worker's ping subject: its process is gone.
    gone: str = ""
    probed_at: float = 0.0
    suspect: int = 0


class Liveness:
    """Follows the workers for the :class:`~services.broker.Broker` ``broker`` (its ``seen``)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._reconnects = (0, 0.0)
        self._stored: dict[str, tuple[float, float]] = {}
        self._registering: set[str] = set()

    async def follow(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the workers' events (ready once each worker's last one was seen); bad input is
        dead-lettered as ``broker-workers``."""
        await follow_worker_events(self.broker.bus, self._on_event, consumer="broker-workers", task_status=task_status)

    def _on_event(self, event: WorkerStarted | WorkerHeartbeat | WorkerStopped, stored_at: datetime) -> None:
        # The server's time of storing, so a broker that was down sees how old a beat is.
        self.saw(event, time.monotonic() - max(0.0, (utcnow() - stored_at).total_seconds()))

    def saw(self, event: WorkerStarted | WorkerHeartbeat | WorkerStopped, at: float) -> None:
        """Take a worker's event, seen at ``at`` (monotonic)."""
        b = self.broker
        wid = event.worker_id
        seen = b.seen.get(wid)
        if seen is not None and seen.stopped:
            return  # a worker id is one process start: once stopped it stays stopped
        if isinstance(event, WorkerStopped):
            b.seen[wid] = Seen(at, event.interval, event.reason or "stopped")
            b.spawn(self.worker_stopped, wid, event.reason or "stopped")
            return
        if seen is None or seen.gone or at > seen.at:
            b.seen[wid] = Seen(at, event.interval)
        if (
            event.sessions_enabled and event.max_sessions > 0 and wid not in b.workers
            and wid not in self._registering and self.placeable(wid)
        ):  # fmt: skip
            record = WorkerRecord(
                worker_id=wid, host_name=event.host_name, pid=event.pid, tasklist=event.tasklist,
                max_sessions=event.max_sessions, interval=event.interval, started_at=event.time,
            )  # fmt: skip
            self._registering.add(wid)
            b.spawn(self._register, record)
        b.notify()

    async def _register(self, record: WorkerRecord) -> None:
        """The worker's record, created if there is none (a failure: the next heartbeat tries again)."""
        try:
            with contextlib.suppress(*STEP_ERRORS):
                await self.broker.worker_store.update(record.worker_id, lambda cur: record if cur is None else None)
        finally:
            self._registering.discard(record.worker_id)

    def silence(self, wid: str) -> float:
        seen = self.broker.seen.get(wid)
        return float("inf") if seen is None else time.monotonic() - seen.at

    def placeable(self, wid: str) -> bool:
        seen = self.broker.seen.get(wid)
        if seen is None or seen.stopped:
            return False
        return time.monotonic() - seen.at <= self.broker.config.placeable_factor * seen.interval + 0.5

    async def worker_stopped(self, wid: str, reason: str) -> None:
        record = self.broker.worker(wid)
        if record is not None:
            why = f"worker {wid} on {record.host_name or '?'} shut down ({reason})"
            await self.broker.announcing.fail_all(record, SessionFailure.WORKER_SHUTDOWN, why)
        await self.forget_worker(wid)

    async def forget_worker(self, wid: str) -> None:
        """Remove the record of a worker that holds no session (unless it changed meanwhile)."""
        cached = self.broker.workers.get(wid)
        if cached is None or cached.value.sessions:
            return
        with contextlib.suppress(*STEP_ERRORS):
            await self.broker.worker_store.delete(wid, revision=cached.revision, budget=5.0)

    # ------------------------------------------------------------ late heartbeats

    def maybe_probe(self, wid: str, seen: Seen) -> None:
        mono = time.monotonic()
        if mono - seen.probed_at < max(seen.interval, 1.0):
            return
        seen.probed_at = mono
        self.broker.spawn(self.probe, wid, seen)

    async def probe(self, wid: str, seen: Seen) -> None:
        """Ask a worker whose heartbeat is late whether its process is still connected.

        "No responders" twice in a row (a second apart at least, while this broker is connected)
        means the process's connection is closed: its sessions fail now rather than at the
        heartbeat timeout. An answer or silence changes nothing else.
        """
        b = self.broker.bus
        try:
            pong = await b.request(b.rpc_subject(wid, "ping"), WorkerPing(), WorkerPong,
                                   timeout=min(seen.interval, 2.0))  # fmt: skip
        except bus.RequestError as exc:
            if nobody_subscribed(exc) and self._settled_connection():
                seen.suspect += 1
                if seen.suspect >= 2:
                    seen.gone = "its connection is closed (nobody answers on its ping subject)"
            return
        if pong.worker_id == wid:
            # Connected: not gone. The heartbeat timeout still decides, as the spec says (an
            # answer is not a heartbeat: a worker that cannot store heartbeats is lost all the same).
            seen.suspect = 0

    def _settled_connection(self) -> bool:
        """Connected, and not reconnected in the last 10 s (after an outage, workers reconnect a
        little later than the broker: their empty ping subject then proves nothing)."""
        link = link_status(self.broker.bus)
        mono = time.monotonic()
        if link.reconnects != self._reconnects[0]:
            self._reconnects = (link.reconnects, mono)
        return link.connected and mono - self._reconnects[1] > 10.0

    async def stored_silence(self, wid: str) -> float | None:
        """Seconds since the newest heartbeat (or start) of ``wid`` the server stores, by the server's
        timestamps; None if it cannot tell. Checked before declaring a worker lost, so a broker that
        fell behind on the heartbeat stream (busy, or just restarted) does not fail a live worker."""
        async with self.broker.lock(f"stored-{wid}"):
            hit = self._stored.get(wid)
            if hit is not None and time.monotonic() - hit[0] < 0.2:
                return hit[1]
            b = self.broker.bus
            newest = None
            for event in ("heartbeat", "started"):
                try:
                    last = await last_event(b, "worker", b.subjects.build("worker", wid, event), WORKER_EVENTS)
                except bus.BusError:
                    return None
                if last is not None and last.stored_at is not None and (newest is None or last.stored_at > newest):
                    newest = last.stored_at
            silence = float("inf") if newest is None else max(0.0, (utcnow() - newest).total_seconds())
            self._stored[wid] = (time.monotonic(), silence)
            return silence
