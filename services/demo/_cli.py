"""``cadenza demo``: the scripted scenario against a running ``cadenza dev``."""

from __future__ import annotations

import argparse
import os

from .._runtime import add_server_args, cli_bus, float_arg, run_service

__all__ = ("cmd_demo", "register")


def cmd_demo(args: argparse.Namespace) -> int:
    from ._scenario import DemoConfig, DemoFailed, print_error, run_demo

    if not (args.server or os.environ.get("NATS_URL")):
        print_error("no server given: start `cadenza dev` and pass --server nats://host:port (or set NATS_URL) "
                    "as it prints")  # fmt: skip
        return 2
    config = DemoConfig(tasklist=args.tasklist, pace=args.pace, heartbeat_timeout=args.heartbeat_timeout,
                        server=args.server or "", wait=args.wait)  # fmt: skip
    failed: list[str] = []

    async def go() -> None:
        async with cli_bus(args, "cadenza-demo", ensure_topology=True) as b:
            try:
                await run_demo(b, config)
            except DemoFailed as exc:
                failed.append(str(exc))

    code = run_service(go)
    if failed:
        print_error(failed[0])
        return 1
    return code


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``demo`` to the ``cadenza`` command line."""
    p = sub.add_parser("demo", help="a scripted tour of sessions and activities (run `cadenza dev` first)")
    add_server_args(p)
    p.add_argument("--tasklist", default="demo", help="the demo worker's tasklist (default: demo)")
    p.add_argument("--pace", type=float_arg(0), default=1.5, help="seconds to pause between steps (default 1.5)")
    p.add_argument("--heartbeat-timeout", type=float_arg(0.1), default=3.0,
                   help="the sessions' heartbeat_timeout: how fast a killed worker is noticed (default 3)")  # fmt: skip
    p.add_argument("--wait", type=float_arg(0.1), default=15.0,
                   help="seconds to wait for the broker to see the demo's own worker (default 15)")  # fmt: skip
    p.set_defaults(func=cmd_demo)
