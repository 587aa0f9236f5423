"""Counting NATS messages by kind: one connection subscribed to ``>`` classifies every message it sees.

The counting connection has an inbox prefix of its own, and whatever arrives under it (its probes) is
left out of the counts. It is opened on one node; a subscription to ``>`` is interest for every
subject of the account, so on a cluster the other nodes route every message of the account to that
node as well: each message published in the account (by a client or by the server: PubAcks,
deliveries) is seen once, wherever it was published. What never reaches an account subscriber is not
seen: the route protocol itself and JetStream's replication between the nodes (system account).

Kinds, by subject (and for replies by what they carry):

- ``task publish``: ``<prefix>.task.>``; ``activity <event>``: ``<prefix>.activity.<id>.<event>``;
  ``<domain> <event>`` for the other subjects of the prefix (heartbeats, session events, ...);
- ``ack <consumer>``: ``$JS.ACK.<stream>.<consumer>....``;
- ``pull request <consumer>``: ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``; ``API <verb>`` the
  other JetStream API calls; ``KV write <bucket>``: ``$KV.<bucket>.>``;
- replies (``_INBOX...`` and the other reply subjects a system names): ``reply: PubAck``,
  ``delivery to <consumer>`` (any message whose reply subject is a ``$JS.ACK`` one: pull and push
  consumers, KV watchers), ``reply: pull status <code>``, ``reply: JS API answer``,
  ``reply: direct get``, ``reply: core`` (everything else, e.g. a result sent on the caller's inbox).
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections import Counter
from typing import Any

import anyio
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

__all__ = ("GROUPS", "MessageCounter", "classify")

#: Order of the kinds in a breakdown (by the group a kind belongs to). ``advisory`` and ``idle`` are
#: left out of the totals: the server sends JetStream advisories only when someone listens, here the
#: counter itself, and an idle heartbeat only to a follower that has received nothing for a second
#: (a cost of quiet time, here mostly the counter's quiet tail, not of activities).
#: ``upkeep`` too: worker heartbeats (one per worker per interval) with their deliveries, pull requests
#: (one per batch of up to 256 messages, renewed at half) and their ends (an expiry every few seconds
#: of a quiet consumer): costs per second or per batch, which tests/test_message_budget.py leaves out.
GROUPS = ("publish", "ack", "api", "kv", "reply", "other", "upkeep", "advisory", "idle")
#: The groups :meth:`MessageCounter.total` leaves out.
NOT_COUNTED = ("upkeep", "advisory", "idle")
_ID = re.compile(r"[0-9a-f]{8,}|[0-9a-f-]{36}|[A-Za-z0-9]{20,}")
# A worker id (bus._heartbeat.new_worker_id): <stem>-<host>-<pid>-<8 hex>; this machine's host name.
_HOST = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40] or "host"
_WORKER_ID = re.compile(rf"-{re.escape(_HOST)}-\d+-[0-9a-f]{{8}}")


def _consumer(name: str, prefix: str) -> str:
    """A consumer name fit for a row: without the system's prefix, ids as ``*``; a server-named
    (ephemeral, ordered) consumer as ``an ephemeral consumer``."""
    if len(name) == 8 and name.isalnum() and not (name.isalpha() and name.islower()):
        return "an ephemeral consumer"
    for p in (prefix, prefix.upper()):
        if p:
            name = name.replace(p, "")
    name = _ID.sub("*", _WORKER_ID.sub("-*", name)).strip("_-.")
    return name or "*"


def _ack_consumer(subject: str, prefix: str) -> str:
    """The consumer of a ``$JS.ACK`` subject (both the short and the domain-and-account-hash form)."""
    tokens = subject.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending> (9 tokens), or
    # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.... (12 or more).
    i = 5 if len(tokens) >= 12 else 3
    return _consumer(tokens[i], prefix) if len(tokens) > i else "?"


def _is_id(token: str) -> bool:
    return bool(_ID.fullmatch(token)) or any(c.isdigit() for c in token) or len(token) > 24


def classify(msg: Msg, prefix: str, replies: tuple[str, ...]) -> tuple[str, str]:
    """(group, kind) of one message; ``prefix`` is the system's subject prefix, ``replies`` the first
    tokens (or leading parts) of its reply subjects."""
    subject = msg.subject
    reply = msg.reply or ""
    if reply.startswith("$JS.ACK."):
        # A stored message delivered to a consumer carries its own subject: say what it was.
        what = _published(subject, prefix)
        inner = f" ({what[1].replace('KV write ', 'KV ').replace('task publish', 'task')})" if what else ""
        group = "upkeep" if what and what[0] == "upkeep" else "reply"
        return group, f"delivery to {_ack_consumer(reply, prefix)}{inner}"
    if subject.startswith("$JS.ACK."):
        return "ack", f"ack {_ack_consumer(subject, prefix)}"
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        tokens = subject.split(".")
        return "upkeep", f"pull request {_consumer(tokens[-1], prefix)}"
    if subject.startswith("$JS.API."):
        tokens = subject.split(".")
        verb = ".".join(t for t in tokens[2:4] if t.isalpha() and t.isupper())
        return "api", f"API {verb or subject}"
    if subject.startswith("$JS.FC."):
        return "other", "flow control"
    if subject.startswith("$JS.EVENT."):
        tokens = subject.split(".")
        return "advisory", "JetStream advisory " + ".".join(t for t in tokens[3:5] if t.isupper())
    if subject.startswith("_INBOX") or any(subject.startswith(r) for r in replies):
        data = msg.data or b""
        headers = msg.headers or {}
        if not data and headers.get("Status") == "100" and headers.get("Description") == "Idle Heartbeat":
            return "idle", "idle heartbeat"
        if not data and headers.get("Status"):
            return "upkeep", f"reply: pull status {headers.get('Status')}"
        if data.startswith(b'{"stream"') and b'"seq"' in data:
            return "reply", "reply: PubAck"
        if b'"type":"io.nats.jetstream.api.' in data[:200]:
            return "reply", "reply: JS API answer"
        if "Nats-Stream" in headers:
            return "reply", "reply: direct get"
        return "reply", "reply: core"
    return _published(subject, prefix) or ("other", f"other {subject.split('.')[0]}.*")


def _published(subject: str, prefix: str) -> tuple[str, str] | None:
    """(group, kind) of a subject a client publishes on: the system's own subjects and KV writes."""
    if subject.startswith("$KV."):
        bucket = subject.split(".")[1]
        return "kv", f"KV write {_consumer(bucket, prefix)}"
    tokens = subject.split(".")
    if not prefix or tokens[0] != prefix or len(tokens) < 2:
        return None
    domain = tokens[1]
    if domain == "task":
        return "publish", "task publish"
    words = [t for t in tokens[2:] if not _is_id(t)]
    event = words[-1] if words else ""
    if domain == "activity":
        return "publish", f"activity {event or 'event'}"
    if domain == "worker" and event == "heartbeat":
        return "upkeep", "worker heartbeat"
    return "other", f"{domain} {event}".strip()


class MessageCounter:
    """A ``>`` subscriber on its own connection that counts messages by kind while it is started.

    Args:
        urls: the node to count on first (one URL), then every node of the cluster: a probe
            connection per node makes sure the subscription is known there before counting starts.
        prefix: the system's subject prefix; replies: its reply subjects' leading parts.
    """

    def __init__(self, urls: list[str], prefix: str, replies: tuple[str, ...] = ()) -> None:
        self.urls = urls
        self.prefix = prefix
        self.replies = replies
        self.own = f"_COUNT{uuid.uuid4().hex[:10]}"
        self.kinds: Counter[tuple[str, str]] = Counter()
        self.last = time.monotonic()
        self._nc: NATS | None = None
        self._probes: list[NATS] = []
        self._sub: Any = None
        self._seen: set[str] = set()
        self._arrived = anyio.Event()

    async def __aenter__(self) -> MessageCounter:
        self._nc = await nats.connect(self.urls[0], name="bench-counter", inbox_prefix=self.own.encode())
        for url in self.urls:
            self._probes.append(await nats.connect(url, name="bench-counter-probe"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for nc in [*self._probes, self._nc]:
            if nc is not None:
                with anyio.move_on_after(5, shield=True):
                    await nc.close()

    async def _on(self, msg: Msg) -> None:
        if msg.subject.startswith(self.own):
            self._seen.add(msg.subject)
            self._arrived.set()
            return
        self.last = time.monotonic()
        self.kinds[classify(msg, self.prefix, self.replies)] += 1

    async def start(self) -> None:
        """Subscribe to ``>`` and wait until every node routes to it (a probe from each one arrives)."""
        assert self._nc is not None
        self.kinds.clear()
        self._seen.clear()
        self._sub = await self._nc.subscribe(">", cb=self._on, pending_msgs_limit=10_000_000)
        await self._nc.flush()
        with anyio.fail_after(20):
            for i, probe in enumerate(self._probes):
                subject = f"{self.own}.probe.{i}"
                while subject not in self._seen:
                    self._arrived = anyio.Event()
                    await probe.publish(subject, b"")
                    await probe.flush()
                    with anyio.move_on_after(0.2):
                        await self._arrived.wait()
        self.kinds.clear()
        self.last = time.monotonic()

    async def stop(self, quiet: float = 0.5, bound: float = 10.0) -> bool:
        """Wait until no message came for ``quiet`` seconds (at most ``bound``), then unsubscribe;
        whether it was quiet."""
        t0 = time.monotonic()
        calm = False
        while time.monotonic() - t0 < bound:
            if time.monotonic() - self.last >= quiet:
                calm = True
                break
            await anyio.sleep(0.05)
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        return calm

    def total(self) -> int:
        """Every message counted, the advisories the counter itself causes and the idle heartbeats
        left out (:data:`NOT_COUNTED`)."""
        return sum(n for (g, _k), n in self.kinds.items() if g not in NOT_COUNTED)

    def by_kind(self) -> list[tuple[str, str, int]]:
        """(group, kind, count), in group order, the largest first within a group."""
        rows = [(g, k, n) for (g, k), n in self.kinds.items()]
        rows.sort(key=lambda r: (GROUPS.index(r[0]), -r[2], r[1]))
        return rows
