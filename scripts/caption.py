#!/usr/bin/env python
"""Caption images with a trained checkpoint (same as ``captioning caption``).

The workflow lives in captioning.caption.run; run ``python scripts/caption.py --help`` for its options.
"""

import sys

from captioning.cli import script

if __name__ == "__main__":
    sys.exit(script("caption"))
