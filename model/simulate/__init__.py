"""The offline active-learning benchmark behind ``vlm-al simulate``.

A simulated oracle answers every query from the data set's true labels (``model.datasets``: fashion-mnist,
openclipart, imagefolder:DIR); the weak annotator is a real offline one (``semantic``: zero-shot over any class
names; ``imagenet-map``: the hand-written ImageNet map, Fashion-MNIST's groups only) or a simulated VLM whose
coarse answers follow a known, systematic transition matrix. Strategies are compared at equal cost on the fine
test accuracy of a model trained on frozen embeddings, which are computed once and cached on disk.

Modules: ``options`` (the command line), ``datasets`` (splits, features, hierarchy, real annotators' answers),
``oracle`` (the simulated VLM, seed set, label buying), ``runner`` (named strategies on model.learner, the rounds,
``main``), ``report`` (summaries, targets, curves, Markdown).
"""

from model.simulate.datasets import (
    BACKBONE_SPEC,
    DEFAULT_WEAK_PAD,
    REAL_ANNOTATORS,
    WEAK_CLASSIFIERS,
    BenchmarkData,
    dataset_folder_name,
    imagenet_map_answers,
    load_hierarchy,
    load_splits,
    semantic_answers,
    weak_annotator_logits,
    weak_classifier_input,
)
from model.simulate.options import CONDITIONS, STRATEGY_NAMES, SimulationOptions, build_arg_parser, parse_options
from model.simulate.oracle import (
    LabelledPool,
    SimulatedOracle,
    buy_within_budget,
    coarse_confusion_counts,
    draw_seed_set,
    draw_weak_labels,
    seed_rng,
    simulated_answers,
    simulated_transition_matrix,
)
from model.simulate.report import (
    StrategyRun,
    mean_after_seed,
    plot_learning_curves,
    render_markdown,
    summarise_runs,
    targets,
    weak_annotator_report,
)
from model.simulate.runner import (
    ISO_SHUFFLES,
    STRATEGY_SPECS,
    RunJob,
    StrategySpec,
    main,
    round_labels,
    run_strategy,
    select_queries,
)
from model.split_features import SplitFeatures

__all__ = [
    "BACKBONE_SPEC", "CONDITIONS", "DEFAULT_WEAK_PAD", "ISO_SHUFFLES", "REAL_ANNOTATORS", "STRATEGY_NAMES",
    "STRATEGY_SPECS", "WEAK_CLASSIFIERS", "BenchmarkData", "LabelledPool", "RunJob", "SimulatedOracle",
    "SimulationOptions", "SplitFeatures", "StrategyRun", "StrategySpec", "build_arg_parser", "buy_within_budget",
    "coarse_confusion_counts", "dataset_folder_name", "draw_seed_set", "draw_weak_labels", "imagenet_map_answers",
    "load_hierarchy", "load_splits", "main", "mean_after_seed", "parse_options", "plot_learning_curves",
    "render_markdown", "round_labels", "run_strategy", "seed_rng", "select_queries", "semantic_answers",
    "simulated_answers", "simulated_transition_matrix", "summarise_runs", "targets", "weak_annotator_logits",
    "weak_annotator_report", "weak_classifier_input",
]
