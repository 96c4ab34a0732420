"""The numpy FineGrainedClassifier against the torch one it replaced: the same loss and gradients (torch autograd of
the former torch loss, written out here), the same trained parameters, old checkpoints still load, and fitting and
serving never import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file as torch_save_file

from model.errors import ModelInputError
from model.finegrained import (
    _LOG_FLOOR,
    _LOG_SHIFT_FLOOR,
    METADATA_FILE,
    WEIGHTS_FILE,
    FineGrainedClassifier,
    TrainingConfig,
    _Batch,
    _batches,
    _blas_threads,
)
from model.hierarchy import MISSING_LABEL, LabelHierarchy

HIERARCHY = LabelHierarchy.from_groups({"a": ["a0", "a1", "a2"], "b": ["b0", "b1"], "c": ["c0", "c1"], "d": ["d0"]})
DIM = 12
# Coarse 0 is never answered as 2 or 3: zeros make forward-corrected probabilities underflow to the floor.
TRANSITION = np.array(
    [[0.6, 0.4, 0.0, 0.0], [0.1, 0.8, 0.1, 0.0], [0.0, 0.2, 0.7, 0.1], [0.0, 0.0, 0.3, 0.7]], dtype=np.float32
)


# ---- the torch loss the classifier used before it moved to numpy (model/finegrained.py at 14009ff) -----------------


def torch_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    shifted = (logits - logits.max(dim=1, keepdim=True).values.detach()).clamp_min(_LOG_SHIFT_FLOOR)
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def torch_loss(config: TrainingConfig, parameters: dict[str, torch.Tensor], batch: _Batch,
               transition: torch.Tensor | None) -> torch.Tensor:
    fine_to_coarse = torch.from_numpy(np.array(HIERARCHY.fine_to_coarse_matrix))
    full_x, fine_targets = (torch.from_numpy(a) for a in batch.full)
    human_x, human_targets = (torch.from_numpy(a) for a in batch.human_coarse)
    weak_x, weak_targets = (torch.from_numpy(a) for a in batch.weak)
    fine_weight, fine_bias = parameters["fine_head.weight"], parameters["fine_head.bias"]
    penalty = fine_weight.square().sum()
    if config.variant == "reference":
        coarse_weight, coarse_bias = parameters["coarse_head.weight"], parameters["coarse_head.bias"]
        penalty = penalty + coarse_weight.square().sum()
        full_logits = F.linear(full_x, torch.cat([fine_weight, coarse_weight]), torch.cat([fine_bias, coarse_bias]))
        fine_logits, full_coarse_logits = full_logits.split([HIERARCHY.n_fine, HIERARCHY.n_coarse], dim=1)
        loss = F.nll_loss(torch_log_softmax(full_coarse_logits), fine_to_coarse.argmax(dim=1)[fine_targets])

        def coarse_log_probs(x: torch.Tensor) -> torch.Tensor:
            return torch_log_softmax(F.linear(x, coarse_weight, coarse_bias))
    else:
        fine_logits = F.linear(full_x, fine_weight, fine_bias)
        loss = torch.zeros(())

        def coarse_log_probs(x: torch.Tensor) -> torch.Tensor:
            coarse = torch_log_softmax(F.linear(x, fine_weight, fine_bias)).exp() @ fine_to_coarse
            return coarse.clamp_min(_LOG_FLOOR).log()

    loss = loss + F.nll_loss(torch_log_softmax(fine_logits), fine_targets)
    if config.variant != "fine-only" and human_targets.numel():
        loss = loss + config.weak_loss_weight * F.nll_loss(coarse_log_probs(human_x), human_targets)
    if config.variant != "fine-only" and weak_targets.numel():
        weak_log_probs = coarse_log_probs(weak_x)
        if transition is not None:
            weak_log_probs = (weak_log_probs.exp() @ transition).clamp_min(_LOG_FLOOR).log()
        loss = loss + config.weak_loss_weight * F.nll_loss(weak_log_probs, weak_targets)
    return loss + 0.5 * config.weight_decay * penalty


# ---- helpers ---------------------------------------------------------------------------------------------------------


def random_batch(rng: np.random.Generator, sizes: tuple[int, int, int]) -> _Batch:
    def group(n: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((n, DIM), dtype=np.float32), rng.integers(0, n_classes, n)

    return _Batch(full=group(sizes[0], HIERARCHY.n_fine), human_coarse=group(sizes[1], HIERARCHY.n_coarse),
                  weak=group(sizes[2], HIERARCHY.n_coarse))


def random_parameters(classifier: FineGrainedClassifier, rng: np.random.Generator, scale: float) -> dict:
    return {name: (rng.standard_normal(array.shape) * scale).astype(np.float32)
            for name, array in classifier._initial_parameters().items()}


def clamps_hit(parameters: dict[str, np.ndarray], batch: _Batch, variant: str) -> tuple[bool, bool]:
    """Whether any logit of the batch lies below the shift floor, and whether any forward-corrected weak probability
    lies below the log floor."""
    head = "coarse_head" if variant == "reference" else "fine_head"
    below_shift = False
    for x, _ in (batch.full, batch.human_coarse, batch.weak):
        for name in {"fine_head", head}:
            logits = x @ parameters[f"{name}.weight"].T + parameters[f"{name}.bias"]
            below_shift |= bool(np.any(logits - logits.max(axis=1, keepdims=True) < _LOG_SHIFT_FLOOR))
    logits = torch.from_numpy(batch.weak[0] @ parameters[f"{head}.weight"].T + parameters[f"{head}.bias"])
    probs = torch_log_softmax(logits).exp().numpy()
    if variant != "reference":
        probs = probs @ HIERARCHY.fine_to_coarse_matrix
    return below_shift, bool(np.any(probs @ TRANSITION < _LOG_FLOOR))


def torch_parameters(parameters: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.copy()).requires_grad_() for name, array in parameters.items()}


# ---- tests -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fine-only", "reference", "hierarchical"])
@pytest.mark.parametrize("with_transition", [False, True])
@pytest.mark.parametrize("parameter_scale", [0.3, 40.0])
def test_loss_and_gradients_equal_torch_autograd(variant: str, with_transition: bool, parameter_scale: float) -> None:
    """At scale 40 the logits span hundreds: the shift clamp and the probability floor are both active."""
    config = TrainingConfig(variant=variant, weak_loss_weight=0.3, weight_decay=0.01)
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config)
    rng = np.random.default_rng(7)
    batch = random_batch(rng, (9, 5, 40))
    parameters = random_parameters(classifier, rng, parameter_scale)
    transition = TRANSITION if with_transition else None

    loss, gradients = classifier._loss_and_gradients(parameters, batch, transition)

    reference = torch_parameters(parameters)
    expected = torch_loss(config, reference, batch, None if transition is None else torch.from_numpy(transition))
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert sorted(gradients) == sorted(reference)
    for name, tensor in reference.items():
        assert tensor.grad is not None
        expected_gradient = tensor.grad.numpy()
        np.testing.assert_allclose(gradients[name], expected_gradient, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(expected_gradient).max())), err_msg=name)
    if parameter_scale > 1 and variant != "fine-only":
        below_shift, below_floor = clamps_hit(parameters, batch, variant)
        assert below_shift and (below_floor or not with_transition)


def fit_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, HIERARCHY.n_fine, 700)
    centres = rng.standard_normal((HIERARCHY.n_fine, DIM)) * 1.5
    embeddings = (centres[fine] + rng.standard_normal((fine.size, DIM))).astype(np.float16)
    fine_labels = np.where(rng.random(fine.size) < 0.1, fine, MISSING_LABEL)
    weak = np.where(rng.random(fine.size) < 0.8, HIERARCHY.parent_array[fine], MISSING_LABEL)
    human_coarse = np.where(rng.random(fine.size) < 0.1, HIERARCHY.parent_array[fine], MISSING_LABEL)
    return embeddings, fine_labels, weak, human_coarse


@pytest.mark.parametrize("variant", ["fine-only", "reference", "hierarchical"])
def test_training_reaches_the_parameters_torch_reaches(variant: str) -> None:
    """The same initial parameters and batches, stepped by torch autograd and torch.optim.Adam."""
    config = TrainingConfig(variant=variant, epochs=40, batch_size=64, weak_loss_weight=0.5, seed=2)
    embeddings, fine_labels, weak, human_coarse = fit_inputs()
    classifier = FineGrainedClassifier(HIERARCHY, DIM, config).fit(embeddings, fine_labels, weak, TRANSITION,
                                                                   human_coarse)

    groups, feature_mean = classifier._training_set(embeddings, fine_labels, weak, human_coarse)
    transition = classifier._transition(TRANSITION)
    assert transition is not None
    reference = torch_parameters(classifier._initial_parameters())
    optimiser = torch.optim.Adam(reference.values(), lr=config.learning_rate)
    for batch in _batches(groups, config.batch_size, config.epochs):
        optimiser.zero_grad()
        torch_loss(config, reference, batch, torch.from_numpy(transition)).backward()
        optimiser.step()

    fitted = classifier._parameters
    assert fitted is not None
    np.testing.assert_array_equal(fitted["feature_mean"], feature_mean)
    for name, tensor in reference.items():
        np.testing.assert_allclose(fitted[name], tensor.detach().numpy(), atol=1e-4, rtol=0, err_msg=name)
        assert np.abs(fitted[name] - classifier._initial_parameters()[name]).max() > 1e-2  # it did train


def test_a_label_type_its_steps_cycle_through_is_prepared_once_and_a_larger_one_step_by_step() -> None:
    embeddings, fine_labels, weak, human_coarse = fit_inputs()
    cycled = FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=40, batch_size=64))
    once = FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=5, batch_size=64))
    cycled_groups, cycled_mean = cycled._training_set(embeddings, fine_labels, weak, human_coarse)
    once_groups, once_mean = once._training_set(embeddings, fine_labels, weak, human_coarse)
    weak_rows = cycled_groups["weak"].size
    assert weak_rows > 5 * 64  # 5 steps see each weak row once at most; 40 steps go round them several times
    prepared = cycled_groups["weak"].prepared
    assert prepared is not None and prepared.shape == (weak_rows, DIM) and prepared.dtype == np.float32
    assert once_groups["weak"].prepared is None and once_groups["weak"].rows.size < weak_rows  # what 5 steps see
    np.testing.assert_array_equal(cycled_mean, once_mean)
    for step, (a, b) in enumerate(zip(_batches(cycled_groups, 64, 5), _batches(once_groups, 64, 5))):
        for name in ("full", "human_coarse", "weak"):
            (a_rows, a_targets), (b_rows, b_targets) = getattr(a, name), getattr(b, name)
            np.testing.assert_allclose(a_rows, b_rows, rtol=0, atol=1e-6, err_msg=f"{name} step {step}")
            np.testing.assert_array_equal(a_targets, b_targets)


def test_initial_weights_are_seeded_standard_normal_times_a_hundredth() -> None:
    classifier = FineGrainedClassifier(HIERARCHY, 4000, TrainingConfig(variant="reference", seed=5))
    first, again = classifier._initial_parameters(), classifier._initial_parameters()
    weights = np.concatenate([first["fine_head.weight"].ravel(), first["coarse_head.weight"].ravel()])
    assert weights.dtype == np.float32
    assert abs(weights.mean()) < 2e-4 and abs(weights.std() - 0.01) < 2e-4
    assert not first["fine_head.bias"].any()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


@pytest.mark.parametrize("variant", ["reference", "hierarchical"])
def test_a_checkpoint_written_by_safetensors_torch_loads(tmp_path, variant: str) -> None:
    """Checkpoints of the torch-based classifier: weights.safetensors from safetensors.torch, the same metadata."""
    embeddings, fine_labels, weak, human_coarse = fit_inputs()
    classifier = FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(variant=variant, epochs=10)).fit(
        embeddings, fine_labels, weak, TRANSITION, human_coarse)
    target = tmp_path / "checkpoint"
    classifier.save(target)
    assert classifier._parameters is not None
    torch_tensors = {name: torch.from_numpy(array.copy()) for name, array in classifier._parameters.items()}
    torch_save_file(torch_tensors, str(target / WEIGHTS_FILE), metadata={"format": "vlm-al-finegrained"})
    assert json.loads((target / METADATA_FILE).read_text())["format_version"] == 1

    loaded = FineGrainedClassifier.load(target, expected_hierarchy=HIERARCHY)
    assert loaded._parameters is not None
    for name, tensor in torch_tensors.items():
        np.testing.assert_array_equal(loaded._parameters[name], tensor.numpy())
    np.testing.assert_array_equal(loaded.predict_fine_proba(embeddings), classifier.predict_fine_proba(embeddings))


def test_a_corrupt_weights_file_is_a_model_input_error(tmp_path) -> None:
    embeddings, fine_labels, _, _ = fit_inputs()
    target = tmp_path / "checkpoint"
    FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=2)).fit(embeddings, fine_labels).save(target)
    (target / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelInputError, match="cannot read"):
        FineGrainedClassifier.load(target)


@pytest.mark.parametrize("variant", ["fine-only", "reference", "hierarchical"])
def test_fine_and_coarse_from_one_pass_equal_the_separate_predictions(variant: str) -> None:
    embeddings, fine_labels, weak, human_coarse = fit_inputs()
    classifier = FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(variant=variant, epochs=10)).fit(
        embeddings, fine_labels, weak, TRANSITION, human_coarse)
    fine, coarse = classifier.predict_fine_and_coarse_proba(embeddings)
    np.testing.assert_array_equal(fine, classifier.predict_fine_proba(embeddings))
    np.testing.assert_array_equal(coarse, classifier.predict_coarse_proba(embeddings))
    # float16 rows are converted chunk by chunk; the float32 copy of them predicts the same.
    np.testing.assert_array_equal(fine, classifier.predict_fine_proba(embeddings.astype(np.float32)))


def test_prediction_rejects_non_finite_rows() -> None:
    embeddings, fine_labels, _, _ = fit_inputs()
    classifier = FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=2)).fit(embeddings, fine_labels)
    bad = embeddings.astype(np.float64)
    bad[5, 0] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ModelInputError, match=r"NaN or inf in rows \[5\]"):
        classifier.predict_fine_proba(bad)


def test_num_threads_caps_the_blas_pools_for_the_call() -> None:
    from threadpoolctl import threadpool_info

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    if not blas or all(pool["num_threads"] == 1 for pool in blas):
        pytest.skip("no multi-threaded BLAS pool loaded")
    before = [pool["num_threads"] for pool in blas]
    with _blas_threads(1):
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    assert [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] == before


def test_fitting_and_serving_never_import_torch(tmp_path) -> None:
    script = (
        "import sys\n"
        "import model.finegrained, model.learner, model.query, model.calibration, model.noise, backend.training\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
        "import numpy as np\n"
        "from model.finegrained import FineGrainedClassifier, TrainingConfig\n"
        "from model.hierarchy import LabelHierarchy\n"
        "h = LabelHierarchy.from_groups({'X': ['a', 'b'], 'Y': ['c']})\n"
        "x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float16)\n"
        "fine, weak = np.array([0, 1, 2, -1] * 10), np.array([0, 0, 1, 1] * 10)\n"
        "clf = FineGrainedClassifier(h, 8, TrainingConfig(variant='reference', num_threads=1))\n"
        "clf.fit(x, fine, weak, np.eye(2)).save(sys.argv[1])\n"
        "FineGrainedClassifier.load(sys.argv[1]).predict_fine_and_coarse_proba(x)\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
        "print('no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoint")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no torch"
