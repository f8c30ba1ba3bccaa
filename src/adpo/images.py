"""Turn whatever a dataset stores as an image into an RGB ``PIL.Image``."""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image, ImageOps


class ImageLoadError(ValueError):
    """An image value could not be turned into a picture (the message says why)."""


def load_image(value: Any) -> Image.Image:
    """Load one image value as RGB.

    Accepts a ``PIL.Image``, a path, raw encoded ``bytes``, or the
    ``{"bytes": ..., "path": ...}`` dict that the datasets ``Image`` feature stores. EXIF orientation is applied
    and transparency is composited onto white, so the model sees the picture a person would.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = _open(io.BytesIO(value), "the given bytes")
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ImageLoadError(f"image file not found: {path}")
        image = _open(path, path)
    elif isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            image = _open(io.BytesIO(value["bytes"]), f"the bytes of {value.get('path') or 'an image'}")
        elif value.get("path"):
            return load_image(value["path"])
        else:
            raise ImageLoadError("image dict has neither 'bytes' nor 'path'")
    else:
        raise ImageLoadError(
            f"unsupported image value of type {type(value).__name__}; expected a PIL image, a path, bytes or a "
            "{'bytes', 'path'} dict"
        )
    return to_rgb(image)


def _open(source: Any, name: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageLoadError(f"cannot read image {name}: {err}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (RGBA, LA, P, CMYK, I;16, L, ...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit and float greyscale: rescale to 8 bits by the actual range rather than clipping at 255.
        lo, hi = image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.point(lambda v: (v - lo) * scale).convert("L")
    return image.convert("RGB")


def shrink_to_longest_edge(image: Image.Image, max_size: int | None) -> Image.Image:
    """Downscale so the longest edge is at most ``max_size`` pixels, keeping the aspect ratio (never upscale)."""
    if max_size is None or max(image.size) <= max_size:
        return image
    scale = max_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
