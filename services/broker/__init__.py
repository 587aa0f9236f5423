"""The session broker service (``cadenza broker``)."""

from __future__ import annotations

from ._broker import Broker as Broker
from ._broker import BrokerConfig as BrokerConfig
from ._tokens import TokenError as TokenError
from ._tokens import TokenSigner as TokenSigner
from ._tokens import WorkerClaim as WorkerClaim

__all__ = ("Broker", "BrokerConfig", "TokenError", "TokenSigner", "WorkerClaim")
