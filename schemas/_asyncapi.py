"""The AsyncAPI 3.0 document of the wire (``schemas/asyncapi.json``), generated from the code.

Built from the subject grammar (each event class's ``subject_pattern``), the event models, the
endpoint table (:data:`schemas.ENDPOINTS`) and the table of roles below (who sends and who receives
what). Payloads are the same pydantic models as ``schemas/json/``, inlined under
``components.schemas`` (each message also names its file in ``x-json-schema``). ``cadenza schemas
check`` fails when the checked-in document is stale; ``cadenza schemas export`` writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ._envelope import Event, event_types
from ._jsonschema import WireModel, wire_models
from ._rpc import ENDPOINTS

__all__ = ["ASYNCAPI_PATH", "ROLES", "asyncapi_document", "asyncapi_text", "export_asyncapi"]

#: Where the generated document lives (checked in, checked by CI and by the AsyncAPI parser).
ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.json"

#: The subject parameter each domain's id token stands for.
_ID_NAMES: Final = {"session": "session_id", "worker": "worker_id", "activity": "activity_id",
                    "cancel": "target_id", "dlq": "consumer"}  # fmt: skip

_PARAMETERS: Final = {
    "prefix": "the installation's subject prefix (CADENZA_PREFIX; may contain dots)",
    "session_id": "the session (a subject token)",
    "worker_id": "the worker process start (a subject token)",
    "activity_id": "the activity (a subject token; a UUID for activities cadenza starts)",
    "target_id": "the activity or session to cancel (a subject token)",
    "consumer": "the durable consumer or listener that refused the input",
    "tasklist": "the tasklist (a subject token)",
    "route": "the activity id with each '~' as a dot: <user>.<client>.<unique> for a caller's id "
             "<user>~<client>~<unique> (docs/wire.md, section 6)",
}

#: Who sends (``send``) and who receives (``receive``) each channel, per role. Channels are named by
#: event type (``session.requested`` -> ``session_requested``), endpoints by their schema stem;
#: ``channel:message`` narrows a channel that carries several messages to the one the role uses.
ROLES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "caller": {
        "send": ("session_requested", "session_complete", "task_queued", "task_inbox:task_activity",
                 "rpc_recorder_list", "rpc_recorder_get", "rpc_recorder_tail", "rpc_recorder_cancel",
                 "rpc_services_info", "cancel_requested", "activity_started", "activity_updated", "activity_message",
                 "activity_completed"),
        "receive": ("session_assigned", "session_rejected", "session_completed", "session_failed",
                    "activity_done"),
    },
    "worker": {
        "send": ("worker_started", "worker_heartbeat", "worker_stopped", "activity_started", "activity_updated",
                 "activity_message", "activity_completed", "dlq_rejected"),
        "receive": ("task_queued", "task_inbox", "cancel_requested", "rpc_worker_ping", "rpc_services_info"),
    },
    "broker": {
        "send": ("session_assigned", "session_rejected", "session_completed", "session_failed",
                 "task_inbox:task_session_opened", "task_inbox:task_session_closed",
                 "rpc_worker_ping", "dlq_rejected"),
        "receive": ("session_requested", "session_complete", "worker_started", "worker_heartbeat",
                    "worker_stopped", "rpc_services_info"),
    },
    "recorder": {
        "send": ("activity_message", "activity_completed", "cancel_requested", "dlq_rejected"),
        "receive": ("activity_started", "activity_updated", "activity_message", "activity_completed",
                    "worker_started", "worker_heartbeat", "worker_stopped", "rpc_recorder_list", "rpc_recorder_get",
                    "rpc_recorder_tail", "rpc_recorder_cancel", "rpc_services_info"),
    },
}  # fmt: skip

_HEADERS: Final[dict[str, Any]] = {
    "type": "object",
    "description": "NATS headers. All optional; each one given must agree with the body (docs/wire.md, Headers).",
    "properties": {
        "Nats-Msg-Id": {"type": "string", "maxLength": 128,
                        "description": "the body's event_id: the stream stores an event id once (dedupe)"},
        "Content-Type": {"type": "string", "const": "application/json"},
        "Cadenza-Schema-Version": {"type": "string", "pattern": "^[0-9]+$",
                                   "description": "the body's schema_version (1)"},
        "Cadenza-Event-Type": {"type": "string", "description": "the body's type, '<domain>.<event>'"},
        "Cadenza-Store-Ack-To": {"type": "string", "maxLength": 512,
                                 "description": "on a task: the subject the worker routes its stored "
                                                "completion's PubAck to; the caller then acks the task"},
        "Cadenza-Done": {"type": "string", "const": "1",
                         "description": "on a task: the caller hears the stored completion republished on "
                                        "{prefix}.done.{route}; a success is then answered by it alone, the "
                                        "worker acking the task"},
        "Cadenza-Task-Ack": {"type": "string", "pattern": "^\\$JS\\.ACK\\.",
                             "description": "on a result: the task's ack subject, to ack once that "
                                            "PubAck says stored (docs/wire.md)"},
        "traceparent": {"type": "string", "description": "W3C trace context"},
        "tracestate": {"type": "string", "description": "W3C trace context"},
    },
}  # fmt: skip


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _address(pattern: str, domain: str) -> str:
    pattern = pattern.replace("<id>", "<" + _ID_NAMES.get(domain, "id") + ">")
    return re.sub(r"<([a-z_]+)>", r"{\1}", pattern)


def _params(address: str | None) -> dict[str, Any]:
    names = re.findall(r"{([a-z_]+)}", address or "")
    out: dict[str, Any] = {}
    for n in names:
        out[n] = {"description": _PARAMETERS[n]}
        if n == "prefix":
            out[n]["default"] = "cadenza"
    return out


def _components(wires: list[WireModel]) -> dict[str, Any]:
    models: dict[str, type[BaseModel]] = {}
    for wire in wires:
        for model in wire.models:
            models[model.__name__] = model
    _, top = models_json_schema([(m, "serialization") for m in models.values()],
                                ref_template="#/components/schemas/{model}")  # fmt: skip
    schemas: dict[str, Any] = top.get("$defs", {})
    return dict(sorted(schemas.items()))


def _message(wire: WireModel, summary: str) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in wire.models]
    message: dict[str, Any] = {
        "name": wire.name,
        "title": wire.name,
        "summary": summary,
        "contentType": "application/json",
        "payload": refs[0] if len(refs) == 1 else {"anyOf": refs},
        "x-json-schema": f"json/{wire.name}.json",
    }
    if len(wire.models) == 1 and issubclass(wire.models[0], Event):
        message["headers"] = {"$ref": "#/components/schemas/CadenzaHeaders"}
    return message


def _doc_line(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().split("\n", 1)[0]


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a dict."""
    wires = {w.name: w for w in wire_models()}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    for type_name, cls in event_types().items():
        key = _key(type_name)
        messages[key] = _message(wires[type_name], _doc_line(cls))
        for alternative in cls.subject_pattern().split(" | "):
            if not alternative.startswith("<prefix>."):
                address = None  # a reply subject the caller chose (ActivityTask.reply_to)
                channel = "task_result"
            else:
                address = _address(alternative, cls.DOMAIN)
                last = address.rsplit(".", 1)[1]
                channel = _key(f"{cls.DOMAIN}.{last}")
            ch = channels.setdefault(channel, {"address": address, "messages": {}})
            ch["messages"][key] = {"$ref": f"#/components/messages/{key}"}
    for ep in ENDPOINTS:
        req, rep = wires[f"{ep.name}.request"], wires[f"{ep.name}.reply"]
        messages[_key(req.name)] = _message(req, _doc_line(ep.request))
        messages[_key(rep.name)] = _message(rep, f"{ep.reply.__name__}, or the error reply")
        address = _address(ep.subject_pattern(), "rpc")
        channels[_key(ep.name)] = {
            "address": address,
            "description": ep.summary,
            "messages": {_key(req.name): {"$ref": f"#/components/messages/{_key(req.name)}"}},
        }
        channels[_key(f"{ep.name}.reply")] = {
            "address": None, "description": f"the requester's reply inbox for {ep.name}",
            "messages": {_key(rep.name): {"$ref": f"#/components/messages/{_key(rep.name)}"}},
        }  # fmt: skip
    # Not a subject of its own schema: the activity stream republishes each stored completion here.
    channels["activity_done"] = {
        "address": "{prefix}.done.{route}",
        "description": "each stored activity.completed, republished by the activity stream once stored, with "
                       "its headers, for the caller whose activity id it carries (not stored again)",
        "messages": {"activity_completed": {"$ref": "#/components/messages/activity_completed"}},
    }  # fmt: skip
    for ch in channels.values():
        params = _params(ch["address"])
        if params:
            ch["parameters"] = params
    channels = dict(sorted(channels.items()))
    operations = _operations(channels)
    components = _components(list(wires.values()))
    components["CadenzaHeaders"] = _HEADERS
    return {
        "asyncapi": "3.0.0",
        "id": "urn:cadenza:wire:v1",
        "info": {
            "title": "cadenza wire contract",
            "version": "1",
            "description": "Sessions and tracked, cancellable activities over NATS JetStream. Generated from the "
            "code by schemas/_asyncapi.py; the step-by-step contract is docs/wire.md, the JSON Schemas are "
            "schemas/json/.",
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "`cadenza dev`"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": dict(sorted(messages.items())), "schemas": components},
    }


def _operations(channels: dict[str, Any]) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    for role, actions in ROLES.items():
        for action, names in actions.items():
            for entry in names:
                name, _, only = entry.partition(":")
                channel = channels[name]
                which = [only] if only else list(channel["messages"])
                op: dict[str, Any] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{name}"},
                    "summary": f"the {role} {action}s {', '.join(which)} on {channel['address'] or 'a reply inbox'}",
                    "tags": [{"name": role}],
                    "messages": [{"$ref": f"#/channels/{name}/messages/{m}"} for m in which],
                }
                # A task is answered on its reply_to and a request on its reply inbox; notices are not.
                reply = _reply_of(name, channels) if only in ("", "task_activity") else None
                if reply is not None:
                    op["reply"] = reply
                ops[_key(f"{role}_{action}_{entry}")] = op
    return ops


def _reply_of(name: str, channels: dict[str, Any]) -> dict[str, Any] | None:
    if name.startswith("rpc_"):
        reply = f"{name}_reply"
        messages = [{"$ref": f"#/channels/{reply}/messages/{m}"} for m in channels[reply]["messages"]]
        return {"channel": {"$ref": f"#/channels/{reply}"}, "messages": messages}
    if name in ("task_queued", "task_inbox"):
        return {
            "address": {"location": "$message.payload#/reply_to",
                        "description": "ActivityTask.reply_to: the caller's inbox for the ActivityResult"},
            "channel": {"$ref": "#/channels/task_result"},
            "messages": [{"$ref": "#/channels/task_result/messages/task_result"}],
        }  # fmt: skip
    return None


def asyncapi_text() -> str:
    """The document as the checked-in JSON text."""
    return json.dumps(asyncapi_document(), indent=2, sort_keys=True) + "\n"


def export_asyncapi(path: Path = ASYNCAPI_PATH, *, check: bool = False) -> bool:
    """Write (or, with ``check``, compare) the document; True when the file differed."""
    text = asyncapi_text()
    current = path.read_text() if path.exists() else None
    if current == text:
        return False
    if not check:
        path.write_text(text)
    return True
