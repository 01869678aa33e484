"""Show, Attend and Tell: image captioning with soft and hard visual attention."""

__version__ = "0.1.0"

__all__ = ["Captioner"]


def __getattr__(name: str):
    # Captioner is loaded on first use, so that torch-free parts (the ONNX engine,
    # captioning.export.runtime) can be imported without PyTorch.
    if name == "Captioner":
        from captioning.api import Captioner

        return Captioner
    raise AttributeError(f"module 'captioning' has no attribute {name!r}")
