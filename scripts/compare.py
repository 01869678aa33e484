#!/usr/bin/env python
"""Soft versus hard attention: train both over several seeds, evaluate them alike, report (same as ``captioning compare``).

The workflow lives in captioning.study.run; run ``python scripts/compare.py --help`` for its options.
"""

import sys

from captioning.cli import script

if __name__ == "__main__":
    sys.exit(script("compare"))
