"""What every service process shares: argument parsing for the server, logs and telemetry, signals,
the ready line, and turning errors into one line on stderr.

:func:`start_process` runs once per process (``cadenza <command>`` and the ``python -m
services.<name>`` entry points): logging (``CADENZA_LOG``, ``--log-format``) and OpenTelemetry from
the ``OTEL_*`` variables (``--metrics-port`` for a Prometheus endpoint); :func:`stop_process` flushes
the exporters on the way out, so a one-shot command's spans leave too. A one-shot command connects
with :func:`cli_bus` (a short connect bound, no reconnect loop: a dead server is one line in well
under 2 s); services with :func:`service_bus` (reconnect forever).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, NoReturn, TypeVar

from . import _telemetry

if TYPE_CHECKING:  # imported when a command runs, not when the parser is built
    from datetime import datetime

    import bus

__all__ = (
    "READY",
    "LazyChoices",
    "Parser",
    "add_metrics_args",
    "add_reconnect_args",
    "add_server_args",
    "again_after_reconnect",
    "announce_ready",
    "cli_bus",
    "connected",
    "event_loop",
    "fail",
    "float_arg",
    "id_arg",
    "int_arg",
    "keep_reconnecting",
    "one_match",
    "reconnects",
    "riding_out",
    "run_service",
    "service_bus",
    "since_reconnect",
    "start_process",
    "stop_process",
    "watch_connection",
    "when",
    "with_cli_bus",
)

#: Printed on stdout once a service serves; tests and ``cadenza dev`` wait for it.
READY = "cadenza: ready"

_log = logging.getLogger("cadenza")
_T = TypeVar("_T")
_state = {"one_shot": False}


def fail(message: str, code: int = 2) -> int:
    """Print ``cadenza: <message>`` on stderr (one line) and return ``code``."""
    print(f"cadenza: {message}", file=sys.stderr)
    return code


def when(value: datetime | None) -> str:
    """A time in the local zone for a table (``-`` for none)."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def one_match(given: str, matches: Sequence[str], noun: str, *, plural: str = "", missing: str = "") -> str | None:
    """The one of ``matches`` (ids starting with ``given``), or None with one line on stderr that says
    there is none (``missing``, default ``no <noun> <given>``) or which ones ``given`` starts."""
    if len(matches) == 1:
        return matches[0]
    if not matches:
        fail(missing or f"no {noun} {given}")
        return None
    shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
    fail(f"{given!r} is the start of {len(matches)} {plural or noun + 's'}: {shown}")
    return None


def with_cli_bus(args: argparse.Namespace, work: Callable[[bus.Bus], Awaitable[int]]) -> int:
    """Run a one-shot command's ``work`` on a bus to ``--server`` / ``NATS_URL``; its exit code (or
    run_service's, when the run itself failed), or 2 with one line when no server is given."""
    if not (args.server or os.environ.get("NATS_URL")):
        return fail("no server given: pass --server nats://host:port or set NATS_URL (`cadenza dev` prints it)")
    outcome = {"code": 0}

    async def go() -> None:
        async with cli_bus(args) as b:
            outcome["code"] = await work(b)

    return run_service(go) or outcome["code"]


def add_server_args(p: argparse.ArgumentParser) -> None:
    """``--server``, ``--prefix`` and ``--log-format``, shared by every command that talks to NATS."""
    p.add_argument("--server", "-s", default=None,
                   help="NATS URL(s), comma-separated: nats://host:port or tls://host:port (default: $NATS_URL)"
                   )  # fmt: skip
    p.add_argument(
        "--prefix", default=os.environ.get("CADENZA_PREFIX", "cadenza"), help="subject prefix (default: cadenza)"
    )
    p.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("CADENZA_LOG_FORMAT", "text"),
                   help="log lines on stderr as text or one JSON object per line, with the trace id "
                   "(default: text, or $CADENZA_LOG_FORMAT)")  # fmt: skip


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    """``--metrics-port``: a Prometheus scrape endpoint on loopback (long-running commands)."""
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (0: any free port)")  # fmt: skip


def start_process(command: str, args: argparse.Namespace | None = None, *, one_shot: bool = False) -> None:
    """Logs and telemetry for this process; ``one_shot`` commands report any failure in one line."""
    _state["one_shot"] = one_shot
    level = os.environ.get("CADENZA_LOG") or ("WARNING" if one_shot else "INFO")
    _telemetry.start(
        command,
        log_format=getattr(args, "log_format", None) or os.environ.get("CADENZA_LOG_FORMAT", "text"),
        log_level=level,
        metrics_port=getattr(args, "metrics_port", None),
    )


def stop_process() -> None:
    """Flush the telemetry exporters (bounded); safe without :func:`start_process`."""
    _telemetry.stop()


def announce_ready(what: str) -> None:
    print(f"{READY} {what}", flush=True)


_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


def server_urls(args: argparse.Namespace) -> str | None:
    """``--server`` or ``NATS_URL``, checked (SystemExit with one line saying what to fix)."""
    value = args.server or os.environ.get("NATS_URL") or None
    if value is None:
        return None
    for url in (u.strip() for u in value.split(",")):
        if "://" in url and not url.startswith(_SCHEMES):
            where = "--server" if args.server else "NATS_URL"
            raise SystemExit(f"cadenza: {where}={url!r}: NATS URLs start with nats:// or tls:// "
                             "(or ws://, wss://), e.g. nats://127.0.0.1:4222")  # fmt: skip
    return value


_NO_SERVER = "no server given: pass --server nats://host:port or set NATS_URL (`cadenza dev` prints it)"


@asynccontextmanager
async def service_bus(args: argparse.Namespace, name: str, *, embedded_ok: bool = False) -> AsyncIterator[bus.Bus]:
    """Connect as a service: ``--server``, else ``NATS_URL``; refuse to start an embedded server
    unless ``embedded_ok`` (a service alone on its own private server is useless)."""
    import anyio

    import bus
    from bus.transport import serve_service_info

    urls = server_urls(args)
    if urls is None and not embedded_ok:
        raise SystemExit(f"cadenza {name}: no server given; pass --server nats://host:port or set NATS_URL")

    async with bus.connect(urls, prefix=args.prefix, name=name) as b, anyio.create_task_group() as tg:
        # Every service answers <prefix>.rpc.services.info (the console's Health page lists them).
        await tg.start(serve_service_info, b, name)
        yield b
        tg.cancel_scope.cancel()


@asynccontextmanager
async def cli_bus(args: argparse.Namespace, name: str = "cadenza-cli", *, ensure_topology: bool = False,
                  reconnect: bool = False) -> AsyncIterator[bus.Bus]:  # fmt: skip
    """Connect for one command: a 2 s connect bound, two tries per server, no reconnect loop.

    ``reconnect``: once connected, reconnect for as long as it takes (a command that follows something:
    ``tail``); :func:`watch_connection` then says when the connection drops and bounds the wait.
    """
    import bus

    urls = server_urls(args)
    if urls is None:
        raise SystemExit(f"cadenza: {_NO_SERVER}")
    options = bus.ConnectOptions.from_env(servers=urls, name=name, max_reconnect_attempts=1, reconnect_time_wait=0.1)
    timeouts = bus.Timeouts(connect=2.0)
    async with bus.connect(
        urls, prefix=args.prefix, name=name, options=options, timeouts=timeouts, ensure_topology=ensure_topology
    ) as b:
        if reconnect:
            keep_reconnecting(b)
        yield b


_RECONNECT_WAIT = 0.25
#: How often :func:`watch_connection` and :func:`again_after_reconnect` look at the connection (seconds).
_WATCH_EVERY = 0.1


def keep_reconnecting(b: bus.Bus) -> None:
    """From now on, reconnect ``b`` for as long as it takes (:func:`watch_connection` bounds the wait).

    nats-py reads these options at each reconnect: a dead server still fails a command's first connect
    fast (``cli_bus``), a server lost later is tried again every 0.25 s.
    """
    from bus.transport import keep_reconnecting as keep

    keep(b, _RECONNECT_WAIT)


def add_reconnect_args(p: argparse.ArgumentParser) -> None:
    """``--reconnect-timeout``, for the commands that follow something (``tail``, ``activities tail``)."""
    p.add_argument("--reconnect-timeout", type=float_arg(0.1), default=60.0, metavar="SECONDS",
                   help="if the server goes away, wait this long for it to come back, then exit 1 (default 60)"
                   )  # fmt: skip


async def riding_out(b: bus.Bus, call: Callable[[], Awaitable[_T]], *, give_up_after: float, what: str = "") -> _T:
    """``await call()`` on ``b`` while :func:`watch_connection` watches it (reconnecting, saying so in a
    line when it drops and when it is back, giving up after ``give_up_after`` s); ``call``'s own
    exception comes out as it is, not in a group."""
    import anyio

    keep_reconnecting(b)
    result: list[_T] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(watch_connection, b, give_up_after=give_up_after, what=what))
            result.append(await call())
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return result[0]


async def again_after_reconnect(b: bus.Bus, call: Callable[[], Awaitable[_T]]) -> _T:
    """``await call()`` (a request); when the connection drops meanwhile, cancel it (its answer is lost)
    and call again once the connection is back. Wait for that under :func:`riding_out`, which bounds it."""
    import anyio

    import bus

    async def run(result: list[_T], scope: anyio.CancelScope) -> None:
        result.append(await call())
        scope.cancel()

    while True:
        while not connected(b):  # noqa: ASYNC110 - nats-py's connection state has no event to wait on
            await anyio.sleep(_WATCH_EVERY)
        before = reconnects(b)
        result: list[_T] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, result, tg.cancel_scope)
                while connected(b) and reconnects(b) == before:  # noqa: ASYNC110 - as above
                    await anyio.sleep(_WATCH_EVERY)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = group.exceptions[0] if len(group.exceptions) == 1 else group
            if not isinstance(error, bus.RequestError) or isinstance(error, bus.RemoteError):
                raise error from None
            same_connection = connected(b) and reconnects(b) == before
            if same_connection and since_reconnect(b) > _SERVICES_BACK:
                raise error from None
            # The request was lost with the connection, or the service has not reconnected yet.
            await anyio.sleep(_WATCH_EVERY)
        if result:
            return result[0]


#: Seconds after a reconnect during which a request without an answer is asked again: the services
#: reconnect too, a moment after us.
_SERVICES_BACK = 10.0
_reconnect_seen: dict[int, tuple[int, float]] = {}


def reconnects(b: bus.Bus) -> int:
    """How many times ``b`` has reconnected (a new connection: server state may be gone)."""
    from bus.transport import link_status

    return link_status(b).reconnects


def connected(b: bus.Bus) -> bool:
    """True while ``b``'s connection is up (False while it reconnects)."""
    from bus.transport import link_status

    return link_status(b).connected


def since_reconnect(b: bus.Bus) -> float:
    """Seconds since ``b`` was first seen reconnected (by this or :func:`watch_connection`'s polls);
    infinite if it never was."""
    import time

    count = reconnects(b)
    if not count:
        return float("inf")
    seen = _reconnect_seen.get(id(b))
    if seen is None or seen[0] != count:
        _reconnect_seen[id(b)] = seen = (count, time.monotonic())
    return time.monotonic() - seen[1]


async def watch_connection(b: bus.Bus, *, give_up_after: float, what: str = "") -> NoReturn:
    """Watch ``b``'s connection until cancelled: one line on stderr when it drops, one when it is back;
    a :class:`bus.BusError` when it stays down for ``give_up_after`` seconds (the command's one line).

    Meanwhile nats-py's reconnect errors (one per attempt) stay out of the log: the two lines say it.
    Run it beside the work in a task group, on a bus from ``cli_bus(..., reconnect=True)``.
    """
    import time

    import anyio

    import bus
    from bus.transport import is_closed

    url = b.url
    quiet = _QuietWhileDown(lambda: connected(b))
    logger = logging.getLogger("cadenza.bus")
    logger.addFilter(quiet)
    down_since: float | None = None
    try:
        while True:
            await anyio.sleep(_WATCH_EVERY)
            if is_closed(b):
                raise bus.BusError(f"the connection to {url} was closed")
            if connected(b):
                since_reconnect(b)  # notes the time of a reconnect
                if down_since is not None:
                    down_since = None
                    url = b.url
                    print(f"cadenza: reconnected to {url}{'; ' + what if what else ''}", file=sys.stderr, flush=True)
            elif down_since is None:
                down_since = time.monotonic()
                print(f"cadenza: lost the connection to {url}; reconnecting (giving up after {give_up_after:g}s)",
                      file=sys.stderr, flush=True)  # fmt: skip
            elif time.monotonic() - down_since >= give_up_after:
                raise bus.BusError(f"{url} did not come back within {give_up_after:g}s; giving up")
    finally:
        logger.removeFilter(quiet)


class _QuietWhileDown(logging.Filter):
    """Drops the bus's info and warning lines while the connection is down (a failed try each), and
    nats-py's report of the end of the stream that starts it (``UnexpectedEOF``, still "connected")."""

    def __init__(self, connected: Callable[[], bool]) -> None:
        super().__init__()
        self._connected = connected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        return self._connected() and "UnexpectedEOF" not in record.getMessage()


#: ``CADENZA_EVENT_LOOP``'s values: uvloop (the default where it is installed) or the standard one.
EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop(env: Mapping[str, str] | None = None) -> str:
    """The event loop a service runs on: ``CADENZA_EVENT_LOOP`` (``uvloop`` or ``asyncio``), else
    uvloop where it is installed (it wakes on a message and writes it out in C, not in Python: less
    CPU per message and a shorter wake on an idle process; docs/DESIGN.md), else asyncio.

    Raises:
        ValueError: the variable names another loop, or uvloop, which is not installed.
    """
    chosen = (os.environ if env is None else env).get("CADENZA_EVENT_LOOP", "").strip().lower()
    if chosen and chosen not in EVENT_LOOPS:
        raise ValueError(f"CADENZA_EVENT_LOOP={chosen!r} is not an event loop: use uvloop or asyncio")
    if chosen == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if chosen == "uvloop":
            raise ValueError("CADENZA_EVENT_LOOP=uvloop but uvloop is not installed: pip install uvloop") from None
        return "asyncio"
    return "uvloop"


#: ``CADENZA_GC_THRESHOLD``'s default: the cyclic garbage collector's first-generation threshold in
#: cadenza's processes (Python's is 700).
GC_THRESHOLD = 20_000


def tune_gc(env: Mapping[str, str] | None = None) -> int:
    """Set this process's cyclic garbage collector as cadenza's processes run it: objects alive now
    (the modules, start-up state) are frozen out of its scans and a young collection comes after
    ``CADENZA_GC_THRESHOLD`` (default :data:`GC_THRESHOLD`; ``0``: Python's defaults, untouched)
    net new container objects instead of 700. Returns the threshold in force.

    Why: every message makes short-lived containers (a task, its frames, dicts, futures) that
    reference counting frees; under load a worker collected 15 times a second and spent 5-6% of
    its CPU there (bench.hotpath with a ``gc.callbacks`` timer), 0.6% at 20,000. What the collector
    exists for (cycles) waits at most that many allocations longer: a few MB at most.

    Raises:
        ValueError: the variable is not a whole number >= 0.
    """
    raw = (os.environ if env is None else env).get("CADENZA_GC_THRESHOLD", "").strip()
    if not raw:
        threshold = GC_THRESHOLD
    elif raw.isascii() and raw.isdigit():
        threshold = int(raw)
    else:
        raise ValueError(
            f"CADENZA_GC_THRESHOLD={raw!r} is not a whole number: use e.g. 20000, or 0 for Python's default"
        )
    if threshold == 0:
        return gc.get_threshold()[0]
    gc.freeze()
    gc.set_threshold(threshold, *gc.get_threshold()[1:])
    return threshold


def run_service(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` until it returns or SIGTERM/SIGINT arrives (then cancel it: graceful stop).

    A cadenza error (a refused connection, a remote error) is one line on stderr and exit code 1. In a
    one-shot command anything else is one line too (``CADENZA_LOG=debug`` logs the traceback); in a
    long-running service it is a bug and propagates with its traceback.
    """
    import anyio

    try:
        loop = event_loop()
        tune_gc()
    except ValueError as exc:
        print(f"cadenza: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        start_process(os.path.basename(sys.argv[0]).removesuffix(".py") or "service")

    async def runner() -> None:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signals)
            await main()
            tg.cancel_scope.cancel()

    try:
        anyio.run(runner, backend_options={"use_uvloop": loop == "uvloop"})
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        exits = _leaves(exc, SystemExit)
        if exits is not None and exits:
            raise exits[0] from None
        errors = _cadenza_errors(exc)
        if errors:
            for message in dict.fromkeys((str(err).strip().splitlines() or [""])[0] for err in errors):
                print(f"cadenza: {message}", file=sys.stderr)
            return 1
        if not _state["one_shot"] or not isinstance(exc, Exception):
            raise
        leaf = (_leaves(exc, Exception) or [exc])[0]
        _log.debug("unexpected error", exc_info=exc)
        first = (str(leaf).strip().splitlines() or [""])[0]
        print(f"cadenza: unexpected {type(leaf).__name__}: {first} (CADENZA_LOG=debug shows where)", file=sys.stderr)
        return 1
    return 0


def _leaves(exc: BaseException, kind: type[BaseException]) -> list[BaseException] | None:
    """The exceptions of type ``kind`` in ``exc`` (looking inside groups); None if there are others."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            sub = _leaves(inner, kind)
            if sub is None:
                return None
            found += sub
        return found
    return [exc] if isinstance(exc, kind) else None


def _cadenza_errors(exc: BaseException) -> list[bus.CadenzaError]:
    """The cadenza errors in ``exc`` (looking inside exception groups), or [] if anything else is there."""
    import bus

    found = _leaves(exc, bus.CadenzaError)
    return [e for e in found or [] if isinstance(e, bus.CadenzaError)]


def id_arg(what: str) -> Callable[[str], str]:
    """An argparse ``type`` for an id (or the start of one): one line naming the rule when it is not."""

    def check(value: str) -> str:
        from schemas import check_token

        try:
            return check_token(value, what)
        except ValueError:
            if not value:
                raise argparse.ArgumentTypeError(f"an empty {what}") from None
            raise argparse.ArgumentTypeError(
                f"{value!r} is not {_article(what)} {what}: use 1-200 letters, digits and _-:=+@~ (or the start of one)"
            ) from None

    return check


def int_arg(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer in ``[low, high]``."""

    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{number} is out of range: must be {bound}")
        return number

    return check


def float_arg(low: float = 0.0) -> Callable[[str], float]:
    """An argparse ``type`` for a number of seconds (or similar) of at least ``low``."""

    def check(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not number >= low or number == float("inf"):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be a finite number >= {low:g}")
        return number

    return check


class LazyChoices:
    """``choices=`` whose values are computed when first needed (an enum of ``schemas``, say), so
    building the parser imports nothing heavy. Give the argument a ``metavar`` too."""

    def __init__(self, values: Callable[[], Sequence[str]]) -> None:
        self._values = values
        self._cache: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._cache is None:
            self._cache = tuple(self._values())
        return self._cache

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cadenza: {self.prog.removeprefix('cadenza ')}: {message} (see --help)\n")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
