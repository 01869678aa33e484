"""The one image-preprocessing function, shared by training, evaluation and captioning.

A public port captioned every image the same way because its inference preprocessing had drifted
from training's; here there is exactly one path from a file to a tensor.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# ImageNet statistics: torchvision's pretrained backbones expect them; random weights don't mind.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageLoadError(ValueError):
    """An image file is missing, unreadable, truncated or not an image."""


# JPEGs at least twice this size on both sides are decoded at a reduced scale (1/2, 1/4 or 1/8,
# libjpeg's DCT scaling via Image.draft) that keeps both sides >= DRAFT_SIZE: a 10000x10000 photo
# decodes as 1250x1250, about 60x less work and memory. Every image is then resized to a small
# square (data.image_size, at most a few hundred pixels), so nothing the model sees is lost, and
# because it happens here, in the one loader, training, evaluation and captioning get identical
# pixels. Smaller images (e.g. COCO's 640x480) decode exactly as before.
DRAFT_SIZE = 1024


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied.

    Grayscale, CMYK, palette, RGBA (composited on white) and 16-bit images are converted; large
    JPEGs are decoded at a reduced scale (see DRAFT_SIZE). A missing, truncated or non-image file,
    or a decompression bomb, raises ImageLoadError naming the file.

    Decompression bombs: Pillow refuses images of more than 2 x Image.MAX_IMAGE_PIXELS (179
    megapixels by default) when opening them, before decoding anything -- a tiny file claiming
    gigapixels fails here. Between 1x and 2x (89-179 MP) Pillow only warns; a genuine 10000x10000
    (100 MP) photo is in that band, so the warning is silenced and the image is read.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft(img.mode, (DRAFT_SIZE, DRAFT_SIZE))  # JPEG only; a no-op for other formats
                img.load()  # decode now: a truncated file fails here, not later in a worker
                return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"cannot read image {path}: refused as a possible decompression bomb ({err}); "
                             "if it is a genuine image, raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 3-channel 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype("uint8"), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_square(img: Image.Image, image_size: int) -> Image.Image:
    """The geometric half of :func:`preprocess`: bicubic resize to image_size x image_size.

    Also what a prepared folder stores (captioning/data/prepare.py), so that preprocess() of a
    stored image -- whose resize is then a no-op copy -- equals preprocess() of the file exactly.
    """
    return img.resize((image_size, image_size), Image.Resampling.BICUBIC)


def preprocess(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, image_size, image_size].

    Resized to a square (aspect ratio not kept; the paper crops to 224x224). No flip or other
    augmentation: captions name left and right, and a flip would make them false.
    """
    from torchvision.transforms import functional as TF  # here: loading and resizing need no torch

    img = resize_square(img, image_size)
    return TF.normalize(TF.to_tensor(img), MEAN, STD)


def unnormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of the normalisation, for display: [3, H, W] -> values in [0, 1]."""
    import torch

    mean = torch.tensor(MEAN, device=tensor.device)[:, None, None]
    std = torch.tensor(STD, device=tensor.device)[:, None, None]
    return (tensor * std + mean).clamp(0, 1)
