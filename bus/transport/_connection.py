"""The connection: NATS URLs and options checked, the nats-py client opened with its callbacks, and
its failures told as :class:`ConnectError` (with the last error the client reported)."""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Sequence
from typing import Any

import anyio
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from .._config import ConnectOptions, Timeouts
from .._exceptions import ConnectError
from ._direct import speed_up

__all__ = ("check_urls", "hostname", "open_nats", "resolve_options", "split_urls")

_log = logging.getLogger("cadenza.bus")

_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


def split_urls(urls: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list."""
    return tuple(u.strip() for u in urls.split(",") if u.strip())


def check_urls(servers: Sequence[str]) -> None:
    """Raise :class:`ConnectError` for a URL whose scheme NATS does not speak."""
    for url in servers:
        if "://" in url and not url.startswith(_SCHEMES):
            raise ConnectError(f"{url!r}: NATS URLs start with nats:// or tls:// (or ws://, wss://)")


def hostname() -> str:
    return socket.gethostname()


def resolve_options(server: str | None, options: ConnectOptions | None, name: str) -> ConnectOptions:
    """The options to connect with: ``options`` (its servers replaced by ``server`` if given), else
    from the environment; their URLs checked."""
    if options is None:
        opts = ConnectOptions.from_env(servers=server, name=name)
    else:
        opts = dataclasses.replace(options, servers=split_urls(server)) if server else options
    check_urls(opts.servers)
    return opts


class _Callbacks:
    """The nats-py client's error, disconnect and reconnect callbacks, with the last errors it reported."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        #: Set once connected: before that an error goes into the ConnectError, after it into the log.
        self.client: NatsClient | None = None

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if len(self.errors) > 5:
            del self.errors[0]
        # Before the first connect the error is in the ConnectError raised by open_nats. After it
        # nobody awaits these: a permissions violation (a denied publish or subscription) is only
        # ever reported here, so say it loudly.
        if self.client is not None:
            _log.warning("NATS reported an error: %s", self.errors[-1])

    async def on_disconnect(self) -> None:
        # Our own close disconnects too: only a connection lost while open is news.
        nc = self.client
        if nc is not None and not (nc.is_closed or nc.is_draining):
            _log.info("disconnected from NATS")
        else:
            _log.debug("disconnected from NATS")

    async def on_reconnect(self) -> None:
        _log.info("reconnected to NATS")

    @property
    def last_error(self) -> str | None:
        return self.errors[-1] if self.errors else None


def _client_options(opts: ConnectOptions, timeouts: Timeouts, callbacks: _Callbacks) -> dict[str, Any]:
    """The keyword arguments of ``nats.connect``."""
    try:
        # Every inbox of the client (replies, JetStream API answers, watcher deliveries) starts with
        # it, so permissions can give each user its own replies (deploy/nats/accounts.conf).
        inbox_prefix = opts.resolved_inbox_prefix()
    except ValueError as exc:
        raise ConnectError(f"cannot connect: {exc} (CADENZA_INBOX_PREFIX)") from None
    kwargs: dict[str, Any] = {
        "servers": list(opts.servers),
        "name": opts.name,
        "connect_timeout": min(2.0, timeouts.connect),
        "max_reconnect_attempts": opts.max_reconnect_attempts,
        "reconnect_time_wait": opts.reconnect_time_wait,
        "allow_reconnect": True,
        "error_cb": callbacks.on_error,
        "disconnected_cb": callbacks.on_disconnect,
        "reconnected_cb": callbacks.on_reconnect,
        "inbox_prefix": inbox_prefix,
        # A publish waits for the socket only when the outgoing buffer is full (a forced flush);
        # nats-py waits for ever there unless told.
        "flush_timeout": timeouts.publish,
    }
    if opts.user:
        kwargs["user"], kwargs["password"] = opts.user, opts.password
    if opts.token:
        kwargs["token"] = opts.token
    if opts.creds:
        kwargs["user_credentials"] = opts.creds
    tls = opts.tls_context()
    if tls is not None:
        kwargs["tls"] = tls
    return kwargs


async def open_nats(opts: ConnectOptions, timeouts: Timeouts) -> NatsClient:
    """A connected nats-py client.

    Raises:
        ConnectError: no server answered within ``timeouts.connect``, or the connection was refused.
    """
    callbacks = _Callbacks()
    kwargs = _client_options(opts, timeouts, callbacks)
    urls = ", ".join(opts.servers)
    try:
        with anyio.fail_after(timeouts.connect):
            # max_reconnect_attempts=-1 makes nats-py retry the first connection too; the
            # deadline above bounds it.
            nc = await nats.connect(**kwargs)
    except TimeoutError:
        last = callbacks.last_error
        detail = f" (last error: {last})" if last else ""
        raise ConnectError(f"no NATS server answered at {urls} within {timeouts.connect:g}s{detail}") from None
    except nats.errors.NoServersError:
        last = callbacks.last_error
        detail = f": {last}" if last else ""
        raise ConnectError(f"cannot connect to NATS at {urls}{detail}") from None
    except (nats.errors.Error, OSError) as exc:
        raise ConnectError(f"cannot connect to NATS at {urls}: {exc}") from exc
    callbacks.client = nc
    speed_up(nc)
    return nc
