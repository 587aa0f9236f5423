"""Child processes of the benchmark: started from the main thread, tied to its life, always reaped.

Like :class:`bus.testing.ServiceProcess` (``python -m <module>``, ready when a line containing the
marker is printed, SIGKILL-able), but started without blocking so that ten workers come up at once.
Every child gets ``PR_SET_PDEATHSIG``: it dies with the benchmark even if the benchmark is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import anyio

from bus.transport import die_with_parent

from ._common import rss_mb

__all__ = ("Proc", "start_all", "stop_all")

READY = "cadenza: ready"


class Proc:
    """One child process (a Python module or any command) whose output is kept for error messages."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        ready_marker: str | None = READY,
        name: str = "",
    ) -> None:
        self.argv = list(argv)
        self.env = env or {}
        self.ready_marker = ready_marker
        self.name = name or os.path.basename(self.argv[0])
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._ready = threading.Event()

    @classmethod
    def module(cls, module: str, *args: str, env: dict[str, str] | None = None, name: str = "") -> Proc:
        return cls([sys.executable, "-m", module, *args], env=env, name=name or module)

    def launch(self) -> Proc:
        """Start the process (must run on the main thread: PR_SET_PDEATHSIG follows the forking thread)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        threading.Thread(target=self._read, daemon=True, name=f"out-{self.name}").start()
        if self.ready_marker is None:
            self._ready.set()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if len(self.output) > 400:
                del self.output[:200]
            if self.ready_marker is not None and self.ready_marker in line:
                self._ready.set()

    async def ready(self, timeout: float = 30.0) -> Proc:
        """Wait for the ready line; kill the process and raise with its output if it never comes."""
        with anyio.move_on_after(timeout):
            while not self._ready.is_set():
                if self.proc is not None and self.proc.poll() is not None:
                    break
                await anyio.sleep(0.01)
        if not self._ready.is_set():
            tail = "".join(self.output[-30:])
            code = self.proc.poll() if self.proc is not None else None
            self.kill()
            why = f"exited with code {code}" if code is not None else f"was not ready after {timeout:g}s"
            # The last lines first: the harness keeps only the start of a message in its table.
            last = " | ".join(line.strip() for line in self.output[-3:])
            raise RuntimeError(f"{self.name} {why}: {last}\noutput:\n{tail}")
        return self

    def fresh(self) -> Proc:
        """A new, not yet launched process with the same command (to replace one that died)."""
        return Proc(self.argv, env=self.env, ready_marker=self.ready_marker, name=self.name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> float:
        return rss_mb(self.pid)

    def kill(self) -> None:
        """SIGKILL, no chance to clean up (a lost worker)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def start_all(procs: Sequence[Proc], timeout: float = 60.0) -> list[Proc]:
    """Launch every process, then wait for all of them to be ready; on failure none is left running."""
    try:
        for p in procs:
            p.launch()
        for p in procs:
            await p.ready(timeout)
    except BaseException:
        stop_all(procs, timeout=1.0)
        raise
    return list(procs)


def stop_all(procs: Sequence[Proc], timeout: float = 5.0) -> None:
    """Stop processes together: SIGTERM to all, then wait, then SIGKILL what is left."""
    live = [p for p in procs if p.alive]
    for p in live:
        assert p.proc is not None
        p.proc.send_signal(signal.SIGTERM)
    for p in live:
        assert p.proc is not None
        try:
            p.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
