import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.embeddings import (
    Backbone,
    BackboneWeightsError,
    OpenClipImageBackbone,
    TimmBackbone,
    configure_torch_threads,
    load_packaged_imagenet_weights,
)
from model.errors import ModelInputError
from model.images import decode_image
from model.runtime import create_backbone

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real test photos")

# A tiny open_clip architecture (random weights) so plumbing tests take well under a second per forward pass.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class _NotATensor:
    """Pickled by reference: a weights_only load must refuse to import it."""


@pytest.fixture(scope="module")
def packaged_lite0() -> TimmBackbone:
    return TimmBackbone("efficientnet_lite0", weights="imagenet-package", image_size=224, batch_size=2)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee()),
            Image.fromarray(skimage_data.camera())]


@pytest.fixture(scope="module")
def photo_outputs(packaged_lite0, photos) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and logits of all photos in one call (batches of 2 and 1)."""
    return packaged_lite0.embed_and_logits(photos)


def _top5(logits: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-logits)[:5]]


def test_packaged_weights_classify_real_photos(photo_outputs):
    logits = photo_outputs[1]
    assert logits.shape == (3, 1000) and logits.dtype == np.float32
    cat_classes = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(np.argmax(logits[0])) in cat_classes
    assert 967 in _top5(logits[1])  # espresso


def test_embeddings_shape_dtype_and_determinism(packaged_lite0, photos, photo_outputs):
    first = photo_outputs[0]
    assert first.shape == (3, 1280) and first.dtype == np.float32
    assert np.all(np.isfinite(first))
    assert not np.allclose(first[0], first[1])
    # embed() alone, one image at a time: deterministic, and batching does not change the vectors.
    singles = np.concatenate([packaged_lite0.embed([im]) for im in photos])
    np.testing.assert_allclose(first, singles, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(packaged_lite0.embed(photos[2:]), singles[2:])


def test_logits_match_the_full_model_forward(packaged_lite0, photos, photo_outputs):
    with torch.inference_mode():
        batch = torch.stack([packaged_lite0.preprocess(im) for im in photos[:2]])
        reference_logits = packaged_lite0.model(batch).numpy()
    np.testing.assert_allclose(photo_outputs[1][:2], reference_logits, rtol=1e-4, atol=1e-4)


def test_empty_input_gives_empty_arrays(packaged_lite0):
    embeddings, logits = packaged_lite0.embed_and_logits([])
    assert embeddings.shape == (0, 1280) and logits.shape == (0, 1000)


def test_name_identifies_model_weights_and_size(packaged_lite0):
    assert isinstance(packaged_lite0, Backbone)
    assert packaged_lite0.name == "timm:efficientnet_lite0:imagenet-package:224px"
    assert packaged_lite0.dim == 1280


def test_preprocess_uses_imagenet_normalisation(packaged_lite0):
    tensor = packaged_lite0.preprocess(Image.new("RGB", (10, 7), (124, 116, 104)))  # ~ the ImageNet mean colour
    assert tensor.shape == (3, 224, 224)
    assert float(tensor.abs().max()) < 0.02
    with pytest.raises(ModelInputError, match="PIL image"):
        packaged_lite0.preprocess(np.zeros((4, 4, 3)))


def test_random_weights_are_seeded_and_named():
    one = TimmBackbone("efficientnet_lite0", weights=None, image_size=32)
    two = create_backbone("timm:efficientnet_lite0:random", image_size=32)
    image = [Image.new("RGB", (32, 32), (200, 30, 60))]
    np.testing.assert_array_equal(one.embed(image), two.embed(image))
    assert one.name == two.name == "timm:efficientnet_lite0:random-seed0:32px"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_loads_and_names_by_content(tmp_path, suffix):
    source = TimmBackbone("efficientnet_lite0", weights=None, image_size=32, random_seed=7)
    seed0 = TimmBackbone("efficientnet_lite0", weights=None, image_size=32)
    path = tmp_path / f"lite0{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # wrapped, as training scripts write it
    loaded = TimmBackbone("efficientnet_lite0", weights=str(path), image_size=32)
    image = [Image.new("RGB", (40, 20), (10, 200, 60))]
    np.testing.assert_array_equal(loaded.embed(image), source.embed(image))
    assert not np.allclose(loaded.embed(image), seed0.embed(image))  # the file's weights, not a default init
    assert loaded.name.startswith("timm:efficientnet_lite0:file-") and loaded.name.endswith(":32px")


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found"):
        TimmBackbone("efficientnet_lite0", weights=str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(BackboneWeightsError, match="does not fit"):
        TimmBackbone("efficientnet_lite0", weights=str(wrong))
    pickled_code = tmp_path / "code.pt"
    torch.save({"weights": _NotATensor()}, pickled_code)
    with pytest.raises(BackboneWeightsError, match="cannot read"):
        TimmBackbone("efficientnet_lite0", weights=str(pickled_code))


def test_unknown_pretrained_tag_and_wrong_package_model_are_clear_errors():
    with pytest.raises(BackboneWeightsError, match="no pretrained weights"):
        TimmBackbone("efficientnet_lite0", weights="no_such_tag")
    with pytest.raises(BackboneWeightsError, match="only for .*efficientnet_lite0.*not 'resnet18'"):
        TimmBackbone("resnet18", weights="imagenet-package")
    with pytest.raises(ModelInputError, match="unknown timm model"):
        TimmBackbone("no_such_model", weights=None)


def test_package_weights_check_every_shape():
    import timm

    ten_class_model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    with pytest.raises(BackboneWeightsError, match=r"tensor #294 .* shape \(1000, 1280\)"):
        load_packaged_imagenet_weights(ten_class_model, "efficientnet_lite0")


def test_efficientnet_lite2_package_weights_recognise_a_real_photo():
    backbone = create_backbone("timm:efficientnet_lite2", image_size=260, batch_size=2)
    assert backbone.name == "timm:efficientnet_lite2:imagenet-package:260px"
    assert backbone.dim == 1280
    cat = Image.fromarray(skimage_data.chelsea())
    logits = backbone.classify_logits([cat])
    assert int(np.argmax(logits[0])) in {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def test_factory_rejects_bad_specs():
    for bad in ["efficientnet_lite0", "timm:", "onnx:thing", "timm:resnet18", "open_clip:ViT-B-32"]:
        with pytest.raises(ModelInputError):
            create_backbone(bad)


def test_open_clip_image_tower_plumbing_with_random_weights():
    backbone = OpenClipImageBackbone("ViT-S-32", pretrained=None, model_overrides=TINY_OPEN_CLIP)
    assert isinstance(backbone, Backbone)
    assert backbone.dim == 32 and backbone.image_size == 64
    assert backbone.name.startswith("open_clip:ViT-S-32:random-seed0+cfg-")
    images = [Image.new("RGB", (50, 40), (i * 40, 100, 0)) for i in range(5)]
    first = backbone.embed(images)
    assert first.shape == (5, 32) and first.dtype == np.float32 and np.all(np.isfinite(first))
    np.testing.assert_allclose(first, backbone.embed(images), rtol=1e-6)
    np.testing.assert_allclose(first[2:3], backbone.embed(images[2:3]), rtol=1e-4, atol=1e-5)


def test_open_clip_errors_are_clear(tmp_path):
    with pytest.raises(ModelInputError, match="unknown open_clip model"):
        OpenClipImageBackbone("No-Such-CLIP", pretrained=None)
    with pytest.raises(BackboneWeightsError, match="no pretrained tag"):
        OpenClipImageBackbone("ViT-S-32", pretrained="not_a_tag")
    with pytest.raises(BackboneWeightsError, match="not found"):
        OpenClipImageBackbone("ViT-S-32", pretrained=str(tmp_path / "missing.pt"))


def test_configure_torch_threads_sets_and_validates():
    before = torch.get_num_threads()
    try:
        configure_torch_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ModelInputError):
        configure_torch_threads(0)


def test_a_large_jpeg_decoded_at_twice_the_input_side_embeds_as_in_full(packaged_lite0, photos):
    """What the feature extractor does for images only the backbone reads (decode_image's at_least, JPEG scales):
    photos upscaled 4x and saved as JPEG, decoded in full and at the scale keeping twice the 224-pixel input."""
    rng = np.random.default_rng(0)
    for photo in photos:
        large = photo.convert("RGB").resize((photo.width * 4, photo.height * 4), Image.Resampling.LANCZOS)
        grain = rng.integers(-6, 7, size=(large.height, large.width, 3))  # detail the upscaling smoothed away
        large = Image.fromarray(np.clip(np.asarray(large, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        large.save(buffer, format="JPEG", quality=90)
        full, scaled = decode_image(buffer.getvalue()), decode_image(buffer.getvalue(), at_least=448)
        assert scaled.width * scaled.height * 4 <= full.width * full.height  # at least half scale
        (e_full, e_scaled), logits = packaged_lite0.embed_and_logits([full, scaled])
        cosine = float(e_full @ e_scaled / np.linalg.norm(e_full) / np.linalg.norm(e_scaled))
        assert cosine >= 0.998, cosine
        assert logits[0].argmax() == logits[1].argmax()
