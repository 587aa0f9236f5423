"""Chaos on a 3-node loopback cluster with replicas 3 (issue 9, "Tests").

Two brokers, a recorder, three session workers and two load-generating callers
(tests/chaos_caller.py) run as separate processes against an :class:`EmbeddedCluster`. Faults, one
at a time: the JetStream meta-leader node SIGKILLed and restarted on its store (3 times; 6 in the
slow version), then a worker, a broker, the recorder and a caller SIGKILLed (broker and recorder
are started again, the worker is replaced, the caller is not). After each node kill the test opens
a new session of its own and times how long that takes (the recovery times are printed). After a
bounded settle it checks, from the processes' own output and from the buckets and streams:

- 0 acknowledged events lost (every ``ack`` a caller printed is in the activity stream);
- 0 activity failures before the first fault, 0 sessions open past their execution timeout;
- 0 activities ``running`` (or unrecorded) whose caller got a result (unrecorded ones of the worker
  killed on purpose are counted in the summary only: its unstored events die with it, a known limit);
- 0 workers over their slots (the worker's own count), 0 slots held by ended sessions;
- every process not killed on purpose is still alive;
- a new session succeeded within a bound after each node kill.

Every failed check is collected and reported together, so one run shows all of them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import anyio
import nats.errors
import nats.js.errors
import pytest

import bus
from bus.testing import EmbeddedCluster, ServiceProcess, eventually, unique_prefix
from schemas import ActivityRecord, ActivityStatus, SessionRecord, SessionState, WorkerRecord, utcnow
from tests._helpers import peak_ever, reap, started

TOKEN_KEY = "c" * 32
SLOTS = 6
INTERVAL = 0.3
EXECUTION_TIMEOUT = 10.0
#: After a node kill, a new session (and an activity in it) must succeed within this.
RECOVERY_BOUND = 15.0
#: Slack past a session's expiry for the broker's sweep to end it.
EXPIRY_GRACE = 5.0
#: The recorder's ack wait: an event whose delivery a kill lost is handed out again after it.
RECORDER_ACK_WAIT = 10.0

UNRECORDED = "activities running (or unrecorded) whose caller got a result"
OVER_SLOTS = "workers over their slots"


@dataclass
class Cast:
    """Every process of the run; ``killed`` holds the ones SIGKILLed on purpose and not restarted."""

    brokers: list[ServiceProcess]
    recorder: ServiceProcess
    workers: list[ServiceProcess]
    callers: list[ServiceProcess]
    retired: list[ServiceProcess] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    #: Faults after which the callers got no further results within the wait (so a later failure may
    #: be this one's, not its own fault's).
    stalls: list[str] = field(default_factory=list)
    deaths: dict[int, str] = field(default_factory=dict)
    unrecorded_on_killed: list[str] = field(default_factory=list)

    def note_deaths(self) -> None:
        """Remember every process that exited without being killed on purpose (checked after each
        fault, so a broker that died and was later restarted still counts)."""
        for proc in self.all():
            if proc.proc is not None and proc.pid not in self.killed and proc.pid not in self.deaths \
                    and not proc.running():  # fmt: skip
                tail = "".join(list(proc.output)[-6:])
                self.deaths[proc.pid] = f"{proc.module} pid {proc.pid} exited {proc.proc.returncode}:\n{tail}"

    def all(self) -> list[ServiceProcess]:
        return [*self.brokers, self.recorder, *self.workers, *self.callers, *self.retired]

    def lines(self, word: str, procs: list[ServiceProcess] | None = None) -> list[list[str]]:
        out = []
        for proc in procs if procs is not None else self.callers:
            out += [line.split() for line in list(proc.output) if line.startswith(word + " ")]
        return out


def _start(stack: ExitStack, proc: ServiceProcess) -> ServiceProcess:
    return started(stack, proc, timeout=60)


async def _load_progress(cast: Cast, more: int, timeout: float) -> bool:
    """Did the live callers get ``more`` further results within ``timeout``? (Notes deaths first.)"""
    cast.note_deaths()
    target = len(cast.lines("result")) + more
    try:
        await eventually(lambda: len(cast.lines("result")) >= target, timeout=timeout, interval=0.1,
                         what=f"{more} further results")  # fmt: skip
    except TimeoutError:
        return False
    return True


async def _load_after(cast: Cast, fault: str, more: int, timeout: float) -> None:
    """Wait for ``more`` results after ``fault``; note a stall (the run goes on to the next fault)."""
    t0 = time.monotonic()
    if not await _load_progress(cast, more, timeout):
        cast.stalls.append(f"{fault}: fewer than {more} results in {time.monotonic() - t0:.0f}s")


async def _new_session_within(b: bus.Bus, bound: float, errors: list[str]) -> float | None:
    """Seconds until a new session (and one activity in it) succeeds; None if not within ``bound``
    (the last error is appended to ``errors``)."""
    # Short waits per attempt, so the time measured is close to when the cluster serves again.
    options = bus.SessionOptions(execution_timeout=60, creation_timeout=2, heartbeat_timeout=3)
    t0 = time.monotonic()
    attempts: list[str] = []
    with anyio.move_on_after(bound):
        while True:
            t1 = time.monotonic()
            try:
                sctx = await bus.create_session(b.context(), options)
                await bus.execute_activity(sctx, "echo", "probe", start_to_close_timeout=3)
                with anyio.move_on_after(5):
                    await bus.complete_session(sctx)
                if attempts:  # captured output: where a slow recovery spent its time
                    print(f"probe ok after {time.monotonic() - t0:.1f}s; failed before: " + "; ".join(attempts))
                return time.monotonic() - t0
            except (bus.CadenzaError, nats.errors.Error) as exc:
                # nats.errors.Error: SessionClient.start lets a FlushTimeoutError through during a
                # reconnect (seen here); the probe keeps trying until its bound like a user would.
                attempts.append(f"+{t1 - t0:.1f}s..{time.monotonic() - t0:.1f}s {type(exc).__name__}: {exc}"[:300])
                await anyio.sleep(0.2)
    # Every attempt, so a failure shows where the time went (the first ones, not only the last).
    errors.append(f"{len(attempts)} attempts:\n      " + "\n      ".join(attempts[:3] + attempts[3:][-3:]))
    return None


#: A worker's count line (``sessions <open> peak <peak>``): left out of the state report.
_COUNT_LINE = re.compile(r"^sessions \d+ peak \d+$")


def _states(cast: Cast, since: dict[int, int]) -> str:
    """What each broker, the recorder and each worker was doing: alive or not, and its output since
    the node kill (``since``: output length per process then), for the report of a failed probe."""
    out = []
    for proc in [*cast.brokers, cast.recorder, *cast.workers]:
        lines = [line.rstrip() for line in proc.output[since.get(id(proc), 0):]
                 if not _COUNT_LINE.match(line.strip())]  # fmt: skip
        state = "running" if proc.running() else f"exited {proc.proc.returncode if proc.proc else '?'}"
        out.append(f"{proc.module} pid {proc.pid} ({state}), {len(lines)} lines since the kill:"
                   + "".join(f"\n        {line[:240]}" for line in lines[-8:]))  # fmt: skip
    return "\n    ".join(out)


async def _kv_get(kv: object, key: str) -> bytes | None:
    """One bucket value read from the bucket stream's leader (a direct get may be answered by a
    follower still catching up after its node's restart), or None when there is none; server hiccups
    are retried for a few seconds."""
    js, stream = kv._js, kv._stream  # type: ignore[attr-defined]
    with anyio.fail_after(20):
        while True:
            try:
                msg = await js.get_last_msg(stream, f"$KV.{stream.removeprefix('KV_')}.{key}", direct=False)
            except nats.js.errors.NotFoundError:
                return None
            except (nats.errors.Error, TimeoutError):
                await anyio.sleep(0.2)
                continue
            if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                return None
            return msg.data or None


async def _dead_letters_of(b: bus.Bus, aid: str) -> list[str]:
    """The recorder's dead letters of an activity's events (diagnosis of an unrecorded result)."""
    out: list[str] = []
    sub = await b.js.subscribe(b.subjects.build("dlq", "recorder", "rejected"), ordered_consumer=True,
                               stream=b.topology.stream_name("dlq"))  # fmt: skip
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            if aid.encode() in msg.data:
                out.append(json.loads(msg.data).get("reason", "")[:200])
    finally:
        await sub.unsubscribe()
    return out


async def _in_stream(b: bus.Bus, aid: str, event: str) -> bool:
    try:
        with anyio.fail_after(10):
            await b.js.get_last_msg(b.topology.stream_name("activity"), b.subjects.build("activity", aid, event))
    except (nats.errors.Error, TimeoutError):
        return False
    return True


async def _each(items: list[str], fn: object) -> None:
    limiter = anyio.CapacityLimiter(32)

    async def one(item: str) -> None:
        async with limiter:
            await fn(item)  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)


async def _violations(
    b: bus.Bus, cast: Cast, recoveries: list[float | None], probe_errors: list[str]
) -> dict[str, list[str]]:
    """What is wrong now, per check (empty lists: all good)."""
    found: dict[str, list[str]] = {k: [] for k in (
        "acknowledged events lost", "sessions open past their execution timeout",
        UNRECORDED, OVER_SLOTS,
        "slots held by ended sessions", "processes not killed but not running", "no new session after a node kill",
    )}  # fmt: skip
    stream = b.topology.stream_name("activity")

    async def stored(line: list[str]) -> None:
        _, event_id, subject = line[:3]
        with anyio.fail_after(20):
            while True:
                try:
                    msg = await b.js.get_last_msg(stream, subject)
                    break
                except nats.js.errors.NotFoundError:
                    found["acknowledged events lost"].append(f"{event_id} ({subject}): not in {stream}")
                    return
                except (nats.errors.Error, TimeoutError):
                    await anyio.sleep(0.2)
        # By the body's event id (a completion is stored without Nats-Msg-Id: docs/wire.md).
        try:
            stored_id = json.loads(msg.data).get("event_id")
        except (ValueError, AttributeError):
            stored_id = None
        if stored_id != event_id:
            found["acknowledged events lost"].append(f"{event_id}: the last message on {subject} is another")

    acks = cast.lines("ack", cast.all())
    await _each([" ".join(a) for a in acks], lambda s: stored(s.split()))

    sessions = await b.kv("sessions")
    now = utcnow()
    sids = sorted({line[1] for line in cast.lines("opened", cast.all())})
    records: dict[str, SessionRecord | None] = {}

    async def session(sid: str) -> None:
        value = await _kv_get(sessions, sid)
        records[sid] = SessionRecord.model_validate_json(value) if value else None

    await _each(sids, session)
    for sid, rec in records.items():
        if rec is not None and rec.state is SessionState.OPEN and rec.expires_at is not None \
                and rec.expires_at + timedelta(seconds=EXPIRY_GRACE) < now:  # fmt: skip
            found["sessions open past their execution timeout"].append(f"{sid} expired at {rec.expires_at}")

    client = bus.ActivityClient(b, timeout=10.0)

    async def recorded(aid: str) -> ActivityRecord | None:
        """The recorder's record (it folds the activity stream; asked, not read behind its back)."""
        with anyio.fail_after(60):
            while True:
                try:
                    return (await client.get(aid, limit=0)).activity
                except bus.RemoteError as exc:
                    if exc.remote_code == "not_found":
                        return None
                    raise
                except bus.RequestError:
                    await anyio.sleep(0.5)  # a recorder started again is reading the stream: ask again

    worker_of = {line[1]: line[2] for line in cast.lines("opened", cast.all()) if len(line) > 2}
    killed_workers = {p.ready_line.split()[-1] for p in cast.retired if p.ready_line}
    cast.unrecorded_on_killed.clear()

    async def activity(line: list[str]) -> None:
        aid, sid = line[1], line[2]
        record = await recorded(aid)
        if record is None and worker_of.get(sid) in killed_workers:
            # Known limit (docs/DESIGN.md, "the outbox"): events a SIGKILLed worker had not stored yet
            # die with it; reported in the summary, not a failure of this test.
            cast.unrecorded_on_killed.append(aid)
            return
        if record is None:
            stored_events = [e for e in ("started", "completed") if await _in_stream(b, aid, e)]
            stored_events += [f"dead-lettered: {d}" for d in await _dead_letters_of(b, aid)]
            found[UNRECORDED].append(
                f"{aid}: no record (session {sid} on {worker_of.get(sid, '?')}; its events in the activity stream: "
                f"{', '.join(stored_events) or 'none'})"
            )
            return
        if record.status in (ActivityStatus.RUNNING, ActivityStatus.QUEUED):
            stored_events = [e for e in ("started", "completed") if await _in_stream(b, aid, e)]
            stored_events += [f"dead-lettered: {d}" for d in await _dead_letters_of(b, aid)]
            found[UNRECORDED].append(
                f"{aid}: {record.status.value} (session {sid} on {worker_of.get(sid, '?')}; its events in the "
                f"activity stream: {', '.join(stored_events) or 'none'})"
            )

    await _each([" ".join(line) for line in cast.lines("result", cast.all())], lambda t: activity(t.split()))

    workers_kv = await b.kv("workers")
    for proc in cast.workers + cast.retired:
        if "tests.session_worker" not in proc.module:
            continue
        if peak_ever(proc) > SLOTS:
            said = [line.strip()[-160:] for line in list(proc.output) if "beyond its" in line][:2]
            found[OVER_SLOTS].append(f"{proc.ready_line}: peak {peak_ever(proc)} > {SLOTS}; " + " | ".join(said))
        wid = proc.ready_line.split()[-1] if proc.ready_line else ""
        value = await _kv_get(workers_kv, wid) if wid else None
        if value is None:
            continue
        for sid in WorkerRecord.model_validate_json(value).sessions:
            rec = records.get(sid)
            if rec is None and sid not in records:
                raw = await _kv_get(sessions, sid)
                rec = SessionRecord.model_validate_json(raw) if raw else None
            if rec is None or rec.state is not SessionState.OPEN:
                state = "no record" if rec is None else rec.state.value
                found["slots held by ended sessions"].append(f"{wid} holds {sid} ({state})")

    cast.note_deaths()
    found["processes not killed but not running"] = list(cast.deaths.values())
    for k, rec_time in enumerate(recoveries, 1):
        if rec_time is None:
            found["no new session after a node kill"].append(f"node kill #{k}: none within {RECOVERY_BOUND:g}s")
    found["no new session after a node kill"] += [f"probe: {e}" for e in probe_errors]
    return found


def _summary(cast: Cast, recoveries: list[float | None]) -> str:
    spurious = [line for line in cast.lines("activity_error", cast.all()) if "is not open on worker" in " ".join(line)]
    times = ", ".join("never" if r is None else f"{r:.1f}s" for r in recoveries)
    return (
        f"recovery after node kills: {times}; sessions opened {len(cast.lines('opened', cast.all()))}, "
        f"creations failed {len(cast.lines('create_failed', cast.all()))}, activity results "
        f"{len(cast.lines('result', cast.all()))}, activity errors {len(cast.lines('activity_error', cast.all()))} "
        f'("not open on worker": {len(spurious)}), acknowledged events {len(cast.lines("ack", cast.all()))}, '
        f"results of the killed worker the recorder never heard of {len(cast.unrecorded_on_killed)}"
        + "".join(f"\n  load stalled after {stall}" for stall in cast.stalls)
        + "".join(
            f"\n  activity error: {' '.join(line[2:])[:160]}" for line in cast.lines("activity_error", cast.all())[:5]
        )
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(3, tmp_path / "cluster", name="chaos") as c:
        yield c


async def _chaos(cluster: EmbeddedCluster, *, node_kills: int, load: int) -> None:
    prefix = unique_prefix("chaos")
    url = cluster.urls
    env = {"CADENZA_REPLICAS": "3", "CADENZA_TOKEN_KEY": TOKEN_KEY}
    timeouts = bus.Timeouts(connect=20)

    def worker() -> ServiceProcess:
        return ServiceProcess("tests.session_worker", "--prefix", prefix, "--max-sessions", str(SLOTS),
                              "--interval", str(INTERVAL), url=url, env=env)  # fmt: skip

    def broker() -> ServiceProcess:
        return ServiceProcess("services.broker", "--prefix", prefix, url=url, env=env)

    def recorder() -> ServiceProcess:
        # No pruning: pruned activities would be purged from the stream the loss check reads.
        return ServiceProcess("services.recorder", "--prefix", prefix, "--retention-count", "0", url=url, env=env)

    def caller() -> ServiceProcess:
        return ServiceProcess("tests.chaos_caller", "--prefix", prefix, "--concurrency", "3",
                              "--execution-timeout", str(EXECUTION_TIMEOUT), url=url, env=env)  # fmt: skip

    recoveries: list[float | None] = []
    probe_errors: list[str] = []
    with ExitStack() as stack:
        async with bus.connect(url, prefix=prefix, replicas=3, name="chaos-test", timeouts=timeouts) as b:
            # Started one after the other on this thread (they die with the thread that started them).
            cast = Cast(
                brokers=[_start(stack, broker()) for _ in range(2)], recorder=_start(stack, recorder()),
                workers=[_start(stack, worker()) for _ in range(3)],
                callers=[_start(stack, caller()) for _ in range(2)],
            )  # fmt: skip
            assert await _load_progress(cast, load, 60), "no load before any fault: " + _summary(cast, recoveries)
            assert await _new_session_within(b, RECOVERY_BOUND, probe_errors) is not None, probe_errors
            # Before any fault, no activity may fail (issue 9's "not open on worker" came with no fault at all).
            unfaulted = [" ".join(line[1:]) for line in cast.lines("activity_error", cast.all())]

            for _ in range(node_kills):
                leader = cluster.meta_leader()
                since = {id(p): len(p.output) for p in cast.all()}
                cluster.kill(leader)
                recoveries.append(await _new_session_within(b, RECOVERY_BOUND, probe_errors))
                if recoveries[-1] is None:
                    probe_errors.append(f"after node kill #{len(recoveries)} ({leader}):\n    " + _states(cast, since))
                cluster.restart(leader, wait=False)  # from this thread: the node dies with its starter
                await anyio.to_thread.run_sync(cluster.wait_formed)
                await _load_after(cast, f"node {leader} killed and restarted (#{len(recoveries)})", load // 2, 20)

            # A worker: its sessions fail worker_lost; a replacement joins.
            cast.note_deaths()
            victim = cast.workers.pop(0)
            victim.kill()
            cast.killed.add(victim.pid)
            cast.retired.append(victim)
            cast.workers.append(_start(stack, worker()))
            await _load_after(cast, "a worker killed", load // 2, 20)
            # A broker, then the recorder: SIGKILLed and started again.
            for proc in (cast.brokers[0], cast.recorder):
                cast.note_deaths()
                pid = proc.pid
                reap(proc)  # SIGKILL; its output so far stays in proc.output
                cast.killed.add(pid)
                proc.start(timeout=60)
                await _load_after(cast, f"{proc.module} killed and started again", load // 2, 20)
            # A caller: its open sessions are left to expire (execution timeout) or fail.
            cast.note_deaths()
            gone = cast.callers[1]
            gone.kill()
            cast.killed.add(gone.pid)
            await _load_after(cast, "a caller killed", load // 2, 20)

            cast.note_deaths()
            # Settle: the remaining caller stops (gracefully); then every check must hold within a bound.
            cast.callers[0].stop(timeout=15)
            cast.killed.add(cast.callers[0].pid)
            deadline = time.monotonic() + max(EXECUTION_TIMEOUT + EXPIRY_GRACE, RECORDER_ACK_WAIT + 5) + 10
            while True:
                found = await _violations(b, cast, recoveries, probe_errors)
                found["activity failures before any fault"] = unfaulted
                if not any(found.values()) or time.monotonic() > deadline:
                    break
                await anyio.sleep(1.0)
    summary = _summary(cast, recoveries)
    print(summary)
    failed = {k: v for k, v in found.items() if v}
    report = "\n".join(f"- {k}: {len(v)}\n    " + "\n    ".join(v[:5]) for k, v in failed.items())
    if failed:
        report += f"\nevery process's output: {_keep_outputs(cast, cluster)}"
    assert not failed, f"{summary}\n{report}"


def _keep_outputs(cast: Cast, cluster: EmbeddedCluster) -> Path:
    """Every process's whole output, one file each, beside the cluster's stores (pytest keeps the
    temporary directories of its last three sessions)."""
    out = cluster.store_root / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    for n, proc in enumerate(cast.all()):
        (out / f"{n:02d}-{proc.module}-{proc.pid}.log").write_text("".join(proc.output))
    return out


@pytest.mark.timeout(300)
async def test_a_cluster_rides_out_node_broker_recorder_worker_and_caller_kills(cluster: EmbeddedCluster) -> None:
    """Short version (CI): 3 meta-leader kills, then one of each service."""
    await _chaos(cluster, node_kills=3, load=20)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_cluster_rides_out_many_node_kills_under_load(cluster: EmbeddedCluster) -> None:
    """Long version (``-m slow``): 6 meta-leader kills with more load between them."""
    await _chaos(cluster, node_kills=6, load=100)
