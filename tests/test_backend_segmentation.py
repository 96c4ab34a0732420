"""backend.segmentation: BrushLabels configs, Label Studio RLE through the SDK's converters, fit and predictions."""

import io

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from backend.label_config import LabelConfigError, LabelLayout
from backend.projects import Projects
from backend.segmentation import (
    SegmentationProjects,
    decode_brush_region,
    latest_annotation,
    mask_results,
    parse_segmentation_config,
    read_annotation,
)
from model.spatial_features import FeaturePyramid

BRUSH_CONFIG = """<View>
  <Image name="img" value="$picture"/>
  <BrushLabels name="paint" toName="img"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <Choices name="present" toName="img" choice="multiple"><Choice value="Cat"/><Choice value="Dog"/></Choices>
</View>"""


def test_config_parsing():
    labeling = parse_segmentation_config(BRUSH_CONFIG)
    assert labeling.layout is LabelLayout.BRUSH_SEGMENTATION
    assert (labeling.image_name, labeling.image_value_key, labeling.brush_control) == ("img", "picture", "paint")
    assert labeling.labels == ("Cat", "Dog")
    assert labeling.choices_control == "present" and labeling.choice_values == ("Cat", "Dog")
    alone = parse_segmentation_config(BRUSH_CONFIG.replace(
        '<Choices name="present" toName="img" choice="multiple"><Choice value="Cat"/><Choice value="Dog"/></Choices>',
        ""))
    assert alone.choices_control is None
    assert parse_segmentation_config('<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                                     '<Choice value="a"/></Choices></View>') is None
    with pytest.raises(LabelConfigError, match="must point at an <Image>"):
        parse_segmentation_config('<View><Text name="t" value="$t"/><BrushLabels name="b" toName="t">'
                                  '<Label value="a"/></BrushLabels></View>')
    with pytest.raises(LabelConfigError, match="several"):
        parse_segmentation_config('<View><Image name="i" value="$i"/><BrushLabels name="a" toName="i">'
                                  '<Label value="x"/></BrushLabels><BrushLabels name="b" toName="i">'
                                  '<Label value="y"/></BrushLabels></View>')
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_segmentation_config("<View><BrushLabels")


def _brush(name: str, region: np.ndarray) -> dict:
    height, width = region.shape
    return {"from_name": "paint", "to_name": "img", "type": "brushlabels", "original_width": width,
            "original_height": height, "value": {"format": "rle", "rle": mask2rle(region.astype(np.uint8) * 255),
                                                 "brushlabels": [name]}}


def test_rle_round_trip_through_the_sdk_converters():
    labeling = parse_segmentation_config(BRUSH_CONFIG)
    rng = np.random.default_rng(0)
    mask = np.zeros((37, 53), dtype=np.uint8)  # not square, odd sizes
    mask[5:20, 3:30] = 1
    mask[15:35, 25:50] = 2
    mask[rng.random(mask.shape) < 0.02] = 0  # ragged holes
    probabilities = np.stack([(mask == k).astype(np.float32) * 0.9 + 0.05 for k in range(3)])
    results = mask_results(labeling, mask, probabilities, np.array([0.8, 0.3]))
    brushes = [r for r in results if r["type"] == "brushlabels"]
    assert [r["value"]["brushlabels"] for r in brushes] == [["Cat"], ["Dog"]]
    for r in brushes:
        assert r["original_width"] == 53 and r["original_height"] == 37 and r["score"] == pytest.approx(0.95)
        # the SDK decodes exactly what was encoded
        flat = np.asarray(decode_rle(r["value"]["rle"]))
        assert flat.size == 53 * 37 * 4
    choices = [r for r in results if r["type"] == "choices"]
    assert choices[0]["value"]["choices"] == ["Cat"]
    read = read_annotation(labeling, {"result": results})
    assert np.array_equal(read.mask, mask) and read.labels == {"Cat", "Dog"}
    assert np.array_equal(decode_brush_region(brushes[1]["value"], 53, 37), mask == 2)


def test_annotations_paint_in_order_and_skip_cancelled():
    labeling = parse_segmentation_config(BRUSH_CONFIG)
    first, second = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    first[:6], second[4:] = True, True
    annotation = {"result": [_brush("Cat", first), _brush("Dog", second),
                             {"from_name": "present", "to_name": "img", "type": "choices",
                              "value": {"choices": ["Cat", "Dog"]}}]}
    read = read_annotation(labeling, annotation)
    assert (read.mask[4:6] == 2).all() and (read.mask[:4] == 1).all()
    assert read_annotation(labeling, {"was_cancelled": True, "result": annotation["result"]}) is None
    only_choice = read_annotation(labeling, {"result": annotation["result"][2:]})
    assert only_choice.mask is None and only_choice.labels == {"Cat", "Dog"}
    task = {"annotations": [{"id": 1, "updated_at": "2026-01-01", "result": [_brush("Cat", first)]},
                            {"id": 2, "updated_at": "2026-01-02", "result": [_brush("Dog", first)]},
                            {"id": 3, "updated_at": "2026-01-03", "was_cancelled": True, "result": []}]}
    assert latest_annotation(labeling, task).labels == {"Dog"}
    broken = _brush("Cat", first)
    broken["value"]["rle"] = []
    with pytest.raises(Exception, match="rle"):
        read_annotation(labeling, {"result": [broken]})


def _scene(index: int) -> tuple[bytes, np.ndarray]:
    """A 40x30 PNG: red box (Cat) on the left or blue box (Dog) on the right, on grey."""
    pixels = np.full((30, 40, 3), 128, dtype=np.uint8)
    mask = np.zeros((30, 40), dtype=np.uint8)
    if index % 2 == 0:
        pixels[5:25, 2:18], mask[5:25, 2:18] = (230, 20, 20), 1
    else:
        pixels[5:25, 22:38], mask[5:25, 22:38] = (20, 20, 230), 2
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), mask


class ColourPyramid:
    """Feature pyramids from colour: grids of each cell's mean RGB (and its complement) at 7, 28 and 14 cells."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images):
        self.images += len(images)

        def grid(image, cells):
            rgb = np.asarray(image.convert("RGB").resize((cells, cells), Image.Resampling.BOX), dtype=np.float32) / 255
            return np.concatenate([rgb, 1 - rgb], axis=-1)

        return FeaturePyramid(np.stack([grid(im, 7) for im in images]),
                              (np.stack([grid(im, 28) for im in images]), np.stack([grid(im, 14) for im in images])))


class FakeClient:
    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images
        self.downloads = 0

    def download_image(self, url, task_id=None):
        self.downloads += 1
        return self.images[url]


def _projects(tmp_path, extractor):
    return SegmentationProjects(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), lambda b: str(hash(b)),
                                Projects(tmp_path / "models"), tmp_path / "models" / "segmentation-maps", extractor)


def test_fit_then_predict_brush_regions_and_serve_the_saved_version(tmp_path):
    labeling = parse_segmentation_config(BRUSH_CONFIG)
    images, tasks = {}, []
    for i in range(12):
        data, mask = _scene(i)
        images[f"http://ls/{i}.png"] = data
        task = {"id": 100 + i, "data": {"picture": f"http://ls/{i}.png"}, "annotations": []}
        if i < 4:
            task["annotations"] = [{"id": i, "result": mask_results(labeling, mask, np.ones((3, 30, 40)))}]
        tasks.append(task)
    client = FakeClient(images)
    extractor = ColourPyramid()
    projects = _projects(tmp_path, extractor)
    predictions, version = projects.predictions(5, client, tasks, labeling)
    assert version == "vlm-al-v0" and all(p["result"] == [] for p in predictions)  # nothing before a fit
    summary = projects.fit(5, client, tasks, labeling, BRUSH_CONFIG)
    assert summary["n_masks"] == 4 and summary["model_version"] == "vlm-al-v1"
    assert sorted(summary["unlabelled_task_ids"]) == list(range(104, 112))
    downloads = client.downloads
    predictions, version = projects.predictions(5, client, tasks[4:], labeling)
    assert version == "vlm-al-v1" and client.downloads == downloads  # maps are kept by image: no second download
    scores = [p["score"] for p in predictions]
    assert all(0 <= s < 1 for s in scores) and len(set(scores)) == len(scores)  # a queue order
    # ordered by the mask strategy (its diverse batch of uncertain masks first), not by task id
    assert scores != sorted(scores)
    correct = 0
    for i, prediction in enumerate(predictions, start=4):
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        assert brushes and all(0 <= r["score"] <= 1 for r in brushes)
        predicted = read_annotation(labeling, {"result": brushes}).mask
        assert predicted.shape == (30, 40)
        truth = _scene(i)[1]
        correct += ((predicted == truth) | (truth == 0)).mean() > 0.7 and (predicted[truth > 0] > 0).mean() > 0.5
    assert correct >= 6

    # Another process (a restarted server, a replica, an RQ worker) with the same MODEL_DIR serves the saved
    # version with the same masks and queue, and reads the cached pyramids instead of embedding again.
    restarted_extractor = ColourPyramid()
    restarted = _projects(tmp_path, restarted_extractor)
    again, version = restarted.predictions(5, client, tasks[4:], labeling)
    assert version == "vlm-al-v1" and restarted_extractor.images == 0
    assert [p["score"] for p in again] == scores
    assert [p["result"] for p in again] == [p["result"] for p in predictions]
    # a changed label config is not served the old labels' model
    renamed = parse_segmentation_config(BRUSH_CONFIG.replace('"Dog"', '"Fox"'))
    assert restarted.served(5, renamed)[0] is None
    # the next fit moves every process to the new version
    tasks[4]["annotations"] = [{"id": 4, "result": mask_results(labeling, _scene(4)[1], np.ones((3, 30, 40)))}]
    assert projects.fit(5, client, tasks, labeling, BRUSH_CONFIG)["model_version"] == "vlm-al-v2"
    assert restarted.predictions(5, client, tasks[5:], labeling)[1] == "vlm-al-v2"
