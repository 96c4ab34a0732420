import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.label_interface import LabelInterface

from backend.label_config import (
    RECOMMENDED_FASHION_MNIST_CONFIG,
    AnnotationLabels,
    LabelConfigError,
    LabelLayout,
    annotation_to_labels,
    build_prediction,
    parse_label_config,
    recommended_label_config,
    task_labels,
)
from model.errors import UnknownClassError
from model.hierarchy import LabelHierarchy

BIRD_GROUPS = {
    "Warbler": ["Cape May Warbler", "Yellow Warbler"],
    "Sparrow": ["House Sparrow", "Song Sparrow"],
}
BIRD_PARENTS = {fine: coarse for coarse, fines in BIRD_GROUPS.items() for fine in fines}
FASHION_GROUPS = {
    "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    "bottoms and dresses": ["Trouser", "Dress"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bags": ["Bag"],
}

# The layout seen to work in the browser (LABEL_STUDIO_UI.md), written by hand rather than generated.
RECOMMENDED_XML = """
<View>
  <Image name="img" value="$photo"/>
  <Header value="Coarse (model)"/>
  <Choices name="group" toName="img" choice="single" showInline="true">
    <Choice value="Warbler"/><Choice value="Sparrow"/>
  </Choices>
  <View visibleWhen="choice-selected" whenTagName="group" whenChoiceValue="Warbler">
    <Header value="Warbler species"/>
    <Choices name="fine_warbler" toName="img" choice="single" required="true">
      <Choice value="Cape May Warbler"/><Choice value="Yellow Warbler"/>
    </Choices>
  </View>
  <View visibleWhen="choice-selected" whenTagName="group" whenChoiceValue="Sparrow">
    <Header value="Sparrow species"/>
    <Choices name="fine_sparrow" toName="img" choice="single" required="true">
      <Choice value="House Sparrow"/><Choice value="Song Sparrow"/>
    </Choices>
  </View>
  <TextArea name="comment" toName="img"/>
</View>
"""

TAXONOMY_XML = """
<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true" maxUsages="1">
    <Choice value="Warbler">
      <Choice value="Cape May Warbler"/><Choice value="Yellow Warbler"/>
    </Choice>
    <Choice value="Sparrow">
      <Choice value="House Sparrow"/><Choice value="Song Sparrow"/>
    </Choice>
  </Taxonomy>
</View>
"""

DEEP_TAXONOMY_XML = """
<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="tree" toName="image">
    <Choice value="Animals">
      <Choice value="Birds">
        <Choice value="Warbler"><Choice value="Cape May Warbler"/><Choice value="Yellow Warbler"/></Choice>
        <Choice value="Sparrow"><Choice value="House Sparrow"/></Choice>
      </Choice>
      <Choice value="Cats">
        <Choice value="Big cats"><Choice value="Lion"/><Choice value="Tiger"/></Choice>
      </Choice>
    </Choice>
  </Taxonomy>
</View>
"""

TWO_CHOICES_XML = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="species" toName="image"><Choice value="House Sparrow"/><Choice value="Cape May Warbler"/>
    <Choice value="Song Sparrow"/><Choice value="Yellow Warbler"/></Choices>
  <Choices name="kind" toName="image"><Choice value="Sparrow"/><Choice value="Warbler"/></Choices>
</View>
"""

FLAT_XML = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image">
    <Choice value="Cape May Warbler"/><Choice value="Yellow Warbler"/>
    <Choice value="House Sparrow"/><Choice value="Song Sparrow"/>
  </Choices>
</View>
"""


@pytest.fixture(scope="module")
def recommended():
    return parse_label_config(RECOMMENDED_XML)


@pytest.fixture(scope="module")
def taxonomy():
    return parse_label_config(TAXONOMY_XML)


@pytest.fixture(scope="module")
def two_choices():
    return parse_label_config(TWO_CHOICES_XML, parent_map=BIRD_PARENTS)


@pytest.fixture(scope="module")
def flat():
    return parse_label_config(FLAT_XML, parent_map=BIRD_PARENTS)


def labelings():
    """One parsed config per layout, with a deeper Taxonomy too."""
    return {
        "recommended": parse_label_config(RECOMMENDED_XML),
        "taxonomy": parse_label_config(TAXONOMY_XML),
        "deep-taxonomy": parse_label_config(DEEP_TAXONOMY_XML, coarse_level=3),
        "two-choices": parse_label_config(TWO_CHOICES_XML, parent_map=BIRD_PARENTS),
        "flat": parse_label_config(FLAT_XML, parent_map=BIRD_PARENTS),
    }


def choice(from_name, value, origin="manual", to_name="image"):
    item = {"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [value]}}
    if origin is not None:
        item["origin"] = origin
    return item


def taxonomy_item(*paths, origin="manual", from_name="taxonomy"):
    return {"from_name": from_name, "to_name": "image", "type": "taxonomy",
            "value": {"taxonomy": [list(p) for p in paths]}, "origin": origin}


# --------------------------------------------------------------------------------------------------------------
# Parsing


def test_recommended_layout_reads_the_hierarchy_from_the_visible_when_groups(recommended):
    assert recommended.layout is LabelLayout.RECOMMENDED
    assert recommended.hierarchy == LabelHierarchy.from_groups(BIRD_GROUPS)
    assert recommended.image_name == "img"
    assert recommended.image_value_key == "photo"
    assert recommended.coarse_control == "group"
    assert dict(recommended.fine_control_by_coarse) == {"Warbler": "fine_warbler", "Sparrow": "fine_sparrow"}


def test_recommended_layout_ignores_a_parent_map_because_the_config_holds_the_hierarchy():
    labeling = parse_label_config(RECOMMENDED_XML, parent_map={"Cape May Warbler": "Other"})
    assert labeling.hierarchy == LabelHierarchy.from_groups(BIRD_GROUPS)


def test_recommended_groups_may_sit_on_the_choices_tag_itself():
    xml = """<View><Image name="image" value="$image"/>
      <Choices name="coarse" toName="image"><Choice value="A"/><Choice value="B"/></Choices>
      <Choices name="fa" toName="image" visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="A">
        <Choice value="a1"/><Choice value="a2"/></Choices>
      <View><View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="B">
        <Choices name="fb" toName="image"><Choice value="b1"/></Choices></View></View>
    </View>"""
    labeling = parse_label_config(xml)
    assert labeling.hierarchy == LabelHierarchy.from_groups({"A": ["a1", "a2"], "B": ["b1"]})
    assert dict(labeling.fine_control_by_coarse) == {"A": "fa", "B": "fb"}


def test_taxonomy_top_level_is_coarse_and_leaves_are_fine(taxonomy):
    assert taxonomy.layout is LabelLayout.TAXONOMY
    assert taxonomy.hierarchy == LabelHierarchy.from_groups(BIRD_GROUPS)
    assert taxonomy.taxonomy_control == "taxonomy"
    assert taxonomy.taxonomy_path_of_fine["Song Sparrow"] == ("Sparrow", "Song Sparrow")
    assert taxonomy.taxonomy_path_of_coarse["Warbler"] == ("Warbler",)


@pytest.mark.parametrize(
    ("coarse_level", "groups"),
    [
        (1, {"Animals": ["Cape May Warbler", "Yellow Warbler", "House Sparrow", "Lion", "Tiger"]}),
        (2, {"Birds": ["Cape May Warbler", "Yellow Warbler", "House Sparrow"], "Cats": ["Lion", "Tiger"]}),
        (3, {"Warbler": ["Cape May Warbler", "Yellow Warbler"], "Sparrow": ["House Sparrow"],
             "Big cats": ["Lion", "Tiger"]}),
    ],
)
def test_deeper_taxonomy_takes_the_coarse_classes_at_the_configured_level(coarse_level, groups):
    labeling = parse_label_config(DEEP_TAXONOMY_XML, coarse_level=coarse_level)
    assert labeling.hierarchy == LabelHierarchy.from_groups(groups)
    assert labeling.taxonomy_path_of_fine["Lion"] == ("Animals", "Cats", "Big cats", "Lion")
    assert labeling.taxonomy_path_of_coarse[list(groups)[-1]] == ("Animals", "Cats", "Big cats")[:coarse_level]


def test_two_choices_tells_coarse_from_fine_with_the_parent_map(two_choices):
    assert two_choices.layout is LabelLayout.TWO_CHOICES
    # the fine <Choices> comes first in this config; the parent map says which is which
    assert (two_choices.coarse_control, two_choices.fine_control) == ("kind", "species")
    assert two_choices.hierarchy.coarse_classes == ("Sparrow", "Warbler")
    assert two_choices.hierarchy.fine_classes == ("House Sparrow", "Cape May Warbler", "Song Sparrow",
                                                  "Yellow Warbler")
    assert two_choices.hierarchy.parent_name("Yellow Warbler") == "Warbler"


def test_two_choices_with_explicit_control_names():
    labeling = parse_label_config(
        TWO_CHOICES_XML, parent_map=BIRD_PARENTS, coarse_control="kind", fine_control="species"
    )
    assert (labeling.coarse_control, labeling.fine_control) == ("kind", "species")


def test_flat_choices_take_coarse_classes_from_the_parent_map(flat):
    assert flat.layout is LabelLayout.FLAT_CHOICES
    assert flat.fine_control == "label"
    assert flat.coarse_control is None
    assert flat.hierarchy == LabelHierarchy.from_groups(BIRD_GROUPS)


def test_the_taxonomy_wins_detection_over_stray_choices_and_the_named_control_overrides_it():
    xml = TAXONOMY_XML.replace("</View>", '<Choices name="quality" toName="image"><Choice value="ok"/>'
                                          "</Choices></View>")
    assert parse_label_config(xml).layout is LabelLayout.TAXONOMY
    with pytest.raises(LabelConfigError, match="parent map"):
        parse_label_config(xml, fine_control="quality")


def test_a_conditional_view_without_choices_is_not_taken_for_a_fine_group():
    xml = TAXONOMY_XML.replace("</View>", """
      <Choices name="quality" toName="image"><Choice value="ok"/><Choice value="bad"/></Choices>
      <View visibleWhen="choice-selected" whenTagName="quality" whenChoiceValue="bad">
        <TextArea name="why" toName="image"/></View></View>""")
    labeling = parse_label_config(xml)
    assert labeling.layout is LabelLayout.TAXONOMY
    assert labeling.image_key == labeling.image_value_key == "image"


def _bad(xml_body: str) -> str:
    return f"<View>{xml_body}</View>"


IMAGE = '<Image name="image" value="$image"/>'
CHOICES_AB = '<Choices name="coarse" toName="image"><Choice value="A"/><Choice value="B"/></Choices>'


@pytest.mark.parametrize(
    ("xml", "kwargs", "fragments"),
    [
        pytest.param("<View><Image name='image' value='$image'>", {}, ["not valid XML"], id="not-xml"),
        pytest.param("   ", {}, ["empty"], id="empty"),
        pytest.param(
            _bad('<Text name="text" value="$text"/><Choices name="c" toName="text"><Choice value="x"/></Choices>'),
            {"parent_map": {"x": "X"}}, ["no <Image>", '<Text name="text">'], id="no-image",
        ),
        pytest.param(_bad(IMAGE + '<TextArea name="notes" toName="image"/>'), {},
                     ["no <Choices> or <Taxonomy>", '<TextArea name="notes">'], id="no-class-control"),
        pytest.param(
            _bad(IMAGE + '<Text name="caption" value="$caption"/>'
                 '<Choices name="label" toName="caption"><Choice value="x"/><Choice value="y"/></Choices>'),
            {"parent_map": {"x": "X", "y": "X"}}, ['<Choices name="label">', 'toName="caption"', "not an <Image>"],
            id="control-not-on-image",
        ),
        pytest.param(TWO_CHOICES_XML, {}, ["two <Choices>", '<Choices name="species">', '<Choices name="kind">',
                                           "no parent map"], id="two-choices-no-map"),
        pytest.param(FLAT_XML, {}, ['<Choices name="label">', "no parent map"], id="flat-no-map"),
        pytest.param(
            TWO_CHOICES_XML, {"parent_map": {**BIRD_PARENTS, "Song Sparrow": "Finch"}},
            ['<Choices name="kind">', "Finch"], id="parent-not-a-coarse-choice",
        ),
        pytest.param(
            TWO_CHOICES_XML, {"parent_map": {k: v for k, v in BIRD_PARENTS.items() if k != "Song Sparrow"}},
            ['<Choices name="species">', "without a parent", "Song Sparrow"], id="fine-choice-without-parent",
        ),
        pytest.param(
            FLAT_XML, {"parent_map": {"Cape May Warbler": "Warbler"}},
            ['<Choices name="label">', "without a parent", "House Sparrow"], id="flat-choice-without-parent",
        ),
        pytest.param(
            RECOMMENDED_XML.replace('whenChoiceValue="Sparrow"', 'whenChoiceValue="Finch"'), {},
            ['whenChoiceValue="Finch"', "not a choice of", '<Choices name="group">'], id="group-for-unknown-value",
        ),
        pytest.param(
            _bad(IMAGE + CHOICES_AB + '<View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="A">'
                 '<Choices name="fa" toName="image"><Choice value="a1"/></Choices></View>'),
            {}, ["without a fine group", "['B']", '<Choices name="coarse">', 'whenChoiceValue="B"'],
            id="coarse-value-without-group",
        ),
        pytest.param(
            _bad(IMAGE + CHOICES_AB
                 + '<View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="A">'
                 '<Choices name="fa" toName="image"><Choice value="x"/></Choices></View>'
                 '<View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="B">'
                 '<Choices name="fb" toName="image"><Choice value="x"/></Choices></View>'),
            {}, ["'x'", "'A'", "'B'", "only one parent"], id="fine-under-two-coarse-values",
        ),
        pytest.param(
            _bad(IMAGE + CHOICES_AB
                 + '<View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="A"><Header value="a"/>'
                 "</View>"),
            {"coarse_control": "coarse"}, ['whenChoiceValue="A"', "exactly one fine <Choices>", "none"],
            id="group-without-choices",
        ),
        pytest.param(
            _bad(IMAGE + CHOICES_AB + '<View visibleWhen="choice-selected" whenTagName="coarse" whenChoiceValue="A,B">'
                 '<Choices name="fab" toName="image"><Choice value="x"/></Choices></View>'),
            {}, ['whenChoiceValue="A,B"', "several coarse values"], id="group-for-two-values",
        ),
        pytest.param(
            RECOMMENDED_XML.replace('name="fine_sparrow" toName="img" choice="single"',
                                    'name="fine_sparrow" toName="img" choice="multiple"'),
            {}, ['<Choices name="fine_sparrow">', 'choice="multiple"'], id="multiple-choice",
        ),
        pytest.param(
            TAXONOMY_XML.replace('<Choice value="Sparrow">', '<Choice value="Finch"/><Choice value="Sparrow">'),
            {}, ['<Taxonomy name="taxonomy">', "Finch", "coarse_level=1"], id="taxonomy-leaf-at-coarse-level",
        ),
        pytest.param(TAXONOMY_XML, {"coarse_level": 2}, ['<Taxonomy name="taxonomy">', "coarse_level=2"],
                     id="taxonomy-coarse-level-too-deep"),
        pytest.param(
            TAXONOMY_XML.replace('<Choice value="Song Sparrow"/>', '<Choice value="Yellow Warbler"/>'),
            {}, ['<Taxonomy name="taxonomy">', "'Yellow Warbler' appears twice"], id="taxonomy-duplicate-leaf",
        ),
        pytest.param(_bad(IMAGE + '<Taxonomy name="tax" toName="image" apiUrl="https://example.org/tree"/>'), {},
                     ['<Taxonomy name="tax">', "no <Choice>"], id="taxonomy-without-choices"),
        pytest.param(TAXONOMY_XML.replace('value="$image"', 'value="https://example.org/a.jpg"'), {},
                     ['<Image name="image">', "task data field"], id="image-value-not-a-variable"),
        pytest.param(TAXONOMY_XML, {"coarse_control": "nope"}, ['coarse_control="nope"', "no control"],
                     id="unknown-control-name"),
        pytest.param(RECOMMENDED_XML, {"coarse_control": "comment"}, ['<TextArea name="comment">'],
                     id="named-control-wrong-type"),
        pytest.param(TAXONOMY_XML, {"coarse_level": 0}, ["coarse_level"], id="coarse-level-zero"),
        pytest.param(
            '<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            '<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
            '<Choice value="&b;"/></Choices></View>',
            {"parent_map": {"x": "X"}}, ["not valid XML"], id="entity-expansion",
        ),
        pytest.param(
            _bad(IMAGE + '<Choices name="a" toName="image"><Choice value="x"/></Choices>'
                 '<Choices name="b" toName="image"><Choice value="y"/></Choices>'
                 '<Choices name="c" toName="image"><Choice value="z"/></Choices>'),
            {"parent_map": {"x": "X"}}, ["3 <Choices>", "coarse_control"], id="three-choices",
        ),
    ],
)
def test_unsupported_configs_raise_an_error_naming_the_tag_and_what_is_missing(xml, kwargs, fragments):
    with pytest.raises(LabelConfigError) as raised:
        parse_label_config(xml, **kwargs)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_label_config_error_is_a_value_error():
    assert issubclass(LabelConfigError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# The recommended layout file


def test_the_shipped_fashion_mnist_config_is_the_generated_recommended_layout():
    hierarchy = LabelHierarchy.from_groups(FASHION_GROUPS)
    assert RECOMMENDED_FASHION_MNIST_CONFIG.read_text() == recommended_label_config(hierarchy)


def test_the_shipped_config_matches_the_demo_hierarchy_of_the_model_library():
    from model.datasets import fashion_mnist_hierarchy

    demo = fashion_mnist_hierarchy()
    assert RECOMMENDED_FASHION_MNIST_CONFIG.read_text() == recommended_label_config(demo)
    parsed = parse_label_config(RECOMMENDED_FASHION_MNIST_CONFIG.read_text()).hierarchy
    # same classes and parents; the config lists fine classes group by group, so the index order differs
    parents = {f: parsed.parent_name(f) for f in parsed.fine_classes}
    assert parents == {f: demo.parent_name(f) for f in demo.fine_classes}


def test_the_fashion_mnist_config_parses_back_and_label_studio_accepts_it():
    xml = RECOMMENDED_FASHION_MNIST_CONFIG.read_text()
    LabelInterface(xml).validate()  # the schema checks Label Studio runs when a config is saved
    labeling = parse_label_config(xml)
    assert labeling.layout is LabelLayout.RECOMMENDED
    assert labeling.hierarchy == LabelHierarchy.from_groups(FASHION_GROUPS)
    assert (labeling.image_name, labeling.image_value_key, labeling.coarse_control) == ("image", "image", "coarse")
    assert dict(labeling.fine_control_by_coarse) == {
        "tops": "fine_tops", "bottoms and dresses": "fine_bottoms_and_dresses",
        "footwear": "fine_footwear", "bags": "fine_bags",
    }
    fine_tops = labeling.interface.get_control("fine_tops")
    assert fine_tops.attr["required"] == "true"
    assert '<Header value="Coarse (model)" />' in xml


def test_recommended_config_gives_colliding_group_names_unique_slugs():
    hierarchy = LabelHierarchy.from_groups({"Big cats": ["Lion"], "big-cats": ["Tiger"], "!!": ["Owl"]})
    xml = recommended_label_config(hierarchy, image_key="picture")
    labeling = parse_label_config(xml)
    assert dict(labeling.fine_control_by_coarse) == {"Big cats": "fine_big_cats", "big-cats": "fine_big_cats_2",
                                                     "!!": "fine_group"}
    assert labeling.image_value_key == "picture"


def test_recommended_config_refuses_a_comma_in_a_coarse_class_and_a_bad_image_key():
    with pytest.raises(ValueError, match="comma"):
        recommended_label_config(LabelHierarchy.from_groups({"a, b": ["x"], "c": ["y"]}))
    with pytest.raises(ValueError, match="image_key"):
        recommended_label_config(LabelHierarchy.from_groups(FASHION_GROUPS), image_key="$image")


_name = st.text(alphabet=st.sampled_from("aZ09 -/&<>\"'éü_"), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_name, st.lists(_name, min_size=1, max_size=3)), min_size=1, max_size=4))
def test_recommended_config_round_trips_any_hierarchy(groups):
    fine_seen: set[str] = set()
    coarse_seen: set[str] = set()
    clean: dict[str, list[str]] = {}
    for coarse, fines in groups:
        fines = [f for f in dict.fromkeys(fines) if f not in fine_seen]
        if coarse in coarse_seen or not fines:
            continue
        coarse_seen.add(coarse)
        fine_seen.update(fines)
        clean[coarse] = fines
    if sum(map(len, clean.values())) < 2:
        return
    hierarchy = LabelHierarchy.from_groups(clean)
    assert parse_label_config(recommended_label_config(hierarchy)).hierarchy == hierarchy


# --------------------------------------------------------------------------------------------------------------
# Annotations


def test_recommended_coarse_only_accepted_prediction_is_an_untrusted_human_coarse_label(recommended):
    accepted = {"result": [choice("group", "Warbler", origin="prediction", to_name="img")]}
    labels = annotation_to_labels(recommended, accepted)
    assert labels == AnnotationLabels(fine=None, coarse="Warbler", coarse_is_trusted=False, cancelled=False)


@pytest.mark.parametrize("origin", ["manual", "prediction-changed", None])
def test_coarse_only_label_decided_by_a_human_is_trusted(recommended, origin):
    # no origin at all: an annotation created through the API, deliberately
    labels = annotation_to_labels(recommended, {"result": [choice("group", "Sparrow", origin=origin, to_name="img")]})
    assert labels == AnnotationLabels(fine=None, coarse="Sparrow", coarse_is_trusted=True)


def test_fine_label_gives_its_parent_as_a_trusted_coarse_label(recommended):
    annotation = {"result": [choice("group", "Sparrow", origin="prediction", to_name="img"),
                             choice("fine_sparrow", "Song Sparrow", to_name="img"),
                             {"from_name": "comment", "to_name": "img", "type": "textarea",
                              "value": {"text": ["blurry"]}}]}
    assert annotation_to_labels(recommended, annotation) == AnnotationLabels("Song Sparrow", "Sparrow", True)


def test_fine_label_wins_over_a_disagreeing_coarse_choice(recommended, caplog):
    annotation = {"id": 7, "result": [choice("group", "Warbler", to_name="img"),
                                      choice("fine_sparrow", "House Sparrow", to_name="img")]}
    with caplog.at_level(logging.WARNING, logger="backend.label_config"):
        labels = annotation_to_labels(recommended, annotation)
    assert labels == AnnotationLabels("House Sparrow", "Sparrow", True)
    assert "the fine label wins" in caplog.text and "House Sparrow" in caplog.text


def test_a_stale_pick_in_a_hidden_group_gives_way_to_the_visible_group(recommended):
    annotation = {"result": [choice("group", "Warbler", to_name="img"),
                             choice("fine_sparrow", "House Sparrow", to_name="img"),
                             choice("fine_warbler", "Yellow Warbler", to_name="img")]}
    assert annotation_to_labels(recommended, annotation) == AnnotationLabels("Yellow Warbler", "Warbler", True)


def test_cancelled_annotation_is_flagged_and_carries_no_label(recommended):
    labels = annotation_to_labels(recommended, {"was_cancelled": True,
                                                "result": [choice("group", "Warbler", to_name="img")]})
    assert labels == AnnotationLabels(None, None, False, cancelled=True)


@pytest.mark.parametrize(
    "result",
    [
        [choice("group", "Finch", to_name="img")],
        [choice("fine_warbler", "Goldfinch", to_name="img")],
        [{"from_name": "group", "to_name": "img", "type": "choices", "value": {"choices": "Warbler"}}],
        [{"from_name": "group", "to_name": "img", "type": "choices", "value": None}],
        ["Warbler"],
        "Warbler",
    ],
    ids=["unknown-coarse", "unknown-fine", "choices-not-a-list", "no-value", "item-not-object", "result-not-list"],
)
def test_unknown_or_malformed_labels_skip_the_annotation_with_a_warning(recommended, caplog, result):
    with caplog.at_level(logging.WARNING, logger="backend.label_config"):
        assert annotation_to_labels(recommended, {"id": 3, "result": result}) is None
    assert "skipping annotation 3" in caplog.text


def test_an_annotation_that_is_not_an_object_is_skipped(recommended):
    assert annotation_to_labels(recommended, ["nope"]) is None


def test_empty_result_gives_no_label(recommended):
    assert annotation_to_labels(recommended, {"result": []}) == AnnotationLabels(None, None, False)


def test_taxonomy_partial_path_is_a_coarse_label_and_full_path_a_fine_label(taxonomy):
    accepted = {"result": [taxonomy_item(["Warbler"], origin="prediction")]}
    assert annotation_to_labels(taxonomy, accepted) == AnnotationLabels(None, "Warbler", False)
    changed = {"result": [taxonomy_item(["Sparrow"], origin="prediction-changed")]}
    assert annotation_to_labels(taxonomy, changed) == AnnotationLabels(None, "Sparrow", True)
    full = {"result": [taxonomy_item(["Warbler", "Cape May Warbler"], origin="prediction")]}
    assert annotation_to_labels(taxonomy, full) == AnnotationLabels("Cape May Warbler", "Warbler", True)
    # without maxUsages a click on a species adds a second path next to the coarse chip
    messy = {"result": [taxonomy_item(["Warbler"], ["Warbler", "Yellow Warbler"], origin="prediction")]}
    assert annotation_to_labels(taxonomy, messy) == AnnotationLabels("Yellow Warbler", "Warbler", True)


def test_taxonomy_path_with_the_wrong_parent_keeps_the_leaf(taxonomy, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.label_config"):
        labels = annotation_to_labels(taxonomy, {"result": [taxonomy_item(["Sparrow", "Cape May Warbler"])]})
    assert labels == AnnotationLabels("Cape May Warbler", "Warbler", True)
    assert "does not match the tree" in caplog.text


@pytest.mark.parametrize(
    "paths",
    [[["Finch"]], [["Warbler", "House"]], [["Warbler"], ["Sparrow"]], [["Cape May Warbler"], ["Song Sparrow"]]],
    ids=["unknown-node", "unknown-leaf", "two-coarse", "two-fine"],
)
def test_taxonomy_unknown_or_ambiguous_paths_are_skipped(taxonomy, paths):
    assert annotation_to_labels(taxonomy, {"result": [taxonomy_item(*paths)]}) is None


def test_deep_taxonomy_reads_the_coarse_class_at_the_configured_level():
    labeling = parse_label_config(DEEP_TAXONOMY_XML, coarse_level=2)

    def read(*path):
        return annotation_to_labels(labeling, {"result": [taxonomy_item(path, from_name="tree")]})

    assert read("Animals", "Birds", "Warbler", "Yellow Warbler") == AnnotationLabels("Yellow Warbler", "Birds", True)
    assert read("Animals", "Cats") == AnnotationLabels(None, "Cats", True)
    assert read("Animals", "Cats", "Big cats") == AnnotationLabels(None, "Cats", True)
    assert read("Animals") == AnnotationLabels(None, None, False)  # above the coarse level: no information


def test_two_choices_and_flat_annotations(two_choices, flat):
    annotation = {"result": [choice("kind", "Sparrow", origin="prediction")]}
    assert annotation_to_labels(two_choices, annotation) == AnnotationLabels(None, "Sparrow", False)
    annotation = {"result": [choice("kind", "Sparrow", origin="prediction"), choice("species", "Yellow Warbler")]}
    assert annotation_to_labels(two_choices, annotation) == AnnotationLabels("Yellow Warbler", "Warbler", True)
    annotation = {"result": [choice("label", "House Sparrow", origin="prediction")]}
    assert annotation_to_labels(flat, annotation) == AnnotationLabels("House Sparrow", "Sparrow", True)


def annotation(annotation_id, result, *, updated_at, ground_truth=False, was_cancelled=False):
    return {"id": annotation_id, "result": result, "updated_at": updated_at, "created_at": "2026-01-01T00:00:00Z",
            "ground_truth": ground_truth, "was_cancelled": was_cancelled}


def test_task_labels_prefers_ground_truth_then_the_most_recent_and_ignores_cancelled(taxonomy):
    warbler = [taxonomy_item(["Warbler", "Yellow Warbler"])]
    sparrow = [taxonomy_item(["Sparrow", "Song Sparrow"])]
    newest_cancelled = {"annotations": [
        annotation(1, warbler, updated_at="2026-03-01T10:00:00Z"),
        annotation(2, sparrow, updated_at="2026-03-02T10:00:00Z", was_cancelled=True),
    ]}
    assert task_labels(taxonomy, newest_cancelled).fine == "Yellow Warbler"
    most_recent = {"annotations": [
        annotation(1, warbler, updated_at="2026-03-02T10:00:00.5+00:00"),
        annotation(2, sparrow, updated_at="2026-03-02T10:00:00.25Z"),
    ]}
    assert task_labels(taxonomy, most_recent).fine == "Yellow Warbler"
    ground_truth = {"annotations": [
        annotation(1, warbler, updated_at="2026-03-01T10:00:00Z", ground_truth=True),
        annotation(2, sparrow, updated_at="2026-03-05T10:00:00Z"),
    ]}
    assert task_labels(taxonomy, ground_truth).fine == "Yellow Warbler"


def test_task_labels_skips_an_unreadable_annotation_and_returns_none_when_nothing_is_left(taxonomy, caplog):
    unknown = [taxonomy_item(["Finch", "Zebra Finch"])]
    warbler = [taxonomy_item(["Warbler"], origin="prediction")]
    with caplog.at_level(logging.WARNING, logger="backend.label_config"):
        only_unknown = {"annotations": [annotation(1, unknown, updated_at="2026-03-01T10:00:00Z")]}
        assert task_labels(taxonomy, only_unknown) is None
    assert "unknown taxonomy path" in caplog.text
    task = {"annotations": [annotation(1, unknown, updated_at="2026-03-02T10:00:00Z"),
                            annotation(2, warbler, updated_at="2026-03-01T10:00:00Z")]}
    assert task_labels(taxonomy, task) == AnnotationLabels(None, "Warbler", False)
    assert task_labels(taxonomy, {"annotations": []}) is None
    assert task_labels(taxonomy, {"id": 4}) is None
    assert task_labels(taxonomy, {"annotations": [annotation(1, [], updated_at="x")]}) is None
    assert task_labels(taxonomy, {"annotations": "oops"}) is None


# --------------------------------------------------------------------------------------------------------------
# Predictions


def _suggestions(labeling):
    """Every (coarse, fine) combination a server can ask for, including disagreeing and missing ones."""
    hierarchy = labeling.hierarchy
    coarse_options = [None, *hierarchy.coarse_classes]
    fine_options = [None, *hierarchy.fine_classes]
    return [(c, f) for c in coarse_options for f in fine_options]


@pytest.mark.parametrize("name", ["recommended", "taxonomy", "deep-taxonomy", "two-choices", "flat"])
def test_every_prediction_validates_and_reads_back_as_the_suggested_labels(name):
    labeling = labelings()[name]
    interface = LabelInterface(labeling.interface.config)
    hierarchy = labeling.hierarchy
    for coarse, fine in _suggestions(labeling):
        prediction = build_prediction(labeling, coarse=coarse, coarse_score=0.8, fine=fine,
                                      fine_score=0.55 if fine else None, score=0.25, model_version="v3")
        assert interface.validate_prediction(prediction, return_errors=True) == [], (coarse, fine, prediction)
        assert prediction["score"] == 0.25 and prediction["model_version"] == "v3"
        assert all(item["to_name"] == labeling.image_name and 0 <= item["score"] <= 1
                   for item in prediction["result"])

        kept_fine = fine
        if fine is not None and coarse is not None and labeling.layout is not LabelLayout.FLAT_CHOICES:
            kept_fine = fine if hierarchy.parent_name(fine) == coarse else None
        if labeling.layout is LabelLayout.FLAT_CHOICES:
            expected = (kept_fine, hierarchy.parent_name(kept_fine) if kept_fine else None)
        else:
            expected = (kept_fine, hierarchy.parent_name(kept_fine) if kept_fine else coarse)

        # The annotator submits the pre-annotation unchanged: LS marks every item origin "prediction".
        accepted = {"result": [{**item, "origin": "prediction"} for item in prediction["result"]]}
        labels = annotation_to_labels(labeling, accepted)
        assert (labels.fine, labels.coarse) == expected, (coarse, fine, prediction)
        assert labels.coarse_is_trusted == (labels.fine is not None)


def test_recommended_prediction_fills_the_coarse_choice_and_the_group_of_the_fine_suggestion(recommended):
    prediction = build_prediction(recommended, coarse="Sparrow", coarse_score=0.9, fine="Song Sparrow",
                                  fine_score=0.7, score=0.1, model_version="v1")
    assert prediction == {
        "result": [
            {"from_name": "group", "to_name": "img", "type": "choices", "value": {"choices": ["Sparrow"]},
             "score": 0.9},
            {"from_name": "fine_sparrow", "to_name": "img", "type": "choices", "value": {"choices": ["Song Sparrow"]},
             "score": 0.7},
        ],
        "score": 0.1,
        "model_version": "v1",
    }


def test_a_fine_suggestion_outside_the_vlm_coarse_class_is_dropped(recommended, two_choices, taxonomy):
    for labeling in (recommended, two_choices):
        prediction = build_prediction(labeling, coarse="Warbler", coarse_score=0.6, fine="Song Sparrow",
                                      fine_score=0.9, score=0.5, model_version="v1")
        assert [item["value"] for item in prediction["result"]] == [{"choices": ["Warbler"]}]
    prediction = build_prediction(taxonomy, coarse="Warbler", coarse_score=0.6, fine="Song Sparrow",
                                  fine_score=0.9, score=0.5, model_version="v1")
    assert prediction["result"][0]["value"] == {"taxonomy": [["Warbler"]]}


def test_without_a_vlm_answer_the_fine_suggestion_selects_its_group(recommended):
    prediction = build_prediction(recommended, coarse=None, coarse_score=0.0, fine="Yellow Warbler",
                                  fine_score=0.7, score=0.5, model_version="v1")
    assert [(item["from_name"], item["value"]["choices"], item["score"]) for item in prediction["result"]] == [
        ("group", ["Warbler"], 0.7), ("fine_warbler", ["Yellow Warbler"], 0.7)]


def test_taxonomy_predictions_use_partial_and_full_paths():
    labeling = parse_label_config(DEEP_TAXONOMY_XML, coarse_level=2)
    coarse_only = build_prediction(labeling, coarse="Cats", coarse_score=0.8, fine=None, fine_score=None,
                                   score=0.3, model_version="v1")
    assert coarse_only["result"] == [{"from_name": "tree", "to_name": "image", "type": "taxonomy",
                                      "value": {"taxonomy": [["Animals", "Cats"]]}, "score": 0.8}]
    full = build_prediction(labeling, coarse="Cats", coarse_score=0.8, fine="Tiger", fine_score=0.6,
                            score=0.3, model_version="v1")
    assert full["result"][0]["value"] == {"taxonomy": [["Animals", "Cats", "Big cats", "Tiger"]]}
    assert full["result"][0]["score"] == 0.6


def test_flat_prediction_carries_only_the_fine_suggestion(flat):
    coarse_only = build_prediction(flat, coarse="Warbler", coarse_score=0.8, fine=None, fine_score=None,
                                   score=0.3, model_version="v1")
    assert coarse_only["result"] == []
    with_fine = build_prediction(flat, coarse="Sparrow", coarse_score=0.8, fine="Yellow Warbler", fine_score=0.6,
                                 score=0.3, model_version="v1")
    assert [item["value"] for item in with_fine["result"]] == [{"choices": ["Yellow Warbler"]}]


def test_the_validator_used_above_does_reject_a_wrong_prediction(recommended):
    prediction = build_prediction(recommended, coarse="Sparrow", coarse_score=0.9, fine=None, fine_score=None,
                                  score=0.1, model_version="v1")
    prediction["result"][0]["value"] = {"choices": ["Finch"]}
    assert recommended.interface.validate_prediction(prediction, return_errors=True) != []


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"coarse": "Finch"}, UnknownClassError, "Finch"),
        ({"fine": "Zebra Finch", "fine_score": 0.5}, UnknownClassError, "Zebra Finch"),
        ({"fine": "Song Sparrow", "fine_score": None}, ValueError, "fine_score"),
        ({"score": 1.5}, ValueError, "score"),
        ({"score": float("nan")}, ValueError, "score"),
        ({"coarse_score": -0.1}, ValueError, "coarse_score"),
        ({"model_version": ""}, ValueError, "model_version"),
    ],
)
def test_build_prediction_rejects_bad_input(recommended, kwargs, error, fragment):
    arguments = {"coarse": "Sparrow", "coarse_score": 0.5, "fine": None, "fine_score": None, "score": 0.5,
                 "model_version": "v1", **kwargs}
    with pytest.raises(error, match=fragment):
        build_prediction(recommended, **arguments)
