"""model.segmentation on synthetic feature pyramids whose cells say which class covers them."""

import numpy as np
import pytest

from model.errors import ModelInputError
from model.query import STRATEGIES, LabelCosts, create_strategy
from model.segmentation import (
    CHECKPOINT_KIND,
    SEGMENTATION_STRATEGIES,
    CamClassifier,
    HeadSettings,
    SegmentationModel,
    SegmentationSettings,
    cam_masks,
    clean_mask,
    create_mask_strategy,
    mask_priority,
    mask_scores,
    mean_iou,
    self_learned_targets,
)
from model.segmentation.cam import choose_threshold
from model.segmentation.query import MaskScores, UncertainMasks
from model.spatial_features import FeaturePyramid

N_LABELS, DIM, GRID, SIDE = 3, 24, 7, 28


def synthetic(n: int, seed: int = 0):
    """Feature pyramids of n images with 1-2 rectangles of cells each, of one class: a coarse cell's features
    (7 x 7, DIM) are its class's direction plus noise; the detail stages (28 x 28 and 14 x 14, 4 channels) say
    "object or not" plus noise, and the rectangles' edges fall between coarse cells. Returns the pyramid, label
    sets and the true masks at SIDE pixels."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(N_LABELS + 1, DIM)) * 2.0
    objectness = rng.normal(size=(2, 4)) * 2.0
    coarse = np.zeros((n, GRID, GRID, DIM), dtype=np.float32)
    masks = np.zeros((n, SIDE, SIDE), dtype=np.uint8)
    for i in range(n):
        for label in rng.choice(N_LABELS, size=int(rng.integers(1, 3)), replace=False):
            top, left = rng.integers(0, SIDE - 10, size=2)
            height, width = rng.integers(8, 14, size=2)
            masks[i, top : top + height, left : left + width] = label + 1
        # a coarse cell takes the class covering most of its 4 x 4 pixels
        blocks = masks[i].reshape(GRID, SIDE // GRID, GRID, SIDE // GRID).transpose(0, 2, 1, 3).reshape(GRID, GRID, -1)
        cells = np.array([[np.bincount(b, minlength=N_LABELS + 1).argmax() for b in row] for row in blocks])
        coarse[i] = directions[cells] + rng.normal(scale=0.7, size=(GRID, GRID, DIM))
    fine = objectness[(masks > 0).astype(int)] + rng.normal(scale=0.7, size=(n, SIDE, SIDE, 4))
    middle = objectness[(masks[:, ::2, ::2] > 0).astype(int)] + rng.normal(scale=0.7, size=(n, SIDE // 2, SIDE // 2, 4))
    label_sets = np.stack([[np.any(m == k + 1) for k in range(N_LABELS)] for m in masks])
    return FeaturePyramid(coarse, (fine.astype(np.float32), middle.astype(np.float32))), label_sets, masks


@pytest.fixture(scope="module")
def both():
    return synthetic(150)


@pytest.fixture(scope="module")
def data(both):
    pyramid, label_sets, masks = both
    return pyramid.take(slice(0, 110)), label_sets[:110], masks[:110]


def test_cam_shapes_range_and_location(data):
    pyramid, label_sets, masks = data
    maps = pyramid.coarse
    classifier = CamClassifier(N_LABELS).fit(maps, label_sets)
    cams = classifier.activation_maps(maps)
    assert cams.shape == (110, N_LABELS, GRID, GRID) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    cells = masks[:, 2 :: SIDE // GRID, 2 :: SIDE // GRID]
    inside, outside = [], []
    for i in range(110):
        for k in np.flatnonzero(label_sets[i]):
            inside.append(cams[i, k][cells[i] == k + 1].mean())
            outside.append(cams[i, k][cells[i] != k + 1].mean())
    assert np.mean(inside) > np.mean(outside) + 0.3  # a class's map lights up where the class is
    probabilities = classifier.predict_proba(maps)
    assert probabilities.shape == (110, N_LABELS) and ((probabilities > 0.5) == label_sets).mean() > 0.9
    with pytest.raises(ModelInputError):
        CamClassifier(N_LABELS).activation_maps(maps)
    with pytest.raises(ModelInputError):
        CamClassifier(N_LABELS).fit(maps, label_sets[:, :2])


def test_cam_threshold_controls_the_foreground(data):
    pyramid, label_sets, masks = data
    maps = pyramid.coarse
    cams = CamClassifier(N_LABELS).fit(maps, label_sets).activation_maps(maps)
    shares = [(cam_masks(cams, label_sets, SIDE, t).masks > 0).mean() for t in (0.2, 0.4, 0.6, 0.8)]
    assert all(a >= b for a, b in zip(shares, shares[1:])) and shares[0] > shares[-1]
    pseudo = cam_masks(cams, label_sets, SIDE, 0.5)
    assert pseudo.masks.shape == (110, SIDE, SIDE) and pseudo.masks.dtype == np.uint8
    assert pseudo.margin.min() >= 0 and pseudo.margin.max() <= 1
    # only the image's labels are painted
    for i in range(110):
        painted = set(np.unique(pseudo.masks[i]).tolist()) - {0}
        assert painted <= {k + 1 for k in np.flatnonzero(label_sets[i])}
    assert mean_iou(pseudo.masks, masks, N_LABELS + 1) > 0.4
    chosen = choose_threshold(cams[:40], label_sets[:40], masks[:40])
    assert mean_iou(cam_masks(cams, label_sets, SIDE, chosen).masks, masks, N_LABELS + 1) >= \
        mean_iou(cam_masks(cams, label_sets, SIDE, 0.2).masks, masks, N_LABELS + 1) - 1e-9
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ModelInputError):
            cam_masks(cams, label_sets, SIDE, bad)


def test_cleaning_drops_specks_and_fills_holes():
    mask = np.zeros((56, 56), dtype=np.uint8)  # cleaning works at any size
    mask[10:30, 10:30] = 1
    mask[18:21, 18:21] = 0  # a hole
    mask[45, 45] = 2  # a speck
    cleaned = clean_mask(mask, 2)
    assert (cleaned[10:30, 10:30] == 1).all()
    assert not (cleaned == 2).any()


def test_masks_make_pseudo_masks_sharper_than_the_cams(data):
    """With human masks, the foreground head trained on the fine stages draws the pseudo-masks' boundaries;
    without, they are the CAMs' 7 x 7 blobs at the prior weight."""
    pyramid, label_sets, masks = data
    known = np.ones(110, dtype=bool)
    human = np.arange(6)
    others = np.arange(6, 110)
    settings = SegmentationSettings(self_learning_rounds=0, head=HeadSettings(components=16, steps=60))
    with_masks = SegmentationModel(("a", "b", "c"), settings).fit(pyramid, label_sets, known, human, masks[human])
    cam_only = SegmentationModel(("a", "b", "c"), settings).fit(pyramid, label_sets, known, human[:0],
                                                                masks[human][:0])
    sharp = mean_iou(with_masks.pool.pseudo.masks[others], masks[others], N_LABELS + 1)
    blobs = mean_iou(cam_only.pool.pseudo.masks[others], masks[others], N_LABELS + 1)
    assert sharp > blobs + 0.05, (sharp, blobs)
    assert np.allclose(cam_only.pool.pseudo.margin, 0.5)  # CAM_PRIOR_WEIGHT
    confidence = with_masks.pool.pseudo.margin
    assert confidence.min() >= 0 and confidence.max() <= 1 and confidence.std() > 0.05
    # pseudo-masks paint only the image's labels
    for i in others:
        assert set(np.unique(with_masks.pool.pseudo.masks[i]).tolist()) - {0} <= {k + 1 for k in
                                                                                 np.flatnonzero(label_sets[i])}


def test_checkpoint_round_trip(data, tmp_path):
    pyramid, label_sets, masks = data
    model = SegmentationModel(("a", "b", "c"), SegmentationSettings(head=HeadSettings(components=8, steps=10)))
    model.fit(pyramid, label_sets, np.ones(110, dtype=bool), np.arange(3), masks[:3])
    model.save(tmp_path / "v1")
    loaded = SegmentationModel.load(tmp_path / "v1")
    assert loaded.label_names == ("a", "b", "c") and loaded.settings == model.settings
    sample = pyramid.take(slice(100, 110))
    assert np.array_equal(loaded.predict(sample, 56), model.predict(sample, 56))
    assert np.allclose(loaded.predict_proba(sample, 28), model.predict_proba(sample, 28), atol=1e-6)
    assert np.allclose(loaded.label_probabilities(sample), model.label_probabilities(sample))
    import json

    assert json.loads((tmp_path / "v1" / "metadata.json").read_text())["kind"] == CHECKPOINT_KIND
    with pytest.raises(ModelInputError):  # a loaded model serves, but has no pool to choose masks from
        mask_scores(loaded, sample, np.arange(3))
    (tmp_path / "v1" / "arrays.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelInputError):
        SegmentationModel.load(tmp_path / "v1")
    with pytest.raises(ModelInputError):
        SegmentationModel.load(tmp_path / "missing")


def test_self_learning_keeps_agreement_and_weighs_disagreement():
    probabilities = np.zeros((1, 3, 1, 3), dtype=np.float32)
    probabilities[0, :, 0, 0] = [0.05, 0.9, 0.05]  # head sure of label 1, CAM agrees
    probabilities[0, :, 0, 1] = [0.05, 0.9, 0.05]  # head sure of label 1, CAM said background
    probabilities[0, :, 0, 2] = [0.1, 0.1, 0.8]  # head says label 2, which the image does not hold: a tie left
    present = np.array([[True, False]])
    cam_targets = np.array([[[1, 0, 0]]], dtype=np.uint8)
    cam_weights = np.array([[[0.5, 0.2, 0.6]]], dtype=np.float32)
    targets, weights = self_learned_targets(probabilities, present, cam_targets, cam_weights)
    assert targets[0, 0].tolist() == [1, 1, 0]  # label 2 is not allowed; background vs label 1 tie: CAM's stays
    assert weights[0, 0, 0] > 0.5  # agreement: the larger confidence
    assert weights[0, 0, 2] == pytest.approx(0.6)
    assert 0 < weights[0, 0, 1] < 1  # the head overrules a weak CAM pixel, with the difference as weight
    assert targets.dtype == np.uint8


def test_head_learns_masks_and_pseudo_masks_help_with_few(both):
    all_maps, all_label_sets, all_masks = both
    maps, label_sets, masks = all_maps.take(slice(0, 110)), all_label_sets[:110], all_masks[:110]
    test_maps, test_masks = all_maps.take(slice(110, 150)), all_masks[110:]
    known = np.ones(len(maps), dtype=bool)
    human = np.arange(3)
    settings = dict(head=HeadSettings(components=16, steps=40))
    scores = {}
    for use_pseudo in (False, True):
        model = SegmentationModel(("a", "b", "c"), SegmentationSettings(use_pseudo=use_pseudo, **settings))
        model.fit(maps, label_sets, known, human, masks[human])
        predicted = model.predict(test_maps, SIDE)
        assert predicted.shape == (40, SIDE, SIDE)
        scores[use_pseudo] = mean_iou(predicted, test_masks, N_LABELS + 1)
    assert scores[True] > 0.5 and scores[True] > scores[False]
    probabilities = model.predict_proba(test_maps.take(slice(0, 2)), 28)
    assert probabilities.shape == (2, N_LABELS + 1, 28, 28)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    with pytest.raises(ModelInputError):
        SegmentationModel(("a", "b", "c")).fit(maps, label_sets, known, human, masks[human][:, :14, :14])


def test_strategies_registry_and_selection(data):
    maps, label_sets, masks = data
    model = SegmentationModel(("a", "b", "c"), SegmentationSettings(head=HeadSettings(components=16, steps=20)))
    model.fit(maps, label_sets, np.ones(110, dtype=bool), np.arange(4), masks[:4])
    scores = mask_scores(model, maps, np.arange(4, 110))
    for values in (scores.cam_entropy, scores.disagreement, scores.boundary):
        assert values.shape == (106,) and values.min() >= 0 and values.max() <= 1
    assert {"mask-random", "mask-uncertainty", "mask-cam-entropy", "mask-disagreement",
            "mask-boundary"} == set(SEGMENTATION_STRATEGIES)
    assert set(SEGMENTATION_STRATEGIES) <= set(STRATEGIES)  # the one registry
    rng = np.random.default_rng(0)
    for name in SEGMENTATION_STRATEGIES:
        # a budget of 8.5 masks at 1 each buys 8
        picked = [s.index for s in create_strategy(name).query(scores, 8.5, LabelCosts(), rng)]
        assert len(set(picked)) == 8 and set(picked) <= set(range(4, 110))
        assert len(create_strategy(name).query(scores, 6.0, LabelCosts(human_fine=2.0), rng)) == 3
    with pytest.raises(ModelInputError):
        create_strategy("mask-nope")
    with pytest.raises(ModelInputError):  # a mask strategy reads mask scores, not another layout's pool
        create_strategy("mask-uncertainty").query(object(), 4.0, LabelCosts(), rng)
    with pytest.raises(ModelInputError):
        create_mask_strategy("margin")
    # the most uncertain image comes first; a duplicate of it is not picked next to it (diversity)
    embeddings = np.eye(6, dtype=np.float32)
    embeddings[1] = embeddings[0]
    toy = MaskScores(np.arange(6), np.zeros(6), np.array([0.9, 0.89, 0.5, 0.4, 0.3, 0.1]), np.zeros(6), embeddings)
    picked = UncertainMasks("disagreement", shortlist_factor=3).select(toy, 2, np.random.default_rng(0))
    assert picked[0] == 0 and 1 not in picked.tolist()
    priority = mask_priority(toy, np.array([3]), 8, np.array([False] * 6 + [True, True]))
    assert priority[3] == 0.0 and (priority[6:] == 1.0).all() and (priority[:6] < 1).all()


def test_mean_iou_known_values():
    truth = np.array([[0, 0, 1, 1]])
    assert mean_iou(truth, truth, 2) == 1.0
    predicted = np.array([[0, 1, 1, 1]])
    # background: 1/2, class 1: 2/3
    assert mean_iou(predicted, truth, 2) == pytest.approx((0.5 + 2 / 3) / 2)
