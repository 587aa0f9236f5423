"""Subscriptions whose messages are taken as the connection reads them, without a task in between.

nats-py runs a subscription's callback in a task of the subscription's, which its read loop wakes
through a queue: one more trip through the event loop for every message. On the hot paths (a
worker's pull consumer, a caller's results) the message is taken by a plain function instead, in the
read loop itself, in order: it must not block (it starts a task, or sets a future).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ("in_background", "subscribe_direct", "take_directly")

_log = logging.getLogger("cadenza.bus")


class _Direct(asyncio.Queue):  # type: ignore[type-arg]
    """A subscription's message queue that queues nothing: each message nats-py puts is handed to
    ``take`` at once. Empty for whatever nats-py asks of it (``qsize``, ``join`` on drain)."""

    def __init__(self, take: Callable[[Msg], None]) -> None:
        super().__init__()
        self._take = take

    def put_nowait(self, item: Msg) -> None:
        try:
            self._take(item)
        except Exception:  # never into nats-py's read loop, which would drop the connection
            _log.exception("a message could not be taken by its subscriber; it is dropped")


#: The tasks :func:`in_background` started and that have not ended (asyncio keeps weak references only).
_BACKGROUND: set[asyncio.Task[None]] = set()


def in_background(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` in a task of its own: what a taker must not wait for (a dead letter, an ack).
    ``work`` handles its own errors."""
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def take_directly(sub: Subscription, take: Callable[[Msg], None]) -> None:
    """Make ``sub`` (made without a callback) hand each message to ``take`` as it is read."""
    sub._pending_queue = _Direct(take)


async def subscribe_direct(nc: NatsClient, subject: str, take: Callable[[Msg], None]) -> Subscription:
    """Subscribe to ``subject`` with ``take`` called for each message as it is read (see above).

    Without a callback nats-py starts no task for the subscription and puts each message in its
    queue, which is replaced here; no byte limit, since nothing waits there to be counted.
    """
    sub = await nc.subscribe(subject, pending_bytes_limit=0)
    take_directly(sub, take)
    return sub
