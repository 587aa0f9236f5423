"""Sessions: pin a run of activities to one worker, and the worker runtime that serves them.

* ``_client``: the session client (``create_session``, ``execute_activity``, ``complete_session``,
  ``recreate_session``, :class:`SessionClient`) and its errors.
* ``_worker``: :class:`Worker`, the runtime that takes tasks from its inbox, holds sessions and runs
  activities (tracked through ``bus.tracking``).
* ``_activity``: the activity running now (``activity_context()``, ``activity_writer()``), in the
  manner of temporalio's ``activity`` module.

Sessions build on ``bus.tracking`` and ``bus.transport``; nothing below imports them.
"""

from __future__ import annotations

import typing as _typing

from schemas._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from ._activity import activity_context as activity_context
    from ._activity import activity_writer as activity_writer
    from ._client import ActivityFailedError as ActivityFailedError
    from ._client import ActivityTimeoutError as ActivityTimeoutError
    from ._client import SessionClient as SessionClient
    from ._client import SessionCreationError as SessionCreationError
    from ._client import SessionFailedError as SessionFailedError
    from ._client import SessionInfo as SessionInfo
    from ._client import SessionOptions as SessionOptions
    from ._client import complete_session as complete_session
    from ._client import create_session as create_session
    from ._client import execute_activity as execute_activity
    from ._client import get_session_info as get_session_info
    from ._client import recreate_session as recreate_session
    from ._client import session as session
    from ._worker import ActivityRegistry as ActivityRegistry
    from ._worker import Worker as Worker
    from ._worker import WorkerState as WorkerState

__getattr__, __dir__ = _lazy_exports(__name__)

# No __all__ here: the block above is the list (schemas/_lazy.py gives it as __all__).
