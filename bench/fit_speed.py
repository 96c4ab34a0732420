"""Fit speed of the fine-grained classifier: 10,000 weak + 1,000 full samples, d=1280, 10 fine / 4 coarse.

Usage: python bench/fit_speed.py [--out bench/results/fit_speed.json] [--threads N] [--repeats 3]
Prints the median fit time (wall clock and process CPU) per variant and writes it, with the machine's description
and load, as JSON. Target: at most 2 s per fit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.finegrained import VARIANTS, FineGrainedClassifier, TrainingConfig  # noqa: E402
from model.hierarchy import MISSING_LABEL, LabelHierarchy  # noqa: E402
from model.io import atomic_write_json  # noqa: E402

N_WEAK, N_FULL, EMBEDDING_DIM = 10_000, 1_000, 1280
HIERARCHY = LabelHierarchy.from_groups(
    {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1"], "d": ["d0", "d1"]}
)
TARGET_SECONDS = 2.0


def synthetic_problem(seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian blobs per fine class; the weak labels follow a noisy coarse transition matrix."""
    rng = np.random.default_rng(seed)
    n = N_WEAK + N_FULL
    fine = rng.integers(0, HIERARCHY.n_fine, size=n)
    centres = rng.normal(size=(HIERARCHY.n_fine, EMBEDDING_DIM)).astype(np.float32)
    embeddings = centres[fine] + rng.normal(scale=3.0, size=(n, EMBEDDING_DIM)).astype(np.float32)
    transition = np.full((HIERARCHY.n_coarse, HIERARCHY.n_coarse), 0.2 / (HIERARCHY.n_coarse - 1))
    np.fill_diagonal(transition, 0.8)
    true_coarse = HIERARCHY.parent_array[fine]
    weak = np.array([rng.choice(HIERARCHY.n_coarse, p=transition[c]) for c in true_coarse], dtype=np.int64)
    fine_labels = np.full(n, MISSING_LABEL, dtype=np.int64)
    fine_labels[:N_FULL] = fine[:N_FULL]
    weak[:N_FULL] = MISSING_LABEL
    return {"embeddings": embeddings, "fine_labels": fine_labels, "weak": weak, "transition": transition}


def time_fit(
    variant: str, problem: dict[str, np.ndarray], repeats: int, threads: int | None
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds per fit. CPU time shows the cost when other jobs share the cores."""
    config = TrainingConfig(variant=variant, use_transition=True, num_threads=threads)
    wall, cpu = [], []
    for _ in range(repeats):
        classifier = FineGrainedClassifier(HIERARCHY, EMBEDDING_DIM, config)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        classifier.fit(problem["embeddings"], problem["fine_labels"], problem["weak"], problem["transition"])
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def machine_info(threads: int | None) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fit_speed.json")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on cores shared with other jobs, more intra-op threads oversubscribe them "
        "and a fit gets several times slower); 0 = torch's own setting",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    threads = args.threads or None

    problem = synthetic_problem()
    results = {}
    for variant in VARIANTS:
        wall, cpu = time_fit(variant, problem, args.repeats, threads)
        median, median_cpu = statistics.median(wall), statistics.median(cpu)
        results[variant] = {
            "median_seconds": round(median, 4),
            "runs_seconds": [round(s, 4) for s in wall],
            "median_cpu_seconds": round(median_cpu, 4),
        }
        print(f"{variant:>12}: median fit {median:.3f} s wall, {median_cpu:.3f} s CPU over {args.repeats} runs "
              f"({N_WEAK} weak + {N_FULL} full, d={EMBEDDING_DIM})")
    report = {
        "task": {"n_weak": N_WEAK, "n_full": N_FULL, "embedding_dim": EMBEDDING_DIM,
                 "n_fine": HIERARCHY.n_fine, "n_coarse": HIERARCHY.n_coarse},
        "config": TrainingConfig().to_dict(),
        "target_seconds": TARGET_SECONDS,
        "variants": results,
        "machine": machine_info(threads),
        "note": "the first fit in a process includes torch's one-time start-up; the median of the runs excludes it",
    }
    atomic_write_json(args.out, report)
    slowest = max(r["median_seconds"] for r in results.values())
    print(f"slowest variant: {slowest:.3f} s (target <= {TARGET_SECONDS} s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
