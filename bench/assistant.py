"""The labeling assistant on the offline benchmark: auto-accept, likely label errors, the stopping signal, and
(against a real Label Studio) the time from a task's import to its queued prediction.

On cached features of a data set's pool (``model.split_features``) with the simulated oracle
(``model.simulate.oracle``: the simulated VLM's coarse answers through a known T), one learner round as the server
runs it (``SERVER_SETTINGS``):

- **auto-accept**: ``--auto-labels`` random human labels from a correct oracle; per-class Clopper-Pearson thresholds
  from out-of-fold predictions; the unlabeled pool is accepted or audited; audited precision is what the oracle
  says of the audit sample, and the precision of every accepted label against the truth is reported beside it.
- **label errors**: ``--error-labels`` human labels of which 5% are flipped to another fine class (the injected
  errors); cleanlab's list on out-of-fold probabilities, precision and recall at k = the number injected.
- **stopping**: the suggestion from cross-validation on ``--stop-at`` human labels against the real learning curve
  (fine accuracy on the test split of models trained on growing random label sets of the pool): where the real
  curve's gain per 100 labels falls below the same threshold.
- **arrival** (skipped with ``--no-arrival``): Label Studio and the backend on loopback, a fit on a few labels, then tasks imported;
  seconds until each has a prediction of the current model_version (no retrain in between).

    .venv/bin/python bench/assistant.py                       # writes bench/results/assistant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.assistant import (  # noqa: E402
    AuditRecord,
    class_thresholds,
    decide_auto_accept,
    fit_inverse_power_law,
    likely_label_errors,
    suggest_stopping,
    summarize_audits,
)
from model.assistant.stopping import GAIN_PER_100_FLAT, human_label_curve  # noqa: E402
from model.hierarchy import MISSING_LABEL  # noqa: E402
from model.io import atomic_write_json  # noqa: E402
from model.learner import SERVER_SETTINGS, ActiveLearner, RoundLabels  # noqa: E402

INJECTED_RATE = 0.05


def load_data(dataset: str, pool_size: int, test_size: int, cache_dir: str):
    from model.simulate.datasets import BACKBONE_SPEC, BenchmarkData, load_splits
    from model.simulate.options import SimulationOptions
    from model.split_features import cached_split_features

    options = SimulationOptions(dataset=dataset, pool_size=pool_size, test_size=test_size, cache_dir=cache_dir)
    pool_split, test_split, _ = load_splits(options)
    pool = cached_split_features(pool_split, BACKBONE_SPEC, options.image_size, cache_dir=cache_dir, threads=1)
    test = cached_split_features(test_split, BACKBONE_SPEC, options.image_size, cache_dir=cache_dir, threads=1)
    return BenchmarkData(pool_split.hierarchy, pool.embeddings, pool.fine_labels, test.embeddings, test.fine_labels)


def inject_errors(true_fine: np.ndarray, rows: np.ndarray, rate: float, n_fine: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's answers on ``rows`` with ``rate`` of them flipped to another class; (labels, flipped rows)."""
    labels = true_fine.copy()
    flipped = np.sort(rng.choice(rows, size=int(round(rate * rows.size)), replace=False))
    labels[flipped] = (true_fine[flipped] + rng.integers(1, n_fine, size=flipped.size)) % n_fine
    return labels, flipped


class Bench:
    def __init__(self, data, weak_answers: np.ndarray, seed: int) -> None:
        self.data = data
        self.weak = weak_answers
        self.seed = seed
        self.learner = ActiveLearner(data.hierarchy, data.pool_embeddings.shape[1],
                                     replace(SERVER_SETTINGS, seed=seed, num_threads=1))

    def labels(self, fine: np.ndarray) -> RoundLabels:
        return RoundLabels(fine=fine, weak_coarse=self.weak, weak_answers=self.weak,
                           trusted_coarse=self.data.hierarchy.coarse_of_fine_labels(fine))

    def pool_labels(self, rows: np.ndarray, answers: np.ndarray) -> np.ndarray:
        fine = np.full(self.data.pool_fine.shape[0], MISSING_LABEL, dtype=np.int64)
        fine[rows] = answers[rows]
        return fine

    def test_accuracy(self, classifier) -> float:
        predicted = classifier.predict_fine_proba(self.data.test_embeddings).argmax(axis=1)
        return float(np.mean(predicted == self.data.test_fine))

    def auto_accept(self, n_labels: int, target: float, audit_share: float) -> dict:
        rng = np.random.default_rng([self.seed, 1])
        rows = np.sort(rng.choice(self.data.pool_fine.size, n_labels, replace=False))
        fine = self.pool_labels(rows, self.data.pool_fine)
        labels = self.labels(fine)
        model = self.learner.train(self.data.pool_embeddings, labels)
        oof_rows, oof = self.learner.out_of_fold_fine(self.data.pool_embeddings, labels, model)
        thresholds = class_thresholds(oof.max(axis=1), oof.argmax(axis=1), oof.argmax(axis=1) == fine[oof_rows],
                                      self.data.hierarchy.n_fine, target)
        unlabeled = np.flatnonzero(fine == MISSING_LABEL)
        decision = decide_auto_accept(model.fine_probabilities[unlabeled], thresholds, (), audit_share, rng)
        audited = unlabeled[decision.audit]
        accepted = unlabeled[decision.accepted]
        audit = summarize_audits([AuditRecord(int(decision.predicted[i]), int(self.data.pool_fine[unlabeled[i]]))
                                  for i in decision.audit], target)
        accepted_correct = decision.predicted[decision.accepted] == self.data.pool_fine[accepted]
        names = self.data.hierarchy.fine_classes
        return {
            "target": target,
            "audited_precision": None if audit.precision is None else round(audit.precision, 4),
            "share_auto_accepted": round(accepted.size / unlabeled.size, 4),
            "n_human_labels": n_labels, "n_unlabeled": int(unlabeled.size), "n_accepted": int(accepted.size),
            "n_audited": int(audited.size), "audit_share": audit_share,
            "accepted_true_precision": None if accepted.size == 0 else round(float(accepted_correct.mean()), 4),
            "paused_after_audit": sorted(names[c] for c in audit.paused),
            "per_class": {names[t.fine_class]: {**t.to_dict(), "audited": audit.audited.get(t.fine_class, 0),
                                                 "audited_precision": audit.class_precision(t.fine_class)}
                          for t in thresholds},
        }

    def label_errors(self, n_labels: int) -> dict:
        rng = np.random.default_rng([self.seed, 2])
        rows = np.sort(rng.choice(self.data.pool_fine.size, n_labels, replace=False))
        answers, flipped = inject_errors(self.data.pool_fine, rows, INJECTED_RATE, self.data.hierarchy.n_fine, rng)
        fine = self.pool_labels(rows, answers)
        labels = self.labels(fine)
        model = self.learner.train(self.data.pool_embeddings, labels)
        oof_rows, oof = self.learner.out_of_fold_fine(self.data.pool_embeddings, labels, model)
        issues = likely_label_errors(fine[oof_rows], oof)
        ranked = oof_rows[[issue.row for issue in issues]]
        k = int(flipped.size)
        hits_at_k = int(np.isin(ranked[:k], flipped).sum())
        return {
            "injected_rate": INJECTED_RATE, "k": k,
            "precision_at_k": round(hits_at_k / k, 4), "recall_at_k": round(hits_at_k / k, 4),
            "n_human_labels": n_labels, "n_flagged": int(ranked.size),
            "precision_of_flagged": round(float(np.isin(ranked, flipped).mean()), 4) if ranked.size else None,
            "recall_of_flagged": round(float(np.isin(flipped, ranked).mean()), 4),
            "note": "k = the number of injected errors, so precision and recall at k are equal",
        }

    def stopping(self, stop_at: int, real_sizes: list[int]) -> dict:
        rng = np.random.default_rng([self.seed, 3])
        order = rng.permutation(self.data.pool_fine.size)
        fine = self.pool_labels(np.sort(order[:stop_at]), self.data.pool_fine)
        labels = self.labels(fine)
        model = self.learner.train(self.data.pool_embeddings, labels)
        from model.finegrained import FineGrainedClassifier

        def new_classifier(config):
            return FineGrainedClassifier(self.data.hierarchy, self.data.pool_embeddings.shape[1], config)

        transition = None if model.transition is None else model.transition.matrix
        curve = human_label_curve(new_classifier, model.training_config, self.data.pool_embeddings, fine,
                                  self.weak, transition, n_folds=3, seed=self.seed)
        law = fit_inverse_power_law(curve.sizes, curve.accuracy, curve.standard_error)
        suggestion = suggest_stopping(law, stop_at)
        # The real curve: the same round on growing random label sets (nested: the first n of one order).
        real = []
        for size in real_sizes:
            subset = self.pool_labels(np.sort(order[:size]), self.data.pool_fine)
            real.append(self.test_accuracy(self.learner.train(self.data.pool_embeddings,
                                                              self.labels(subset)).classifier))
        real_law = fit_inverse_power_law(np.asarray(real_sizes), np.asarray(real))
        measured_gain = {f"{a}->{b}": round(100 * 100 * (y - x) / (b - a), 2)
                         for a, b, x, y in zip(real_sizes[:-1], real_sizes[1:], real[:-1], real[1:])}
        return {
            "seed": self.seed,
            "real_curve_flattens_at": None if real_law is None else real_law.flattens_at(),
            "labels_at_suggestion": stop_at,
            "suggestion": suggestion.to_dict(),
            "cross_validated_curve": curve.to_dict(),
            "cross_validated_fit": None if law is None else law.to_dict(),
            "real_curve": {"sizes": real_sizes, "test_accuracy": [round(a, 4) for a in real]},
            "real_fit": None if real_law is None else real_law.to_dict(),
            "real_gain_points_per_100_between_points": measured_gain,
            "predicted_accuracy_at_real_sizes": None if law is None else
            [round(float(law(n)), 4) for n in real_sizes],
        }


STOPPING_TOLERANCE = 0.5
"""The suggestion counts as right when it is within 50% of where the real curve flattens."""


def aggregate_stopping(runs: list[dict], real_sizes: list[int]) -> dict:
    """The median suggestion over seeds against where the seeds' mean real curve flattens."""
    real = np.mean([run["real_curve"]["test_accuracy"] for run in runs], axis=0)
    real_law = fit_inverse_power_law(np.asarray(real_sizes), real)
    flattens = None if real_law is None else real_law.flattens_at()
    suggested = [run["suggestion"]["suggested_labels"] for run in runs]
    median = None if None in suggested else int(np.median(suggested))
    return {
        "suggested_labels": median,
        "labels_where_curve_flattens": flattens,
        "relative_error": None if median is None or flattens is None else round(abs(median - flattens) / flattens, 3),
        "tolerance": STOPPING_TOLERANCE,
        "threshold_gain_per_100": GAIN_PER_100_FLAT,
        "labels_at_suggestion": runs[0]["labels_at_suggestion"],
        "suggestions": [run["suggestion"]["text"] for run in runs],
        "suggested_labels_per_seed": suggested,
        "real_curve_mean": {"sizes": real_sizes, "test_accuracy": [round(float(a), 4) for a in real]},
        "real_fit": None if real_law is None else real_law.to_dict(),
        "per_seed": runs,
    }


def measure_arrival(n_first: int = 16, n_labeled: int = 8, batches: int = 3, per_batch: int = 3) -> dict:
    """Label Studio and this backend on loopback (as the e2e tests run them), a fit on ``n_labeled`` human labels,
    then ``batches`` imports of ``per_batch`` tasks: seconds from the import request to a prediction of the current
    model_version in Label Studio, per task."""
    import secrets
    import tempfile

    from harness import ls_bootstrap as lsb
    from backend.label_config import parse_label_config, recommended_label_config
    from backend.state import ProjectState
    from model.datasets import fashion_mnist_hierarchy

    image_size = 112
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        login = lsb.LabelStudioLogin("bench@vlm-al.local", secrets.token_urlsafe(12), lsb.new_token())
        ls_port, backend_port = lsb.ephemeral_port(), lsb.ephemeral_port()
        label_studio = lsb.LabelStudioServer(lsb.ensure_label_studio_venv(None), root / "ls", root / "files", login,
                                             port=ls_port, log_path=root / "ls.log")
        model_dir = root / "model_dir"
        backend = lsb.BackendServer(
            {**lsb.clean_environment(Path(sys.executable).parent), "LABEL_STUDIO_URL": label_studio.url,
             "LABEL_STUDIO_API_KEY": login.token, "MODEL_DIR": str(model_dir), "WEAK_ANNOTATOR": "imagenet-map",
             "IMAGE_SIZE": str(image_size), "FIT_DEBOUNCE_SECONDS": "1", "TORCH_THREADS": "1"},
            log_path=root / "backend.log", port=backend_port,
            command=[sys.executable, "-m", "gunicorn", "backend.wsgi:app", "--bind", f"127.0.0.1:{backend_port}"],
            cwd=ROOT)
        label_studio.start()
        backend.start()
        try:
            client = label_studio.client()
            labeling_xml = recommended_label_config(fashion_mnist_hierarchy())
            labeling = parse_label_config(labeling_xml)
            project_id = lsb.create_project(client, "arrival", labeling_xml)
            images_dir = root / "files" / "arrival"
            images = lsb.write_fashion_mnist_pngs(images_dir, n_first + batches * per_batch, size=image_size, seed=3)
            lsb.connect_local_files_storage(client, project_id, images_dir, root / "files")
            task_ids = lsb.import_image_tasks(client, project_id, images.paths[:n_first], root / "files")
            lsb.connect_ml_backend(client, project_id, backend.url)
            for task_id, fine in list(zip(task_ids, images.class_names))[:n_labeled]:
                coarse = labeling.hierarchy.parent_name(fine)
                client.annotations.create(id=task_id, result=[
                    {"from_name": labeling.coarse_control, "to_name": labeling.image_name, "type": "choices",
                     "value": {"choices": [coarse]}},
                    {"from_name": labeling.fine_control_by_coarse[coarse], "to_name": labeling.image_name,
                     "type": "choices", "value": {"choices": [fine]}}])
            state = ProjectState(model_dir, project_id)

            def fitted() -> str | None:
                current = state.current()
                if current is None or current.metrics.get("n_fine") != n_labeled:
                    return None
                version = client.projects.get(project_id).model_version
                return version if version == current.model_version else None

            version = lsb.wait_until(fitted, 600, "the first fit", interval_s=1.0)
            seconds = []
            for batch in range(batches):
                paths = images.paths[n_first + batch * per_batch: n_first + (batch + 1) * per_batch]
                started = time.monotonic()
                new_ids = set(lsb.import_image_tasks(client, project_id, paths, root / "files"))
                arrived: dict[int, float] = {}
                while len(arrived) < len(new_ids) and time.monotonic() - started < 300:
                    for prediction in lsb.project_predictions(client, project_id):
                        if prediction["task"] in new_ids and prediction["model_version"] == version:
                            arrived.setdefault(prediction["task"], time.monotonic() - started)
                    time.sleep(0.2)
                seconds.extend(arrived.values())
                if len(arrived) < len(new_ids):
                    raise SystemExit(f"arrival: {len(new_ids) - len(arrived)} tasks got no {version} prediction")
            retrained = state.current().model_version != version
        finally:
            backend.stop()
            label_studio.stop()
    return {"median_seconds": round(float(np.median(seconds)), 2), "max_seconds": round(float(max(seconds)), 2),
            "per_task_seconds": [round(s, 2) for s in seconds], "n_tasks": len(seconds), "model_version": version,
            "retrained_in_between": retrained,
            "how": "import request -> a prediction of the current model_version visible in Label Studio, polled "
                   "every 0.2 s (the TASKS_CREATED webhook embeds, weak-labels and scores them)"}


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "load_average_1min_start": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--pool-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--cache-dir", default="~/.cache/vlm-al")
    parser.add_argument("--simulated-accuracy", type=float, default=0.85)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--audit-share", type=float, default=0.1)
    parser.add_argument("--auto-labels", type=int, default=1500)
    parser.add_argument("--error-labels", type=int, default=1000)
    parser.add_argument("--stop-at", type=int, default=200)
    parser.add_argument("--real-sizes", default="50,100,200,300,450,600,800,1000,1300,1700,2200,3000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stopping-seeds", type=int, default=3, help="seeds of the stopping comparison")
    parser.add_argument("--no-arrival", action="store_true", help="skip timing arrival against Label Studio")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "assistant.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    info = machine()
    from model.simulate.oracle import simulated_answers

    data = load_data(args.dataset, args.pool_size, args.test_size, args.cache_dir)
    bench = Bench(data, simulated_answers(args.seed, data, args.simulated_accuracy), args.seed)
    timings = {}
    results: dict = {}
    real_sizes = [int(s) for s in args.real_sizes.split(",")]

    def stopping() -> dict:
        runs = [bench.stopping(args.stop_at, real_sizes)]
        for seed in range(args.seed + 1, args.seed + args.stopping_seeds):
            runs.append(Bench(data, simulated_answers(seed, data, args.simulated_accuracy), seed).stopping(
                args.stop_at, real_sizes))
        return aggregate_stopping(runs, real_sizes)

    for name, run in (("auto_accept", lambda: bench.auto_accept(args.auto_labels, args.target, args.audit_share)),
                      ("label_errors", lambda: bench.label_errors(args.error_labels)),
                      ("stopping", stopping)):
        begun = time.perf_counter()
        results[name] = run()
        timings[name] = round(time.perf_counter() - begun, 1)
        print(name, json.dumps({k: v for k, v in results[name].items() if not isinstance(v, (dict, list))}),
              flush=True)
    arrival = None
    if not args.no_arrival:
        arrival = measure_arrival()
    results["arrival_seconds"] = None if arrival is None else arrival["median_seconds"]
    results["arrival"] = arrival
    results["setting"] = {"dataset": args.dataset, "pool_size": int(data.pool_fine.size),
                          "test_size": int(data.test_fine.size), "weak_annotator": "simulated",
                          "simulated_accuracy": args.simulated_accuracy, "seed": args.seed,
                          "learner": "SERVER_SETTINGS"}
    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    results["machine"] = info
    results["seconds"] = {**timings, "total": round(time.perf_counter() - started, 1)}
    write_results(Path(args.out), results)


HEADLINE_KEYS = {
    "auto_accept": ("target", "audited_precision", "share_auto_accepted"),
    "label_errors": ("injected_rate", "k", "precision_at_k", "recall_at_k"),
    "stopping": ("suggested_labels", "labels_where_curve_flattens"),
}


def write_results(out: Path, results: dict) -> None:
    """``out`` holds exactly the keys checks read (plus the machine and its load); everything else (per-class
    thresholds, curves, seeds, arrival per task) goes beside it, to ``<out stem>_details.json``."""
    details = out.with_name(out.stem + "_details.json")
    headline = {name: {key: results[name][key] for key in keys} for name, keys in HEADLINE_KEYS.items()}
    headline["arrival_seconds"] = results["arrival_seconds"]
    headline["machine"] = {**results["machine"], "seconds": results["seconds"], "details": details.name}
    atomic_write_json(out, headline)
    atomic_write_json(details, results)
    print(f"wrote {out} and {details}")


if __name__ == "__main__":
    main()
