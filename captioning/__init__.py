"""Show, Attend and Tell: image captioning with soft and hard visual attention."""

__version__ = "0.1.0"
