"""The benchmark's runs: named strategies on ``model.learner.ActiveLearner``, rounds of buying and retraining, and ``main``."""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL
from model.io import atomic_write_json, atomic_write_text
from model.learner import BENCHMARK_OURS_SETTINGS, SERVER_SETTINGS, ActiveLearner, LearnerSettings, RoundLabels, RoundModel
from model.split_features import cached_split_features
from model.simulate.datasets import (
    BACKBONE_SPEC,
    REAL_ANNOTATORS,
    BenchmarkData,
    dataset_folder_name,
    load_hierarchy,
    load_splits,
    weak_annotator_logits,
    weak_classifier_input,
)
from model.simulate.options import STRATEGY_NAMES, SimulationOptions, parse_options, split_task, task_runner
from model.simulate.oracle import (
    LabelledPool,
    SimulatedOracle,
    buy_within_budget,
    draw_seed_set,
    seed_rng,
    simulated_answers,
    simulated_transition_matrix,
)
from model.simulate.report import (
    StrategyRun,
    machine_description,
    plot_learning_curves,
    render_markdown,
    summarise_runs,
    targets,
    weak_annotator_report,
)


@dataclass(frozen=True)
class StrategySpec:
    """A named benchmark strategy: the learner's settings, and which weak labels the oracle sells it."""

    settings: LearnerSettings
    weak_source: str | None = None
    """None (human fine labels only), "vlm" or "human-coarse" (ISOAL: a human gives the true coarse label)"""
    expected_improvement: bool = False
    """Measure the expected improvement per label by retraining (always for ISO; an option for ours)."""

    @property
    def measures_improvement(self) -> bool:
        return self.settings.strategy == "iso" or self.expected_improvement


ISO_SHUFFLES = 1
"""Shuffles per expected-improvement estimate (the reference uses 3). Each costs 8 retrainings, and with thousands
of weak labels a retraining takes about a second on one core: one shuffle keeps the default run near 15 minutes."""

_BASELINE = LearnerSettings(variant="fine-only", transition="none", config_candidates={"weak_loss_weight": (1.0,)},
                            strategy="random")
_REFERENCE = replace(_BASELINE, variant="reference", strategy="iso", strategy_options={"n_shuffles": ISO_SHUFFLES})

STRATEGY_SPECS: dict[str, StrategySpec] = {
    "random": StrategySpec(_BASELINE),
    "margin": StrategySpec(replace(_BASELINE, strategy="margin")),
    "entropy": StrategySpec(replace(_BASELINE, strategy="entropy")),
    "k-center": StrategySpec(replace(_BASELINE, strategy="k-center")),
    "isoal-human-coarse": StrategySpec(_REFERENCE, weak_source="human-coarse"),
    "vlm-no-T": StrategySpec(_REFERENCE, weak_source="vlm"),
    "vlm-T-reference": StrategySpec(replace(_REFERENCE, transition="round0"), weak_source="vlm"),
    "ours": StrategySpec(BENCHMARK_OURS_SETTINGS, weak_source="vlm"),
}
"""Ours runs ``model.learner.BENCHMARK_OURS_SETTINGS``; the server runs ``SERVER_SETTINGS``, which differs in the
named settings the results print (``config.server_differs_in``)."""


@dataclass(frozen=True)
class RunJob:
    condition: str
    strategy: str
    seed: int


def round_labels(spec: StrategySpec, pool: LabelledPool) -> RoundLabels:
    """What the strategy has bought so far, as the learner reads it."""
    return RoundLabels(
        fine=pool.fine,
        weak_coarse=pool.weak_coarse if spec.weak_source == "vlm" else None,
        human_coarse=pool.human_coarse if spec.weak_source == "human-coarse" else None,
    )


def _accuracy(classifier, data: BenchmarkData) -> float:
    predicted = classifier.predict_fine_proba(data.test_embeddings).argmax(axis=1)
    return float(np.mean(predicted == data.test_fine))


def run_strategy(job: RunJob, data: BenchmarkData, weak_answers: np.ndarray, options: SimulationOptions,
                 on_round=None, spec: StrategySpec | None = None) -> StrategyRun:
    """One strategy, one seed: seed set, then ``options.rounds`` rounds of querying, buying and retraining.

    ``spec``: a variant to run under ``job.strategy``'s name (bench/validate_ours.py); by default the named one.
    Numpy's BLAS runs one thread here: ``--threads`` runs that many strategies side by side, one per core."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _run_strategy(job, data, weak_answers, options, on_round, spec)


def _run_strategy(job: RunJob, data: BenchmarkData, weak_answers: np.ndarray, options: SimulationOptions,
                  on_round, spec: StrategySpec | None) -> StrategyRun:
    started = time.perf_counter()
    spec = spec or STRATEGY_SPECS[job.strategy]
    oracle = SimulatedOracle(
        true_fine=data.pool_fine,
        true_coarse=data.pool_coarse,
        weak_answers=weak_answers,
        cost_human_fine=1.0,
        cost_weak=options.cost_weak,
        cost_human_coarse=options.cost_human_coarse,
    )
    uses_vlm = spec.weak_source == "vlm"
    pool = LabelledPool.empty(data.pool_fine.shape[0])
    seed_set = draw_seed_set(data.pool_fine, data.hierarchy.n_fine, options.seed_per_class, seed_rng(job.seed, "seed-set"))
    cost = buy_within_budget(oracle, pool, [(int(i), "human_fine") for i in seed_set], np.inf, uses_vlm)
    query_rng = seed_rng(job.seed, f"query:{job.strategy}")
    run = StrategyRun()
    learner = ActiveLearner(data.hierarchy, data.pool_embeddings.shape[1],
                            replace(spec.settings, seed=job.seed, num_threads=1))
    model = None
    for round_index in range(options.rounds + 1):
        if model is not None:
            selections = select_queries(spec, learner, data, pool, model, options, query_rng)
            spent = buy_within_budget(oracle, pool, selections, options.budget, uses_vlm)
            cost += spent
        model = learner.train(data.pool_embeddings, round_labels(spec, pool))
        transition = model.transition
        run.cost.append(round(cost, 6))
        run.accuracy.append(_accuracy(model.classifier, data))
        run.human_fine_labels.append(int(np.sum(pool.fine != MISSING_LABEL)))
        run.weak_labels.append(int(np.sum(pool.weak_asked)))
        run.human_coarse_labels.append(int(np.sum(pool.human_coarse != MISSING_LABEL)))
        if on_round is not None:
            on_round()
    if transition is not None:
        run.final_transition = np.asarray(transition.matrix).tolist()
    run.seconds = time.perf_counter() - started
    return run


def _run_job_in_worker(job: RunJob, data: BenchmarkData, weak_answers: np.ndarray, options: SimulationOptions,
                       progress_queue) -> tuple[RunJob, StrategyRun]:
    def report() -> None:
        if progress_queue is not None:
            progress_queue.put(1)

    return job, run_strategy(job, data, weak_answers, options, on_round=report)


def run_jobs(jobs: Sequence[RunJob], data: BenchmarkData, answers_by_condition: dict[str, list[np.ndarray]],
             options: SimulationOptions) -> dict[RunJob, StrategyRun]:
    """Run every job, in ``options.threads`` worker processes (one BLAS thread each) when more than one."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    total_rounds = len(jobs) * (options.rounds + 1)
    results: dict[RunJob, StrategyRun] = {}
    with tqdm(total=total_rounds, desc="rounds", unit="round", disable=not options.progress) as bar:
        if options.threads == 1:
            for job in jobs:
                weak = answers_by_condition[job.condition][job.seed]
                results[job] = run_strategy(job, data, weak, options, on_round=lambda: bar.update(1))
            return results
        # spawn, not fork: the parent has already run torch, whose thread pools do not survive a fork.
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(options.threads, mp_context=context) as executor:
            queue = manager.Queue()
            pending = {
                executor.submit(
                    _run_job_in_worker, job, data, answers_by_condition[job.condition][job.seed], options, queue
                )
                for job in jobs
            }
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.update(queue.get())
                for future in done:
                    job, run = future.result()
                    results[job] = run
            while not queue.empty():
                bar.update(queue.get())
    return results


def main(argv: list[str] | None = None) -> int:
    """``vlm-al simulate [--task NAME]``: returns 0, or 2 with a message on stderr for bad options or missing data.
    The task (``TASK_RUNNERS``; classification by default) gets the other arguments."""
    try:
        task, rest = split_task(sys.argv[1:] if argv is None else argv)
        return int(task_runner(task)(rest) or 0)
    except ModelInputError as exc:
        print(f"vlm-al simulate: {exc}", file=sys.stderr)
        return 2


def run_classification(argv: list[str]) -> int:
    """The classification benchmark: strategies compared on fine test accuracy at equal label cost."""
    return _simulate(parse_options(argv))


def _simulate(options: SimulationOptions) -> int:
    started = time.perf_counter()
    pool_split, test_split_images, test_split = load_splits(options)
    hierarchy = load_hierarchy(options.hierarchy, pool_split.hierarchy)
    pool = cached_split_features(pool_split, BACKBONE_SPEC, options.image_size, cache_dir=options.cache_dir,
                                 threads=options.threads, progress=options.progress)
    test = cached_split_features(test_split_images, BACKBONE_SPEC, options.image_size, cache_dir=options.cache_dir,
                                 threads=options.threads, progress=options.progress)
    data = BenchmarkData(hierarchy, pool.embeddings, pool.fine_labels, test.embeddings, test.fine_labels)

    answers_by_condition: dict[str, list[np.ndarray]] = {}
    for condition in options.weak_annotators:
        if condition in REAL_ANNOTATORS:
            logits = weak_annotator_logits(condition, pool_split, pool, options)
            answers = REAL_ANNOTATORS[condition](logits, hierarchy, options)
            answers_by_condition[condition] = [answers] * options.seeds
        else:
            answers_by_condition[condition] = [
                simulated_answers(seed, data, options.simulated_accuracy) for seed in range(options.seeds)
            ]
    # The slowest strategies first, so the two workers do not end with one long job each.
    slow_first = sorted(options.strategies, key=lambda name: STRATEGY_NAMES.index(name), reverse=True)
    jobs = [
        RunJob(condition, strategy, seed)
        for strategy in slow_first
        for condition in options.weak_annotators
        for seed in range(options.seeds)
    ]
    runs = run_jobs(jobs, data, answers_by_condition, options)

    out = Path(options.out) / dataset_folder_name(options.dataset)
    conditions: dict[str, dict] = {}
    for condition in options.weak_annotators:
        real = condition in REAL_ANNOTATORS
        condition_answers = answers_by_condition[condition][:1] if real else answers_by_condition[condition]
        weak = weak_annotator_report(data.pool_coarse, condition_answers, hierarchy)
        if real:
            model_name, size, pad = weak_classifier_input(condition, options)
            weak["classifier"] = f"timm:{model_name}:imagenet-package:{size}px, pad {pad:g}"
            # A real annotator's true T is its confusion on the pool, row-normalised (rows: true coarse class).
            counts = np.asarray(weak["coarse_confusion_counts"], dtype=np.float64)[:, : hierarchy.n_coarse]
            true_transition = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        else:
            true_transition = simulated_transition_matrix(hierarchy, options.simulated_accuracy)
        weak["true_transition_matrix"] = true_transition.round(4).tolist()
        finals = [runs[RunJob(condition, "ours", s)].final_transition for s in range(options.seeds)
                  if "ours" in options.strategies]
        if finals:
            estimated = np.mean(np.asarray(finals), axis=0)
            weak["estimated_transition_matrix_ours_final_mean"] = estimated.round(4).tolist()
            weak["estimated_transition_max_abs_error"] = round(float(np.abs(estimated - true_transition).max()), 4)
        strategies = {
            name: summarise_runs([runs[RunJob(condition, name, s)] for s in range(options.seeds)])
            for name in options.strategies
        }
        plot_name = f"learning_curve_{condition}.png"
        block = {"weak_annotator": weak, "strategies": strategies, "plot": plot_name}
        block["targets"] = targets(block)
        plot_learning_curves(out / plot_name, f"{options.dataset}, weak annotator: {condition}", strategies)
        conditions[condition] = block

    config = dict(asdict(options))
    config["strategies"] = list(options.strategies)
    config["weak_annotators"] = list(options.weak_annotators)
    config["pool_size"], config["test_size"] = len(pool_split), len(test_split_images)
    config["test_split"] = test_split
    config["hierarchy_classes"] = hierarchy.to_dict()
    config["backbone"] = f"timm:{BACKBONE_SPEC}:imagenet-package"
    config["ours_learner_settings"] = BENCHMARK_OURS_SETTINGS.to_dict()
    server = SERVER_SETTINGS.to_dict()
    config["server_differs_in"] = {k: {"server": v, "benchmark": config["ours_learner_settings"][k]}
                                   for k, v in server.items() if v != config["ours_learner_settings"][k]}
    config["machine"] = machine_description()
    results = {"config": config, "conditions": conditions, "wall_seconds": round(time.perf_counter() - started, 1)}
    # The layout: each condition at the top level, next to the config block.
    document = {**conditions, "config": config, "wall_seconds": results["wall_seconds"]}
    atomic_write_json(out / "results.json", document)
    atomic_write_text(out / "results.md", render_markdown(results))
    print(render_markdown(results))
    return 0


VALIDATION_SHARE = 1.0 / 3.0
"""Share of the human fine labels held out (per class) to score ISO's retrainings; never test labels."""


def validation_split(fine_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool (n,): a stratified third of the full-labelled samples (at least one per class with two or more)."""
    held_out = np.zeros(fine_labels.shape[0], dtype=bool)
    for label in np.unique(fine_labels[fine_labels != MISSING_LABEL]):
        members = rng.permutation(np.flatnonzero(fine_labels == label))
        if members.size >= 2:
            held_out[members[: max(1, int(round(members.size * VALIDATION_SHARE)))]] = True
    return held_out


def make_train_and_evaluate(spec: StrategySpec, data: BenchmarkData, pool: LabelledPool,
                            transition: np.ndarray | None, config, held_out: np.ndarray):
    """ISO's ``train_and_evaluate``: train on the given full and weak samples minus the held-out ones, score the
    fine accuracy on the held-out human fine labels."""
    from model.finegrained import FineGrainedClassifier

    validation = np.flatnonzero(held_out)
    true_coarse = data.hierarchy.coarse_of_fine_labels(pool.fine)
    weak_source = pool.weak_coarse if spec.weak_source == "vlm" else pool.human_coarse

    def train_and_evaluate(full_indices: np.ndarray, weak_indices: np.ndarray) -> float:
        full_indices = np.asarray(full_indices, dtype=np.int64)
        weak_indices = np.asarray(weak_indices, dtype=np.int64)
        full_indices = full_indices[~held_out[full_indices]]
        weak_indices = weak_indices[~held_out[weak_indices]]
        if full_indices.size == 0:
            return 0.0
        fine = np.full(pool.fine.shape[0], MISSING_LABEL, dtype=np.int64)
        fine[full_indices] = pool.fine[full_indices]
        coarse = np.full(pool.fine.shape[0], MISSING_LABEL, dtype=np.int64)
        # A full sample standing in for a weak one gives its true coarse label (ISO, before any weak label).
        coarse[weak_indices] = np.where(
            weak_source[weak_indices] != MISSING_LABEL, weak_source[weak_indices], true_coarse[weak_indices]
        )
        as_weak = coarse if spec.weak_source == "vlm" else None
        as_human_coarse = coarse if spec.weak_source == "human-coarse" else None
        classifier = FineGrainedClassifier(data.hierarchy, data.pool_embeddings.shape[1], config).fit(
            data.pool_embeddings, fine, as_weak, coarse_transition_matrix=transition,
            human_coarse_labels=as_human_coarse,
        )
        predicted = classifier.predict_fine_proba(data.pool_embeddings[validation]).argmax(axis=1)
        return float(np.mean(predicted == pool.fine[validation]))

    return train_and_evaluate


def select_queries(spec: StrategySpec, learner: ActiveLearner, data: BenchmarkData, pool: LabelledPool,
                   model: RoundModel, options: SimulationOptions,
                   rng: np.random.Generator) -> list[tuple[int, str]]:
    """Ask the learner's strategy for one round's labels: ``[(pool index, "human_fine" | "weak_coarse" |
    "human_coarse")]``."""
    from model.query import LabelCosts, LabelKind

    human_coarse = spec.weak_source == "human-coarse"
    costs = LabelCosts(human_fine=1.0, weak_coarse=options.cost_human_coarse if human_coarse else options.cost_weak)
    train_and_evaluate = None
    if spec.measures_improvement:
        held_out = validation_split(pool.fine, rng)
        transition = None if model.transition is None else model.transition.matrix
        train_and_evaluate = make_train_and_evaluate(spec, data, pool, transition, model.training_config, held_out)
    state = learner.pool_state(
        data.pool_embeddings, round_labels(spec, pool), model,
        weak_kind=LabelKind.HUMAN_COARSE if human_coarse else LabelKind.VLM_COARSE,
        train_and_evaluate=train_and_evaluate,
    )
    kinds = {LabelKind.HUMAN_FINE: "human_fine", LabelKind.VLM_COARSE: "weak_coarse",
             LabelKind.HUMAN_COARSE: "human_coarse"}
    return [(s.index, kinds[s.kind]) for s in learner.query(state, options.budget, costs, rng)]
