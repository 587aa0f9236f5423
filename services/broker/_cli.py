"""``cadenza broker``, ``cadenza sessions ls|get|complete``, ``cadenza workers ls``, ``cadenza worker M:OBJ``.

Heavy modules (bus, schemas, pydantic, the broker) are imported inside the commands: building the
parser must stay cheap (``cadenza --help``). A session id on the command line may be the start of
one when that start is unambiguous.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .._runtime import (
    LazyChoices,
    Parser,
    add_metrics_args,
    add_server_args,
    announce_ready,
    fail,
    float_arg,
    id_arg,
    int_arg,
    one_match,
    run_service,
    service_bus,
    start_process,
    stop_process,
    when,
    with_cli_bus,
)

if TYPE_CHECKING:
    import pydantic

    import bus
    from schemas import ActivitySignature, SessionRecord, WorkerRecord

__all__ = ("build_parser", "main", "register")


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    add_server_args(p)
    add_metrics_args(p)
    # Defaults are BrokerConfig's (None here keeps the broker module out of the parser's imports).
    p.add_argument("--sweep-interval", type=float_arg(0.01), default=None,
                   help="seconds between lost-worker / expiry checks (default: BrokerConfig's)")  # fmt: skip
    p.add_argument("--request-ack-wait", type=float_arg(0.1), default=None,
                   help="seconds before a request held by a dead broker goes to another (default: BrokerConfig's)"
                   )  # fmt: skip


def cmd_broker(args: argparse.Namespace) -> int:
    import anyio

    from ._broker import Broker, BrokerConfig

    given = {"sweep_interval": args.sweep_interval, "request_ack_wait": args.request_ack_wait}
    config = BrokerConfig(**{k: v for k, v in given.items() if v is not None})

    async def go() -> None:
        async with service_bus(args, "broker") as b, anyio.create_task_group() as tg:
            broker = Broker(b, config)
            await tg.start(broker.run)
            observe_broker(broker)
            announce_ready(f"broker on {b.url} prefix {b.subjects.prefix}")

    return run_service(go)


# ------------------------------------------------------------------ reading the buckets


async def _all(b: bus.Bus, key: str, model: type[pydantic.BaseModel]) -> list[Any]:
    from bus.transport import Bucket

    bucket = Bucket(b, key, model)
    out = []
    for k in await bucket.keys():
        value, _revision = await bucket.get(k)
        if value is not None:
            out.append(value)
    return out


async def _session(b: bus.Bus, given: str) -> SessionRecord | None:
    """The session whose id is ``given`` or starts with it (one line on stderr and None if none or many)."""
    from bus.transport import Bucket
    from schemas import SessionRecord

    sessions = Bucket(b, "sessions", SessionRecord)
    record, _revision = await sessions.get(given)
    if record is not None:
        return record
    match = one_match(given, sorted(k for k in await sessions.keys() if k.startswith(given)), "session")
    if match is None:
        return None
    record, _revision = await sessions.get(match)
    if record is None:
        fail(f"no session {given}")
    return record


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def cmd_sessions_ls(args: argparse.Namespace) -> int:
    import pydantic

    from schemas import SessionRecord, SessionState

    async def work(b: bus.Bus) -> int:
        rows: list[SessionRecord] = await _all(b, "sessions", SessionRecord)
        if args.state:
            rows = [r for r in rows if r.state.value in args.state]
        if args.tasklist:
            rows = [r for r in rows if r.tasklist == args.tasklist]
        rows.sort(
            key=lambda r: (r.state is not SessionState.OPEN, -(r.requested_at.timestamp() if r.requested_at else 0))
        )
        rows = rows[: args.limit]
        if args.json:
            print(pydantic.TypeAdapter(list[SessionRecord]).dump_json(rows, indent=2).decode())
            return 0
        if not rows:
            print("no sessions")
            return 0
        print(f"{'SESSION':<36}  {'STATE':<9}  {'TASKLIST':<12}  {'WORKER':<40}  {'OPENED':<19}  CAUSE")
        for r in rows:
            print(f"{r.session_id:<36}  {r.state.value:<9}  {r.tasklist:<12}  {r.worker_id or '-':<40}  "
                  f"{when(r.opened_at):<19}  {r.cause or ''}")  # fmt: skip
        return 0

    return with_cli_bus(args, work)


def cmd_sessions_get(args: argparse.Namespace) -> int:
    async def work(b: bus.Bus) -> int:
        rec = await _session(b, args.id)
        if rec is None:
            return 1
        if args.json:
            print(rec.model_dump_json(indent=2))
        else:
            for k, v in rec.model_dump(mode="json").items():
                print(f"{k:<18} {v if v not in (None, '') else '-'}")
        return 0

    return with_cli_bus(args, work)


def cmd_sessions_complete(args: argparse.Namespace) -> int:
    from schemas import SessionCompleteRequested, SessionState

    async def work(b: bus.Bus) -> int:
        # Checked first: the broker records a completion of a session it never saw as a withdrawn
        # request (a caller that gave up before placement), so a typo would leave a phantom record.
        rec = await _session(b, args.id)
        if rec is None:
            return 1
        if rec.state is not SessionState.OPEN and rec.state is not SessionState.PENDING:
            print(f"session {rec.session_id} is {rec.state.value} already; nothing to do")
            return 0
        await b.publish(SessionCompleteRequested(session_id=rec.session_id, reason=args.reason))
        print(f"completion of {rec.session_id} requested")
        return 0

    return with_cli_bus(args, work)


async def _served(b: bus.Bus, worker_id: str) -> list[ActivitySignature]:
    """The activities a worker advertised in its last heartbeat (else its started event)."""
    import bus
    from bus.transport import last_event
    from schemas import WorkerHeartbeat, WorkerStarted

    for event, model in (("heartbeat", WorkerHeartbeat), ("started", WorkerStarted)):
        try:
            last = await last_event(b, "worker", b.subjects.build("worker", worker_id, event), [model])
        except bus.BusError:
            continue
        if last is not None and isinstance(last.event, model):
            return last.event.activities
    return []


def _signature(a: ActivitySignature) -> str:
    params = []
    for p in a.parameters:
        text = {"var_positional": "*", "var_keyword": "**"}.get(p.kind, "") + p.name
        text += f": {p.annotation}" if p.annotation else ""
        text += f" = {p.default}" if p.default is not None else ""
        params.append(text)
    return f"{a.name}({', '.join(params)})"


def cmd_workers_ls(args: argparse.Namespace) -> int:
    from schemas import WorkerRecord

    async def work(b: bus.Bus) -> int:
        rows: list[WorkerRecord] = await _all(b, "workers", WorkerRecord)
        rows.sort(key=lambda w: (w.tasklist, w.worker_id))
        served = {w.worker_id: await _served(b, w.worker_id) for w in rows}
        if args.json:
            out = [{**w.model_dump(mode="json"), "activities": [a.model_dump(mode="json") for a in served[w.worker_id]]}
                   for w in rows]  # fmt: skip
            print(json.dumps(out, indent=2))
            return 0
        if not rows:
            print("no session workers")
            return 0
        print(f"{'WORKER':<44}  {'HOST':<20}  {'TASKLIST':<12}  {'SESSIONS':>9}  HEARTBEAT")
        for w in rows:
            print(f"{w.worker_id:<44}  {w.host_name[:20]:<20}  {w.tasklist:<12}  "
                  f"{len(w.sessions):>4}/{w.max_sessions:<4}  every {w.interval:g}s")  # fmt: skip
            listed = "; ".join(_signature(a) for a in served[w.worker_id]) or "(none advertised)"
            print(f"    activities: {listed}")
        return 0

    return with_cli_bus(args, work)


# ------------------------------------------------------------------ a user's worker


def load_activities(spec: str) -> dict[str, Callable[..., Any]]:
    """``module:object`` -> activities by name. The object is a ``bus.ActivityRegistry`` (or any
    mapping of names to functions), a ``bus.Worker`` (its activities), or a list of functions."""
    import bus

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"cadenza worker: expected MODULE:OBJECT (e.g. myapp.activities:registry), got {spec!r}")
    # As `python -m` does, the current directory is importable, so a project's own package is found
    # (appended: it cannot shadow an installed module, bus and schemas included).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = f"module {exc.name!r} was not found" if isinstance(exc, ModuleNotFoundError) else str(exc)
        raise SystemExit(
            f"cadenza worker: cannot import {module_name!r} ({missing}); it must be importable "
            f"from {os.getcwd()} or the Python path (is the package installed?)"
        ) from None
    except Exception as exc:
        raise SystemExit(f"cadenza worker: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise SystemExit(f"cadenza worker: module {module_name!r} has no {attr!r}")
    if isinstance(obj, bus.Worker):
        return dict(obj.activities)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list | tuple) and all(callable(f) for f in obj):
        return {f.__name__: f for f in obj}
    raise SystemExit(f"cadenza worker: {spec} is a {type(obj).__name__}; expected a bus.ActivityRegistry, "
                     "a mapping of names to functions, or a list of functions")  # fmt: skip


def cmd_worker(args: argparse.Namespace) -> int:
    import anyio

    import bus

    activities = load_activities(args.target)
    if not activities:
        return fail(f"{args.target} holds no activities")

    async def go() -> None:
        async with service_bus(args, "worker") as b:
            worker = bus.Worker(
                b, tasklist=args.tasklist, enable_sessions=not args.no_sessions,
                max_concurrent_sessions=args.max_sessions, heartbeat_interval=args.heartbeat_interval,
                activities=activities,
            )  # fmt: skip
            async with worker:
                announce_ready(f"worker {worker.worker_id} tasklist {args.tasklist} activities "
                               f"{', '.join(sorted(activities))}")  # fmt: skip
                await anyio.sleep_forever()

    return run_service(go)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    add_server_args(p)
    add_metrics_args(p)
    p.add_argument("--tasklist", type=id_arg("tasklist"), default="default",
                   help="the tasklist to serve (default: default)")  # fmt: skip
    p.add_argument("--max-sessions", type=int_arg(1), default=1000,
                   help="max_concurrent_sessions: sessions open at once on this worker (default 1000)")  # fmt: skip
    p.add_argument("--heartbeat-interval", type=float_arg(0.05), default=5.0,
                   help="seconds between heartbeats (default 5)")  # fmt: skip
    p.add_argument("--no-sessions", action="store_true", help="serve the shared queue only")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``broker``, ``sessions``, ``workers`` and ``worker`` to the ``cadenza`` command line."""
    p = sub.add_parser("broker", help="run the session broker (placement, slots, timeouts, lost workers)")
    _add_broker_args(p)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("sessions", help="list, show or complete sessions")
    ssub = p.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    s = ssub.add_parser("ls", help="sessions, open first, newest first")
    s.add_argument("--state", action="append", choices=LazyChoices(_session_states), metavar="STATE",
                   help="only sessions in this state (repeatable): %(choices)s")  # fmt: skip
    s.add_argument("--tasklist", default="", help="only sessions of this tasklist")
    s.add_argument("--limit", type=int_arg(1), default=100, help="at most this many (default 100)")
    s.add_argument("--json", action="store_true", help="print the records as JSON")
    add_server_args(s)
    s.set_defaults(func=cmd_sessions_ls)
    s = ssub.add_parser("get", help="one session's record")
    s.add_argument("id", type=id_arg("session id"), help="the session id, or its start when unambiguous")
    s.add_argument("--json", action="store_true", help="print the record as JSON")
    add_server_args(s)
    s.set_defaults(func=cmd_sessions_get)
    s = ssub.add_parser("complete", help="complete an open session (frees its slot, cancels its activities)")
    s.add_argument("id", type=id_arg("session id"), help="the session id, or its start when unambiguous")
    s.add_argument("--reason", default="completed from the command line", help="recorded with the completion")
    add_server_args(s)
    s.set_defaults(func=cmd_sessions_complete)

    p = sub.add_parser("workers", help="list session workers")
    wsub = p.add_subparsers(dest="workers_command", required=True, metavar="ACTION")
    s = wsub.add_parser("ls", help="live session workers with their slots in use")
    s.add_argument("--json", action="store_true", help="print the records as JSON")
    add_server_args(s)
    s.set_defaults(func=cmd_workers_ls)

    p = sub.add_parser("worker", help="run a worker serving MODULE:OBJECT's activities")
    p.add_argument("target", metavar="MODULE:OBJECT", help="e.g. myapp.activities:registry")
    add_worker_args(p)
    p.set_defaults(func=cmd_worker)


def _session_states() -> list[str]:
    from schemas import SessionState

    return [x.value for x in SessionState]


def observe_broker(broker: Any) -> None:
    """Per-tasklist gauges from the broker's caches: sessions open, slots free, ended sessions by
    state and cause (what the sessions bucket holds: every replica reports the same numbers)."""
    from ._metrics import observe

    observe(broker)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m services.broker", description="the cadenza session broker")
    _add_broker_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_process("broker", args)
    try:
        return cmd_broker(args)
    finally:
        stop_process()
