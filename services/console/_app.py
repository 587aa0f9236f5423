"""The console's web app (Starlette): one HTML shell per page, JSON APIs, server-sent event streams.

Routes:

* pages: ``/workers``, ``/sessions``, ``/sessions/{id}``, ``/activities``, ``/activities/{id}``,
  ``/dead-letters``, ``/health``: the same server-rendered shell; ``static/console.js`` fills it
  from the JSON APIs and keeps it live.
* ``/api/...``: the same views as JSON, filtered and paged on the server. Bad input (an unknown
  status, a page that is not a number, an id of the wrong shape) is a 400 with ``{"error": ...}``
  saying what to fix; an unknown id a 404; the recorder not answering a 503.
* ``/api/events``: server-sent events, one ``change`` event (the counters of every kind) after
  anything changed, at most four a second, and a comment every 15 s to keep proxies from closing it.
* ``/api/activities/{id}/stream``: server-sent events of one activity: ``message`` events with
  ``id: <seq>`` (a reconnecting browser sends ``Last-Event-ID`` and resumes after it), ``activity``
  events when its record changes, and ``end`` once it ended and every message was sent, right after
  an ``activity`` event with the recorder's final record.
* ``POST /api/activities/{id}/cancel`` ``{"reason", "name"}``: the recorder's cancel, with
  ``who = "<name> (console)"``; 403 when the console runs ``--read-only``.

Access: with a token (``--token`` / ``CADENZA_CONSOLE_TOKEN``) every request needs it, as
``Authorization: Bearer <token>`` or the cookie that ``?token=<token>`` sets; 401 otherwise.
Without a token the console serves loopback only and refuses requests whose ``Host`` is not a
loopback name (a web page elsewhere cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import pydantic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

import bus
from bus.transport import package_version
from schemas import ActivityRecord, ActivityStatus, ListActivitiesRequest, SessionState, utcnow

from ._state import ConsoleState

__all__ = ("ConsoleOptions", "create_app")

_log = logging.getLogger("cadenza.console")

STATIC = Path(__file__).parent / "static"
COOKIE = "cadenza_console"
_ID = re.compile(r"^[A-Za-z0-9_\-:=+@~]{1,200}$")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
#: Activities shown on a session's page (the newest; the count says how many there are).
SESSION_ACTIVITIES = 200
PAGES = {
    "workers": "Workers",
    "sessions": "Sessions",
    "activities": "Activities",
    "dead-letters": "Dead letters",
    "health": "Health",
}


@dataclass(frozen=True)
class ConsoleOptions:
    """How the app serves.

    Attributes:
        token: required on every request when set.
        read_only: hide and refuse cancellation.
        per_page: default page size of the lists.
        tail_wait: seconds one long-poll of an activity's messages waits at the recorder.
    """

    token: str = ""
    read_only: bool = False
    per_page: int = 50
    tail_wait: float = 5.0


class BadRequest(Exception):
    """Input that is not valid: answered 400 (or ``status``) with the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# ---------------------------------------------------------------- access


class _Guard:
    """Token check (and, without a token, the loopback Host check) in front of every route."""

    def __init__(self, app: ASGIApp, options: ConsoleOptions) -> None:
        self.app = app
        self.token = options.token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not self.token:
            host = (request.url.hostname or "").lower()
            if host not in _LOOPBACK_NAMES:
                await _error(403, f"host {host!r} is not loopback; run the console with --token to serve "
                                  "other hosts")(scope, receive, send)  # fmt: skip
                return
            await self.app(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
            # Set the cookie and drop the token from the address bar (and from the history).
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        if offered and secrets.compare_digest(offered.encode(), self.token.encode()):
            await self.app(scope, receive, send)
            return
        if request.url.path.startswith("/api/") or request.url.path.startswith("/static/"):
            await _error(401, "this console needs its token: header 'Authorization: Bearer <token>' "
                              "or open the console once with ?token=<token>")(scope, receive, send)  # fmt: skip
            return
        body = (
            "<!doctype html><meta charset=utf-8><title>cadenza console: token needed</title>"
            "<body style='font-family:sans-serif;margin:3em'><h1>Token needed</h1><p>This console was started "
            "with a token. Open it as <code>"
            + html.escape(str(request.url.replace(query="token=…")))
            + "</code> (the token is printed by <code>cadenza console</code> or set in "
            "<code>CADENZA_CONSOLE_TOKEN</code>).</p>"
        )
        await HTMLResponse(body, status_code=401)(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ---------------------------------------------------------------- input


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, not {raw[:50]!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be from {lo} to {hi}, not {value}")
    return value


def _choices(request: Request, name: str, allowed: type[ActivityStatus] | type[SessionState]) -> list[Any]:
    out = []
    for raw in request.query_params.getlist(name):
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(allowed(part))
            except ValueError:
                known = ", ".join(x.value for x in allowed)
                raise BadRequest(f"unknown {name} {part[:50]!r}; one of: {known}") from None
    return out


def _text(request: Request, name: str, limit: int = 200) -> str:
    value = request.query_params.get(name, "").strip()
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    return value


def _id(request: Request, what: str) -> str:
    value: str = request.path_params["id"]
    if not _ID.match(value):
        raise BadRequest(f"{what} id {value[:60]!r} is not valid: 1-200 characters of letters, digits and _-:=+@~")
    return value


def _page(request: Request, per_page_default: int) -> tuple[int, int]:
    return _int(request, "page", 1, 1, 1_000_000), _int(request, "per_page", per_page_default, 1, 200)


def _paged(rows: list[Any], page: int, per_page: int) -> tuple[list[Any], dict[str, int]]:
    start = (page - 1) * per_page
    pages = max(1, -(-len(rows) // per_page))
    return rows[start : start + per_page], {"page": page, "per_page": per_page, "total": len(rows), "pages": pages}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# ---------------------------------------------------------------- the app


def create_app(state: ConsoleState, options: ConsoleOptions | None = None) -> Starlette:
    """The console app over ``state`` (whose caches must already run)."""
    opts = options or ConsoleOptions()
    views = _Views(state, opts)
    routes = [
        Route("/", views.home),
        *(Route(f"/{slug}", views.page(slug)) for slug in PAGES),
        Route("/sessions/{id}", views.page("sessions")),
        Route("/activities/{id}", views.page("activities")),
        Route("/api/meta", views.api_meta),
        Route("/api/workers", views.api_workers),
        Route("/api/sessions", views.api_sessions),
        Route("/api/sessions/{id}", views.api_session),
        Route("/api/activities", views.api_activities),
        Route("/api/activities/{id}", views.api_activity),
        Route("/api/activities/{id}/stream", views.api_activity_stream),
        Route("/api/activities/{id}/cancel", views.api_cancel, methods=["POST"]),
        Route("/api/dead-letters", views.api_dead_letters),
        Route("/api/health", views.api_health),
        Route("/api/events", views.api_events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            BadRequest: views.bad_request,
            404: views.not_found,
            405: views.not_found,
            Exception: views.internal,
        },
    )
    app.add_middleware(_Guard, options=opts)
    return app


class _Views:
    """The console's pages and JSON views over one :class:`ConsoleState` (see :func:`create_app`)."""

    def __init__(self, state: ConsoleState, opts: ConsoleOptions) -> None:
        self.state = state
        self.opts = opts
        self.client = bus.ActivityClient(state.bus)
        self.shell = (STATIC / "shell.html").read_text()
        self.version = package_version()

    def page(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        async def render(request: Request) -> Response:
            nav = "".join(
                f'<a href="/{slug}"{" class=active" if slug == name else ""}>{title}</a>'
                for slug, title in PAGES.items()
            )
            item = request.path_params.get("id", "")
            if item and not _ID.match(item):
                return HTMLResponse(f"<h1>Not found</h1><p>{html.escape(item[:60])!r} is not a valid id.</p>", 404)
            body = (
                self.shell.replace("{{nav}}", nav)
                .replace("{{view}}", name)
                .replace("{{id}}", html.escape(item))
                .replace("{{title}}", PAGES[name])
                .replace("{{prefix}}", html.escape(self.state.bus.subjects.prefix))
                .replace("{{version}}", html.escape(self.version))
                .replace("{{read_only}}", "true" if self.opts.read_only else "false")
            )
            return HTMLResponse(body, headers={"Cache-Control": "no-store"})

        return render

    # ------------------------------------------------------------ JSON views

    async def api_meta(self, _: Request) -> Response:
        return JSONResponse({
            "prefix": self.state.bus.subjects.prefix, "version": self.version, "read_only": self.opts.read_only,
            "types": sorted(self.state.types), "environments": sorted(self.state.environments),
            "tasklists": sorted(self.state.tasklists), "statuses": [s.value for s in ActivityStatus],
            "session_states": [s.value for s in SessionState], "versions": self.state.versions,
        })  # fmt: skip

    async def api_workers(self, request: Request) -> Response:
        wanted = {s.strip() for s in request.query_params.get("state", "").split(",") if s.strip()}
        bad = wanted - {"live", "lost", "stopped", "unknown"}
        if bad:
            raise BadRequest(f"unknown state {sorted(bad)[0][:50]!r}; one of: live, lost, stopped, unknown")
        tasklist = _text(request, "tasklist")
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for wid in set(self.state.beats) | set(self.state.worker_records):
            beat, record = self.state.beats.get(wid), self.state.worker_records.get(wid)
            status, cause = self.state.worker_state(beat, now)
            if record is None and beat is not None and beat.sessions_enabled and status == "live":
                status, cause = "live", "not placed by a broker yet"
            tl = record.tasklist if record else beat.tasklist if beat else ""
            if (wanted and status not in wanted) or (tasklist and tl != tasklist):
                continue
            running = self.state.running_on(wid)
            rows.append({
                "worker_id": wid, "state": status, "cause": cause, "tasklist": tl,
                "host": (record.host_name if record else "") or (beat.host_name if beat else ""),
                "pid": (record.pid if record else 0) or (beat.pid if beat else 0),
                "slots_used": len(record.sessions) if record else (beat.open_sessions if beat else 0),
                "slots_total": record.max_sessions if record else (beat.max_sessions if beat else 0),
                "sessions_enabled": bool(record) or bool(beat and beat.sessions_enabled),
                "interval": beat.interval if beat else (record.interval if record else 0),
                "last_seen": _iso(beat.last_seen) if beat else None,
                "heartbeat_age": round((now - beat.last_seen).total_seconds(), 1) if beat else None,
                "started_at": _iso((record.started_at if record else None) or (beat.started_at if beat else None)),
                "running_activities": beat.running_activities if beat else len(running),
                "activities": [{"id": a.id, "type": a.type, "status": a.status.value} for a in running[:20]],
            })  # fmt: skip
        order = {"live": 0, "unknown": 1, "lost": 2, "stopped": 3}
        rows.sort(key=lambda r: (order[r["state"]], r["tasklist"], r["worker_id"]))
        page_no, per_page = _page(request, 100)
        items, paging = _paged(rows, page_no, per_page)
        return JSONResponse({"items": items, **paging})

    def session_json(self, s: Any) -> dict[str, Any]:
        acts = self.state.by_session.get(s.session_id, ())
        return {
            **s.model_dump(mode="json", exclude={"announced"}),
            "activity_count": len(acts),
        }

    async def api_sessions(self, request: Request) -> Response:
        states = _choices(request, "state", SessionState)
        tasklist = _text(request, "tasklist")
        page_no, per_page = _page(request, self.opts.per_page)
        rows = self.state.session_rows(states, tasklist)
        items, paging = _paged(rows, page_no, per_page)
        counts: dict[str, int] = dict.fromkeys((s.value for s in SessionState), 0)
        for s in self.state.sessions.values():
            counts[s.state.value] += 1
        return JSONResponse({"items": [self.session_json(s) for s in items], "counts": counts, **paging})

    async def api_session(self, request: Request) -> Response:
        sid = _id(request, "session")
        record = self.state.sessions.get(sid)
        if record is None:
            raise BadRequest(f"no session {sid}", 404)
        ran = self.state.in_session(sid)
        activities = [_activity_json(a) for a in ran[-SESSION_ACTIVITIES:]]  # the newest, oldest first
        return JSONResponse({"session": self.session_json(record), "activities": activities,
                             "activity_total": len(ran)})  # fmt: skip

    async def api_activities(self, request: Request) -> Response:
        statuses = _choices(request, "status", ActivityStatus)
        page_no, per_page = _page(request, self.opts.per_page)
        try:
            req = ListActivitiesRequest(
                environment_id=_text(request, "environment"), status=statuses, type=_text(request, "type"),
                search=_text(request, "search", 1024), offset=(page_no - 1) * per_page, limit=per_page,
            )  # fmt: skip
        except pydantic.ValidationError as exc:
            raise BadRequest(f"bad filter: {exc.errors()[0]['msg']}") from None
        reply = await _recorder(self.client.list(req))
        pages = max(1, -(-reply.total // per_page))
        return JSONResponse({
            "items": [_activity_json(a) for a in reply.items], "page": page_no, "per_page": per_page,
            "total": reply.total, "pages": pages,
        })  # fmt: skip

    async def api_activity(self, request: Request) -> Response:
        aid = _id(request, "activity")
        limit = _int(request, "messages", 0, 0, 500)
        reply = await _recorder(self.client.get(aid, limit=limit))
        return JSONResponse({
            "activity": _activity_json(reply.activity),
            "messages": [m.model_dump(mode="json") for m in reply.messages],
        })  # fmt: skip

    async def api_cancel(self, request: Request) -> Response:
        aid = _id(request, "activity")
        if self.opts.read_only:
            raise BadRequest("this console is read-only: cancelling is turned off (--read-only)", 403)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest('the body must be JSON: {"reason": "...", "name": "..."}') from None
        if not isinstance(body, dict):
            raise BadRequest('the body must be a JSON object: {"reason": "...", "name": "..."}')
        reason, name = body.get("reason", ""), body.get("name", "")
        if not isinstance(reason, str) or not isinstance(name, str):
            raise BadRequest("reason and name must be strings")
        reason, name = reason.strip(), " ".join(name.split())
        if not reason:
            raise BadRequest("say why: a reason is required to cancel an activity")
        if len(reason) > 4096 or len(name) > 200:
            raise BadRequest("reason is limited to 4096 characters, name to 200")
        who = f"{name} (console)" if name else "console"
        reply = await _recorder(self.client.cancel(aid, who=who, reason=reason))
        return JSONResponse({"outcome": reply.outcome, "who": who, "reason": reason,
                             "activity": _activity_json(reply.activity)})  # fmt: skip

    async def api_dead_letters(self, request: Request) -> Response:
        consumer = _text(request, "consumer")
        page_no, per_page = _page(request, self.opts.per_page)
        rows = [e for e in self.state.dead_letters if not consumer or (e.letter and e.letter.consumer == consumer)]
        items, paging = _paged(rows, page_no, per_page)
        out = []
        for e in items:
            letter = e.letter.model_dump(mode="json") if e.letter else {"reason": "not a dead-letter entry",
                                                                         "payload": e.raw}  # fmt: skip
            out.append({"seq": e.seq, "stored_at": _iso(e.time), **letter})
        consumers = sorted({e.letter.consumer for e in self.state.dead_letters if e.letter})
        return JSONResponse({"items": out, "consumers": consumers, "seen": self.state.dead_letters_seen,
                             "kept": self.state.config.dead_letters, **paging})  # fmt: skip

    async def api_health(self, _: Request) -> Response:
        now = utcnow()
        services = []
        for seen in sorted(self.state.services.values(), key=lambda s: (s.info.service, s.info.instance)):
            age = (now - seen.last_seen).total_seconds()
            alive = age <= 3 * self.state.config.services_interval + 2 * self.state.config.services_window + 1
            services.append({**seen.info.model_dump(mode="json"), "last_seen": _iso(seen.last_seen),
                             "age": round(age, 1), "state": "live" if alive else "gone"})  # fmt: skip
        return JSONResponse({
            "server": await self.state.server_health(), "services": services,
            "recorder": {"rtt_ms": self.state.recorder_rtt_ms, "error": self.state.recorder_error},
            "console": {"version": self.version, "read_only": self.opts.read_only,
                        "activities_cached": len(self.state.activities), "sessions_cached": len(self.state.sessions),
                        "dead_letters_kept": len(self.state.dead_letters)},
        })  # fmt: skip

    # ------------------------------------------------------------ live streams

    async def api_events(self, _: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            sent: dict[str, int] = {}
            while True:
                if self.state.versions != sent:
                    sent = dict(self.state.versions)
                    yield f"event: change\ndata: {json.dumps(sent)}\n\n"
                    await anyio.sleep(0.25)  # coalesce bursts: at most four updates a second
                    continue
                if not await self.state.wait_change(15.0):
                    yield ": keep-alive\n\n"

        return _sse(stream())

    async def api_activity_stream(self, request: Request) -> Response:
        aid = _id(request, "activity")
        after = _int(request, "after", -1, -1, 2**53)
        last_id = request.headers.get("last-event-id", "").strip()
        if last_id:
            try:
                after = max(0, int(last_id))
            except ValueError:
                raise BadRequest(f"Last-Event-ID must be a message seq, not {last_id[:50]!r}") from None
        first = await _recorder(self.client.get(aid, limit=500 if after < 0 else 0))

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            record = first.activity
            yield _event("activity", _activity_json(record))
            seq = max(after, 0)
            if after < 0:  # a fresh page: the last 500 messages, then live
                for m in first.messages:
                    yield _event("message", m.model_dump(mode="json"), m.seq)
                    seq = m.seq
            send, receive = anyio.create_memory_object_stream[str](100)
            async with anyio.create_task_group() as tg, send, receive:
                tg.start_soon(self._follow_messages, aid, seq, send.clone())
                tg.start_soon(self._follow_record, record, send.clone())
                send.close()
                async for chunk in receive:
                    yield chunk
                    if chunk.startswith("event: end"):
                        tg.cancel_scope.cancel()
                        break

        return _sse(stream())

    async def _follow_messages(self, aid: str, seq: int, send: anyio.abc.ObjectSendStream[str]) -> None:
        cursor = 0
        async with send:
            while True:
                try:
                    reply = await self.client.tail(aid, after_seq=seq, cursor=cursor, wait=self.opts.tail_wait)
                except bus.CadenzaError as exc:
                    await send.send(_event("problem", {"error": f"cannot read messages: {exc.message}"}))
                    await anyio.sleep(2.0)  # the recorder may be restarting; the page says so meanwhile
                    continue
                for m in reply.messages:
                    await send.send(_event("message", m.model_dump(mode="json"), m.seq))
                seq, cursor = max(seq, reply.last_seq), reply.cursor
                if reply.done:
                    # The record as the recorder holds it at the end, before "end" closes the page's stream:
                    # the console's own fold of the stream may follow a moment later, and a page shown
                    # "running" after "ended cancelled" was seen once in CI.
                    with contextlib.suppress(bus.CadenzaError):
                        final = await self.client.get(aid, limit=0)
                        await send.send(_event("activity", _activity_json(final.activity)))
                    await send.send(_event("end", {"status": reply.status.value, "last_seq": seq}))
                    return

    async def _follow_record(self, record: ActivityRecord, send: anyio.abc.ObjectSendStream[str]) -> None:
        last = (record.updated_at, record.status, record.progress)
        seen = self.state.versions["activities"]
        async with send:
            while True:
                # By version, not by wake-up: a change made while the last send waited is not missed.
                if self.state.versions["activities"] == seen:
                    await self.state.wait_change(15.0)
                    continue
                seen = self.state.versions["activities"]
                cur = self.state.activities.get(record.id)
                if cur is None:
                    continue
                mark = (cur.updated_at, cur.status, cur.progress)
                if mark != last:
                    last = mark
                    await send.send(_event("activity", _activity_json(cur)))

    # ------------------------------------------------------------ errors

    async def bad_request(self, _: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return _error(exc.status, exc.message)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}")
        return _error(status, f"no such page: {request.url.path}")

    async def internal(self, request: Request, exc: Exception) -> Response:
        _log.exception("console: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the console's log has the details")

    async def home(self, _: Request) -> Response:
        return RedirectResponse("/activities", status_code=307)


def _activity_json(a: ActivityRecord) -> dict[str, Any]:
    out = a.model_dump(mode="json", exclude={"result", "metadata"})
    out["started_by_name"] = a.started_by.name() if a.started_by else ""
    return out


def _event(name: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        stream, media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
    )  # fmt: skip


async def _recorder(call: Awaitable[Any]) -> Any:
    """A recorder call, its errors told as HTTP: not found 404, not cancellable 409, unavailable 503."""
    try:
        return await call
    except bus.RemoteError as exc:
        status = {"not_found": 404, "not_cancellable": 409, "validation": 400}.get(exc.remote_code, 502)
        raise BadRequest(exc.message, status) from None
    except bus.RequestError as exc:
        raise BadRequest(f"the recorder does not answer ({exc.message}); is `cadenza recorder` running?", 503) from None
