"""The simulated VLM of ``vlm-al replay``: a table of answers keyed by decoded pixels, served as WEAK_ANNOTATOR=simulated."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from backend.components import build_weak_annotator
from backend.config import Config, ConfigError
from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL
from model.images import decode_image
from model.weak.lookup import LookupWeakAnnotator, image_digest, write_answer_table


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_answers_follow_the_decoded_pixels_not_the_file(tmp_path):
    red, blue, green = _png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0))
    table = tmp_path / "answers.json"
    write_answer_table(table, ["warm", "cold"], {image_digest(decode_image(red)): "warm",
                                                 image_digest(decode_image(blue)): "cold"})
    annotator = LookupWeakAnnotator.from_file(table)
    # The same picture saved again (another file, other bytes) is the same image to the annotator.
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(buffer, format="PNG", compress_level=0)
    assert buffer.getvalue() != red
    labels = annotator.annotate([decode_image(blue), decode_image(buffer.getvalue()), decode_image(green)])
    assert labels.coarse_index.tolist() == [1, 0, MISSING_LABEL]
    assert labels.coarse_probabilities.tolist() == [[0, 1], [1, 0], [0, 0]]


def test_the_name_changes_with_the_table(tmp_path):
    image = decode_image(_png((1, 2, 3)))
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_answer_table(first, ["x", "y"], {image_digest(image): "x"})
    write_answer_table(second, ["x", "y"], {image_digest(image): "y"})
    assert LookupWeakAnnotator.from_file(first).name != LookupWeakAnnotator.from_file(second).name


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps({"format": "other", "coarse_classes": ["a"], "answers": {}}),
    json.dumps({"format": "vlm-al-weak-answers-v1", "coarse_classes": "a", "answers": {}}),
    json.dumps({"format": "vlm-al-weak-answers-v1", "coarse_classes": ["a"], "answers": {"k": "b"}}),
    json.dumps({"format": "vlm-al-weak-answers-v1", "coarse_classes": ["a", "a"], "answers": {}}),
])
def test_a_bad_table_is_refused_with_a_message(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ModelInputError):
        LookupWeakAnnotator.from_file(path)


def test_the_server_setting_needs_the_table_and_builds_the_annotator(tmp_path):
    with pytest.raises(ConfigError, match="SIMULATED_WEAK_LABELS_FILE"):
        Config.from_env({"WEAK_ANNOTATOR": "simulated"})
    table = tmp_path / "answers.json"
    write_answer_table(table, ["a", "b"], {})
    config = Config.from_env({"WEAK_ANNOTATOR": "simulated", "SIMULATED_WEAK_LABELS_FILE": str(table)})
    fixed, factory = build_weak_annotator(config, backbone=None)
    assert factory is None and isinstance(fixed, LookupWeakAnnotator)
    assert fixed.coarse_classes == ("a", "b")
    assert np.all(fixed.annotate([decode_image(_png((9, 9, 9)))]).coarse_index == MISSING_LABEL)
