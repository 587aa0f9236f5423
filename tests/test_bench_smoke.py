"""The benchmark's limit side runs and produces samples (never a figure is asserted: CI machines vary)."""

from __future__ import annotations

import math
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
