"""The semantic zero-shot weak annotator: real weights on real images, any class names, clear errors."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from PIL import Image

from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy
from model.weak.base import WeakLabels
from model.weak.semantic_zeroshot import SemanticZeroShot, imagenet_label_embeddings
from model.weak.text_encoder import TextEncoderError, packaged_minilm, unpack_model_zip

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real test photos")


class LogitsOnly:
    """An ImageNet classifier whose logits the test hands over directly."""

    name = "test-logits"
    num_classes = 1000

    def classify_logits(self, images):
        raise AssertionError("these tests give the annotator logits, not images")


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-encoders")


@pytest.fixture(scope="module")
def encoder(text_cache):
    return packaged_minilm(text_cache)


@pytest.fixture(scope="module")
def imagenet_embeddings(encoder, text_cache):
    return imagenet_label_embeddings(encoder, cache_dir=text_cache)


def annotator(encoder, imagenet_embeddings, groups, **options) -> SemanticZeroShot:
    return SemanticZeroShot(LogitsOnly(), encoder, LabelHierarchy.from_groups(groups),
                            imagenet_embeddings=imagenet_embeddings, **options)


PHOTO_GROUPS = {
    "animals": ["cat", "dog", "horse"],
    "food and drink": ["coffee", "bread", "fruit"],
    "vehicles": ["rocket", "car", "boat"],
    "clothing": ["dress", "jacket", "hat"],
}


@pytest.mark.parametrize("combine", ["label-map", "conse"])
def test_real_photos_get_their_coarse_class_from_real_weights(encoder, imagenet_embeddings, combine):
    from model.embeddings import TimmBackbone

    classifier = TimmBackbone("efficientnet_lite0", image_size=224, batch_size=4)
    semantic = SemanticZeroShot(classifier, encoder, LabelHierarchy.from_groups(PHOTO_GROUPS),
                                imagenet_embeddings=imagenet_embeddings, combine=combine)
    photos = {
        "animals": skimage_data.chelsea(),
        "food and drink": skimage_data.coffee(),
        "vehicles": skimage_data.rocket(),
        "clothing": skimage_data.astronaut(),  # a space suit
    }
    labels = semantic.annotate([Image.fromarray(p) for p in photos.values()])
    assert isinstance(labels, WeakLabels) and labels.answered.all()
    answers = [semantic.coarse_classes[i] for i in labels.coarse_index]
    correct = sum(a == t for a, t in zip(answers, photos))
    assert correct >= 3, f"{combine}: {dict(zip(photos, answers))}"  # chance: 1 of 4
    np.testing.assert_allclose(labels.coarse_probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_the_same_logits_give_the_same_answers_through_annotate_and_annotate_logits(encoder, imagenet_embeddings):
    from model.embeddings import TimmBackbone

    classifier = TimmBackbone("efficientnet_lite0", image_size=64, batch_size=2)
    semantic = SemanticZeroShot(classifier, encoder, LabelHierarchy.from_groups(PHOTO_GROUPS),
                                imagenet_embeddings=imagenet_embeddings)
    images = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    embeddings, logits = classifier.embed_and_logits(images)
    assert embeddings.shape == (2, classifier.dim)
    np.testing.assert_allclose(semantic.annotate(images).coarse_probabilities,
                               semantic.annotate_logits(logits).coarse_probabilities, atol=1e-5)


def test_unicode_class_names_get_answers_and_a_stable_name(encoder, imagenet_embeddings):
    groups = {"Vögel": ["Amsel", "Spatz"], "猫科动物": ["老虎", "家猫"], "Café & Thé": ["Espresso", "Matcha-Tee"]}
    first = annotator(encoder, imagenet_embeddings, groups)
    again = annotator(encoder, imagenet_embeddings, groups)
    logits = np.random.default_rng(0).normal(size=(5, 1000)).astype(np.float32)
    labels = first.annotate_logits(logits)
    assert labels.coarse_probabilities.shape == (5, 3) and labels.answered.all()
    assert first.name == again.name and first.name.startswith("semantic:test-logits:minilm-l6:")
    np.testing.assert_array_equal(labels.coarse_index, again.annotate_logits(logits).coarse_index)
    other = annotator(encoder, imagenet_embeddings, {**groups, "Vögel": ["Amsel", "Meise"]})
    assert other.name != first.name  # the answers can differ, so the cache namespace must


def test_descriptions_and_settings_change_the_class_embeddings_and_the_name(encoder, imagenet_embeddings):
    plain = annotator(encoder, imagenet_embeddings, PHOTO_GROUPS)
    described = annotator(encoder, imagenet_embeddings, PHOTO_GROUPS,
                          descriptions={"vehicles": ["a spacecraft on a launch pad"]})
    assert described.name != plain.name
    vehicles = plain.coarse_classes.index("vehicles")
    assert not np.allclose(described.class_embeddings[vehicles], plain.class_embeddings[vehicles])
    np.testing.assert_allclose(described.class_embeddings[0], plain.class_embeddings[0])
    conse = annotator(encoder, imagenet_embeddings, PHOTO_GROUPS, combine="conse")
    assert conse.name != plain.name


def test_bad_class_names_and_inputs_are_clear_errors(encoder, imagenet_embeddings):
    with pytest.raises(ModelInputError, match=r"no letters or digits"):
        annotator(encoder, imagenet_embeddings, {"!!!": ["?"], "animals": ["cat"]})
    with pytest.raises(ModelInputError, match=r"read as the same words"):
        annotator(encoder, imagenet_embeddings, {"Cat": ["Cat"], "cat": ["cat"]})
    with pytest.raises(ModelInputError, match=r"not coarse classes: \['plants'\]"):
        annotator(encoder, imagenet_embeddings, PHOTO_GROUPS, descriptions={"plants": ["a tree"]})
    with pytest.raises(ModelInputError, match="combine"):
        annotator(encoder, imagenet_embeddings, PHOTO_GROUPS, combine="vote")
    with pytest.raises(ModelInputError, match="temperature"):
        annotator(encoder, imagenet_embeddings, PHOTO_GROUPS, map_temperature=0.0)
    semantic = annotator(encoder, imagenet_embeddings, PHOTO_GROUPS)
    with pytest.raises(ModelInputError, match=r"\(n, 1000\)"):
        semantic.annotate_logits(np.zeros((2, 10)))
    with pytest.raises(ModelInputError, match="NaN"):
        semantic.annotate_logits(np.full((1, 1000), np.nan))
    assert len(semantic.annotate_logits(np.zeros((0, 1000)))) == 0

    class TenClasses(LogitsOnly):
        num_classes = 10

    with pytest.raises(ModelInputError, match="ImageNet-1k classifier"):
        SemanticZeroShot(TenClasses(), encoder, LabelHierarchy.from_groups(PHOTO_GROUPS),
                         imagenet_embeddings=imagenet_embeddings)


def test_an_empty_class_list_is_refused():
    with pytest.raises(ModelInputError):
        LabelHierarchy.from_groups({})


def test_the_shipped_label_embeddings_are_what_the_packaged_encoder_computes(encoder, imagenet_embeddings, tmp_path):
    """The default templates' ImageNet label embeddings ship with the package (a fresh server skips 3,000
    encodings); computing them anew, with no cache anywhere, must give the same matrix."""
    from model.weak import semantic_zeroshot

    fresh = np.stack([
        semantic_zeroshot.prompt_embedding(encoder, [s.strip() for s in d.split(",")][: semantic_zeroshot.IMAGENET_SYNONYMS],
                                           semantic_zeroshot.PROMPT_TEMPLATES)
        for d in __import__("model.weak.classifier_label_map", fromlist=["x"]).ImageNetClassNames().descriptions
    ])
    np.testing.assert_allclose(imagenet_embeddings, fresh, atol=1e-5)


def test_label_embeddings_for_other_templates_are_cached_on_disk(encoder, tmp_path, monkeypatch):
    templates = ("{}",)
    first = imagenet_label_embeddings(encoder, templates, cache_dir=tmp_path)
    cached = sorted(tmp_path.glob("imagenet-label-embeddings-*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), first)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    # Read back without encoding anything...
    monkeypatch.setattr(encoder, "encode", lambda texts: (_ for _ in ()).throw(AssertionError("encoded again")))
    np.testing.assert_array_equal(imagenet_label_embeddings(encoder, templates, cache_dir=tmp_path), first)
    monkeypatch.undo()
    # ...and a damaged file is rebuilt, not trusted.
    cached[0].write_bytes(b"not numpy")
    np.testing.assert_allclose(imagenet_label_embeddings(encoder, templates, cache_dir=tmp_path), first, atol=1e-6)


def test_the_model_zip_is_unpacked_once_into_a_folder_named_by_its_content(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("modules.json", "[]")
        handle.writestr("config.json", "{}")
    first = unpack_model_zip(archive, tmp_path / "cache")
    assert first.name.startswith("model-") and (first / "modules.json").is_file()
    (first / "marker").write_text("kept")
    assert unpack_model_zip(archive, tmp_path / "cache") == first and (first / "marker").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no staging folder left behind
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as handle:
        handle.writestr("../outside.txt", "x")
    with pytest.raises(TextEncoderError, match="refusing"):
        unpack_model_zip(bad, tmp_path / "cache")
    assert not (tmp_path / "outside.txt").exists()
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as handle:
        handle.writestr("readme.txt", "no model here")
    with pytest.raises(TextEncoderError, match="no modules.json"):
        unpack_model_zip(empty, tmp_path / "cache")
