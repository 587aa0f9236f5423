"""Riding out the engine's passing failures: what counts as transient, and one way to retry it.

On a JetStream cluster a node restart or a leader election makes calls fail for a few seconds
("no response from stream", 503 "JetStream system temporarily unavailable", request timeouts, a
connection that is reconnecting). None of these means the request was wrong: a service retries
them with exponential backoff and full jitter, within a bound, and never exits on one.

Every write retried this way is idempotent by construction (a ``Nats-Msg-Id`` the stream dedupes,
a compare-and-set whose change function sees its own earlier write and changes nothing).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus

from .._exceptions import BusError, CadenzaError

__all__ = ("backoff_delay", "is_transient", "retry_transient", "run_restarting")

_log = logging.getLogger("cadenza.bus")

T = TypeVar("T")

#: nats-py errors that pass by themselves: a timeout, a stream without a leader for a moment, a
#: connection being re-established, the JetStream API unavailable during an election.
_TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.NoStreamResponseError,
)

#: JetStream API error codes of a cluster in transition: "JetStream system temporarily
#: unavailable" (10008), "cluster can not handle request" (not the leader, 10009), "incomplete
#: results" (10004). Storage or limits errors (also 500/503) are not among them: they stay.
_TRANSIENT_API_CODES = frozenset({10004, 10008, 10009})


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or the engine error it was raised from) is one that passes by itself."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, _TRANSIENT):
            return True
        if isinstance(cur, nats.js.errors.APIError) and not isinstance(cur, nats.js.errors.KeyValueError):
            # (The key-value errors of nats-py are conflicts and misses, and carry no codes at all.)
            if cur.err_code in _TRANSIENT_API_CODES or (cur.code == 503 and not cur.err_code):
                return True
        cur, seen = cur.__cause__, seen + 1
    return False


def backoff_delay(attempt: int, *, base: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with full jitter: a random delay in ``[0, min(cap, base * 2**attempt)]``."""
    return random.uniform(0.0, min(cap, base * 2 ** min(attempt, 30)))


async def retry_transient(op: Callable[[], Awaitable[T]], *, what: str, budget: float = 30.0, cap: float = 2.0) -> T:
    """Await ``op()``, retrying transient engine errors with backoff and jitter for up to ``budget`` s.

    Any other error is raised at once. ``op`` must be safe to repeat.

    Raises:
        BusError: still failing transiently after ``budget`` seconds (retryable: a consumer naks).
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_transient(exc):
                raise
            spent = time.monotonic() - started
            if spent >= budget:
                raise BusError(f"{what}: the server did not recover within {budget:g}s ({exc!r})") from exc
            if attempt == 0:
                _log.info("%s: transient engine error, retrying: %r", what, exc)
            delay = min(backoff_delay(attempt, cap=cap), max(0.0, budget - spent))
            attempt += 1
            await anyio.sleep(delay)


class _Once:
    """A task status that passes on the first ``started()`` only (a follower started again reports
    ready once), and says how long the current run has been ready."""

    def __init__(self, status: TaskStatus[None]) -> None:
        self._status: TaskStatus[None] | None = status
        self._since = time.monotonic()

    def started(self, value: None = None) -> None:
        self._since = time.monotonic()
        if self._status is not None:
            status, self._status = self._status, None
            status.started()

    def ran_for(self) -> float:
        return time.monotonic() - self._since


async def run_restarting(
    what: str,
    follow: Callable[..., Coroutine[Any, Any, None]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``follow(task_status=...)`` (a bucket watcher, a stream follower) for good.

    When the engine ends it (a node restart, an election, a lost consumer), it is started again after
    a backoff with jitter; ready (``task_status.started()``) once, the first time it is. Use with
    ``await tg.start(run_restarting, "what", follower)``. Bugs are logged with their traceback and
    retried the same way: a follower of a long-running service never ends the service.
    """
    status = _Once(task_status)
    attempt = 0
    while True:
        try:
            await follow(task_status=status)
            _log.warning("%s ended; starting it again", what)
        except (CadenzaError, nats.errors.Error, TimeoutError) as exc:
            _log.warning("%s failed (%r); starting it again", what, exc)
        except Exception:
            _log.exception("%s failed unexpectedly; starting it again", what)
        attempt = 0 if status.ran_for() > 30.0 else attempt + 1
        await anyio.sleep(0.1 + backoff_delay(attempt, base=0.2, cap=5.0))
