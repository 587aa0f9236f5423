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

    from ._activity import CANCELLED_BY_USER as CANCELLED_BY_USER
    from ._activity import FIRST_COMPLETION as FIRST_COMPLETION
    from ._activity import ActivityAlreadyStartedError as ActivityAlreadyStartedError
    from ._activity import ActivityCancelledError as ActivityCancelledError
    from ._activity import ActivityFinishedError as ActivityFinishedError
    from ._activity import ActivityNotCancellableError as ActivityNotCancellableError
    from ._activity import ActivityNotFoundError as ActivityNotFoundError
    from ._activity import AppendMessageRequest as AppendMessageRequest
    from ._activity import HandlerOptions as HandlerOptions
    from ._activity import MessageAppender as MessageAppender
    from ._activity import Service as Service
    from ._activity import StartRequest as StartRequest
    from ._activity import Tracker as Tracker
    from ._activity import UpdateRequest as UpdateRequest
    from ._activity import cancelled_by_context as cancelled_by_context
    from ._activity import clamp_progress as clamp_progress
    from ._activity import complete_handler_activity as complete_handler_activity
    from ._activity import completed_already as completed_already
    from ._activity import run_handler_activity as run_handler_activity
    from ._activity import start_handler_activity_for_user as start_handler_activity_for_user
    from ._activity import status_for_cause as status_for_cause
    from ._activity_client import ActivityClient as ActivityClient
    from ._activity_client import MessageBatch as MessageBatch
    from ._activity_client import read_activity_messages as read_activity_messages
    from ._activity_client import watch_activities as watch_activities
    from ._bus import Bus as Bus
    from ._bus import BusState as BusState
    from ._bus import BusStats as BusStats
    from ._bus import Delivery as Delivery
    from ._bus import PublishResult as PublishResult
    from ._bus import connect as connect
    from ._cancel import CancelRouter as CancelRouter
    from ._cancel import request_cancel as request_cancel
    from ._codec import MAX_EVENT_BYTES as MAX_EVENT_BYTES
    from ._codec import decode as decode
    from ._codec import encode as encode
    from ._config import ConnectOptions as ConnectOptions
    from ._config import Timeouts as Timeouts
    from ._context import CancelToken as CancelToken
    from ._context import Context as Context
    from ._context import background as background
    from ._exceptions import ActivityError as ActivityError
    from ._exceptions import BusError as BusError
    from ._exceptions import CadenzaError as CadenzaError
    from ._exceptions import ConnectError as ConnectError
    from ._exceptions import PublishError as PublishError
    from ._exceptions import RemoteError as RemoteError
    from ._exceptions import RequestError as RequestError
    from ._exceptions import ServerStartError as ServerStartError
    from ._exceptions import SessionError as SessionError
    from ._exceptions import TopologyError as TopologyError
    from ._exceptions import ValidationError as ValidationError
    from ._fold import fold_activity_event as fold_activity_event
    from ._heartbeat import Heartbeater as Heartbeater
    from ._heartbeat import ProcessLoad as ProcessLoad
    from ._heartbeat import new_worker_id as new_worker_id
    from ._retry import backoff_delay as backoff_delay
    from ._retry import is_transient as is_transient
    from ._retry import retry_transient as retry_transient
    from ._retry import run_restarting as run_restarting
    from ._server import EmbeddedServer as EmbeddedServer
    from ._server import find_server_binary as find_server_binary
    from ._session import ActivityFailedError as ActivityFailedError
    from ._session import ActivityTimeoutError as ActivityTimeoutError
    from ._session import SessionClient as SessionClient
    from ._session import SessionCreationError as SessionCreationError
    from ._session import SessionFailedError as SessionFailedError
    from ._session import SessionInfo as SessionInfo
    from ._session import SessionOptions as SessionOptions
    from ._session import complete_session as complete_session
    from ._session import create_session as create_session
    from ._session import execute_activity as execute_activity
    from ._session import get_session_info as get_session_info
    from ._session import recreate_session as recreate_session
    from ._session import session as session
    from ._topology import BucketSpec as BucketSpec
    from ._topology import ConsumerSpec as ConsumerSpec
    from ._topology import StreamSpec as StreamSpec
    from ._topology import Topology as Topology
    from ._tracing import configure_tracing as configure_tracing
    from ._tracker import BusActivityService as BusActivityService
    from ._worker import ActivityRegistry as ActivityRegistry
    from ._worker import Worker as Worker
    from ._worker import WorkerState as WorkerState
    from ._worker import activity_context as activity_context
    from ._worker import activity_writer as activity_writer
    from ._writer import ActivityWriter as ActivityWriter
    from ._writer import flush_writer as flush_writer
    from ._writer import new_writer as new_writer
    from ._writer import write_started_line as write_started_line

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
