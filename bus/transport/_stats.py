"""The counters of a bus."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ("BusStats",)


@dataclass
class BusStats:
    """Counters a service can expose (and tests can read)."""

    published: int = 0
    handled: int = 0
    retried: int = 0
    dead_letters: int = 0
    redeliveries_skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
