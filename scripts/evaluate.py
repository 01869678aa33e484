#!/usr/bin/env python
"""Score a checkpoint on a split of its dataset, or another system's results file (same as ``captioning evaluate``).

The workflow lives in captioning.evaluation.run; run ``python scripts/evaluate.py --help`` for its options.
"""

import sys

from captioning.cli import script

if __name__ == "__main__":
    sys.exit(script("evaluate"))
