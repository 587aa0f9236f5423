"""Key-value: the topology's buckets as nats-py ``KeyValue`` handles, opened once per bus."""

from __future__ import annotations

import nats.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from .._exceptions import BusError
from ._retry import retry_transient
from ._topology import Topology

__all__ = ("Buckets",)


class Buckets:
    """The key-value buckets of one connection, each opened on first use and kept."""

    def __init__(self, js: JetStreamContext, topology: Topology) -> None:
        self._js = js
        self._topology = topology
        self._open: dict[str, KeyValue] = {}

    async def get(self, key: str) -> KeyValue:
        """The bucket ``key`` of the topology (``sessions``, ``workers``, ``activities``).

        Raises:
            BusError: the bucket is not there or the server would not open it.
        """
        bucket = self._open.get(key)
        if bucket is None:
            name = self._topology.bucket_name(key)
            try:
                bucket = await retry_transient(lambda: self._js.key_value(name), what=f"open bucket {name}")
            except nats.errors.Error as exc:
                raise BusError(f"key-value bucket {name} is not available: {exc}") from exc
            self._open[key] = bucket
        return bucket
