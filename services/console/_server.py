"""Serving the console: its caches and the web app (uvicorn) in one event loop, on one socket.

:func:`running_console` is what ``cadenza console``, the tests and the benchmark use: it loads the
caches, binds the socket (port 0: any free one), serves until the block exits, then stops uvicorn
(open event streams are closed after a second) before the caches.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass

import anyio
import uvicorn

import bus

from ._app import ConsoleOptions, create_app
from ._state import ConsoleConfig, ConsoleState

__all__ = ("RunningConsole", "is_loopback", "running_console")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the process's runner owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class RunningConsole:
    url: str
    state: ConsoleState
    server: uvicorn.Server


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it (Linux): small responses are not held back by Nagle + delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise bus.BusError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running_console(
    b: bus.Bus,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    options: ConsoleOptions | None = None,
    config: ConsoleConfig | None = None,
) -> AsyncIterator[RunningConsole]:
    """Serve the console on ``host:port`` for the duration of the block.

    Raises:
        BusError: the socket cannot be bound, or a cache cannot be loaded.
    """
    options = options or ConsoleOptions()
    if not options.token and not is_loopback(host):
        raise bus.BusError(f"{host} is not a loopback address: a token is needed to serve other hosts")
    state = ConsoleState(b, config or ConsoleConfig())
    sock = _bind(host, port)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(state.run)
            server = _Server(uvicorn.Config(
                create_app(state, options), log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
                access_log=False, ws="none",
            ))  # fmt: skip
            stopped = anyio.Event()

            async def serve() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    stopped.set()

            tg.start_soon(serve)
            with anyio.fail_after(b.timeouts.server_start):
                while not server.started and not stopped.is_set():  # noqa: ASYNC110 - uvicorn has no ready event
                    await anyio.sleep(0.01)
            if not server.started:
                raise bus.BusError("the console's web server did not start")
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            try:
                yield RunningConsole(f"http://{shown}:{bound[1]}", state, server)
            finally:
                server.should_exit = True
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await stopped.wait()
                tg.cancel_scope.cancel()
    finally:
        sock.close()
