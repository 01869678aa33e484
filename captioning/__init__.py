"""Show, Attend and Tell: image captioning with soft and hard visual attention."""

__version__ = "0.1.0"
from captioning.api import Captioner  # noqa: E402,F401
