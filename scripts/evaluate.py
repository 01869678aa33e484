#!/usr/bin/env python
"""Score a checkpoint on a split of its dataset, or another system's results file (same as ``captioning evaluate``).

The workflow lives in captioning.evaluation.run; run ``python scripts/evaluate.py --help`` for its options.
"""

from captioning.evaluation.run import main
from captioning.perf.allocator import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()
    raise SystemExit(main())
