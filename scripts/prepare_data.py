#!/usr/bin/env python
"""Prepare a caption dataset into a folder that training reads fast; benchmark its loader (same as ``captioning prepare``).

The workflow lives in captioning.data.run; run ``python scripts/prepare_data.py --help`` for its options.
"""

from captioning.data.run import main
from captioning.perf.allocator import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()
    raise SystemExit(main())
