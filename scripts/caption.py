#!/usr/bin/env python
"""Caption images with a trained checkpoint (same as the console script ``captioning caption``).

    python scripts/caption.py --checkpoint runs/soft/best.ckpt photo.jpg photos/ "shots/*.png"
    python scripts/caption.py --checkpoint runs/soft/best.ckpt photos/ --json --heatmaps figures/
    python scripts/caption.py --checkpoint runs/soft/best.ckpt --from-split test --limit 4

Prints ``path<TAB>caption`` per image (``--json``: one JSON object per line). Exit status 0, 1 if
some images could not be read (one ``error: <path>: <reason>`` line each, the others are still
captioned), 2 if nothing could be done (missing/invalid checkpoint, no images).
"""

from __future__ import annotations

import sys

from captioning.cli import caption_main
from captioning.perf.allocator import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    return caption_main(argv)


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
