"""cadenza's library: connect to NATS JetStream (or start the embedded server), declare the
topology, publish and consume typed events; sessions (client API and worker runtime) and tracked,
cancellable activities on top.

``import bus`` imports nothing but this file: a name's module is imported when the name is first used
(``bus.connect`` brings in the bus and nats-py, not the session or activity modules), so a command
pays only for what it uses (schemas/_lazy.py). ``from bus import X`` works as before.
"""

from __future__ import annotations

import typing as _typing

from schemas._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from schemas import ActivityLevel as ActivityLevel
    from schemas import ActivityRecord as ActivityRecord
    from schemas import ActivityStatus as ActivityStatus
    from schemas import ActivityUser as ActivityUser
    from schemas import CancelCause as CancelCause
    from schemas import CancelKind as CancelKind
    from schemas import MessageRecord as MessageRecord
    from schemas import SessionFailure as SessionFailure
    from schemas import SessionRejectReason as SessionRejectReason
    from schemas import SessionState as SessionState

    from ._cancel import CancelRouter as CancelRouter
    from ._cancel import request_cancel as request_cancel
    from ._config import ConnectOptions as ConnectOptions
    from ._config import Timeouts as Timeouts
    from ._context import CancelToken as CancelToken
    from ._context import Context as Context
    from ._context import background as background
    from ._exceptions import ActivityError as ActivityError
    from ._exceptions import BusError as BusError
    from ._exceptions import CadenzaError as CadenzaError
    from ._exceptions import ConflictError as ConflictError
    from ._exceptions import ConnectError as ConnectError
    from ._exceptions import NoResponderError as NoResponderError
    from ._exceptions import NotFoundError as NotFoundError
    from ._exceptions import PublishError as PublishError
    from ._exceptions import RemoteError as RemoteError
    from ._exceptions import RequestError as RequestError
    from ._exceptions import ServerStartError as ServerStartError
    from ._exceptions import SessionError as SessionError
    from ._exceptions import TopologyError as TopologyError
    from ._exceptions import UsageError as UsageError
    from ._exceptions import ValidationError as ValidationError
    from ._heartbeat import Heartbeater as Heartbeater
    from ._heartbeat import ProcessLoad as ProcessLoad
    from ._heartbeat import new_worker_id as new_worker_id
    from .sessions._activity import activity_context as activity_context
    from .sessions._activity import activity_writer as activity_writer
    from .sessions._client import ActivityFailedError as ActivityFailedError
    from .sessions._client import ActivityTimeoutError as ActivityTimeoutError
    from .sessions._client import SessionClient as SessionClient
    from .sessions._client import SessionCreationError as SessionCreationError
    from .sessions._client import SessionFailedError as SessionFailedError
    from .sessions._client import SessionInfo as SessionInfo
    from .sessions._client import SessionOptions as SessionOptions
    from .sessions._client import complete_session as complete_session
    from .sessions._client import create_session as create_session
    from .sessions._client import execute_activity as execute_activity
    from .sessions._client import get_session_info as get_session_info
    from .sessions._client import recreate_session as recreate_session
    from .sessions._client import session as session
    from .sessions._worker import ActivityRegistry as ActivityRegistry
    from .sessions._worker import Worker as Worker
    from .sessions._worker import WorkerState as WorkerState
    from .tracking._api import CANCELLED_BY_USER as CANCELLED_BY_USER
    from .tracking._api import FIRST_COMPLETION as FIRST_COMPLETION
    from .tracking._api import ActivityAlreadyStartedError as ActivityAlreadyStartedError
    from .tracking._api import ActivityCancelledError as ActivityCancelledError
    from .tracking._api import ActivityFinishedError as ActivityFinishedError
    from .tracking._api import ActivityNotCancellableError as ActivityNotCancellableError
    from .tracking._api import ActivityNotFoundError as ActivityNotFoundError
    from .tracking._api import AppendMessageRequest as AppendMessageRequest
    from .tracking._api import HandlerOptions as HandlerOptions
    from .tracking._api import MessageAppender as MessageAppender
    from .tracking._api import Service as Service
    from .tracking._api import StartRequest as StartRequest
    from .tracking._api import Tracker as Tracker
    from .tracking._api import UpdateRequest as UpdateRequest
    from .tracking._api import cancelled_by_context as cancelled_by_context
    from .tracking._api import clamp_progress as clamp_progress
    from .tracking._api import complete_handler_activity as complete_handler_activity
    from .tracking._api import completed_already as completed_already
    from .tracking._api import run_handler_activity as run_handler_activity
    from .tracking._api import start_handler_activity_for_user as start_handler_activity_for_user
    from .tracking._api import status_for_cause as status_for_cause
    from .tracking._fold import fold_activity_event as fold_activity_event
    from .tracking._reader import ActivityClient as ActivityClient
    from .tracking._reader import MessageBatch as MessageBatch
    from .tracking._reader import read_activity_messages as read_activity_messages
    from .tracking._reader import watch_activities as watch_activities
    from .tracking._service import BusActivityService as BusActivityService
    from .tracking._writer import ActivityWriter as ActivityWriter
    from .tracking._writer import flush_writer as flush_writer
    from .tracking._writer import new_writer as new_writer
    from .tracking._writer import write_started_line as write_started_line
    from .transport._bus import Bus as Bus
    from .transport._bus import BusState as BusState
    from .transport._bus import connect as connect
    from .transport._codec import MAX_EVENT_BYTES as MAX_EVENT_BYTES
    from .transport._codec import decode as decode
    from .transport._codec import encode as encode
    from .transport._consume import Delivery as Delivery
    from .transport._publish import PublishResult as PublishResult
    from .transport._retry import backoff_delay as backoff_delay
    from .transport._retry import is_transient as is_transient
    from .transport._retry import retry_transient as retry_transient
    from .transport._retry import run_restarting as run_restarting
    from .transport._server import EmbeddedServer as EmbeddedServer
    from .transport._server import find_server_binary as find_server_binary
    from .transport._stats import BusStats as BusStats
    from .transport._topology import BucketSpec as BucketSpec
    from .transport._topology import ConsumerSpec as ConsumerSpec
    from .transport._topology import StreamSpec as StreamSpec
    from .transport._topology import Topology as Topology
    from .transport._tracing import configure_tracing as configure_tracing

__getattr__, __dir__ = _lazy_exports(__name__)

__all__ = (
    "CANCELLED_BY_USER",
    "FIRST_COMPLETION",
    "MAX_EVENT_BYTES",
    "ActivityAlreadyStartedError",
    "ActivityCancelledError",
    "ActivityClient",
    "ActivityError",
    "ActivityFailedError",
    "ActivityFinishedError",
    "ActivityLevel",
    "ActivityNotCancellableError",
    "ActivityNotFoundError",
    "ActivityRecord",
    "ActivityRegistry",
    "ActivityStatus",
    "ActivityTimeoutError",
    "ActivityUser",
    "ActivityWriter",
    "AppendMessageRequest",
    "BucketSpec",
    "Bus",
    "BusActivityService",
    "BusError",
    "BusState",
    "BusStats",
    "CadenzaError",
    "CancelCause",
    "CancelKind",
    "CancelRouter",
    "CancelToken",
    "ConflictError",
    "ConnectError",
    "ConnectOptions",
    "ConsumerSpec",
    "Context",
    "Delivery",
    "EmbeddedServer",
    "HandlerOptions",
    "Heartbeater",
    "MessageAppender",
    "MessageBatch",
    "MessageRecord",
    "NoResponderError",
    "NotFoundError",
    "ProcessLoad",
    "PublishError",
    "PublishResult",
    "RemoteError",
    "RequestError",
    "ServerStartError",
    "Service",
    "SessionClient",
    "SessionCreationError",
    "SessionError",
    "SessionFailedError",
    "SessionFailure",
    "SessionInfo",
    "SessionOptions",
    "SessionRejectReason",
    "SessionState",
    "StartRequest",
    "StreamSpec",
    "Timeouts",
    "Topology",
    "TopologyError",
    "Tracker",
    "UpdateRequest",
    "UsageError",
    "ValidationError",
    "Worker",
    "WorkerState",
    "activity_context",
    "activity_writer",
    "background",
    "backoff_delay",
    "cancelled_by_context",
    "clamp_progress",
    "complete_handler_activity",
    "complete_session",
    "completed_already",
    "configure_tracing",
    "connect",
    "create_session",
    "decode",
    "encode",
    "execute_activity",
    "find_server_binary",
    "flush_writer",
    "fold_activity_event",
    "get_session_info",
    "is_transient",
    "new_worker_id",
    "new_writer",
    "read_activity_messages",
    "recreate_session",
    "request_cancel",
    "retry_transient",
    "run_handler_activity",
    "run_restarting",
    "session",
    "start_handler_activity_for_user",
    "status_for_cause",
    "watch_activities",
    "write_started_line",
)
