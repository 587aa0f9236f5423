"""``cadenza console``: the web console (``python -m services.console`` runs the same)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._runtime import add_server_args, announce_ready, run_service

__all__ = ("build_parser", "cmd_console", "main", "register")

#: ``cadenza console``'s port when none is given.
DEFAULT_PORT = 8765


def add_console_args(p: argparse.ArgumentParser) -> None:
    add_server_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback; others need --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (0: any free one; default {DEFAULT_PORT})")
    p.add_argument("--token", default=os.environ.get("CADENZA_CONSOLE_TOKEN", ""),
                   help="required on every request (default: $CADENZA_CONSOLE_TOKEN); needed off loopback")  # fmt: skip
    p.add_argument("--read-only", action="store_true", help="hide Cancel; the cancel endpoint answers 403")


def cmd_console(args: argparse.Namespace) -> int:
    import anyio

    import bus
    from bus.transport import serve_service_info

    from ._app import ConsoleOptions
    from ._server import is_loopback, running_console

    if not is_loopback(args.host) and not args.token:
        print(f"cadenza console: --host {args.host} is not loopback: pass --token or set CADENZA_CONSOLE_TOKEN "
              "(every request must then carry it)", file=sys.stderr)  # fmt: skip
        return 2
    if not 0 <= args.port <= 65535:
        print(f"cadenza console: --port must be from 0 to 65535, not {args.port}", file=sys.stderr)
        return 2
    if not (args.server or os.environ.get("NATS_URL")):
        print("cadenza console: no server given; pass --server nats://host:port or set NATS_URL "
              "(`cadenza dev` starts a console of its own)", file=sys.stderr)  # fmt: skip
        return 2
    options = ConsoleOptions(token=args.token, read_only=args.read_only)

    async def go() -> None:
        async with bus.connect(args.server, prefix=args.prefix, name="console") as b, anyio.create_task_group() as tg:
            await tg.start(serve_service_info, b, "console")
            async with running_console(b, host=args.host, port=args.port, options=options) as console:
                hint = "  (open it once with ?token=<token>)" if args.token else ""
                ro = " read-only" if args.read_only else ""
                announce_ready(f"console on {console.url}/{ro}{hint}")
                await anyio.sleep_forever()

    return run_service(go)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``console`` to the ``cadenza`` command line."""
    p = sub.add_parser("console", help="the web console: workers, sessions, activities, dead letters, health (live)")
    add_console_args(p)
    p.set_defaults(func=cmd_console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.console", description="the cadenza web console")
    add_console_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cmd_console(build_parser().parse_args(argv))
