#!/usr/bin/env python
"""Prepare a caption dataset into a folder that training reads fast; benchmark its loader (same as ``captioning prepare``).

The workflow lives in captioning.data.run; run ``python scripts/prepare_data.py --help`` for its options.
"""

import sys

from captioning.cli import script

if __name__ == "__main__":
    sys.exit(script("prepare"))
