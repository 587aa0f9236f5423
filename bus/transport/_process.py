"""A Python module in a child process that announces itself with a ready line (``cadenza dev``,
``cadenza demo``, and ``bus.testing.ServiceProcess`` for fault tests); no pytest needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from ._server import die_with_parent

__all__ = ("ChildProcess",)


class ChildProcess:
    """``python -m <module> <args>``; :meth:`start` waits for a stdout line containing ``ready_marker``.

    The child gets SIGKILL when this process dies (Linux), so a killed ``cadenza dev`` leaves nothing
    behind. Its output is kept in :attr:`output` (and echoed with ``echo``).
    """

    def __init__(
        self,
        module: str,
        *args: str,
        env: dict[str, str] | None = None,
        ready_marker: str = "cadenza: ready",
        echo: bool = False,
    ) -> None:
        self.module = module
        self.args = args
        self.env = env or {}
        self.ready_marker = ready_marker
        self.echo = echo
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.ready_line = ""
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ChildProcess:
        """Start it and wait for the ready line.

        Raises:
            RuntimeError: it exited or was not ready within ``timeout`` (the message holds its output).
        """
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            # Dies with the thread that started it (PR_SET_PDEATHSIG): nothing outlives its parent.
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        self._ready.clear()
        self.ready_line = ""
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{self.module}-output")
        self._reader.start()
        if not self._ready.wait(timeout) or not self.ready_line:
            out = "".join(self.output[-40:])
            self.kill()
            raise RuntimeError(f"{self.module} was not ready after {timeout:g}s; output:\n{out}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if self.echo:
                print(line, end="", file=sys.stderr, flush=True)
            if not self.ready_line and self.ready_marker in line:
                self.ready_line = line.strip()
                self._ready.set()
        self._ready.set()  # exited: start() stops waiting

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (no ``worker.stopped``, no last heartbeat)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
