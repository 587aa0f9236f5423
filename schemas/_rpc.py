"""Request/reply on the ``rpc`` domain: the reply envelope and the table of endpoints.

Subjects ``<prefix>.rpc.<service>.<method>`` (core NATS, not stored). A request is the JSON of the
endpoint's request model (no envelope, no headers needed); the reply is always an envelope:
``{"ok": true, "result": <reply model>}`` or ``{"ok": false, "error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._activity import (
    CancelActivityReply,
    CancelActivityRequest,
    GetActivityReply,
    GetActivityRequest,
    ListActivitiesReply,
    ListActivitiesRequest,
    TailActivityReply,
    TailActivityRequest,
)
from ._worker import WorkerPing, WorkerPong

__all__ = [
    "ENDPOINTS", "Endpoint", "ErrorReply", "OkReply", "ReplyError", "RpcReply", "ServiceInfo", "ServiceInfoRequest",
]  # fmt: skip


class ServiceInfoRequest(BaseModel):
    """Request on ``<prefix>.rpc.services.info`` (no fields): every service process answers."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class ServiceInfo(BaseModel):
    """One service process's answer on ``<prefix>.rpc.services.info``."""

    model_config = ConfigDict(defer_build=True)

    service: str = Field(description="recorder, broker, demo-worker, console, ...")
    instance: str = Field(description="this process start (unique)")
    version: str
    host: str = ""
    pid: int = 0
    started_at: datetime


class ReplyError(BaseModel):
    """What went wrong with a request, as its answer says.

    ``code`` is ``validation`` (the request did not validate: it was also dead-lettered),
    ``not_found``, ``not_cancellable``, ``internal``, or another error code of cadenza's error tree.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    code: str = Field(description="validation, not_found, not_cancellable, internal, ...")
    message: str = Field(description="what was wrong, readable")


class RpcReply(BaseModel):
    """Every answer on an ``rpc`` subject: ``ok`` with a ``result``, or not ``ok`` with an ``error``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    ok: bool
    result: Any = None
    error: ReplyError | None = None


class ErrorReply(BaseModel):
    """An answer that says the request failed (the shape of :class:`RpcReply` when ``ok`` is false)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    ok: Literal[False]
    error: ReplyError


class OkReply(BaseModel):
    """An answer that carries the endpoint's result (the shape of :class:`RpcReply` when ``ok`` is true)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    ok: Literal[True]
    result: Any


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One request/reply endpoint: ``<prefix>.rpc.<service>.<method>``.

    ``service`` is a fixed name (``recorder``) or, in angle brackets, a parameter (``<worker_id>``).
    """

    service: str
    method: str
    request: type[BaseModel]
    reply: type[BaseModel]
    served_by: str
    asked_by: str
    summary: str

    @property
    def name(self) -> str:
        """``rpc.<service>.<method>`` with a parameter service written ``worker``: the schema file stem."""
        return f"rpc.{self.service.strip('<>').removesuffix('_id')}.{self.method}"

    def subject_pattern(self) -> str:
        return f"<prefix>.rpc.{self.service}.{self.method}"


#: Every request/reply endpoint on the wire.
ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    Endpoint("recorder", "list", ListActivitiesRequest, ListActivitiesReply, "recorder", "caller",
             "a page of activities of an environment, active first, then newest first"),
    Endpoint("recorder", "get", GetActivityRequest, GetActivityReply, "recorder", "caller",
             "one activity with its last messages"),
    Endpoint("recorder", "tail", TailActivityRequest, TailActivityReply, "recorder", "caller",
             "messages after a seq, waiting a while for some"),
    Endpoint("recorder", "cancel", CancelActivityRequest, CancelActivityReply, "recorder", "caller",
             "cancel an activity by a user"),
    Endpoint("<worker_id>", "ping", WorkerPing, WorkerPong, "worker", "broker",
             "is this worker's process still connected? (the broker asks when a heartbeat is late)"),
    Endpoint("services", "info", ServiceInfoRequest, ServiceInfo, "every service process", "caller",
             "which service processes run: each answers (a queue group of its own), e.g. the console's health"),
)  # fmt: skip
