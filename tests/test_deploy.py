"""deploy/: the nats-server configs parse, and the per-service users have least privilege."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import nats
import pytest

import bus
import bus.testing
from bus import EmbeddedServer, find_server_binary
from bus.testing import ChildProcess as Child
from schemas import CancelActivityReply
from tests._helpers import DEPLOY, USERS, deploy_env, secured_server, server_log


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {u: secrets.token_hex(12) for u in USERS}


@pytest.mark.parametrize("name", ["single.conf", "cluster.conf"])
def test_nats_server_accepts_the_config(name: str, passwords: dict[str, str], tmp_path: Path) -> None:
    for f in DEPLOY.glob("*.conf"):
        shutil.copy(f, tmp_path / f.name)
    out = subprocess.run(
        [find_server_binary(), "-t", "-c", str(tmp_path / name)],
        capture_output=True, text=True, timeout=30, env=deploy_env(passwords),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def secured(passwords: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with secured_server(tmp_path_factory.mktemp("secured"), passwords) as server:
        yield server


async def _delivered(
    url: str, passwords: dict[str, str], sender: str, receiver: str, subject: str, listen: str | None = None
) -> bool:
    """Does a core message published by ``sender`` reach ``receiver`` subscribed on ``listen``?"""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    rx = await nats.connect(url, user=receiver, password=passwords[receiver], error_cb=on_error)
    tx = await nats.connect(url, user=sender, password=passwords[sender], error_cb=on_error)
    try:
        sub = await rx.subscribe(listen or subject)
        await rx.flush()
        await tx.publish(subject, b"{}")
        await tx.flush()  # the server has routed it (or refused it) ...
        await rx.flush()  # ... and whatever it routed to rx arrived before this PONG
        # Two tries: on a loaded machine a delivery was seen to miss the first wait; a denied message
        # is never delivered, so a second try cannot turn a denial into a pass.
        for _ in range(2):
            try:
                await sub.next_msg(timeout=1.0)
                return True
            except nats.errors.TimeoutError:
                await tx.publish(subject, b"{}")
                await tx.flush()
        return False
    finally:
        await tx.close()
        await rx.close()


@pytest.mark.parametrize(
    ("sender", "receiver", "subject", "allowed"),
    [
        ("worker", "admin", "cadenza.worker.w1.heartbeat", True),
        ("worker", "admin", "cadenza.session.s1.failed", False),  # a worker cannot forge a session outcome
        ("worker", "admin", "$KV.cadenza_sessions.s1", False),  # nor edit the broker's state
        ("caller", "admin", "cadenza.session.s1.completed", False),
        ("caller", "admin", "cadenza.cancel.a1.requested", True),
        ("recorder", "admin", "cadenza.task.tl.queued", False),  # the recorder cannot dispatch work
        ("broker", "admin", "cadenza.activity.a1.completed", False),
        ("broker", "admin", "cadenza.session.s1.assigned", True),
        ("broker", "admin", "cadenza.session.s1.requested", False),  # the broker does not ask itself
        ("broker", "admin", "cadenza.task.w1.inbox", True),  # session opened/closed notices
        ("broker", "admin", "cadenza.task.tl.queued", False),
        ("caller", "admin", "cadenza.session.s1.requested", True),
        ("caller", "admin", "cadenza.session.s1.complete", True),
        ("caller", "admin", "cadenza.session.s1.assigned", False),  # a caller cannot forge a placement
        ("caller", "admin", "cadenza.task.tl.queued", True),
        ("caller", "admin", "cadenza.task.w1.inbox", True),
        ("caller", "admin", "$KV.cadenza_workers.w1", False),  # nor take a slot
        ("worker", "admin", "cadenza.task.tl.queued", False),
        ("worker", "caller", "_INBOX_caller.c1.a1", True),  # a worker answers the caller's reply subject
        ("caller", "admin", "cadenza.worker.w1.heartbeat", False),  # a caller cannot keep a worker alive
        ("caller", "admin", "cadenza.activity.a1.completed", False),  # nor forge an activity's outcome
        ("admin", "caller", "cadenza.session.s1.failed", True),  # callers hear the outcomes
        ("admin", "caller", "cadenza.rpc.broker.create", False),
        ("admin", "broker", "cadenza.rpc.broker.create", False),  # the broker serves no core endpoint
        ("admin", "worker", "cadenza.rpc.recorder.list", False),
        ("admin", "worker", "cadenza.session.s1.assigned", False),  # workers learn of sessions from their inbox
        # The stored completions republished to their callers: each caller reads its own, nobody forges one.
        ("admin", "caller", "cadenza.done.caller.c1.a1", True),
        ("admin", "worker", "cadenza.done.caller.c1.a1", False),
        ("admin", "recorder", "cadenza.done.caller.c1.a1", False),
        ("worker", "caller", "cadenza.done.caller.c1.a1", False),
        ("recorder", "caller", "cadenza.done.caller.c1.a1", False),
        ("broker", "caller", "cadenza.done.caller.c1.a1", False),
    ],
)
async def test_each_service_user_has_only_the_permissions_it_needs(
    secured: EmbeddedServer, passwords: dict[str, str], sender: str, receiver: str, subject: str, allowed: bool
) -> None:
    with anyio.fail_after(10):
        assert await _delivered(secured.url, passwords, sender, receiver, subject) is allowed


async def test_admin_declares_the_topology_and_services_start_without_create_rights(
    secured: EmbeddedServer, passwords: dict[str, str]
) -> None:
    def opts(user: str) -> bus.ConnectOptions:
        return bus.ConnectOptions(servers=(secured.url,), user=user, password=passwords[user])

    async with bus.connect(options=opts("admin"), prefix="cadenza"):
        pass
    for user in ("broker", "recorder", "worker", "caller"):
        async with bus.connect(options=opts(user), prefix="cadenza", timeouts=bus.Timeouts(connect=5)) as b:
            assert b.url.startswith("nats://")


async def test_sessions_and_activities_run_as_the_least_privilege_users(
    secured: EmbeddedServer, passwords: dict[str, str]
) -> None:
    """Broker, recorder and worker each as their own user; a caller creates a session, runs, tails and
    cancels activities, completes it; a worker's graceful stop fails its session. No permission is
    violated on the way (the server logs every violation)."""

    def opts(user: str) -> bus.ConnectOptions:
        return bus.ConnectOptions(servers=(secured.url,), user=user, password=passwords[user], name=f"e2e-{user}")

    async with bus.connect(options=opts("admin"), prefix="cadenza") as admin:
        # What a broker without CADENZA_TOKEN_KEY keeps: it must stay unreadable for callers.
        kv_admin = await admin.kv("broker")
        await kv_admin.put("_broker-token-key", secrets.token_hex(32).encode())
    log_from = len(server_log(secured))
    tasklist = f"e2e{secrets.token_hex(4)}"
    registry = bus.ActivityRegistry()

    @registry.activity("where")
    async def _where() -> str:
        bus.activity_writer().write("looking around\n")
        info = bus.activity_context().session
        return "no session" if info is None else str(info.worker_id)

    @registry.activity("wait")
    async def _wait(seconds: float) -> str:
        bus.activity_writer().write("waiting\n")
        await anyio.sleep(seconds)
        return "waited"

    try:
        await _session_scenario(secured, opts, tasklist, registry)
    finally:
        logged = [line for line in server_log(secured)[log_from:].splitlines() if "Violation" in line]
    # The one denial the scenario provokes: a caller may not read the broker's bucket (the token key).
    expected = [line for line in logged if "user:caller" in line and "STREAM.MSG.GET.KV_cadenza_broker" in line]
    assert expected, "the server log shows no denial: the violation check below would see nothing"
    unexpected = [line for line in logged if line not in expected]
    assert not unexpected, "permission violations:\n" + "\n".join(unexpected)


async def _session_scenario(
    secured: EmbeddedServer, opts: Callable[[str], bus.ConnectOptions], tasklist: str, registry: bus.ActivityRegistry
) -> None:
    from services.broker import Broker, BrokerConfig
    from services.recorder import Recorder

    timeouts = bus.Timeouts(connect=5)
    with anyio.fail_after(90):
        async with (
            bus.connect(options=opts("broker"), prefix="cadenza", timeouts=timeouts) as bb,
            bus.connect(options=opts("recorder"), prefix="cadenza", timeouts=timeouts) as rb,
            bus.connect(options=opts("worker"), prefix="cadenza", timeouts=timeouts) as wb,
            bus.connect(options=opts("caller"), prefix="cadenza", timeouts=timeouts) as cb,
            anyio.create_task_group() as tg,
        ):
            await tg.start(Broker(bb, BrokerConfig(token_key=secrets.token_bytes(32))).run)
            await tg.start(Recorder(rb).run)
            worker = bus.Worker(wb, tasklist=tasklist, heartbeat_interval=0.5, activities=registry)
            await worker.__aenter__()
            try:
                options = bus.SessionOptions(execution_timeout=60, creation_timeout=15, heartbeat_timeout=3,
                                             tasklist=tasklist)  # fmt: skip
                sctx = await bus.create_session(cb.context(), options)
                info = bus.get_session_info(sctx)
                assert info is not None and info.worker_id == worker.worker_id
                # In the session: the worker's inbox; the result comes back on the caller's _INBOX.
                assert await bus.execute_activity(sctx, "where", activity_id="e2e-where-" + tasklist,
                                                  start_to_close_timeout=20) == worker.worker_id  # fmt: skip
                batch = await bus.read_activity_messages(cb, "e2e-where-" + tasklist, wait=5)
                assert [m.message for m in batch.messages][:1] == ["looking around"]
                # A user's cancel through the recorder ends the activity cancelled.
                aid = "e2e-wait-" + tasklist
                outcome: list[BaseException | str] = []

                async def call() -> None:
                    try:
                        outcome.append(await bus.execute_activity(sctx, "wait", 30, activity_id=aid,
                                                                  start_to_close_timeout=30))  # fmt: skip
                    except bus.CadenzaError as exc:
                        outcome.append(exc)

                async with anyio.create_task_group() as calls:
                    calls.start_soon(call)
                    client = bus.ActivityClient(cb, timeout=5)
                    replies: list[CancelActivityReply] = []

                    async def cancel_sent() -> bool:
                        try:
                            replies.append(await client.cancel(aid, who="e2e"))
                        except bus.RemoteError as exc:
                            assert exc.remote_code == "not_found", exc  # not recorded yet: ask again
                            return False
                        return True

                    await bus.testing.eventually(cancel_sent, timeout=30, interval=0.05, what="the cancel accepted")
                    assert replies[0].outcome == "accepted"
                assert isinstance(outcome[0], bus.ActivityCancelledError), outcome
                # Outside a session (after completing it): the shared queue.
                await bus.complete_session(sctx)
                assert bus.get_session_info(sctx).state is bus.SessionState.COMPLETED  # type: ignore[union-attr]
                assert await bus.execute_activity(cb.context(), "where", tasklist=tasklist,
                                                  start_to_close_timeout=20) == "no session"  # fmt: skip
                # Replies came back on private inboxes; a caller reads a session's record (no key is
                # there), never the broker's bucket and its generated key.
                assert cb.nc.new_inbox().startswith("_INBOX_caller.") and bb.nc.new_inbox().startswith("_INBOX_broker.")
                assert (await (await cb.kv("sessions")).get(info.session_id)).value
                kv = await cb.kv("broker")
                with pytest.raises(Exception):  # noqa: B017 - denied: a permission error or no answer
                    with anyio.fail_after(10):
                        await kv.get("_broker-token-key")
                # A graceful stop fails the worker's open session at once (inbox consumer deleted by the worker).
                sctx2 = await bus.create_session(cb.context(), options)
            finally:
                await worker.aclose()
            await bus.testing.eventually(
                lambda: bus.get_session_info(sctx2).state is bus.SessionState.FAILED,  # type: ignore[union-attr]
                timeout=10, what="the session of the stopped worker failed",
            )  # fmt: skip
            assert bus.get_session_info(sctx2).cause == "worker_shutdown"  # type: ignore[union-attr]
            # A worker process (as the worker user) killed with SIGKILL: the broker's ping finds nobody
            # and the session fails with worker_lost, well before the 10 s heartbeat_timeout.
            killed = Child(
                "services.demo.worker", "--server", secured.url, "--prefix", "cadenza", "--tasklist", tasklist + "k",
                "--heartbeat-interval", "0.5",
                env={"NATS_USER": "worker", "NATS_PASSWORD": opts("worker").password or "", "NATS_URL": ""},
            )  # fmt: skip
            await anyio.to_thread.run_sync(killed.start)
            try:
                lost_opts = options.model_copy(update={"tasklist": tasklist + "k", "heartbeat_timeout": 10})
                sctx3 = await bus.create_session(cb.context(), lost_opts)
                assert await bus.execute_activity(sctx3, "where", start_to_close_timeout=20)  # it serves
                t0 = anyio.current_time()
                killed.kill()
                with pytest.raises(bus.SessionFailedError) as failed:
                    await bus.execute_activity(sctx3, "transcode", "x", 30, start_to_close_timeout=30)
                assert failed.value.cause == "worker_lost", failed.value
                assert anyio.current_time() - t0 < 9, "the ping should find the dead worker before the timeout"
            finally:
                killed.kill()
            tg.cancel_scope.cancel()
