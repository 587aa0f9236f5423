"""The ``cadenza`` command line.

Commands of the foundation live here (server, subjects, schemas, publish, tail, dev); the
services add theirs (recorder/activities, broker/worker/sessions/workers/demo) through a
``register(subparsers)`` function in their ``_cli`` module.

Start-up is kept short (``cadenza --help`` imports neither ``bus`` nor ``schemas``): the modules here
and the ``_cli`` modules import the heavy packages (nats-py, pydantic models, OpenTelemetry's SDK)
inside the command that needs them, never at module level.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._runtime import (
    READY,
    Parser,
    add_reconnect_args,
    add_server_args,
    cli_bus,
    fail,
    float_arg,
    int_arg,
    riding_out,
    run_service,
    start_process,
    stop_process,
)

if TYPE_CHECKING:
    import bus
    from bus.transport import ChildProcess, EmbeddedCluster

__all__ = ("build_parser", "main")

#: Modules that add subcommands; a missing one is skipped (its service is not installed).
_COMMAND_MODULES = (
    "services.recorder._cli", "services.broker._cli", "services.demo._cli", "services.console._cli",
)  # fmt: skip


#: Commands that run until stopped; the others are one-shot (quiet logs, any failure in one line). ``tail``
#: runs until stopped too, but as a one-shot: its output is the events, and any failure is one line.
_LONG_RUNNING = frozenset({"server", "dev", "broker", "recorder", "worker", "demo", "console"})


# ------------------------------------------------------------------ server


def cmd_server(args: argparse.Namespace) -> int:
    import bus

    server = bus.EmbeddedServer(args.store, port=args.port, host=args.host)
    try:
        server.start()
    except bus.ServerStartError as exc:
        return fail(str(exc))
    print(f"nats-server (JetStream) on {server.url}, store {server.store_dir}", flush=True)
    print(f"export NATS_URL={server.url}", flush=True)
    print(READY, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                return fail("nats-server exited unexpectedly; see its log in " + str(server.store_dir))
    finally:
        server.stop()
    return 0


# ------------------------------------------------------------------ subjects / schemas


def cmd_subjects(args: argparse.Namespace) -> int:
    import bus
    import schemas
    from bus.transport import format_size

    try:
        topo = bus.Topology(args.prefix)
    except bus.TopologyError as exc:
        return fail(str(exc))
    rows = topo.table()
    if args.json:
        print(json.dumps([dict(zip(("subject", "stream", "limits", "what"), r, strict=True)) for r in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'subject':<{widths[0]}}  {'stream / bucket':<{widths[1]}}  {'limits':<{widths[2]}}  what")
    for subject, stream, limits, what in rows:
        print(f"{subject:<{widths[0]}}  {stream:<{widths[1]}}  {limits:<{widths[2]}}  {what}")
    replicas = f"{topo.replicas} (CADENZA_REPLICAS)" if topo.replicas else "1 when created (CADENZA_REPLICAS unset)"
    print(f"\nreplicas: {replicas}; file store reserved per node: {format_size(topo.storage_needed())}"
          f"{' (CADENZA_STORAGE)' if topo.storage else ''}. What the server really has: `cadenza status`.")  # fmt: skip
    print()
    print("event types (subject <prefix>.<domain>.<id>.<event>):")
    for name, cls in schemas.event_types().items():
        print(f"  {name:<24} {cls.subject_pattern().replace('<prefix>', args.prefix)}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    import schemas

    check = args.action == "check"
    if args.dir:
        directory = Path(args.dir)
        if not directory.is_dir() and (check or not directory.parent.is_dir()):
            return fail(f"no such directory: {directory}" + ("" if check else " (nor its parent)"))
    elif check:
        directory = schemas.JSON_DIR
    elif (Path.cwd() / "schemas" / "json").is_dir():
        directory = Path("schemas") / "json"
        print(f"writing to ./{directory} (the checkout in this directory; --dir DIR to choose)", file=sys.stderr)
    else:
        return fail("pass --dir DIR: where to write the JSON Schema files (there is no ./schemas/json here)")
    # The AsyncAPI document lies beside the JSON Schema directory (schemas/asyncapi.json).
    asyncapi = Path(args.asyncapi) if args.asyncapi else directory.parent / schemas.ASYNCAPI_PATH.name
    try:
        differ = schemas.export_json_schemas(directory, check=check)
        stale = schemas.export_asyncapi(asyncapi, check=check)
    except OSError as exc:
        return fail(f"cannot write to {directory}: {exc.strerror or exc}")
    count = len(schemas.wire_models())
    if check:
        if differ or stale:
            what = [f"{directory.name}/: " + ", ".join(differ)] if differ else []
            what += [f"{asyncapi.name}"] if stale else []
            print("the schemas are stale; run `cadenza schemas export`. Differs: " + "; ".join(what))
            return 1
        print(f"schemas/json is current ({count} shapes), and so is {asyncapi.name}")
        return 0
    print(
        f"wrote {count} schema files to {directory}" + (f" ({len(differ)} changed)" if differ else "")
        + f" and {asyncapi}" + (" (changed)" if stale else "")
    )  # fmt: skip
    return 0


# ------------------------------------------------------------------ publish / tail


def _no_server(args: argparse.Namespace) -> bool:
    return not (args.server or os.environ.get("NATS_URL"))


_NO_SERVER = "no server given: pass --server nats://host:port or set NATS_URL (`cadenza dev` prints it)"


def _read_json_arg(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        return Path(value[1:]).read_text()
    return value


def cmd_publish(args: argparse.Namespace) -> int:
    import bus
    import schemas

    cls = schemas.lookup_event_type(args.event)
    if cls is None:
        known = ", ".join(schemas.event_types())
        return fail(f"unknown event type {args.event!r}; known types: {known}")
    try:
        text = _read_json_arg(args.json)
    except OSError as exc:
        return fail(f"cannot read {args.json[1:]!r}: {exc}")
    try:
        event = bus.decode(text.encode(), None, [cls])
    except bus.ValidationError as exc:
        hint = f" (the JSON Schema is schemas/json/{args.event}.json)"
        return fail(f"{exc.message}{hint}")
    if _no_server(args):
        return fail(_NO_SERVER)

    async def go() -> None:
        async with cli_bus(args, "cadenza-cli", ensure_topology=True) as b:
            result = await b.publish(event)
            dup = " (duplicate: already stored)" if result.duplicate else ""
            print(
                f"published {event.type} {event.event_id} to {b.subject_of(event)}: {result.stream} #{result.seq}{dup}"
            )

    return run_service(go)


def cmd_tail(args: argparse.Namespace) -> int:
    """Follow a subject: live, or ``--since``/``--all`` from the streams (services/_tail.py); rides out a
    server restart (``--reconnect-timeout``)."""
    from ._tail import follow, printer

    if _no_server(args):
        return fail(_NO_SERVER)
    subject = args.subject
    if not subject.startswith(args.prefix + ".") and not subject.startswith("$"):
        subject = f"{args.prefix}.{subject}"
    if " " in subject or not all(subject.split(".")):
        return fail(f"{args.subject!r} is not a subject: dot-separated tokens without spaces, * and > as wildcards")
    emit = printer(args)

    async def go() -> None:
        import anyio

        async with cli_bus(args, "cadenza-tail", reconnect=True) as b:
            what = "from the start" if args.all else f"from {args.since:g}s ago" if args.since is not None else "live"
            print(f"following {subject} on {b.url} {what} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            with anyio.move_on_after(args.timeout) if args.timeout else anyio.CancelScope():
                run = partial(follow, b, subject, emit, since=args.since, everything=args.all)
                await riding_out(b, run, give_up_after=args.reconnect_timeout, what=f"following {subject}")

    return run_service(go)


# ------------------------------------------------------------------ setup / status


def cmd_setup(args: argparse.Namespace) -> int:
    """Declare (or upgrade) every stream and bucket: run once as the admin user."""
    import bus
    from bus.transport import ensure_topology, format_size, parse_size

    if _no_server(args):
        return fail(_NO_SERVER)
    try:
        configured = bus.Topology(args.prefix)  # CADENZA_REPLICAS / CADENZA_STORAGE
        storage = configured.storage if args.storage is None else parse_size(args.storage)
        replicas = configured.replicas if args.replicas is None else args.replicas
        topo = bus.Topology(args.prefix, replicas=replicas, storage=storage)
    except bus.TopologyError as exc:
        return fail(str(exc))

    async def go() -> None:
        async with cli_bus(args, "cadenza-setup") as b:
            await ensure_topology(b, topo)
            for subject, stream, limits, _ in topo.table():
                print(f"ok  {stream:<28} {subject:<28} {limits}")
            need = format_size(topo.storage_needed())
            print(f"replicas {topo.replicas or 1}, {need} of file store reserved per node")

    return run_service(go)


def cmd_status(args: argparse.Namespace) -> int:
    """Every stream and bucket of the prefix as the server has it: replicas, leader, lag, storage."""
    if _no_server(args):
        return fail(_NO_SERVER)
    rows: list[dict[str, Any]] = []

    async def go() -> None:
        async with cli_bus(args, "cadenza-status") as b:
            rows.extend(await _status_rows(b, args.timeout))

    code = run_service(go)
    if code:
        return code
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_status(rows)
    return 1 if any(r["state"] != "ok" for r in rows) else 0


async def _status_rows(b: bus.Bus, timeout: float) -> list[dict[str, Any]]:
    import bus
    from bus.transport import BUCKETS, STREAMS, stream_status

    topo = b.topology
    names = [(topo.stream_name(s.domain), "stream") for s in STREAMS]
    names += [(f"KV_{topo.bucket_name(k.key)}", "bucket") for k in BUCKETS]
    rows: list[dict[str, Any]] = []
    for name, kind in names:
        row: dict[str, Any] = {"name": name, "kind": kind}
        try:
            info = await stream_status(b, name, timeout=timeout)
        except bus.NotFoundError:
            rows.append({**row, "state": "missing (run `cadenza setup`)"})
            continue
        except bus.BusError as exc:
            why = exc.__cause__ or exc  # the engine's own words
            rows.append({**row, "state": f"no answer ({type(why).__name__}: {why})".replace(": )", ")")})
            continue
        followers = [
            {"name": p.name, "current": p.current, "offline": p.offline, "lag": p.lag, "active_s": p.active_s}
            for p in info.followers
        ]  # fmt: skip
        rows.append({
            **row, "state": "ok", "replicas": info.replicas, "leader": info.leader, "followers": followers,
            "messages": info.messages, "bytes": info.bytes, "max_bytes": info.max_bytes, "consumers": info.consumers,
        })  # fmt: skip
    return rows


def _print_status(rows: list[dict[str, Any]]) -> None:
    from bus.transport import format_size

    width = max(len(r["name"]) for r in rows)
    print(f"{'stream / bucket':<{width}}  replicas  {'leader':<20} {'messages':>9}  {'bytes / max':<22} "
          "consumers  followers")  # fmt: skip
    for r in rows:
        if r["state"] != "ok":
            print(f"{r['name']:<{width}}  {r['state']}")
            continue
        followers = (
            ", ".join(
                f"{f['name']} "
                + ("offline" if f["offline"] else "current" if f["current"] else f"lag {f['lag']}")
                + (f" (seen {f['active_s']:g}s ago)" if f["active_s"] is not None else "")
                for f in r["followers"]
            )
            or "-"
        )
        limit = "unlimited" if (r["max_bytes"] or -1) < 0 else format_size(r["max_bytes"])
        print(f"{r['name']:<{width}}  {r['replicas']:<8}  {r['leader'] or '-':<20} {r['messages']:>9}  "
              f"{format_size(r['bytes']) + ' / ' + limit:<22} {r['consumers']:<9}  {followers}")  # fmt: skip


# ------------------------------------------------------------------ dev


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded server (or ``--cluster N`` nodes) + recorder + broker + demo worker + web console, in the
    foreground."""
    import bus
    from bus.transport import EmbeddedCluster

    server: bus.EmbeddedServer | EmbeddedCluster
    if args.cluster and args.cluster not in (3, 5):
        return fail(f"--cluster takes 3 or 5 nodes (the streams get as many replicas), not {args.cluster}")
    if args.cluster:
        server = EmbeddedCluster(args.cluster, args.store, name="cadenza-dev")
    else:
        server = bus.EmbeddedServer(args.store, port=args.port)
    try:
        server.start()
    except bus.ServerStartError as exc:
        if args.port and not args.cluster:
            return fail(f"{exc} (is port {args.port} taken? use --port 0 for any free port)")
        return fail(str(exc))
    children: list[tuple[str, ChildProcess]] = []
    try:
        _print_dev_server(args, server)
        _start_dev_children(args, server.url, children)
        _print_dev_tips(args, server.url, children)
        return _run_dev(args, server, children)
    finally:
        for _, proc in reversed(children):
            proc.stop(timeout=10)
        server.stop()


def _print_dev_server(args: argparse.Namespace, server: bus.EmbeddedServer | EmbeddedCluster) -> None:
    from bus.transport import EmbeddedCluster

    if isinstance(server, EmbeddedCluster):
        print(f"{args.cluster}-node nats-server cluster (JetStream, replicas {args.cluster}), "
              f"store {server.store_root}:", flush=True)  # fmt: skip
        for node in server.nodes:
            print(f"  {node.server_name}: {node.url}", flush=True)
    else:
        print(f"nats-server (JetStream) on {server.url}, store {server.store_dir}", flush=True)


def _start_dev_children(args: argparse.Namespace, url: str, children: list[tuple[str, ChildProcess]]) -> None:
    """The recorder, the broker, the demo worker and the console, each as a child, added to ``children``
    as it starts (so an interrupted start stops those already running)."""
    from bus.transport import ChildProcess as Child

    # One key for every broker of this dev installation, so recreate tokens survive a broker restart.
    env = {"CADENZA_TOKEN_KEY": os.environ.get("CADENZA_TOKEN_KEY") or secrets.token_hex(32), "NATS_URL": url}
    if args.cluster:
        env["CADENZA_REPLICAS"] = str(args.cluster)
    wanted = [
        ("recorder", "services.recorder"),
        ("broker", "services.broker"),
        ("demo worker", "services.demo.worker"),
        ("console", "services.console"),
    ]
    # The console on its usual port, or any free one when the server's port is any free one too.
    extra = {"console": ("--port", "0" if args.port == 0 else str(args.console_port))}
    for label, module in wanted:
        if not _available(module):
            print(f"  {label}: not available in this build ({module} missing)", flush=True)
            continue
        proc = Child(module, "--server", url, "--prefix", args.prefix, *extra.get(label, ()), env=env)
        try:
            proc.start(timeout=30)
        except RuntimeError as exc:
            print(f"  {label}: failed to start\n{exc}", file=sys.stderr, flush=True)
            continue
        children.append((label, proc))
        print(f"  {label}: running (pid {proc.pid}) {proc.ready_line.removeprefix(READY).strip()}", flush=True)


def _print_dev_tips(args: argparse.Namespace, url: str, children: list[tuple[str, ChildProcess]]) -> None:
    prefix = "" if args.prefix == "cadenza" else f" --prefix {args.prefix}"
    print(f"\nexport NATS_URL={url}" + (f" CADENZA_REPLICAS={args.cluster}" if args.cluster else ""),
          flush=True)  # fmt: skip
    tips = [
        (f"cadenza demo{prefix}", "a tour: sessions, streamed output, a cancel, a lost worker"),
        (f"cadenza sessions ls{prefix}", "sessions, open first"),
        (f"cadenza workers ls{prefix}", "session workers and their slots"),
        (f"cadenza activities ls{prefix}", "tracked activities"),
        (f"cadenza tail 'activity.>'{prefix}", "events as they happen"),
    ]
    console = next((p.ready_line.split(" on ", 1)[1].split()[0] for n, p in children if n == "console"), "")
    if console:
        tips.insert(0, (console, "the web console (open it in a browser)"))
    width = max(len(cmd) for cmd, _ in tips)
    print("then, in another terminal:", flush=True)
    for cmd, what in tips:
        print(f"  {cmd:<{width}}  {what}", flush=True)


def _run_dev(
    args: argparse.Namespace, server: bus.EmbeddedServer | EmbeddedCluster, children: list[tuple[str, ChildProcess]]
) -> int:
    """Say ready, then watch the server and the children until a signal, ``--duration``, or one exits."""
    print(READY + " dev", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deadline = time.monotonic() + args.duration if args.duration else None
    while not stop.wait(0.5):
        if deadline is not None and time.monotonic() >= deadline:
            break
        if not server.is_running():
            return fail("a nats-server exited unexpectedly" if args.cluster else "nats-server exited unexpectedly")
        for label, proc in children:
            if proc.proc is not None and proc.proc.poll() is not None:
                tail = "".join(proc.output[-20:])
                return fail(f"{label} exited with code {proc.proc.returncode}:\n{tail}")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="cadenza",
        description="Sessions and tracked, cancellable activities over NATS JetStream.",
    )
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_local_commands(sub)
    _add_event_commands(sub)
    _add_admin_commands(sub)
    _add_dev_command(sub)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return p


def _add_local_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``server``, ``subjects``, ``schemas``: no connection needed."""
    s = sub.add_parser("server", help="run the embedded nats-server (JetStream) in the foreground")
    s.add_argument("--store", default=None, help="JetStream store directory (default: a temporary one)")
    s.add_argument("--port", type=int, default=4222, help="client port (0: any free port; default 4222)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("subjects", help="print the subjects, streams and buckets")
    s.add_argument("--prefix", default=os.environ.get("CADENZA_PREFIX", "cadenza"),
                   help="subject prefix (default: cadenza)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    s.set_defaults(func=cmd_subjects)

    s = sub.add_parser("schemas", help="export or check the JSON Schema files and the AsyncAPI document")
    s.add_argument("action", choices=("export", "check"), help="export: write the files; check: fail if stale")
    s.add_argument("--dir", default=None, help="directory (check: default schemas/json of the package; "
                   "export: default ./schemas/json if it exists)")  # fmt: skip
    s.add_argument("--asyncapi", default=None, help="AsyncAPI file (default: asyncapi.json beside the --dir "
                   "directory; check: the package's)")  # fmt: skip
    s.set_defaults(func=cmd_schemas)


def _add_event_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``publish`` and ``tail``."""
    s = sub.add_parser("publish", help="validate an event and publish it")
    s.add_argument("event", metavar="EVENT", help="event type, e.g. activity.started (see `cadenza subjects`)")
    s.add_argument("json", metavar="JSON", help="the event as JSON, @file, or - for stdin")
    add_server_args(s)
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("tail", help="follow events on a subject (live)")
    s.add_argument("subject", metavar="SUBJECT", help="subject or wildcard, with or without the prefix ('activity.>')")
    s.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"subject": ..., "time": ..., "event": {...}}')  # fmt: skip
    history = s.add_mutually_exclusive_group()
    history.add_argument("--since", type=_duration, default=None, metavar="DURATION",
                         help="first the events stored in the last DURATION (30s, 10m, 2h, 1d), then live")  # fmt: skip
    history.add_argument("--all", action="store_true", help="first every stored event (dead letters too), then live")
    s.add_argument("--count", type=int_arg(0), default=0, help="stop after this many messages (0: never)")
    s.add_argument("--timeout", type=float_arg(0), default=0, help="stop after this many seconds (0: never)")
    add_reconnect_args(s)
    add_server_args(s)
    s.set_defaults(func=cmd_tail)


def _add_admin_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``setup`` and ``status``."""
    s = sub.add_parser("setup", help="declare or upgrade the streams and buckets (run as the admin user)")
    add_server_args(s)
    s.add_argument("--replicas", type=int, choices=(1, 3, 5), default=None,
                   help="stream and bucket replicas, 3 on a cluster (default: $CADENZA_REPLICAS, else 1)")  # fmt: skip
    s.add_argument("--storage", default=None, metavar="SIZE",
                   help="file store all streams and buckets may reserve per node, e.g. 4GiB, split in the default "
                        "proportions (default: $CADENZA_STORAGE, else 19 GiB)")  # fmt: skip
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("status", help="streams and buckets as the server has them: replicas, leader, lag, storage")
    add_server_args(s)
    s.add_argument("--json", action="store_true", help="print every stream and bucket as JSON")
    s.add_argument("--timeout", type=float_arg(0.1), default=2.0,
                   help="seconds to wait for each stream's answer (default 2; connecting waits 2 s)")  # fmt: skip
    s.set_defaults(func=cmd_status)


def _add_dev_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("dev", help="embedded server + recorder + broker + demo worker + console, in the foreground")
    s.add_argument("--store", default=None, help="JetStream store directory (default: a temporary one)")
    s.add_argument("--port", type=int, default=4222, help="client port (0: any free port; default 4222)")
    s.add_argument("--prefix", default=os.environ.get("CADENZA_PREFIX", "cadenza"),
                   help="subject prefix (default: cadenza)")  # fmt: skip
    s.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    s.add_argument("--cluster", type=int, default=0, metavar="N",
                   help="start an N-node loopback cluster (3 or 5; free ports, streams with N replicas) instead of "
                        "one server; --port is then ignored")  # fmt: skip
    s.add_argument("--console-port", type=int, default=8765, help="the web console's port (default 8765)")
    s.set_defaults(func=cmd_dev)


def _duration(value: str) -> float:
    from ._tail import duration_arg

    return duration_arg(value)


class _Version(argparse.Action):
    """``--version``: reads the installed distribution's version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"cadenza {version('cadenza')}")
        except PackageNotFoundError:
            print("cadenza (not installed: running from a source tree)")
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_process(args.command, args, one_shot=args.command not in _LONG_RUNNING)
    try:
        code: int = args.func(args)
    except SystemExit:
        raise
    except Exception as exc:  # the last net: a command never ends in a traceback
        import logging

        logging.getLogger("cadenza").debug("unexpected error", exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        return fail(f"unexpected {type(exc).__name__}: {first} (CADENZA_LOG=debug shows where)")
    finally:
        stop_process()
    return code


if __name__ == "__main__":
    sys.exit(main())
