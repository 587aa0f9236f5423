"""The per-process helpers of a bus (the session client): started on demand, once per bus, by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol, TypeVar

import anyio

from .._exceptions import UsageError

__all__ = ("Helper", "Helpers")


class Helper(Protocol):
    """What a bus can start for the process: subscribes through the bus's connection, ends with it."""

    async def start(self) -> None: ...


H = TypeVar("H", bound=Helper)


class Helpers:
    """The helpers started on one bus, by name, each of one type."""

    def __init__(self) -> None:
        self._started: dict[str, Helper] = {}
        self._ready: dict[str, anyio.Event] = {}

    @property
    def by_name(self) -> Mapping[str, Helper]:
        """A read-only view of the helpers registered (those still starting included)."""
        return MappingProxyType(self._started)

    def get(self, name: str, kind: type[H]) -> H | None:
        """The helper registered under ``name`` if it is a ``kind`` (started or starting), else None."""
        helper = self._started.get(name)
        return helper if isinstance(helper, kind) else None

    async def start(self, name: str, helper: H, *, timeout: float) -> H:
        """Start ``helper`` (``await helper.start()``) unless one is registered under ``name``; the
        helper registered (the first one started), once it has started (waiting up to ``timeout``).

        Raises:
            UsageError: a helper of another type is registered under ``name``.
        """
        existing = self._started.get(name)
        if existing is not None:
            if not isinstance(existing, type(helper)):
                raise UsageError(f"helper {name!r} is a {type(existing).__name__}, not a {type(helper).__name__}")
            with anyio.fail_after(timeout):
                await self._ready[name].wait()
            if self._started.get(name) is not existing:  # its start failed: this one is started instead
                return await self.start(name, helper, timeout=timeout)
            return existing
        self._started[name] = helper
        ready = self._ready[name] = anyio.Event()
        try:
            await helper.start()
        except BaseException:
            self._started.pop(name, None)
            raise
        finally:
            ready.set()
        return helper
