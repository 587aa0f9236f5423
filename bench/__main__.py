"""``python -m bench``: every scenario against raw nats-py (the limit), cadenza and Temporal, in one run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ._common import run
from ._harness import CLUSTER_SCENARIOS, CLUSTER_SYSTEMS, SCENARIOS, SYSTEMS, main_async


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="cadenza against the limit (raw nats-py) and Temporal, side by side, in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes (CI smoke test)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    ap.add_argument(
        "--systems",
        default=None,
        help="comma-separated, from: " + ", ".join(SYSTEMS) + " (default: limit,cadenza,temporal,celery; "
        "celery runs only if redis-server is installed; with --cluster: limit,cadenza)",
    )
    ap.add_argument("--scenarios", default=None, help="comma-separated, from: a b c d e f g (--cluster: a b c d)")
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="limit and cadenza on one 3-node nats-server cluster on loopback, replicas 3 (scenarios a-d)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    default_systems = "limit,cadenza" if args.cluster else "limit,cadenza,temporal,celery"
    systems = [s.strip() for s in (args.systems or default_systems).split(",") if s.strip()]
    scenarios = [s.strip() for s in (args.scenarios or ",".join(SCENARIOS)).split(",") if s.strip()]
    if args.cluster and args.scenarios is None:
        scenarios = [s for s in scenarios if s in CLUSTER_SCENARIOS]
    bad = [s for s in systems if s not in SYSTEMS] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    if args.cluster:
        off = [s for s in systems if s not in CLUSTER_SYSTEMS] + [s for s in scenarios if s not in CLUSTER_SCENARIOS]
        if off:
            ap.error(f"--cluster runs systems {', '.join(CLUSTER_SYSTEMS)} and scenarios "
                     f"{' '.join(CLUSTER_SCENARIOS)} only, not: {', '.join(off)}")  # fmt: skip
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("bench").setLevel(logging.INFO)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("CADENZA_LOG", "WARNING")
    run(
        lambda: main_async(
            quick=args.quick,
            out=args.out,
            systems=systems,
            scenarios=scenarios,
            command=command.strip(),
            cluster=args.cluster,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
