import json
import time

import numpy as np
import pytest

from model.errors import ModelInputError
from model.finegrained import (
    METADATA_FILE,
    WEIGHTS_FILE,
    FineGrainedClassifier,
    TrainingConfig,
    select_training_config,
    stratified_folds,
)
from model.hierarchy import MISSING_LABEL, LabelHierarchy

HIERARCHY = LabelHierarchy.from_groups({"a": ["a0", "a1"], "b": ["b0", "b1"], "c": ["c0", "c1"], "d": ["d0", "d1"]})
DIM = 16
N_PER_CLASS = 300
N_TRAIN = 1600
# Coarse 0 is answered as coarse 1 most of the time: a systematic flip that only a noise model can undo.
FLIPPING_TRANSITION = np.array(
    [[0.3, 0.7, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def fine_blobs(seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs per fine class; fine classes of one coarse group lie near their group's centre."""
    rng = np.random.default_rng(seed)
    coarse_centres = rng.normal(size=(HIERARCHY.n_coarse, DIM)) * 2.0
    fine_centres = coarse_centres[HIERARCHY.parent_array] + rng.normal(size=(HIERARCHY.n_fine, DIM)) * 1.5
    fine = np.repeat(np.arange(HIERARCHY.n_fine), N_PER_CLASS)
    embeddings = fine_centres[fine] + rng.normal(size=(fine.size, DIM)) * spread
    return embeddings.astype(np.float32), fine


def scarce_label_split(seed: int, spread: float, transition: np.ndarray | None = None) -> dict:
    """One full label per fine class; every other training sample has a weak coarse label drawn from
    ``transition`` (clean when None)."""
    embeddings, fine = fine_blobs(seed, spread)
    rng = np.random.default_rng(seed + 100)
    order = rng.permutation(fine.size)
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    full = np.array([train[fine[train] == k][0] for k in range(HIERARCHY.n_fine)])
    fine_labels = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    fine_labels[full] = fine[full]
    weak = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    true_coarse = HIERARCHY.parent_array[fine[train]]
    if transition is None:
        weak[train] = true_coarse
    else:
        weak[train] = [rng.choice(HIERARCHY.n_coarse, p=transition[c]) for c in true_coarse]
    weak[full] = MISSING_LABEL
    return {"embeddings": embeddings, "fine": fine, "fine_labels": fine_labels, "weak": weak, "test": test}


def fine_accuracy(classifier: FineGrainedClassifier, data: dict) -> float:
    predicted = classifier.predict_fine_proba(data["embeddings"][data["test"]]).argmax(axis=1)
    return float(np.mean(predicted == data["fine"][data["test"]]))


def config(**overrides) -> TrainingConfig:
    return TrainingConfig(num_threads=1, **overrides)


@pytest.mark.parametrize("variant", ["fine-only", "reference", "hierarchical"])
def test_learns_separable_data(variant: str) -> None:
    embeddings, fine = fine_blobs(0, spread=0.5)
    rng = np.random.default_rng(1)
    labelled = rng.permutation(fine.size)[:200]
    fine_labels = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    fine_labels[labelled] = fine[labelled]
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config(variant=variant)).fit(embeddings, fine_labels)

    fine_proba = classifier.predict_fine_proba(embeddings)
    coarse_proba = classifier.predict_coarse_proba(embeddings)
    assert fine_proba.dtype == np.float32 and fine_proba.shape == (fine.size, HIERARCHY.n_fine)
    assert coarse_proba.shape == (fine.size, HIERARCHY.n_coarse)
    np.testing.assert_allclose(fine_proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(coarse_proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(fine_proba.argmax(axis=1) == fine) > 0.95
    assert np.mean(coarse_proba.argmax(axis=1) == HIERARCHY.parent_array[fine]) > 0.95


@pytest.mark.parametrize("seed", [0, 1])
def test_hierarchical_turns_weak_labels_into_fine_accuracy(seed: int) -> None:
    data = scarce_label_split(seed, spread=2.5)
    args = (data["embeddings"], data["fine_labels"], data["weak"])
    fine_only = FineGrainedClassifier(HIERARCHY, DIM, config(variant="fine-only")).fit(*args)
    reference = FineGrainedClassifier(HIERARCHY, DIM, config(variant="reference")).fit(*args)
    hierarchical = FineGrainedClassifier(HIERARCHY, DIM, config(variant="hierarchical")).fit(*args)

    assert fine_accuracy(hierarchical, data) > fine_accuracy(fine_only, data) + 0.05
    # The reference's fine head never sees weak labels with a frozen encoder.
    assert abs(fine_accuracy(reference, data) - fine_accuracy(fine_only, data)) < 0.02


@pytest.mark.parametrize("variant", ["reference", "hierarchical"])
def test_forward_correction_undoes_a_systematic_flip(variant: str) -> None:
    data = scarce_label_split(0, spread=1.0, transition=FLIPPING_TRANSITION)
    args = (data["embeddings"], data["fine_labels"], data["weak"], FLIPPING_TRANSITION)
    plain = FineGrainedClassifier(HIERARCHY, DIM, config(variant=variant, use_transition=False)).fit(*args)
    corrected = FineGrainedClassifier(HIERARCHY, DIM, config(variant=variant, use_transition=True)).fit(*args)

    test = data["test"]
    true_coarse = HIERARCHY.parent_array[data["fine"][test]]

    def coarse_accuracy(classifier: FineGrainedClassifier) -> float:
        return float(np.mean(classifier.predict_coarse_proba(data["embeddings"][test]).argmax(axis=1) == true_coarse))

    assert coarse_accuracy(corrected) > coarse_accuracy(plain) + 0.05
    assert coarse_accuracy(corrected) > 0.97
    if variant == "hierarchical":
        assert fine_accuracy(corrected, data) > fine_accuracy(plain, data) + 0.05


def test_human_coarse_labels_train_the_hierarchical_fine_head() -> None:
    data = scarce_label_split(1, spread=2.5)
    fine_only = FineGrainedClassifier(HIERARCHY, DIM, config(variant="fine-only")).fit(
        data["embeddings"], data["fine_labels"]
    )
    with_human_coarse = FineGrainedClassifier(HIERARCHY, DIM, config(variant="hierarchical")).fit(
        data["embeddings"], data["fine_labels"], human_coarse_labels=data["weak"]
    )
    assert fine_accuracy(with_human_coarse, data) > fine_accuracy(fine_only, data) + 0.05


def test_same_seed_gives_identical_probabilities() -> None:
    data = scarce_label_split(0, spread=2.5)
    args = (data["embeddings"], data["fine_labels"], data["weak"], FLIPPING_TRANSITION)
    # A batch smaller than the weak set exercises the seeded shuffling of chunks too.
    first = FineGrainedClassifier(HIERARCHY, DIM, config(seed=3, batch_size=500)).fit(*args)
    second = FineGrainedClassifier(HIERARCHY, DIM, config(seed=3, batch_size=500)).fit(*args)
    other = FineGrainedClassifier(HIERARCHY, DIM, config(seed=4, batch_size=500)).fit(*args)
    np.testing.assert_array_equal(
        first.predict_fine_proba(data["embeddings"]), second.predict_fine_proba(data["embeddings"])
    )
    assert not np.array_equal(first.predict_fine_proba(data["embeddings"]), other.predict_fine_proba(data["embeddings"]))


def test_single_fine_class_in_labels_still_trains() -> None:
    embeddings, fine = fine_blobs(0, spread=0.5)
    fine_labels = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    fine_labels[:3] = fine[:3]
    assert len(set(fine_labels[:3].tolist())) == 1
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config()).fit(embeddings, fine_labels)
    proba = classifier.predict_fine_proba(embeddings)
    assert np.all(np.isfinite(proba))
    assert np.all(proba.argmax(axis=1) == fine[0])


def test_normalisation_lives_inside_the_model() -> None:
    embeddings, fine = fine_blobs(0, spread=0.5)
    fine_labels = fine.copy()
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config()).fit(embeddings, fine_labels)
    np.testing.assert_allclose(
        classifier.predict_fine_proba(embeddings[:20] * 7.0), classifier.predict_fine_proba(embeddings[:20]), atol=1e-5
    )


@pytest.mark.parametrize("variant", ["fine-only", "reference", "hierarchical"])
def test_save_load_round_trip(tmp_path, variant: str) -> None:
    data = scarce_label_split(0, spread=2.5)
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config(variant=variant)).fit(
        data["embeddings"], data["fine_labels"], data["weak"], FLIPPING_TRANSITION
    )
    target = tmp_path / "checkpoint"
    classifier.save(target)
    classifier.save(target)  # replacing an existing checkpoint works too
    assert sorted(p.name for p in target.iterdir()) == sorted([WEIGHTS_FILE, METADATA_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no staging leftovers

    loaded = FineGrainedClassifier.load(target, expected_hierarchy=HIERARCHY)
    assert loaded.config == classifier.config and loaded.hierarchy == HIERARCHY
    x = data["embeddings"][:50]
    np.testing.assert_array_equal(loaded.predict_fine_proba(x), classifier.predict_fine_proba(x))
    np.testing.assert_array_equal(loaded.predict_coarse_proba(x), classifier.predict_coarse_proba(x))


def test_load_rejects_mismatching_checkpoints(tmp_path) -> None:
    data = scarce_label_split(0, spread=2.5)
    target = tmp_path / "checkpoint"
    FineGrainedClassifier(HIERARCHY, DIM, config()).fit(data["embeddings"], data["fine_labels"]).save(target)
    metadata = json.loads((target / METADATA_FILE).read_text())

    other = LabelHierarchy.from_groups({"x": ["a0", "a1", "b0", "b1"], "y": ["c0", "c1", "d0", "d1"]})
    with pytest.raises(ModelInputError, match="another label hierarchy"):
        FineGrainedClassifier.load(target, expected_hierarchy=other)

    (target / METADATA_FILE).write_text(json.dumps({**metadata, "embedding_dim": DIM + 1}))
    with pytest.raises(ModelInputError, match="do not match its metadata"):
        FineGrainedClassifier.load(target)

    (target / METADATA_FILE).write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(ModelInputError, match="format version"):
        FineGrainedClassifier.load(target)

    with pytest.raises(ModelInputError, match="cannot read checkpoint metadata"):
        FineGrainedClassifier.load(tmp_path / "missing")


def test_unfitted_classifier_refuses_to_predict_or_save(tmp_path) -> None:
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config())
    with pytest.raises(ModelInputError, match="not fitted"):
        classifier.predict_fine_proba(np.zeros((1, DIM), dtype=np.float32))
    with pytest.raises(ModelInputError, match="not fitted"):
        classifier.save(tmp_path / "x")


def _bad_fit_inputs() -> list:
    x = np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, -1, -1, -1, -1, -1, -1])
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    bad_rows = np.full((4, 4), 0.25)
    bad_rows[0] = [0.5, 0.5, 0.5, 0.0]
    return [
        ((nan_x, labels), {}, "NaN or inf in rows \\[3\\]"),
        ((x[:, :5], labels), {}, "shape \\(n, 16\\)"),
        ((x, labels[:5]), {}, "fine_labels must have shape"),
        ((x, np.where(labels == 3, 8, labels)), {}, "fine_labels has indices outside"),
        ((x, np.full(10, -1)), {}, "no full"),
        ((x, labels), {"weak_coarse_labels": np.full(10, 4)}, "weak_coarse_labels has indices outside"),
        ((x, labels), {"human_coarse_labels": np.zeros(3, dtype=np.int64)}, "human_coarse_labels must have shape"),
        ((x, labels), {"coarse_transition_matrix": np.eye(3)}, "shape \\(4, 4\\)"),
        ((x, labels), {"coarse_transition_matrix": bad_rows}, "rows \\[0\\] sum to"),
        ((x, labels.astype(np.float64)), {}, "integer class indices"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "message"), _bad_fit_inputs())
def test_bad_fit_input_raises(args, kwargs, message) -> None:
    with pytest.raises(ModelInputError, match=message):
        FineGrainedClassifier(HIERARCHY, DIM, config(epochs=2)).fit(*args, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variant": "two-heads"}, "unknown variant"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weak_loss_weight": -1.0}, "weak_loss_weight"),
        ({"num_threads": 0}, "num_threads"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_config_raises(overrides, message) -> None:
    with pytest.raises(ModelInputError, match=message):
        TrainingConfig(**overrides)


def test_stratified_folds_spread_every_class() -> None:
    labels = np.repeat(np.arange(4), [6, 6, 3, 1])
    folds = stratified_folds(labels, 3, np.random.default_rng(0))
    for label in (0, 1):
        assert np.bincount(folds[labels == label], minlength=3).tolist() == [2, 2, 2]
    assert np.bincount(folds, minlength=3).max() - np.bincount(folds, minlength=3).min() <= 1


def test_select_training_config_prefers_a_config_that_learns() -> None:
    embeddings, fine = fine_blobs(0, spread=1.0)
    rng = np.random.default_rng(0)
    labelled = rng.permutation(fine.size)[:60]
    fine_labels = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    fine_labels[labelled] = fine[labelled]
    base = config(epochs=30)
    candidates = {"learning_rate": [1e-7, 0.05], "weak_loss_weight": [0.5]}

    chosen = select_training_config(HIERARCHY, embeddings, fine_labels, None, None, base, candidates)
    again = select_training_config(HIERARCHY, embeddings, fine_labels, None, None, base, candidates)
    assert chosen.learning_rate == 0.05 and chosen == again
    assert chosen.epochs == 30

    with pytest.raises(ModelInputError, match="unknown TrainingConfig fields"):
        select_training_config(HIERARCHY, embeddings, fine_labels, None, None, base, {"lr": [0.1]})
    with pytest.raises(ModelInputError, match="n_folds"):
        select_training_config(HIERARCHY, embeddings, fine_labels, None, None, base, candidates, n_folds=1)


def test_fit_speed_is_loosely_bounded() -> None:
    """The 2 s target is measured by bench/fit_speed.py; this only catches an order-of-magnitude regression."""
    rng = np.random.default_rng(0)
    n_weak, n_full, dim = 10_000, 1_000, 1280
    hierarchy = LabelHierarchy.from_groups(
        {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1"], "d": ["d0", "d1"]}
    )
    embeddings = rng.normal(size=(n_weak + n_full, dim)).astype(np.float32)
    fine_labels = np.full(n_weak + n_full, MISSING_LABEL, dtype=np.int64)
    fine_labels[:n_full] = rng.integers(0, hierarchy.n_fine, n_full)
    weak = rng.integers(0, hierarchy.n_coarse, n_weak + n_full)
    start = time.process_time()
    FineGrainedClassifier(hierarchy, dim, config()).fit(embeddings, fine_labels, weak, np.eye(4))
    assert time.process_time() - start <= 6.0


def test_config_from_numpy_values_serialises_and_round_trips() -> None:
    chosen = TrainingConfig(epochs=np.int64(20), learning_rate=np.float32(0.1), num_threads=np.int64(1))
    data = json.loads(json.dumps(chosen.to_dict()))
    assert TrainingConfig.from_dict(data) == chosen
    assert isinstance(chosen.epochs, int) and isinstance(chosen.learning_rate, float)
    with pytest.raises(ModelInputError, match="unknown training config fields"):
        TrainingConfig.from_dict({**data, "momentum": 0.9})


def test_cross_validation_hides_every_label_of_held_out_samples(monkeypatch) -> None:
    """A held-out sample's weak label must not reach training: here it would give the answer away."""
    embeddings, fine = fine_blobs(0, spread=1.0)
    fine_labels = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    fine_labels[::40] = fine[::40]
    weak = np.full(fine.size, MISSING_LABEL, dtype=np.int64)
    weak[::40] = HIERARCHY.parent_array[fine[::40]]
    seen: list[np.ndarray] = []

    class Recording(FineGrainedClassifier):
        def fit(self, embeddings, fine_labels, weak_coarse_labels=None, *args, **kwargs):
            seen.append((fine_labels != MISSING_LABEL) | (weak_coarse_labels != MISSING_LABEL))
            return super().fit(embeddings, fine_labels, weak_coarse_labels, *args, **kwargs)

    monkeypatch.setattr("model.finegrained.FineGrainedClassifier", Recording)
    select_training_config(
        HIERARCHY, embeddings, fine_labels, weak, None, config(epochs=5), {"learning_rate": [0.01, 0.05]}
    )
    assert len(seen) == 6
    labelled = np.flatnonzero(fine_labels != MISSING_LABEL)
    for used in seen:
        assert 0 < used[labelled].sum() < labelled.size
