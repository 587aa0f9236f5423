"""The one place that builds and parses cadenza subjects.

Grammar: ``<prefix>.<domain>.<id>.<event>``. The prefix may itself contain dots (``acme.cadenza``);
the domain, id and event are single tokens. Nothing else in cadenza formats subject strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_PREFIX",
    "DOMAINS",
    "OPTIONAL_TOKEN_PATTERN",
    "TOKEN_PATTERN",
    "SubjectError",
    "SubjectParts",
    "Subjects",
    "check_token",
]

#: The subject prefix when none is given (and the stem of stream and bucket names).
DEFAULT_PREFIX: Final = "cadenza"

#: Every domain and what travels on it.
DOMAINS: Final[dict[str, str]] = {
    "session": "session lifecycle: requested, assigned, rejected, completed, failed",
    "worker": "worker lifecycle: started, heartbeat, stopped",
    "task": "activity tasks: a tasklist's shared queue or one worker's inbox",
    "activity": "tracked activities: started, updated, message, completed",
    "cancel": "cancellation of an activity or a session, with its cause",
    "dlq": "rejected input, with the reason and the original headers",
    "rpc": "request/reply endpoints of services (not stored)",
}

#: What one subject token (an id, an event word, a prefix part) may be. The pydantic id fields carry
#: this pattern, so the JSON Schemas accept exactly the ids :func:`check_token` accepts.
TOKEN_PATTERN: Final = r"^[A-Za-z0-9_\-:=+@~]{1,200}$"
#: An id field that may be left blank ("" for "none"), else one token.
OPTIONAL_TOKEN_PATTERN: Final = r"^([A-Za-z0-9_\-:=+@~]{1,200})?$"
_TOKEN = re.compile(TOKEN_PATTERN[1:-1])


class SubjectError(ValueError):
    """A subject or a subject token is not valid cadenza grammar."""


def check_token(value: str, what: str = "token") -> str:
    """Return ``value`` if it can stand as one subject token, else raise :class:`SubjectError`.

    Tokens may not be empty, may not contain dots, spaces or wildcards, and are at most 200
    characters of ``[A-Za-z0-9_-:=+@~]``.
    """
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise SubjectError(
            f"{what} {value!r} cannot be a subject token: use 1-200 characters of letters, digits and _-:=+@~"
        )
    return value


@dataclass(frozen=True, slots=True)
class SubjectParts:
    """A parsed subject."""

    prefix: str
    domain: str
    id: str
    event: str


class Subjects:
    """Builds and parses subjects under one prefix.

    Args:
        prefix: the namespace, ``cadenza`` by default; dotted prefixes are allowed.
    """

    __slots__ = ("_depth", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        parts = prefix.split(".")
        for part in parts:
            check_token(part, "prefix part")
        self.prefix = prefix
        self._depth = len(parts)

    def __repr__(self) -> str:
        return f"Subjects({self.prefix!r})"

    def build(self, domain: str, id: str, event: str) -> str:
        """``<prefix>.<domain>.<id>.<event>`` after checking every token."""
        if domain not in DOMAINS:
            raise SubjectError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
        check_token(id, f"{domain} id")
        check_token(event, f"{domain} event")
        return f"{self.prefix}.{domain}.{id}.{event}"

    def domain_wildcard(self, domain: str) -> str:
        """``<prefix>.<domain>.>``: everything in a domain."""
        if domain not in DOMAINS:
            raise SubjectError(f"unknown domain {domain!r}")
        return f"{self.prefix}.{domain}.>"

    def filter(self, domain: str, id: str | None = None, event: str | None = None) -> str:
        """A subscription filter: ``*`` stands for an id or event not given."""
        if domain not in DOMAINS:
            raise SubjectError(f"unknown domain {domain!r}")
        id_part = "*" if id is None else check_token(id, f"{domain} id")
        event_part = "*" if event is None else check_token(event, f"{domain} event")
        return f"{self.prefix}.{domain}.{id_part}.{event_part}"

    def parse(self, subject: str) -> SubjectParts:
        """Split a concrete subject into its parts.

        Raises:
            SubjectError: the subject is not under this prefix or not of the grammar.
        """
        parts = subject.split(".")
        if len(parts) != self._depth + 3 or ".".join(parts[: self._depth]) != self.prefix:
            raise SubjectError(f"{subject!r} is not a {self.prefix}.<domain>.<id>.<event> subject")
        domain, id, event = parts[self._depth :]
        if domain not in DOMAINS:
            raise SubjectError(f"{subject!r} has an unknown domain {domain!r}")
        check_token(id, "id")
        check_token(event, "event")
        return SubjectParts(self.prefix, domain, id, event)
