"""The benchmark's limit and cadenza sides run and produce samples (never a figure is asserted: CI machines vary)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from bench._common import Sizes, percentile
from bench._harness import Results, markdown, run
from bench._limit import LimitPeer


def test_percentile_by_nearest_rank() -> None:
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == 50
    assert percentile(xs, 99) == 99
    assert math.isnan(percentile([], 50))


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
