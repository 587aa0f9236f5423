"""The server killed under a running consumer; processes that die; connection errors; topology upgrades."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import pytest

import bus
from bus.testing import eventually, unique_prefix

from ._events import Ping


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_server_killed_and_restarted_loses_no_acknowledged_event_and_repeats_none() -> None:
    server = bus.EmbeddedServer()
    server.start()
    try:
        handled: Counter[str] = Counter()
        published: list[str] = []

        async def handler(ev: Ping, d: bus.Delivery) -> None:
            handled[ev.event_id] += 1

        timeouts = bus.Timeouts(publish=1.0, publish_retries=20, ack=2.0, fetch=0.5)
        async with bus.connect(server.url, prefix=unique_prefix(), timeouts=timeouts) as b:
            spec = bus.ConsumerSpec("survivor", b.subjects.filter("session"))

            async def publisher(n: int) -> None:
                for i in range(n):
                    ev = Ping(n=i)
                    await b.publish(ev)  # returns only once the server stored it
                    published.append(ev.event_id)

            async with anyio.create_task_group() as tg:
                await tg.start(b.consume, spec, [Ping], handler)
                await publisher(200)
                await eventually(lambda: b.stats.handled == 200, what="first batch handled")
                # Kill while a publisher and the consumer are both busy.
                pub = anyio.Event()

                async def busy() -> None:
                    await publisher(300)
                    pub.set()

                tg.start_soon(busy)
                await eventually(lambda: len(published) >= 260)
                server.kill()
                await anyio.to_thread.run_sync(time.sleep, 0.5)
                server.restart()
                with anyio.fail_after(60):
                    await pub.wait()
                await eventually(lambda: set(published) <= set(handled), timeout=30, what="all acked events handled")
                tg.cancel_scope.cancel()
        assert len(published) == 500
        twice = [eid for eid, n in handled.items() if n > 1]
        assert twice == [], f"{len(twice)} events handled twice after the restart"
    finally:
        server.stop()


def _wait_gone(pid: int, what: str) -> None:
    """Wait (10 s at most) until process ``pid`` is gone (from a sync test: its own event loop)."""
    anyio.run(partial(eventually, lambda: not _alive(pid), timeout=10, interval=0.05, what=what))


def test_no_orphan_server_when_its_owner_is_killed(tmp_path: Path) -> None:
    code = (
        f"import sys, time; sys.path.insert(0, {os.getcwd()!r})\n"
        "from bus import EmbeddedServer\n"
        f"s = EmbeddedServer({str(tmp_path)!r}); s.start(); print(s.pid, flush=True); time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    server_pid = int(owner.stdout.readline())
    assert _alive(server_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    _wait_gone(server_pid, "nats-server outlived the process that started it")


def test_no_orphan_server_when_its_owner_exits_without_stopping_it(tmp_path: Path) -> None:
    code = (
        f"import sys; sys.path.insert(0, {os.getcwd()!r})\n"
        "from bus import EmbeddedServer\n"
        f"s = EmbeddedServer({str(tmp_path)!r}); s.start(); print(s.pid, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    server_pid = int(out.stdout.split()[0])
    _wait_gone(server_pid, "nats-server outlived the owner that exited without stopping it")


async def test_connect_error_names_the_url_when_no_server_answers() -> None:
    with anyio.fail_after(10), pytest.raises(bus.ConnectError, match=r"nats://127\.0\.0\.1:1\b"):
        async with bus.connect("nats://127.0.0.1:1", timeouts=bus.Timeouts(connect=1.0)):
            pass


async def test_given_server_url_is_used_and_nothing_is_started(
    nats_server: bus.EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    async with bus.connect(prefix=unique_prefix()) as b:
        assert b.server is None
        assert b.url.endswith(str(nats_server.port))


async def test_without_a_url_the_embedded_server_is_started_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    async with bus.connect(prefix=unique_prefix()) as b:
        assert b.server is not None and b.server.is_running()
        owned = b.server
    assert not owned.is_running()


async def test_topology_is_idempotent_and_upgrades_limits_without_losing_data(
    cadenza_bus: bus.Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    topo = cadenza_bus.topology
    await topo.ensure(cadenza_bus.js)  # second run: nothing to do, no error
    await cadenza_bus.publish(Ping(n=1))
    import bus.transport._topology as t

    changed = tuple(
        s if s.domain != "session" else t.StreamSpec(s.domain, s.description, max_age=3 * t.DAY, max_bytes=s.max_bytes)
        for s in t.STREAMS
    )
    monkeypatch.setattr(t, "STREAMS", changed)
    await topo.ensure(cadenza_bus.js)
    info = await cadenza_bus.js.stream_info(topo.stream_name("session"))
    assert info.config.max_age == 3 * t.DAY
    assert info.state.messages == 1


async def test_topology_refuses_a_change_the_server_cannot_make_in_place(
    cadenza_bus: bus.Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nats.js.api import RetentionPolicy

    import bus.transport._topology as t

    changed = tuple(
        s
        if s.domain != "session"
        else t.StreamSpec(s.domain, "x", s.max_age, s.max_bytes, retention=RetentionPolicy.WORK_QUEUE)
        for s in t.STREAMS
    )
    monkeypatch.setattr(t, "STREAMS", changed)
    with pytest.raises(bus.TopologyError, match="SESSION"):
        await cadenza_bus.topology.ensure(cadenza_bus.js)
