"""The web console's HTTP endpoints (pages, JSON APIs, event streams, cancel, access) against a real
nats-server, an in-process recorder, broker and worker, and the console served by uvicorn on a free
loopback port (httpx as the client)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import httpx
import pytest

import bus
from bus.testing import eventually
from bus.transport._service_info import serve_service_info
from schemas import ActivityCompleted, ActivityStarted, ActivityStatus, utcnow
from services.cli import main as cli_main
from services.console import ConsoleConfig, ConsoleOptions, running_console
from tests._helpers import running_broker, running_recorder, session_opts, wait_record
from tests.console_worker import activities

FAST = ConsoleConfig(services_interval=0.3, services_window=0.2)


@dataclass
class Stack:
    bus: bus.Bus
    url: str
    worker: bus.Worker
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def console_stack(b: bus.Bus, **options: Any) -> AsyncIterator[Stack]:
    async with running_recorder(b), running_broker(b), anyio.create_task_group() as tg:
        await tg.start(serve_service_info, b, "recorder")
        # Heartbeats every second: the recorder ends a host silent for 3 intervals as lost, and a loaded
        # CI machine once held this in-process worker silent for longer than 0.75 s.
        worker = bus.Worker(b, tasklist="console", max_concurrent_sessions=4, heartbeat_interval=1.0,
                            activities=activities)  # fmt: skip
        async with worker, running_console(b, options=ConsoleOptions(**options), config=FAST) as console:
            async with httpx.AsyncClient(base_url=console.url, timeout=10.0) as http:
                yield Stack(b, console.url, worker, http)
        tg.cancel_scope.cancel()


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The events of a text/event-stream response, as dicts of their fields."""
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            event[key] = value.removeprefix(" ")


async def wait_json(http: httpx.AsyncClient, path: str, until: Any, *, timeout: float = 15.0) -> Any:
    """GET ``path`` until ``until(json)`` holds (the console's caches follow the buckets); returns that JSON."""
    last: list[Any] = [None]

    async def holds() -> bool:
        r = await http.get(path)
        last[0] = r.json()
        return r.status_code == 200 and bool(until(last[0]))

    await eventually(holds, timeout=timeout, interval=0.05, what=lambda: f"{path}: {last[0]}")
    return last[0]


# ---------------------------------------------------------------- pages


async def test_pages_are_served_with_their_static_files(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        r = await s.http.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/activities"
        for path, title in [("/workers", "Workers"), ("/sessions", "Sessions"), ("/activities", "Activities"),
                            ("/dead-letters", "Dead letters"), ("/health", "Health"), ("/activities/x-1", "Activities"),
                            ("/sessions/s-1", "Sessions")]:  # fmt: skip
            r = await s.http.get(path)
            assert r.status_code == 200, path
            assert f"<title>{title} · cadenza console</title>" in r.text
            assert 'src="/static/console.js"' in r.text and "http://" not in r.text.split("<body")[0]
        for name, kind in [("console.js", "javascript"), ("console.css", "css"), ("favicon.svg", "svg")]:
            r = await s.http.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in (await s.http.get("/static/console.js")).text  # nothing fetched from elsewhere


# ---------------------------------------------------------------- workers and sessions


async def test_workers_and_sessions_show_a_session_on_its_worker(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        ctx = await bus.create_session(s.bus.context(), session_opts(tasklist="console", heartbeat_timeout=5.0))
        info = bus.get_session_info(ctx)
        assert info is not None
        workers = await wait_json(s.http, "/api/workers", lambda d: any(
            w["worker_id"] == s.worker.worker_id and w["slots_used"] == 1 for w in d["items"]))  # fmt: skip
        row = next(w for w in workers["items"] if w["worker_id"] == s.worker.worker_id)
        assert (row["state"], row["tasklist"], row["slots_total"], row["sessions_enabled"]) == (
            "live",
            "console",
            4,
            True,
        )
        assert row["heartbeat_age"] is not None and row["host"]
        d = await wait_json(s.http, "/api/sessions?state=open", lambda d: d["total"] == 1)
        assert d["items"][0]["session_id"] == info.session_id and d["items"][0]["worker_id"] == s.worker.worker_id
        assert (await s.http.get("/api/sessions?tasklist=elsewhere")).json()["total"] == 0
        assert (await s.http.get("/api/sessions?state=failed,rejected")).json()["total"] == 0
        assert (await s.http.get("/api/workers?state=lost")).json()["items"] == []
        assert await bus.execute_activity(
            ctx, "render", "clip", kwargs={"frames": 2, "delay": 0.01}, activity_id="in-session-1"
        )
        one = await wait_json(s.http, f"/api/sessions/{info.session_id}", lambda d: len(d["activities"]) == 1)
        assert one["session"]["state"] == "open" and one["activities"][0]["id"] == "in-session-1"
        await bus.complete_session(ctx)
        await wait_json(s.http, "/api/sessions?state=completed", lambda d: d["total"] == 1)
        await wait_json(s.http, "/api/workers", lambda d: any(w["slots_used"] == 0 for w in d["items"]))


# ---------------------------------------------------------------- activities


async def seed(b: bus.Bus) -> None:
    now = utcnow()
    rows = [
        ("c-old-ok", "", "image_pull", "nginx", 50, ActivityStatus.SUCCESS),
        ("c-run-1", "", "deploy", "shop", 40, None),
        ("c-failed", "", "image_pull", "redis", 30, ActivityStatus.FAILED),
        ("c-run-2", "", "image_pull", "postgres", 20, None),
        ("c-new-ok", "", "deploy", "blog", 10, ActivityStatus.SUCCESS),
        ("c-prod", "prod", "deploy", "shop", 5, None),
    ]
    for aid, env, typ, name, ago, status in rows:
        t = now - timedelta(minutes=ago)
        started = ActivityStarted(
            activity_id=aid, time=t, environment_id=env, activity_type=typ, resource_type="thing",
            resource_name=name, message=f"working on {name}",
        )  # fmt: skip
        await b.publish(started)
        if status is not None:
            error = "disk quota exceeded" if status is ActivityStatus.FAILED else None
            ended = t + timedelta(seconds=5)
            await b.publish(ActivityCompleted(activity_id=aid, time=ended, status=status, error=error))
    for aid, *_, status in rows:
        await wait_record(b, aid, (lambda r: r.terminal) if status is not None else (lambda r: True))


async def test_activities_are_filtered_and_paged_on_the_server(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        await seed(s.bus)

        async def ids(query: str) -> list[str]:
            r = await s.http.get(f"/api/activities?{query}")
            assert r.status_code == 200, r.text
            return [a["id"] for a in r.json()["items"]]

        assert await ids("") == [
            "c-run-2",
            "c-run-1",
            "c-new-ok",
            "c-failed",
            "c-old-ok",
        ]  # running first, newest first
        assert await ids("status=running") == ["c-run-2", "c-run-1"]
        assert await ids("status=success&status=failed") == ["c-new-ok", "c-failed", "c-old-ok"]
        assert await ids("type=deploy") == ["c-run-1", "c-new-ok"]
        assert await ids("search=QUOTA") == ["c-failed"]
        assert await ids("environment=prod") == ["c-prod"]
        page2 = (await s.http.get("/api/activities?per_page=2&page=2")).json()
        assert [a["id"] for a in page2["items"]] == ["c-new-ok", "c-failed"]
        assert (page2["total"], page2["pages"], page2["page"]) == (5, 3, 2)
        assert (await s.http.get("/api/activities?per_page=2&page=9")).json()["items"] == []
        one = (await s.http.get("/api/activities/c-failed")).json()["activity"]
        assert (one["status"], one["error"], one["resource_name"]) == ("failed", "disk quota exceeded", "redis")
        meta = (await s.http.get("/api/meta")).json()
        assert {"image_pull", "deploy"} <= set(meta["types"]) and set(meta["environments"]) == {"", "prod"}


async def test_activity_stream_sends_new_messages_and_resumes_after_last_event_id(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s, anyio.create_task_group() as tg:
        ctx = await bus.create_session(s.bus.context(), session_opts(tasklist="console", heartbeat_timeout=5.0))
        aid = "streamed-1"
        tg.start_soon(
            lambda: bus.execute_activity(ctx, "render", "clip", kwargs={"frames": 60, "delay": 0.05}, activity_id=aid)
        )
        await wait_json(s.http, f"/api/activities/{aid}", lambda d: d["activity"]["message_count"] >= 1)
        seqs: list[int] = []
        statuses: list[str] = []
        with anyio.fail_after(20):
            async with s.http.stream("GET", f"/api/activities/{aid}/stream") as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                async for ev in sse_events(r):
                    if ev.get("event") == "activity":
                        statuses.append(json.loads(ev["data"])["status"])
                    if ev.get("event") == "message":
                        seqs.append(int(ev["id"]))
                        assert json.loads(ev["data"])["seq"] == seqs[-1]
                        if len(seqs) >= 8:
                            break
        assert seqs == list(range(1, 9)) and statuses[0] == "running"
        # A reconnecting browser sends the last id it saw: the stream goes on from the next message.
        with anyio.fail_after(20):
            async with s.http.stream("GET", f"/api/activities/{aid}/stream", headers={"Last-Event-ID": "5"}) as r:
                async for ev in sse_events(r):
                    if ev.get("event") == "message":
                        assert int(ev["id"]) == 6
                        break
        # To the end: the last event is "end", after every message, and right before it the final record
        # (a page that closes its stream on "end" must not be left showing "running").
        with anyio.fail_after(30):
            async with s.http.stream("GET", f"/api/activities/{aid}/stream?after=50") as r:
                events = [ev async for ev in sse_events(r)]
        got = [int(ev["id"]) for ev in events if ev.get("event") == "message"]
        assert [ev.get("event") for ev in events[-2:]] == ["activity", "end"], events[-3:]
        assert json.loads(events[-1]["data"])["status"] == "success"
        assert json.loads(events[-2]["data"])["status"] == "success"
        assert got == list(range(51, 61))
        await bus.complete_session(ctx)


async def test_cancel_ends_the_activity_cancelled_with_the_reason_and_who(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s, anyio.create_task_group() as tg:
        ctx = await bus.create_session(s.bus.context(), session_opts(tasklist="console", heartbeat_timeout=5.0))
        aid = "to-cancel-1"
        outcome: list[BaseException] = []

        async def run() -> None:
            try:
                await bus.execute_activity(
                    ctx, "render", "clip", kwargs={"frames": 1000, "delay": 0.05}, activity_id=aid
                )
            except bus.CadenzaError as exc:
                outcome.append(exc)

        tg.start_soon(run)
        await wait_json(s.http, f"/api/activities/{aid}", lambda d: d["activity"]["progress"] > 0)
        r = await s.http.post(f"/api/activities/{aid}/cancel", json={"reason": "wrong clip", "name": " Ada  L "})
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["who"]) == ("accepted", "Ada L (console)")
        done = await wait_json(s.http, f"/api/activities/{aid}", lambda d: d["activity"]["status"] != "running")
        assert done["activity"]["status"] == "cancelled"
        assert done["activity"]["error"] == "cancelled by Ada L (console): wrong clip"
        await eventually(lambda: bool(outcome), timeout=10, what="the caller heard of the cancellation")
        r = await s.http.post(f"/api/activities/{aid}/cancel", json={"reason": "again"})
        assert r.status_code == 409 and "cancelled" in r.json()["error"]
        await bus.complete_session(ctx)


async def test_read_only_hides_cancel_and_refuses_it(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus, read_only=True) as s:
        await seed(s.bus)
        assert 'data-read-only="true"' in (await s.http.get("/activities/c-run-1")).text
        r = await s.http.post("/api/activities/c-run-1/cancel", json={"reason": "no"})
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert (await s.http.get("/api/activities/c-run-1")).json()["activity"]["status"] == "running"


# ---------------------------------------------------------------- access


async def test_a_token_is_required_on_every_request_when_set(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus, token="s3cret") as s:
        for path in ("/api/meta", "/api/activities", "/static/console.js", "/api/events"):
            r = await s.http.get(path)
            assert r.status_code == 401 and "token" in r.json()["error"], path
        page = await s.http.get("/workers")
        assert page.status_code == 401 and "Token needed" in page.text
        assert (await s.http.get("/api/meta", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await s.http.get("/api/meta", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        r = await s.http.get("/workers?token=s3cret&state=live")
        assert r.status_code == 303 and r.headers["location"] == "/workers?state=live"
        assert "cadenza_console=s3cret" in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
        assert (await s.http.get("/api/meta")).status_code == 200  # the cookie now


async def test_off_loopback_the_console_refuses_to_start_without_a_token(
    cadenza_bus: bus.Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(bus.BusError, match="not a loopback address"):
        async with running_console(cadenza_bus, host="0.0.0.0"):
            pass  # pragma: no cover
    assert cli_main(["console", "--host", "0.0.0.0", "--server", "nats://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cadenza console: --host 0.0.0.0 is not loopback: pass --token or set CADENZA_CONSOLE_TOKEN "
                   "(every request must then carry it)"]  # fmt: skip


async def test_without_a_token_only_loopback_host_names_are_served(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        r = await s.http.get("/api/meta", headers={"Host": "attacker.example:80"})
        assert r.status_code == 403 and "not loopback" in r.json()["error"]
        assert (await s.http.get("/api/meta", headers={"Host": "localhost"})).status_code == 200


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("GET", "/api/activities?status=bogus", None, 400, "unknown status 'bogus'"),
        ("GET", "/api/activities?page=0", None, 400, "page must be from 1"),
        ("GET", "/api/activities?page=two", None, 400, "page must be a whole number"),
        ("GET", "/api/activities?per_page=100000", None, 400, "per_page must be from 1 to 200"),
        ("GET", "/api/activities?search=" + "x" * 2000, None, 400, "search is longer"),
        ("GET", "/api/sessions?state=asleep", None, 400, "unknown state 'asleep'"),
        ("GET", "/api/workers?state=asleep", None, 400, "unknown state 'asleep'"),
        ("GET", "/api/activities/bad%20id", None, 400, "activity id 'bad id' is not valid"),
        ("GET", "/api/activities/" + "a" * 300, None, 400, "is not valid"),
        ("GET", "/api/activities/no-such-activity", None, 404, "not found"),
        ("GET", "/api/activities/no-such-activity/stream", None, 404, "not found"),
        ("GET", "/api/activities/c-run-1/stream?after=-5", None, 400, "after must be from -1"),
        ("GET", "/api/sessions/no-such-session", None, 404, "no session no-such-session"),
        ("GET", "/api/sessions/b%C3%A4d", None, 400, "session id"),
        ("GET", "/api/dead-letters?page=-1", None, 400, "page must be from 1"),
        ("GET", "/api/nothing-here", None, 404, "no such page"),
        ("POST", "/api/activities/c-run-1/cancel", b"not json", 400, "the body must be JSON"),
        ("POST", "/api/activities/c-run-1/cancel", b"[1]", 400, "a JSON object"),
        ("POST", "/api/activities/c-run-1/cancel", b'{"reason": 5}', 400, "must be strings"),
        ("POST", "/api/activities/c-run-1/cancel", b'{"reason": "  "}', 400, "a reason is required"),
        ("POST", "/api/activities/no-such/cancel", b'{"reason": "x"}', 404, "not found"),
        ("DELETE", "/api/activities/c-run-1/cancel", None, 405, "DELETE is not allowed"),
    ],
)
async def test_bad_input_gets_a_4xx_with_a_clear_message(
    cadenza_bus: bus.Bus, method: str, path: str, body: bytes | None, status: int, says: str
) -> None:
    async with console_stack(cadenza_bus) as s:
        if "c-run-1" in path:
            await seed(s.bus)
        r = await s.http.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert says in r.json()["error"]
        assert "Traceback" not in r.text


# ---------------------------------------------------------------- dead letters and health


async def test_a_malformed_event_appears_under_dead_letters(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        subject = s.bus.subjects.build("session", "junk-1", "requested")
        await s.bus.js.publish(subject, b"{not json", headers={"X-Test": "yes"})
        d = await wait_json(s.http, "/api/dead-letters", lambda d: d["total"] >= 1)
        row = d["items"][0]
        assert row["consumer"] == "broker-requests" and row["subject"] == subject
        assert row["error_type"] == "bad_json" and row["reason"] and row["payload"] == "{not json"
        assert row["headers"]["X-Test"] == "yes"
        assert d["consumers"] == ["broker-requests"]
        assert (await s.http.get("/api/dead-letters?consumer=someone-else")).json()["total"] == 0


async def test_health_shows_the_server_and_every_service_that_answers(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        d = await wait_json(s.http, "/api/health", lambda d: any(v["service"] == "recorder" for v in d["services"]))
        rec = next(v for v in d["services"] if v["service"] == "recorder")
        assert rec["state"] == "live" and rec["version"] and rec["pid"] > 0
        assert d["server"]["version"] and d["server"]["jetstream"] is True and d["server"]["connected"] is True
        assert d["server"]["account"]["streams"] >= 6
        assert {st["name"] for st in d["server"]["streams"]} >= {s.bus.topology.stream_name("activity")}
        assert d["recorder"]["error"] == "" and d["recorder"]["rtt_ms"] > 0


async def test_the_change_feed_announces_what_changed(cadenza_bus: bus.Bus) -> None:
    async with console_stack(cadenza_bus) as s:
        with anyio.fail_after(20):
            async with s.http.stream("GET", "/api/events") as r:
                first: dict[str, int] | None = None
                async for ev in sse_events(r):
                    if ev.get("event") != "change":
                        continue
                    versions = json.loads(ev["data"])
                    if first is None:
                        first = versions
                        await seed(s.bus)
                    elif versions["activities"] > first["activities"]:
                        break
