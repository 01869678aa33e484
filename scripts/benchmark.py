#!/usr/bin/env python
"""Measure training, encoding, decoding and loading speed on this machine (same as ``captioning benchmark``).

The workflow lives in captioning.perf.run; run ``python scripts/benchmark.py --help`` for its options.
"""

from captioning.perf.allocator import keep_freed_memory
from captioning.perf.run import main

if __name__ == "__main__":
    keep_freed_memory()
    raise SystemExit(main())
