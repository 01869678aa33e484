"""Model code: pure PyTorch, in the paper's build order (encoder -> attention -> decoder)."""

from captioning.models.captioner import ShowAttendTell

__all__ = ["ShowAttendTell"]
