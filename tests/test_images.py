import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.errors import ModelInputError
from model.images import ImageDecodeError, ImageLimits, decode_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int = 40, height: int = 30) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 90.0)], axis=2).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but whose pixel data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def test_png_round_trip_is_exact():
    pixels = _gradient()
    decoded = decode_image(_encode(Image.fromarray(pixels), "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_jpeg_decodes_close_to_source():
    pixels = _gradient()
    decoded = decode_image(_encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    assert np.abs(np.asarray(decoded).astype(int) - pixels.astype(int)).mean() < 4


def test_grayscale_becomes_rgb_with_equal_channels():
    gray = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    decoded = np.asarray(decode_image(_encode(Image.fromarray(gray, mode="L"), "PNG")))
    assert decoded.shape == (5, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    wide = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000).astype(np.uint16)
    decoded = np.asarray(decode_image(_encode(Image.fromarray(wide), "PNG")))
    assert decoded[0, 0, 0] == 0 and decoded[3, 3, 0] == 255
    assert len(np.unique(decoded[:, :, 0])) == 16  # clipping at 255 would have merged most values


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent black
    decoded = np.asarray(decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG")))
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[3, 3]) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.fromarray(_gradient(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (30, 40)


def test_too_many_bytes_is_rejected_before_decoding():
    data = _encode(Image.fromarray(_gradient()), "PNG")
    with pytest.raises(ImageDecodeError, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))


def test_header_declaring_too_many_pixels_is_rejected_without_decoding():
    # 7000 x 7000 declared (over our 40 Mpx, under PIL's own bomb threshold) with almost no pixel data:
    # decoding would fail as truncated, so the pixel-count message proves the header was checked first.
    with pytest.raises(ImageDecodeError, match="the limit is 40000000"):
        decode_image(_png_header_only(7000, 7000))
    # Far beyond PIL's own threshold: its bomb guard fires inside Image.open and is reported as ours.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(_encode(Image.fromarray(_gradient()), "PNG"), ImageLimits(max_pixels=40 * 30 - 1))


def test_decompression_bomb_png_is_rejected():
    # A real, complete 8000 x 8000 PNG that compresses to a few hundred kB.
    data = _encode(Image.new("L", (8000, 8000)), "PNG")
    assert len(data) < 1_000_000
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=10_000_000))


def test_truncated_file_is_rejected():
    data = _encode(Image.fromarray(_gradient(200, 200)), "PNG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_random_bytes_are_rejected():
    noise = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(noise)


@pytest.mark.parametrize("bad", [b"", "not bytes", None])
def test_empty_or_non_bytes_input_is_rejected(bad):
    with pytest.raises(ImageDecodeError):
        decode_image(bad)


def test_errors_are_model_input_errors_and_limits_must_be_positive():
    assert issubclass(ImageDecodeError, ModelInputError)
    with pytest.raises(ModelInputError):
        ImageLimits(max_bytes=0)


@pytest.mark.parametrize(("size", "decoded"), [
    ((4000, 3000), (500, 375)),  # 1/8: both sides still >= 224
    ((1600, 1200), (400, 300)),  # 1/4
    ((640, 480), (320, 240)),  # 1/2
    ((400, 300), (400, 300)),  # half would make 150 < 224: in full
])
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_at_least_the_side_asked(size, decoded):
    image = Image.fromarray(_gradient(*size))
    data = _encode(image, "JPEG", quality=90)
    scaled = decode_image(data, at_least=224)
    assert scaled.mode == "RGB" and scaled.size == decoded
    reference = np.asarray(image.resize(decoded, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(scaled, dtype=np.int16) - reference).mean() < 3  # the same picture, smaller
    assert decode_image(data).size == size


def test_scaled_decoding_keeps_orientation_limits_and_other_formats():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = _encode(Image.fromarray(_gradient(1600, 1200)), "JPEG", exif=exif.tobytes())
    assert decode_image(rotated, at_least=224).size == (300, 400)
    png = _encode(Image.fromarray(_gradient(1600, 1200)), "PNG")
    assert decode_image(png, at_least=224).size == (1600, 1200)  # no scaled decoding: in full
    with pytest.raises(ImageDecodeError, match="pixels"):  # the declared size is checked, not the scaled one
        decode_image(rotated, ImageLimits(max_pixels=1600 * 1200 - 1), at_least=224)
