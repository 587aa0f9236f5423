"""The demo: a worker with a few readable activities and ``cadenza demo``, a scripted scenario.

``cadenza dev`` starts the demo worker (``python -m services.demo.worker``); ``cadenza demo`` then
walks through sessions, streamed output, a user's cancel and a lost worker against it.
"""

from __future__ import annotations

__all__ = ()
