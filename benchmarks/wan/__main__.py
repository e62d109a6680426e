"""``python -m benchmarks.wan``: the whole WAN benchmark (``benchmarks.wan.harness``).

    python -m benchmarks.wan --quick         # ~10 minutes on the smallest images
    python -m benchmarks.wan --help

The link alone: ``python -m benchmarks.wan.link``.
"""

from __future__ import annotations

import sys

from benchmarks.wan.harness import main

if __name__ == "__main__":
    sys.exit(main())
