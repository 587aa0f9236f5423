"""The benchmark's limit and cadenza sides run and produce samples (never a figure is asserted: CI machines vary)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._common import Sizes, percentile, quiet_machine
from bench._count import NOT_COUNTED
from bench._harness import Results, markdown, run
from bench._limit import LimitPeer


def test_percentile_by_nearest_rank() -> None:
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == 50
    assert percentile(xs, 99) == 99
    assert math.isnan(percentile([], 50))


async def test_quiet_machine_waits_at_most_its_bound_and_reports_the_cpus_in_use() -> None:
    # Quiet at once under any load: one window, and the CPUs it saw in use.
    waited, used = await quiet_machine(below=math.inf, window=0.05, bound=5.0)
    assert 0.04 <= waited < 5.0  # (a loop's timer may fire a millisecond early)
    assert 0.0 <= used <= (os.cpu_count() or 1) + 0.5
    # Never quiet (no machine uses fewer than 0 CPUs): it gives up after its bound, not later.
    waited, used = await quiet_machine(below=0.0, window=0.05, bound=0.3)
    assert 0.29 <= waited < 5.0
    assert used >= 0.0


async def test_limit_round_trip_and_cancel_produce_samples(tmp_path: Path) -> None:
    sizes = Sizes.quick()
    sizes = Sizes(**{**sizes.__dict__, "rounds": 1, "rtt_samples": 5, "cancel_samples": 2, "workers": 1})
    peer = LimitPeer(sizes, tmp_path)
    res = Results(sizes=sizes, systems=["limit"])
    try:
        await peer.start()
        await run([peer], ["b", "d"], res, progress=lambda _line: None)
    finally:
        await peer.close()
    assert len(res.samples["round_trip"]["limit"]) == 5, res.missing
    assert len(res.samples["cancel"]["limit"]) == 2, res.missing
    quiet = res.meta["quiet_before_rounds"]
    assert isinstance(quiet, dict) and quiet["rounds"] == 2  # every round waited for a quiet machine first
    assert "(b) activity round trip in a session" in markdown(res)


async def test_cadenza_session_round_trip_and_cancel_produce_samples(tmp_path: Path) -> None:
    """The cadenza side drives the real session API (broker, recorder and a worker as processes)."""
    from bench._cadenza import CadenzaPeer

    sizes = Sizes.quick()
    sizes = Sizes(**{**sizes.__dict__, "rounds": 1, "rtt_samples": 5, "cancel_samples": 2, "workers": 1})
    peer = CadenzaPeer(sizes, tmp_path)
    res = Results(sizes=sizes, systems=["cadenza"])
    try:
        await peer.start()
        await run([peer], ["b", "d"], res, progress=lambda _line: None)
    finally:
        await peer.close()
    assert len(res.samples["round_trip"]["cadenza"]) == 5, res.missing
    assert len(res.samples["cancel"]["cadenza"]) == 2, res.missing


def test_cpu_seconds_reads_proc() -> None:
    from bench.cpu import cpu_seconds

    sum(range(200_000))
    assert cpu_seconds(os.getpid()) > 0


def _bench_cpu(tmp_path: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    """``python -m bench.cpu`` with tiny sizes on the limit and cadenza; its printed output and its JSON."""
    out = tmp_path / "cpu.json"
    argv = ["--ops", "20", "--count-ops", "20", "--sessions", "2", "--rounds", "2", "--systems", "limit,cadenza",
            "--json", str(out)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "bench.cpu", *argv, *extra],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, json.loads(out.read_text())


def _summary(stdout: str) -> dict[str, list[str]]:
    """The summary table's rows by their first cell (system / pattern)."""
    rows = stdout.split("### Summary", 1)[1].splitlines()
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if r.startswith("| ")]
    return {c[0]: c[1:] for c in cells[1:]}


def _check_counts(stdout: str, doc: dict[str, Any]) -> None:
    summary = _summary(stdout)
    assert set(summary) == {"limit / in-session", "cadenza / in-session", "cadenza / shared queue",
                            "cadenza / handler helper"}, stdout  # fmt: skip
    for row, cells in summary.items():
        # Messages per activity: a count with one decimal (a timing would be ms or /s), at least the
        # task (or event), its delivery and the result or the event's storage acknowledgement.
        assert re.fullmatch(r"\d+\.\d", cells[2]), (row, cells)
        assert float(cells[2]) >= 3, (row, cells)
    limit = doc["results"]["limit"]["in-session"]
    # The limit's pattern, cadenza's: task publish (no PubAck asked), its delivery, the ack, the
    # result (its pull requests are upkeep, counted apart).
    assert 4 <= limit["messages_per_activity"] < 5, limit
    assert "reply: PubAck" not in limit["messages_per_activity_by_kind"], limit
    assert limit["messages_per_activity_by_kind"]["task publish"] == 1, limit
    for pattern in ("in-session", "shared queue"):
        figs = doc["results"]["cadenza"][pattern]
        assert figs["counted_messages"] > 0 and figs["messages_per_activity_by_kind"]["task publish"] == 1, figs
        assert figs["cpu_ms_per_activity_all"] > 0, figs
    for system in doc["results"].values():
        for figs in system.values():
            kinds = figs["messages_per_activity_by_kind"]
            counted = sum(v for k, v in kinds.items() if figs["kind_groups"][k] not in NOT_COUNTED)
            assert abs(counted - figs["messages_per_activity"]) < 1e-9, figs
    assert "| task publish |" in stdout and "NATS messages per activity by kind" in stdout
    # Two timed rounds per system (--rounds 2), taken in turns; the CPU against the limit's, round by round.
    assert doc["meta"]["rounds"] == 2 and len(limit["rounds"]) == 2, limit
    cad = doc["results"]["cadenza"]["in-session"]
    assert [r["cpu_ms_per_activity_all"] > 0 for r in cad["rounds"]] == [True] * 2, cad
    ratio = doc["cpu_to_limit"]["cadenza"]
    assert len(ratio["by_round"]) == 2 and min(ratio["by_round"]) <= ratio["median"] <= max(ratio["by_round"])
    assert "CPU per activity, cadenza / limit (in-session), round by round:" in stdout


def test_bench_cpu_counts_messages_by_kind_on_one_server(tmp_path: Path) -> None:
    stdout, doc = _bench_cpu(tmp_path)
    _check_counts(stdout, doc)
    assert "| nats-server |" in stdout and not doc["meta"]["cluster"]
    assert set(doc["stream_replicas"]["limit"].values()) == {1}


def test_bench_cpu_on_a_three_node_cluster_with_replicas_3(tmp_path: Path) -> None:
    stdout, doc = _bench_cpu(tmp_path, "--cluster")
    _check_counts(stdout, doc)
    for i in (1, 2, 3):
        assert f"| nats-server {i} |" in stdout
    assert doc["meta"]["cluster"]
    # Both systems' streams (the limit's and every cadenza stream and bucket) are replicated on all three.
    assert set(doc["stream_replicas"]["limit"].values()) == {3}
    assert len(doc["stream_replicas"]["cadenza"]) > 1 and set(doc["stream_replicas"]["cadenza"].values()) == {3}
    nodes = doc["results"]["limit"]["in-session"]["varz_per_activity_by_node"]
    assert len(nodes) == 3 and all(n["in_msgs"] > 0 for n in nodes)


def test_hotpath_measures_a_worker_and_the_recorder_per_message() -> None:
    """``python -m bench.hotpath`` runs its modes end to end (a real server, a feeder process) and
    prints a positive figure for each; a bad mode is one line (never a figure asserted)."""
    cmd = [sys.executable, "-m", "bench.hotpath", "--modes", "worker,recorder", "--ops", "400", "--warm", "100",
           "--rounds", "1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    figures = dict(re.findall(r"^\| (worker|recorder) \| \*\*([0-9.]+)\*\*", out.stdout, re.M))
    assert set(figures) == {"worker", "recorder"} and all(float(v) > 0 for v in figures.values()), out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.hotpath", "--modes", "nope"], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parents[1])  # fmt: skip
    assert bad.returncode == 2 and "unknown mode: nope" in bad.stderr and "Traceback" not in bad.stderr
