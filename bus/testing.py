"""Helpers for testing code that uses cadenza, against a real nats-server.

Use as a pytest plugin (``pytest_plugins = ["bus.testing"]``) to get the fixtures ``nats_server``
(one embedded server per test session, or the one ``--nats-url`` names) and ``cadenza_bus`` (a bus
on a fresh, unique subject prefix, so tests never see each other's streams), or use
:func:`embedded_server` and :func:`unique_prefix` directly. ``nats_cluster`` is a 3-node loopback
JetStream cluster (:class:`EmbeddedCluster`) per test module, for replicas-3 and fault tests:
connect with ``bus.connect(nats_cluster.urls, replicas=3)``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import pytest

from ._config import Timeouts
from .transport._bus import Bus, connect
from .transport._process import ChildProcess
from .transport._server import EmbeddedCluster, EmbeddedServer

__all__ = (
    "EmbeddedCluster",
    "ExternalServer",
    "ServiceProcess",
    "cadenza_bus",
    "embedded_server",
    "eventually",
    "nats_cluster",
    "nats_server",
    "pytest_addoption",
    "unique_prefix",
)


async def eventually(
    predicate: Callable[[], bool], *, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` seconds.

    Tests synchronise on observable state this way, never on fixed sleeps.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling observable state is the point of this helper
            await anyio.sleep(interval)
    return None


def unique_prefix(stem: str = "t") -> str:
    """A subject prefix no other test uses (``t<12 hex>``)."""
    return f"{stem}{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def embedded_server(store_dir: str | None = None) -> Iterator[EmbeddedServer]:
    """Start a loopback nats-server with JetStream for the duration of the block."""
    server = EmbeddedServer(store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--nats-url",
        default=None,
        help="run against this NATS server instead of an embedded one (it must have JetStream enabled)",
    )


class ExternalServer:
    """Stands in for :class:`EmbeddedServer` when ``--nats-url`` is given (fault tests skip)."""

    def __init__(self, url: str) -> None:
        self.url = url


@pytest.fixture(scope="session")
def nats_server(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer | ExternalServer]:
    """The test session's server: embedded, or ``--nats-url``."""
    url = request.config.getoption("--nats-url")
    if url:
        yield ExternalServer(url)
        return
    with embedded_server() as server:
        yield server


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A 3-node JetStream cluster on loopback for the test module (started formed, with a meta leader).

    It runs even with ``--nats-url``: a cluster's nodes must be killable, an external server is not.
    """
    with EmbeddedCluster(3, tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
async def cadenza_bus(nats_server: EmbeddedServer | ExternalServer) -> AsyncIterator[Bus]:
    """A bus on the session's server with a fresh prefix (its own streams and buckets)."""
    async with connect(nats_server.url, prefix=unique_prefix(), name="test", timeouts=Timeouts(connect=5)) as bus:
        yield bus


class ServiceProcess(ChildProcess):
    """A cadenza service (or any Python module) in its own process, for fault tests.

    Started with ``python -m <module> <args>`` and ``NATS_URL`` set; :meth:`start` waits until
    the process prints a line containing ``ready_marker`` on stdout (services print
    ``cadenza: ready`` once their consumers run). :meth:`kill` sends SIGKILL.

    The child dies with the *thread* that started it (``PR_SET_PDEATHSIG``, so no test leaves
    orphans): start it from the test's own thread, not from a worker thread that exits.

    Args:
        module: module to run, e.g. ``services.recorder``.
        args: its arguments.
        url: the NATS server URL.
        env: extra environment.
    """

    def __init__(
        self,
        module: str,
        *args: str,
        url: str,
        env: dict[str, str] | None = None,
        ready_marker: str = "cadenza: ready",
    ) -> None:
        super().__init__(module, *args, env={"NATS_URL": url, **(env or {})}, ready_marker=ready_marker)
        self.url = url

    def start(self, timeout: float = 20.0) -> ServiceProcess:
        super().start(timeout)
        return self

    def __enter__(self) -> ServiceProcess:
        return self.start()
