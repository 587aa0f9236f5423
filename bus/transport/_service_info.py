"""Which cadenza service processes run: each answers ``<prefix>.rpc.services.info``.

Workers have a heartbeat; the broker and the recorder do not. Rather than a second heartbeat, every
service process (started through ``services._runtime.service_bus``) answers one core request
subject, each in a queue group of its own, so one request is answered by every replica. A console
asks now and then and gathers the replies for a short window: a replica that stops answering is
seen to have stopped ("last seen").
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import uuid

import anyio
import nats.errors
import pydantic
from anyio.abc import TaskStatus

from schemas import RpcReply, ServiceInfo, ServiceInfoRequest, utcnow

from ._bus import Bus

__all__ = ("ServiceInfo", "ServiceInfoRequest", "gather_service_info", "package_version", "serve_service_info")


def package_version() -> str:
    """The installed cadenza version ("unknown" when run from a bare source tree)."""
    try:
        return importlib.metadata.version("cadenza")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def serve_service_info(
    bus: Bus, service: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer ``<prefix>.rpc.services.info`` for this process until cancelled."""
    info = ServiceInfo(
        service=service, instance=f"{service}-{uuid.uuid4().hex[:8]}", version=package_version(),
        host=socket.gethostname(), pid=os.getpid(), started_at=utcnow(),
    )  # fmt: skip

    async def answer(_: ServiceInfoRequest) -> ServiceInfo:
        return info

    # A queue group of its own: every process answers the same request.
    await bus.serve(
        bus.rpc_subject("services", "info"), ServiceInfoRequest, answer,
        name="services-info", queue=info.instance, task_status=task_status,
    )  # fmt: skip


async def gather_service_info(bus: Bus, *, window: float = 0.5) -> list[ServiceInfo]:
    """Ask every service process and collect the answers that arrive within ``window`` seconds.

    Answers that are not a :class:`ServiceInfo` (a "no responders" status, a foreign reply) are
    left out. Raises nothing for a silent installation: the list is empty.
    """
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    found: list[ServiceInfo] = []
    try:
        with contextlib.suppress(nats.errors.Error):
            await bus.nc.publish(bus.rpc_subject("services", "info"), b"{}", reply=inbox)
        with anyio.move_on_after(window):
            async for msg in sub.messages:
                try:
                    reply = RpcReply.model_validate_json(msg.data)
                    if reply.ok:
                        found.append(ServiceInfo.model_validate(reply.result))
                except pydantic.ValidationError:
                    continue
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return found
