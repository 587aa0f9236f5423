"""Celery (optional fourth system): a per-worker queue and ``revoke(terminate=True)`` for cancel.

It needs a ``redis-server`` binary and the ``celery`` package; the harness leaves the column out
and says why when either is missing. The scenarios themselves are not written yet.
"""

from __future__ import annotations

import importlib.util
import shutil

from ._common import NotAvailable
from ._peer import Peer

__all__ = ("CeleryPeer", "celery_missing")


def celery_missing() -> str:
    """Why Celery cannot run here, or ""."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if importlib.util.find_spec("celery") is None:
        return "the celery package is not installed"
    return ""


class CeleryPeer(Peer):
    name = "celery"

    async def start(self) -> None:
        raise NotAvailable(celery_missing() or "the Celery scenarios are not written yet")
