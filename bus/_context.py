"""The immutable ``Context`` passed through the session and activity APIs, and cancellation with
a cause.

Go passes a ``context.Context``; cadenza passes a :class:`Context`: a frozen value holding the
current session info, the current activity id and a :class:`CancelToken`. Deriving a context
(:meth:`Context.derive`, :meth:`Context.child`) never changes the parent. Work runs inside
``with ctx.token.scope():`` (an anyio cancel scope); cancelling the token, with a
:class:`~schemas.CancelCause`, cancels every scope bound to it and every child token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import anyio

from schemas import CancelCause, CancelKind

__all__ = ("BUS_KEY", "CancelToken", "Context", "background", "loop_time")

_log = logging.getLogger("cadenza.context")


def loop_time() -> float:
    """``anyio.current_time()`` without its look-up of the running backend (a sixth of the cost of a
    call on the hot path, measured): cadenza runs on asyncio (nats-py), whose loop clock anyio's
    deadlines use."""
    return asyncio.get_running_loop().time()


#: anyio's cancel scope class of the asyncio backend, found by the first :func:`cancel_scope`.
_SCOPE_CLASS: Callable[..., anyio.CancelScope] | None = None


def cancel_scope(*, deadline: float = math.inf, shield: bool = False) -> anyio.CancelScope:
    """``anyio.CancelScope(...)`` without its look-up of the running backend on every call (a third
    of making a scope, measured; one or two are made per activity and call): cadenza runs on
    asyncio (nats-py), so the class is the asyncio backend's, found once."""
    global _SCOPE_CLASS
    make = _SCOPE_CLASS
    if make is None:
        make = _SCOPE_CLASS = type(anyio.CancelScope())
    return make(deadline=deadline, shield=shield)


#: Where a context carries its bus (``Bus.context()`` puts it there).
BUS_KEY = "cadenza.bus"


class CancelToken:
    """A cancellation handle that remembers why it was cancelled.

    The first cause wins: cancelling twice keeps the first cause. A child token is cancelled
    with its parent's cause when the parent is; cancelling a child leaves the parent alone.

    Args:
        parent: the token this one derives from.
    """

    __slots__ = ("_callbacks", "_cause", "_children", "_event", "_scopes", "parent")

    def __init__(self, parent: CancelToken | None = None) -> None:
        self.parent = parent
        self._cause: CancelCause | None = None
        self._children: list[CancelToken] = []
        self._scopes: list[anyio.CancelScope | _Waker] = []
        self._event: anyio.Event | None = None
        self._callbacks: list[Callable[[CancelCause], None]] | None = None
        if parent is not None:
            if parent._cause is not None:
                self._cause = parent._cause
            else:
                parent._children.append(self)

    def __repr__(self) -> str:
        return f"<CancelToken {'cancelled: ' + self._cause.text() if self._cause else 'live'}>"

    @property
    def cause(self) -> CancelCause | None:
        """The cause, or None while not cancelled."""
        return self._cause

    @property
    def cancelled(self) -> bool:
        return self._cause is not None

    def child(self) -> CancelToken:
        """A new token cancelled when this one is."""
        return CancelToken(self)

    def cancel(self, cause: CancelCause) -> bool:
        """Cancel with ``cause``; returns False when it was already cancelled (the first cause stays)."""
        if self._cause is not None:
            return False
        self._cause = cause
        for scope in self._scopes:
            scope.cancel()  # a _Waker calls its hook and wakes its sleeper
        children, self._children = self._children, []
        for child in children:
            child.cancel(cause)
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(cause)
        if self.parent is not None:
            # Let the parent forget us: a long-lived token must not collect dead children.
            try:
                self.parent._children.remove(self)
            except ValueError:
                pass
        return True

    def on_cancel(self, callback: Callable[[CancelCause], None]) -> None:
        """Call ``callback(cause)`` (plain, not awaited: schedule work from it) when cancelled; at
        once if it is already. No task waits for it, so a token costs nothing until it is cancelled."""
        if self._cause is not None:
            callback(self._cause)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def release(self) -> None:
        """Detach from the parent without cancelling (the work ended normally)."""
        if self.parent is not None:
            try:
                self.parent._children.remove(self)
            except ValueError:
                pass

    def scope(self, deadline: float = math.inf) -> _TokenScope:
        """A cancel scope bound to this token: cancelled at once if the token already is, or when it is.

        Use as ``with token.scope() as scope:`` (``scope`` is the anyio cancel scope). ``deadline``
        (``anyio.current_time()`` units) ends it then as well, as ``anyio.move_on_after`` would around
        it, with one scope instead of two.
        """
        return _TokenScope(self, deadline)

    async def sleep(
        self, wake: asyncio.Future[None], deadline: float, on_cancel: Callable[[CancelCause], None] | None = None
    ) -> None:
        """Wait until ``wake`` is done (whoever completes it), this token is cancelled, or the loop's
        clock (:func:`loop_time`) reaches ``deadline``, whichever comes first. Returns in every one
        of these cases (the caller looks at what happened); raises only when the waiting task
        itself is cancelled (an enclosing scope), as any wait does.

        ``on_cancel(cause)`` is called (plain, not awaited) inside :meth:`cancel`, before the wait
        wakes: what must go out at once (the session client's cancel of a remote activity). Not
        for a deadline, nor for a token already cancelled (then this returns at once).

        What ``with token.scope(deadline=...)`` around one wait does, without an anyio cancel scope:
        a future and one timer (the session client waits so once per call).
        """
        if self._cause is not None or wake.done():
            return
        waker = _Waker(wake, self, on_cancel)
        self._scopes.append(waker)
        timer = asyncio.get_running_loop().call_at(deadline, _wake, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._scopes.remove(waker)

    async def wait(self) -> CancelCause:
        """Wait until cancelled; returns the cause. Callers bound it with ``anyio.fail_after``."""
        if self._cause is None:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        assert self._cause is not None
        return self._cause


class _Waker:
    """A :meth:`CancelToken.sleep` in its token's list: the token's cancel calls its hook, then wakes
    it (in that order: what the hook starts, a publish, is then ahead of the sleeper's wake)."""

    __slots__ = ("hook", "token", "wake")

    def __init__(
        self, wake: asyncio.Future[None], token: CancelToken, hook: Callable[[CancelCause], None] | None
    ) -> None:
        self.wake, self.token, self.hook = wake, token, hook

    def cancel(self) -> None:
        assert self.token._cause is not None
        if self.hook is not None:
            try:
                self.hook(self.token._cause)
            except Exception:  # the sleeper, the token's scopes and children are cancelled all the same
                _log.exception("a token sleeper's cancel hook failed")
        _wake(self.wake)


def _wake(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


class _TokenScope:
    """What :meth:`CancelToken.scope` returns: an anyio cancel scope registered with the token while
    the block runs (a class, not a generator context manager: one is entered per activity)."""

    __slots__ = ("_scope", "_token")

    def __init__(self, token: CancelToken, deadline: float = math.inf) -> None:
        self._token = token
        self._scope = cancel_scope(deadline=deadline)

    def __enter__(self) -> anyio.CancelScope:
        scope = self._scope
        if self._token._cause is not None:
            scope.cancel()
        self._token._scopes.append(scope)
        try:
            return scope.__enter__()
        except BaseException:
            self._token._scopes.remove(scope)
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool | None:
        try:
            return self._scope.__exit__(exc_type, exc, tb)
        finally:
            self._token._scopes.remove(self._scope)


@dataclass(frozen=True, slots=True)
class Context:
    """An immutable bag of what the current work belongs to.

    Attributes:
        token: cancellation of the current work.
        session: the current session's info (``bus.SessionInfo``) or None.
        activity_id: the tracked activity this work reports to, or "".
        values: anything else a caller wants to carry (read-only).
    """

    token: CancelToken = field(default_factory=CancelToken)
    session: Any = None
    activity_id: str = ""
    values: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def cause(self) -> CancelCause | None:
        """Why this context was cancelled, or None."""
        return self.token.cause

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def derive(self, **changes: Any) -> Context:
        """A copy with some attributes replaced (same token unless ``token`` is given)."""
        if "values" in changes:
            changes["values"] = MappingProxyType(dict(changes["values"]))
        if not changes.keys() <= _CONTEXT_FIELDS:
            raise TypeError(f"Context has no field {', '.join(sorted(changes.keys() - _CONTEXT_FIELDS))}")
        # Not dataclasses.replace, which looks the fields up on every call (once per activity here).
        get = changes.get
        return Context(token=get("token", self.token), session=get("session", self.session),
                       activity_id=get("activity_id", self.activity_id), values=get("values", self.values))  # fmt: skip

    def child(self, **changes: Any) -> Context:
        """A copy with a child token: cancelling the child leaves this context alone."""
        return self.derive(token=self.token.child(), **changes)

    def with_value(self, key: str, value: object) -> Context:
        return self.derive(values={**self.values, key: value})


_CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(Context))
assert _CONTEXT_FIELDS == {"token", "session", "activity_id", "values"}, "Context.derive names every field"


def background() -> Context:
    """A fresh root context: no session, no activity, never cancelled by anyone but its owner."""
    return Context()


#: The cause used when a process shuts down its own work.
SHUTDOWN = CancelCause(kind=CancelKind.SHUTDOWN, who="", reason="the process is shutting down")
