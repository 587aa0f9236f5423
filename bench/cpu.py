"""CPU time and NATS messages per activity, by process and by message kind, for each activity pattern.

``python -m bench.cpu [--ops N] [--sessions S] [--rounds R] [--systems limit,cadenza,cadenza-untracked]
[--cluster] [--json PATH]`` runs, on each system, each of its activity patterns with ``S`` callers at once:

- ``in-session``: ``execute_activity`` in ``S`` open sessions (scenario (c)); the limit runs its
  raw nats-py version of the same pattern (its only row);
- ``shared queue``: ``execute_activity`` outside a session, to the tasklist's shared queue;
- ``handler helper``: ``bus.run_handler_activity`` in this process (a service tracking its own work
  through a ``BusActivityService``, no worker), tracked by the recorder (cadenza only).

First each system runs alone: each of its patterns is warmed (sessions opened, one pass), then a
pass of ``--count-ops`` activities is counted by a ``>`` subscriber on its own connection, by kind,
until no message has come for 0.5 s (alone, because such a subscriber cannot tell one system's
replies from another's, and a system at rest still sends: heartbeats and their PubAcks). Then every
system runs at once (each with its own prefix, on the same servers), each pattern warmed again on
each, and timed ``R`` times over ``N`` activities, the systems taking turns round by round (in the
order A B, B A, A B, ...: a machine whose speed drifts over the minutes favours none of them): for
every process of the system (this driver, nats-server, or the three nodes of a cluster, the broker,
the recorder, the workers) the CPU time it used (user + system, from ``/proc``), divided by the
activities, and each server's ``/varz`` message counters. A figure is the median of the rounds (a
process's CPU, the activities/s, the total CPU); a system's CPU against the limit's is also given
round by round (each round against the limit's round next to it) with the median of those ratios.
The timed rounds have no subscriber, because counting costs CPU; the systems not taking their turn
are at rest meanwhile (their heartbeats reach the servers, whose CPU is in the figures: a few
messages a second against thousands).
On a machine with few cores the sum of the CPU times is what bounds activities per second; unlike a
wall-clock figure it hardly moves when other programs load the machine.

``--cluster``: every system on one 3-node nats-server cluster on loopback (replicas 3); CPU is
summed over the three nodes; messages are counted on node 1 (see :mod:`bench._count`: each message of
the account once, wherever it was published; not the replication between nodes, which ``/varz`` of
each node shows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ._common import Sizes, run
from ._count import GROUPS, MessageCounter
from ._peer import Peer
from ._servers import Servers

__all__ = ("PATTERNS", "cpu_seconds", "main")

_TICK = os.sysconf("SC_CLK_TCK")

#: Every pattern, and which systems run it.
PATTERNS: dict[str, tuple[str, ...]] = {
    "in-session": ("limit", "cadenza", "cadenza-untracked"),
    "shared queue": ("cadenza", "cadenza-untracked"),
    "handler helper": ("cadenza",),
}
SYSTEMS = ("limit", "cadenza", "cadenza-untracked")
#: Kinds below this many messages per activity in every pattern share one row of the printed breakdown.
_SMALL = 0.05


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


def _processes(peer: Peer, servers: Servers) -> dict[str, int]:
    """The processes of a running system, by role."""
    procs: dict[str, int] = {"driver (this process)": os.getpid(), **servers.pids()}
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


@dataclass
class Figures:
    """What one pattern of one system measured."""

    rate: float = math.nan
    timed: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)
    varz: list[dict[str, float]] = field(default_factory=list)
    counted: int = 0
    messages: int = 0
    kinds: list[tuple[str, str, int]] = field(default_factory=list)
    quiet: bool = True
    #: Slow consumers the servers noted during the counted pass (the counter may have missed messages).
    slow_consumers: int = 0
    #: Each timed round: its activities/s and CPU ms per activity by process (``rate`` and ``cpu_ms``
    #: are their medians).
    rounds: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def add_round(self, rate: float, cpu_ms: dict[str, float]) -> None:
        self.rounds.append((rate, cpu_ms))
        self.rate = statistics.median(r for r, _ in self.rounds)
        self.cpu_ms = {k: statistics.median(c[k] for _, c in self.rounds) for k in cpu_ms}

    @property
    def round_totals(self) -> list[float]:
        """Each round's CPU ms per activity, all processes."""
        return [sum(c.values()) for _, c in self.rounds]

    @property
    def cpu_all(self) -> float:
        """CPU ms per activity, all processes: the median of the rounds' totals."""
        return statistics.median(self.round_totals) if self.rounds else sum(self.cpu_ms.values())

    @property
    def per_activity(self) -> float:
        return self.messages / self.counted if self.counted else math.nan

    def varz_per(self, key: str) -> float:
        return sum(v[key] for v in self.varz) / self.timed if self.timed and self.varz else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "activities_per_s": self.rate,
            "timed_activities": self.timed,
            "cpu_ms_per_activity": self.cpu_ms,
            "cpu_ms_per_activity_all": self.cpu_all,
            "rounds": [
                {"activities_per_s": r, "cpu_ms_per_activity": c, "cpu_ms_per_activity_all": sum(c.values())}
                for r, c in self.rounds
            ],
            "varz_per_activity_by_node": [{k: v / self.timed for k, v in n.items()} for n in self.varz]
            if self.timed
            else [],
            "varz_in_msgs_per_activity": _num(self.varz_per("in_msgs")),
            "varz_out_msgs_per_activity": _num(self.varz_per("out_msgs")),
            "counted_activities": self.counted,
            "counted_messages": self.messages,
            "messages_per_activity": _num(self.per_activity),
            "messages_per_activity_by_kind": {k: n / self.counted for _g, k, n in self.kinds} if self.counted else {},
            "kind_groups": {k: g for g, k, _n in self.kinds},
            "quiet_before_stop": self.quiet,
            "slow_consumers_while_counting": self.slow_consumers,
        }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _make_peer(system: str, workdir: Path, servers: Servers) -> Peer:
    sizes = Sizes.quick()
    if system == "limit":
        from ._limit import LimitPeer

        return LimitPeer(sizes, workdir, servers)
    if system == "cadenza":
        from ._cadenza import CadenzaPeer

        return CadenzaPeer(sizes, workdir, servers)
    from ._cadenza import UntrackedCadenzaPeer

    return UntrackedCadenzaPeer(sizes, workdir, servers)


@contextlib.asynccontextmanager
async def _pattern(peer: Any, pattern: str, lanes: int) -> AsyncIterator[Callable[[int], Awaitable[float]]]:
    """``run(ops) -> activities/s`` for one pattern, its sessions (or service) open around it."""
    if pattern == "in-session":
        handles = await peer.open_sessions(lanes)
        try:
            yield lambda ops: peer.run_in_sessions(handles, ops)
        finally:
            await peer.close_sessions(handles)
    elif pattern == "shared queue":
        yield lambda ops: peer.run_shared(lanes, ops)
    elif pattern == "handler helper":
        import bus

        async with bus.BusActivityService(peer.bus) as service:
            yield lambda ops: peer.run_handler(service, lanes, ops)
    else:
        raise ValueError(pattern)


def _varz(servers: Servers) -> list[dict[str, float]]:
    return [{k: float(v.get(k, 0)) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")} for v in servers.varz()]


async def _settle(servers: Servers, quiet: float = 0.5, bound: float = 10.0) -> None:
    """Until the clients have sent nothing for ``quiet`` seconds (at most ``bound``): the recorder's
    work that trails the last result belongs to the pass."""
    t0 = time.monotonic()
    last = servers.client_msgs()
    since = time.monotonic()
    while time.monotonic() - t0 < bound and time.monotonic() - since < quiet:
        await anyio.sleep(0.1)
        sent = servers.client_msgs()
        if sent != last:
            last, since = sent, time.monotonic()


#: A cancel router asks the stream for early cancels of the activities it sees in its first 2 s
#: (``CancelRouter.seen_since``'s margin): start-up, not steady state, kept out of every figure.
_START_UP = 2.5


async def _warm(run: Callable[[int], Awaitable[float]], lanes: int, args: argparse.Namespace) -> None:
    """One pass, and on until the pattern's start-up is over (its routers listening for ``_START_UP``)."""
    t0 = time.monotonic()
    await run(max(lanes, min(args.ops, 200)))
    while time.monotonic() - t0 < _START_UP:
        await run(lanes)


async def _count_pattern(
    system: str, peer: Any, servers: Servers, pattern: str, args: argparse.Namespace
) -> Figures:
    """One pattern of a system running alone, warmed, then counted by a `>` subscriber on its own
    connection (which costs CPU: never during a timed round). Alone because the subscriber cannot
    tell one system's replies from another's (every ``_INBOX``), and a system at rest still sends
    (heartbeats, their PubAcks)."""
    fig = Figures()
    lanes = args.sessions
    prefix, replies = (peer.main.prefix, (peer.reply,)) if system == "limit" else (peer.prefix, ())
    async with _pattern(peer, pattern, lanes) as run, MessageCounter(servers.urls, prefix, replies) as counter:
        await _warm(run, lanes, args)
        await _settle(servers)
        slow = sum(int(v.get("slow_consumers", 0)) for v in servers.varz())
        await counter.start()
        await run(args.count_ops)
        fig.quiet = await counter.stop()
        fig.slow_consumers = sum(int(v.get("slow_consumers", 0)) for v in servers.varz()) - slow
        fig.counted = max(1, args.count_ops // lanes) * lanes
        fig.messages = counter.total()
        fig.kinds = counter.by_kind()
    return fig


async def _time_pattern(
    peers: dict[str, Any], figs: dict[str, Figures], servers: Servers, pattern: str, args: argparse.Namespace
) -> None:
    """One pattern on every system in ``peers`` (all running): warmed, then timed ``args.rounds``
    times, the systems taking turns (A B, B A, ...); the rounds go into ``figs``."""
    lanes = args.sessions
    async with contextlib.AsyncExitStack() as stack:
        runs = {
            system: await stack.enter_async_context(_pattern(peer, pattern, lanes)) for system, peer in peers.items()
        }
        for run in runs.values():
            await _warm(run, lanes, args)
        order = list(peers)
        for r in range(args.rounds):
            for system in order if r % 2 == 0 else order[::-1]:
                fig, peer = figs[system], peers[system]
                await _settle(servers)
                procs = _processes(peer, servers)
                before = {k: cpu_seconds(pid) for k, pid in procs.items()}
                v0 = _varz(servers)
                rate = await runs[system](args.ops)
                await _settle(servers)
                after = {k: cpu_seconds(pid) for k, pid in procs.items()}
                v1 = _varz(servers)
                timed = max(1, args.ops // lanes) * lanes
                fig.timed += timed
                fig.add_round(rate, {k: (after[k] - before[k]) / timed * 1000 for k in procs})
                delta = [{k: b[k] - a[k] for k in a} for a, b in zip(v0, v1, strict=True)]
                fig.varz = delta if not fig.varz else [
                    {k: n[k] + d[k] for k in n} for n, d in zip(fig.varz, delta, strict=True)
                ]  # fmt: skip


async def _stream_replicas(nc: Any, prefix: str) -> dict[str, int]:
    """The replicas of every stream (buckets included) of a system, as the server has them."""
    infos = await nc.jetstream().streams_info()
    return {i.config.name: i.config.num_replicas for i in infos if prefix.upper() in i.config.name.upper()}


@contextlib.asynccontextmanager
async def _started(system: str, servers: Servers) -> AsyncIterator[Any]:
    """One system, running until the block exits."""
    workdir = Path(tempfile.mkdtemp(prefix="cadenza-bench-cpu-"))
    peer: Any = _make_peer(system, workdir, servers)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.close()


async def _measure(
    servers: Servers, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Figures]], dict[str, dict[str, int]]]:
    """Every pattern on every system that runs it: the figures and the stream replicas, by system.
    First each system alone (its streams, its counted passes), then all at once (the timed rounds)."""
    results: dict[str, dict[str, Figures]] = {system: {} for system in args.systems}
    streams: dict[str, dict[str, int]] = {}

    def patterns(system: str) -> list[str]:
        return [p for p, systems in PATTERNS.items() if system in systems and p in args.patterns]

    for system in args.systems:
        async with _started(system, servers) as peer:
            prefix = peer.main.prefix if system == "limit" else peer.prefix
            streams[system] = await _stream_replicas(peer.nc if system == "limit" else peer.bus.nc, prefix)
            for pattern in patterns(system):
                results[system][pattern] = await _count_pattern(system, peer, servers, pattern, args)
    async with contextlib.AsyncExitStack() as stack:
        peers = {system: await stack.enter_async_context(_started(system, servers)) for system in args.systems}
        for pattern in PATTERNS:
            here = {system: peer for system, peer in peers.items() if pattern in patterns(system)}
            if here:
                await _time_pattern(here, {system: results[system][pattern] for system in here}, servers, pattern, args)
    return results, streams


# ---------------------------------------------------------------- output


def _cell(x: float, fmt: str = ".2f") -> str:
    return "—" if math.isnan(x) else format(x, fmt)


def system_table(
    system: str, figs: dict[str, Figures], streams: dict[str, int], args: argparse.Namespace, servers: Servers
) -> str:
    """One system's section: CPU per activity by process, then NATS messages per activity by kind."""
    lines = _cpu_lines(system, figs, streams, args, servers) + _kind_lines(figs, servers) + _warning_lines(figs)
    return "\n".join(lines)


def _cpu_lines(
    system: str, figs: dict[str, Figures], streams: dict[str, int], args: argparse.Namespace, servers: Servers
) -> list[str]:
    """The section's heading and its table of CPU ms per activity by process (with the message totals)."""
    patterns = list(figs)
    head = "| process | " + " | ".join(patterns) + " |\n|---|" + "---|" * len(patterns)
    procs: list[str] = []
    for f in figs.values():
        procs += [p for p in f.cpu_ms if p not in procs]
    replicas = ", ".join(str(r) for r in sorted(set(streams.values()))) or "?"
    lines = [
        f"\n### {system}: {args.rounds} x {args.ops} timed activities, {args.sessions} callers at once, "
        f"on {servers.description()}",
        "",
        f"{len(streams)} stream{'' if len(streams) == 1 else 's'} (key-value buckets included), replicas {replicas}.",
        "",
        "CPU ms per activity, by process (the median of the rounds; **all**: the median of the rounds' totals):",
        "",
        head,
    ]
    lines += [f"| {p} | " + " | ".join(_cell(figs[x].cpu_ms.get(p, math.nan)) for x in patterns) + " |" for p in procs]
    lines.append("| **all** | " + " | ".join(f"**{figs[x].cpu_all:.2f}**" for x in patterns) + " |")
    lines.append(
        "| all, round by round | "
        + " | ".join(", ".join(f"{t:.2f}" for t in figs[x].round_totals) for x in patterns)
        + " |"
    )
    lines.append("| activities/s | " + " | ".join(f"{figs[x].rate:,.0f}" for x in patterns) + " |")
    lines.append(
        "| **NATS messages per activity** (counted) | "
        + " | ".join(f"**{_cell(figs[x].per_activity, '.1f')}**" for x in patterns)
        + " |"
    )
    lines.append(
        "| server in_msgs / out_msgs per activity (/varz, all nodes) | "
        + " | ".join(_varz_cell(figs[x]) for x in patterns)
        + " |"
    )
    return lines


def _kind_lines(figs: dict[str, Figures], servers: Servers) -> list[str]:
    """The table of NATS messages per activity by kind (small kinds summed, advisories told apart)."""
    patterns = list(figs)
    counted = ", ".join(f"{figs[x].counted} ({x})" for x in patterns)
    where = "node 1 of the cluster" if servers.cluster else "the server"
    lines = [
        "",
        f"NATS messages per activity by kind (a `>` subscriber on {where}, over {counted} activities):",
        "",
        "| kind | " + " | ".join(patterns) + " |\n|---|" + "---|" * len(patterns),
    ]
    # In group order; within a group as the first pattern that has the kind lists it (the largest first).
    order: dict[str, tuple[int, int]] = {}
    for f in figs.values():
        for j, (g, k, _n) in enumerate(f.kinds):
            order.setdefault(k, (GROUPS.index(g), j))
    per: dict[str, dict[str, float]] = {
        x: {k: n / figs[x].counted for _g, k, n in figs[x].kinds} if figs[x].counted else {} for x in patterns
    }
    group = {k: g for f in figs.values() for g, k, _n in f.kinds}
    small: dict[str, float] = dict.fromkeys(patterns, 0.0)
    advisories: dict[str, float] = dict.fromkeys(patterns, 0.0)
    idle: dict[str, float] = dict.fromkeys(patterns, 0.0)
    upkeep: dict[str, float] = dict.fromkeys(patterns, 0.0)
    apart = {"advisory": advisories, "idle": idle, "upkeep": upkeep}
    for k in sorted(order, key=lambda k: order[k]):
        if group[k] in apart:
            for x in patterns:
                apart[group[k]][x] += per[x].get(k, 0.0)
        elif all(per[x].get(k, 0.0) < _SMALL for x in patterns):
            for x in patterns:
                small[x] += per[x].get(k, 0.0)
        else:
            lines.append(f"| {k} | " + " | ".join(f"{per[x].get(k, 0.0):.1f}" for x in patterns) + " |")
    if any(small.values()):
        lines.append(
            f"| the other kinds (each under {_SMALL} per activity: heartbeats, pull requests, ...) | "
            + " | ".join(f"{small[x]:.2f}" for x in patterns)
            + " |"
        )
    lines.append("| **all** | " + " | ".join(f"**{_cell(figs[x].per_activity, '.1f')}**" for x in patterns) + " |")
    if any(advisories.values()):
        lines.append(
            "\nNot in the counts: JetStream advisories ("
            + ", ".join(f"{advisories[x]:.1f} per activity in {x}" for x in patterns)
            + "): the server publishes them only when someone listens, here the counter itself."
        )
    if any(upkeep.values()):
        lines.append(
            "\nNot in the counts: upkeep ("
            + ", ".join(f"{upkeep[x]:.2f} per activity in {x}" for x in patterns)
            + "): worker heartbeats (one per worker per interval) and their deliveries, pull requests (one"
            " per batch of up to 256 messages) and their ends (an expiry every few seconds of a quiet"
            " consumer): costs per second or per batch, not per activity (tests/test_message_budget.py"
            " leaves them out too)."
        )
    if any(idle.values()):
        lines.append(
            "\nNot in the counts: idle heartbeats ("
            + ", ".join(f"{idle[x]:.2f} per activity in {x}" for x in patterns)
            + "): the server sends one a second to each follower (an ordered consumer) that received"
            " nothing for that second, so a lost one is noticed within seconds: a cost of quiet time"
            " (here mostly the counted pass's quiet tail), not of activities."
        )
    return lines


def _warning_lines(figs: dict[str, Figures]) -> list[str]:
    """Why a count may be off: slow consumers, or a server not quiet after the counted pass."""
    patterns = list(figs)
    lines: list[str] = []
    slow = [x for x in patterns if figs[x].slow_consumers]
    if slow:
        lines.append(f"\n(WARNING: the server noted slow consumers while counting {', '.join(slow)}: "
                     "messages may have been dropped, the counts may be low)")  # fmt: skip
    loud = [x for x in patterns if not figs[x].quiet]
    if loud:
        lines.append(f"\n(not quiet 10 s after the counted pass of: {', '.join(loud)}; the count stopped there)")
    return lines


def _varz_cell(f: Figures) -> str:
    return f"{_cell(f.varz_per('in_msgs'), '.1f')} / {_cell(f.varz_per('out_msgs'), '.1f')}"


def summary_table(results: dict[str, dict[str, Figures]]) -> str:
    lines = [
        "\n### Summary",
        "",
        "| system / pattern | activities/s | CPU ms per activity (all processes) | NATS messages per activity |"
        " server in / out msgs per activity (/varz) |",
        "|---|---|---|---|---|",
    ]
    for system, figs in results.items():
        for pattern, f in figs.items():
            lines.append(
                f"| {system} / {pattern} | {f.rate:,.0f} | {f.cpu_all:.2f} | {_cell(f.per_activity, '.1f')} | "
                f"{_varz_cell(f)} |"
            )
    return "\n".join(lines)


def cpu_ratios(results: dict[str, dict[str, Figures]]) -> dict[str, dict[str, Any]]:
    """Each system's CPU per activity against the limit's (in-session, the limit's one pattern):
    round by round (each against the limit's round next to it) and the median of those."""
    limit = results.get("limit", {}).get("in-session")
    out: dict[str, dict[str, Any]] = {}
    if limit is None or not limit.rounds:
        return out
    for system, figs in results.items():
        f = figs.get("in-session")
        if system == "limit" or f is None or not f.rounds:
            continue
        by_round = [c / lim for c, lim in zip(f.round_totals, limit.round_totals, strict=False) if lim > 0]
        if by_round:
            out[system] = {"by_round": by_round, "median": statistics.median(by_round),
                           "of_medians": f.cpu_all / limit.cpu_all if limit.cpu_all > 0 else None}  # fmt: skip
    return out


def ratio_lines(ratios: dict[str, dict[str, Any]]) -> str:
    return "\n".join(
        f"CPU per activity, {system} / limit (in-session), round by round: "
        + ", ".join(f"{x:.2f}x" for x in r["by_round"])
        + f"; median {r['median']:.2f}x"
        for system, r in ratios.items()
    )


def counting_note(cluster: bool) -> str:
    """How the messages were counted (printed under the summary, kept in the JSON)."""
    if not cluster:
        return (
            "Messages are counted by one connection of its own subscribed to `>` (its own probes left out; the "
            "embedded server has no permissions, so it sees every subject), during the counted pass; the /varz "
            "columns are the server's in_msgs / out_msgs deltas over the timed pass, which has no `>` subscriber."
        )
    return (
        "Messages are counted by one connection of its own subscribed to `>` on node 1 (its own probes left out). "
        "A `>` subscription is interest in every subject, so the other nodes route every message of the account "
        "to node 1: each message published in the account, by a client or by the server (PubAcks, deliveries), "
        "is counted once wherever it was published. Not counted: route protocol and JetStream's replication "
        "between the nodes (system account). The /varz columns (each node's in_msgs / out_msgs deltas over the "
        "timed pass, which has no `>` subscriber, summed over the three) include them: a message that crosses "
        "a route counts on both nodes, every stored message is also sent to the two other replicas, and the "
        "cluster's own background traffic over the pass is in them too."
    )


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    servers = Servers(Path(tempfile.mkdtemp(prefix="cadenza-bench-cpu-store-")), cluster=args.cluster)
    servers.start()
    try:
        print(f"bench.cpu on {servers.description()}: {args.rounds} timed round(s) of {args.ops} activities per "
              f"pattern and system (the systems taking turns), then {args.count_ops} counted; {args.sessions} "
              "callers at once", flush=True)  # fmt: skip
        results, streams = await _measure(servers, args)
        for system in args.systems:
            print(system_table(system, results[system], streams[system], args, servers), flush=True)
    finally:
        servers.stop()
    print(summary_table(results))
    ratios = cpu_ratios(results)
    if ratios:
        print("\n" + ratio_lines(ratios))
    print("\n" + counting_note(args.cluster))
    sys.stdout.flush()
    from ._harness import machine

    return {
        "meta": {
            **machine(),
            "command": "python -m bench.cpu " + " ".join(args.argv),
            "servers": servers.description(),
            "cluster": args.cluster,
            "ops": args.ops,
            "count_ops": args.count_ops,
            "sessions": args.sessions,
            "rounds": args.rounds,
            "counting": counting_note(args.cluster),
        },
        "results": {s: {p: f.to_json() for p, f in figs.items()} for s, figs in results.items()},
        "cpu_to_limit": ratios,
        "stream_replicas": streams,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=2000, help="activities of the timed (CPU) pass, per pattern")
    # 1,000: the counted pass ends with 0.5 s of quiet, whose heartbeats and pull renewals (a cost per
    # second) were 0.1 per activity over 200 activities.
    ap.add_argument("--count-ops", type=int, default=1000, help="activities of the counted pass (default 1000)")
    ap.add_argument("--sessions", type=int, default=10, help="callers (sessions) at once")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds per pattern and system, the systems taking turns (default 3)")  # fmt: skip
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated, from: " + ", ".join(PATTERNS))
    ap.add_argument("--cluster", action="store_true", help="on a 3-node nats-server cluster (replicas 3)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to PATH as JSON")
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    args.argv = raw
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    bad = [s for s in args.systems if s not in SYSTEMS] + [p for p in args.patterns if p not in PATTERNS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    for name in ("ops", "count_ops", "sessions", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ops < args.sessions or args.count_ops < args.sessions:
        ap.error("--ops and --count-ops must be at least --sessions (one activity per caller)")
    os.environ.setdefault("CADENZA_LOG", "WARNING")
    doc = run(_main, args)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"figures: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
