"""Turn whatever a dataset stores as an image into an RGB ``PIL.Image`` the processor can take.

Every refusal is an :class:`ImageLoadError` whose message starts with a short reason ("image file not found",
"unreadable image", "empty image", "absurd aspect ratio", "image too large", "non-finite pixel values") before
the first colon, so skipped rows can be counted by reason.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Qwen2-VL's processor refuses images whose sides differ more than this; others make degenerate tiles.
MAX_ASPECT_RATIO = 200

# With --max_image_size, an image over PIL's bomb limit is still decoded (at reduced scale where the format
# allows) when that costs at most this many times the limit (4 x 89.5 M pixels, about 1 GB in RGB by default).
DECODE_BUDGET_FACTOR = 4

_BOMB_LOCK = threading.Lock()  # guards the brief switch-off of PIL's global pixel limit


class ImageLoadError(ValueError):
    """An image value could not be turned into a picture (the message says why)."""


def load_image(value: Any, max_size: int | None = None, min_side: int = 1) -> Image.Image:
    """Load one image value as RGB, checked and sized for a processor.

    Accepts a ``PIL.Image``, a path, raw encoded ``bytes``, or the ``{"bytes": ..., "path": ...}`` dict that the
    datasets ``Image`` feature stores. EXIF orientation is applied and transparency is composited onto white, so
    the model sees the picture a person would. Images above ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible
    decompression bomb) are refused unless ``max_size`` is set; then they are decoded at reduced scale where the
    format allows (JPEG draft) and shrunk so the longest edge is at most ``max_size``. What would still be
    decoded at more than :data:`DECODE_BUDGET_FACTOR` times the limit (e.g. a 30000 x 30000 PNG, which PNG
    cannot decode at reduced scale) is refused from its header, before any pixel is decoded. Images whose short
    side is below ``min_side`` (the vision encoder's patch) are upscaled to it.
    """
    image, name, opened_here = _open_value(value, max_size)
    check_image_size(image.size, name, max_size)
    if opened_here:
        if max_size is not None and max(image.size) > max_size:
            image.draft(None, _shrunk_size(image.size, max_size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            check_decode_budget(image, name)  # image.size is now the size it will be decoded at
        try:
            image.load()
        except Exception as err:  # PIL raises many types for corrupt or truncated data
            raise ImageLoadError(f"unreadable image: {name}: {err}") from None
    try:
        image = to_rgb(image)
    except ImageLoadError as err:
        raise ImageLoadError(f"{err} ({name})") from None
    except Exception as err:  # odd modes or broken EXIF
        raise ImageLoadError(f"unreadable image: {name}: cannot convert mode {image.mode} to RGB: {err}") from None
    return grow_to_min_side(shrink_to_longest_edge(image, max_size), min_side)


def _open_value(value: Any, max_size: int | None) -> tuple[Image.Image, str, bool]:
    """(image, a name for messages, whether we opened it lazily ourselves)."""
    if isinstance(value, Image.Image):
        return value, f"a {value.width}x{value.height} {value.mode} image", False
    if isinstance(value, (bytes, bytearray)):
        return _open(lambda: io.BytesIO(value), "the given bytes", max_size), "the given bytes", True
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not path.strip():
            raise ImageLoadError("image file not found: the path is empty")
        if os.path.isdir(path):
            raise ImageLoadError(f"image file not found: {path} is a folder, not an image file")
        if not os.path.isfile(path):
            raise ImageLoadError(f"image file not found: {path}")
        return _open(lambda: path, path, max_size), path, True
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        if data:
            if not isinstance(data, (bytes, bytearray)):
                raise ImageLoadError(f"unreadable image: 'bytes' holds {type(data).__name__}, not bytes")
            name = f"the bytes of {path or 'an image'}"
            return _open(lambda: io.BytesIO(data), name, max_size), name, True
        if path:
            return _open_value(path, max_size)
        raise ImageLoadError("unreadable image: the image dict has neither 'bytes' nor 'path'")
    raise ImageLoadError(
        f"unsupported image value: got {type(value).__name__}; expected a PIL image, a path, bytes or a "
        "{'bytes', 'path'} dict"
    )


def _open(source: Any, name: str, max_size: int | None) -> Image.Image:
    """Open lazily (header only). PIL's own bomb check is replaced by :func:`check_image_size`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                return Image.open(source())
            except Image.DecompressionBombError:
                if max_size is None:
                    raise
                with _BOMB_LOCK:  # we shrink it while loading, so let PIL read the header
                    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        return Image.open(source())
                    finally:
                        Image.MAX_IMAGE_PIXELS = limit
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"image too large: {name}: {err} Pass --max_image_size to shrink such images "
                             "while loading.") from None
    except Exception as err:
        raise ImageLoadError(f"unreadable image: {name}: {err}") from None


def check_image_size(size: tuple[int, int], name: str, max_size: int | None = None) -> None:
    """Refuse empty images, absurd aspect ratios and, unless ``max_size`` shrinks them, bomb-sized images."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"empty image: {name} is {width}x{height} pixels")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageLoadError(f"absurd aspect ratio: {name} is {width}x{height} pixels (more than "
                             f"{MAX_ASPECT_RATIO}:1); crop or pad it")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit and max_size is None:
        raise ImageLoadError(
            f"image too large: {name} is {width}x{height} = {width * height} pixels, over the decompression-bomb "
            f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS). Pass --max_image_size to shrink such images while "
            "loading, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the files."
        )


def check_decode_budget(image: Image.Image, name: str) -> None:
    """Refuse, from the header alone, an image that would be decoded at more than ``DECODE_BUDGET_FACTOR x
    PIL.Image.MAX_IMAGE_PIXELS`` pixels even at its reduced decoding scale."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is None or width * height <= DECODE_BUDGET_FACTOR * limit:
        return
    bands = len(image.getbands())
    raise ImageLoadError(
        f"image too large to decode safely: {name} would be decoded at {width}x{height} pixels (about "
        f"{width * height * bands / 1e9:.1f} GB) before shrinking to --max_image_size, over "
        f"{DECODE_BUDGET_FACTOR} x PIL.Image.MAX_IMAGE_PIXELS = {DECODE_BUDGET_FACTOR * limit} pixels; "
        f"{_scaling(image.format)}. Shrink the file first, or raise "
        "PIL.Image.MAX_IMAGE_PIXELS if the memory is there."
    )


def _scaling(fmt: str | None) -> str:
    return "JPEG decodes at 1/8 scale at best" if fmt == "JPEG" else f"{fmt or 'this format'} cannot be decoded at " \
        "reduced scale"


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (RGBA, LA, P, CMYK, I;16, F, L, ...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif image.mode == "La":
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to 8 bits, stretched over the actual range rather than clipped at 255."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ImageLoadError("non-finite pixel values: the image holds NaN or infinity")
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.clip(values, 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _shrunk_size(size: tuple[int, int], max_size: int) -> tuple[int, int]:
    scale = max_size / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def shrink_to_longest_edge(image: Image.Image, max_size: int | None) -> Image.Image:
    """Downscale so the longest edge is at most ``max_size`` pixels, keeping the aspect ratio (never upscale).

    Large reductions first box-reduce by an integer factor (``reducing_gap``), which is fast and, at a gap of 3,
    indistinguishable from a plain bicubic resize.
    """
    if max_size is None or max(image.size) <= max_size:
        return image
    return image.resize(_shrunk_size(image.size, max_size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def grow_to_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """Upscale (aspect kept) so the short side is at least ``min_side`` pixels: smaller than one patch of the
    vision encoder, some processors refuse the image or produce an empty grid."""
    if min(image.size) >= min_side:
        return image
    scale = min_side / min(image.size)
    size = (max(min_side, math.ceil(image.width * scale)), max(min_side, math.ceil(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def min_image_side(processor: Any) -> int:
    """The smallest image side a processor handles: its patch (times the merge size, Qwen2-VL), else 1."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    if isinstance(patch, dict):
        patch = max(patch.values())
    merge = getattr(image_processor, "merge_size", None)
    return int(patch or 1) * int(merge or 1)
