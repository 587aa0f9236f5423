"""``python -m services.console --server URL --prefix P --port N``: serve the console until SIGTERM."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
