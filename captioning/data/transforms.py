"""The one image-preprocessing function, shared by training, evaluation and captioning.

A public port captioned every image the same way because its inference preprocessing had drifted
from training's; here there is exactly one path from a file to a tensor.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from captioning.console import CaptioningError, one_line

if TYPE_CHECKING:
    import torch

# ImageNet statistics: torchvision's pretrained backbones expect them; random weights don't mind.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageLoadError(CaptioningError, ValueError):
    """An image file is missing, unreadable, truncated or not an image."""


# JPEGs at least twice this size on both sides decode at a reduced scale (1/2, 1/4 or 1/8: libjpeg's
# DCT scaling, Image.draft) keeping both sides >= DRAFT_SIZE: a 10000x10000 photo as 1250x1250, ~60x
# less work. The model sees a square of a few hundred pixels, so nothing is lost, and the one loader
# gives training, evaluation and captioning identical pixels. Smaller images decode in full.
DRAFT_SIZE = 1024


#: The most pixels (after a large JPEG's reduced-scale decoding) an image may have to be decoded:
#: 50 MP (8000 x 6000, ~150 MB as RGB). A PNG of a few hundred KB can claim 13000 x 13000 pixels
#: (gigabytes decoded); the size is read from the header, so it is refused before decoding. Raise it
#: with CAPTIONING_MAX_IMAGE_PIXELS (Pillow's own bound, PIL.Image.MAX_IMAGE_PIXELS, applies beyond twice it).
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_VARIABLE = "CAPTIONING_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The pixel bound in force: CAPTIONING_MAX_IMAGE_PIXELS if set to a positive integer, else
    DEFAULT_MAX_PIXELS. Raises ImageLoadError (one line) for a value that is not a positive integer."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise ImageLoadError(f"{MAX_PIXELS_VARIABLE} must be a positive whole number of pixels, got "
                         f"{os.environ[MAX_PIXELS_VARIABLE][:40]!r}")
    return int(text)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied.

    Grayscale, CMYK, palette, RGBA (composited on white), 16-bit, 32-bit and float images (scaled
    by their brightest pixel) are converted; large JPEGs are decoded at a reduced scale (see
    DRAFT_SIZE). A missing, truncated or non-image file, a decompression bomb, or an image of more
    pixels than :func:`max_image_pixels` (read from the header, before decoding) raises
    ImageLoadError naming the file.

    Decompression bombs: Pillow refuses images of more than 2 x Image.MAX_IMAGE_PIXELS (179
    megapixels by default) when opening them, before decoding anything -- a tiny file claiming
    gigapixels fails here. Between 1x and 2x (89-179 MP) Pillow only warns; a genuine 10000x10000
    (100 MP) JPEG is in that band, and decodes at 1/8 scale (DRAFT_SIZE), so the warning is
    silenced and the image is read; the same size as a PNG is above the pixel bound.
    """
    from captioning.files import NotARegularFileError, open_regular

    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"image file {path} does not exist")
    bound = max_image_pixels()
    try:
        # Opened without blocking and checked to be a regular file: a FIFO would wait forever.
        stream = os.fdopen(open_regular(path, follow_links=True), "rb")
    except NotARegularFileError as err:
        raise ImageLoadError(f"cannot read image {path}: it {str(err).replace(str(path) + ' ', '', 1)}") from None
    except OSError as err:
        raise ImageLoadError(f"cannot read image {path}: {err.strerror or err}") from None
    try:
        with stream, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                img.draft(img.mode, (DRAFT_SIZE, DRAFT_SIZE))  # JPEG only; a no-op for other formats
                width, height = img.size  # from the header (after the JPEG's reduced scale): nothing decoded yet
                if width * height > bound:
                    raise ImageLoadError(
                        f"cannot read image {path}: it is {width}x{height} pixels, more than the {bound:,} decoded at "
                        f"most; set {MAX_PIXELS_VARIABLE} to a larger number to read it")
                img.load()  # decode now: a truncated file fails here, not later in a worker
                return to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"cannot read image {path}: refused as a possible decompression bomb ({err}); "
                             "if it is a genuine image, raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except UnidentifiedImageError:  # Pillow names the stream it was given, not the file
        raise ImageLoadError(f"cannot read image {path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- Pillow's decoders raise ValueError (a PNG text chunk
        # claiming 100 MB: "Decompressed Data Too Large"), struct.error, IndexError... on hostile files
        reason = one_line(err, 200) or type(err).__name__
        raise ImageLoadError(f"cannot read image {path}: {reason}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 3-channel 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale, integers or floats: rescale to 8 bits
        import numpy as np

        # A float image's NaNs and infinities count as black; left in, they would blacken the whole image.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
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
