"""The bus: one connection to NATS JetStream that speaks cadenza events, and its facade.

:class:`Bus` holds the connection's state (the client, its JetStream context, the topology, the
timeouts, the counters, the helpers) and its lifecycle; each of its jobs is a module of its own,
which the facade names method by method:

* ``_connection.py``   the URLs and options, the nats-py client opened (:func:`connect`, below, builds the bus);
* ``_publish.py``      stored and core publishes, the one acknowledgement inbox;
* ``_consume.py``      durable pull consumers and the delivery rules (its docstring);
* ``_broadcast.py``    core subscriptions of typed events;
* ``_rpc.py``          request / reply;
* ``_dead_letters.py`` copies of rejected input;
* ``_kv.py``           the key-value buckets; ``_registry.py`` the per-process helpers.

A method is the module's function itself (a class attribute, bound as any method): the facade adds
no call, await or allocation to a message's way.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import TypeVar

import anyio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import DEFAULT_PREFIX, Subjects

from .._config import ConnectOptions, Timeouts
from .._context import BUS_KEY, Context
from .._exceptions import BusError
from . import _broadcast, _consume, _dead_letters, _publish, _rpc
from ._connection import hostname, open_nats, resolve_options
from ._consume import Delivery
from ._kv import Buckets
from ._publish import PublishResult, _JetStream
from ._registry import Helper, Helpers
from ._retry import retry_transient
from ._server import EmbeddedServer
from ._stats import BusStats
from ._topology import Topology

__all__ = ("Bus", "BusState", "BusStats", "Delivery", "PublishResult", "connect")

H = TypeVar("H", bound=Helper)


class BusState(enum.Enum):
    """Lifecycle of a :class:`Bus`."""

    OPEN = "open"
    CLOSED = "closed"


class Bus:
    """A connection to NATS JetStream that speaks cadenza events.

    Create one with :func:`connect`. Every public method is safe to call from many tasks.

    Args:
        nc: a connected nats-py client (the bus closes it on :meth:`close`).
        topology: the installation's streams and buckets.
        timeouts: bounds of every wait.
        source: this process's name in the ``source`` field of the events it publishes.
        server: an embedded server the bus owns and stops on close.
    """

    def __init__(
        self,
        nc: NatsClient,
        *,
        topology: Topology,
        timeouts: Timeouts,
        source: str,
        server: EmbeddedServer | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = _JetStream(nc, timeout=timeouts.publish)
        self.topology = topology
        self.subjects: Subjects = topology.subjects
        self.timeouts = timeouts
        self.source = source
        self.server = server
        self.state = BusState.OPEN
        self.stats = BusStats()
        self._buckets = Buckets(self.js, topology)
        self._helpers = Helpers()

    def __repr__(self) -> str:
        return f"<Bus {self.url} prefix={self.subjects.prefix!r} {self.state.value}>"

    @property
    def url(self) -> str:
        """The URL of the server this bus is connected to."""
        cur = self.nc.connected_url
        return cur.geturl() if cur is not None else "(not connected)"

    def context(self) -> Context:
        """A fresh root :class:`Context` that carries this bus (start session and activity calls from it)."""
        return Context(values=MappingProxyType({BUS_KEY: self}))

    def _check_open(self) -> None:
        if self.state is not BusState.OPEN:
            raise BusError("the bus is closed")

    # The jobs, each in its module (see the module doc).
    subject_of = _publish.subject_of
    publish = _publish.publish
    start_publish = _publish.start_publish
    send_stored_to = _publish.send_stored_to
    settle_handed = _publish.settle_handed
    _publish_raw = _publish.publish_raw
    publish_core = _publish.publish_core
    dead_letter = _dead_letters.dead_letter
    consume = _consume.consume
    listen = _broadcast.listen
    rpc_subject = _rpc.rpc_subject
    request = _rpc.request
    serve = _rpc.serve

    async def kv(self, key: str) -> KeyValue:
        """The key-value bucket ``key`` of the topology (``sessions``, ``workers``, ``activities``)."""
        self._check_open()
        return await self._buckets.get(key)

    # ---------------------------------------------------------------- helpers

    @property
    def helpers(self) -> Mapping[str, object]:
        """The per-process helpers started on this bus (the session client), by name (read-only)."""
        return self._helpers.by_name

    async def start_helper(self, name: str, helper: H) -> H:
        """Start ``helper`` (``await helper.start()``) once per bus; returns the helper registered
        under ``name`` (the first one started). Helpers subscribe through this bus's connection and
        end with it (:meth:`close` drains their subscriptions).

        Raises:
            UsageError: a helper of another type is registered under ``name``.
        """
        self._check_open()
        return await self._helpers.start(name, helper, timeout=self.timeouts.request)

    def get_helper(self, name: str, kind: type[H]) -> H | None:
        """The helper registered under ``name`` if it is a ``kind`` (maybe still starting), else None."""
        return self._helpers.get(name, kind)

    # ---------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Drain the connection and stop an owned embedded server. Safe to call twice."""
        if self.state is BusState.CLOSED:
            return
        self.state = BusState.CLOSED
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await self.nc.drain()
        with contextlib.suppress(Exception):
            await self.nc.close()
        if self.server is not None:
            self.server.stop()


@contextlib.asynccontextmanager
async def connect(
    server: str | None = None,
    *,
    prefix: str | None = None,
    options: ConnectOptions | None = None,
    timeouts: Timeouts | None = None,
    name: str = "cadenza",
    ensure_topology: bool = True,
    store_dir: str | os.PathLike[str] | None = None,
    replicas: int | None = None,
) -> AsyncIterator[Bus]:
    """Connect to NATS (or start the embedded server) and yield a :class:`Bus`.

    The server is ``server``, else ``NATS_URL``, else an embedded nats-server on a free loopback
    port (stopped when the block exits; ``store_dir`` keeps its data).

    Args:
        server: URL(s), comma-separated.
        prefix: subject prefix of this installation (default: ``CADENZA_PREFIX`` or ``cadenza``).
        options: credentials and TLS (default: from the environment).
        timeouts: bounds of every wait.
        name: this process's name (client name, ``source`` of its events).
        ensure_topology: declare the streams and buckets (idempotent).
        replicas: stream and bucket replicas, 3 on a cluster (default: ``CADENZA_REPLICAS``, else 1).

    Raises:
        ConnectError: no server answered; ServerStartError: the embedded server would not start;
        TopologyError: the streams could not be declared.
    """
    timeouts = timeouts or Timeouts()
    opts = resolve_options(server, options, name)
    prefix = prefix or os.environ.get("CADENZA_PREFIX") or DEFAULT_PREFIX
    # Built first: a bad CADENZA_REPLICAS / CADENZA_STORAGE fails before anything is opened.
    topology = Topology(prefix) if replicas is None else Topology(prefix, replicas=replicas)
    embedded: EmbeddedServer | None = None
    if not opts.servers:
        embedded = EmbeddedServer(store_dir, start_timeout=timeouts.server_start)
        # Started from this thread on purpose: the server is bound to the life of the thread that
        # forks it (PR_SET_PDEATHSIG), and worker threads come and go.
        embedded.start()
        opts = ConnectOptions.from_env(env={}, servers=embedded.url, name=name)
    try:
        nc = await open_nats(opts, timeouts)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    bus = Bus(nc, topology=topology, timeouts=timeouts, source=f"{name}@{hostname()}", server=embedded)
    try:
        if ensure_topology:
            await retry_transient(lambda: bus.topology.ensure(bus.js), what="declare the streams and buckets")
        yield bus
    finally:
        await bus.close()
