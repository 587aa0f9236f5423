"""``cadenza recorder`` and ``cadenza activities ls|get|tail|cancel``.

Heavy modules (bus, schemas, the recorder) are imported inside the commands, so building the parser
stays cheap. An activity id may be the start of one when that start is unambiguous.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from .._runtime import (
    LazyChoices,
    Parser,
    add_metrics_args,
    add_reconnect_args,
    add_server_args,
    again_after_reconnect,
    announce_ready,
    float_arg,
    id_arg,
    int_arg,
    one_match,
    riding_out,
    run_service,
    service_bus,
    start_process,
    stop_process,
    when,
    with_cli_bus,
)

if TYPE_CHECKING:
    import bus
    from schemas import ActivityRecord, MessageRecord

__all__ = ("build_parser", "main", "register")


# ------------------------------------------------------------------ recorder


def _add_recorder_args(p: argparse.ArgumentParser) -> None:
    add_server_args(p)
    add_metrics_args(p)
    # Defaults (None) are RecorderConfig's: the recorder module stays out of the parser's imports.
    p.add_argument("--retention-days", type=float_arg(0), default=None,
                   help="prune finished activities after N days (0: off; default: RecorderConfig's)")  # fmt: skip
    p.add_argument("--retention-count", type=int_arg(0), default=None,
                   help="keep N finished activities per environment (default: RecorderConfig's)")  # fmt: skip
    p.add_argument("--prune-interval", type=float_arg(0.01), default=None,
                   help="seconds between prune passes (default: RecorderConfig's)")  # fmt: skip
    p.add_argument(
        "--host-timeout", type=float_arg(0.01), default=None,
        help="seconds without heartbeat before a host counts as lost (default: 3 x the worker's heartbeat interval)"
    )  # fmt: skip
    p.add_argument("--host-timeout-factor", type=float_arg(1.0), default=None,
                   help="without --host-timeout: this many heartbeats (default: RecorderConfig's)")  # fmt: skip
    p.add_argument("--sweep-interval", type=float_arg(0.01), default=None,
                   help="seconds between host-lost checks (default: RecorderConfig's)")  # fmt: skip


def cmd_recorder(args: argparse.Namespace) -> int:
    import anyio

    from ._recorder import Recorder, RecorderConfig

    names = ("retention_days", "retention_count", "prune_interval", "host_timeout", "host_timeout_factor",
             "sweep_interval")  # fmt: skip
    config = RecorderConfig(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})

    async def go() -> None:
        async with service_bus(args, "recorder") as b, anyio.create_task_group() as tg:
            await tg.start(Recorder(b, config).run)
            announce_ready(f"recorder on {b.url} prefix {b.subjects.prefix}")

    return run_service(go)


# ------------------------------------------------------------------ activities


def _line(m: MessageRecord) -> str:
    return f"{m.seq:>6} {m.created_at.astimezone().strftime('%H:%M:%S')} {m.level.value:<7} {m.message}"


def _detail(a: ActivityRecord) -> str:
    rows = [
        ("id", a.id), ("type", a.type), ("status", a.status.value), ("environment", a.environment_id or "(local)"),
        ("resource", " ".join(x for x in (a.resource_type, a.resource_name or a.resource_id) if x) or "-"),
        ("progress", f"{a.progress:g}%"), ("step", a.step or "-"), ("latest", a.latest_message or "-"),
        ("error", a.error or "-"), ("started by", a.started_by.name() if a.started_by else "System"),
        ("started", when(a.started_at)), ("ended", when(a.ended_at)),
        ("duration", f"{a.duration_ms / 1000:.1f}s" if a.duration_ms is not None else "-"),
        ("worker", a.worker_id or "-"), ("session", a.session_id or "-"), ("messages", str(a.message_count)),
    ]  # fmt: skip
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def _call(args: argparse.Namespace, work: Callable[[bus.ActivityClient], Awaitable[int]]) -> int:
    """Run a one-shot command's ``work`` with an activity client; errors of the recorder in one line."""
    import bus

    async def run(b: bus.Bus) -> int:
        try:
            client = bus.ActivityClient(b)
            if getattr(args, "id", None):
                resolved = await _resolve(client, args.id, getattr(args, "env", ""))
                if resolved is None:
                    return 1
                args.id = resolved
            return await work(client)
        except bus.RemoteError as exc:
            print(f"cadenza: {exc.message} ({exc.remote_code})", file=sys.stderr)
        except bus.NoResponderError as exc:  # its message asks whether the recorder runs
            print(f"cadenza: {exc.message}", file=sys.stderr)
        except bus.RequestError as exc:
            print(f"cadenza: {exc.message} (is `cadenza recorder` running?)", file=sys.stderr)
        return 1

    return with_cli_bus(args, run)


async def _resolve(client: bus.ActivityClient, given: str, env: str = "") -> str | None:
    """``given`` if an activity has that id, else the one id of ``env`` starting with it (None, with
    one line on stderr, when none or several do). The recorder knows the ids."""
    import bus

    try:
        await client.get(given, limit=0)
        return given
    except bus.RemoteError as exc:
        if exc.remote_code != "not_found":
            raise
    reply = await client.list(environment_id=env, search=given, limit=500)
    matches = sorted(a.id for a in reply.items if a.id.startswith(given))
    return one_match(given, matches, "activity", plural="activities", missing=f"activity {given} not found")


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
            started = when(a.started_at)
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
    """Messages until the activity ends; on a terminal, a live progress bar with the current step."""
    import contextlib
    from functools import partial
    from typing import Any

    async def work(client: bus.ActivityClient) -> int:  # rides out a server restart (--reconnect-timeout)
        return await riding_out(client.bus, partial(follow, client), give_up_after=args.reconnect_timeout)

    async def follow(client: bus.ActivityClient) -> int:
        from rich.console import Console  # once connected: a dead server is reported without it
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        from schemas import ActivityStatus

        def ask(call: Any, *a: Any, **kw: Any) -> Any:
            return again_after_reconnect(client.bus, partial(call, *a, **kw))

        err = Console(stderr=True, highlight=False)
        live = err.is_terminal and not args.json and not args.no_follow

        after, cursor, status = args.after_seq, 0, ActivityStatus.RUNNING
        record = (await ask(client.get, args.id, limit=0)).activity
        if not args.no_follow:
            print(f"following {args.id} on {client.bus.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                       console=err, transient=True)  # fmt: skip
        with bar if live else contextlib.nullcontext():
            task = bar.add_task(record.step or record.type, total=100, completed=int(record.progress))
            while True:
                wait = 0.0 if args.no_follow else 1.0 if live else 5.0
                reply = await ask(client.tail, args.id, after_seq=after, cursor=cursor, wait=wait)
                for m in reply.messages:
                    line = m.model_dump_json() if args.json else _line(m)
                    if live:
                        bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
                    else:
                        print(line, flush=True)
                after, cursor, status = max(after, reply.last_seq), reply.cursor, reply.status
                if live or reply.done:
                    record = (await ask(client.get, args.id, limit=0)).activity
                    bar.update(task, completed=record.progress, description=record.step or record.type)
                if reply.done or args.no_follow:
                    break
        if not args.json:
            step = f", step {record.step}" if record.step else ""
            print(f"-- {status.value} ({record.progress:g}%{step})", file=sys.stderr)
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
    s.add_argument("--status", action="append", choices=LazyChoices(_statuses), metavar="STATUS",
                   help="only activities in this status (repeatable): %(choices)s")  # fmt: skip
    s.add_argument("--type", default="", help="only activities of this type")
    s.add_argument("--resource-type", default="", help="only activities on this kind of resource")
    s.add_argument("--search", default="", help="text in type, resource name, latest message, step, error")
    s.add_argument("--limit", type=int_arg(1, 500), default=50, help="page size, 1-500 (default 50)")
    s.add_argument("--offset", type=int_arg(0), default=0, help="skip this many (the next page)")
    s.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_server_args(s)
    s.set_defaults(func=cmd_ls)

    s = asub.add_parser("get", help="one activity with its last messages")
    s.add_argument("id", type=id_arg("activity id"), help="the activity id, or its start when unambiguous")
    s.add_argument("--limit", type=int_arg(0, 500), default=500, help="last N messages, 0-500 (default 500)")
    s.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_server_args(s)
    s.set_defaults(func=cmd_get)

    s = asub.add_parser("tail", help="follow an activity's messages until it ends")
    s.add_argument("id", type=id_arg("activity id"), help="the activity id, or its start when unambiguous")
    s.add_argument("--after-seq", type=int_arg(0), default=0, help="resume after this message seq")
    s.add_argument("--no-follow", action="store_true", help="print what is there and stop")
    s.add_argument("--json", action="store_true", help="one JSON message per line")
    add_reconnect_args(s)
    add_server_args(s)
    s.set_defaults(func=cmd_tail)

    s = asub.add_parser("cancel", help="cancel a running activity (as a user)")
    s.add_argument("id", type=id_arg("activity id"), help="the activity id, or its start when unambiguous")
    s.add_argument("--who", default=_default_who(), help="your name, shown in the warning message")
    s.add_argument("--reason", default="", help="why, shown with the cancellation")
    s.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_server_args(s)
    s.set_defaults(func=cmd_cancel)


def _statuses() -> list[str]:
    from schemas import ActivityStatus

    return [x.value for x in ActivityStatus]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m services.recorder", description="the cadenza activity recorder")
    _add_recorder_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_process("recorder", args)
    try:
        return cmd_recorder(args)
    finally:
        stop_process()
