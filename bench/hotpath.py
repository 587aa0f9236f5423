"""``python -m bench.hotpath``: the CPU one cadenza process spends per message, measured alone.

bench.cpu measures every process of a whole run at once; its per-process figures move by 10-15%
between runs minutes apart (the machine, how the processes share its two cores). To tell whether
a change to the hot path saved a few µs, this measures one process at a time, in-process, by its
own thread CPU time (``time.thread_time``), while another process feeds it over a real nats-server:

- ``worker``: a session worker (:class:`bus.Worker`, activities tracked) takes tasks from its
  inbox as a caller sends them (asking for the completion republished, as the session client does),
  runs a quick activity, stores its completion and acks the task on the store's answer;
  ``worker-untracked`` the same with ``track_activities=False``;
- ``recorder``: the recorder folds completions as a worker stores them;
- ``driver``: the caller (``bus.execute_activity`` in 100 open sessions at once, as bench (c)),
  with the broker, the recorder and two session workers in processes of their own (bench.cpu's
  cadenza); per activity.

The feeder is another process (its CPU is not counted); the first ``--warm`` messages are not
counted either. Figures are µs of thread CPU per message, the median of ``--rounds`` rounds, each
round a fresh server. Not a throughput figure: bench (c) and bench.cpu give those.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import anyio

from ._common import run

__all__ = ("main",)

_PREFIX = "hp"
_WORKER = "w_hotpath0"
_SESSION = "s-hotpath"
#: The header a caller names its inbox in for the completion's store acknowledgement, and the one
#: that asks for the stored completion republished instead of a result (docs/wire.md).
_STORE_ACK_TO = "Cadenza-Store-Ack-To"
_DONE = "Cadenza-Done"
#: The start of a caller-made activity id (``<user>~<client>~``), as the session client makes them.
_ROUTE = "hp~feeder~"
_MODES = ("worker", "worker-untracked", "recorder", "driver")


async def _feed(url: str, mode: str, n: int) -> None:
    """The feeder process: ``n`` tasks into the worker's inbox (``worker*``), or ``n`` completions
    into the activity stream (``recorder``), 200 in flight."""
    import bus
    from schemas import ActivityCompleted, ActivityStart, ActivityStatus, ActivityTask, SessionOpened, utcnow

    async with bus.connect(url, prefix=_PREFIX, name="hotpath-feeder") as b:
        if mode.startswith("worker"):
            await b.publish(SessionOpened(worker_id=_WORKER, session_id=_SESSION))
        limit = anyio.Semaphore(200)

        async def one(i: int) -> None:
            aid = f"a-{i:08d}" if mode == "recorder" else f"{_ROUTE}a-{i:08d}"
            async with limit:
                if mode == "recorder":
                    start = ActivityStart(started_at=utcnow(), activity_type="work", worker_id=_WORKER,
                                          session_id=_SESSION)  # fmt: skip
                    done = ActivityCompleted(event_id=f"{aid}.completed", activity_id=aid, rev=1,
                                             status=ActivityStatus.SUCCESS, result=i, start=start)  # fmt: skip
                    await b.publish(done)
                    return
                task = ActivityTask(activity_id=aid, name="work", tasklist="hotpath", worker_id=_WORKER,
                                    session_id=_SESSION, reply_to=f"_INBOX.hotpath.s.{aid}")  # fmt: skip
                await b.publish(task, headers={_STORE_ACK_TO: f"_INBOX.hotpath.s.{aid}", _DONE: "1"}
                                if mode == "worker" else None)  # fmt: skip

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)


async def _round(mode: str, n: int, warm: int) -> float:
    """One round on a fresh server: µs of thread CPU per message after the first ``warm``."""
    import bus
    from bus import EmbeddedServer

    marks: dict[str, float] = {}
    done = anyio.Event()
    with EmbeddedServer() as srv:
        async with bus.connect(srv.url, prefix=_PREFIX, name="hotpath") as b:
            async with anyio.create_task_group() as tg:
                if mode == "recorder":
                    from services.recorder import Recorder, RecorderConfig

                    rec = Recorder(b, RecorderConfig(prune_interval=3600))
                    fold = rec._on_stored

                    def counted(event: Any, seq: int, body: bytes | None = None) -> None:
                        fold(event, seq, body)
                        if seq == warm:  # one event per stream sequence: the seq counts them
                            marks["t0"] = time.thread_time()
                        elif seq == n:
                            marks["t1"] = time.thread_time()
                            done.set()

                    rec._on_stored = counted  # type: ignore[method-assign]
                    await tg.start(rec.run)
                    feeder = await _start_feeder(srv.url, mode, n)
                else:
                    worker = bus.Worker(b, tasklist="hotpath", enable_sessions=True, max_concurrent_sessions=10,
                                        track_activities=mode == "worker", worker_id=_WORKER)  # fmt: skip
                    count = 0

                    @worker.activity("work")
                    async def work(*_args: Any) -> int:
                        nonlocal count
                        count += 1
                        if count == warm:
                            marks["t0"] = time.thread_time()
                        elif count == n:
                            marks["t1"] = time.thread_time()
                            done.set()
                        return count

                    await tg.start(_serve, worker)
                    # Tasks made after the worker's cancel router listens (as a caller's are):
                    # the worker then never looks a cancel up in the stream.
                    await anyio.sleep(2.5)
                    feeder = await _start_feeder(srv.url, mode, n)
                with anyio.fail_after(600):
                    await done.wait()
                    await feeder.wait()
                tg.cancel_scope.cancel()
    return 1e6 * (marks["t1"] - marks["t0"]) / (n - warm)


async def _driver_round(n: int, warm: int) -> float:
    """One round of ``driver``: µs of the caller's thread CPU per activity after the first ``warm``."""
    import tempfile
    from pathlib import Path

    from ._cadenza import CadenzaPeer
    from ._common import Sizes, concurrently

    lanes = 100
    with tempfile.TemporaryDirectory(prefix="cadenza-hotpath-") as tmp:
        peer = CadenzaPeer(Sizes.quick(), Path(tmp))
        await peer.start()
        try:
            ctxs = await peer.open_sessions(lanes)
            try:
                await concurrently(lanes, max(1, warm // lanes), lambda i: peer._run(ctxs[i], "work"))
                per = max(1, (n - warm) // lanes)
                t0 = time.thread_time()
                await concurrently(lanes, per, lambda i: peer._run(ctxs[i], "work"))
                return 1e6 * (time.thread_time() - t0) / (per * lanes)
            finally:
                await peer.close_sessions(ctxs)
        finally:
            await peer.close()


async def _serve(worker: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    async with worker:
        task_status.started()
        await anyio.sleep_forever()


async def _start_feeder(url: str, mode: str, n: int) -> Any:
    return await anyio.open_process([sys.executable, "-m", "bench.hotpath", "--feed", url, "--mode", mode,
                                     "--ops", str(n)], stdout=None, stderr=None)  # fmt: skip


async def _main(modes: list[str], n: int, warm: int, rounds: int) -> None:
    print(f"bench.hotpath: µs of thread CPU per message, {n - warm} counted after {warm}, "
          f"median of {rounds} round(s)\n")  # fmt: skip
    print("| process | µs per message | rounds |")
    print("|---|---|---|")
    for mode in modes:
        figures = [await (_driver_round(n, warm) if mode == "driver" else _round(mode, n, warm))
                   for _ in range(rounds)]  # fmt: skip
        shown = ", ".join(f"{f:.1f}" for f in figures)
        print(f"| {mode} | **{statistics.median(figures):.1f}** | {shown} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(_MODES), help="comma-separated, from: " + ", ".join(_MODES))
    ap.add_argument("--ops", type=int, default=20_000, help="messages per round (default 20000)")
    ap.add_argument("--warm", type=int, default=1_000, help="messages not counted at the start (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    ap.add_argument("--feed", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.feed:
        run(_feed, args.feed, args.mode, args.ops)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in _MODES]
    if bad:
        ap.error(f"unknown mode: {', '.join(bad)} (choose from {', '.join(_MODES)})")
    if args.ops <= args.warm or args.warm < 1 or args.rounds < 1:
        ap.error("--ops must be more than --warm, and --warm and --rounds at least 1")
    run(_main, modes, args.ops, args.warm, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
