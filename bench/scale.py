"""Scale: indexing speed, the fit loop, memory and /health during a fit with a real Label Studio; RQ workers.

Usage: python bench/scale.py [--sizes 2000 5000 20000] [--runtime-images 384] [--worker-images 200]
                             [--skip-runtime] [--skip-workers] [--work-dir DIR] [--out bench/results/scale.json]

``--skip-runtime --skip-workers`` re-measures only the sizes (fit loop, memory, /health during a fit) and merges
them into --out: the indexing and workers figures of the earlier run are kept as they were measured. Sizes measured
in an earlier run and not in this one are kept.

``--work-dir DIR`` keeps the task images and each size's embedding store (embeddings and weak labels are cached by
image content) in DIR across runs: a rerun writes no image and embeds none, so the fit loop at 20k tasks can be
re-measured in minutes. Such a size's indexing is marked ``"index_cached": true`` and left out of the indexing
speed.

1. Runtime alone: the server's backbone (EMBEDDING_RUNTIME=auto, whatever it picks here, with as many callers at once
   as it runs in the server), ONNX Runtime as one run on every core, and eager torch fp32, on the same decoded
   Fashion-MNIST images, in chunks of the indexing chunk size; three rounds with the runtimes in turn, and three
   more after the sizes' indexes and fits (``bracketed``), each runtime's median of all six kept. The ratio's
   denominator is the fastest of the first two.
2. Per size n: a fresh Label Studio project of n Fashion-MNIST tasks and a fresh `vlm-al serve` (defaults, jobs on
   in-process threads). Connecting the backend starts the index; end-to-end indexing speed is n over the time from
   the connection to the last embedding (from /metrics), with the CPU seconds Label Studio and the backend used
   meanwhile. ``bound_images_per_s``: the most the cores could index end to end if they did nothing but the
   runtime's work per image (as measured alone) and Label Studio's (as measured here). Then two rounds of:
   annotate 10 tasks through Label Studio's API, and time from the last annotation to Label Studio's project
   following a model version fitted on every label so far (the re-ordered queue: its head pushed and the version
   moved). /health is polled every 20 ms during the second round; the backend's peak RSS (VmHWM of the gunicorn
   worker) is read at the end.
3. Workers: a web process and 1 or 2 `vlm-al worker` processes on one redis-server; two projects of
   --worker-images tasks each indexed at once (PUSH_PREDICTIONS=false: embedding only), from fresh MODEL_DIRs;
   images per second over both, from connecting the projects to the queue being idle.

Extrapolations to 100k tasks are least-squares lines through the measured sizes (stated as such). The load
average is written with the figures: this machine's two cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import ls_bootstrap as lsb  # noqa: E402
from backend.label_config import parse_label_config, recommended_label_config  # noqa: E402
from model.datasets import fashion_mnist_hierarchy  # noqa: E402
from model.io import atomic_write_json  # noqa: E402

LABELS_PER_ROUND = 10
RUNTIME_ROUNDS = 3
HEALTH_POLL_S = 0.02
INDEX_POLL_S = 0.1
"""How often the end of an index is looked for (/metrics): every 0.5 s added a quarter of a second to each index on
average, a fortieth of a 2,000-task index; each look costs the backend about a millisecond."""


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def metric(base: str, name: str) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def gunicorn_worker_pid(arbiter_pid: int) -> int:
    children = Path(f"/proc/{arbiter_pid}/task/{arbiter_pid}/children").read_text().split()
    return int(children[0]) if children else arbiter_pid


def status_mb(pid: int, field: str) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and its children's live processes (Label Studio's runserver
    serves from the process it was started as, or from a child)."""
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for process in [pid, *(int(c) for c in (children.read_text().split() if children.exists() else []))]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


class RssSampler:
    """The largest VmRSS of a process seen every 0.2 s from start() to stop(): the peak while it indexes and fits,
    without its start-up (model loading)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, status_mb(self.pid, "VmRSS"))
            except (OSError, AttributeError):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


# --- 1. the runtime alone ---------------------------------------------------------------------------------------


def runtime_alone(images: list[Any], cache_dir: Path, rounds: int = RUNTIME_ROUNDS) -> dict[str, Any]:
    """Images per second of each runtime on decoded images, in chunks of the indexing chunk size, with as many
    callers at once as the backbone wants (``concurrent_runs``, as a FeatureExtractor runs it): the server's
    choice (auto), ONNX Runtime as one run on every core, and eager torch fp32. ``rounds`` rounds, the runtimes
    taken in turn within each, and each runtime's median: one round lasts a few seconds, and on shared cores a
    single one swung by a fifth between runs while indexing end to end, which lasts a minute, did not."""
    from backend.features import FEATURE_CHUNK
    from model.backbone_spec import IMAGENET_PACKAGE
    from model.runtime import OnnxRuntimeBackbone, TimmExportSpec, create_backbone, find_cached_export

    def one_run() -> Any:  # after auto: its export is cached
        export = find_cached_export(TimmExportSpec("efficientnet_lite0", IMAGENET_PACKAGE, 224), cache_dir)
        assert export is not None, "the auto backbone exports first"
        return OnnxRuntimeBackbone.from_export(export, parallel_runs=False)

    builders = {
        "auto": lambda: create_backbone("timm:efficientnet_lite0", runtime="auto", cache_dir=cache_dir, device="cpu"),
        "onnxruntime_one_run": one_run,
        "torch": lambda: create_backbone("timm:efficientnet_lite0", runtime="torch", cache_dir=cache_dir,
                                         device="cpu"),
    }
    chunks = [images[start : start + FEATURE_CHUNK] for start in range(0, len(images), FEATURE_CHUNK)]
    backbones: dict[str, Any] = {}
    for label, build in builders.items():
        if label == "onnxruntime_one_run" and int(getattr(backbones["auto"], "concurrent_runs", 1)) == 1:
            continue  # auto already is one run (eager torch, or a single core)
        backbones[label] = build()
        backbones[label].embed_and_logits(images[:8])  # warm-up (and the ONNX export, once)
    callers = {label: int(getattr(backbone, "concurrent_runs", 1)) for label, backbone in backbones.items()}
    rates: dict[str, list[float]] = {label: [] for label in backbones}
    cpu_ms: dict[str, list[float]] = {label: [] for label in backbones}
    for _round in range(rounds):
        for label, backbone in backbones.items():
            started, cpu = time.perf_counter(), time.process_time()  # CPU of every thread of this process
            with ThreadPoolExecutor(callers[label]) as pool:
                list(pool.map(backbone.embed_and_logits, chunks))
            rates[label].append(round(len(images) / (time.perf_counter() - started), 1))
            cpu_ms[label].append(round(1000 * (time.process_time() - cpu) / len(images), 2))
    return {label: {"images_per_s": round(statistics.median(rates[label]), 1), "rounds": rates[label],
                    "cpu_ms_per_image": statistics.median(cpu_ms[label]), "cpu_ms_rounds": cpu_ms[label],
                    "name": backbone.name, "runtime": type(backbone).__name__, "concurrent_runs": callers[label]}
            for label, backbone in backbones.items()}


def bracketed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The runtime alone measured before the indexes and again after them, as one figure per runtime: the median of
    all its rounds. On these shared cores the runtime's speed drifted by a fifth within minutes (three rounds of
    one run: 195, 193 and 120 images/s), so rounds taken only before the indexes, which last a minute, could set
    them against a faster or slower machine than the one they ran on."""
    merged: dict[str, Any] = {}
    for label, first in before.items():
        second = after.get(label, {})
        rates = first["rounds"] + second.get("rounds", [])
        cpu_ms = first.get("cpu_ms_rounds", []) + second.get("cpu_ms_rounds", [])
        merged[label] = {**first, "images_per_s": round(statistics.median(rates), 1), "rounds": rates,
                         "cpu_ms_per_image": round(statistics.median(cpu_ms), 2) if cpu_ms else first.get(
                             "cpu_ms_per_image"),
                         "cpu_ms_rounds": cpu_ms, "rounds_before_indexing": len(first["rounds"])}
    return merged


def fastest_runtime(alone: dict[str, Any]) -> str:
    """The label of the fastest correct runtime measured alone (not eager torch, the reference)."""
    return max((label for label in alone if label != "torch"), key=lambda label: alone[label]["images_per_s"])


# --- Label Studio projects ----------------------------------------------------------------------------------------


class Project:
    def __init__(self, client: Any, project_id: int, task_ids: list[int], classes: list[str], labeling: Any) -> None:
        self.client, self.project_id, self.task_ids, self.classes, self.labeling = (
            client, project_id, task_ids, classes, labeling)
        self.annotated: list[int] = []

    def annotate(self, task_id: int) -> None:
        fine = self.classes[self.task_ids.index(task_id)]
        coarse = self.labeling.hierarchy.parent_name(fine)
        image = self.labeling.image_name
        result = [
            {"from_name": self.labeling.coarse_control, "to_name": image, "type": "choices",
             "value": {"choices": [coarse]}},
            {"from_name": self.labeling.fine_control_by_coarse[coarse], "to_name": image, "type": "choices",
             "value": {"choices": [fine]}},
        ]
        self.client.annotations.create(id=task_id, result=result)
        self.annotated.append(task_id)

    def model_version(self) -> str | None:
        return self.client.projects.get(self.project_id).model_version


FASHION_MNIST_RENDERINGS = (("train", 0.15, ""), ("test", 0.15, "test"), ("train", 0.3, "train-wide-margin"))
"""(split, margin, subdirectory): distinct task images for up to 130k tasks. The train split as the demo draws it
(60k: every size up to that, with the same files and URLs as before), then the test split, then the train split
again with a wider margin (other bytes and other embeddings: a distinct image, not a cached duplicate)."""


def task_images(document_root: Path, n: int, seed: int) -> tuple[list[Path], list[str]]:
    """n distinct Fashion-MNIST PNGs under ``fmnist-<n>-<seed>`` and their fine class names, in task order."""
    from model.datasets import load_fashion_mnist

    top = document_root / f"fmnist-{n}-{seed}"
    paths: list[Path] = []
    classes: list[str] = []
    for split, margin, subdirectory in FASHION_MNIST_RENDERINGS:
        take = min(n - len(paths), len(load_fashion_mnist(split)[1]))  # type: ignore[arg-type]
        if take <= 0:
            break
        images = lsb.write_fashion_mnist_pngs(top / subdirectory if subdirectory else top, take, split=split,
                                              seed=seed, pad_fraction=margin)
        paths += images.paths
        classes += images.class_names
    if len(paths) < n:
        raise ValueError(f"{n} tasks need more than the {len(paths)} distinct images these renderings give")
    return paths, classes


def make_project(client: Any, n: int, document_root: Path, title: str, seed: int) -> Project:
    config = recommended_label_config(fashion_mnist_hierarchy())
    paths, classes = task_images(document_root, n, seed)
    project_id = lsb.create_project(client, title, config)
    # one storage over the top directory: Label Studio serves the files of its subdirectories too
    lsb.connect_local_files_storage(client, project_id, paths[0].parent, document_root)
    task_ids: list[int] = []
    for start in range(0, n, 1000):
        task_ids += lsb.import_image_tasks(client, project_id, paths[start : start + 1000], document_root)
    return Project(client, project_id, task_ids, classes, parse_label_config(config))


def fitted_on_every_label(project: Project, model_dir: Path) -> str | None:
    """The version Label Studio's project follows, once it is the backend's current one and saw every label."""
    from backend.state import ProjectState

    current = ProjectState(model_dir, project.project_id).current()
    if current is None or current.metrics.get("n_fine") != len(project.annotated):
        return None
    return current.model_version if project.model_version() == current.model_version else None


def backend_env(ls_url: str, token: str, model_dir: Path, **extra: str) -> dict[str, str]:
    return {**lsb.clean_environment(Path(sys.executable).parent), "LABEL_STUDIO_URL": ls_url,
            "LABEL_STUDIO_API_KEY": token, "MODEL_DIR": str(model_dir), "LOG_LEVEL": "INFO", **extra}


def wait(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- 2. one size: index, fit loop, health, memory -------------------------------------------------------------


STORE_FILES = ("embeddings.sqlite", "embeddings.sqlite-wal", "image_keys.sqlite", "image_keys.sqlite-wal")
"""A size's caches kept by --work-dir: embeddings and weak labels by image content, image URLs to content keys."""


def run_size(ls: Any, login: Any, root: Path, n: int, seed: int, work_dir: Path,
             local_files: bool = False) -> dict[str, Any]:
    client = ls.client()
    project = make_project(client, n, work_dir / "files", f"scale-{n}", seed)
    port = lsb.ephemeral_port()
    model_dir = root / f"model-{n}"
    cache = work_dir / f"store-{n}-{seed}"
    cached = (cache / STORE_FILES[0]).exists()
    model_dir.mkdir(parents=True)
    for name in STORE_FILES:
        if (cache / name).exists():
            shutil.copy2(cache / name, model_dir / name)
    if cached:  # this Label Studio's project id may differ: its URLs are the same files, so the same content keys
        import sqlite3

        with closing(sqlite3.connect(model_dir / "image_keys.sqlite")) as db, db:
            db.execute("INSERT OR IGNORE INTO image_keys (project, url, content_key) "
                       "SELECT ?, url, content_key FROM image_keys", (project.project_id,))
    # the ONNX exports (backbone, text encoder) made once here: a server exports once and then reuses them
    if (root / "runtime-cache").is_dir():
        shutil.copytree(root / "runtime-cache", model_dir / "runtime-cache")
    if (work_dir / "text-encoders").is_dir():
        shutil.copytree(work_dir / "text-encoders", model_dir / "text-encoders")
    # --local-files: the backend reads Label Studio's document root itself (same host), not through Label Studio
    extra = {"LOCAL_FILES_DOCUMENT_ROOT": str(work_dir / "files")} if local_files else {}
    server = lsb.BackendServer(backend_env(ls.url, login.token, model_dir, **extra), root / f"backend-{n}.log",
                               port=port, cwd=ROOT)
    server.start()
    base = server.url
    out: dict[str, Any] = {"n_tasks": n, "index_cached": cached}
    worker_pid = gunicorn_worker_pid(server.process.pid)
    out["rss_after_start_mb"] = status_mb(worker_pid, "VmRSS")
    sampler = RssSampler(worker_pid).start()
    try:
        ls_cpu, backend_cpu = cpu_seconds(ls.process.pid), cpu_seconds(worker_pid)
        started = time.monotonic()
        lsb.connect_ml_backend(client, project.project_id, base)
        if not cached:
            wait(lambda: metric(base, "vlm_al_embeddings_computed_total") >= n, max(3600, n / 10), "indexing",
                 INDEX_POLL_S)
            out["index_seconds"] = round(time.monotonic() - started, 2)
            out["index_images_per_s"] = round(n / out["index_seconds"], 1)
            out["load_after_index"] = load()
            # where the two cores went: Label Studio (listing, and serving the images unless --local-files)
            out["label_studio_cpu_s_during_index"] = round(cpu_seconds(ls.process.pid) - ls_cpu, 2)
            out["backend_cpu_s_during_index"] = round(cpu_seconds(worker_pid) - backend_cpu, 2)
        wait(lambda: project.model_version() == "vlm-al-v0", max(1800, n / 20), "the cold-start push", 0.5)
        out["index_and_cold_start_push_seconds"] = round(time.monotonic() - started, 1)
        out["embeddings_computed"] = metric(base, "vlm_al_embeddings_computed_total")
        rounds = []
        for round_number in (1, 2):
            todo = [t for t in project.task_ids if t not in project.annotated][:LABELS_PER_ROUND]
            health_ms: list[float] = []
            stop = threading.Event()

            def poll_health() -> None:
                session = requests.Session()
                while not stop.is_set():
                    began = time.perf_counter()
                    session.get(base + "/health", timeout=5)
                    health_ms.append((time.perf_counter() - began) * 1000)
                    time.sleep(HEALTH_POLL_S)

            poller = threading.Thread(target=poll_health, daemon=True)
            poller.start()
            for task_id in todo:
                project.annotate(task_id)
            last_annotation = time.monotonic()
            version = wait(lambda: fitted_on_every_label(project, model_dir), 900, "a version fitted on every label")
            seconds = time.monotonic() - last_annotation
            stop.set()
            poller.join()
            rounds.append({"round": round_number, "version": version, "seconds": round(seconds, 2),
                           "health_p99_ms": round(float(np.percentile(health_ms, 99)), 1),
                           "health_max_ms": round(max(health_ms), 1), "health_samples": len(health_ms),
                           "load": load()})
            time.sleep(3)  # the background push of the rest of the queue
        out["rounds"] = rounds
        out["fit_loop_seconds"] = rounds[-1]["seconds"]
        out["peak_rss_mb"] = sampler.stop()
        out["vmhwm_mb_with_startup"] = status_mb(worker_pid, "VmHWM")
        requests_log = (root / f"backend-{n}.log").read_text(errors="replace")
        out["fit_lines"] = [line[-160:] for line in requests_log.splitlines() if "fit finished" in line][-2:]
    finally:
        server.stop()
        (work_dir / "logs").mkdir(exist_ok=True)
        shutil.copy2(root / f"backend-{n}.log", work_dir / "logs" / f"backend-{n}.log")
        cache.mkdir(parents=True, exist_ok=True)
        for name in STORE_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, cache / name)
    return out


# --- 3. workers on Redis -------------------------------------------------------------------------------------------


def run_workers(ls: Any, login: Any, root: Path, n_images: int, counts: tuple[int, ...],
                work_dir: Path) -> dict[str, Any]:
    client = ls.client()
    projects = [make_project(client, n_images, work_dir / "files", f"workers-{i}", 100 + i) for i in range(2)]
    redis_port = lsb.ephemeral_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL)
    out: dict[str, Any] = {}
    try:
        for count in counts:
            model_dir = root / f"model-workers-{count}"
            # indexing alone: no cold-start push, whose Label Studio import would be timed too
            env = backend_env(ls.url, login.token, model_dir, REDIS_URL=f"redis://127.0.0.1:{redis_port}/{count}",
                              PUSH_PREDICTIONS="false")
            shutil.copytree(root / "runtime-cache", model_dir / "runtime-cache")
            port = lsb.ephemeral_port()
            web = lsb.BackendServer(env, root / f"web-{count}.log", port=port, cwd=ROOT)
            web.start()
            workers = [subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--name", f"w{count}-{i}"],
                                        cwd=ROOT, env=env, stdout=open(root / f"worker-{count}-{i}.log", "wb"),
                                        stderr=subprocess.STDOUT) for i in range(count)]
            try:
                from redis import Redis

                from backend.rq_jobs import RQJobRunner

                runner = RQJobRunner(Redis(port=redis_port, db=count), 0.0)
                wait(lambda: runner._read_state()["workers"] >= count, 600, "the workers")
                started = time.monotonic()
                for project in projects:
                    lsb.connect_ml_backend(client, project.project_id, web.url, title=f"vlm-al-{count}")
                time.sleep(2)
                assert runner.wait_idle(3600)
                seconds = time.monotonic() - started
                embedded = sum(int(m) for i in range(count) for m in re.findall(
                    r"(\d+) embeddings computed", (root / f"worker-{count}-{i}.log").read_text(errors="replace")))
                out[str(count)] = {"images_per_s": round(embedded / seconds, 1), "images": embedded,
                                   "seconds": round(seconds, 1), "load": load()}
                for project in projects:  # the next count connects anew
                    for backend in client.ml.list(project=project.project_id):
                        client.ml.delete(id=backend.id)
            finally:
                for worker in workers:
                    worker.terminate()
                    worker.wait(timeout=30)
                web.stop()
    finally:
        redis.terminate()
    return out


def extrapolate(points: dict[str, float], x: int) -> tuple[float, float]:
    """(value at x, slope per task) of the least-squares line through the points; a negative slope (noise larger
    than the growth) is clamped at zero, so the value is then the mean of the points."""
    sizes = np.asarray([int(k) for k in points], dtype=float)
    values = np.asarray(list(points.values()), dtype=float)
    if len(sizes) == 1:
        return round(float(values[0] * x / sizes[0]), 1), float(values[0] / sizes[0])  # proportional
    slope, _ = np.polyfit(sizes, values, 1)
    slope = max(float(slope), 0.0)
    intercept = float(np.mean(values) - slope * np.mean(sizes))
    return round(slope * x + intercept, 1), slope


def single_step_rounds(size: dict[str, Any]) -> list[dict[str, Any]]:
    """Rounds whose labels made exactly one new version: a round during which a partial fit started (the
    annotations came slower than the debounce) also times the end of that fit, so it is left out of the figure."""
    rounds, previous = [], 0
    for r in size["rounds"]:
        number = int(r["version"].rsplit("v", 1)[1])
        if number == previous + 1:
            rounds.append(r)
        previous = number
    return rounds or size["rounds"]


HEALTH_TARGET_TASKS = 20_000
"""The /health targets are for a fit at 20k tasks: ``health_during_fit_ms`` reports that size when it was measured,
else the largest (every size's rounds keep their own /health figures)."""


def summarise(result: dict[str, Any], sizes_run: list[int]) -> None:
    """The keys the issue names, from the measured detail (``--summarise`` recomputes them from a stored run)."""
    sizes, alone, workers = result["sizes"], result["runtime_alone"], result.get("workers_detail", {})
    embedded = [s for s in sizes.values() if not s.get("index_cached")]
    largest = sizes[str(sizes_run[-1])]
    if embedded and not result.get("sizes_merged_without_runtime"):  # else the ratio would mix two runs' loads
        first = embedded[0]  # load: the first index's
        indexed = sum(s["n_tasks"] for s in embedded) / sum(s["index_seconds"] for s in embedded)
        fastest = fastest_runtime(alone)
        result["indexing"] = {
            "end_to_end_images_per_s": round(indexed, 1),  # every size's images over every size's indexing time
            "runtime_alone_images_per_s": alone[fastest]["images_per_s"],
            "eager_torch_images_per_s": alone["torch"]["images_per_s"],
            "runtime": alone[fastest]["runtime"],
            "runtime_alone_layout": fastest,
            "load_average": first["load_after_index"],
        }
        if all("label_studio_cpu_s_during_index" in s for s in embedded):
            images = sum(s["n_tasks"] for s in embedded)
            ls_ms = 1000 * sum(s["label_studio_cpu_s_during_index"] for s in embedded) / images
            runtime_ms = 1000 * result["cpu_count"] / alone[fastest]["images_per_s"]  # CPU time per image, all cores
            result["indexing"].update({
                "label_studio_cpu_ms_per_image": round(ls_ms, 2),
                "backend_cpu_ms_per_image": round(
                    1000 * sum(s["backend_cpu_s_during_index"] for s in embedded) / images, 2),
                "runtime_alone_cpu_ms_per_image": alone[fastest].get("cpu_ms_per_image"),  # measured, alone
                "runtime_alone_all_cores_ms_per_image": round(runtime_ms, 2),
                # the most the cores could index end to end: the runtime's CPU per image and Label Studio's,
                # nothing else, every core busy
                "bound_images_per_s": round(1000 * result["cpu_count"] / (ls_ms + runtime_ms), 1),
            })
    result["fit_loop_seconds"] = {
        n: round(statistics.median(r["seconds"] for r in single_step_rounds(s)), 2) for n, s in sizes.items()}
    result["fit_loop_seconds_extrapolated_100k"], fit_slope = extrapolate(result["fit_loop_seconds"], 100_000)
    result["peak_rss_mb"] = {n: s["peak_rss_mb"] for n, s in sizes.items()}
    result["peak_rss_mb_extrapolated_100k"], rss_slope = extrapolate(result["peak_rss_mb"], 100_000)
    during = sizes.get(str(HEALTH_TARGET_TASKS), largest)  # the size the /health target names, when measured
    last = single_step_rounds(during)[-1]
    result["health_during_fit_ms"] = {"p99": last["health_p99_ms"], "max": last["health_max_ms"],
                                      "n_tasks": during["n_tasks"]}
    result["workers"] = {k: v["images_per_s"] for k, v in workers.items()}
    result["extrapolation"] = {
        "method": "least-squares line through the measured sizes, slope clamped at >= 0",
        "fit_loop_seconds_per_task": fit_slope, "peak_rss_mb_per_task": rss_slope,
        "fit_loop_rounds": "median of the rounds whose labels made exactly one new version",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000])
    parser.add_argument("--runtime-images", type=int, default=384)
    parser.add_argument("--worker-images", type=int, default=200)
    parser.add_argument("--skip-workers", action="store_true",
                        help="keep the workers figures of --out instead of measuring them")
    parser.add_argument("--skip-runtime", action="store_true",
                        help="keep the runtime-alone and indexing figures of --out instead of measuring them")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep task images and embedding stores here across runs (default: a temporary "
                             "directory, removed at the end)")
    parser.add_argument("--label-studio-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra environment of Label Studio (e.g. one of its feature flags)")
    parser.add_argument("--local-files", action="store_true",
                        help="the backend reads Local Files images from Label Studio's document root on this host "
                             "(LOCAL_FILES_DOCUMENT_ROOT) instead of downloading them through Label Studio")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--summarise", action="store_true",
                        help="recompute the summary keys of --out from its measured detail, measure nothing")
    args = parser.parse_args(argv)
    if args.summarise:
        result = json.loads(args.out.read_text())
        summarise(result, sorted(int(n) for n in result["sizes"]))
        atomic_write_json(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("sizes", "runtime_alone")}, indent=2))
        return 0
    root = Path(tempfile.mkdtemp(prefix="vlm-al-scale-"))
    work_dir = args.work_dir.resolve() if args.work_dir else root
    work_dir.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    earlier = json.loads(args.out.read_text()) if (args.skip_runtime or args.skip_workers) and args.out.exists() \
        else {}
    result: dict[str, Any] = {**earlier, "created_at": earlier.get("created_at", now), "cpu_count": os.cpu_count(),
                              "load_at_start": load(), "label_studio_env": args.label_studio_env,
                              "backend_reads_local_files": args.local_files}
    if args.skip_runtime and earlier:
        result["sizes_merged_without_runtime"] = {"sizes_measured_at": now, "indexing_and_runtime_from": earlier.get(
            "created_at")}
    images: list[Any] | None = None  # the runtime alone's images, when this run measures it
    try:
        if not (args.skip_runtime and "runtime_alone" in earlier):
            from model.datasets import load_fashion_mnist, to_pil

            raw, _ = load_fashion_mnist("train")
            images = [to_pil(raw[i], invert=True, size=224, pad_fraction=0.15) for i in range(args.runtime_images)]
            alone = runtime_alone(images, root / "runtime-cache")
            result["runtime_alone"] = alone
            result["created_at"] = now  # when the runtime and indexing figures were measured
            result.pop("sizes_merged_without_runtime", None)
            print(json.dumps(alone), flush=True)
        else:  # the ONNX export alone, made once here like a server's first start (not timed)
            from model.runtime import create_backbone

            create_backbone("timm:efficientnet_lite0", runtime="auto", cache_dir=root / "runtime-cache", device="cpu")

        from model.weak.text_encoder import packaged_minilm

        packaged_minilm(work_dir / "text-encoders", onnx=True)  # the semantic annotator's encoder, exported once
        login = lsb.LabelStudioLogin("scale@vlm-al.local", secrets.token_urlsafe(12), lsb.new_token())
        ls = lsb.LabelStudioServer(lsb.ensure_label_studio_venv(), root / "label-studio", work_dir / "files", login,
                                   port=lsb.ephemeral_port(), log_path=root / "label-studio.log",
                                   extra_env=dict(item.split("=", 1) for item in args.label_studio_env))
        ls.start()
        try:
            sizes = {}
            for n in args.sizes:
                sizes[str(n)] = run_size(ls, login, root, n, seed=0, work_dir=work_dir, local_files=args.local_files)
                print(json.dumps(sizes[str(n)]), flush=True)
                # every size as soon as it is measured: a long run stopped later keeps what it measured
                result["sizes"] = {**earlier.get("sizes", {}), **sizes}
                summarise(result, sorted(int(k) for k in result["sizes"]))
                atomic_write_json(args.out, {**result, "load_at_end": load()})
            if images is not None:  # the runtime alone again, now that the indexes are done (``bracketed``)
                result["runtime_alone"] = bracketed(result["runtime_alone"],
                                                    runtime_alone(images, root / "runtime-cache"))
                summarise(result, sorted(int(k) for k in result["sizes"]))
                atomic_write_json(args.out, {**result, "load_at_end": load()})
            if not args.skip_workers:
                result["workers_detail"] = run_workers(ls, login, root, args.worker_images, (1, 2), work_dir)
        finally:
            ls.stop()
        summarise(result, sorted(int(k) for k in result["sizes"]))
        result["load_at_end"] = load()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
