"""The recreate-token key: the configured one, else ``CADENZA_TOKEN_KEY``, else one generated once.

The generated key is kept in the broker-only bucket (refused when ``CADENZA_REQUIRE_TOKEN_KEY`` is
set, as deploy/ does). Older brokers kept the generated key in the sessions bucket, which callers
may read: it is moved (so tokens stay valid) and purged from there, history included.
"""

from __future__ import annotations

import logging
import os
import secrets

import bus
from bus.transport import RawBucket

__all__ = ("KEY_ENTRY", "token_key")

_log = logging.getLogger("cadenza.broker")

#: Key of the generated token key (used only without CADENZA_TOKEN_KEY) in the broker-only bucket;
#: brokers before 2026-12 kept it under the same key in the sessions bucket (moved at start).
KEY_ENTRY = "_broker-token-key"


async def token_key(bus_: bus.Bus, sessions: RawBucket, configured: bytes | None) -> bytes:
    """The key recreate tokens are signed with (see the module's note).

    Raises:
        bus.CadenzaError: no key is given and the environment requires one.
        bus.BusError: a bucket could not be read or written.
    """
    legacy = await sessions.read(KEY_ENTRY)  # a delete marker leaves older revisions readable; a purge none
    key = configured or os.environ.get("CADENZA_TOKEN_KEY", "").encode()
    if not key:
        key = await _generated(bus_, legacy.value if legacy is not None else None)
    if legacy is not None and legacy.operation != "PURGE":
        # Copied (or superseded by the configured key): no revision may stay readable.
        await sessions.purge(KEY_ENTRY)
        _log.warning("removed an older broker's token key from the sessions bucket (callers can read it)")
    return key


async def _generated(bus_: bus.Bus, legacy: bytes | None) -> bytes:
    """The generated key in the broker-only bucket, made (or moved from ``legacy``) if there is none."""
    if os.environ.get("CADENZA_REQUIRE_TOKEN_KEY", "").lower() not in ("", "0", "false", "no"):
        raise bus.CadenzaError(
            "CADENZA_TOKEN_KEY is not set and CADENZA_REQUIRE_TOKEN_KEY is: give every broker replica "
            "the same key of at least 16 bytes (e.g. `openssl rand -hex 32`)", non_retryable=True,
        )  # fmt: skip
    _log.warning("CADENZA_TOKEN_KEY is not set: using a generated key kept in the broker-only bucket "
                 "(set the variable in production; see deploy/)")  # fmt: skip
    vault = RawBucket(bus_, "broker")
    try:
        await vault.write(KEY_ENTRY, legacy or secrets.token_hex(32).encode())
    except bus.ConflictError:
        pass  # another replica made (or moved) it first
    stored = await vault.read(KEY_ENTRY)
    return (stored.value if stored is not None else None) or b""
