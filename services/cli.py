"""The ``cadenza`` command line.

Commands of the foundation live here (server, subjects, schemas, publish, tail, dev); the
services add theirs (recorder/activities, broker/worker/sessions/workers/demo) through a
``register(subparsers)`` function in their ``_cli`` module.
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
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

import bus
import schemas
from bus._process import ChildProcess as Child

from ._runtime import READY, add_server_args, run_service

__all__ = ("build_parser", "main")

#: Modules that add subcommands; a missing one is skipped (its service is not installed).
_COMMAND_MODULES = (
    "services.recorder._cli", "services.broker._cli", "services.demo._cli", "services.console._cli",
)  # fmt: skip


def _fail(message: str) -> int:
    print(f"cadenza: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ server


def cmd_server(args: argparse.Namespace) -> int:
    server = bus.EmbeddedServer(args.store, port=args.port, host=args.host)
    try:
        server.start()
    except bus.ServerStartError as exc:
        return _fail(str(exc))
    print(f"nats-server (JetStream) on {server.url}, store {server.store_dir}", flush=True)
    print(f"export NATS_URL={server.url}", flush=True)
    print(READY, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                return _fail("nats-server exited unexpectedly; see its log in " + str(server.store_dir))
    finally:
        server.stop()
    return 0


# ------------------------------------------------------------------ subjects / schemas


def cmd_subjects(args: argparse.Namespace) -> int:
    topo = bus.Topology(args.prefix, replicas=1)
    rows = topo.table()
    if args.json:
        print(json.dumps([dict(zip(("subject", "stream", "limits", "what"), r, strict=True)) for r in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'subject':<{widths[0]}}  {'stream / bucket':<{widths[1]}}  {'limits':<{widths[2]}}  what")
    for subject, stream, limits, what in rows:
        print(f"{subject:<{widths[0]}}  {stream:<{widths[1]}}  {limits:<{widths[2]}}  {what}")
    print()
    print("event types (subject <prefix>.<domain>.<id>.<event>):")
    for name, cls in schemas.event_types().items():
        print(f"  {name:<24} {cls.subject_pattern().replace('<prefix>', args.prefix)}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else schemas.JSON_DIR
    differ = schemas.export_json_schemas(directory, check=args.action == "check")
    if args.action == "check":
        if differ:
            print("schemas/json is stale; run `cadenza schemas export`. Differs: " + ", ".join(differ))
            return 1
        print(f"schemas/json is current ({len(schemas.event_types())} event types)")
        return 0
    print(
        f"wrote {len(schemas.event_types())} schema files to {directory}"
        + (f" ({len(differ)} changed)" if differ else "")
    )
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
    cls = schemas.lookup_event_type(args.event)
    if cls is None:
        known = ", ".join(schemas.event_types())
        return _fail(f"unknown event type {args.event!r}; known types: {known}")
    try:
        text = _read_json_arg(args.json)
    except OSError as exc:
        return _fail(f"cannot read {args.json[1:]!r}: {exc}")
    try:
        event = bus.decode(text.encode(), None, [cls])
    except bus.ValidationError as exc:
        hint = f" (the JSON Schema is schemas/json/{args.event}.json)"
        return _fail(f"{exc.message}{hint}")
    if _no_server(args):
        return _fail(_NO_SERVER)

    async def go() -> None:
        async with bus.connect(args.server, prefix=args.prefix, name="cadenza-cli") as b:
            result = await b.publish(event)
            dup = " (duplicate: already stored)" if result.duplicate else ""
            print(
                f"published {event.type} {event.event_id} to {b.subject_of(event)}: {result.stream} #{result.seq}{dup}"
            )

    return run_service(go)


def _readable(subject: str, data: bytes) -> str:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    try:
        body: Any = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{stamp} {subject} <{len(data)} bytes, not JSON>"
    if not isinstance(body, dict):
        return f"{stamp} {subject} {json.dumps(body)[:200]}"
    skip = {"event_id", "type", "schema_version", "time", "source"}
    fields = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))[:120]}" for k, v in body.items() if k not in skip)
    return f"{stamp} {subject} [{body.get('type', '?')}] {fields}"


def cmd_tail(args: argparse.Namespace) -> int:
    if _no_server(args):
        return _fail(_NO_SERVER)
    subject = args.subject
    if not subject.startswith(args.prefix + ".") and not subject.startswith("$"):
        subject = f"{args.prefix}.{subject}"

    async def go() -> None:
        async with bus.connect(args.server, prefix=args.prefix, name="cadenza-tail", ensure_topology=False) as b:
            sub = await b.nc.subscribe(subject)
            print(f"following {subject} on {b.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            seen = 0
            with anyio.move_on_after(args.timeout) if args.timeout else anyio.CancelScope():
                async for msg in sub.messages:
                    if args.json:
                        print(msg.data.decode(errors="replace"), flush=True)
                    else:
                        print(_readable(msg.subject, msg.data), flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        break
            await sub.unsubscribe()

    return run_service(go)


# ------------------------------------------------------------------ setup


def cmd_setup(args: argparse.Namespace) -> int:
    """Declare (or upgrade) every stream and bucket: run once as the admin user."""
    if _no_server(args):
        return _fail(_NO_SERVER)

    async def go() -> None:
        async with bus.connect(args.server, prefix=args.prefix, name="cadenza-setup") as b:
            for subject, stream, limits, _ in b.topology.table():
                print(f"ok  {stream:<28} {subject:<28} {limits}")

    return run_service(go)


# ------------------------------------------------------------------ dev


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded server + recorder + broker + demo worker + web console, in the foreground."""
    server = bus.EmbeddedServer(args.store, port=args.port)
    try:
        server.start()
    except bus.ServerStartError as exc:
        if args.port:
            return _fail(f"{exc} (is port {args.port} taken? use --port 0 for any free port)")
        return _fail(str(exc))
    # One key for every broker of this dev installation, so recreate tokens survive a broker restart.
    env = {"CADENZA_TOKEN_KEY": os.environ.get("CADENZA_TOKEN_KEY") or secrets.token_hex(32), "NATS_URL": server.url}
    wanted = [
        ("recorder", "services.recorder"),
        ("broker", "services.broker"),
        ("demo worker", "services.demo.worker"),
        ("console", "services.console"),
    ]
    # The console on its usual port, or any free one when the server's port is any free one too.
    extra = {"console": ("--port", "0" if args.port == 0 else str(args.console_port))}
    children: list[tuple[str, Child]] = []
    print(f"nats-server (JetStream) on {server.url}, store {server.store_dir}", flush=True)
    try:
        for label, module in wanted:
            if not _available(module):
                print(f"  {label}: not available in this build ({module} missing)", flush=True)
                continue
            proc = Child(module, "--server", server.url, "--prefix", args.prefix, *extra.get(label, ()), env=env)
            try:
                proc.start(timeout=30)
            except RuntimeError as exc:
                print(f"  {label}: failed to start\n{exc}", file=sys.stderr, flush=True)
                continue
            children.append((label, proc))
            print(f"  {label}: running (pid {proc.pid}) {proc.ready_line.removeprefix(READY).strip()}", flush=True)
        prefix = "" if args.prefix == "cadenza" else f" --prefix {args.prefix}"
        print(f"\nexport NATS_URL={server.url}", flush=True)
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
        print(READY + " dev", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not server.is_running():
                return _fail("nats-server exited unexpectedly")
            for label, proc in children:
                if proc.proc is not None and proc.proc.poll() is not None:
                    tail = "".join(proc.output[-20:])
                    return _fail(f"{label} exited with code {proc.proc.returncode}:\n{tail}")
    finally:
        for _, proc in reversed(children):
            proc.stop(timeout=10)
        server.stop()
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cadenza",
        description="Sessions and tracked, cancellable activities over NATS JetStream.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("server", help="run the embedded nats-server (JetStream) in the foreground")
    s.add_argument("--store", default=None, help="JetStream store directory (default: a temporary one)")
    s.add_argument("--port", type=int, default=4222, help="client port (0: any free port; default 4222)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("subjects", help="print the subjects, streams and buckets")
    s.add_argument("--prefix", default=os.environ.get("CADENZA_PREFIX", "cadenza"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_subjects)

    s = sub.add_parser("schemas", help="export or check the JSON Schema files")
    s.add_argument("action", choices=("export", "check"))
    s.add_argument("--dir", default=None, help="directory (default: schemas/json in the package)")
    s.set_defaults(func=cmd_schemas)

    s = sub.add_parser("publish", help="validate an event and publish it")
    s.add_argument("event", metavar="EVENT", help="event type, e.g. activity.started (see `cadenza subjects`)")
    s.add_argument("json", metavar="JSON", help="the event as JSON, @file, or - for stdin")
    add_server_args(s)
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("tail", help="follow events on a subject (live)")
    s.add_argument("subject", metavar="SUBJECT", help="subject or wildcard, with or without the prefix ('activity.>')")
    s.add_argument("--json", action="store_true", help="print raw JSON lines")
    s.add_argument("--count", type=int, default=0, help="stop after this many messages")
    s.add_argument("--timeout", type=float, default=0, help="stop after this many seconds")
    add_server_args(s)
    s.set_defaults(func=cmd_tail)

    s = sub.add_parser("setup", help="declare or upgrade the streams and buckets (run as the admin user)")
    add_server_args(s)
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("dev", help="embedded server + recorder + broker + demo worker + console, in the foreground")
    s.add_argument("--store", default=None, help="JetStream store directory (default: a temporary one)")
    s.add_argument("--port", type=int, default=4222, help="client port (0: any free port; default 4222)")
    s.add_argument("--prefix", default=os.environ.get("CADENZA_PREFIX", "cadenza"))
    s.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    s.add_argument("--console-port", type=int, default=8765, help="the web console's port (default 8765)")
    s.set_defaults(func=cmd_dev)

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
