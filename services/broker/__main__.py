"""``python -m services.broker --server URL --prefix P``: run the session broker until SIGTERM."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
