"""Per-label scores from every weak annotator that can score class names (multi-label projects)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_weak_annotators import TINY_OPEN_CLIP
from vlm_stub_server import VLMStubServer  # tests/ is on sys.path (no package)

from model.multilabel.labels import flat_label_hierarchy
from model.weak.base import LabelScorer, WeakAnnotator
from model.weak.openai_compatible import OpenAICompatibleVLM, match_answer_list

LABELS = ("cat", "dog", "car", "t-shirt")
RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


@pytest.mark.parametrize("answer, expected", [
    ("cat; dog", {0, 1}), ("A car, and a T-shirt.", {2, 3}), ("None", set()), ("none of these", set()),
    ("dog", {1}), ("I cannot tell", None), ("", None),
])
def test_list_answers_are_matched_per_label(answer, expected):
    assert match_answer_list(answer, LABELS) == expected


def test_the_api_vlm_is_asked_for_a_list_and_scores_every_label():
    answers = {RED: "cat; car", GREEN: "none", BLUE: "a dog"}
    with VLMStubServer(answers, default_answer="no idea", api_key="k") as server:
        vlm = OpenAICompatibleVLM(server.base_url, "k", "stub-vlm", LABELS, timeout_s=5, max_retries=0)
        scores = vlm.score_labels([Image.new("RGB", (20, 20), c) for c in (RED, GREEN, BLUE, GREY)])
        prompt = server.requests[0].body["messages"][0]["content"][0]["text"]
        assert server.problems() == []
    assert "appear" in prompt and all(name in prompt for name in LABELS)
    np.testing.assert_array_equal(scores[:3], [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert np.isnan(scores[3]).all()  # no usable answer: no row of zeros ("none") either
    assert isinstance(vlm, LabelScorer) and isinstance(vlm, WeakAnnotator)


def test_open_clip_scores_every_label_from_the_same_features_as_its_coarse_answer():
    from model.embeddings import OpenClipImageBackbone
    from model.weak.openclip_zeroshot import OpenClipZeroShot

    backbone = OpenClipImageBackbone("ViT-S-32", pretrained=None, model_overrides=TINY_OPEN_CLIP)
    annotator = OpenClipZeroShot.from_backbone(backbone, flat_label_hierarchy(LABELS))
    images = [Image.new("RGB", (30, 30), c) for c in (RED, GREEN)]
    scores = annotator.score_labels(images)
    assert scores.shape == (2, 4) and np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(scores, annotator.annotate(images).coarse_probabilities, atol=1e-6)
    assert isinstance(annotator, LabelScorer)


def test_semantic_zero_shot_scores_both_objects_of_a_two_object_image(tmp_path):
    from test_semantic_zeroshot import LogitsOnly

    from model.weak.semantic_zeroshot import SemanticZeroShot, imagenet_label_embeddings
    from model.weak.text_encoder import packaged_minilm

    encoder = packaged_minilm(tmp_path)
    labels = ("cat", "sports car", "coffee", "guitar")
    annotator = SemanticZeroShot(LogitsOnly(), encoder, flat_label_hierarchy(labels),
                                 imagenet_embeddings=imagenet_label_embeddings(encoder, cache_dir=tmp_path))
    logits = np.zeros((1, 1000))
    logits[0, [281, 817]] = 12.0  # ImageNet "tabby cat" and "sports car", equally sure
    scores = annotator.label_scores_logits(logits)[0]
    assert min(scores[0], scores[1]) > max(scores[2], scores[3])
    assert isinstance(annotator, LabelScorer)
