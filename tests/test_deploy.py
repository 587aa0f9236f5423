"""deploy/: the nats-server configs parse, and the per-service users have least privilege."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest

import bus
from bus import EmbeddedServer, find_server_binary

DEPLOY = Path(__file__).parent.parent / "deploy" / "nats"
USERS = ("admin", "broker", "recorder", "worker", "caller")


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {u: secrets.token_hex(12) for u in USERS}


def _env(passwords: dict[str, str]) -> dict[str, str]:
    env = {f"CADENZA_{u.upper()}_PASSWORD": p for u, p in passwords.items()}
    env.update(NODE_NAME="n1", ROUTE_1="127.0.0.1", ROUTE_2="127.0.0.1", ROUTE_3="127.0.0.1")
    return env


@pytest.mark.parametrize("name", ["single.conf", "cluster.conf"])
def test_nats_server_accepts_the_config(name: str, passwords: dict[str, str], tmp_path: Path) -> None:
    for f in DEPLOY.glob("*.conf"):
        shutil.copy(f, tmp_path / f.name)
    out = subprocess.run(
        [find_server_binary(), "-t", "-c", str(tmp_path / name)],
        capture_output=True, text=True, timeout=30, env=_env(passwords),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def secured(passwords: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("secured"), include=DEPLOY / "accounts.conf")

    old = {k: os.environ.get(k) for k in _env(passwords)}
    os.environ.update(_env(passwords))
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
        await tx.flush()
        try:
            await sub.next_msg(timeout=0.5)
            return True
        except nats.errors.TimeoutError:
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
        ("recorder", "admin", "cadenza.task.tl.queue", False),  # the recorder cannot dispatch work
        ("broker", "admin", "cadenza.activity.a1.completed", False),
        ("admin", "caller", "cadenza.rpc.broker.create", False),  # a caller cannot impersonate the broker
        ("admin", "broker", "cadenza.rpc.broker.create", True),
        ("admin", "worker", "cadenza.rpc.recorder.list", False),
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
