"""Broadcast: core (not stored, not redelivered) subscriptions of typed events; bad input and
handler failures are dead-lettered, since nothing else keeps a core message."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import anyio
from anyio.abc import TaskStatus
from opentelemetry.trace import SpanKind

from schemas import Event

from .._exceptions import CadenzaError, ValidationError
from ._codec import decode
from ._tracing import NO_SPAN, process_span, traced_receive

if TYPE_CHECKING:
    from ._bus import Bus

__all__ = ("listen", "reject_core")

_log = logging.getLogger("cadenza.bus")

E = TypeVar("E", bound=Event)


async def listen(
    bus: Bus,
    filter_subject: str,
    accept: Sequence[type[E]],
    handler: Callable[[E, str], Awaitable[None]],
    *,
    name: str,
    queue: str = "",
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Follow a core (broadcast) subscription until cancelled.

    Every process listening gets every message (unless ``queue`` groups them). Bad input is
    dead-lettered under ``name``; a handler error is logged and the listener goes on.

    Args:
        filter_subject: subject or wildcard, from :class:`schemas.Subjects`.
        accept: event classes taken.
        handler: called with the event and the concrete subject.
        name: the listener's name in dead-letter entries.
    """
    bus._check_open()
    sub = await bus.nc.subscribe(filter_subject, queue=queue, pending_msgs_limit=1_000_000)
    try:
        task_status.started()
        async for msg in sub.messages:
            headers = dict(msg.headers or {})
            try:
                event = decode(msg.data, headers, accept)
            except ValidationError as exc:
                await reject_core(bus, name, msg.subject, msg.data, headers, exc.message, exc.kind)
                continue
            with process_span(msg.subject, headers, SpanKind.CONSUMER) if traced_receive(headers) else NO_SPAN:
                try:
                    await handler(event, msg.subject)
                except Exception as exc:
                    # Not applied: a core message is not redelivered, so its copy is all that is left.
                    _log.exception("listener %s failed on %s", name, msg.subject)
                    await reject_core(bus, name, msg.subject, msg.data, headers, f"{type(exc).__name__}: {exc}",
                                      "handler_failed")  # fmt: skip
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def reject_core(
    bus: Bus, name: str, subject: str, data: bytes, headers: Mapping[str, str], reason: str, kind: str
) -> None:
    """Dead-letter a core (not stored, not redelivered) message a listener did not apply."""
    try:
        await bus.dead_letter(consumer=name, subject=subject, data=data, headers=headers,
                               reason=reason, error_type=kind)  # fmt: skip
    except CadenzaError as exc:
        _log.error("listener %s: %s on %s rejected (%s) and its dead letter not stored: %s",
                   name, kind, subject, reason[:300], exc)  # fmt: skip
