"""The session broker service (``cadenza broker``).

The names are loaded on first use (PEP 562), so ``cadenza``'s parser can import ``services.broker._cli``
without the broker and ``bus`` behind it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._broker import Broker as Broker
    from ._broker import BrokerConfig as BrokerConfig
    from ._broker import BrokerState as BrokerState
    from ._tokens import TokenError as TokenError
    from ._tokens import TokenSigner as TokenSigner
    from ._tokens import WorkerClaim as WorkerClaim

__all__ = ("Broker", "BrokerConfig", "BrokerState", "TokenError", "TokenSigner", "WorkerClaim")

_WHERE = {"Broker": "._broker", "BrokerConfig": "._broker", "BrokerState": "._broker", "TokenError": "._tokens",
          "TokenSigner": "._tokens", "WorkerClaim": "._tokens"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
