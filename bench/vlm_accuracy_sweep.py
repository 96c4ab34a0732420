"""How good must the VLM be? Ours' gain over margin sampling against the simulated weak annotator's accuracy.

Runs ``vlm-al simulate`` with the simulated VLM at each accuracy (its errors systematic, through a known T), for
random, margin and ours, and writes bench/results/simulate/<dataset>/vlm_accuracy_sweep.{json,png}: the mean fine
accuracy over rounds of each strategy, and ours minus margin and minus random, with the std over seeds.

    .venv/bin/python bench/vlm_accuracy_sweep.py --dataset openclipart
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from model.io import atomic_write_bytes, atomic_write_json
from model.simulate import dataset_folder_name, main as simulate_main

ACCURACIES = (0.40, 0.55, 0.70, 0.85, 0.95)
STRATEGIES = ("random", "margin", "ours")


def mean_over_rounds_per_seed(summary: dict) -> np.ndarray:
    """Mean accuracy over rounds 1..R for each seed (round 0, the shared seed set, is left out)."""
    per_seed = np.asarray(summary["accuracy_per_seed"], dtype=np.float64)
    return per_seed[:, 1:].mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="openclipart")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pool-size", type=int, default=6000)
    parser.add_argument("--cache-dir", default="~/.cache/vlm-al")
    parser.add_argument("--out", default="bench/results/simulate")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for accuracy in ACCURACIES:
            out = Path(scratch) / f"acc{accuracy:g}"
            code = simulate_main([
                "--dataset", args.dataset, "--pool-size", str(args.pool_size), "--seeds", str(args.seeds),
                "--strategies", ",".join(STRATEGIES), "--weak-annotator", "simulated",
                "--simulated-accuracy", str(accuracy), "--cache-dir", args.cache_dir, "--out", str(out),
                "--no-progress",
            ])
            if code != 0:
                raise SystemExit(f"vlm-al simulate failed at accuracy {accuracy}")
            results = json.loads((out / dataset_folder_name(args.dataset) / "results.json").read_text())
            block = results["simulated"]
            per_seed = {name: mean_over_rounds_per_seed(block["strategies"][name]) for name in STRATEGIES}
            rows.append({
                "simulated_accuracy": accuracy,
                "measured_coarse_accuracy": block["weak_annotator"]["coarse_accuracy"],
                "mean_over_rounds": {n: round(float(v.mean()), 5) for n, v in per_seed.items()},
                "ours_minus_margin": round(float((per_seed["ours"] - per_seed["margin"]).mean()), 5),
                "ours_minus_margin_std": round(float((per_seed["ours"] - per_seed["margin"]).std()), 5),
                "ours_minus_random": round(float((per_seed["ours"] - per_seed["random"]).mean()), 5),
            })
            print(rows[-1], flush=True)
    target = Path(args.out) / dataset_folder_name(args.dataset)
    atomic_write_json(target / "vlm_accuracy_sweep.json", {
        "dataset": args.dataset, "seeds": args.seeds, "strategies": list(STRATEGIES), "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "load_average_after": round(os.getloadavg()[0], 2)},
        "seconds": round(time.perf_counter() - started, 1),
    })
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    x = [r["measured_coarse_accuracy"] * 100 for r in rows]
    gain = np.array([r["ours_minus_margin"] for r in rows]) * 100
    spread = np.array([r["ours_minus_margin_std"] for r in rows]) * 100
    axes.errorbar(x, gain, yerr=spread, marker="o", capsize=3, label="ours − margin")
    axes.plot(x, [r["ours_minus_random"] * 100 for r in rows], marker="s", linestyle="--", label="ours − random")
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("weak annotator's coarse accuracy on the pool (%)")
    axes.set_ylabel("fine accuracy gain, mean over rounds (points)")
    axes.set_title(f"How good must the VLM be? ({args.dataset}, {args.seeds} seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(target / "vlm_accuracy_sweep.png", buffer.getvalue())


if __name__ == "__main__":
    main()
