"""``vlm-al replay``: the product's own learning curve, measured through a real Label Studio.

It runs the whole product as a user does. A real Label Studio and this backend (``vlm-al serve``) run on
loopback. Each run is a fresh Label Studio project over a pool of benchmark images whose true labels the replay
keeps aside. A simulated annotator repeatedly takes the task that ``GET /api/projects/{id}/next/`` serves (the
project's sampling decides which) and submits its true fine label through the API (or, with probability
``coarse_only_probability``, only its coarse choice). The backend retrains from Label Studio's webhooks, as it
does for users.

Every ``labels_per_checkpoint`` labels the annotator pauses until Label Studio's queue follows a model trained on
all of them, and the replay records:
- the fine accuracy of the backend's current model (its saved checkpoint) on held-out test images;
- whether the fine suggestion pre-ticked on each task the annotator was served was wrong;
- the seconds from the last annotation to the re-ordered queue (the project's model_version moved to a model that
  saw every label).

The same runs under Label Studio's ``Uniform sampling`` give the comparison, and ``vlm-al simulate``'s offline
``ours`` runs on the same pool, test images, embeddings and weak answers. Weak annotators: ``semantic`` (the
server's real offline default) and ``simulated`` (answers drawn from the ground truth through a known T, the
benchmark's good VLM, handed to the server as WEAK_ANNOTATOR=simulated; replay only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import ls_bootstrap as lsb
from backend.label_config import ProjectLabeling, parse_label_config, recommended_label_config
from backend.state import ProjectState
from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy

logger = logging.getLogger("vlm-al.replay")

ANNOTATORS = ("semantic", "simulated")
SAMPLINGS = {"uncertainty": lsb.UNCERTAINTY_SAMPLING, "uniform": "Uniform sampling"}
"""Replay strategy -> Label Studio project sampling. Both projects are connected to the backend, which trains on
both; only the order Label Studio serves tasks in differs."""
REPLAY_USERNAME = "replay@vlm-al.local"
DEFAULT_OUT = Path("bench/results/replay")
IMAGE_PAD: dict[str, float] = {"fashion-mnist": 0.15}
"""White margin around each written image (the benchmark's weak-annotator input for Fashion-MNIST)."""
IMAGE_SIZE = 112
"""The backbone's input size, as in ``vlm-al simulate``."""
POLL_S = 0.5
ATTEMPTS = 5
"""Label Studio calls are tried this often: on 2 shared cores a loaded Label Studio sometimes answers a request
after the client's timeout, and one such hiccup must not end an hour-long replay."""
CLIENT_TIMEOUT_S = 300.0
RUNS_FILE = "runs.jsonl"
"""Finished runs, one JSON line each, in the work directory: a replay started again on it skips them."""


def transient_errors() -> tuple[type[BaseException], ...]:
    import httpx
    import requests
    from label_studio_sdk.core.api_error import ApiError

    return (requests.RequestException, httpx.HTTPError, ApiError, lsb.LabelStudioError)


def retried(call: Any, what: str, attempts: int = ATTEMPTS) -> Any:
    """``call()``, tried again after a transient Label Studio error (timeouts, 5xx), with a growing pause."""
    errors = transient_errors()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except errors as exc:
            if attempt == attempts:
                raise
            logger.warning("%s failed (%s); trying again (%d/%d)", what, exc, attempt, attempts - 1)
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ReplayOptions:
    dataset: str = "fashion-mnist"
    pool_size: int = 300
    """Tasks per project; each seed draws a pool disjoint from the others' (one weak-answer table serves all)."""
    test_size: int = 500
    seeds: int = 3
    labels_per_checkpoint: int = 10
    checkpoints: int = 6
    annotators: tuple[str, ...] = ANNOTATORS
    strategies: tuple[str, ...] = tuple(SAMPLINGS)
    coarse_only_probability: float = 0.0
    simulated_accuracy: float = 0.85
    out: Path = DEFAULT_OUT
    work_dir: Path | None = None
    """Images, Label Studio's database, model dirs and logs (default: a fresh temporary directory)."""
    label_studio_venv: Path | None = None
    fit_timeout_s: float = 600.0

    def validate(self) -> None:
        for name in ("pool_size", "test_size", "seeds", "labels_per_checkpoint", "checkpoints"):
            if getattr(self, name) < 1:
                raise ModelInputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.labels_per_checkpoint * self.checkpoints > self.pool_size:
            raise ModelInputError("--labels-per-checkpoint x --checkpoints must not exceed --pool-size")
        if not 0.0 <= self.coarse_only_probability < 1.0:
            raise ModelInputError("--coarse-only-probability must be in [0, 1)")
        if not 0.0 < self.simulated_accuracy <= 1.0:
            raise ModelInputError("--simulated-accuracy must be in (0, 1]")
        unknown = [a for a in self.annotators if a not in ANNOTATORS] + [
            s for s in self.strategies if s not in SAMPLINGS
        ]
        if unknown or not self.annotators or not self.strategies:
            raise ModelInputError(f"unknown or no annotators/strategies {unknown}; choose from "
                                  f"{list(ANNOTATORS)} and {list(SAMPLINGS)}")

    @property
    def labels(self) -> list[int]:
        return [self.labels_per_checkpoint * (i + 1) for i in range(self.checkpoints)]


# --------------------------------------------------------------------------------------------------- the data


@dataclass
class ReplayData:
    """The images the replay writes and embeds, with their ground truth (never shown to the backend)."""

    hierarchy: LabelHierarchy
    pool_paths: list[list[Path]]
    """Per seed: the PNG files of that seed's pool, in task order."""
    pool_fine: list[np.ndarray]
    """Per seed: true fine class index per pool image."""
    test_paths: list[Path]
    test_fine: np.ndarray


def write_replay_images(options: ReplayOptions, images_dir: Path) -> ReplayData:
    """Disjoint pools (one per seed) from the train split, one test set from the test split, as PNG files."""
    from model.datasets import create_dataset

    dataset = create_dataset(options.dataset)
    train, test = dataset.split("train"), dataset.split("test")
    needed = options.pool_size * options.seeds
    if needed > len(train) or options.test_size > len(test):
        raise ModelInputError(
            f"{options.dataset}: {options.seeds} disjoint pools of {options.pool_size} and {options.test_size} test "
            f"images need {needed} train and {options.test_size} test images; it has {len(train)} and {len(test)}"
        )
    pad = IMAGE_PAD.get(options.dataset, 0.0)
    order = np.random.default_rng(0).permutation(len(train))
    pool_paths, pool_fine = [], []
    for seed in range(options.seeds):
        indices = sorted(int(i) for i in order[seed * options.pool_size:(seed + 1) * options.pool_size])
        names = [f"train-{i:05d}.png" for i in indices]
        pool_paths.append(_write_missing(train, indices, names, images_dir / f"pool-seed{seed}", pad))
        pool_fine.append(np.asarray(train.fine_labels, dtype=np.int64)[indices])
    test_indices = sorted(int(i) for i in np.random.default_rng(1).permutation(len(test))[: options.test_size])
    test_paths = _write_missing(test, test_indices, [f"test-{i:05d}.png" for i in test_indices],
                                images_dir / "test", pad)
    return ReplayData(dataset.hierarchy, pool_paths, pool_fine, test_paths,
                      np.asarray(test.fine_labels, dtype=np.int64)[test_indices])


def _write_missing(split: Any, indices: Sequence[int], names: Sequence[str], directory: Path,
                   pad: float) -> list[Path]:
    from model.split_features import pad_image

    paths = [directory / name for name in names]
    missing = [(i, p) for i, p in zip(indices, paths) if not p.exists()]
    lsb.write_pngs((pad_image(split.image(i), pad) for i, _ in missing), directory, [p.name for _, p in missing])
    return paths


# ------------------------------------------------------------------------------------------- the backend's eyes


class BackendView:
    """The backend's own image pipeline, run in this process on the replay's files: embeddings for the offline
    curve and the test set, and the weak answers the server gives each pool image."""

    def __init__(self, env: Mapping[str, str]) -> None:
        from backend.components import build_image_codec
        from backend.config import Config

        self.config = Config.from_env(env)
        self.codec = build_image_codec(self.config)
        self._backbone: Any = None
        self._weak_annotators: Any = None

    @property
    def backbone(self) -> Any:
        if self._backbone is None:
            from backend.components import build_backbone

            self._backbone = build_backbone(self.config)
        return self._backbone

    def decode(self, paths: Sequence[Path]) -> list[Any]:
        return [self.codec.decode(Path(p).read_bytes()) for p in paths]

    def embed(self, paths: Sequence[Path], chunk: int = 64) -> np.ndarray:
        parts = [np.asarray(self.backbone.embed(self.decode(paths[i:i + chunk])), dtype=np.float32)
                 for i in range(0, len(paths), chunk)]
        return np.concatenate(parts)

    def weak_answers(self, paths: Sequence[Path], hierarchy: LabelHierarchy) -> np.ndarray:
        """The coarse index (project order) the server's weak annotator gives each image, -1 for none."""
        from backend.components import build_weak_annotator
        from backend.features import WeakAnnotators, weak_in_project_order
        from backend.training import weak_answers

        if self._weak_annotators is None:
            # Built once, like the server's: its per-hierarchy cache serves every seed's pool.
            self._weak_annotators = WeakAnnotators(*build_weak_annotator(self.config, self.backbone))
        annotator = self._weak_annotators.for_hierarchy(hierarchy)
        if annotator is None:
            return np.full(len(paths), MISSING_LABEL, dtype=np.int64)
        labels = annotator.annotate(self.decode(paths))
        probabilities = weak_in_project_order(labels.coarse_probabilities, annotator.coarse_classes, hierarchy)
        return weak_answers(probabilities)


def simulated_answer_table(data: ReplayData, view: BackendView, accuracy: float, table_path: Path) -> None:
    """Draw each pool image's answer through the benchmark's known T (one stream per seed) and write the table
    the server's WEAK_ANNOTATOR=simulated reads, keyed by the decoded pixels the server will see."""
    from model.simulate.oracle import draw_weak_labels, seed_rng, simulated_transition_matrix
    from model.weak.lookup import image_digest, write_answer_table

    transition = simulated_transition_matrix(data.hierarchy, accuracy)
    answers: dict[str, str] = {}
    for seed, (paths, fine) in enumerate(zip(data.pool_paths, data.pool_fine)):
        drawn = draw_weak_labels(data.hierarchy.parent_array[fine], transition, seed_rng(seed, "simulated-vlm"))
        for image, answer in zip(view.decode(paths), drawn):
            answers[image_digest(image)] = data.hierarchy.coarse_classes[int(answer)]
    write_answer_table(table_path, data.hierarchy.coarse_classes, answers)


# --------------------------------------------------------------------------------------------------- one run


@dataclass
class Checkpoint:
    labels: int
    accuracy: float
    model_version: str
    seconds_to_reordered_queue: float


@dataclass
class RunRecord:
    annotator: str
    strategy: str
    seed: int
    project_id: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    pretick_shown: int = 0
    """Served tasks whose current prediction pre-ticked a fine label."""
    pretick_wrong: int = 0
    served_fine_labels: int = 0
    served_coarse_only: int = 0
    code_commit: str | None = None
    """The commit the backend ran (a resumed replay may finish its runs on a later one)."""


def load_finished_runs(work_dir: Path) -> dict[tuple[str, str, int], RunRecord]:
    """The runs a previous replay on ``work_dir`` finished (see ``RUNS_FILE``)."""
    path = work_dir / RUNS_FILE
    finished: dict[tuple[str, str, int], RunRecord] = {}
    if not path.exists():
        return finished
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        raw = json.loads(line)
        record = RunRecord(**{**raw, "checkpoints": [Checkpoint(**c) for c in raw["checkpoints"]]})
        finished[(record.annotator, record.strategy, record.seed)] = record
    return finished


def check_same_options(work_dir: Path, options: ReplayOptions) -> None:
    """A work directory belongs to one set of options: its finished runs are only reused by the same replay."""
    from model.io import atomic_write_json

    path = work_dir / "replay-options.json"
    wanted = {k: v for k, v in asdict(options).items() if k not in ("out", "work_dir", "label_studio_venv",
                                                                    "fit_timeout_s")}
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as they read back
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ModelInputError(f"{work_dir} holds a replay with other options ({', '.join(changed)}); "
                                  f"use another --work-dir")
        return
    atomic_write_json(path, wanted)


def append_finished_run(work_dir: Path, record: RunRecord) -> None:
    with open(work_dir / RUNS_FILE, "a") as runs:
        runs.write(json.dumps(asdict(record)) + "\n")
        runs.flush()
        os.fsync(runs.fileno())


class ReplayProject:
    """One Label Studio project under one sampling, its truth kept aside, and the simulated annotator on it."""

    def __init__(self, ls: lsb.LabelStudioServer, backend_url: str, model_dir: Path, labeling: ProjectLabeling,
                 label_config: str, title: str, sampling: str) -> None:
        from label_studio_sdk import LabelStudio

        self.ls = ls
        # A longer timeout than the SDK's: a loaded Label Studio on 2 shared cores takes minutes for an import.
        self.client = LabelStudio(base_url=ls.url, api_key=ls.login.token, timeout=CLIENT_TIMEOUT_S)
        self.labeling = labeling
        self.model_dir = model_dir
        self.project_id = lsb.create_project(self.client, title, label_config, sampling=sampling)
        self.backend_url = backend_url
        self.truth: dict[int, str] = {}

    def import_pool(self, paths: Sequence[Path], fine_names: Sequence[str]) -> None:
        directory = paths[0].parent
        lsb.connect_local_files_storage(self.client, self.project_id, directory, self.ls.document_root)
        try:
            task_ids = lsb.import_image_tasks(self.client, self.project_id, list(paths), self.ls.document_root)
        except transient_errors() as exc:
            # The import may have landed after the client gave up: read the tasks back rather than import twice.
            logger.warning("project %d: the task import failed (%s); reading back what Label Studio holds",
                           self.project_id, exc)
            task_ids = lsb.wait_until(lambda: self._imported_task_ids(paths), CLIENT_TIMEOUT_S,
                                      f"project {self.project_id}'s {len(paths)} imported tasks", interval_s=5.0)
        self.truth = dict(zip(task_ids, fine_names, strict=True))

    def _imported_task_ids(self, paths: Sequence[Path]) -> list[int] | None:
        """The task id of each path, in order, once every one is in the project (None before)."""
        by_name: dict[str, int] = {}
        for task in self.client.tasks.list(project=self.project_id):
            url = str((task.data or {}).get("image", ""))
            by_name[url.rsplit("/", 1)[-1]] = int(task.id)
        if len(by_name) > len(paths):
            raise lsb.LabelStudioError(f"project {self.project_id} holds more tasks than were imported")
        ids = [by_name.get(Path(p).name) for p in paths]
        return None if any(i is None for i in ids) else [int(i) for i in ids]  # type: ignore[arg-type]

    def connect_and_wait_for_first_predictions(self, timeout_s: float) -> str:
        lsb.connect_ml_backend(self.client, self.project_id, self.backend_url)

        def ready() -> str | None:
            version = self.client.projects.get(self.project_id).model_version
            if not version or version == "vlm-al":
                return None
            covered = {p["task"] for p in lsb.project_predictions(self.client, self.project_id)
                       if p["model_version"] == version}
            return version if set(self.truth) <= covered else None

        return lsb.wait_until(ready, timeout_s, f"project {self.project_id}'s first predictions", interval_s=1.0)

    def model_version(self) -> str | None:
        return retried(lambda: self.client.projects.get(self.project_id).model_version, "reading model_version")

    def serve(self) -> dict[str, Any]:
        return retried(lambda: lsb.next_task(self.ls.url, self.ls.login.token, self.project_id), "GET next task")

    def shown_fine_suggestion(self, task: Mapping[str, Any]) -> str | None:
        """The fine label pre-ticked on the labeling page: the current version's prediction of this task."""
        version = self.model_version()
        predictions = task.get("predictions")
        if predictions is None:
            predictions = retried(lambda: lsb.api_get(self.ls.url, self.ls.login.token, f"/api/tasks/{task['id']}/"),
                                  "reading a task").get("predictions", [])
        fine_controls = set(self.labeling.fine_control_by_coarse.values())
        if self.labeling.fine_control:
            fine_controls.add(self.labeling.fine_control)
        for prediction in predictions:
            if prediction.get("model_version") != version:
                continue
            for item in prediction.get("result") or []:
                if item.get("from_name") in fine_controls and item.get("value", {}).get("choices"):
                    return str(item["value"]["choices"][0])
        return None

    def annotate(self, task_id: int, coarse_only: bool) -> None:
        fine = self.truth[task_id]
        hierarchy = self.labeling.hierarchy
        coarse = hierarchy.parent_name(fine)
        image = self.labeling.image_name
        result = [{"from_name": self.labeling.coarse_control, "to_name": image, "type": "choices",
                   "value": {"choices": [coarse]}}]
        if not coarse_only:
            result.append({"from_name": self.labeling.fine_control_by_coarse[coarse], "to_name": image,
                           "type": "choices", "value": {"choices": [fine]}})
        def submit() -> None:
            # A submission that timed out may still have been saved: never annotate a task twice.
            if self.client.tasks.get(task_id).total_annotations:
                return
            self.client.annotations.create(id=task_id, result=result)

        retried(submit, f"annotating task {task_id}")

    def wait_for_fit_on(self, n_fine: int, n_coarse: int, timeout_s: float) -> str:
        """A model that saw exactly these labels is current in the backend and Label Studio's queue follows it."""
        state = ProjectState(self.model_dir, self.project_id)

        def fitted() -> str | None:
            current = state.current()
            if current is None or current.metrics.get("n_fine") != n_fine:
                return None
            if current.metrics.get("n_human_coarse", 0) != n_coarse:
                return None
            return current.model_version if self.model_version() == current.model_version else None

        return lsb.wait_until(fitted, timeout_s, f"a model fitted on {n_fine} fine labels", interval_s=POLL_S)

    def classifier(self, model_version: str) -> Any:
        from model.finegrained import FineGrainedClassifier

        return FineGrainedClassifier.load(ProjectState(self.model_dir, self.project_id).version_dir(model_version))


def test_accuracy(classifier: Any, test_embeddings: np.ndarray, test_fine_names: Sequence[str]) -> float:
    """Fine accuracy on the test images, matching classes by name (the project's class order is its config's)."""
    predicted = classifier.predict_fine_proba(test_embeddings).argmax(axis=1)
    names = classifier.hierarchy.fine_classes
    return float(np.mean([names[int(p)] == truth for p, truth in zip(predicted, test_fine_names)]))


def replay_run(project: ReplayProject, options: ReplayOptions, record: RunRecord, test_embeddings: np.ndarray,
               test_fine_names: Sequence[str], rng: np.random.Generator) -> RunRecord:
    """The annotator labels what Label Studio serves; every checkpoint waits for the re-ordered queue."""
    n_fine = n_coarse = 0
    for labels in options.labels:
        last_annotation = time.monotonic()
        while n_fine + n_coarse < labels:
            task = project.serve()
            task_id = int(task["id"])
            suggestion = project.shown_fine_suggestion(task)
            if suggestion is not None:
                record.pretick_shown += 1
                record.pretick_wrong += int(suggestion != project.truth[task_id])
            # The first label is always fine: the backend does not train before it has one.
            coarse_only = n_fine > 0 and bool(rng.random() < options.coarse_only_probability)
            project.annotate(task_id, coarse_only)
            last_annotation = time.monotonic()
            n_coarse += int(coarse_only)
            n_fine += int(not coarse_only)
        version = project.wait_for_fit_on(n_fine, n_coarse, options.fit_timeout_s)
        seconds = time.monotonic() - last_annotation
        accuracy = test_accuracy(project.classifier(version), test_embeddings, test_fine_names)
        record.checkpoints.append(Checkpoint(labels, accuracy, version, round(seconds, 2)))
        logger.info("%s/%s seed %d: %d labels -> %s, test accuracy %.3f, queue re-ordered %.1f s after the last "
                    "label", record.annotator, record.strategy, record.seed, labels, version, accuracy, seconds)
    record.served_fine_labels, record.served_coarse_only = n_fine, n_coarse
    return record


# ------------------------------------------------------------------------------------------------ offline ours


def offline_ours(data: ReplayData, pool_embeddings: list[np.ndarray], weak: list[np.ndarray],
                 test_embeddings: np.ndarray, options: ReplayOptions, annotator: str) -> dict[str, Any]:
    """``vlm-al simulate``'s ``ours`` on the replay's pools, test images, embeddings and weak answers, in rounds
    of ``labels_per_checkpoint``: its curve against human fine labels (mean over seeds)."""
    from model.simulate.datasets import BenchmarkData
    from model.simulate.options import SimulationOptions
    from model.simulate.runner import RunJob, run_strategy

    per_class = max(1, options.labels_per_checkpoint // data.hierarchy.n_fine)
    simulation = SimulationOptions(dataset=options.dataset, seeds=options.seeds, rounds=options.checkpoints - 1,
                                   budget=float(options.labels_per_checkpoint), seed_per_class=per_class,
                                   threads=1, progress=False)
    labels, accuracy = [], []
    for seed in range(options.seeds):
        bench = BenchmarkData(data.hierarchy, pool_embeddings[seed], data.pool_fine[seed], test_embeddings,
                              data.test_fine)
        run = run_strategy(RunJob(annotator, "ours", seed), bench, weak[seed], simulation)
        labels.append(run.human_fine_labels)
        accuracy.append(run.accuracy)
    return {"labels": np.mean(labels, axis=0).round(2).tolist(),
            "accuracy_mean": np.mean(accuracy, axis=0).round(5).tolist(),
            "accuracy_std": np.std(accuracy, axis=0).round(5).tolist(),
            "seed_set_per_class": per_class}


# --------------------------------------------------------------------------------------------------- summary


def summarise(records: Sequence[RunRecord], options: ReplayOptions) -> dict[str, Any]:
    accuracy = np.array([[c.accuracy for c in r.checkpoints] for r in records], dtype=np.float64)
    seconds = np.array([[c.seconds_to_reordered_queue for c in r.checkpoints] for r in records], dtype=np.float64)
    shown = sum(r.pretick_shown for r in records)
    wrong = sum(r.pretick_wrong for r in records)
    return {
        "labels": options.labels,
        "accuracy_mean": accuracy.mean(axis=0).round(5).tolist(),
        "accuracy_std": accuracy.std(axis=0).round(5).tolist(),
        "accuracy_per_seed": accuracy.round(5).tolist(),
        "wrong_pretick_share": round(wrong / shown, 4) if shown else 0.0,
        "pretick_shown": shown,
        "pretick_wrong": wrong,
        "tasks_served": int(sum(r.served_fine_labels + r.served_coarse_only for r in records)),
        "seconds_to_reordered_queue": seconds.mean(axis=0).round(2).tolist(),
        "seconds_to_reordered_queue_max": round(float(seconds.max()), 2),
    }


def interpolate_at(labels: Sequence[float], accuracy: Sequence[float], at: Sequence[float]) -> np.ndarray:
    """A curve's accuracy at other label counts (linear; flat beyond its ends)."""
    return np.interp(np.asarray(at, float), np.asarray(labels, float), np.asarray(accuracy, float))


def targets(block: Mapping[str, Any], annotator: str) -> dict[str, Any]:
    """The issue's replay targets for one annotator, with the figures they are judged on (points)."""
    out: dict[str, Any] = {}
    uncertainty, uniform, offline = block.get("uncertainty"), block.get("uniform"), block.get("offline_ours")
    if uncertainty and offline:
        offline_at = interpolate_at(offline["labels"], offline["accuracy_mean"], uncertainty["labels"])
        gaps = (np.asarray(uncertainty["accuracy_mean"]) - offline_at) * 100
        out["uncertainty_minus_offline_ours_points"] = gaps.round(2).tolist()
        out["within_2_points_of_offline_ours"] = bool(np.all(gaps >= -2.0))
    if uncertainty and uniform:
        gain = (np.mean(uncertainty["accuracy_mean"]) - np.mean(uniform["accuracy_mean"])) * 100
        out["uncertainty_minus_uniform_points_mean_over_checkpoints"] = round(float(gain), 2)
        if annotator == "simulated":
            out["beats_uniform_by_5_points"] = bool(gain >= 5.0)
    if uncertainty:
        out["wrong_pretick_share_at_most_10_percent"] = bool(uncertainty["wrong_pretick_share"] <= 0.10)
    return out


def plot(path: Path, results: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.simulate.report import finish_axes, plot_mean_band, save_png

    annotators = list(results["annotators"])
    figure, axes = plt.subplots(1, len(annotators), figsize=(6.5 * len(annotators), 4.8), squeeze=False)
    curves = {"offline_ours": ("offline ours (vlm-al simulate)", {"color": "black", "linestyle": "--"}),
              "uncertainty": ("product: Uncertainty sampling", {"color": "tab:red"}),
              "uniform": ("product: Uniform sampling", {"color": "tab:blue"})}
    for axis, annotator in zip(axes[0], annotators):
        for name, (label, style) in curves.items():
            curve = results["annotators"][annotator].get(name)
            if curve:
                plot_mean_band(axis, curve["labels"], curve["accuracy_mean"], curve.get("accuracy_std"), label,
                               **style)
        finish_axes(axis, "human labels submitted through Label Studio",
                    "fine test accuracy of the backend's model (%)",
                    f"{results['dataset']}, weak annotator: {annotator}")
    save_png(figure, path)


# ------------------------------------------------------------------------------------------------ the servers


def backend_environment(annotator: str, label_studio: lsb.LabelStudioServer, model_dir: Path,
                        table_path: Path | None) -> dict[str, str]:
    env = {
        **lsb.clean_environment(Path(sys.executable).parent),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.login.token,
        "MODEL_DIR": str(model_dir),
        "BACKBONE": "timm:efficientnet_lite0",
        "IMAGE_SIZE": str(IMAGE_SIZE),
        "WEAK_ANNOTATOR": annotator,
        "FIT_DEBOUNCE_SECONDS": "1",
        "WORKERS": "1",
        "LOG_LEVEL": "INFO",
    }
    if table_path is not None:
        env["SIMULATED_WEAK_LABELS_FILE"] = str(table_path)
    if os.environ.get("TORCH_THREADS"):
        env["TORCH_THREADS"] = os.environ["TORCH_THREADS"]
    return env


@contextmanager
def label_studio_server(work_dir: Path, venv: Path | None) -> Iterator[lsb.LabelStudioServer]:
    venv_dir = lsb.ensure_label_studio_venv(venv, log=logger.info)
    # Kept in the work directory: Label Studio creates the user only with a fresh database, so a replay resumed
    # on the same directory must log in as before.
    login = lsb.load_or_create_login(work_dir / "label-studio-login.json", REPLAY_USERNAME)
    server = lsb.LabelStudioServer(venv_dir, work_dir / "label-studio", work_dir / "files", login,
                                   port=lsb.ephemeral_port(), log_path=work_dir / "logs" / "label-studio.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def replay(options: ReplayOptions, label_studio: lsb.LabelStudioServer, work_dir: Path) -> dict[str, Any]:
    """Every (annotator, strategy, seed) run against ``label_studio``; returns the results document."""
    options.validate()
    started = time.monotonic()
    images_dir = label_studio.document_root / "replay" / options.dataset.replace(":", "_").replace("/", "_")
    data = write_replay_images(options, images_dir)
    label_config = recommended_label_config(data.hierarchy)
    labeling = parse_label_config(label_config)
    test_fine_names = [data.hierarchy.fine_classes[int(i)] for i in data.test_fine]
    results: dict[str, Any] = {"dataset": options.dataset, "seeds": options.seeds, "annotators": {}}
    records: list[RunRecord] = []
    work_dir.mkdir(parents=True, exist_ok=True)
    check_same_options(work_dir, options)
    finished = load_finished_runs(work_dir)
    for annotator in options.annotators:
        model_dir = work_dir / f"model-dir-{annotator}"
        table = work_dir / "simulated-weak-answers.json" if annotator == "simulated" else None
        env = backend_environment(annotator, label_studio, model_dir, table)
        view = BackendView(env)
        if table is not None:
            simulated_answer_table(data, view, options.simulated_accuracy, table)
        pool_embeddings = [view.embed(paths) for paths in data.pool_paths]
        test_embeddings = view.embed(data.test_paths)
        weak = [view.weak_answers(paths, data.hierarchy) for paths in data.pool_paths]
        block: dict[str, Any] = {
            "weak_annotator": {
                "coarse_accuracy": round(float(np.mean(np.concatenate(
                    [w == data.hierarchy.parent_array[f] for w, f in zip(weak, data.pool_fine)]))), 4),
                "server_setting": f"WEAK_ANNOTATOR={annotator}",
            },
            "offline_ours": offline_ours(data, pool_embeddings, weak, test_embeddings, options, annotator),
        }
        backend = lsb.BackendServer(env, log_path=work_dir / "logs" / f"backend-{annotator}.log",
                                    port=lsb.ephemeral_port())
        backend.start()
        try:
            for strategy in options.strategies:
                runs = []
                for seed in range(options.seeds):
                    if (annotator, strategy, seed) in finished:
                        logger.info("%s/%s seed %d: finished by an earlier replay on %s", annotator, strategy, seed,
                                    work_dir)
                        runs.append(finished[(annotator, strategy, seed)])
                        continue
                    project = ReplayProject(label_studio, backend.url, model_dir, labeling, label_config,
                                            f"replay {annotator} {strategy} seed {seed}", SAMPLINGS[strategy])
                    # By name: the project's class order is its label config's, not the data set's.
                    project.import_pool(data.pool_paths[seed],
                                        [data.hierarchy.fine_classes[int(i)] for i in data.pool_fine[seed]])
                    project.connect_and_wait_for_first_predictions(options.fit_timeout_s)
                    record = RunRecord(annotator, strategy, seed, project.project_id, code_commit=code_commit())
                    rng = np.random.default_rng([seed, 7])
                    runs.append(replay_run(project, options, record, test_embeddings, test_fine_names, rng))
                    append_finished_run(work_dir, record)
                block[strategy] = summarise(runs, options)
                records.extend(runs)
        finally:
            backend.stop()
        block["targets"] = targets(block, annotator)
        results["annotators"][annotator] = block
    results["config"] = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()
           if k not in ("out", "work_dir", "label_studio_venv")},
        "backend": {k: v for k, v in backend_environment("<annotator>", label_studio, Path("<model_dir>"),
                                                         None).items()
                    if k in ("BACKBONE", "IMAGE_SIZE", "FIT_DEBOUNCE_SECONDS", "WORKERS")},
        "label_studio_version": "1.23.2",
        "offline_ours_settings": "model.learner.BENCHMARK_OURS_SETTINGS (vlm-al simulate's ours)",
        "server_settings": "model.learner.SERVER_SETTINGS via QUERY_STRATEGY=ours (the default)",
    }
    from model.simulate.report import machine_description

    results["config"]["code_commit"] = code_commit()
    results["machine"] = machine_description()
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["runs"] = [{"annotator": r.annotator, "strategy": r.strategy, "seed": r.seed, "project": r.project_id,
                        "checkpoints": [asdict(c) for c in r.checkpoints], "code_commit": r.code_commit} for r in records]
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    return results


def code_commit() -> str | None:
    """The git commit of the code the backend ran (the replay starts it from this checkout), if known."""
    import subprocess

    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                   capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def write_results(results: Mapping[str, Any], out: Path) -> None:
    from model.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    plot(out / "learning_curves.png", results)


# ------------------------------------------------------------------------------------------------------ CLI


def parse_options(argv: Sequence[str]) -> ReplayOptions:
    defaults = ReplayOptions()
    parser = argparse.ArgumentParser(prog="vlm-al replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=defaults.dataset, help="fashion-mnist, openclipart or imagefolder:DIR")
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--test-size", type=int, default=defaults.test_size)
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--labels-per-checkpoint", type=int, default=defaults.labels_per_checkpoint)
    parser.add_argument("--checkpoints", type=int, default=defaults.checkpoints)
    parser.add_argument("--annotators", default=",".join(defaults.annotators), help=f"of {','.join(ANNOTATORS)}")
    parser.add_argument("--strategies", default=",".join(defaults.strategies), help=f"of {','.join(SAMPLINGS)}")
    parser.add_argument("--coarse-only-probability", type=float, default=defaults.coarse_only_probability,
                        help="the annotator submits only the coarse choice with this probability")
    parser.add_argument("--simulated-accuracy", type=float, default=defaults.simulated_accuracy)
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="images, Label Studio's database, model dirs and logs (default: a temporary directory); "
                             "a replay started again on the same directory skips the runs it finished")
    parser.add_argument("--label-studio-venv", type=Path, default=None)
    parser.add_argument("--fit-timeout", type=float, default=defaults.fit_timeout_s)
    args = parser.parse_args(list(argv))
    options = ReplayOptions(
        dataset=args.dataset, pool_size=args.pool_size, test_size=args.test_size, seeds=args.seeds,
        labels_per_checkpoint=args.labels_per_checkpoint, checkpoints=args.checkpoints,
        annotators=tuple(a for a in args.annotators.split(",") if a),
        strategies=tuple(s for s in args.strategies.split(",") if s),
        coarse_only_probability=args.coarse_only_probability, simulated_accuracy=args.simulated_accuracy,
        out=args.out, work_dir=args.work_dir, label_studio_venv=args.label_studio_venv, fit_timeout_s=args.fit_timeout,
    )
    try:
        options.validate()
    except ModelInputError as exc:
        parser.error(str(exc))
    return options


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    options = parse_options(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="vlm-al-replay-") as temporary:
        work_dir = (options.work_dir or Path(temporary)).resolve()
        try:
            with label_studio_server(work_dir, options.label_studio_venv) as label_studio:
                results = replay(options, label_studio, work_dir)
        except (lsb.LabelStudioError, TimeoutError, ModelInputError, OSError) as exc:
            print(f"vlm-al replay: {exc}", file=sys.stderr)
            return 1
    write_results(results, options.out)
    print(json.dumps({a: b.get("targets") for a, b in results["annotators"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
