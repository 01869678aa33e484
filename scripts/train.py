#!/usr/bin/env python
"""Train Show, Attend and Tell with soft or hard attention, then score the test split (same as ``captioning train``).

The workflow lives in captioning.training.run; run ``python scripts/train.py --help`` for its options.
"""

from captioning.perf.allocator import keep_freed_memory
from captioning.training.run import main

if __name__ == "__main__":
    keep_freed_memory()
    raise SystemExit(main())
