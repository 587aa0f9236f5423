"""``cadenza recorder`` and ``cadenza activities ls|get|tail|cancel``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from datetime import datetime

import anyio

import bus
from schemas import ActivityRecord, ActivityStatus, MessageRecord

from .._runtime import add_server_args, announce_ready, run_service, service_bus
from ._recorder import Recorder, RecorderConfig

__all__ = ("build_parser", "main", "register")


# ------------------------------------------------------------------ recorder


def _add_recorder_args(p: argparse.ArgumentParser) -> None:
    add_server_args(p)
    d = RecorderConfig()
    p.add_argument(
        "--retention-days", type=float, default=d.retention_days, help="prune finished after N days (0: off)"
    )
    p.add_argument("--retention-count", type=int, default=d.retention_count, help="keep N finished per environment")
    p.add_argument("--prune-interval", type=float, default=d.prune_interval, help="seconds between prune passes")
    p.add_argument(
        "--host-timeout", type=float, default=None, help="seconds without heartbeat before a host counts as lost "
        "(default: 3 x the worker's heartbeat interval)"
    )  # fmt: skip
    p.add_argument("--host-timeout-factor", type=float, default=d.host_timeout_factor)
    p.add_argument("--sweep-interval", type=float, default=d.sweep_interval, help="seconds between host-lost checks")


def cmd_recorder(args: argparse.Namespace) -> int:
    config = RecorderConfig(
        retention_days=args.retention_days,
        retention_count=args.retention_count,
        prune_interval=args.prune_interval,
        host_timeout=args.host_timeout,
        host_timeout_factor=args.host_timeout_factor,
        sweep_interval=args.sweep_interval,
    )

    async def go() -> None:
        async with service_bus(args, "recorder") as b, anyio.create_task_group() as tg:
            await tg.start(Recorder(b, config).run)
            announce_ready(f"recorder on {b.url} prefix {b.subjects.prefix}")

    return run_service(go)


# ------------------------------------------------------------------ activities


def _fail(message: str) -> int:
    print(f"cadenza: {message}", file=sys.stderr)
    return 2


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _line(m: MessageRecord) -> str:
    return f"{m.seq:>6} {m.created_at.astimezone().strftime('%H:%M:%S')} {m.level.value:<7} {m.message}"


def _detail(a: ActivityRecord) -> str:
    rows = [
        ("id", a.id), ("type", a.type), ("status", a.status.value), ("environment", a.environment_id or "(local)"),
        ("resource", " ".join(x for x in (a.resource_type, a.resource_name or a.resource_id) if x) or "-"),
        ("progress", f"{a.progress:g}%"), ("step", a.step or "-"), ("latest", a.latest_message or "-"),
        ("error", a.error or "-"), ("started by", a.started_by.name() if a.started_by else "System"),
        ("started", _when(a.started_at)), ("ended", _when(a.ended_at)),
        ("duration", f"{a.duration_ms / 1000:.1f}s" if a.duration_ms is not None else "-"),
        ("worker", a.worker_id or "-"), ("session", a.session_id or "-"), ("messages", str(a.message_count)),
    ]  # fmt: skip
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def _call(args: argparse.Namespace, work: object) -> int:
    if not (args.server or os.environ.get("NATS_URL")):
        return _fail("no server given: pass --server nats://host:port or set NATS_URL (`cadenza dev` prints it)")
    outcome: dict[str, int] = {"code": 0}

    async def go() -> None:
        async with bus.connect(args.server, prefix=args.prefix, name="cadenza-cli", ensure_topology=False) as b:
            try:
                outcome["code"] = await work(bus.ActivityClient(b))  # type: ignore[operator]
            except bus.RemoteError as exc:
                print(f"cadenza: {exc.message} ({exc.remote_code})", file=sys.stderr)
                outcome["code"] = 1
            except bus.RequestError as exc:
                print(f"cadenza: {exc.message} (is `cadenza recorder` running?)", file=sys.stderr)
                outcome["code"] = 1

    code = run_service(go)
    return code or outcome["code"]


def cmd_ls(args: argparse.Namespace) -> int:
    async def work(client: bus.ActivityClient) -> int:
        reply = await client.list(
            environment_id=args.env, status=args.status or [], type=args.type, resource_type=args.resource_type,
            search=args.search, limit=args.limit, offset=args.offset,
        )  # fmt: skip
        if args.json:
            print(reply.model_dump_json(indent=2))
            return 0
        if not reply.items:
            print("no activities")
            return 0
        print(f"{'ID':<36}  {'STATUS':<9}  {'TYPE':<18}  {'PROG':>5}  {'STARTED':<19}  LATEST")
        for a in reply.items:
            latest = (a.error or a.latest_message).replace("\n", " ")[:60]
            started = _when(a.started_at)
            print(f"{a.id:<36}  {a.status.value:<9}  {a.type[:18]:<18}  {a.progress:>4.0f}%  {started:<19}  {latest}")
        more = f"; next page: --offset {reply.next_offset}" if reply.next_offset is not None else ""
        print(f"{len(reply.items)} of {reply.total}{more}")
        return 0

    return _call(args, work)


def cmd_get(args: argparse.Namespace) -> int:
    async def work(client: bus.ActivityClient) -> int:
        reply = await client.get(args.id, limit=args.limit)
        if args.json:
            print(reply.model_dump_json(indent=2))
            return 0
        print(_detail(reply.activity))
        if reply.messages:
            print()
            for m in reply.messages:
                print(_line(m))
        return 0

    return _call(args, work)


def cmd_tail(args: argparse.Namespace) -> int:
    async def work(client: bus.ActivityClient) -> int:
        after, cursor, status = args.after_seq, 0, ActivityStatus.RUNNING
        while True:
            reply = await client.tail(args.id, after_seq=after, cursor=cursor, wait=0.0 if args.no_follow else 5.0)
            for m in reply.messages:
                print(m.model_dump_json() if args.json else _line(m), flush=True)
            after, cursor, status = max(after, reply.last_seq), reply.cursor, reply.status
            if reply.done or args.no_follow:
                break
        if not args.json:
            print(f"-- {status.value}", file=sys.stderr)
        return 0

    return _call(args, work)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def work(client: bus.ActivityClient) -> int:
        reply = await client.cancel(args.id, who=args.who, reason=args.reason)
        if args.json:
            print(reply.model_dump_json(indent=2))
        elif reply.outcome == "accepted":
            print(f"cancellation of {args.id} requested; the host is cancelling it")
        else:
            print(f"{args.id}: nobody was running it any more; ended as cancelled")
        return 0

    return _call(args, work)


def _default_who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``recorder`` and ``activities`` to the ``cadenza`` command line."""
    p = sub.add_parser("recorder", help="run the activity recorder (state, queries, host-lost sweep, pruning)")
    _add_recorder_args(p)
    p.set_defaults(func=cmd_recorder)

    p = sub.add_parser("activities", help="list, show, follow or cancel tracked activities")
    asub = p.add_subparsers(dest="activities_command", required=True, metavar="ACTION")

    s = asub.add_parser("ls", help="list activities (active first, newest first)")
    s.add_argument("--env", default="", help="environment id (default: the local one)")
    s.add_argument("--status", action="append", choices=[x.value for x in ActivityStatus], help="repeatable")
    s.add_argument("--type", default="")
    s.add_argument("--resource-type", default="")
    s.add_argument("--search", default="", help="text in type, resource name, latest message, step, error")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--json", action="store_true")
    add_server_args(s)
    s.set_defaults(func=cmd_ls)

    s = asub.add_parser("get", help="one activity with its last messages")
    s.add_argument("id")
    s.add_argument("--limit", type=int, default=500, help="last N messages (<= 500)")
    s.add_argument("--json", action="store_true")
    add_server_args(s)
    s.set_defaults(func=cmd_get)

    s = asub.add_parser("tail", help="follow an activity's messages until it ends")
    s.add_argument("id")
    s.add_argument("--after-seq", type=int, default=0, help="resume after this message seq")
    s.add_argument("--no-follow", action="store_true", help="print what is there and stop")
    s.add_argument("--json", action="store_true", help="one JSON message per line")
    add_server_args(s)
    s.set_defaults(func=cmd_tail)

    s = asub.add_parser("cancel", help="cancel a running activity (as a user)")
    s.add_argument("id")
    s.add_argument("--who", default=_default_who(), help="your name, shown in the warning message")
    s.add_argument("--reason", default="")
    s.add_argument("--json", action="store_true")
    add_server_args(s)
    s.set_defaults(func=cmd_cancel)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.recorder", description="the cadenza activity recorder")
    _add_recorder_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cmd_recorder(build_parser().parse_args(argv))
