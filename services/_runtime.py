"""What every service process shares: argument parsing for the server, signals, the ready line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

import bus
from bus._service_info import serve_service_info

__all__ = ("READY", "add_server_args", "announce_ready", "run_service", "service_bus")

#: Printed on stdout once a service serves; tests and ``cadenza dev`` wait for it.
READY = "cadenza: ready"


def add_server_args(p: argparse.ArgumentParser) -> None:
    """``--server`` and ``--prefix``, shared by every command that talks to NATS."""
    p.add_argument("--server", "-s", default=None, help="NATS URL(s), comma-separated (default: $NATS_URL)")
    p.add_argument(
        "--prefix", default=os.environ.get("CADENZA_PREFIX", "cadenza"), help="subject prefix (default: cadenza)"
    )


def announce_ready(what: str) -> None:
    print(f"{READY} {what}", flush=True)


@asynccontextmanager
async def service_bus(args: argparse.Namespace, name: str, *, embedded_ok: bool = False) -> AsyncIterator[bus.Bus]:
    """Connect as a service: ``--server``, else ``NATS_URL``; refuse to start an embedded server
    unless ``embedded_ok`` (a service alone on its own private server is useless)."""
    if not (args.server or os.environ.get("NATS_URL")) and not embedded_ok:
        raise SystemExit(f"cadenza {name}: no server given; pass --server nats://host:port or set NATS_URL")
    async with bus.connect(args.server, prefix=args.prefix, name=name) as b, anyio.create_task_group() as tg:
        # Every service answers <prefix>.rpc.services.info (the console's Health page lists them).
        await tg.start(serve_service_info, b, name)
        yield b
        tg.cancel_scope.cancel()


def run_service(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` until it returns or SIGTERM/SIGINT arrives (then cancel it: graceful stop)."""
    logging.basicConfig(
        level=os.environ.get("CADENZA_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    async def runner() -> None:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signals)
            await main()
            tg.cancel_scope.cancel()

    try:
        anyio.run(runner)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        errors = _cadenza_errors(exc)
        if not errors:
            raise
        for err in errors:
            print(f"cadenza: {err}", file=sys.stderr)
        return 1
    return 0


def _cadenza_errors(exc: BaseException) -> list[bus.CadenzaError]:
    """The cadenza errors in ``exc`` (looking inside exception groups), or [] if anything else is there."""
    if isinstance(exc, bus.CadenzaError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[bus.CadenzaError] = []
        for inner in exc.exceptions:
            sub = _cadenza_errors(inner)
            if not sub:
                return []
            found += sub
        return found
    return []
