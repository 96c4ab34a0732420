"""``vlm-al simulate``'s options: one frozen dataclass, parsed from the command line and validated."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass


from model.errors import ModelInputError



CONDITIONS = ("semantic", "imagenet-map", "simulated")
"""Weak-annotator conditions; imagenet-map exists only where its map covers the coarse classes (Fashion-MNIST)."""
STRATEGY_NAMES = (
    "random",
    "margin",
    "entropy",
    "k-center",
    "isoal-human-coarse",
    "vlm-no-T",
    "vlm-T-reference",
    "ours",
)
DEFAULT_CACHE_DIR = "~/.cache/vlm-al"
DEFAULT_OUT_DIR = "bench/results/simulate"

TASK_RUNNERS: dict[str, str] = {
    "classification": "model.simulate.runner:run_classification",
    "segmentation": "model.simulate.segmentation:main",
    "multilabel": "model.simulate.multilabel:main",
}
"""``vlm-al simulate --task NAME``: the ``module:function`` that runs the task's benchmark on the other arguments
(imported when chosen, returns an exit code). A new task is one more entry here."""
DEFAULT_TASK = "classification"


def split_task(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``--task NAME`` (or ``--task=NAME``) taken out of ``argv``: the task and the arguments left for its runner."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", default=DEFAULT_TASK)
    known, rest = parser.parse_known_args(list(argv))
    if known.task not in TASK_RUNNERS:
        raise ModelInputError(f"unknown --task {known.task!r}; choose from {list(TASK_RUNNERS)}")
    return known.task, rest


def task_runner(task: str):
    """The function that runs ``task``'s benchmark (see ``TASK_RUNNERS``)."""
    import importlib

    module_name, _, function = TASK_RUNNERS[task].partition(":")
    return getattr(importlib.import_module(module_name), function)


# --------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SimulationOptions:
    dataset: str = "fashion-mnist"
    split: str = "train"
    pool_size: int = 6000
    test_size: int = 2000
    image_size: int = 112
    weak_image_size: int | None = None
    """Input size of the weak annotator's classifier; None: that classifier's native size."""
    weak_pad: float | None = None
    """None: the data set's default (``DEFAULT_WEAK_PAD``)."""
    hierarchy: str | None = None
    imagenet_map: str | None = None
    """JSON {coarse: [ImageNet classes]} for the imagenet-map condition; None: the packaged Fashion-MNIST map."""
    seeds: int = 5
    rounds: int = 6
    budget: float = 30.0
    seed_per_class: int = 3
    cost_weak: float = 0.02
    cost_human_coarse: float = 0.1
    strategies: tuple[str, ...] = STRATEGY_NAMES
    weak_annotators: tuple[str, ...] = ("semantic", "imagenet-map", "simulated")
    simulated_accuracy: float = 0.85
    cache_dir: str = DEFAULT_CACHE_DIR
    out: str = DEFAULT_OUT_DIR
    threads: int = 2
    data_root: str | None = None
    progress: bool = True

    def validate(self) -> None:
        positive = {
            "pool-size": self.pool_size,
            "test-size": self.test_size,
            "image-size": self.image_size,
            "weak-image-size": 16 if self.weak_image_size is None else self.weak_image_size,
            "seeds": self.seeds,
            "seed-per-class": self.seed_per_class,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if value < 1:
                raise ModelInputError(f"--{name} must be at least 1, got {value}")
        if self.rounds < 0:
            raise ModelInputError(f"--rounds must be >= 0, got {self.rounds}")
        if not self.budget > 0:
            raise ModelInputError(f"--budget must be > 0, got {self.budget}")
        for name, cost in (("cost-weak", self.cost_weak), ("cost-human-coarse", self.cost_human_coarse)):
            if not 0 < cost <= 1:
                raise ModelInputError(f"--{name} must be in (0, 1], got {cost}")
        if self.weak_pad is not None and not 0 <= self.weak_pad <= 1:
            raise ModelInputError(f"--weak-pad must be in [0, 1], got {self.weak_pad}")
        unknown_conditions = [c for c in self.weak_annotators if c not in CONDITIONS]
        if unknown_conditions or not self.weak_annotators:
            raise ModelInputError(f"unknown weak annotators {unknown_conditions}; choose from {list(CONDITIONS)}")
        if not 0 < self.simulated_accuracy <= 1:
            raise ModelInputError(f"--simulated-accuracy must be in (0, 1], got {self.simulated_accuracy}")
        unknown = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if unknown or not self.strategies:
            raise ModelInputError(f"unknown strategies {unknown}; choose from {list(STRATEGY_NAMES)}")
        from model.datasets import DATASET_NAMES

        if self.dataset not in ("fashion-mnist", "openclipart") and not self.dataset.startswith("imagefolder:"):
            raise ModelInputError(f"unknown dataset {self.dataset!r}; supported: {list(DATASET_NAMES)}")
        if self.split not in ("train", "test"):
            raise ModelInputError(f"--split must be train or test, got {self.split!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = SimulationOptions()
    parser = argparse.ArgumentParser(
        prog="vlm-al simulate",
        description="Offline active-learning benchmark with a simulated oracle and a weak coarse annotator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task", default=DEFAULT_TASK, choices=list(TASK_RUNNERS),
        help="which benchmark; the options below are classification's (see vlm-al simulate --task NAME --help)",
    )
    parser.add_argument(
        "--dataset", default=defaults.dataset, help="fashion-mnist, openclipart or imagefolder:DIR (DIR/<coarse>/<fine>/)"
    )
    parser.add_argument(
        "--split",
        default=defaults.split,
        choices=["train", "test"],
        help="split the pool is drawn from; accuracy is measured on the other split",
    )
    parser.add_argument(
        "--pool-size", type=int, default=defaults.pool_size, help="first N images of the split (capped at its size)"
    )
    parser.add_argument(
        "--test-size", type=int, default=defaults.test_size, help="first N images of the other split (capped)"
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="backbone input size in pixels")
    parser.add_argument(
        "--weak-image-size",
        type=int,
        default=None,
        help="input size of the real weak annotators' ImageNet classifier (default: its native size)",
    )
    parser.add_argument(
        "--weak-pad",
        type=float,
        default=None,
        help="white margin around the image for the real weak annotators, as a fraction of its width "
        "(default: 0.15 for fashion-mnist, else 0)",
    )
    parser.add_argument(
        "--hierarchy", default=None, help="JSON map fine class -> coarse class (default: the data set's own)"
    )
    parser.add_argument(
        "--imagenet-map", default=None, help="JSON {coarse: [ImageNet classes]} for imagenet-map (default: Fashion-MNIST's)"
    )
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--budget", type=float, default=defaults.budget, help="label cost per round")
    parser.add_argument("--seed-per-class", type=int, default=defaults.seed_per_class)
    parser.add_argument("--cost-weak", type=float, default=defaults.cost_weak, help="cost of a VLM coarse label")
    parser.add_argument("--cost-human-coarse", type=float, default=defaults.cost_human_coarse)
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES), help="comma-separated")
    parser.add_argument(
        "--weak-annotator",
        default="all",
        help="comma-separated of semantic, imagenet-map, simulated; 'all' = every one the data set supports",
    )
    parser.add_argument("--simulated-accuracy", type=float, default=defaults.simulated_accuracy)
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="CPU threads: torch threads for the embedding pass, worker processes for the runs",
    )
    parser.add_argument("--data-root", default=None, help="the data set's folder (default: its Debian package's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> SimulationOptions:
    args = build_arg_parser().parse_args(argv)
    if args.weak_annotator == "all":
        # The hand-written map only knows Fashion-MNIST's groups; with another map file it may be asked for by name.
        weak = CONDITIONS if args.dataset == "fashion-mnist" else ("semantic", "simulated")
    else:
        weak = tuple(c.strip() for c in args.weak_annotator.split(",") if c.strip())
    options = SimulationOptions(
        dataset=args.dataset,
        split=args.split,
        pool_size=args.pool_size,
        test_size=args.test_size,
        image_size=args.image_size,
        weak_image_size=args.weak_image_size,
        weak_pad=args.weak_pad,
        hierarchy=args.hierarchy,
        imagenet_map=args.imagenet_map,
        seeds=args.seeds,
        rounds=args.rounds,
        budget=args.budget,
        seed_per_class=args.seed_per_class,
        cost_weak=args.cost_weak,
        cost_human_coarse=args.cost_human_coarse,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        weak_annotators=weak,
        simulated_accuracy=args.simulated_accuracy,
        cache_dir=args.cache_dir,
        out=args.out,
        threads=args.threads,
        data_root=args.data_root,
        progress=not args.no_progress,
    )
    options.validate()
    return options
