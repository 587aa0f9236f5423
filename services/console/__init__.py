"""The web console: workers, sessions, activities, dead letters and health, live in a browser."""

from __future__ import annotations

from ._app import ConsoleOptions as ConsoleOptions
from ._app import create_app as create_app
from ._server import RunningConsole as RunningConsole
from ._server import running_console as running_console
from ._state import ConsoleConfig as ConsoleConfig
from ._state import ConsoleState as ConsoleState

__all__ = ("ConsoleConfig", "ConsoleOptions", "ConsoleState", "RunningConsole", "create_app", "running_console")
