"""The public names of ``bus`` and ``schemas`` are pinned: adding or removing one is a decision.

Change the tuples below in the same commit as the ``__all__`` they mirror (and the CHANGELOG).
Every name must import from the package and be documented: a docstring for classes and functions,
a ``#:`` comment above the assignment for constants.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import bus
import schemas

BUS_ALL = (
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
    "CANCELLED_BY_USER",
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
    "FIRST_COMPLETION",
    "HandlerOptions",
    "Heartbeater",
    "MAX_EVENT_BYTES",
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

SCHEMAS_ALL = (
    "ASYNCAPI_PATH",
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
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_PREFIX",
    "DEFAULT_TASKLIST",
    "DOMAINS",
    "DeadLetter",
    "ENDPOINTS",
    "Endpoint",
    "ErrorReply",
    "Event",
    "GetActivityReply",
    "GetActivityRequest",
    "JSON_DIR",
    "ListActivitiesReply",
    "ListActivitiesRequest",
    "MAX_MESSAGE_BYTES",
    "MessageEntry",
    "MessageRecord",
    "OPTIONAL_TOKEN_PATTERN",
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
    "TERMINAL_STATUSES",
    "TOKEN_PATTERN",
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

#: Public names still without documentation (known gaps, listed in the report). The test below fails
#: once one is documented, so the list only shrinks.
UNDOCUMENTED: set[tuple[str, str]] = set()

PACKAGES = {"bus": (bus, BUS_ALL), "schemas": (schemas, SCHEMAS_ALL)}
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_all_is_pinned(package: str) -> None:
    module, pinned = PACKAGES[package]
    assert isinstance(module.__all__, tuple), f"{package}.__all__ must be a tuple"
    assert len(set(module.__all__)) == len(module.__all__), f"{package}.__all__ has duplicates"
    added = sorted(set(module.__all__) - set(pinned))
    removed = sorted(set(pinned) - set(module.__all__))
    assert tuple(sorted(module.__all__)) == pinned, f"{package}.__all__ changed: added {added}, removed {removed}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_public_name_is_in_all(package: str) -> None:
    module, _ = PACKAGES[package]
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert public - set(module.__all__) == set(), f"public in {package} but not in __all__"


def _constant_documented(package: str, name: str) -> bool:
    """A ``#:`` comment right above ``NAME = ...`` / ``NAME: T = ...`` in one of the package's modules."""
    pattern = re.compile(rf"^{re.escape(name)}\s*[:=]")
    for path in sorted((ROOT / package).rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if pattern.match(line):
                return i > 0 and lines[i - 1].lstrip().startswith("#:")
    return False


def _documented(package: str, name: str, value: object) -> bool:
    if inspect.isclass(value):
        doc = value.__dict__.get("__doc__")  # a class's own docstring, not its base's
        return bool(doc and doc.strip())
    if callable(value):
        return bool((inspect.getdoc(value) or "").strip())
    return _constant_documented(package, name)


@pytest.mark.parametrize(("package", "name"), [(p, n) for p in sorted(PACKAGES) for n in PACKAGES[p][1]])
def test_every_public_name_imports_and_is_documented(package: str, name: str) -> None:
    module = importlib.import_module(package)
    assert hasattr(module, name), f"`from {package} import {name}` fails"
    value = getattr(module, name)
    documented = _documented(package, name, value)
    if (package, name) in UNDOCUMENTED:
        assert not documented, f"{package}.{name} is documented now: remove it from UNDOCUMENTED"
    else:
        assert documented, f"{package}.{name} has no documentation (a docstring, or a #: comment for a constant)"
