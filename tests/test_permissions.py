"""Private replies: each user reads only its own inboxes, the token key only the broker, and callers
publish no worker events. Against a real nats-server whose config is deploy/nats/accounts.conf plus a
second caller user made from the ``caller`` block the way deploy/README.md says to add one."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import bus
from bus import EmbeddedServer
from bus.sessions._client import client_of
from bus.testing import eventually, unique_prefix
from schemas import (
    ActivityResult,
    ActivityStatus,
    ActivityTask,
    SessionRecord,
    SessionState,
    WorkerPing,
    WorkerPong,
    utcnow,
)
from services.broker import Broker, BrokerConfig, BrokerState
from services.recorder import Recorder
from tests._helpers import DEPLOY, USERS, secured_server, server_log

ROLES = (*USERS, "caller2")
KEY_ENTRY = "_broker-token-key"


def _with_second_caller(accounts: str) -> str:
    """accounts.conf with ``caller2``: the caller block copied under its own name and inbox prefix, and
    the worker allowed to answer it (deploy/README.md, "Another caller user")."""
    start = accounts.index("        # Callers:")
    start = accounts.rindex("      {\n", 0, start)
    end = accounts.index("\n      }\n", start) + len("\n      }\n")
    block = accounts[start:end]
    assert block.count("user: caller,") == 1 and block.count("_INBOX_caller.>") == 1, block
    assert block.count('"cadenza.done.caller.>"') == 1, block
    copy = (block.replace("user: caller,", "user: caller2,")
            .replace("$CADENZA_CALLER_PASSWORD", "$CADENZA_CALLER2_PASSWORD")
            .replace("_INBOX_caller.>", "_INBOX_caller2.>")
            .replace('"cadenza.done.caller.>"', '"cadenza.done.caller2.>"'))  # fmt: skip
    worker_replies = '"cadenza.dlq.>", "_INBOX_caller.>",'
    assert accounts.count(worker_replies) == 1, "the worker's reply permission moved: update this test"
    out = accounts[:end] + copy + accounts[end:]
    return out.replace(worker_replies, '"cadenza.dlq.>", "_INBOX_caller.>", "_INBOX_caller2.>",')


@pytest.fixture(scope="module")
def role_passwords() -> dict[str, str]:
    return {u: secrets.token_hex(12) for u in ROLES}


@pytest.fixture(scope="module")
def private(role_passwords: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    conf = tmp_path_factory.mktemp("conf") / "accounts.conf"
    conf.write_text(_with_second_caller((DEPLOY / "accounts.conf").read_text()))
    with secured_server(tmp_path_factory.mktemp("private"), role_passwords, conf) as server:
        yield server


@pytest.fixture
async def topology(private: EmbeddedServer, role_passwords: dict[str, str]) -> None:
    """``cadenza setup`` as admin: every stream and bucket, the broker's included (idempotent)."""
    async with bus.connect(options=_opts(private, role_passwords, "admin"), prefix="cadenza"):
        pass


def _opts(server: EmbeddedServer, passwords: dict[str, str], user: str) -> bus.ConnectOptions:
    return bus.ConnectOptions(servers=(server.url,), user=user, password=passwords[user], name=f"perm-{user}")


class _Client:
    """A raw nats-py connection as one user that keeps what the server reported on the error callback."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NatsClient | None = None

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())

    async def denied(self, what: str, subject: str) -> None:
        """Wait (bounded) until the server reported a permissions violation for ``what`` to ``subject``."""
        needle = f'permissions violation for {what} to "{subject.lower()}'
        await eventually(lambda: any(needle in e for e in self.errors), timeout=10,
                         what=f"the server to deny the {what} to {subject}; it reported {self.errors}")  # fmt: skip


@asynccontextmanager
async def _raw(server: EmbeddedServer, passwords: dict[str, str], user: str) -> AsyncIterator[_Client]:
    c = _Client()
    prefix = bus.ConnectOptions(user=user).resolved_inbox_prefix()
    c.nc = await nats.connect(server.url, user=user, password=passwords[user], error_cb=c.on_error,
                              inbox_prefix=prefix, allow_reconnect=False)  # fmt: skip
    try:
        yield c
    finally:
        await c.nc.close()


# ---------------------------------------------------------------- the prefix (no server)


def test_the_inbox_prefix_is_per_user_unless_cadenza_inbox_prefix_says_otherwise() -> None:
    assert bus.ConnectOptions.from_env({"NATS_USER": "caller"}).resolved_inbox_prefix() == "_INBOX_caller"
    assert bus.ConnectOptions(user="broker").resolved_inbox_prefix() == "_INBOX_broker"
    env = {"NATS_USER": "caller", "CADENZA_INBOX_PREFIX": "_INBOX.team-a"}
    assert bus.ConnectOptions.from_env(env).resolved_inbox_prefix() == "_INBOX.team-a"
    assert bus.ConnectOptions.from_env({}).resolved_inbox_prefix() == "_INBOX"  # no user: nats-py's default
    assert bus.ConnectOptions(user="a.b c*").resolved_inbox_prefix() == "_INBOX_a_b_c_"  # one subject token
    for bad in ("_INBOX.>", "_INBOX.*", "a..b", "a b", ""):
        with pytest.raises(ValueError, match="inbox prefix"):
            bus.ConnectOptions(inbox_prefix=bad).resolved_inbox_prefix()


async def test_a_bad_inbox_prefix_is_a_connect_error_that_names_the_variable() -> None:
    opts = bus.ConnectOptions(servers=("nats://127.0.0.1:1",), inbox_prefix="_INBOX.>")
    with anyio.fail_after(10), pytest.raises(bus.ConnectError, match="CADENZA_INBOX_PREFIX"):
        async with bus.connect(options=opts, ensure_topology=False):
            pass


async def test_the_bus_makes_every_inbox_under_its_prefix(nats_server: EmbeddedServer) -> None:
    opts = bus.ConnectOptions(servers=(nats_server.url,), inbox_prefix="_INBOX_unit")
    async with bus.connect(options=opts, prefix=unique_prefix(), timeouts=bus.Timeouts(connect=5)) as b:
        assert b.nc.new_inbox().startswith("_INBOX_unit.")
        # A JetStream round trip (its reply comes back on the prefix) and a KV watcher (its deliveries).
        kv = await b.kv("sessions")
        await kv.put("k", b"v")
        watcher = await kv.watchall()
        values: list[bytes | None] = []
        with anyio.fail_after(10):
            async for entry in watcher:
                values.append(None if entry is None else entry.value)
                break
        assert values == [b"v"]


# ---------------------------------------------------------------- the token key


async def test_without_a_key_the_broker_keeps_its_generated_key_in_its_own_bucket_never_the_sessions_one(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CADENZA_TOKEN_KEY", raising=False)
    monkeypatch.delenv("CADENZA_REQUIRE_TOKEN_KEY", raising=False)
    async with bus.connect(nats_server.url, prefix=unique_prefix(), timeouts=bus.Timeouts(connect=5)) as b:
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(b).run)
            tg.cancel_scope.cancel()
        assert len((await (await b.kv("broker")).get(KEY_ENTRY)).value or b"") == 64
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await (await b.kv("sessions")).get(KEY_ENTRY)


async def _revisions(b: bus.Bus, bucket: str, key: str) -> list[bytes]:
    """Every message the bucket's stream holds under ``key`` (values; markers as empty), oldest first,
    read one by one by sequence. Not nats-py's ``KeyValue.history``: under load its watcher can signal
    the end before the first message is counted, and then says there are none."""
    kv = await b.kv(bucket)
    found: list[bytes] = []
    seq = 1
    while True:
        try:
            with anyio.fail_after(10):
                msg = await b.js.get_msg(kv._stream, seq=seq, subject=f"{kv._pre}{key}", next=True)
        except nats.js.errors.NotFoundError:
            return found
        found.append(msg.data or b"")
        seq = (msg.seq or seq) + 1


async def test_a_broker_moves_an_old_generated_key_out_of_the_sessions_bucket_and_keeps_it_valid(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CADENZA_TOKEN_KEY", raising=False)
    monkeypatch.delenv("CADENZA_REQUIRE_TOKEN_KEY", raising=False)
    old = secrets.token_hex(32).encode()
    async with bus.connect(nats_server.url, prefix=unique_prefix(), timeouts=bus.Timeouts(connect=5)) as b:
        sessions = await b.kv("sessions")
        await sessions.put(KEY_ENTRY, old)  # where brokers before this change kept it
        await sessions.put(KEY_ENTRY, old)  # two revisions: the purge must drop the history too
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(b).run)
            tg.cancel_scope.cancel()
        assert (await (await b.kv("broker")).get(KEY_ENTRY)).value == old  # tokens signed with it stay valid
        readable = [v for v in await _revisions(b, "sessions", KEY_ENTRY) if v]
        assert readable == [], "a revision of the old key is still readable"


async def test_a_deleted_old_key_whose_revisions_remain_is_purged_too(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CADENZA_TOKEN_KEY", "k" * 32)
    async with bus.connect(nats_server.url, prefix=unique_prefix(), timeouts=bus.Timeouts(connect=5)) as b:
        sessions = await b.kv("sessions")
        await sessions.put(KEY_ENTRY, secrets.token_hex(32).encode())
        await sessions.delete(KEY_ENTRY)  # a delete marker: the value stays in the bucket's history
        assert [v for v in await _revisions(b, "sessions", KEY_ENTRY) if v]
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(b).run)
            tg.cancel_scope.cancel()
        assert [v for v in await _revisions(b, "sessions", KEY_ENTRY) if v] == []


async def test_a_broker_that_requires_a_key_refuses_to_start_without_one(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CADENZA_TOKEN_KEY", raising=False)
    monkeypatch.setenv("CADENZA_REQUIRE_TOKEN_KEY", "1")
    async with bus.connect(nats_server.url, prefix=unique_prefix(), timeouts=bus.Timeouts(connect=5)) as b:
        refusing = Broker(b)
        with anyio.fail_after(20), pytest.raises(bus.CadenzaError, match="CADENZA_TOKEN_KEY is not set"):
            await refusing.run()  # it refuses before it consumes anything
        assert refusing.state is BrokerState.STOPPED
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await (await b.kv("broker")).get(KEY_ENTRY)  # nothing generated
        monkeypatch.setenv("CADENZA_TOKEN_KEY", "k" * 32)  # with the key it starts
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(b).run)
            tg.cancel_scope.cancel()


# ---------------------------------------------------------------- per role, on the deploy config


@pytest.mark.parametrize("user", ROLES)
async def test_a_user_may_subscribe_to_its_own_inbox_prefix_only(
    private: EmbeddedServer, role_passwords: dict[str, str], user: str
) -> None:
    others = [f"_INBOX_{o}.>" for o in ROLES if o != user]
    # The completions the activity stream republishes to callers: each caller its own, nobody else any.
    # (The admin reads all of cadenza.>.)
    if user != "admin":
        others += [f"cadenza.done.{o}.>" for o in ROLES if o != user] + ["cadenza.done.>"]
    async with _raw(private, role_passwords, user) as c:
        assert c.nc is not None
        for subject in ["_INBOX.>", "_INBOX.abc.def", ">", *others]:
            await c.nc.subscribe(subject)
            await c.nc.flush()
            await c.denied("subscription", subject)
        # Its own prefix is allowed: no violation, and a JetStream API request is answered on it.
        own = f"_INBOX_{user}.>"
        before = len(c.errors)
        await c.nc.subscribe(own)
        if user.startswith("caller"):
            await c.nc.subscribe(f"cadenza.done.{user}.>")
        with anyio.fail_after(10):
            reply = await c.nc.request("$JS.API.INFO", b"", timeout=5)
        assert b"jetstream" in reply.data.lower() or b"account" in reply.data.lower()
        await c.nc.flush()
        assert c.errors[before:] == []


async def test_a_caller_cannot_publish_worker_events_and_a_forged_heartbeat_is_never_stored(
    private: EmbeddedServer, role_passwords: dict[str, str], topology: None
) -> None:
    forged, real = f"wf{secrets.token_hex(4)}", f"wr{secrets.token_hex(4)}"
    body = b'{"type": "worker.heartbeat"}'  # the server refuses it before anyone reads the body
    async with _raw(private, role_passwords, "caller") as c:
        assert c.nc is not None
        subject = f"cadenza.worker.{forged}.heartbeat"
        await c.nc.publish(subject, body)
        await c.nc.flush()
        await c.denied("publish", subject)
    async with (
        bus.connect(options=_opts(private, role_passwords, "worker"), prefix="cadenza") as wb,
        bus.connect(options=_opts(private, role_passwords, "admin"), prefix="cadenza") as admin,
    ):
        # The same event from a worker is stored: the check below could see a forged one.
        await bus.Heartbeater(wb, worker_id=real, interval=30).beat()
        stream = admin.topology.stream_name("worker")

        async def stored(worker_id: str) -> bool:
            try:
                await admin.js.get_last_msg(stream, f"cadenza.worker.{worker_id}.heartbeat")
                return True
            except nats.js.errors.NotFoundError:
                return False

        await eventually(lambda: stored(real), interval=0.05, what="the worker's own heartbeat stored")
        assert not await stored(forged)


async def test_a_caller_cannot_read_the_broker_bucket_its_feed_or_the_generated_key(
    private: EmbeddedServer, role_passwords: dict[str, str], topology: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CADENZA_TOKEN_KEY", raising=False)
    monkeypatch.delenv("CADENZA_REQUIRE_TOKEN_KEY", raising=False)
    timeouts = bus.Timeouts(connect=5, request=3)
    async with bus.connect(options=_opts(private, role_passwords, "broker"), prefix="cadenza", timeouts=timeouts) as bb:
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(bb).run)  # generates the key (as the broker user) into its bucket
            tg.cancel_scope.cancel()
        assert (await (await bb.kv("broker")).get(KEY_ENTRY)).value
    async with _raw(private, role_passwords, "caller") as c:
        assert c.nc is not None
        js = c.nc.jetstream(timeout=3)
        with pytest.raises(nats.errors.Error):  # denied: the request never reaches JetStream
            await js.get_msg("KV_cadenza_broker", subject=f"$KV.cadenza_broker.{KEY_ENTRY}")
        await c.denied("publish", "$JS.API.STREAM.MSG.GET.KV_cadenza_broker")
        with pytest.raises(nats.errors.Error):
            await js.get_msg("KV_cadenza_broker", subject=f"$KV.cadenza_broker.{KEY_ENTRY}", direct=True)
        await c.denied("publish", f"$JS.API.DIRECT.GET.KV_cadenza_broker.$KV.cadenza_broker.{KEY_ENTRY}")
        with pytest.raises(nats.errors.Error):  # no watcher of its own on the broker's buckets either
            await js.subscribe("$KV.cadenza_sessions.>", stream="KV_cadenza_sessions", ordered_consumer=True)
        await c.denied("publish", "$JS.API.CONSUMER.CREATE.KV_cadenza_sessions")
        await c.nc.subscribe("$KV.cadenza_broker.>")  # nor hear the puts go by
        await c.nc.flush()
        await c.denied("subscription", "$KV.cadenza_broker.>")
        # The sessions bucket holds no key to find (what a caller may read there).
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_msg("KV_cadenza_sessions", subject=f"$KV.cadenza_sessions.{KEY_ENTRY}")


async def test_each_role_does_its_job_and_no_caller_reads_another_callers_result(
    private: EmbeddedServer, role_passwords: dict[str, str], topology: None
) -> None:
    """Broker, recorder, worker, two callers, each as its own user with private inboxes: a session with an
    activity, a tracked activity run by a service (as the worker user), and the other caller's attempts
    to listen to the first caller's replies are all refused. No other permission violation is logged."""
    log_from = len(server_log(private))
    tasklist = f"perm{secrets.token_hex(4)}"
    secret = secrets.token_hex(8)
    registry = bus.ActivityRegistry()

    @registry.activity("secret")
    async def _secret() -> str:
        return secret

    timeouts = bus.Timeouts(connect=5)

    def connect(user: str) -> AbstractAsyncContextManager[bus.Bus]:
        return bus.connect(options=_opts(private, role_passwords, user), prefix="cadenza", timeouts=timeouts)

    with anyio.fail_after(90):
        async with (
            connect("broker") as bb, connect("recorder") as rb, connect("worker") as wb, connect("caller") as cb,
            _raw(private, role_passwords, "caller2") as spy,
            anyio.create_task_group() as tg,
        ):  # fmt: skip
            await tg.start(Broker(bb, BrokerConfig(token_key=secrets.token_bytes(32))).run)
            await tg.start(Recorder(rb).run)
            assert spy.nc is not None
            heard: list[bytes] = []

            async def listen(msg: Msg) -> None:
                heard.append(msg.data)

            for subject in ("_INBOX_caller.>", "_INBOX.>", ">", "cadenza.done.caller.>", "cadenza.done.>"):
                await spy.nc.subscribe(subject, cb=listen)
                await spy.nc.flush()
                await spy.denied("subscription", subject)
            async with bus.Worker(wb, tasklist=tasklist, heartbeat_interval=0.5, activities=registry) as worker:
                # The broker's probe of a late worker: the pong goes to the broker's private inbox
                # (allowed to the worker as a response only).
                pong = await bb.request(bb.rpc_subject(worker.worker_id, "ping"), WorkerPing(), WorkerPong, timeout=5)
                assert pong.worker_id == worker.worker_id
                options = bus.SessionOptions(execution_timeout=60, creation_timeout=15, heartbeat_timeout=3,
                                             tasklist=tasklist)  # fmt: skip
                async with bus.session(cb.context(), options) as sctx:
                    info = bus.get_session_info(sctx)
                    assert info is not None and info.worker_id == worker.worker_id
                    assert await bus.execute_activity(sctx, "secret", start_to_close_timeout=20) == secret
                    # Its result came as the stored completion, republished to the caller's own subject.
                    assert (await client_of(cb)).route.startswith("caller~")
                assert await bus.execute_activity(cb.context(), "secret", tasklist=tasklist,
                                                  start_to_close_timeout=20) == secret  # fmt: skip
            # A tracked activity of a service: it heartbeats as a worker, so it connects as one.
            async with bus.BusActivityService(wb, heartbeat_interval=0.5) as svc:

                async def work(ctx: bus.Context) -> None:
                    pass

                aid, err = await bus.run_handler_activity(bus.background(), svc, bus.HandlerOptions(type="perm"), work)
            assert aid and err is None
            client = bus.ActivityClient(cb, timeout=5)

            async def recorded() -> ActivityStatus | None:
                try:
                    return (await client.get(aid)).activity.status
                except bus.RemoteError:
                    return None

            async def succeeded() -> bool:
                return await recorded() is ActivityStatus.SUCCESS

            await eventually(succeeded, timeout=20, interval=0.05, what="the activity recorded as succeeded")
            await spy.nc.flush()
            assert not [h for h in heard if secret.encode() in h], "caller2 heard caller's result"
            tg.cancel_scope.cancel()
    logged = [line for line in server_log(private)[log_from:].splitlines() if "Violation" in line]
    expected = [line for line in logged if "user:caller2" in line and "Subscription" in line]
    assert len(expected) == 5, logged
    unexpected = [line for line in logged if line not in expected]
    assert not unexpected, "permission violations:\n" + "\n".join(unexpected)


async def test_a_worker_may_read_a_session_record_for_a_task_that_came_before_its_notice(
    private: EmbeddedServer, role_passwords: dict[str, str], topology: None
) -> None:
    async with bus.connect(options=_opts(private, role_passwords, "worker"), prefix="cadenza") as wb:
        w = bus.Worker(wb, tasklist="perm-overtake", heartbeat_interval=0.5)

        @w.activity("echo")
        async def echo(x: object) -> object:
            return x

        async with w, bus.connect(options=_opts(private, role_passwords, "broker"), prefix="cadenza") as bb:
            now = utcnow()
            record = SessionRecord(session_id="perm-overtaken", tasklist="perm-overtake", state=SessionState.OPEN,
                                   worker_id=w.worker_id, opened_at=now, requested_at=now)  # fmt: skip
            await (await bb.kv("sessions")).put("perm-overtaken", record.model_dump_json().encode())
            async with bus.connect(options=_opts(private, role_passwords, "caller"), prefix="cadenza") as cb:
                got: list[ActivityResult] = []
                inbox = cb.nc.new_inbox()

                async def on_reply(msg: Msg) -> None:
                    got.append(bus.decode(msg.data, msg.headers, [ActivityResult]))

                await cb.nc.subscribe(inbox, cb=on_reply)
                await cb.publish(ActivityTask(activity_id="perm-overtake-1", name="echo", args=["hi"],
                                              worker_id=w.worker_id, session_id="perm-overtaken",
                                              reply_to=inbox))  # fmt: skip
                await eventually(lambda: bool(got), timeout=30, what="the worker's answer")
    assert got[0].ok and got[0].result == "hi", got[0]
