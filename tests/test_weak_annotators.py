import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets import FASHION_MNIST_GROUPS, fashion_mnist_hierarchy
from model.errors import HierarchyError, ModelInputError, UnknownClassError
from model.hierarchy import MISSING_LABEL
from model.weak import WeakAnnotator, WeakLabels
from model.weak.classifier_label_map import ClassifierLabelMap, ImageNetClassNames, load_imagenet_map
from model.weak.openai_compatible import OpenAICompatibleVLM, VLMRequestError, match_answer

from vlm_stub_server import VLMStubServer  # tests/ is on sys.path (no package)

SHIPPED_MAP = Path(__file__).resolve().parents[1] / "model" / "data" / "fashion_mnist_imagenet_map.json"
COARSE = tuple(FASHION_MNIST_GROUPS)  # tops, bottoms and dresses, footwear, bags

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# ---------------------------------------------------------------- WeakLabels


def test_weak_labels_from_indices_one_hot_with_zero_rows_for_no_answer():
    labels = WeakLabels.from_indices([2, MISSING_LABEL, 0], n_coarse=3)
    np.testing.assert_array_equal(labels.coarse_probabilities, [[0, 0, 1], [0, 0, 0], [1, 0, 0]])
    assert labels.coarse_index.dtype == np.int64 and labels.coarse_probabilities.dtype == np.float32
    np.testing.assert_array_equal(labels.answered, [True, False, True])
    assert len(labels) == 3


def test_weak_labels_from_probabilities_takes_the_argmax():
    labels = WeakLabels.from_probabilities(np.array([[0.2, 0.8], [0.6, 0.4]]))
    np.testing.assert_array_equal(labels.coarse_index, [1, 0])
    assert len(WeakLabels.from_probabilities(np.zeros((0, 3)))) == 0


@pytest.mark.parametrize(
    "index, probabilities",
    [
        (np.array([0, 1]), np.array([[1.0, 0.0]])),  # length mismatch
        (np.array([2]), np.array([[0.5, 0.5]])),  # index out of range
        (np.array([0]), np.array([[0.5, 0.2]])),  # answered row not summing to 1
        (np.array([0]), np.array([[np.nan, 1.0]])),
        (np.array([0.0]), np.array([[1.0, 0.0]])),  # float indices
    ],
)
def test_weak_labels_reject_inconsistent_arrays(index, probabilities):
    with pytest.raises(ModelInputError):
        WeakLabels(coarse_index=index, coarse_probabilities=probabilities)


# ---------------------------------------------------------------- ImageNet map


class _LogitsOnlyBackbone:
    """Stands in for TimmBackbone where only annotate_logits is exercised."""

    name = "test-logits"
    num_classes = 1000


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_label_map_sums_softmax_over_mapped_classes_and_renormalises():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 1000)) * 3
    mapping = {0: "a", 1: "a", 5: "b", 999: "c", 500: "c"}
    annotator = ClassifierLabelMap(_LogitsOnlyBackbone(), mapping, coarse_classes=["a", "b", "c"])
    probabilities = _softmax(logits)
    mass = np.stack([probabilities[:, [0, 1]].sum(1), probabilities[:, 5], probabilities[:, [500, 999]].sum(1)], 1)
    expected = mass / mass.sum(axis=1, keepdims=True)
    labels = annotator.annotate_logits(logits)
    np.testing.assert_allclose(labels.coarse_probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels.coarse_index, expected.argmax(axis=1))


def test_label_map_is_stable_when_mapped_mass_underflows():
    logits = np.zeros((1, 1000))
    logits[0, 10] = 2000.0  # an unmapped class takes all the mass in float64
    logits[0, 0], logits[0, 1] = 0.0, np.log(3.0)
    annotator = ClassifierLabelMap(_LogitsOnlyBackbone(), {0: "a", 1: "b"}, coarse_classes=["a", "b"])
    labels = annotator.annotate_logits(logits)
    np.testing.assert_allclose(labels.coarse_probabilities, [[0.25, 0.75]], rtol=1e-5)


def test_label_map_drops_images_with_little_mapped_mass_when_asked():
    logits = np.zeros((2, 1000))
    logits[0, 0] = 20.0  # confidently a mapped class
    logits[1, 10] = 20.0  # confidently an unmapped class
    annotator = ClassifierLabelMap(
        _LogitsOnlyBackbone(), {0: "a", 1: "b"}, coarse_classes=["a", "b"], min_mapped_probability=0.2
    )
    labels = annotator.annotate_logits(logits)
    np.testing.assert_array_equal(labels.coarse_index, [0, MISSING_LABEL])
    np.testing.assert_array_equal(labels.coarse_probabilities[1], [0.0, 0.0])


def test_label_map_rejects_bad_maps_and_logits():
    backbone = _LogitsOnlyBackbone()
    with pytest.raises(ModelInputError, match="1000"):
        ClassifierLabelMap(backbone, {1000: "a"}, coarse_classes=["a", "b"])
    with pytest.raises(UnknownClassError, match="'z'"):
        ClassifierLabelMap(backbone, {3: "z"}, coarse_classes=["a", "b"])
    with pytest.raises(ModelInputError, match="empty"):
        ClassifierLabelMap(backbone, {}, coarse_classes=["a", "b"])
    annotator = ClassifierLabelMap(backbone, {3: "a", 4: "b"}, coarse_classes=["a", "b"])
    with pytest.raises(ModelInputError, match=r"\(n, 1000\)"):
        annotator.annotate_logits(np.zeros((2, 10)))
    with pytest.raises(ModelInputError, match="NaN"):
        annotator.annotate_logits(np.full((1, 1000), np.nan))


def test_label_map_name_changes_with_the_map():
    one = ClassifierLabelMap(_LogitsOnlyBackbone(), {3: "a", 4: "b"}, coarse_classes=["a", "b"])
    two = ClassifierLabelMap(_LogitsOnlyBackbone(), {3: "a", 5: "b"}, coarse_classes=["a", "b"])
    assert one.name.startswith("imagenet-map:test-logits:") and one.name != two.name
    assert isinstance(one, WeakAnnotator)


def test_imagenet_names_resolve_by_index_description_synonym_and_wordnet_id():
    names = ImageNetClassNames()
    assert names.resolve(281) == 281
    assert names.resolve("tabby, tabby cat") == 281
    assert names.resolve("Egyptian cat") == 285
    assert names.resolve("n02123045") == 281
    with pytest.raises(ModelInputError, match="ambiguous"):
        names.resolve("crane")  # the bird (134) and the machine (517)
    with pytest.raises(UnknownClassError, match="not an ImageNet class"):
        names.resolve("hoverboard")
    with pytest.raises(ModelInputError, match="outside"):
        names.resolve(1000)


def _write_map(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(data))
    return path


def test_load_imagenet_map_reads_names_and_indices(tmp_path):
    path = _write_map(tmp_path, {"cats": ["tabby, tabby cat", "Egyptian cat", 282], "drinks": ["espresso"]})
    assert load_imagenet_map(path, ["cats", "drinks", "other"]) == {281: "cats", 285: "cats", 282: "cats",
                                                                      967: "drinks"}


@pytest.mark.parametrize(
    "data, error, message",
    [
        ({"cats": ["hoverboard"]}, UnknownClassError, "under 'cats'.*hoverboard"),
        ({"cats": [1000]}, ModelInputError, "outside"),
        ({"cats": [281], "dogs": ["tabby, tabby cat"]}, HierarchyError, "both 'cats' and 'dogs'"),
        ({"lizards": [40]}, UnknownClassError, "lizards"),
        ({"cats": "tabby"}, ModelInputError, "list"),
        (["cats"], ModelInputError, "JSON object"),
    ],
)
def test_load_imagenet_map_errors_name_the_entry(tmp_path, data, error, message):
    with pytest.raises(error, match=message):
        load_imagenet_map(_write_map(tmp_path, data), ["cats", "dogs"])


def test_load_imagenet_map_rejects_unreadable_files(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelInputError, match="cannot read"):
        load_imagenet_map(tmp_path / "broken.json", ["cats"])


def test_shipped_fashion_mnist_map_is_valid_and_covers_every_group():
    mapping = load_imagenet_map(SHIPPED_MAP, COARSE)
    assert set(mapping.values()) == set(COARSE)
    names = ImageNetClassNames()
    assert names.descriptions[770] == "running shoe" and mapping[770] == "footwear"
    assert mapping[608] == "bottoms and dresses" and mapping[610] == "tops" and mapping[414] == "bags"


def test_label_map_annotates_real_photos_with_packaged_weights():
    skimage_data = pytest.importorskip("skimage.data")
    from model.embeddings import TimmBackbone

    backbone = TimmBackbone("efficientnet_lite0", "imagenet-package", image_size=224)
    annotator = ClassifierLabelMap(
        backbone, {281: "cat", 282: "cat", 283: "cat", 284: "cat", 285: "cat", 967: "coffee", 968: "coffee",
                   504: "coffee"}, coarse_classes=["cat", "coffee"], cost_per_label=0.0
    )
    photos = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    labels = annotator.annotate(photos)
    np.testing.assert_array_equal(labels.coarse_index, [0, 1])
    assert labels.coarse_probabilities[0, 0] > 0.9 and labels.coarse_probabilities[1, 1] > 0.9
    # The same answer from logits computed together with the embeddings.
    _, logits = backbone.embed_and_logits(photos)
    np.testing.assert_allclose(annotator.annotate_logits(logits).coarse_probabilities,
                               labels.coarse_probabilities, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- open_clip zero-shot (random weights: plumbing)


@pytest.fixture(scope="module")
def tiny_clip():
    from model.embeddings import OpenClipImageBackbone

    return OpenClipImageBackbone("ViT-S-32", pretrained=None, model_overrides=TINY_OPEN_CLIP)


@pytest.fixture(scope="module")
def colour_images():
    return [Image.new("RGB", (40 + i, 30), (30 * i, 200 - 20 * i, 90)) for i in range(6)]


@pytest.mark.parametrize("coarse_from", ["coarse_prompts", "fine_sum"])
def test_zero_shot_outputs_distributions_over_coarse_classes(tiny_clip, colour_images, coarse_from):
    from model.weak.openclip_zeroshot import OpenClipZeroShot

    hierarchy = fashion_mnist_hierarchy()
    annotator = OpenClipZeroShot.from_backbone(tiny_clip, hierarchy, coarse_from=coarse_from, cost_per_label=0.01)
    assert isinstance(annotator, WeakAnnotator)
    labels = annotator.annotate(colour_images)
    assert labels.coarse_probabilities.shape == (6, 4)
    np.testing.assert_allclose(labels.coarse_probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels.coarse_index, labels.coarse_probabilities.argmax(axis=1))
    n_classes = 4 if coarse_from == "coarse_prompts" else 10
    assert annotator.class_text_embeddings.shape == (n_classes, 32)
    np.testing.assert_allclose(np.linalg.norm(annotator.class_text_embeddings, axis=1), 1.0, atol=1e-5)
    # The cached-feature path gives the same answer as the image path.
    features = tiny_clip.embed(colour_images)
    np.testing.assert_allclose(annotator.annotate_embeddings(features).coarse_probabilities,
                               labels.coarse_probabilities, atol=1e-6)
    assert coarse_from in annotator.name and annotator.cost_per_label == 0.01


def test_zero_shot_fine_sum_adds_fine_probabilities_within_groups(tiny_clip, colour_images):
    from model.weak.openclip_zeroshot import OpenClipZeroShot

    hierarchy = fashion_mnist_hierarchy()
    annotator = OpenClipZeroShot.from_backbone(tiny_clip, hierarchy, coarse_from="fine_sum")
    features = tiny_clip.embed(colour_images)
    fine = annotator.fine_probabilities(features)
    assert fine.shape == (6, 10)
    coarse = annotator.annotate_image_features(features).coarse_probabilities
    tops = [hierarchy.fine_index(f) for f in FASHION_MNIST_GROUPS["tops"]]
    np.testing.assert_allclose(coarse[:, 0], fine[:, tops].sum(axis=1), atol=1e-6)
    # Logit scale comes from the model (open_clip initialises it to 1/0.07).
    assert annotator.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_zero_shot_domain_template_joins_the_ensemble(tiny_clip):
    from model.weak.openclip_zeroshot import OpenClipZeroShot

    hierarchy = fashion_mnist_hierarchy()
    plain = OpenClipZeroShot.from_backbone(tiny_clip, hierarchy, prompt_templates=["a photo of a {}."])
    domain = OpenClipZeroShot.from_backbone(
        tiny_clip, hierarchy, prompt_templates=["a photo of a {}."],
        domain_template="a photo of a {}, a type of clothing.",
    )
    assert domain.prompts_for("tops") == ["a photo of a tops.", "a photo of a tops, a type of clothing."]
    assert not np.allclose(plain.class_text_embeddings, domain.class_text_embeddings)
    assert plain.name != domain.name


def test_zero_shot_rejects_bad_options_and_features(tiny_clip):
    from model.weak.openclip_zeroshot import OpenClipZeroShot

    hierarchy = fashion_mnist_hierarchy()
    with pytest.raises(ModelInputError, match="coarse_from"):
        OpenClipZeroShot.from_backbone(tiny_clip, hierarchy, coarse_from="magic")
    with pytest.raises(ModelInputError, match="exactly one"):
        OpenClipZeroShot.from_backbone(tiny_clip, hierarchy, prompt_templates=["no placeholder"])
    annotator = OpenClipZeroShot.from_backbone(tiny_clip, hierarchy)
    with pytest.raises(ModelInputError, match=r"\(n, 32\)"):
        annotator.annotate_embeddings(np.zeros((2, 8)))
    with pytest.raises(ModelInputError, match="NaN"):
        annotator.annotate_embeddings(np.full((1, 32), np.nan))
    with pytest.raises(ModelInputError, match="fine_sum"):
        annotator.fine_probabilities(np.ones((1, 32)))


def test_zero_shot_builds_its_own_model_from_a_name():
    from model.weak.openclip_zeroshot import OpenClipZeroShot

    annotator = OpenClipZeroShot("ViT-S-32", None, fashion_mnist_hierarchy(), model_overrides=TINY_OPEN_CLIP,
                                 prompt_templates=["a photo of a {}."])
    labels = annotator.annotate([Image.new("RGB", (20, 20), (255, 0, 0))])
    assert labels.coarse_probabilities.shape == (1, 4)


# ---------------------------------------------------------------- chat-completions VLM against a local stub

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)
API_KEY = "sk-test-secret-123"


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("tops", 0),
        ("  Bottoms and Dresses. ", 1),
        ("FOOTWEAR!", 2),
        ("The image shows bags", 3),
        ("footwear or bags", MISSING_LABEL),  # two classes named
        ("a dress", MISSING_LABEL),  # "dresses" is not contained as a word
        ("", MISSING_LABEL),
        ("I cannot tell", MISSING_LABEL),
    ],
)
def test_match_answer(answer, expected):
    assert match_answer(answer, COARSE) == expected


def test_match_answer_prefers_the_longer_contained_name():
    classes = ["shirt", "t-shirt", "coat"]
    assert match_answer("It is a T-shirt.", classes) == 1
    assert match_answer("a shirt", classes) == 0
    assert match_answer("a t shirt and a coat", classes) == MISSING_LABEL


def _image(colour: tuple[int, int, int], size: tuple[int, int] = (28, 28)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _vlm(server: VLMStubServer, **kwargs) -> OpenAICompatibleVLM:
    options = dict(base_url=server.base_url, api_key=API_KEY, model="stub-vlm", coarse_classes=COARSE,
                   timeout_s=5, max_retries=2, backoff_s=0.0)
    options.update(kwargs)
    return OpenAICompatibleVLM(**options)


def test_vlm_answers_are_matched_or_dropped():
    answers = {RED: "Tops", GREEN: " footwear. ", BLUE: "I think these are bags"}
    with VLMStubServer(answers, default_answer="purple monkey dishwasher", api_key=API_KEY) as server:
        vlm = _vlm(server, image_size=224)
        labels = vlm.annotate([_image(RED), _image(GREEN), _image(BLUE), _image(GREY)])
        assert server.problems() == []
        assert len(server.requests) == 4
        first = server.requests[0]
        assert first.image_size == (224, 224)  # 28 px upscaled to the configured size
        prompt = first.body["messages"][0]["content"][0]["text"]
        assert all(name in prompt for name in COARSE)
        assert first.body["temperature"] == 0
    np.testing.assert_array_equal(labels.coarse_index, [0, 2, 3, MISSING_LABEL])
    np.testing.assert_array_equal(labels.coarse_probabilities[3], np.zeros(4))
    assert labels.coarse_probabilities[1, 2] == 1.0
    assert vlm.cost_per_label == 0.02 and isinstance(vlm, WeakAnnotator)


def test_vlm_name_leaves_out_credentials_in_the_url():
    vlm = OpenAICompatibleVLM("https://user:secret@vlm.example:8443/api/", None, "m", COARSE)
    assert vlm.name == "vlm:m@vlm.example:8443/api"
    assert vlm.url == "https://user:secret@vlm.example:8443/api/v1/chat/completions"


def test_vlm_keeps_aspect_ratio_and_accepts_a_v1_base_url():
    with VLMStubServer({RED: "bags"}, api_key=API_KEY) as server:
        vlm = _vlm(server, base_url=server.base_url + "/v1/", image_size=100)
        labels = vlm.annotate([_image(RED, (60, 30))])
        assert server.problems() == [] and server.requests[0].image_size == (100, 50)
    np.testing.assert_array_equal(labels.coarse_index, [3])


def test_vlm_retries_server_errors_with_backoff():
    delays: list[float] = []
    with VLMStubServer({RED: "tops"}, api_key=API_KEY) as server:
        server.fail_next(2, status=503)
        vlm = _vlm(server, max_retries=2, backoff_s=0.5, sleep=delays.append)
        labels = vlm.annotate([_image(RED)])
        assert len(server.requests) == 3
    np.testing.assert_array_equal(labels.coarse_index, [0])
    assert delays == [0.5, 1.0]


def test_vlm_retries_rate_limits():
    with VLMStubServer({RED: "tops"}, api_key=API_KEY) as server:
        server.fail_next(1, status=429)
        labels = _vlm(server).annotate([_image(RED)])
        assert len(server.requests) == 2
    np.testing.assert_array_equal(labels.coarse_index, [0])


def test_vlm_gives_up_after_retries_and_logs_without_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    with VLMStubServer({RED: "tops", GREEN: "footwear"}, api_key=API_KEY) as server:
        server.fail_next(2, status=500)
        vlm = _vlm(server, max_retries=1, max_workers=1)
        labels = vlm.annotate([_image(RED), _image(GREEN)])  # the first image uses up both failures
        assert len(server.requests) == 3
    np.testing.assert_array_equal(labels.coarse_index, [MISSING_LABEL, 2])
    assert "failed after 2 attempts" in caplog.text
    assert API_KEY not in caplog.text and API_KEY not in repr(vlm)


def test_vlm_timeouts_are_retried_then_dropped():
    with VLMStubServer({RED: "tops"}, api_key=API_KEY) as server:
        server.delay_s = 0.6
        vlm = _vlm(server, timeout_s=0.2, max_retries=1)
        labels = vlm.annotate([_image(RED)])
        assert len(server.requests) == 2
        np.testing.assert_array_equal(labels.coarse_index, [MISSING_LABEL])
        server.delay_s = 0.0
        np.testing.assert_array_equal(vlm.annotate([_image(RED)]).coarse_index, [0])


def test_vlm_client_errors_raise_at_once():
    with VLMStubServer({RED: "tops"}, api_key=API_KEY) as server:
        server.fail_next(1, status=401)
        with pytest.raises(VLMRequestError, match="HTTP 401"):
            _vlm(server).annotate([_image(RED)])
        assert len(server.requests) == 1
        # A wrong key: the stub refuses the request shape with 400, which is not retried either.
        with pytest.raises(VLMRequestError, match="HTTP 400.*bearer token") as raised:
            _vlm(server, api_key="wrong-key").annotate([_image(RED)])
        assert "wrong-key" not in str(raised.value)


def test_vlm_requests_run_concurrently_and_keep_order():
    colours = [RED, GREEN, BLUE] * 4
    with VLMStubServer({RED: "tops", GREEN: "footwear", BLUE: "bags"}, api_key=API_KEY) as server:
        server.delay_s = 0.05
        labels = _vlm(server, max_workers=4).annotate([_image(c) for c in colours])
        assert server.problems() == []
    np.testing.assert_array_equal(labels.coarse_index, [0, 2, 3] * 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_url": "ftp://x"}, "http"),
        ({"model": ""}, "model"),
        ({"coarse_classes": ["only"]}, "2 distinct"),
        ({"coarse_classes": ["T-shirt", "t shirt"]}, "distinguishable"),
        ({"prompt": "no placeholder"}, "classes"),
        ({"timeout_s": 0}, "positive"),
    ],
)
def test_vlm_rejects_bad_configuration(kwargs, message):
    options = dict(base_url="http://127.0.0.1:9", api_key=None, model="m", coarse_classes=COARSE)
    options.update(kwargs)
    with pytest.raises(ModelInputError, match=message):
        OpenAICompatibleVLM(**options)
