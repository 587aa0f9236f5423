"""What a step of the broker may fail with and leave to a later step (or sweep) to retry."""

from __future__ import annotations

import bus
from bus.transport import ENGINE_ERRORS

__all__ = ("STEP_ERRORS",)

#: cadenza's errors, and an engine error or a timeout that escaped the transport's translation.
STEP_ERRORS: tuple[type[BaseException], ...] = (bus.CadenzaError, *ENGINE_ERRORS)
