"""Request / reply: typed requests over core NATS and the services that answer them, with the
``RpcReply`` envelope (an error reply carries the error's code)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
import nats.errors
import pydantic
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from schemas import ReplyError, RpcReply

from .._exceptions import CadenzaError, NoResponderError, RemoteError, RequestError, ValidationError
from ._codec import MAX_EVENT_BYTES
from ._tracing import NO_SPAN, inject_headers, process_span, traced_receive, traced_send

if TYPE_CHECKING:
    from ._bus import Bus

__all__ = ("request", "rpc_subject", "serve")

_log = logging.getLogger("cadenza.bus")

M = TypeVar("M", bound=pydantic.BaseModel)
R = TypeVar("R", bound=pydantic.BaseModel)


def rpc_subject(bus: Bus, service: str, method: str) -> str:
    """``<prefix>.rpc.<service>.<method>``."""
    return bus.subjects.build("rpc", service, method)


async def request(
    bus: Bus, subject: str, payload: pydantic.BaseModel, reply: type[R], *, timeout: float | None = None
) -> R:
    """Send a request and wait for its typed reply.

    Raises:
        RemoteError: the service answered with an error (``remote_code`` says which).
        NoResponderError: nobody listens on ``subject``.
        RequestError: no reply came in time (or the connection failed).
    """
    bus._check_open()
    timeout = bus.timeouts.request if timeout is None else timeout
    hdrs = {"Content-Type": "application/json"}
    if traced_send():
        inject_headers(hdrs)
    try:
        msg = await bus.nc.request(subject, payload.model_dump_json().encode(), timeout=timeout, headers=hdrs)
    except nats.errors.NoRespondersError as exc:
        raise NoResponderError(f"no service answers on {subject}; is it running?") from exc
    except nats.errors.TimeoutError as exc:
        raise RequestError(f"no reply on {subject} within {timeout:g}s") from exc
    except nats.errors.Error as exc:
        raise RequestError(f"request on {subject} failed: {exc}") from exc
    try:
        envelope = RpcReply.model_validate_json(msg.data)
    except pydantic.ValidationError as exc:
        raise RequestError(f"the reply on {subject} is not a cadenza reply: {exc.errors()[0]['msg']}") from exc
    if not envelope.ok:
        err = envelope.error or ReplyError(code="error", message="(no message)")
        raise RemoteError(err.message, code=err.code)
    try:
        return reply.model_validate(envelope.result)
    except pydantic.ValidationError as exc:
        raise RequestError(f"the reply on {subject} is not a {reply.__name__}: {exc}") from exc


async def serve(
    bus: Bus,
    subject: str,
    request: type[M],
    handler: Callable[[M], Awaitable[pydantic.BaseModel]],
    *,
    name: str,
    queue: str | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``subject`` until cancelled (replicas share them through ``queue``).

    A request that does not validate gets an error reply with code ``validation`` and a
    dead-letter entry; a :class:`CadenzaError` from the handler becomes an error reply with its
    code; any other exception becomes code ``internal`` (and is logged).
    """
    bus._check_open()
    sub = await bus.nc.subscribe(subject, queue=queue or name, pending_msgs_limit=100_000)
    try:
        async with anyio.create_task_group() as tg:
            task_status.started()
            async for msg in sub.messages:
                tg.start_soon(_answer, bus, msg, request, handler, name)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def _answer(
    bus: Bus, msg: Msg, request: type[M], handler: Callable[[M], Awaitable[pydantic.BaseModel]], name: str
) -> None:
    headers = dict(msg.headers or {})
    reply: RpcReply
    with process_span(msg.subject, headers, SpanKind.SERVER) if traced_receive(headers) else NO_SPAN:
        try:
            result = await handler(_parse_request(msg.data, request))
            reply = RpcReply(ok=True, result=result.model_dump(mode="json"))
        except ValidationError as exc:
            reply = RpcReply(ok=False, error=ReplyError(code="validation", message=exc.message))
            with contextlib.suppress(CadenzaError):
                await bus.dead_letter(consumer=name, subject=msg.subject, data=msg.data, headers=headers,
                                       reason=exc.message, error_type=exc.kind)  # fmt: skip
        except RemoteError as exc:
            reply = RpcReply(ok=False, error=ReplyError(code=exc.remote_code, message=exc.message))
        except CadenzaError as exc:
            reply = RpcReply(ok=False, error=ReplyError(code=exc.code, message=exc.message))
        except Exception as exc:
            _log.exception("%s failed on %s", name, msg.subject)
            reply = RpcReply(ok=False, error=ReplyError(code="internal", message=f"{type(exc).__name__}: {exc}"))
    if msg.reply:
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(reply.model_dump_json(exclude_none=True).encode())


def _parse_request(data: bytes, request: type[M]) -> M:
    """The typed request in ``data``.

    Raises:
        ValidationError: ``oversize`` or ``bad_request`` (the first five problems, by field).
    """
    if len(data) > MAX_EVENT_BYTES:
        raise ValidationError(f"request is {len(data)} bytes, over {MAX_EVENT_BYTES}", kind="oversize")
    try:
        return request.model_validate_json(data)
    except pydantic.ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
        raise ValidationError(f"not a valid {request.__name__}: {errs}", kind="bad_request") from None
