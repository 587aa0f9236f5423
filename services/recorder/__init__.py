"""The activity recorder service: ``python -m services.recorder`` or ``cadenza recorder``."""

from __future__ import annotations

from ._recorder import Recorder as Recorder
from ._recorder import RecorderConfig as RecorderConfig

__all__ = ("Recorder", "RecorderConfig")
