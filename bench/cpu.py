"""CPU time and NATS messages per activity, by process: where the machine's cores go in scenario (c).

``python -m bench.cpu [--ops N] [--sessions S] [--systems limit,cadenza,cadenza-untracked]`` runs ``N``
activities over ``S`` concurrent sessions on each system (as scenario (c) does) and prints, for every
process of that system (the driver, nats-server, the broker, the recorder, the workers), the CPU time
it used (user + system, from ``/proc``) divided by ``N``; then, from a shorter second pass, the
messages the server routed per activity. On a machine with few cores the sum of the CPU times is
what bounds activities per second; unlike a wall-clock figure it hardly moves when other programs
load the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import anyio

from ._common import Sizes
from ._peer import Peer

__all__ = ("cpu_seconds", "main")

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


def _processes(peer: Peer) -> dict[str, int]:
    """The processes of a running system, by role."""
    procs: dict[str, int] = {"driver (this process)": os.getpid()}
    server = getattr(peer, "server", None)
    if server is not None and server._proc is not None:
        procs["nats-server"] = server._proc.pid
    if peer.name == "limit":
        main = peer.main  # type: ignore[attr-defined]
        procs["broker stand-in"] = main.broker.pid
        for wid, p in main.workers.items():
            procs[f"worker {wid}"] = p.pid
    else:
        n = 0
        for p in peer.procs:  # type: ignore[attr-defined]
            if p.name == "cadenza-worker":
                procs[f"worker {n}"] = p.pid
                n += 1
            else:
                procs[p.name.replace("services.", "")] = p.pid
    return procs


async def _measure(system: str, ops: int, sessions: int) -> tuple[float, dict[str, float], float]:
    sizes = Sizes.quick()
    workdir = Path(tempfile.mkdtemp(prefix="cadenza-bench-cpu-"))
    peer: Peer
    if system == "limit":
        from ._limit import LimitPeer

        peer = LimitPeer(sizes, workdir)
    elif system == "cadenza":
        from ._cadenza import CadenzaPeer

        peer = CadenzaPeer(sizes, workdir)
    else:
        from ._cadenza import UntrackedCadenzaPeer

        peer = UntrackedCadenzaPeer(sizes, workdir)
    await peer.start()
    try:
        await peer.throughput(sessions, min(ops, 200))  # warm
        procs = _processes(peer)
        before = {k: cpu_seconds(pid) for k, pid in procs.items()}
        rate = await peer.throughput(sessions, ops)
        after = {k: cpu_seconds(pid) for k, pid in procs.items()}
        done = max(1, ops // sessions) * sessions
        per = {k: (after[k] - before[k]) / done * 1000 for k in procs}
        # A second, shorter pass counts every message the server routes (the counting costs CPU, so
        # it is kept out of the first pass).
        nc = peer.nc if peer.name == "limit" else peer.bus.nc  # type: ignore[attr-defined]
        seen = [0]

        async def count(_msg: object) -> None:
            seen[0] += 1

        sub = await nc.subscribe(">", cb=count)
        small = max(sessions, ops // 4)
        await peer.throughput(sessions, small)
        await anyio.sleep(0.5)
        await sub.unsubscribe()
        return rate, per, seen[0] / (max(1, small // sessions) * sessions)
    finally:
        await peer.close()


async def _main(args: argparse.Namespace) -> None:
    for system in args.systems.split(","):
        rate, per, messages = await _measure(system.strip(), args.ops, args.sessions)
        print(f"\n{system}: {args.ops} activities over {args.sessions} sessions, {rate:,.0f} activities/s")
        print("| process | CPU ms per activity |\n|---|---|")
        for k, v in per.items():
            print(f"| {k} | {v:.2f} |")
        print(f"| **all** | **{sum(per.values()):.2f}** |")
        print(f"NATS messages per activity (every subject, as a `>` subscriber sees them): {messages:.1f}")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--systems", default="limit,cadenza,cadenza-untracked")
    args = ap.parse_args(argv)
    os.environ.setdefault("CADENZA_LOG", "WARNING")
    anyio.run(_main, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
