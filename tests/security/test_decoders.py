"""Decoders: only JPEG, PNG, WebP, GIF, BMP and TIFF are decoded, never through an external program."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from model.images import ALLOWED_FORMATS, ImageDecodeError, ImageLimits, decode_image

from .conftest import HOSTILE_FILES

PROJECT = 102


@pytest.fixture(scope="module")
def decoder_project(backend, fake_ls):
    assert backend.setup(PROJECT, fake_ls).status_code == 200
    return PROJECT


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_hostile_file_is_refused_by_the_server(name, backend, decoder_project):
    response = backend.predict(decoder_project, [f"/data/local-files/?d={name}"])
    assert response.status_code == 422, response.text
    assert "task 1" in response.json()["message"]
    assert not os.path.exists("/tmp/vlm-al-eps-pwned")


def test_eps_never_reaches_ghostscript():
    with pytest.raises(ImageDecodeError, match="format"):
        decode_image(HOSTILE_FILES["eps"]())
    assert not os.path.exists("/tmp/vlm-al-eps-pwned")


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_allow_listed_formats_decode(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format=fmt)
    assert decode_image(buffer.getvalue()).size == (8, 8)


def test_a_header_declaring_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(HOSTILE_FILES["bomb"](), ImageLimits(max_pixels=10_000_000))
