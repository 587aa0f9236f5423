"""The helpers the test modules share: one module, so no test module imports another.

In-process services (a recorder, a broker) for the length of a block; the services and the session
worker as real processes (``tests.session_worker``) for fault tests, and their clean-up; session
options; reads of the buckets and the dead-letter stream; the least-privilege deploy config. Event
classes of the foundation tests are in ``tests._events``; pytest fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats.js.errors
import pydantic

import bus
from bus import EmbeddedServer
from bus.testing import ServiceProcess, eventually
from schemas import ActivityRecord, DeadLetter, MessageRecord, SessionRecord
from services.broker import Broker, BrokerConfig
from services.recorder import Recorder, RecorderConfig

M = TypeVar("M", bound=pydantic.BaseModel)

# ---------------------------------------------------------------- in-process services

#: A recorder that sweeps often (lost hosts are found fast) and never prunes during a test.
FAST = RecorderConfig(sweep_interval=0.1, prune_interval=3600)
#: The token key of the in-process broker.
BROKER_KEY = b"k" * 32


@asynccontextmanager
async def running_recorder(b: bus.Bus, config: RecorderConfig = FAST) -> AsyncIterator[Recorder]:
    """An in-process recorder for the duration of the block."""
    rec = Recorder(b, config)
    async with anyio.create_task_group() as tg:
        await tg.start(rec.run)
        yield rec
        tg.cancel_scope.cancel()


@asynccontextmanager
async def running_broker(b: bus.Bus, **config: Any) -> AsyncIterator[Broker]:
    """An in-process broker (token key :data:`BROKER_KEY`) for the duration of the block."""
    broker = Broker(b, BrokerConfig(token_key=BROKER_KEY, **config))
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        yield broker
        tg.cancel_scope.cancel()


async def wait_record(
    b: bus.Bus, activity_id: str, until: Callable[[ActivityRecord], bool], *, timeout: float = 10.0
) -> tuple[ActivityRecord, list[MessageRecord]]:
    """Ask the recorder (``get``) until ``until(record)``; returns the record and its messages.

    Raises:
        TimeoutError: not within ``timeout``; the message holds the record last seen.
    """
    client = bus.ActivityClient(b)
    last: list[ActivityRecord] = []
    found: list[tuple[ActivityRecord, list[MessageRecord]]] = []

    async def matched() -> bool:
        try:
            reply = await client.get(activity_id, limit=0)
            last[:] = [reply.activity]
            if not until(reply.activity):
                return False
            reply = await client.get(activity_id)
        except bus.RemoteError as exc:
            if exc.remote_code != "not_found":
                raise
            return False
        except bus.RequestError:
            return False  # no reply in time: a recorder busy folding a large backlog answers late; ask again
        found.append((reply.activity, reply.messages))
        return True

    await eventually(
        matched, timeout=timeout, interval=0.02,
        what=lambda: f"activity {activity_id} matched; last seen: {last[0] if last else None!r}",
    )  # fmt: skip
    return found[0]


def terminal(r: ActivityRecord) -> bool:
    return r.terminal


# ---------------------------------------------------------------- sessions

#: Worker heartbeat interval and session heartbeat timeout of the in-process tests (interval * 2 <= timeout).
HB = 0.25
HT = 1.5


def session_opts(**kw: Any) -> bus.SessionOptions:
    """Options for sessions on in-process workers (heartbeats every :data:`HB`, timeout :data:`HT`)."""
    base: dict[str, Any] = {"execution_timeout": 60.0, "creation_timeout": 3.0, "heartbeat_timeout": HT}
    return bus.SessionOptions(**{**base, **kw})


def session_of(sctx: bus.Context) -> bus.SessionInfo:
    """The session a context is in (it must be in one)."""
    info = bus.get_session_info(sctx)
    assert info is not None
    return info


async def bucket_records(b: bus.Bus, bucket: str, keys: list[str], model: type[M]) -> dict[str, M | None]:
    """The record of each key in a key-value bucket (None: none), read key by key (``kv.keys()`` can
    come back short while the bucket is being written)."""
    kv = await b.kv(bucket)
    out: dict[str, M | None] = {}
    limiter = anyio.CapacityLimiter(64)

    async def one(key: str) -> None:
        async with limiter:
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                out[key] = None
                return
            out[key] = model.model_validate_json(entry.value) if entry.value else None

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(one, key)
    return out


async def records_of(b: bus.Bus, ids: list[str]) -> dict[str, SessionRecord | None]:
    """The sessions bucket's record of each session id."""
    return await bucket_records(b, "sessions", ids, SessionRecord)


# ---------------------------------------------------------------- services as processes

#: The token key, heartbeat interval and session heartbeat timeout of the fault tests' processes.
TOKEN_KEY = "x" * 32
INTERVAL = 0.3
HEARTBEAT_TIMEOUT = 2.0

_COUNT = re.compile(r"^sessions (\d+) peak (\d+)$")


def broker(prefix: str, url: str, *args: str) -> ServiceProcess:
    """``services.broker`` as a process (token key :data:`TOKEN_KEY`)."""
    return ServiceProcess("services.broker", "--prefix", prefix, *args, url=url, env={"CADENZA_TOKEN_KEY": TOKEN_KEY})


def worker(prefix: str, url: str, *, slots: int = 100, tasklist: str = "default") -> ServiceProcess:
    """``tests.session_worker`` as a process, heartbeating every :data:`INTERVAL`."""
    return ServiceProcess(
        "tests.session_worker", "--prefix", prefix, "--tasklist", tasklist, "--max-sessions", str(slots),
        "--interval", str(INTERVAL), url=url,
    )  # fmt: skip


def process_opts(creation_timeout: float = 10.0, **kw: Any) -> bus.SessionOptions:
    """Options for sessions on worker processes (heartbeat timeout :data:`HEARTBEAT_TIMEOUT`)."""
    return bus.SessionOptions(
        execution_timeout=kw.pop("execution_timeout", 600.0), creation_timeout=creation_timeout,
        heartbeat_timeout=kw.pop("heartbeat_timeout", HEARTBEAT_TIMEOUT), **kw,
    )  # fmt: skip


def reap(proc: ServiceProcess) -> None:
    """SIGKILL (if still running) and close the output pipe (an open pipe warns at collection)."""
    proc.kill()
    if proc._reader is not None:
        proc._reader.join(5)
    if proc.proc is not None and proc.proc.stdout is not None:
        proc.proc.stdout.close()


def started(stack: ExitStack, proc: ServiceProcess, timeout: float = 30) -> ServiceProcess:
    """Start ``proc`` (on this thread: it dies with the thread that started it), reaped when ``stack`` closes."""
    stack.callback(reap, proc)
    proc.start(timeout=timeout)
    return proc


def worker_id(proc: ServiceProcess) -> str:
    """The worker id a session worker printed in its ready line."""
    return next(line.split()[-1] for line in proc.output if "cadenza: ready worker" in line)


def counts(proc: ServiceProcess) -> tuple[int, int]:
    """A session worker's own (open, peak) as it last printed them."""
    for line in reversed(list(proc.output)):
        m = _COUNT.match(line.strip())
        if m:
            return int(m[1]), int(m[2])
    return 0, 0


def peak_ever(proc: ServiceProcess) -> int:
    """The highest count a session worker ever printed (open or peak)."""
    out = 0
    for line in list(proc.output):
        m = _COUNT.match(line.strip())
        if m:
            out = max(out, int(m[1]), int(m[2]))
    return out


# ---------------------------------------------------------------- dead letters


async def dead_letter_count(b: bus.Bus, consumer: str) -> int:
    """How many dead letters the DLQ stream holds for ``consumer``."""
    subject = b.subjects.build("dlq", consumer, "rejected")
    info = await b.js.stream_info(b.topology.stream_name("dlq"), subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def dead_letters(b: bus.Bus, consumer: str) -> list[DeadLetter]:
    """Every dead letter stored for ``consumer``: as many as the stream counts, read back in order."""
    subject = b.subjects.build("dlq", consumer, "rejected")
    expected = await dead_letter_count(b, consumer)
    sub = await b.js.pull_subscribe(subject, stream=b.topology.stream_name("dlq"))
    out: list[DeadLetter] = []
    try:
        with anyio.fail_after(60):
            while len(out) < expected:
                for m in await sub.fetch(min(500, expected - len(out)), timeout=10):
                    out.append(DeadLetter.model_validate_json(m.data))
                    await m.ack()
    finally:
        await sub.unsubscribe()
    return out


# ---------------------------------------------------------------- the least-privilege deploy (deploy/nats)

DEPLOY = Path(__file__).parent.parent / "deploy" / "nats"
USERS = ("admin", "broker", "recorder", "worker", "caller")


def deploy_env(passwords: dict[str, str]) -> dict[str, str]:
    """The environment deploy/nats's configs read: the users' passwords and one node's addresses."""
    env = {f"CADENZA_{u.upper()}_PASSWORD": p for u, p in passwords.items()}
    env.update(
        NODE_NAME="n1", NATS_HOST="127.0.0.1", NATS_PORT="4222", NATS_MONITOR="127.0.0.1:8222",
        CLUSTER_HOST="127.0.0.1", CLUSTER_PORT="6222", STORE_DIR="/tmp/cadenza-deploy-check",
        **{f"ROUTE_{i}": f"nats-route://127.0.0.1:{6221 + i}" for i in (1, 2, 3)},
    )  # fmt: skip
    return env


@contextlib.contextmanager
def secured_server(
    store: Path, passwords: dict[str, str], accounts: Path = DEPLOY / "accounts.conf"
) -> Iterator[EmbeddedServer]:
    """A loopback nats-server with ``accounts`` included, its passwords in its environment only."""
    server = EmbeddedServer(store, include=accounts)
    old = {k: os.environ.get(k) for k in deploy_env(passwords)}
    os.environ.update(deploy_env(passwords))
    try:
        server.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield server
    finally:
        server.stop()


def server_log(server: EmbeddedServer) -> str:
    """What the server has logged so far (its store holds ``nats-server.log``)."""
    path = Path(server.store_dir) / "nats-server.log"
    return path.read_text(errors="replace") if path.exists() else ""
