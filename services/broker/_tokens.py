"""Signed recreate tokens: ``<payload>.<signature>``, both base64url, HMAC-SHA256 over the payload.

The payload names the worker (and its host and tasklist) the session ran on; the broker opens a
recreated session there and nowhere else. Without the broker's key a caller cannot make a token
for a worker of its choosing, and any change to a token breaks its signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

__all__ = ("TokenError", "TokenSigner", "WorkerClaim")


class TokenError(ValueError):
    """The token is malformed, or its signature does not match (forged or altered)."""


@dataclass(frozen=True, slots=True)
class WorkerClaim:
    worker_id: str
    host_name: str
    tasklist: str
    session_id: str
    issued_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Signs and checks recreate tokens with one secret key (shared by every broker replica)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the token key must be at least 16 bytes")
        self._key = key

    def sign(self, claim: WorkerClaim) -> str:
        payload = _b64(json.dumps(
            {"v": 1, "w": claim.worker_id, "h": claim.host_name, "t": claim.tasklist, "s": claim.session_id,
             "i": round(claim.issued_at, 3)}, separators=(",", ":"), sort_keys=True).encode())  # fmt: skip
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> WorkerClaim:
        """The claim of a token this broker (or a replica with the same key) signed.

        Raises:
            TokenError: says whether the token is malformed or its signature does not match.
        """
        payload, sep, signature = token.partition(".")
        if not sep or not payload or not signature:
            raise TokenError("the recreate token is malformed (expected <payload>.<signature>)")
        if not hmac.compare_digest(signature, self._mac(payload)):
            raise TokenError("the recreate token's signature does not match: it was forged or altered")
        try:
            data = json.loads(_unb64(payload))
            return WorkerClaim(str(data["w"]), str(data["h"]), str(data["t"]), str(data["s"]), float(data["i"]))
        except (binascii.Error, ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"the recreate token's payload is unreadable: {exc}") from None

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
