"""Clusters: deploy/nats/cluster.conf forms one, EmbeddedCluster elects and re-elects a meta leader,
streams get 3 real replicas, storage limits are configurable and a refusal says what to do, and
``cadenza status`` shows replicas, leaders and storage (or one line when the server is down)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest

import bus
from bus.testing import EmbeddedCluster, ExternalServer, eventually, unique_prefix
from bus.transport._server import _free_port, _free_ports, die_with_parent
from bus.transport._topology import BUCKETS, DEFAULT_STORAGE, MIN_BYTES, STREAMS, parse_size

DEPLOY = Path(__file__).parent.parent / "deploy" / "nats"
USERS = ("admin", "broker", "recorder", "worker", "caller")


def cadenza(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "CADENZA_REPLICAS", "CADENZA_STORAGE")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "services", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def _jsz(monitor: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{monitor}/jsz", timeout=2) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


# ---------------------------------------------------------------- deploy/nats/cluster.conf


@pytest.fixture
def conf_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], list[str]]]:
    """Three nats-server processes started from deploy/nats/cluster.conf on loopback free ports,
    each with its own environment; yields (urls, passwords, monitor addresses)."""
    for f in DEPLOY.glob("*.conf"):
        shutil.copy(f, tmp_path / f.name)
    passwords = {u: secrets.token_hex(12) for u in USERS}
    ports = _free_ports("127.0.0.1", 9)
    client, route, monitor = ports[:3], ports[3:6], ports[6:]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            env = {
                **os.environ, **{f"CADENZA_{u.upper()}_PASSWORD": p for u, p in passwords.items()},
                "NODE_NAME": f"cadenza-{i + 1}", "NATS_HOST": "127.0.0.1", "NATS_PORT": str(client[i]),
                "NATS_MONITOR": f"127.0.0.1:{monitor[i]}", "CLUSTER_HOST": "127.0.0.1", "CLUSTER_PORT": str(route[i]),
                "STORE_DIR": str(tmp_path / f"store-{i + 1}"),
                **{f"ROUTE_{j + 1}": f"nats-route://127.0.0.1:{route[j]}" for j in range(3)},
            }  # fmt: skip
            log = open(tmp_path / f"node-{i + 1}.log", "wb")
            procs.append(subprocess.Popen(
                [bus.find_server_binary(), "-c", str(tmp_path / "cluster.conf")], env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            ))  # fmt: skip
            log.close()
        yield ",".join(f"nats://127.0.0.1:{p}" for p in client), passwords, [f"127.0.0.1:{m}" for m in monitor]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _meta_leaders(monitors: list[str]) -> set[str]:
    leaders = set()
    for m in monitors:
        try:
            leaders.add(str((_jsz(m).get("meta_cluster") or {}).get("leader") or ""))
        except OSError:
            leaders.add("")
    return leaders


async def _agreed_meta_leader(monitors: list[str], logs: Path, timeout: float = 60) -> set[str]:
    leaders: set[str] = set()

    async def agreed() -> bool:
        nonlocal leaders
        leaders = await anyio.to_thread.run_sync(_meta_leaders, monitors)
        return len(leaders) == 1 and "" not in leaders

    def why() -> str:
        tails = "\n".join(p.read_text(errors="replace")[-600:] for p in sorted(logs.glob("node-*.log")))
        return f"no agreed JetStream meta leader: {leaders}\n{tails}"

    await eventually(agreed, timeout=timeout, interval=0.2, what=why)
    return leaders


async def test_cluster_conf_forms_a_cluster_that_stores_replicas_3(
    conf_cluster: tuple[str, dict[str, str], list[str]], tmp_path: Path
) -> None:
    urls, passwords, monitors = conf_cluster
    leaders = await _agreed_meta_leader(monitors, tmp_path)
    assert leaders <= {"cadenza-1", "cadenza-2", "cadenza-3"}
    admin = {"NATS_USER": "admin", "NATS_PASSWORD": passwords["admin"]}
    # accounts.conf grants the cadenza prefix only.
    setup = await anyio.to_thread.run_sync(
        lambda: cadenza("setup", "--server", urls, "--prefix", "cadenza", "--replicas", "3", env=admin)
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    opts = bus.ConnectOptions(servers=tuple(urls.split(",")), user="admin", password=passwords["admin"])
    async with bus.connect(options=opts, prefix="cadenza", ensure_topology=False) as b:
        info = await b.js.stream_info(b.topology.stream_name("session"))
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader in leaders | {"cadenza-1", "cadenza-2", "cadenza-3"}
        assert len(info.cluster.replicas or []) == 2
        kv = await b.js.stream_info(f"KV_{b.topology.bucket_name('sessions')}")
        assert kv.config.num_replicas == 3
        # sync_interval: always, as the config says (the server reports it in nanoseconds, -1 for always).
        assert _jsz(monitors[0])["config"]["sync_always"] is True


# ---------------------------------------------------------------- EmbeddedCluster


async def test_embedded_cluster_reelects_a_meta_leader_and_keeps_r3_streams(nats_cluster: EmbeddedCluster) -> None:
    assert len(nats_cluster.urls.split(",")) == 3 and all(nats_cluster.node_pids)
    prefix = unique_prefix()
    async with bus.connect(nats_cluster.urls, prefix=prefix, replicas=3, timeouts=bus.Timeouts(connect=10)) as b:
        name = b.topology.stream_name("session")
        info = await b.js.stream_info(name)
        assert info.config.num_replicas == 3 and info.cluster is not None and len(info.cluster.replicas or []) == 2
        leader = nats_cluster.meta_leader()
        nats_cluster.kill(leader)
        assert nats_cluster.node_pids[leader] is None
        await anyio.to_thread.run_sync(nats_cluster.wait_formed)
        assert nats_cluster.meta_leader() != leader
        nats_cluster.restart(leader)
        assert nats_cluster.node_pids[leader] is not None
        # The restarted node is a current follower again (wait_formed checks it through the leader).
        with anyio.fail_after(30):
            while True:
                try:
                    ack = await b.js.publish(b.topology.subjects.domain_wildcard("session").replace(">", "x.y"), b"{}")
                    break
                except (nats.errors.Error, TimeoutError):  # the stream may be electing a leader: retry
                    await anyio.sleep(0.2)
        assert ack.stream == name


def test_embedded_server_takes_sync_interval(tmp_path: Path) -> None:
    with bus.EmbeddedServer(tmp_path, sync_interval="always", monitor_port=0) as server:
        assert server.monitor("jsz")["config"]["sync_always"] is True


# ---------------------------------------------------------------- storage


def test_default_storage_adds_up_and_a_budget_splits_in_proportion() -> None:
    assert DEFAULT_STORAGE == sum(s.max_bytes for s in STREAMS) + sum(b.max_bytes for b in BUCKETS)
    assert bus.Topology("x", storage=None).storage_needed() == DEFAULT_STORAGE
    topo = bus.Topology("x", storage=parse_size("1.9GiB"))
    assert topo.storage_needed() <= parse_size("1.9GiB")
    activity = topo.stream_config(topo.stream_spec("activity")).max_bytes
    session = topo.stream_config(topo.stream_spec("session")).max_bytes
    # Above the 1 MiB each gets, 8 GiB : 2 GiB as by default (integer division rounds).
    assert abs((activity - MIN_BYTES) - 4 * (session - MIN_BYTES)) <= 4
    with pytest.raises(bus.TopologyError, match="too small"):
        bus.Topology("x", storage=1000)
    with pytest.raises(bus.TopologyError, match="not a storage size"):
        parse_size("lots")


async def test_a_server_without_enough_store_is_refused_in_one_line_that_says_how_to_lower_it(tmp_path: Path) -> None:
    with bus.EmbeddedServer(tmp_path, max_file_store="4GB") as server:
        with pytest.raises(bus.TopologyError) as refused:
            async with bus.connect(server.url, prefix=unique_prefix(), replicas=1):
                pass
        message = str(refused.value)
        assert "\n" not in message and "18 GiB" in message and "CADENZA_STORAGE" in message, message
        async with bus.connect(server.url, prefix=unique_prefix(), ensure_topology=False) as b:
            # The refused prefix above keeps what it reserved before the refusal (3 GiB of the 4): a small budget.
            await bus.Topology(b.topology.prefix, storage=parse_size("256MiB")).ensure(b.js)
            # Another process without the setting accepts the limits setup declared (no upgrade attempted).
            await bus.Topology(b.topology.prefix, storage=None).ensure(b.js)
        out = cadenza("setup", "--server", server.url, "--prefix", unique_prefix(), "--storage", "256MiB")
        assert out.returncode == 0, out.stderr
        assert "256 MiB of file store reserved per node" in out.stdout, out.stdout
        out = cadenza("setup", "--server", server.url, "--prefix", unique_prefix())
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "CADENZA_STORAGE" in out.stderr


# ---------------------------------------------------------------- cadenza status / subjects


def test_status_on_one_server_shows_every_stream_and_bucket(nats_server: Any) -> None:
    prefix = unique_prefix()
    assert cadenza("setup", "--server", nats_server.url, "--prefix", prefix).returncode == 0
    out = cadenza("status", "--server", nats_server.url, "--prefix", prefix, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == len(STREAMS) + len(BUCKETS)
    assert {r["replicas"] for r in rows} == {1} and all(r["state"] == "ok" for r in rows)
    text = cadenza("status", "--server", nats_server.url, "--prefix", prefix)
    assert text.returncode == 0 and f"{prefix.upper()}_SESSION" in text.stdout, text.stdout + text.stderr


def test_status_says_missing_streams_and_exits_1(nats_server: Any) -> None:
    out = cadenza("status", "--server", nats_server.url, "--prefix", unique_prefix())
    assert out.returncode == 1 and "missing" in out.stdout and "cadenza setup" in out.stdout, out.stdout


def test_status_on_a_cluster_shows_the_leader_and_three_replicas(nats_cluster: EmbeddedCluster) -> None:
    if isinstance(nats_cluster, ExternalServer):  # pragma: no cover - the cluster fixture is always embedded
        pytest.skip("needs the embedded cluster")
    prefix = unique_prefix()
    setup = cadenza("setup", "--server", nats_cluster.urls, "--prefix", prefix, env={"CADENZA_REPLICAS": "3"})
    assert setup.returncode == 0, setup.stderr
    out = cadenza("status", "--server", nats_cluster.urls, "--prefix", prefix, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    names = {n.server_name for n in nats_cluster.nodes}
    for row in rows:
        assert row["replicas"] == 3 and row["leader"] in names, row
        assert len(row["followers"]) == 2 and {f["name"] for f in row["followers"]} | {row["leader"]} == names
    text = cadenza("status", "--server", nats_cluster.urls, "--prefix", prefix)
    assert "current" in text.stdout, text.stdout


def test_status_with_the_server_down_is_one_line_within_seconds() -> None:
    port = _free_port("127.0.0.1")
    # A hang would overrun the subprocess bound (TimeoutExpired); --timeout is 2 s by default.
    out = cadenza("status", "--server", f"nats://127.0.0.1:{port}", timeout=30)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_subjects_reports_the_configured_replicas() -> None:
    out = cadenza("subjects", env={"CADENZA_REPLICAS": "3"})
    assert out.returncode == 0 and "replicas: 3 (CADENZA_REPLICAS)" in out.stdout, out.stdout + out.stderr
    out = cadenza("subjects", env={"CADENZA_REPLICAS": "2"})
    assert out.returncode == 2 and "1, 3 or 5" in out.stderr, out.stderr


# ---------------------------------------------------------------- bench.durability


async def test_durability_bench_measures_a_round_trip_and_a_rate(tmp_path: Path) -> None:
    """Samples come out (never a figure is asserted: machines vary)."""
    from bench.durability import Row, _measure, markdown

    with bus.EmbeddedServer(tmp_path, sync_interval="always") as server:
        rtts, per_s = await _measure(server.url, 1, samples=5, burst=20, concurrency=4)
    assert len(rtts) == 5 and per_s > 0
    assert "| 1 node, always |" in markdown([Row("1 node, always", 1.0, 2.0, per_s)], 5, 20, 4)


# ---------------------------------------------------------------- cadenza dev --cluster


async def test_dev_cluster_starts_three_nodes_with_replicas_3_and_stops_on_sigterm() -> None:
    from bus.testing import ChildProcess

    prefix = unique_prefix()
    dev = ChildProcess("services", "dev", "--cluster", "3", "--console-port", "0", "--prefix", prefix,
                       "--duration", "100", ready_marker="cadenza: ready dev")  # fmt: skip
    dev.start(timeout=90)  # on this thread: the child dies with the thread that started it
    try:
        text = "".join(dev.output)
        urls = re.search(r"export NATS_URL=(\S+) CADENZA_REPLICAS=3", text)
        assert urls is not None, text
        assert len(urls[1].split(",")) == 3 and "broker: running" in text, text
        async with bus.connect(urls[1], prefix=prefix, ensure_topology=False) as b:
            info = await b.js.stream_info(b.topology.stream_name("session"))
            assert info.config.num_replicas == 3
    finally:
        code = await anyio.to_thread.run_sync(lambda: dev.stop(timeout=30))
        if dev.proc is not None and dev.proc.stdout is not None:
            dev.proc.stdout.close()
    assert code == 0, "".join(dev.output[-20:])


def test_dev_cluster_takes_3_or_5_nodes() -> None:
    out = cadenza("dev", "--cluster", "2", "--duration", "1")
    assert out.returncode == 2 and "3 or 5" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
