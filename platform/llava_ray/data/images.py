"""Image preprocessing for prepared data: decode, convert to RGB, fit to a square, resize, encode.

One function per step, each usable alone (the tests call them one by one):

- :func:`open_image` decodes bytes and fails with :class:`~llava_ray.utils.skips.Skipped`, whose
  ``reason`` is the skip reason the prepare report counts: ``empty_image_file``, ``corrupt_image``,
  ``truncated_image``, ``image_too_large`` (a decompression-bomb guard on the header's size,
  checked before any pixel is decoded) or ``unsupported_image_mode``.
- :func:`to_rgb` handles every mode Pillow decodes to: transparency is composited on a background
  colour instead of being dropped to black, 16- and 32-bit greyscale is scaled to 8 bits instead
  of being clipped (Pillow's ``convert`` clips ``I;16`` values above 255 to white).
- :func:`fit_aspect` applies ``data.image_aspect``: ``pad`` (LLaVA-1.5's ``expand2square``: the
  image centred on a square of the tower's mean colour), ``crop`` (centre square) or ``resize``.
- :func:`process_image` chains them, resizes to the vision tower's size (bicubic, as CLIP's and
  SigLIP's image processors do) and encodes the result compactly (JPEG or PNG bytes, never float tensors).
- :func:`normalize_image` / :func:`stored_image_array`: the one place the tower's mean and std are
  applied, for training batches (``training.collate``), evaluation and chat alike. NumPy arrays: no torch here.

Size, mean, std and pad colour are the tower's own (:class:`~llava_ray.config.model_sources.TowerInput`,
read from its image-processor config), never CLIP's by default: a SigLIP tower pads with (127, 127, 127)
and normalises with 0.5 / 0.5.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_ray.config.model_sources import TowerInput
from llava_ray.utils.skips import Skipped

WHITE = (255, 255, 255)

Aspect = Literal["pad", "crop", "resize"]
ImageFormat = Literal["jpeg", "png"]

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa"}
_HIGH_BIT_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageSettings:
    """How a source image becomes a stored one."""

    tower: TowerInput  # the vision tower's input: side, and the mean its pad colour comes from
    aspect: Aspect = "pad"
    format: ImageFormat = "jpeg"
    jpeg_quality: int = 95
    max_pixels: int = 89_478_485

    @property
    def size(self) -> int:
        """The vision tower's input side, in pixels."""
        return self.tower.size

    @property
    def background(self) -> tuple[int, int, int]:
        """Transparent pixels are composited on the pad colour when padding, else on white."""
        return self.tower.pad_color if self.aspect == "pad" else WHITE


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully; raise :class:`Skipped` with the skip reason when it cannot be used.

    The pixel limit is checked on the header's size, before decoding, so a decompression bomb costs
    nothing. Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``) is turned from a warning into the
    same counted skip.
    """
    if not data:
        raise Skipped("empty_image_file", "the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Skipped("image_too_large", str(error)) from None
    except UnidentifiedImageError:
        raise Skipped("corrupt_image", "not a decodable image") from None
    except Exception as error:  # decoders raise assorted types (SyntaxError, struct.error, ...) on bad bytes
        raise _decode_error(error) from None
    width, height = image.size
    if width * height > max_pixels:
        raise Skipped(
            "image_too_large",
            f"{width}x{height} = {width * height} pixels is over data.max_image_pixels={max_pixels}",
        )
    try:
        image.load()
    except Exception as error:
        raise _decode_error(error) from None
    return image


def _decode_error(error: Exception) -> Skipped:
    # Pillow reports a file that ends early as "image file is truncated" or "Truncated File Read".
    if "truncated" in str(error).lower():
        return Skipped("truncated_image", f"the image file ends early: {error}")
    return Skipped("corrupt_image", f"the image cannot be decoded: {type(error).__name__}: {error}")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image as 8-bit RGB; transparency composited on ``background``, high-bit grey scaled."""
    if image.mode in _HIGH_BIT_GREY_MODES:
        return _high_bit_grey_to_rgb(image)
    # Palette, grey and RGB PNGs/GIFs can carry a transparent colour key in info["transparency"].
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:  # e.g. LAB or multi-band modes Pillow cannot convert without a profile
        raise Skipped(
            "unsupported_image_mode", f"cannot convert mode {image.mode!r} to RGB: {error}"
        ) from None


def _high_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit greyscale (and ``I``, the 32-bit mode 16-bit files may decode to) scaled to 0-255."""
    values = np.asarray(image, dtype=np.int64)
    grey = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: the image centred on a square of ``fill`` (offset rounded down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def center_crop_square(image: Image.Image) -> Image.Image:
    """The centred square of side ``min(width, height)``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def fit_aspect(image: Image.Image, aspect: Aspect, fill: tuple[int, int, int]) -> Image.Image:
    """Make the image square as ``data.image_aspect`` says (``resize`` leaves it to the resize step)."""
    if aspect == "pad":
        return pad_to_square(image, fill)
    if aspect == "crop":
        return center_crop_square(image)
    return image


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to ``size`` x ``size`` (stretching if the image is not square)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def encode_image(image: Image.Image, image_format: ImageFormat, jpeg_quality: int = 95) -> bytes:
    """Compact bytes of an RGB image; JPEG keeps full colour resolution (4:4:4) for small text and colours."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def transform_image(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """A decoded image as the vision tower sees it: RGB, square, ``settings.size`` pixels wide."""
    rgb = to_rgb(image, settings.background)
    return resize_square(fit_aspect(rgb, settings.aspect, settings.tower.pad_color), settings.size)


def process_image(data: bytes, settings: ImageSettings) -> bytes:
    """Source file bytes -> stored bytes; raises :class:`Skipped` with a skip reason."""
    image = transform_image(open_image(data, settings.max_pixels), settings)
    return encode_image(image, settings.format, settings.jpeg_quality)


def decode_stored_image(data: bytes) -> Image.Image:
    """A stored (already processed) image back as a loaded RGB ``PIL.Image``."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def normalize_image(image: Image.Image, tower: TowerInput) -> np.ndarray:
    """An RGB image as the vision tower's input: float32 ``(3, H, W)`` normalised with the tower's mean and std."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mean, std = np.asarray(tower.mean, dtype=np.float32), np.asarray(tower.std, dtype=np.float32)
    return ((array - mean) / std).transpose(2, 0, 1).copy()


def stored_image_array(data: bytes, tower: TowerInput) -> np.ndarray:
    """A stored (prepared) image as a normalised ``(3, S, S)`` array; it must already be ``tower.size`` wide."""
    size = tower.size
    with Image.open(io.BytesIO(data)) as image:
        if image.size != (size, size):
            raise ValueError(
                f"prepared image is {image.size[0]}x{image.size[1]}, the vision tower takes {size}x{size}; "
                "prepare the data again with this model preset"
            )
        return normalize_image(image, tower)
