"""One server learning round on synthetic embeddings: wall time and the memory it allocates, at several sizes.

Usage: python bench/fit_round.py [--sizes 2000 20000 100000] [--repeats 2] [--compare REV]
                                 [--out bench/results/fit_round.json]

The round is ``backend.training.fit_and_rank`` as a fit calls it (one fit, three out-of-fold fits, the ranking):
1,280-d float16 embeddings (Gaussian blobs), 10 fine classes in 4 groups, a VLM answer on every task (30 % of them
wrong), 20 human labels. Each measurement runs in a fresh process: seconds (BLAS at its default threads), and
separately the peak of the allocations tracemalloc sees while the round runs (numpy arrays included), which is what
the round adds to a worker that already holds the embeddings.

``--compare REV`` measures the same rounds of that git revision (checked out in a temporary worktree), interleaved
with this checkout's, so both see the same load: the ratios are from one run. The first five tasks each ranks
first are written too: the two revisions must order the queue alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child(root: str, n: int, mode: str) -> None:
    """Build the problem, run one round with ``root``'s code, print one JSON line."""
    sys.path.insert(0, root)
    import tracemalloc

    import numpy as np

    from backend.training import CollectedLabels, fit_and_rank
    from model.finegrained import FineGrainedClassifier
    from model.hierarchy import MISSING_LABEL, LabelHierarchy

    rng = np.random.default_rng(0)
    hierarchy = LabelHierarchy(tuple(f"f{i}" for i in range(10)), ("a", "b", "c", "d"),
                               (0, 0, 0, 1, 1, 1, 2, 2, 3, 3))
    centres = rng.normal(size=(10, 1280)).astype(np.float32)
    fine_truth = rng.integers(0, 10, n)
    embeddings = np.empty((n, 1280), np.float16)  # float16 like the server's kept features, built in blocks
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        embeddings[start:stop] = centres[fine_truth[start:stop]] + 2 * rng.standard_normal((stop - start, 1280),
                                                                                          dtype=np.float32)
    coarse_truth = np.array(hierarchy.parent_of_fine)[fine_truth]
    answers = np.where(rng.random(n) < 0.3, rng.integers(0, 4, n), coarse_truth)
    weak = np.zeros((n, 4), np.float32)
    weak[np.arange(n), answers] = 1
    fine = np.full(n, MISSING_LABEL)
    labelled = rng.choice(n, 20, replace=False)
    fine[labelled] = fine_truth[labelled]
    trusted = np.full(n, MISSING_LABEL)
    trusted[labelled] = coarse_truth[labelled]
    labels = CollectedLabels(fine=fine, human_coarse=np.full(n, MISSING_LABEL), trusted_coarse=trusted,
                             labeled=fine != MISSING_LABEL)

    def run() -> Any:
        return fit_and_rank(hierarchy=hierarchy, embeddings=embeddings, labels=labels, weak_probabilities=weak,
                            new_classifier=lambda config: FineGrainedClassifier(hierarchy, 1280, config),
                            torch_threads=None, budget_labels=10, cost_full=1.0, cost_weak=0.05, out_of_fold=True)

    out: dict[str, Any] = {"n": n, "load": [round(x, 2) for x in os.getloadavg()]}
    if mode == "memory":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        outcome = run()
        out["traced_peak_mb"] = round((tracemalloc.get_traced_memory()[1] - before) / 2**20, 1)
    else:
        started = time.perf_counter()
        outcome = run()
        out["seconds"] = round(time.perf_counter() - started, 3)
    out["first_ranked"] = [int(i) for i in np.argsort(outcome.row_scores, kind="stable")[:5]]
    print(json.dumps(out))


def measure(root: Path, n: int, mode: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", str(root), str(n), mode], check=True,
                          capture_output=True, text=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", default=None, metavar="REV")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fit_round.json")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    roots = {"current": ROOT}
    worktree = None
    if args.compare:
        worktree = Path(tempfile.mkdtemp(prefix="vlm-al-fit-round-")) / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.compare], cwd=ROOT, check=True,
                       capture_output=True)
        roots["reference"] = worktree
    result: dict[str, Any] = {
        "what": __doc__.splitlines()[0],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revisions": {name: subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                           text=True).stdout.strip() for name, root in roots.items()},
        "sizes": {},
    }
    if args.compare:
        result["revisions"]["current_has_uncommitted_changes"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
            text=True).stdout.strip())
    try:
        for n in args.sizes:
            size: dict[str, Any] = {name: {"runs": []} for name in roots}
            for _ in range(args.repeats):
                for name, root in roots.items():  # interleaved: each pair sees about the same load
                    size[name]["runs"].append(measure(root, n, "time"))
            for name, root in roots.items():
                size[name]["traced_peak_mb"] = measure(root, n, "memory")["traced_peak_mb"]
                size[name]["seconds_median"] = round(statistics.median(r["seconds"] for r in size[name]["runs"]), 3)
            if args.compare:
                size["seconds_ratio_current_to_reference"] = round(
                    size["current"]["seconds_median"] / size["reference"]["seconds_median"], 2)
                size["same_first_ranked"] = (size["current"]["runs"][0]["first_ranked"]
                                             == size["reference"]["runs"][0]["first_ranked"])
            result["sizes"][str(n)] = size
            print(json.dumps({"n": n, **{name: {k: v for k, v in s.items() if k != "runs"} if isinstance(s, dict)
                                            else s for name, s in size.items()}}), flush=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    result["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    sys.path.insert(0, str(ROOT))
    from model.io import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
