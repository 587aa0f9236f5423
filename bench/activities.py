"""Activities benchmark: cancel latency and writer throughput, beside raw nats-py in the same run.

``python -m bench.activities [--quick] [--out FILE]`` starts an embedded nats-server, then measures

* cancel latency: from just before the ``CancelRequested`` publish (another connection, as the
  recorder or CLI would) to the work context's token being cancelled in the tracking process; beside
  one raw nats-py JetStream publish round trip (publish, wait for the ack) on the same server;
* writer throughput: lines/s through one activity writer until ``flush_writer`` says they are
  durable, beside raw nats-py publishing the same lines one JetStream message each (awaiting each ack).

It prints a table with the ratios and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import nats

import bus
from bench._common import percentile
from bench._common import run as run_loop
from bus.testing import embedded_server, unique_prefix
from schemas import CancelRequested


async def _raw_js_rtt(url: str, samples: int) -> list[float]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = "RAW_" + unique_prefix().upper()
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        out = []
        for i in range(samples + 20):
            t0 = time.perf_counter()
            await js.publish(f"{stream.lower()}.x", b'{"n":%d}' % i)
            if i >= 20:  # warm-up
                out.append(time.perf_counter() - t0)
        await js.delete_stream(stream)
        return out
    finally:
        await nc.close()


async def _cancel_latency(url: str, samples: int) -> list[float]:
    prefix = unique_prefix("bench")
    out: list[float] = []
    async with (
        bus.connect(url, prefix=prefix, name="bench-host") as host,
        bus.connect(url, prefix=prefix, name="bench-canceller") as canceller,
    ):
        async with bus.BusActivityService(host) as svc:
            for i in range(samples + 20):
                rec = await svc.start_activity(bus.StartRequest(type="bench"))
                work = await svc.track(bus.background(), rec.id)
                done: list[float] = []
                async with anyio.create_task_group() as tg:

                    async def waiter(token: bus.CancelToken = work.token, done: list[float] = done) -> None:
                        await token.wait()
                        done.append(time.perf_counter())

                    tg.start_soon(waiter)
                    await anyio.lowlevel.checkpoint()  # the waiter is parked, as real work would be
                    t0 = time.perf_counter()
                    await canceller.publish(
                        CancelRequested(target="activity", target_id=rec.id, cause=bus.CANCELLED_BY_USER)
                    )
                if i >= 20:
                    out.append(done[0] - t0)
                await svc.complete_activity(rec.id, bus.ActivityStatus.CANCELLED, "Cancelled by user")
    return out


async def _raw_lines(url: str, lines: list[str]) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = "RAWL_" + unique_prefix().upper()
        subject = f"{stream.lower()}.line"
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        t0 = time.perf_counter()
        for line in lines:
            await js.publish(subject, line.encode())
        took = time.perf_counter() - t0
        await js.delete_stream(stream)
        return len(lines) / took
    finally:
        await nc.close()


async def _writer_lines(url: str, lines: list[str]) -> tuple[float, int]:
    async with bus.connect(url, prefix=unique_prefix("bench"), name="bench-writer") as b:
        async with bus.BusActivityService(b, writer_flush_timeout=300) as svc:
            rec = await svc.start_activity(bus.StartRequest(type="bench"))
            w = bus.new_writer(bus.background(), svc, rec.id)
            t0 = time.perf_counter()
            for i, line in enumerate(lines):
                w.write(line + "\n")
                if i % 1000 == 999:
                    await anyio.lowlevel.checkpoint()  # a producer that yields, like real output
            await bus.flush_writer(w)
            took = time.perf_counter() - t0
            assert w.durable == len(lines) and w.dropped == 0
            return len(lines) / took, w.batches


def _ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


async def run(quick: bool) -> dict[str, Any]:
    cancel_n, rtt_n, n_lines = (100, 300, 20_000) if quick else (500, 2000, 100_000)
    lines = [f"{i:07d} pulling layer sha256:{i:064x} 12.3MB/45.6MB" for i in range(n_lines)]
    with embedded_server() as server:
        rtt = await _raw_js_rtt(server.url, rtt_n)
        cancel = await _cancel_latency(server.url, cancel_n)
        raw_rate = await _raw_lines(server.url, lines)
        writer_rate, batches = await _writer_lines(server.url, lines)
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "quick": quick,
        "cancel_latency_s": {"p50": percentile(cancel, 50), "p99": percentile(cancel, 99), "samples": len(cancel)},
        "raw_js_publish_rtt_s": {"p50": percentile(rtt, 50), "p99": percentile(rtt, 99), "samples": len(rtt)},
        "writer_lines_per_s": writer_rate,
        "writer_batches": batches,
        "raw_js_one_message_per_line_per_s": raw_rate,
        "lines": n_lines,
    }
    result["cancel_p99_over_raw_rtt_p99"] = result["cancel_latency_s"]["p99"] / result["raw_js_publish_rtt_s"]["p99"]
    result["writer_over_raw"] = writer_rate / raw_rate
    return result


def table(r: dict[str, Any]) -> str:
    c, raw = r["cancel_latency_s"], r["raw_js_publish_rtt_s"]
    rows = [
        ("measure", "cadenza", "raw nats-py", "ratio", "target"),
        ("cancel latency p50", _ms(c["p50"]), _ms(raw["p50"]) + " (JS publish RTT)",
         f"{c['p50'] / raw['p50']:.2f}x", ""),
        ("cancel latency p99", _ms(c["p99"]), _ms(raw["p99"]) + " (JS publish RTT)",
         f"{r['cancel_p99_over_raw_rtt_p99']:.2f}x", "<= 3x"),
        (f"writer, {r['lines']} lines", f"{r['writer_lines_per_s']:,.0f} lines/s ({r['writer_batches']} events)",
         f"{r['raw_js_one_message_per_line_per_s']:,.0f} msgs/s (1 line/msg)", f"{r['writer_over_raw']:.1f}x", ">= 1x"),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.activities", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    p.add_argument("--out", default="bench/results/activities.json", help="JSON output file")
    args = p.parse_args()
    result = run_loop(run, args.quick)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
