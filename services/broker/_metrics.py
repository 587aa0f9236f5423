"""The broker's metrics by tasklist, read from its caches of the sessions and workers buckets.

Observable gauges (read at each export or scrape, nothing kept here):

==================================  =====================================================
``cadenza.sessions.open``           open sessions, by tasklist
``cadenza.slots.free``              free session slots on live workers, by tasklist
``cadenza.sessions.ended``          ended sessions the bucket holds, by tasklist, state
                                    (completed, failed, rejected) and cause: the outcomes
==================================  =====================================================

They come from the buckets, not from this replica's own work, so every broker replica reports the
same numbers (take the max, not the sum, across replicas). Separate from ``_broker.py`` so the
broker's logic does not change for its metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from schemas import SessionRecord, SessionState, WorkerRecord

__all__ = ("observe",)


def observe(broker: Any) -> None:
    """Register the gauges for ``broker`` (a running :class:`services.broker.Broker`)."""
    meter = metrics.get_meter("cadenza.broker")

    def records(cache: dict[str, Any], kind: type) -> list[Any]:
        return [c.value for c in list(cache.values()) if isinstance(c.value, kind)]

    def sessions_open(_options: CallbackOptions) -> Iterable[Observation]:
        counts = Counter(r.tasklist for r in records(broker.sessions, SessionRecord) if r.state is SessionState.OPEN)
        for w in records(broker.workers, WorkerRecord):
            counts.setdefault(w.tasklist, 0)
        return [Observation(n, {"tasklist": t}) for t, n in counts.items()]

    def slots_free(_options: CallbackOptions) -> Iterable[Observation]:
        free: Counter[str] = Counter()
        for w in records(broker.workers, WorkerRecord):
            free[w.tasklist] += max(0, w.max_sessions - len(w.sessions)) if broker.placeable(w.worker_id) else 0
        return [Observation(n, {"tasklist": t}) for t, n in free.items()]

    def ended(_options: CallbackOptions) -> Iterable[Observation]:
        counts = Counter(
            (r.tasklist, r.state.value, r.cause or "")
            for r in records(broker.sessions, SessionRecord)
            if r.state not in (SessionState.OPEN, SessionState.PENDING)
        )
        return [Observation(n, {"tasklist": t, "state": s, "cause": c}) for (t, s, c), n in counts.items()]

    meter.create_observable_gauge("cadenza.sessions.open", [sessions_open], description="open sessions")
    meter.create_observable_gauge("cadenza.slots.free", [slots_free], description="free slots on live workers")
    meter.create_observable_gauge("cadenza.sessions.ended", [ended], description="ended sessions by state and cause")
