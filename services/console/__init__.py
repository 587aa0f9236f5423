"""The web console: workers, sessions, activities, dead letters and health, live in a browser."""

from __future__ import annotations

import typing as _typing

from schemas._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:  # imported when first used: `cadenza --help` reads ._cli, not Starlette
    from ._app import ConsoleOptions as ConsoleOptions
    from ._app import create_app as create_app
    from ._server import RunningConsole as RunningConsole
    from ._server import running_console as running_console
    from ._state import ConsoleConfig as ConsoleConfig
    from ._state import ConsoleState as ConsoleState

__getattr__, __dir__ = _lazy_exports(__name__)

__all__ = ("ConsoleConfig", "ConsoleOptions", "ConsoleState", "RunningConsole", "create_app", "running_console")
