"""The one exception tree of cadenza.

::

    CadenzaError
    ├── BusError                    the bus (server, connection, streams) failed us
    │   ├── ServerStartError        the embedded nats-server would not start
    │   ├── ConnectError            no server answered at the given URL(s)
    │   ├── TopologyError           a stream/consumer/bucket could not be declared or upgraded
    │   ├── PublishError            a publish was not acknowledged in time
    │   ├── NotFoundError           no such key, message, stream or consumer on the server
    │   ├── ConflictError           a compare-and-set lost: the key's revision moved on
    │   └── RequestError            a request got no reply, or an error reply
    │       └── RemoteError         the service answered with a typed error
    ├── ValidationError             input is not what the contract says (bad JSON, shape, version, size)
    ├── UsageError                  the API used the wrong way (a worker started twice, a call out of place)
    ├── SessionError                sessions (defined in bus.sessions, except this base)
    │   ├── SessionFailedError      the session failed (worker lost or shut down, execution timeout)
    │   └── SessionCreationError    no session could be opened (no worker, no slot, bad token, no broker)
    └── ActivityError               activities (defined in bus.tracking and bus.sessions, except this base)
        ├── ActivityCancelledError       bus.tracking: the activity was cancelled (``cause`` says why)
        ├── ActivityAlreadyStartedError  bus.tracking: that activity id was started already
        ├── ActivityFinishedError        bus.tracking: the activity has finished (its first status stays)
        ├── ActivityNotFoundError        bus.tracking: no such activity (the recorder's answer)
        ├── ActivityNotCancellableError  bus.tracking: it ended, it cannot be cancelled
        ├── ActivityFailedError          bus.sessions: the activity raised on its worker
        └── ActivityTimeoutError         bus.sessions: no result within ``start_to_close_timeout``

Each of these is also a name of ``bus`` (``bus.SessionFailedError``, ...). A :class:`UsageError` is
not a :class:`SessionError` or an :class:`ActivityError`: it says the calling code is wrong.

Every error carries the retry decision a consumer makes when a handler raises it:
``non_retryable`` (terminate and dead-letter at once) and ``retry_delay`` (nak with this delay).
Errors of nats-py are translated at the transport's boundary with ``raise ... from exc``
(``bus.transport.engine_errors``): nothing outside ``bus.transport`` catches a nats-py error. Whether
an engine error passes by itself (an election, a timeout) is read from the error it was raised from
(``bus.is_transient``).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = (
    "ActivityError",
    "BusError",
    "CadenzaError",
    "ConflictError",
    "ConnectError",
    "NoResponderError",
    "NotFoundError",
    "PublishError",
    "RemoteError",
    "RequestError",
    "ServerStartError",
    "SessionError",
    "TopologyError",
    "UsageError",
    "ValidationError",
)


class CadenzaError(Exception):
    """Root of every error cadenza raises on purpose.

    Args:
        message: readable text.
        non_retryable: a consumer that sees this error terminates the message and dead-letters it
            at once instead of redelivering it.
        retry_delay: seconds a consumer waits before redelivery (None: the consumer's backoff).
    """

    #: Short machine-readable name, used in error replies and dead-letter entries.
    code: ClassVar[str] = "error"
    default_non_retryable: ClassVar[bool] = False

    def __init__(
        self, message: str = "", *, non_retryable: bool | None = None, retry_delay: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.non_retryable = self.default_non_retryable if non_retryable is None else non_retryable
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        return self.message


class BusError(CadenzaError):
    """The NATS server or the connection to it failed an operation."""

    code = "bus_error"


class ServerStartError(BusError):
    """The embedded nats-server binary is missing, exited, or did not become ready in time."""

    code = "server_start"


class ConnectError(BusError):
    """No NATS server answered at the URL(s) given; the message names them."""

    code = "connect"


class TopologyError(BusError):
    """A stream, consumer or key-value bucket could not be created or upgraded in place."""

    code = "topology"


class PublishError(BusError):
    """A JetStream publish was not acknowledged after the allowed retries: it may not be stored."""

    code = "publish"


class NotFoundError(BusError):
    """The server has no such key, message, stream or consumer (a key deleted or purged counts)."""

    code = "not_found"


class ConflictError(BusError):
    """A compare-and-set write lost: the key's revision is no longer the one it was read at."""

    code = "conflict"


class RequestError(BusError):
    """A request got no reply in time (no service listening, or it is too slow)."""

    code = "request"


class NoResponderError(RequestError):
    """Nobody listens on a request's subject (the server said so at once: no service is running)."""

    code = "no_responder"


class RemoteError(RequestError):
    """A service answered a request with a typed error; ``code`` is the remote error's code.

    Args:
        message: the remote error text.
        code: the remote error's code (``not_found``, ``validation``, ...).
    """

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message, non_retryable=True)
        self.remote_code = code


class ValidationError(CadenzaError):
    """Input does not follow the contract: not JSON, wrong shape, unknown version, too large,
    or a bad subject token. Never retried: the same bytes will fail the same way.

    Args:
        message: what is wrong and, where it helps, what to fix.
        kind: ``bad_json``, ``bad_shape``, ``unknown_version``, ``unknown_type``, ``oversize``,
            ``bad_subject`` or ``bad_request``.
    """

    code = "validation"
    default_non_retryable = True

    def __init__(self, message: str, *, kind: str = "bad_shape") -> None:
        super().__init__(message)
        self.kind = kind


class UsageError(CadenzaError):
    """The API was used the wrong way: a worker started twice, a call made outside the activity or
    the state it needs. A bug in the calling code, not a condition to retry."""

    code = "usage"
    default_non_retryable = True


class SessionError(CadenzaError):
    """Base of the errors of the session API."""

    code = "session"


class ActivityError(CadenzaError):
    """Base of the errors of the activity tracking API."""

    code = "activity"
