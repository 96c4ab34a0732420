import json

import numpy as np
import pytest

from model.errors import HierarchyError, UnknownClassError
from model.hierarchy import MISSING_LABEL, LabelHierarchy

GROUPS = {"Warbler": ["Cape May Warbler", "Yellow Warbler"], "Sparrow": ["House Sparrow"]}


def test_from_groups_builds_indices_and_membership():
    h = LabelHierarchy.from_groups(GROUPS)
    assert h.fine_classes == ("Cape May Warbler", "Yellow Warbler", "House Sparrow")
    assert h.coarse_classes == ("Warbler", "Sparrow")
    assert h.parent_of_fine == (0, 0, 1)
    assert h.parent_name("House Sparrow") == "Sparrow"
    assert h.children("Warbler") == ("Cape May Warbler", "Yellow Warbler")
    np.testing.assert_array_equal(h.fine_to_coarse_matrix, [[1, 0], [1, 0], [0, 1]])
    fine_probs = np.array([[0.2, 0.3, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(fine_probs @ h.fine_to_coarse_matrix, [[0.5, 0.5]])


def test_coarse_of_fine_labels_keeps_missing():
    h = LabelHierarchy.from_groups(GROUPS)
    np.testing.assert_array_equal(h.coarse_of_fine_labels(np.array([2, MISSING_LABEL, 0])), [1, MISSING_LABEL, 0])
    with pytest.raises(UnknownClassError):
        h.coarse_of_fine_labels(np.array([3]))


def test_unknown_class_names_raise_clear_errors():
    h = LabelHierarchy.from_groups(GROUPS)
    with pytest.raises(UnknownClassError, match="unknown fine class 'Robin'"):
        h.fine_index("Robin")
    with pytest.raises(UnknownClassError, match="unknown coarse class 'Finch'"):
        h.coarse_index("Finch")


@pytest.mark.parametrize(
    "parent_map, message",
    [
        ({}, "empty"),
        ({"A": "X", "B": ""}, "without a parent"),
        ({"A": "X"}, "at least 2 fine classes"),
    ],
)
def test_bad_parent_maps(parent_map, message):
    with pytest.raises(HierarchyError, match=message):
        LabelHierarchy.from_parent_map(parent_map)


def test_duplicates_and_childless_coarse_are_rejected():
    with pytest.raises(HierarchyError, match="two coarse classes"):
        LabelHierarchy.from_groups({"X": ["a", "b"], "Y": ["a"]})
    with pytest.raises(HierarchyError, match="without any fine class"):
        LabelHierarchy.from_parent_map({"a": "X", "b": "X"}, coarse_order=["X", "Y"])


def test_json_file_must_cover_every_fine_class(tmp_path):
    path = tmp_path / "parents.json"
    path.write_text(json.dumps({"a": "X", "b": "Y"}))
    assert LabelHierarchy.from_json_file(path, fine_classes=["b", "a"]).fine_classes == ("b", "a")
    with pytest.raises(HierarchyError, match=r"without a parent: \['c'\]"):
        LabelHierarchy.from_json_file(path, fine_classes=["a", "b", "c"])
    path.write_text("[1, 2]")
    with pytest.raises(HierarchyError, match="expected a JSON object"):
        LabelHierarchy.from_json_file(path)


def test_dict_round_trip():
    h = LabelHierarchy.from_groups(GROUPS)
    assert LabelHierarchy.from_dict(json.loads(json.dumps(h.to_dict()))) == h


def test_validated_label_array_checks_shape_dtype_and_range():
    from model.errors import ModelInputError
    from model.hierarchy import validated_label_array

    np.testing.assert_array_equal(validated_label_array("y", [0, MISSING_LABEL, 2], 3), [0, -1, 2])
    with pytest.raises(ModelInputError, match=r"y has indices outside \[0, 3\).*\[3\]"):
        validated_label_array("y", [0, 3], 3)
    with pytest.raises(ModelInputError, match=r"y must have shape \(3,\)"):
        validated_label_array("y", [0, 1], 3, n_samples=3)
    with pytest.raises(ModelInputError, match="integer class indices"):
        validated_label_array("y", [0.5, 1.0], 3)
    with pytest.raises(ModelInputError, match="1-d"):
        validated_label_array("y", [[0, 1]], 3)
