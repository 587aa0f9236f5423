"""Routing cancel events to the tokens of the work they target, in this process.

One :class:`CancelRouter` per process listens (core subscription, so delivery is as fast as NATS
gets) on ``<prefix>.cancel.*.requested`` and cancels the registered tokens of the target. The
cancel stream keeps the last cancel per target, so :meth:`CancelRouter.register` also looks for a
cancel that arrived a moment before the work registered: such a cancel is not lost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
from anyio.abc import TaskStatus
from opentelemetry.trace import SpanKind

from schemas import CancelCause, CancelRequested, utcnow

from ._context import CancelToken
from ._exceptions import BusError, ValidationError
from .transport._broadcast import reject_core
from .transport._bucket import last_event
from .transport._bus import Bus
from .transport._codec import decode
from .transport._direct import in_background
from .transport._streams import Received
from .transport._subscriptions import subscribe_now
from .transport._tracing import NO_SPAN, instruments, process_span, traced_receive

__all__ = ("CancelRouter", "request_cancel")

_log = logging.getLogger("cadenza.cancel")


async def request_cancel(bus: Bus, target: str, target_id: str, cause: CancelCause) -> None:
    """Publish a cancel for an activity or a session (stored, then broadcast)."""
    await bus.publish(CancelRequested(target=target, target_id=target_id, cause=cause))


class CancelRouter:
    """Cancels local tokens when a cancel event names their target.

    Run with ``await tg.start(router.run)``; register work with ``with router.register(id, token):``.
    """

    #: Cancels for targets not registered (yet) are kept this long, so work registering a moment
    #: later still sees them without asking the stream.
    RECENT_SECONDS = 60.0

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._targets: dict[str, list[CancelToken]] = {}
        self._recent: OrderedDict[str, tuple[CancelCause, float]] = OrderedDict()
        #: Wall-clock time from which this router has been listening (0: not yet).
        self.listening_since: datetime | None = None
        #: ``listening_since`` plus the margin :meth:`seen_since` was last asked with (and the two).
        self._sure_key: tuple[datetime, float] | None = None
        self._sure_from = datetime.max.replace(tzinfo=UTC)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled. Each cancel is delivered as the connection reads it (no task
        between the message and the tokens it cancels: ``bus.listen``'s iterator cost two)."""
        unsubscribe = await subscribe_now(self.bus, self.bus.subjects.filter("cancel", event="requested"),
                                          self._on_msg)  # fmt: skip
        try:
            self.listening_since = utcnow()
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.bus.timeouts.shutdown):
                await unsubscribe()

    def _on_msg(self, msg: Received) -> None:
        headers = dict(msg.headers or {})
        try:
            event = decode(msg.data, headers, (CancelRequested,))
        except ValidationError as exc:
            in_background(reject_core(self.bus, "cancel-router", msg.subject, msg.data, headers, exc.message, exc.kind))
            return
        assert isinstance(event, CancelRequested)
        with process_span(msg.subject, headers, SpanKind.CONSUMER) if traced_receive(headers) else NO_SPAN:
            if self.deliver(event.target_id, event.cause):
                instruments.on_cancel_delivered(event.time, event.target)

    def deliver(self, target_id: str, cause: CancelCause) -> int:
        """Cancel every token registered under ``target_id``; returns how many were.

        A cancel for a target nobody registered is kept for :attr:`RECENT_SECONDS` for work that
        registers a moment later.
        """
        tokens = self._targets.get(target_id, [])
        for token in list(tokens):
            token.cancel(cause)
        if not tokens:
            now = time.monotonic()
            self._recent[target_id] = (cause, now)
            self._recent.move_to_end(target_id)
            while self._recent:
                first, (_, at) = next(iter(self._recent.items()))
                if now - at <= self.RECENT_SECONDS and len(self._recent) <= 100_000:
                    break
                del self._recent[first]
        return len(tokens)

    def seen_since(self, when: datetime, margin: float = 2.0) -> bool:
        """True if this router has been listening since ``margin`` seconds before ``when`` (so every
        cancel published after ``when`` reached it: no need to ask the stream)."""
        since = self.listening_since
        if since is None:
            return False
        if self._sure_key != (since, margin):  # the sum is kept: asked once per task
            self._sure_key, self._sure_from = (since, margin), since + timedelta(seconds=margin)
        return self._sure_from <= when

    @contextlib.contextmanager
    def register(self, target_id: str, token: CancelToken) -> Iterator[CancelToken]:
        """Route cancels of ``target_id`` to ``token`` while the block runs."""
        self.add(target_id, token)
        try:
            yield token
        finally:
            self.discard(target_id, token)

    def add(self, target_id: str, token: CancelToken) -> None:
        """Route cancels of ``target_id`` to ``token`` until :meth:`discard` (:meth:`register` without
        a context manager: the tracker's, once per activity)."""
        self._targets.setdefault(target_id, []).append(token)
        early = self._recent.pop(target_id, None)
        if early is not None:
            token.cancel(early[0])

    def discard(self, target_id: str, token: CancelToken) -> None:
        """Stop routing cancels of ``target_id`` to ``token`` (nothing if they are not)."""
        tokens = self._targets.get(target_id)
        if tokens is not None:
            if token in tokens:
                tokens.remove(token)
            if not tokens:
                del self._targets[target_id]

    async def check_stored(self, target_id: str, token: CancelToken) -> bool:
        """Cancel ``token`` if a cancel for ``target_id`` is already stored; True if it was.

        Call right after :meth:`register`, so a cancel published between the two is seen either
        by the listener or here.
        """
        subject = self.bus.subjects.build("cancel", target_id, "requested")
        try:
            stored = await last_event(self.bus, "cancel", subject, [CancelRequested])
        except BusError as exc:
            _log.warning("cannot look up stored cancels for %s: %r", target_id, exc)
            return False
        if stored is None or not isinstance(stored.event, CancelRequested):
            return False  # none stored, or not a cancel (it does not validate)
        token.cancel(stored.event.cause)
        return True
