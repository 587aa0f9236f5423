"""The activity running now, in the manner of temporalio's ``activity`` module.

Inside an activity run by a :class:`~bus.Worker`, :func:`activity_context` gives its context
(``activity_id``, ``session``, ``token``) and :func:`activity_writer` a writer whose lines become the
activity's messages. The worker sets the context variable around each run.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from schemas import ActivityTask

from .._context import Context
from .._exceptions import UsageError
from ..tracking._service import BusActivityService
from ..tracking._writer import ActivityWriter

__all__ = ("activity_context", "activity_writer")


@dataclass(eq=False)
class _Running:
    ctx: Context
    task: ActivityTask
    service: BusActivityService
    writer: ActivityWriter | None = None


_current: ContextVar[_Running | None] = ContextVar("cadenza_activity", default=None)


def activity_context() -> Context:
    """The context of the activity running in this task: ``activity_id``, ``session``, ``token``/``cause``.

    Raises:
        UsageError: called outside an activity run by a :class:`Worker`.
    """
    return _running("activity_context").ctx


def activity_writer() -> ActivityWriter:
    """A file-like writer whose lines become messages of the running activity (flushed when it ends).

    Raises:
        UsageError: called outside an activity run by a :class:`Worker`.
    """
    run = _running("activity_writer")
    if run.writer is None:
        run.writer = run.service.open_writer(run.task.activity_id)
    return run.writer


def _running(caller: str) -> _Running:
    run = _current.get()
    if run is None:
        raise UsageError(f"{caller}() is only available inside an activity run by a Worker")
    return run
