"""``python -m captioning COMMAND ...``: the same as the console script ``captioning``."""

import sys

from captioning.cli import main

if __name__ == "__main__":
    sys.exit(main())
