"""``python -m bench``: every scenario against raw nats-py (the limit), cadenza and Temporal, in one run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from ._harness import SCENARIOS, SYSTEMS, main_async


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="cadenza against the limit (raw nats-py) and Temporal, side by side, in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes (CI smoke test)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    ap.add_argument(
        "--systems",
        default="limit,cadenza,temporal,celery",
        help="comma-separated, from: " + ", ".join(SYSTEMS) + " (celery runs only if redis-server is installed)",
    )
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: a b c d e f g")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("bench").setLevel(logging.INFO)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("CADENZA_LOG", "WARNING")
    anyio.run(
        lambda: main_async(
            quick=args.quick, out=args.out, systems=systems, scenarios=scenarios, command=command.strip()
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
