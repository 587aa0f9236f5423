"""Event classes used only by the foundation tests (kept out of the schema registry)."""

from __future__ import annotations

from pydantic import Field

from schemas import Event


class Ping(Event):
    DOMAIN = "session"
    EVENT = "ping"
    REGISTER = False

    key: str = Field(default="k1", pattern=r"^[a-z0-9]{1,20}$")
    n: int = Field(ge=0)

    def subject_id(self) -> str:
        return self.key


class Pong(Event):
    DOMAIN = "session"
    EVENT = "pong"
    REGISTER = False

    key: str = "k1"
    text: str = ""

    def subject_id(self) -> str:
        return self.key
