"""The activity recorder service: ``python -m services.recorder`` or ``cadenza recorder``.

The names are loaded on first use (PEP 562), so ``cadenza``'s parser can import
``services.recorder._cli`` without the recorder and ``bus`` behind it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._recorder import Recorder as Recorder
    from ._recorder import RecorderConfig as RecorderConfig
    from ._recorder import RecorderState as RecorderState

__all__ = ("Recorder", "RecorderConfig", "RecorderState")


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("._recorder", __name__), name)
