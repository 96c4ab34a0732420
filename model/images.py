"""Decoding untrusted image bytes into RGB PIL images, with size limits checked before any pixel is decoded."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import ModelInputError

MIB = 1024 * 1024

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The only decoders tried. Pillow would otherwise try every registered plugin, among them EPS (which runs
Ghostscript, an external program), PSD, PCX, XBM and other rarely audited decoders."""


class ImageDecodeError(ModelInputError):
    """Image bytes that cannot be used: too large, too many pixels, or not a readable image."""


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds for one image: encoded size in bytes and decoded size in pixels."""

    max_bytes: int = 20 * MIB
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ModelInputError(f"image limits must be positive, got {self}")


def decode_image(data: bytes, limits: ImageLimits | None = None, *, at_least: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image (EXIF orientation applied, transparency composited on white).

    ``at_least``: the smallest side the caller needs (it resizes the image down anyway, for a backbone's input), so
    a JPEG is decoded at the smallest of libjpeg's scales (1, 1/2, 1/4, 1/8) that keeps both sides at least this
    long: its scaled inverse DCT decodes up to 64 times fewer pixels of the same picture. Other formats decode in
    full.

    Raises ImageDecodeError for too many bytes, a header that declares too many pixels, or unreadable data.
    """
    limits = limits or ImageLimits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("image data is empty")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        # PIL's own bomb check warns (or raises) against its global MAX_IMAGE_PIXELS; turning the warning into an
        # error keeps the guard without touching that global, and our own limit below is checked first anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # lazy: reads the header only; only the allow-listed raster decoders are tried
            image = Image.open(io.BytesIO(bytes(data)), formats=ALLOWED_FORMATS)
            if image.format not in ALLOWED_FORMATS:
                raise ImageDecodeError(f"image format {image.format} is not allowed")
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"image declares an empty size {width}x{height}")
            if width * height > limits.max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            if at_least is not None:
                image.draft(None, (at_least, at_least))  # JPEG only; the others' draft does nothing
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # without an orientation tag no copy is made
            return to_rgb_on_white(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"data is not an image in a format this server reads ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt files surface as OSError/SyntaxError/EOFError depending on the codec.
        raise ImageDecodeError(f"image data is corrupt or truncated: {exc}") from exc


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``: wide integer/float pixels rescaled to their range, any transparency (alpha channel,
    LA, P or L with a transparency entry) composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # convert("L") clips wide integer/float pixels at 255; rescale the actual range instead.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = np.zeros_like(pixels) if high <= low else (pixels - low) / (high - low) * 255.0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        # Transparent pixels usually hold black; product photos with alpha are meant to be seen on white.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
