"""Tracked activities: announce a piece of work, stream its messages, end it; list, read, tail, cancel.

* ``_api``: the activity package's API (the :class:`Service` protocol, requests, typed errors, the
  handler helpers ``run_handler_activity`` and friends).
* ``_service``: :class:`BusActivityService`, the service backed by the bus (events on the
  ``activity`` stream, cancels through the cancel router, host heartbeats).
* ``_writer``: the line writer whose lines become an activity's messages.
* ``_fold`` (pure, no NATS) and ``_follow``: the stream folded into records, and the follower that
  feeds the fold; ``_reader``: the recorder's endpoints as typed calls, the message reader, the
  live change feed.

Tracking builds on ``bus.transport`` and the shared pieces; it knows nothing of sessions.
"""

from __future__ import annotations

import typing as _typing

from schemas._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from ._api import CANCELLED_BY_USER as CANCELLED_BY_USER
    from ._api import FIRST_COMPLETION as FIRST_COMPLETION
    from ._api import ActivityAlreadyStartedError as ActivityAlreadyStartedError
    from ._api import ActivityCancelledError as ActivityCancelledError
    from ._api import ActivityFinishedError as ActivityFinishedError
    from ._api import ActivityNotCancellableError as ActivityNotCancellableError
    from ._api import ActivityNotFoundError as ActivityNotFoundError
    from ._api import AppendMessageRequest as AppendMessageRequest
    from ._api import HandlerOptions as HandlerOptions
    from ._api import MessageAppender as MessageAppender
    from ._api import Service as Service
    from ._api import StartRequest as StartRequest
    from ._api import Tracker as Tracker
    from ._api import UpdateRequest as UpdateRequest
    from ._api import cancelled_by_context as cancelled_by_context
    from ._api import clamp_progress as clamp_progress
    from ._api import complete_handler_activity as complete_handler_activity
    from ._api import completed_already as completed_already
    from ._api import run_handler_activity as run_handler_activity
    from ._api import start_handler_activity_for_user as start_handler_activity_for_user
    from ._api import status_for_cause as status_for_cause
    from ._api import store_first_completion as store_first_completion
    from ._fold import ACTIVITY_EVENTS as ACTIVITY_EVENTS
    from ._fold import ActivityEvent as ActivityEvent
    from ._fold import Entry as Entry
    from ._fold import FirstEvent as FirstEvent
    from ._fold import StreamFold as StreamFold
    from ._fold import fold_activity_event as fold_activity_event
    from ._follow import follow_activity_events as follow_activity_events
    from ._reader import ActivityClient as ActivityClient
    from ._reader import MessageBatch as MessageBatch
    from ._reader import read_activity_messages as read_activity_messages
    from ._reader import watch_activities as watch_activities
    from ._service import BusActivityService as BusActivityService
    from ._service import ServiceState as ServiceState
    from ._writer import ActivityWriter as ActivityWriter
    from ._writer import flush_writer as flush_writer
    from ._writer import new_writer as new_writer
    from ._writer import write_started_line as write_started_line

__getattr__, __dir__ = _lazy_exports(__name__)

# No __all__ here: the block above is the list (schemas/_lazy.py gives it as __all__).
