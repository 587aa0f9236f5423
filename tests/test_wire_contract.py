"""The wire contract's rules, one by one (docs/wire.md): headers against the body, dead-letter ids,
id patterns in the schemas equal to the bus's, the generated AsyncAPI document, activities without
``rev``, ``list.search`` on ids, the activities a worker advertises."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bus
from bus._heartbeat import describe_activities
from bus.testing import eventually
from bus.tracking._fold import fold_started, fold_updated
from bus.transport._dead_letters import dead_letter_id
from schemas import (
    ASYNCAPI_PATH,
    TOKEN_PATTERN,
    ActivityRecord,
    ActivityResult,
    ActivityStarted,
    ActivityTask,
    ActivityUpdated,
    CancelRequested,
    ListActivitiesReply,
    ListActivitiesRequest,
    SubjectError,
    WorkerHeartbeat,
    asyncapi_document,
    check_token,
    export_asyncapi,
    json_schemas,
    wire_models,
)
from services.recorder import Recorder
from services.recorder._recorder import _matches

# ---------------------------------------------------------------- headers


def _body(**kw: Any) -> bytes:
    return ActivityUpdated(activity_id="a1", progress=5, **kw).model_dump_json().encode()


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ({"Cadenza-Schema-Version": "999"}, "unknown_version"),
        ({"Cadenza-Schema-Version": "2"}, "unknown_version"),
        ({"Cadenza-Schema-Version": "v-one"}, "bad_version"),
        ({"Cadenza-Schema-Version": "0"}, "bad_version"),
        ({"Cadenza-Schema-Version": "1.0"}, "bad_version"),
        ({"Cadenza-Schema-Version": ""}, "bad_version"),
        ({"Cadenza-Event-Type": "activity.started"}, "type_mismatch"),
        ({"Nats-Msg-Id": "something-else"}, "id_mismatch"),
    ],
)
def test_a_header_that_is_not_a_known_version_or_contradicts_the_body_is_rejected(
    headers: dict[str, str], kind: str
) -> None:
    with pytest.raises(bus.ValidationError) as err:
        bus.decode(_body(event_id="e1"), headers, [ActivityUpdated])
    assert err.value.kind == kind and err.value.message


@pytest.mark.parametrize("version", [2, 999, "1", "v-one", 0, -1, 1.5, True, None])
def test_a_body_version_that_is_not_a_known_integer_is_rejected(version: object) -> None:
    raw = json.loads(_body())
    raw["schema_version"] = version
    with pytest.raises(bus.ValidationError) as err:
        bus.decode(json.dumps(raw).encode(), None, [ActivityUpdated])
    assert err.value.kind in ("bad_version", "unknown_version"), err.value


def test_missing_headers_and_agreeing_headers_are_accepted() -> None:
    body = _body(event_id="e1")
    agreeing = {"Cadenza-Schema-Version": "1", "Cadenza-Event-Type": "activity.updated", "Nats-Msg-Id": "e1"}
    for headers in (None, {}, agreeing, {"Content-Type": "application/json"}):
        assert bus.decode(body, headers, [ActivityUpdated]).event_id == "e1"
    raw = json.loads(body)
    del raw["schema_version"], raw["type"]  # neither is required in the body
    assert bus.decode(json.dumps(raw).encode(), {"Cadenza-Schema-Version": "1"}, [ActivityUpdated])


def test_what_the_bus_encodes_decodes_with_its_own_headers() -> None:
    event = ActivityStarted(activity_id="a2", activity_type="t")
    body, headers = bus.encode(event)
    assert bus.decode(body, headers, [ActivityStarted]) == event


def test_an_activitys_messages_go_without_the_type_headers_other_events_with_them() -> None:
    """docs/wire.md, Headers: the task, its result and the activity events carry their type and
    version in the body only (a receiving nats-py client parses each header character by character)."""
    per_activity = (ActivityStarted(activity_id="a3", activity_type="t"),
                    ActivityTask(activity_id="a3", name="n", tasklist="t"),
                    ActivityResult(activity_id="a3", ok=True))  # fmt: skip
    for event in per_activity:
        body, headers = bus.encode(event)
        assert headers == {"Nats-Msg-Id": event.event_id}, type(event).__name__
        assert bus.decode(body, headers, [type(event)]) == event
    _, headers = bus.encode(
        CancelRequested(target="activity", target_id="a3", cause=bus.CancelCause(kind=bus.CancelKind.USER))
    )
    assert headers["Cadenza-Event-Type"] == "cancel.requested" and headers["Cadenza-Schema-Version"] == "1"


# ---------------------------------------------------------------- dead-letter ids


def test_dead_letter_ids_differ_per_consumer_and_stay_bounded() -> None:
    a = dead_letter_id("broker-workers", "T_WORKER", 7)
    b = dead_letter_id("recorder-workers", "T_WORKER", 7)
    assert a != b and a == dead_letter_id("broker-workers", "T_WORKER", 7)
    long = dead_letter_id("c" * 200, "S" * 200, 12345)
    assert len(long) <= 128 and long != dead_letter_id("d" * 200, "S" * 200, 12345)
    assert dead_letter_id("x", "", 0) != dead_letter_id("x", "", 0)  # core input: one entry per rejection


# ---------------------------------------------------------------- schemas


def test_every_schema_file_is_draft_2020_12_with_an_id() -> None:
    files = json_schemas()
    wanted = {"rpc.error.json", "kv.sessions.json", "kv.workers.json",
              "rpc.worker.ping.request.json", "rpc.worker.ping.reply.json", "dlq.rejected.json"}  # fmt: skip
    assert wanted <= set(files)
    for method in ("list", "get", "tail", "cancel"):
        assert {f"rpc.recorder.{method}.request.json", f"rpc.recorder.{method}.reply.json"} <= set(files)
    ids = set()
    for name, text in files.items():
        schema = json.loads(text)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert schema["$id"].endswith(f"/{name}"), name
        ids.add(schema["$id"])
    assert len(ids) == len(files)
    record = json.loads(files["rpc.recorder.get.reply.json"])["$defs"]["ActivityRecord"]["properties"]
    assert {"latest_message", "last_seq", "message_count", "result"} <= set(record)


def _id_patterns(node: Any, path: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                found.append((path, value))
            found.extend(_id_patterns(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_id_patterns(value, f"{path}/{i}"))
    return found


def test_every_id_field_carries_the_token_pattern() -> None:
    id_fields = ("activity_id", "session_id", "worker_id", "target_id", "tasklist", "consumer")
    for name, text in json_schemas().items():
        schema = json.loads(text)
        for path, pattern in _id_patterns(schema):
            assert pattern in (TOKEN_PATTERN, TOKEN_PATTERN.replace("^[", "^([").replace("]{1,200}$", "]{1,200})?$")), (
                name, path)  # fmt: skip
        props = schema.get("properties", {})
        for field in id_fields:
            if field in props:
                assert any(f"/properties/{field}" in p for p, _ in _id_patterns(schema)), (name, field)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=210) | st.from_regex(TOKEN_PATTERN, fullmatch=True))
def test_the_schema_pattern_accepts_exactly_what_the_bus_accepts(value: str) -> None:
    try:
        check_token(value)
        bus_ok = True
    except SubjectError:
        bus_ok = False
    # ECMA-262 (JSON Schema) and Python agree on this character class; $ is the end (no newline before it).
    schema_ok = re.fullmatch(TOKEN_PATTERN[1:-1], value) is not None
    assert bus_ok == schema_ok, value


def test_the_asyncapi_document_is_current_and_covers_every_message() -> None:
    assert export_asyncapi(ASYNCAPI_PATH, check=True) is False, "run `cadenza schemas export`"
    doc = asyncapi_document()
    assert doc["asyncapi"] == "3.0.0"
    in_messages = {m["name"] for m in doc["components"]["messages"].values()}
    events_and_rpc = {w.name for w in wire_models() if not w.name.startswith(("kv.", "rpc.error"))}
    assert in_messages == events_and_rpc
    roles = {tag["name"] for op in doc["operations"].values() for tag in op["tags"]}
    assert roles == {"caller", "worker", "broker", "recorder"}
    # request/reply pairs: every rpc operation and the task to a worker carry a reply
    for name, op in doc["operations"].items():
        if "rpc_" in name or name.endswith(("task_queued", "task_inbox_task_activity", "worker_receive_task_inbox")):
            assert "reply" in op, name
    assert doc["channels"]["activity_started"]["address"] == "{prefix}.activity.{activity_id}.started"
    assert set(doc["channels"]["task_inbox"]["parameters"]) == {"prefix", "worker_id"}


# ---------------------------------------------------------------- the recorder's folds and search


def test_an_update_without_rev_applies_in_arrival_order() -> None:
    started = fold_started(None, ActivityStarted(activity_id="a3", activity_type="t", rev=1))
    assert started is not None
    ordered = fold_updated(started, ActivityUpdated(activity_id="a3", progress=30, rev=5))
    assert ordered is not None and ordered.fold.rev == 5
    stale = fold_updated(ordered, ActivityUpdated(activity_id="a3", progress=10, rev=4))
    assert stale is None  # older rev: by design no change
    unordered = fold_updated(ordered, ActivityUpdated(activity_id="a3", progress=42, step="x"))
    assert unordered is not None and unordered.record.progress == 42 and unordered.record.step == "x"
    assert unordered.fold.rev == 5  # an unordered update does not lower the rev floor


def test_search_matches_id_prefixes_and_text() -> None:
    r = ActivityRecord(id="3f1c9a-aaaa", session_id="sess-77", worker_id="w-host-1", type="image_pull",
                       latest_message="pulling layer 3")  # fmt: skip
    for needle in ("3f1c", "3f1c9a-aaaa", "sess-7", "w-host", "image", "layer 3"):
        assert _matches(r, needle.lower()), needle
    assert not _matches(r, "aaaa") and not _matches(r, "zzz")


async def test_list_search_finds_an_activity_by_an_id_prefix(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    ids = [str(uuid.uuid4()) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        await tg.start(Recorder(b).run)
        for aid in ids:
            await b.publish(ActivityStarted(event_id=f"{aid}.started", activity_id=aid, activity_type="t"))
        subject = b.rpc_subject("recorder", "list")

        async def found(needle: str) -> list[str]:
            reply = await b.request(subject, ListActivitiesRequest(search=needle), ListActivitiesReply)
            return [a.id for a in reply.items]

        got: list[str] = []

        async def first_found() -> bool:
            got[:] = await found(ids[0][:8])
            return got == [ids[0]]

        await eventually(first_found, timeout=20, interval=0.05, what=lambda: f"{ids[0]} found by a prefix: {got}")
        assert await found(ids[1].upper()) == [ids[1]]
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- what workers advertise


async def _sample(url: str, chunks: int = 5, *, delay: float = 0.3, **rest: Any) -> dict[str, Any]:
    """Fetch something."""
    return {}


def test_describe_activities_names_each_parameter_as_written() -> None:
    (sig,) = describe_activities({"fetch": _sample})
    assert (sig.name, sig.returns, sig.doc) == ("fetch", "dict[str, Any]", "Fetch something.")
    got = [(p.name, p.kind, p.annotation, p.required, p.default) for p in sig.parameters]
    assert got == [
        ("url", "positional_or_keyword", "str", True, None),
        ("chunks", "positional_or_keyword", "int", False, "5"),
        ("delay", "keyword", "float", False, "0.3"),
        ("rest", "var_keyword", "Any", False, None),
    ]


async def test_a_worker_advertises_its_activities_in_its_heartbeats(cadenza_bus: bus.Bus) -> None:
    b = cadenza_bus
    worker = bus.Worker(b, tasklist="adv", heartbeat_interval=0.2, activities={"fetch": _sample})
    seen: list[WorkerHeartbeat] = []
    async with worker:
        subject = b.subjects.build("worker", worker.worker_id, "heartbeat")
        stream = b.topology.stream_name("worker")

        async def beat() -> bool:
            try:
                msg = await b.js.get_last_msg(stream, subject)
            except Exception:
                return False
            seen.append(bus.decode(msg.data or b"", msg.headers, [WorkerHeartbeat]))
            return True

        await eventually(beat, timeout=20, interval=0.05, what="the worker's first heartbeat stored")
    assert [a.name for a in seen[-1].activities] == ["fetch"]
    assert [p.name for p in seen[-1].activities[0].parameters] == ["url", "chunks", "delay", "rest"]
