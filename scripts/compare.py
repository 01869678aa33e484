#!/usr/bin/env python
"""Soft versus hard attention: train both over several seeds, evaluate them alike, report (same as ``captioning compare``).

The workflow lives in captioning.study.cli; run ``python scripts/compare.py --help`` for its options.
"""

from captioning.perf.allocator import keep_freed_memory
from captioning.study.cli import main

if __name__ == "__main__":
    keep_freed_memory()
    raise SystemExit(main())
