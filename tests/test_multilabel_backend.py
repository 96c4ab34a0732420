"""Multi-label projects in the backend: the config, label sets read back (an empty set included), predictions."""

from __future__ import annotations

import numpy as np
import pytest

from backend.label_config import LabelConfigError, LabelLayout, parse_label_config
from backend.multilabel import annotation_label_set, build_multilabel_prediction, is_multilabel, task_label_set

MULTI_XML = """
<View>
  <Image name="img" value="$photo"/>
  <Choices name="tags" toName="img" choice="multiple" showInline="true">
    <Choice value="cat"/><Choice value="dog"/><Choice value="sports car"/>
  </Choices>
  <TextArea name="model_confidence" toName="img" editable="false"/>
</View>
"""


@pytest.fixture(scope="module")
def labeling():
    return parse_label_config(MULTI_XML)


def ticked(*labels, from_name="tags", origin="manual"):
    return {"from_name": from_name, "to_name": "img", "type": "choices", "value": {"choices": list(labels)},
            "origin": origin}


def test_a_multiple_choices_over_an_image_is_a_multi_label_project(labeling):
    assert labeling.layout is LabelLayout.MULTI_LABEL and is_multilabel(labeling)
    assert labeling.hierarchy.coarse_classes == ("cat", "dog", "sports car")
    assert labeling.fine_control == "tags" and labeling.image_name == "img" and labeling.image_value_key == "photo"
    single = MULTI_XML.replace(' choice="multiple"', "")
    with pytest.raises(LabelConfigError, match="parent map"):
        parse_label_config(single)  # one single-choice <Choices> is the flat layout, which needs a parent map
    with pytest.raises(LabelConfigError, match="at least 2"):
        parse_label_config(MULTI_XML.replace('<Choice value="dog"/><Choice value="sports car"/>', ""))


def test_annotations_read_back_as_label_sets_including_the_empty_set(labeling):
    assert annotation_label_set(labeling, {"id": 1, "result": [ticked("cat", "sports car")]}) == {"cat", "sports car"}
    # Submitted with nothing ticked: "none of these", a label like any other.
    assert annotation_label_set(labeling, {"id": 2, "result": []}) == frozenset()
    assert annotation_label_set(labeling, {"id": 3, "result": [
        {"from_name": "model_confidence", "to_name": "img", "type": "textarea", "value": {"text": ["x"]}}]}) == set()
    # An unchanged pre-ticked set is the annotator's own.
    assert annotation_label_set(labeling, {"id": 4, "result": [ticked("dog", origin="prediction")]}) == {"dog"}
    assert annotation_label_set(labeling, {"id": 5, "result": [ticked("horse")]}) is None
    assert annotation_label_set(labeling, {"id": 6, "result": [{"from_name": "tags", "value": {"choices": "cat"}}]}) is None
    assert annotation_label_set(labeling, {"id": 7, "was_cancelled": True, "result": [ticked("cat")]}) is None


def test_the_task_label_set_is_the_ground_truth_then_the_newest_readable_annotation(labeling):
    task = {"id": 9, "annotations": [
        {"id": 1, "updated_at": "2026-01-01T10:00:00Z", "result": [ticked("cat")]},
        {"id": 2, "updated_at": "2026-01-02T10:00:00Z", "result": []},
        {"id": 3, "updated_at": "2026-01-03T10:00:00Z", "result": [ticked("unknown")]},
        {"id": 4, "updated_at": "2026-01-04T10:00:00Z", "was_cancelled": True, "result": [ticked("dog")]},
    ]}
    assert task_label_set(labeling, task) == frozenset()  # the newest readable one: the empty set
    task["annotations"][0]["ground_truth"] = True
    assert task_label_set(labeling, task) == {"cat"}
    assert task_label_set(labeling, {"id": 10, "annotations": []}) is None


def test_predictions_pre_tick_only_labels_past_their_calibrated_threshold_and_carry_every_score(labeling):
    prediction = build_multilabel_prediction(labeling, np.array([0.95, 0.6, 0.9]), [0.9, 0.5, None], 0.25, "v3")
    choices, confidence = prediction["result"]
    # "sports car" has no threshold (its precision never reached the target): never pre-ticked, however sure.
    assert choices["value"] == {"choices": ["cat", "dog"]} and choices["from_name"] == "tags"
    assert choices["meta"]["label_scores"] == {"cat": 0.95, "dog": 0.6, "sports car": 0.9}
    assert choices["score"] == pytest.approx(0.775)
    assert prediction["score"] == 0.25 and prediction["model_version"] == "v3"
    assert "cat 95% (pre-ticked)" in confidence["value"]["text"][0]
    assert "sports car 90%" in confidence["value"]["text"][0]
    nothing = build_multilabel_prediction(labeling, np.array([0.1, 0.2, 0.3]), [None] * 3, 0.5, "v3")
    assert [item["type"] for item in nothing["result"]] == ["textarea"]  # nothing ticked, every score shown
    assert "sports car 30%" in nothing["result"][0]["value"]["text"][0]
    with pytest.raises(ValueError):
        build_multilabel_prediction(labeling, np.array([0.1, 0.2]), [None] * 3, 0.5, "v3")


def test_an_api_vlm_is_asked_for_the_list_of_labels_once_per_image_and_its_answers_are_cached(labeling, tmp_path):
    import io
    from types import SimpleNamespace

    from PIL import Image
    from vlm_stub_server import VLMStubServer

    from backend.features import TaskFeatures, WeakAnnotators
    from backend.multilabel import MultiLabelProjects
    from model.weak.openai_compatible import OpenAICompatibleVLM

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 24), colours[colour]).save(buffer, format="PNG")
        return buffer.getvalue()

    class Client:
        downloads = 0

        def download_image(self, url, task_id=None):
            Client.downloads += 1
            return png(url.rsplit("/", 1)[-1])

    tasks = [{"id": i, "data": {"photo": f"/data/{c}"}} for i, c in enumerate(colours)]
    features = TaskFeatures(keys=list(colours), errors={}, embeddings={}, weak_probabilities={}, weak_classes=None)
    maps_computed = []

    def fake_maps(images):
        maps_computed.append(len(images))
        return np.zeros((len(images), 2, 2, 3), dtype=np.float16)

    answers = {colours["red"]: "cat; sports car", colours["green"]: "none", colours["blue"]: "no idea"}
    with VLMStubServer(answers, api_key="k") as server:
        vlm = OpenAICompatibleVLM(server.base_url, "k", "stub-vlm", ("dog", "cat", "sports car"), max_retries=0)
        extractor = SimpleNamespace(weak_annotators=WeakAnnotators(vlm))
        service = MultiLabelProjects(SimpleNamespace(model_dir=tmp_path), None, extractor, lambda b: Image.open(
            io.BytesIO(b)).convert("RGB"), None, spatial_maps=fake_maps)
        maps = service.spatial_maps(labeling, tasks, features, [0, 1, 2], Client())
        asked = len(server.requests)
        # A second pass finds maps and answers cached: no download, no question.
        service.spatial_maps(labeling, tasks, features, [0, 1, 2], Client())
    assert sorted(maps) == [0, 1, 2] and maps_computed == [3] and asked == 3 and Client.downloads == 3
    scores = service.weak_scores(labeling, features, [0, 1, 2])
    # In the project's label order (cat, dog, sports car), whatever the annotator's order.
    np.testing.assert_array_equal(scores[:2], [[1, 0, 1], [0, 0, 0]])
    assert np.isnan(scores[2]).all()  # "no idea" is no answer; "none" (row 1) is one


def test_a_multi_label_checkpoint_is_not_read_as_a_fine_classifier(tmp_path, caplog):
    """The fine-grained loader leaves other layouts' checkpoints alone instead of logging a traceback."""
    import json
    import logging

    from backend.projects import Projects

    projects = Projects(tmp_path)
    state = projects.state(3)
    version = state.next_version()
    state.commit_version(
        version, lambda directory: (directory / "metadata.json").write_text(json.dumps({"kind": "vlm-al-multilabel"})),
        "schema", {},
    )
    with caplog.at_level(logging.ERROR):
        model, served = projects.served_model(3, None)
    assert model is None and served == version
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
