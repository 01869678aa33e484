#!/usr/bin/env python
"""Train Show, Attend and Tell with soft or hard attention, then score the test split (same as ``captioning train``).

The workflow lives in captioning.training.run; run ``python scripts/train.py --help`` for its options.
"""

import sys

from captioning.cli import script

if __name__ == "__main__":
    sys.exit(script("train"))
