#!/usr/bin/env python
"""Measure training, encoding, decoding and loading speed on this machine (same as ``captioning benchmark``).

The workflow lives in captioning.perf.run; run ``python scripts/benchmark.py --help`` for its options.
"""

import sys

from captioning.cli import script

if __name__ == "__main__":
    sys.exit(script("benchmark"))
