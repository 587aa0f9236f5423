"""Routing cancel events to the tokens of the work they target, in this process.

One :class:`CancelRouter` per process listens (core subscription, so delivery is as fast as NATS
gets) on ``<prefix>.cancel.*.requested`` and cancels the registered tokens of the target. The
cancel stream keeps the last cancel per target, so :meth:`CancelRouter.register` also looks for a
cancel that arrived a moment before the work registered: such a cancel is not lost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus

from schemas import CancelCause, CancelRequested

from ._bus import Bus
from ._codec import decode
from ._context import CancelToken
from ._exceptions import ValidationError

__all__ = ("CancelRouter", "request_cancel")

_log = logging.getLogger("cadenza.cancel")


async def request_cancel(bus: Bus, target: str, target_id: str, cause: CancelCause) -> None:
    """Publish a cancel for an activity or a session (stored, then broadcast)."""
    await bus.publish(CancelRequested(target=target, target_id=target_id, cause=cause))


class CancelRouter:
    """Cancels local tokens when a cancel event names their target.

    Run with ``await tg.start(router.run)``; register work with ``with router.register(id, token):``.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._targets: dict[str, list[CancelToken]] = {}
        self._started_at = 0.0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled."""
        await self.bus.listen(
            self.bus.subjects.filter("cancel", event="requested"),
            [CancelRequested],
            self._on_cancel,
            name="cancel-router",
            task_status=task_status,
        )

    async def _on_cancel(self, event: CancelRequested, subject: str) -> None:
        self.deliver(event.target_id, event.cause)

    def deliver(self, target_id: str, cause: CancelCause) -> int:
        """Cancel every token registered under ``target_id``; returns how many were."""
        tokens = self._targets.get(target_id, [])
        for token in list(tokens):
            token.cancel(cause)
        return len(tokens)

    @contextlib.contextmanager
    def register(self, target_id: str, token: CancelToken) -> Iterator[CancelToken]:
        """Route cancels of ``target_id`` to ``token`` while the block runs."""
        self._targets.setdefault(target_id, []).append(token)
        try:
            yield token
        finally:
            tokens = self._targets.get(target_id)
            if tokens is not None:
                with contextlib.suppress(ValueError):
                    tokens.remove(token)
                if not tokens:
                    del self._targets[target_id]

    async def check_stored(self, target_id: str, token: CancelToken) -> bool:
        """Cancel ``token`` if a cancel for ``target_id`` is already stored; True if it was.

        Call right after :meth:`register`, so a cancel published between the two is seen either
        by the listener or here.
        """
        subject = self.bus.subjects.build("cancel", target_id, "requested")
        stream = self.bus.topology.stream_name("cancel")
        try:
            with anyio.fail_after(self.bus.timeouts.request):
                msg = await self.bus.js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            _log.warning("cannot look up stored cancels for %s: %r", target_id, exc)
            return False
        try:
            event = decode(msg.data or b"", msg.headers, [CancelRequested])
        except ValidationError:
            return False
        token.cancel(event.cause)
        return True
