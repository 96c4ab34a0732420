"""The confidence the annotator reads beside the queue score (recommended layout's model_confidence TextArea)."""

from __future__ import annotations

from backend.label_config import RECOMMENDED_CONFIDENCE_NAME, parse_label_config, recommended_label_config
from backend.predictions import confidence_control_of, confidence_text
from model.hierarchy import LabelHierarchy

GROUPS = {"tops": ["T-shirt/top", "Coat"], "footwear": ["Sneaker", "Sandal"]}


def test_the_recommended_layout_has_the_confidence_text_and_other_layouts_do_not():
    labeling = parse_label_config(recommended_label_config(LabelHierarchy.from_groups(GROUPS)))
    assert confidence_control_of(labeling) == RECOMMENDED_CONFIDENCE_NAME
    assert set(labeling.fine_control_by_coarse.values()) == {"fine_tops", "fine_footwear"}
    two_choices = """<View><Image name="image" value="$image"/>
      <Choices name="coarse" toName="image"><Choice value="tops"/><Choice value="footwear"/></Choices>
      <View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="tops">
        <Choices name="fine_tops" toName="image"><Choice value="T-shirt/top"/><Choice value="Coat"/></Choices></View>
      <View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="footwear">
        <Choices name="fine_footwear" toName="image"><Choice value="Sneaker"/><Choice value="Sandal"/></Choices></View>
    </View>"""
    assert confidence_control_of(parse_label_config(two_choices)) is None


def test_confidence_text_names_each_guess_and_says_the_queue_score_is_not_a_confidence():
    text = confidence_text("footwear", 0.91, "VLM", ("Sneaker", 0.62), {"footwear", "Sneaker"}, 0.03)
    assert text.startswith("Confidence: coarse footwear 91% (VLM) · fine Sneaker 62% (model).")
    assert "Queue score 0.03 (the tab's 3.00%): lower = label sooner; it is not a confidence." in text
    below = confidence_text("footwear", 0.5, "VLM", ("Sandal", 0.3), {"footwear"}, 0.0)
    assert "fine Sandal 30% (model, not pre-filled)" in below
    assert "fine: no model yet" in confidence_text("tops", 0.8, "VLM", None, {"tops"}, 0.5)
