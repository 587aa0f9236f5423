"""Fixtures of the whole suite (on top of the ``bus.testing`` plugin's) and the leak check at its end."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import EmbeddedServer

# bus.testing is not imported here: a plugin imported before pytest registers it is not assert-rewritten.
pytest_plugins = ["bus.testing"]


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this test alone, to kill and restart on its store."""
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _children_named(names: tuple[str, ...]) -> list[str]:
    """Live processes whose parent is this test process and whose command matches ``names``."""
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], fields[1]
        if ppid == me and state != "Z" and any(n in cmdline for n in names):
            found.append(f"{stat.parent.name}: {cmdline.strip()[:120]}")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No nats-server, broker, recorder or worker started by the tests may outlive them."""
    if not Path("/proc").is_dir():
        return
    left = _children_named(("nats-server", "services.broker", "services.recorder", "services.demo", "cadenza"))
    if left:
        print("\nprocesses left running by the tests:\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
