"""nats-py's errors translated at the transport's boundary into cadenza's tree (``bus._exceptions``).

``with engine_errors("reading the session"):`` around engine calls raises :class:`~bus.NotFoundError`
for a missing key, message, stream or consumer, :class:`~bus.ConflictError` for a lost
compare-and-set, and :class:`~bus.BusError` for any other engine error, each ``from`` the original, so
:func:`bus.is_transient` still sees what it was raised from. cadenza's own errors pass unchanged.
Outside ``bus.transport`` nothing catches a nats-py error (tests/test_layers.py).
"""

from __future__ import annotations

from typing import Any, Literal

import nats.errors
import nats.js.errors

from .._exceptions import BusError, ConflictError, NotFoundError

__all__ = ("ENGINE_ERRORS", "engine_errors", "translate")

#: What an engine call may raise besides cadenza's own errors (a timeout included).
ENGINE_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError)

_MISSING = (
    nats.js.errors.KeyNotFoundError,
    nats.js.errors.NoKeysError,
    nats.js.errors.NotFoundError,  # KeyDeletedError (a deleted or purged key) and BucketNotFoundError too
)


def translate(exc: BaseException, what: str) -> BusError:
    """The cadenza error for the engine error ``exc`` met while ``what`` (raise it ``from exc``)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, _MISSING):
        return NotFoundError(f"{what}: not found ({detail})")
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return ConflictError(f"{what}: the revision moved on ({detail})")
    return BusError(f"{what}: {detail}")


class engine_errors:  # a function to its users: ``with engine_errors("..."):``
    """Translate the engine errors raised in the block (see :func:`translate`).

    A class, not a generator context manager: contextlib's generator machinery cost more than the
    rest of the block on paths taken once per activity (a worker's reply)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is not None and isinstance(exc, ENGINE_ERRORS):
            raise translate(exc, self.what) from exc
        return False
