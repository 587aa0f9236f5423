"""Configuration values shared by every part of the bus: timeouts and connection options."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ("ConnectOptions", "Timeouts")

#: nats-py's own inbox prefix, used when no user (and no ``CADENZA_INBOX_PREFIX``) is known.
DEFAULT_INBOX_PREFIX = "_INBOX"
#: A prefix is one or more dot-separated tokens of these characters (no wildcards, no spaces).
_INBOX_TOKEN = re.compile(r"[A-Za-z0-9_$-]+")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every network wait in cadenza takes its bound from here (seconds).

    Attributes:
        connect: initial connection to the server, all attempts together.
        publish: one JetStream publish until its acknowledgement (retried ``publish_retries`` times).
        request: a request until its reply.
        ack: a consumer's acknowledgement round trip.
        fetch: one long-poll of a pull consumer (an idle consumer wakes up this often).
        pull_expires: how long a consumer's outstanding pull request lives on the server (an idle
            consumer renews it this often; a request lost with a server restart is written off after it).
        shutdown: draining and final publishes when something stops.
        task_store_check: an activity task is sent without asking for the server's acknowledgement
            (its worker's answer says it was stored); with no answer this long, the caller publishes
            it again and waits for the acknowledgement (stored once: the same ``Nats-Msg-Id``).
        server_start: the embedded server becoming ready.
    """

    connect: float = 10.0
    publish: float = 5.0
    publish_retries: int = 3
    request: float = 5.0
    ack: float = 5.0
    fetch: float = 1.0
    pull_expires: float = 5.0
    shutdown: float = 5.0
    task_store_check: float = 1.0
    server_start: float = 20.0

    def with_(self, **changes: float) -> Timeouts:
        """A copy with some values changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach a NATS server. Built from arguments or from the environment.

    Attributes:
        servers: URLs (``nats://host:port``); empty means "start the embedded server".
        user / password / token / creds: credentials (creds is a ``.creds`` file path).
        tls_ca / tls_cert / tls_key: TLS material; any of them turns TLS on.
        name: the client name shown by the server's monitoring.
        max_reconnect_attempts: -1 reconnects forever (the default for services).
        inbox_prefix: the prefix of every inbox this client makes (request replies, JetStream API
            replies, ordered consumers' and KV watchers' deliveries); None means ``_INBOX_<user>``
            when a user is known, else ``_INBOX`` (see :meth:`resolved_inbox_prefix`).
    """

    servers: tuple[str, ...] = ()
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    name: str = "cadenza"
    max_reconnect_attempts: int = -1
    reconnect_time_wait: float = 0.5
    inbox_prefix: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ConnectOptions:
        """Read ``NATS_URL`` (comma-separated), ``NATS_USER``, ``NATS_PASSWORD``, ``NATS_TOKEN``,
        ``NATS_CREDS``, ``NATS_CA``, ``NATS_CERT``, ``NATS_KEY`` and ``CADENZA_INBOX_PREFIX``;
        ``overrides`` that are not None win."""
        env = os.environ if env is None else env
        urls = tuple(u.strip() for u in env.get("NATS_URL", "").split(",") if u.strip())
        opts = cls(
            servers=urls,
            user=env.get("NATS_USER") or None,
            password=env.get("NATS_PASSWORD") or None,
            token=env.get("NATS_TOKEN") or None,
            creds=env.get("NATS_CREDS") or None,
            tls_ca=env.get("NATS_CA") or None,
            tls_cert=env.get("NATS_CERT") or None,
            tls_key=env.get("NATS_KEY") or None,
            inbox_prefix=env.get("CADENZA_INBOX_PREFIX") or None,
        )
        changes = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(changes.get("servers"), str):
            changes["servers"] = tuple(s.strip() for s in str(changes["servers"]).split(",") if s.strip())
        return replace(opts, **changes)  # type: ignore[arg-type]

    def resolved_inbox_prefix(self) -> str:
        """The inbox prefix this client uses: ``inbox_prefix`` if set, else ``_INBOX_<user>`` (one
        subject token, so a permission ``_INBOX_<user>.>`` covers exactly this user's inboxes), else
        nats-py's ``_INBOX``. Characters of the user name that a subject token cannot hold become ``_``.

        Raises:
            ValueError: ``inbox_prefix`` is not a subject without wildcards.
        """
        if self.inbox_prefix is not None:
            tokens = self.inbox_prefix.split(".")
            if not all(_INBOX_TOKEN.fullmatch(t) for t in tokens):
                raise ValueError(
                    f"inbox prefix {self.inbox_prefix!r} must be dot-separated tokens of letters, digits, "
                    "'_', '-' or '$' (no wildcards, spaces or empty tokens), e.g. _INBOX_caller"
                )
            return self.inbox_prefix
        if self.user:
            return f"{DEFAULT_INBOX_PREFIX}_{re.sub(r'[^A-Za-z0-9_-]', '_', self.user)}"
        return DEFAULT_INBOX_PREFIX

    def tls_context(self) -> ssl.SSLContext | None:
        """An SSL context when TLS material is configured, else None."""
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx
