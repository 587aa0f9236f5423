"""Helpers for testing code that uses cadenza, against a real nats-server.

Use as a pytest plugin (``pytest_plugins = ["bus.testing"]``) to get the fixtures ``nats_server``
(one embedded server per test session, or the one ``--nats-url`` names) and ``cadenza_bus`` (a bus
on a fresh, unique subject prefix, so tests never see each other's streams), or use
:func:`embedded_server` and :func:`unique_prefix` directly. ``nats_cluster`` is a 3-node loopback
JetStream cluster (:class:`EmbeddedCluster`) per test module, for replicas-3 and fault tests:
connect with ``bus.connect(nats_cluster.urls, replicas=3)``.

:func:`eventually` waits for observable state (a plain or an async predicate) instead of a fixed
sleep. :class:`ServiceProcess` runs a cadenza service in its own process, to SIGKILL it in fault
tests; :class:`ChildProcess` is its base, for any ``python -m`` module that prints a ready line.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import pytest

from ._config import Timeouts
from .transport._bus import Bus, connect
from .transport._process import ChildProcess
from .transport._server import EmbeddedCluster, EmbeddedServer

__all__ = (
    "ChildProcess",
    "EmbeddedCluster",
    "EmbeddedServer",
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
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str | Callable[[], str] = "condition",
) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds.

    Tests synchronise on observable state this way, never on fixed sleeps. The predicate may be a
    plain or an async callable (``lambda: len(got) == 3``, or ``async def stored() -> bool`` that
    asks the server); it is called again ``interval`` seconds after each false answer, and a call
    still running when ``timeout`` passes is cancelled.

    Args:
        predicate: returns (or, if async, resolves to) whether the condition holds.
        timeout: seconds to wait at most.
        interval: seconds between two calls.
        what: the condition, for the message; a callable is called at the timeout (to describe, say,
            the last state the predicate saw).

    Raises:
        TimeoutError: the predicate was not true within ``timeout``; the message names ``what`` and
            the timeout.
    """
    with anyio.move_on_after(timeout):
        while True:
            held = predicate()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await anyio.sleep(interval)
    described = what() if callable(what) else what
    raise TimeoutError(f"not reached within {timeout:g}s: {described}")


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
