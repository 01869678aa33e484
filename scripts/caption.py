#!/usr/bin/env python
"""Caption images with a trained checkpoint (same as ``captioning caption``).

The workflow lives in captioning.caption; run ``python scripts/caption.py --help`` for its options.
"""

from captioning.caption import main
from captioning.perf.allocator import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()
    raise SystemExit(main())
