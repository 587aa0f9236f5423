"""Follow a key-value bucket: every key as stored, then each change, live (a read-only cache).

The broker and the recorder keep their own watchers (they also write by compare-and-set); a
reader that only needs the latest value of each key uses :func:`follow_bucket`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import anyio
import nats.errors
from anyio.abc import TaskStatus

from ._bus import Bus
from ._exceptions import BusError

__all__ = ("follow_bucket",)


async def follow_bucket(
    bus: Bus,
    key: str,
    on_put: Callable[[str, bytes, int], None],
    on_delete: Callable[[str], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_put(key, value, revision)`` for every stored key, then for each change, until cancelled.

    Ready (``task_status.started()``) once the stored keys were delivered. Keys starting with ``_``
    (the services' own bookkeeping) are skipped.

    Raises:
        BusError: the bucket is not available.
    """
    kv = await bus.kv(key)
    try:
        watcher = await kv.watchall()
    except nats.errors.Error as exc:
        raise BusError(f"cannot watch the {key} bucket: {exc}") from exc
    ready = False
    try:
        async for entry in watcher:
            if entry is not None and not entry.key.startswith("_"):
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    on_delete(entry.key)
                else:
                    on_put(entry.key, entry.value, entry.revision or 0)
            if not ready and (entry is None or entry.delta == 0):
                ready = True
                task_status.started()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeouts.shutdown):
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
