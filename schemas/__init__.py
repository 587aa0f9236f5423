"""The contracts of cadenza: every event as a pydantic model, and the subject grammar.

Nothing here does I/O (but read this file once: schemas/_lazy.py) or imports the rest of cadenza.

Importing the package imports none of its modules: a name's module is imported when the name is first
used (schemas/_lazy.py), so ``from schemas import Event`` does not build the activity or session models.
:func:`event_types` and :func:`lookup_event_type` import every module that declares events.
"""

from __future__ import annotations

import typing as _typing

from ._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from ._activity import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
    from ._activity import TERMINAL_STATUSES as TERMINAL_STATUSES
    from ._activity import ActivityCompleted as ActivityCompleted
    from ._activity import ActivityFold as ActivityFold
    from ._activity import ActivityLevel as ActivityLevel
    from ._activity import ActivityMessage as ActivityMessage
    from ._activity import ActivityRecord as ActivityRecord
    from ._activity import ActivityStart as ActivityStart
    from ._activity import ActivityStarted as ActivityStarted
    from ._activity import ActivityStatus as ActivityStatus
    from ._activity import ActivityUpdated as ActivityUpdated
    from ._activity import ActivityUser as ActivityUser
    from ._activity import CancelActivityReply as CancelActivityReply
    from ._activity import CancelActivityRequest as CancelActivityRequest
    from ._activity import GetActivityReply as GetActivityReply
    from ._activity import GetActivityRequest as GetActivityRequest
    from ._activity import ListActivitiesReply as ListActivitiesReply
    from ._activity import ListActivitiesRequest as ListActivitiesRequest
    from ._activity import MessageEntry as MessageEntry
    from ._activity import MessageRecord as MessageRecord
    from ._activity import StoredActivity as StoredActivity
    from ._activity import TailActivityReply as TailActivityReply
    from ._activity import TailActivityRequest as TailActivityRequest
    from ._activity import cut_text as cut_text
    from ._asyncapi import ASYNCAPI_PATH as ASYNCAPI_PATH
    from ._asyncapi import asyncapi_document as asyncapi_document
    from ._asyncapi import export_asyncapi as export_asyncapi
    from ._cancel import CancelCause as CancelCause
    from ._cancel import CancelKind as CancelKind
    from ._cancel import CancelRequested as CancelRequested
    from ._dlq import DeadLetter as DeadLetter
    from ._envelope import Event as Event
    from ._envelope import event_types as event_types
    from ._envelope import lookup_event_type as lookup_event_type
    from ._envelope import new_event_id as new_event_id
    from ._envelope import utcnow as utcnow
    from ._jsonschema import JSON_DIR as JSON_DIR
    from ._jsonschema import export_json_schemas as export_json_schemas
    from ._jsonschema import json_schemas as json_schemas
    from ._jsonschema import wire_models as wire_models
    from ._rpc import ENDPOINTS as ENDPOINTS
    from ._rpc import Endpoint as Endpoint
    from ._rpc import ErrorReply as ErrorReply
    from ._rpc import OkReply as OkReply
    from ._rpc import ReplyError as ReplyError
    from ._rpc import RpcReply as RpcReply
    from ._rpc import ServiceInfo as ServiceInfo
    from ._rpc import ServiceInfoRequest as ServiceInfoRequest
    from ._session import DEFAULT_HEARTBEAT_TIMEOUT as DEFAULT_HEARTBEAT_TIMEOUT
    from ._session import DEFAULT_TASKLIST as DEFAULT_TASKLIST
    from ._session import SessionAssigned as SessionAssigned
    from ._session import SessionCompleted as SessionCompleted
    from ._session import SessionCompleteRequested as SessionCompleteRequested
    from ._session import SessionFailed as SessionFailed
    from ._session import SessionFailure as SessionFailure
    from ._session import SessionRecord as SessionRecord
    from ._session import SessionRejected as SessionRejected
    from ._session import SessionRejectReason as SessionRejectReason
    from ._session import SessionRequested as SessionRequested
    from ._session import SessionState as SessionState
    from ._session import WorkerRecord as WorkerRecord
    from ._subjects import DEFAULT_PREFIX as DEFAULT_PREFIX
    from ._subjects import DOMAINS as DOMAINS
    from ._subjects import OPTIONAL_TOKEN_PATTERN as OPTIONAL_TOKEN_PATTERN
    from ._subjects import TOKEN_PATTERN as TOKEN_PATTERN
    from ._subjects import SubjectError as SubjectError
    from ._subjects import SubjectParts as SubjectParts
    from ._subjects import Subjects as Subjects
    from ._subjects import check_token as check_token
    from ._task import ActivityResult as ActivityResult
    from ._task import ActivityTask as ActivityTask
    from ._task import SessionClosed as SessionClosed
    from ._task import SessionOpened as SessionOpened
    from ._task import TaskError as TaskError
    from ._worker import ActivityParameter as ActivityParameter
    from ._worker import ActivitySignature as ActivitySignature
    from ._worker import WorkerHeartbeat as WorkerHeartbeat
    from ._worker import WorkerPing as WorkerPing
    from ._worker import WorkerPong as WorkerPong
    from ._worker import WorkerStarted as WorkerStarted
    from ._worker import WorkerStopped as WorkerStopped

__getattr__, __dir__ = _lazy_exports(__name__)

__all__ = (
    "ASYNCAPI_PATH",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_PREFIX",
    "DEFAULT_TASKLIST",
    "DOMAINS",
    "ENDPOINTS",
    "JSON_DIR",
    "MAX_MESSAGE_BYTES",
    "OPTIONAL_TOKEN_PATTERN",
    "TERMINAL_STATUSES",
    "TOKEN_PATTERN",
    "ActivityCompleted",
    "ActivityFold",
    "ActivityLevel",
    "ActivityMessage",
    "ActivityParameter",
    "ActivityRecord",
    "ActivityResult",
    "ActivitySignature",
    "ActivityStart",
    "ActivityStarted",
    "ActivityStatus",
    "ActivityTask",
    "ActivityUpdated",
    "ActivityUser",
    "CancelActivityReply",
    "CancelActivityRequest",
    "CancelCause",
    "CancelKind",
    "CancelRequested",
    "DeadLetter",
    "Endpoint",
    "ErrorReply",
    "Event",
    "GetActivityReply",
    "GetActivityRequest",
    "ListActivitiesReply",
    "ListActivitiesRequest",
    "MessageEntry",
    "MessageRecord",
    "OkReply",
    "ReplyError",
    "RpcReply",
    "ServiceInfo",
    "ServiceInfoRequest",
    "SessionAssigned",
    "SessionClosed",
    "SessionCompleteRequested",
    "SessionCompleted",
    "SessionFailed",
    "SessionFailure",
    "SessionOpened",
    "SessionRecord",
    "SessionRejectReason",
    "SessionRejected",
    "SessionRequested",
    "SessionState",
    "StoredActivity",
    "SubjectError",
    "SubjectParts",
    "Subjects",
    "TailActivityReply",
    "TailActivityRequest",
    "TaskError",
    "WorkerHeartbeat",
    "WorkerPing",
    "WorkerPong",
    "WorkerRecord",
    "WorkerStarted",
    "WorkerStopped",
    "asyncapi_document",
    "check_token",
    "cut_text",
    "event_types",
    "export_asyncapi",
    "export_json_schemas",
    "json_schemas",
    "lookup_event_type",
    "new_event_id",
    "utcnow",
    "wire_models",
)
