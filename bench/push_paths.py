"""Push paths: the fastest correct way to put ~500 new-version predictions into a default Label Studio.

Usage: python bench/push_paths.py [--sizes 2000 20000] [--head 500] [--reps 3] [--singles-reps 2]
                                  [--threads 1 4 8] [--methods import action singles] [--out bench/results/push_paths.json]

Per size n: a fresh project of n image tasks (Choices, Uncertainty sampling) holding one prediction version (v1) on
every task, and a real-HTTP fake ML backend connected to it. Then, per method and repetition, a new version is pushed
for a random head of --head unlabeled tasks, the project's model_version is PATCHed to it, and the result is
checked: `/next/` serves the head task with the lowest new score, and every head task holds exactly one prediction
of the new version (read from Label Studio's SQLite database) with its total_predictions counter right.

Methods:
  import   one `POST /api/projects/{id}/import/predictions` with the whole head (legacy path on a default install).
  singles  one `POST /api/predictions/` per task, on 1, 4 and 8 client threads (each fires the per-task post_save).
  action   the Data Manager action retrieve_tasks_predictions on the head ids: Label Studio calls the fake backend's
           /health, /setup (answering the new version) and one /predict with the head tasks, and saves the answer.

Label Studio runs with its defaults (no feature flags) in a throwaway data directory; the load average is written
with every figure because this machine's cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import ls_bootstrap as lsb
from model.io import atomic_write_json

LABELS = ("Cat", "Dog", "Bird")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="label" toName="image">' + "".join(f'<Choice value="{c}"/>' for c in LABELS) + "</Choices></View>"
)
IMPORT_CHUNK = 10_000
NOTES = [
    "push_s is one push of --head predictions of a new version; patch_s is PATCH /api/projects/{id} model_version.",
    (
        "import_predictions on a default install runs ImportPredictionsAPI._create_legacy, which recounts every "
        "task of the project (update_tasks_counters), so it grows with the project."
    ),
    (
        "single_posts and dm_action_retrieve save each prediction through Prediction.save: two Task.save calls "
        "(each rewriting the project summary through pre/post_save signals) and, on SQLite, one commit per write; "
        "they cost per prediction, not per project task."
    ),
    (
        "dm_action_retrieve: Label Studio sends /health, /setup, then one /predict with every selected task that "
        "has no prediction of the version /setup answers; a saved prediction takes its result's model_version, "
        "else the one /setup answered."
    ),
]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def choice_result(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def prediction(task_id: int, score: float, version: str) -> dict[str, Any]:
    return {"task": task_id, "result": choice_result(LABELS[task_id % len(LABELS)]), "score": score,
            "model_version": version}


# --- a fake ML backend over real HTTP --------------------------------------------------------------------------


class FakeBackend:
    """Answers /health, /setup with the current version and /predict with precomputed predictions of it."""

    def __init__(self) -> None:
        self.version = "v1"
        self.predictions: dict[int, dict[str, Any]] = {}
        self.predict_calls: list[dict[str, Any]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/health":
                    self._answer({"status": "UP", "model_class": "PushBench"})
                else:
                    self._answer({"error": "not found"}, 404)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.rstrip("/")
                if path == "/setup":
                    self._answer({"model_version": backend.version})
                elif path == "/predict":
                    tasks = json.loads(raw)["tasks"]
                    backend.predict_calls.append({"tasks": len(tasks), "request_bytes": len(raw)})
                    results = []
                    for task in tasks:
                        known = backend.predictions.get(task["id"])
                        results.append({"result": known["result"], "score": known["score"],
                                        "model_version": known["model_version"]} if known else {})
                    self._answer({"results": results, "model_version": backend.version})
                elif path == "/webhook":
                    self._answer({})
                else:
                    self._answer({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer((lsb.LOOPBACK_HOST, 0), Handler)
        self.url = f"http://{lsb.LOOPBACK_HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, version: str, predictions: list[dict[str, Any]]) -> None:
        self.version = version
        self.predictions = {p["task"]: p for p in predictions}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- Label Studio over plain HTTP ------------------------------------------------------------------------------


class LabelStudioApi:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self._local = threading.local()

    def session(self) -> requests.Session:
        """One keep-alive session per thread (requests.Session is not thread-safe)."""
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers["Authorization"] = f"Token {self.token}"
        return self._local.session

    def call(self, method: str, path: str, timeout_s: float = 300.0, **kwargs: Any) -> Any:
        response = self.session().request(method, self.url + path, timeout=timeout_s, **kwargs)
        if not response.ok:
            raise lsb.LabelStudioError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = action(*args, **kwargs)
    return time.perf_counter() - started, value


class Project:
    def __init__(self, api: LabelStudioApi, db_path: Path, n: int, fake: FakeBackend, seed: int) -> None:
        self.api, self.db_path, self.fake = api, db_path, fake
        self.rng = np.random.default_rng(seed)
        self.id = api.call("POST", "/api/projects/", json={
            "title": f"push-{n}", "label_config": LABEL_CONFIG, "sampling": lsb.UNCERTAINTY_SAMPLING,
            "show_collab_predictions": True})["id"]
        self.task_ids: list[int] = []
        for start in range(0, n, IMPORT_CHUNK):
            tasks = [{"data": {"image": f"/data/local-files/?d=push/{i}.png"}}
                     for i in range(start, min(n, start + IMPORT_CHUNK))]
            answer = api.call("POST", f"/api/projects/{self.id}/import", params={"return_task_ids": "true"},
                              json=tasks)
            self.task_ids += answer["task_ids"]
        assert len(self.task_ids) == n, f"imported {len(self.task_ids)} of {n}"
        self.v1_push_s, answer = timed(lambda: api.call(
            "POST", f"/api/projects/{self.id}/import/predictions",
            json=[prediction(t, float(s), "v1") for t, s in zip(self.task_ids, self.rng.random(n))]))
        assert answer["created"] == n, answer
        api.call("POST", "/api/ml", json={"project": self.id, "url": fake.url, "title": "push-bench",
                                          "is_interactive": False, "auto_update": True})
        api.call("PATCH", f"/api/projects/{self.id}/", json={"model_version": "v1"})
        self.unlabeled = list(self.task_ids)

    def head(self, size: int, version: str) -> list[dict[str, Any]]:
        """A random head of unlabeled tasks with distinct scores (heads of earlier versions may overlap it)."""
        tasks = self.rng.choice(self.unlabeled, size=size, replace=False).tolist()
        scores = self.rng.permutation(size) / size
        return [prediction(t, float(s), version) for t, s in zip(tasks, scores)]

    def check(self, head: list[dict[str, Any]], version: str) -> dict[str, Any]:
        """/next/ serves the lowest new score; one new-version prediction per head task; counters right."""
        expected = min(head, key=lambda p: p["score"])["task"]
        next_s, served = timed(lambda: self.api.call("GET", f"/api/projects/{self.id}/next/"))
        # Annotating releases /next/'s lock on the task, so the next check starts from a clean queue.
        self.api.call("POST", f"/api/tasks/{served['id']}/annotations/", json={"result": choice_result("Cat")})
        self.unlabeled.remove(served["id"])
        ids = [p["task"] for p in head]
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as db:
            marks = ",".join("?" * len(ids))
            per_task = dict(db.execute(
                f"SELECT task_id, COUNT(*) FROM prediction WHERE project_id = ? AND model_version = ? "
                f"AND task_id IN ({marks}) GROUP BY task_id", [self.id, version, *ids]).fetchall())
            elsewhere = db.execute(
                f"SELECT COUNT(*) FROM prediction WHERE project_id = ? AND model_version = ? "
                f"AND task_id NOT IN ({marks})", [self.id, version, *ids]).fetchone()[0]
            stale_counters = db.execute(
                f"SELECT COUNT(*) FROM task t WHERE t.id IN ({marks}) AND t.total_predictions != "
                "(SELECT COUNT(*) FROM prediction p WHERE p.task_id = t.id)", ids).fetchone()[0]
        one_each = all(per_task.get(t) == 1 for t in ids) and elsewhere == 0
        return {"next_served_lowest": served["id"] == expected, "queue": served.get("queue"),
                "one_prediction_each": one_each, "counters_right": stale_counters == 0,
                "next_s": round(next_s, 3)}


# --- the push methods ----------------------------------------------------------------------------------------


def push_import(project: Project, head: list[dict[str, Any]], version: str) -> dict[str, Any]:
    answer = project.api.call("POST", f"/api/projects/{project.id}/import/predictions", json=head)
    assert answer["created"] == len(head), answer
    return {}


def push_singles(project: Project, head: list[dict[str, Any]], version: str, threads: int) -> dict[str, Any]:
    def post(item: dict[str, Any]) -> None:
        project.api.call("POST", "/api/predictions/", json=item)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, head))
    return {}


def push_action(project: Project, head: list[dict[str, Any]], version: str) -> dict[str, Any]:
    project.fake.serve(version, head)
    project.fake.predict_calls.clear()
    answer = project.api.call(
        "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project.id},
        json={"selectedItems": {"all": False, "included": [p["task"] for p in head]}})
    return {"answer": answer, "predict_calls": list(project.fake.predict_calls)}


def methods(selected: list[str], threads: list[int]) -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    registry: dict[str, list[tuple[str, Callable[..., dict[str, Any]]]]] = {
        "import": [("import_predictions", push_import)],
        "singles": [(f"single_posts_{k}_threads", lambda p, h, v, k=k: push_singles(p, h, v, k)) for k in threads],
        "action": [("dm_action_retrieve", push_action)],
    }
    return [entry for name in selected for entry in registry[name]]


def run_size(api: LabelStudioApi, db_path: Path, fake: FakeBackend, n: int, args: argparse.Namespace) -> dict:
    setup_s, project = timed(lambda: Project(api, db_path, n, fake, seed=n))
    out: dict[str, Any] = {"project_setup_s": round(setup_s, 1), "v1_push_all_tasks_s": round(project.v1_push_s, 2),
                           "methods": {}}
    for name, push in methods(args.methods, args.threads):
        runs = []
        for rep in range(args.singles_reps if name.startswith("single") else args.reps):
            version = f"v2-{name}-n{n}-head{args.head}-{rep}"
            head = project.head(args.head, version)
            load_before = load()
            push_s, extra = timed(push, project, head, version)
            patch_s, _ = timed(api.call, "PATCH", f"/api/projects/{project.id}/", json={"model_version": version})
            run = {"push_s": round(push_s, 3), "patch_s": round(patch_s, 3), "load_before": load_before,
                   "load_after": load(), **project.check(head, version), **extra}
            print(f"n={n} {name} rep {rep}: {json.dumps(run)[:400]}", flush=True)
            runs.append(run)
        out["methods"][name] = {
            "push_s_median": round(statistics.median(r["push_s"] for r in runs), 3),
            "patch_s_median": round(statistics.median(r["patch_s"] for r in runs), 3),
            "push_plus_patch_s_median": round(statistics.median(r["push_s"] + r["patch_s"] for r in runs), 3),
            "all_correct": all(r["next_served_lowest"] and r["one_prediction_each"] and r["counters_right"]
                               for r in runs),
            "runs": runs,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--head", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--singles-reps", type=int, default=2, help="one per-task POST run takes about a minute")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--methods", nargs="+", choices=["import", "singles", "action"],
                        default=["import", "action", "singles"])
    parser.add_argument("--tag", default="", help="kept apart from earlier runs of the same head size in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "push_paths.json")
    args = parser.parse_args()

    run: dict[str, Any] = {
        "reps": args.reps, "singles_reps": args.singles_reps, "load_start": load(), "sizes": {},
    }
    # Runs already in --out with another head size or --tag are kept: each is its own entry.
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({
        "label_studio_version": lsb.LABEL_STUDIO_VERSION, "label_studio_env": "defaults (no feature flags), SQLite",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "notes": NOTES,
    })
    result.setdefault("by_head", {})[f"{args.head}-{args.tag}" if args.tag else str(args.head)] = run
    fake = FakeBackend()
    with tempfile.TemporaryDirectory(prefix="push-paths-") as tmp:
        login = lsb.LabelStudioLogin("push@vlm-al.local", secrets.token_urlsafe(12), lsb.new_token())
        ls = lsb.LabelStudioServer(lsb.ensure_label_studio_venv(), Path(tmp) / "ls", Path(tmp) / "files", login,
                                   port=lsb.first_free_port(18480))
        with ls:
            api = LabelStudioApi(ls.url, login.token)
            for n in args.sizes:
                run["sizes"][str(n)] = run_size(api, ls.data_dir / "label_studio.sqlite3", fake, n, args)
                run["load_end"] = load()
                atomic_write_json(args.out, result)
    fake.close()
    print(json.dumps({n: {m: v["push_plus_patch_s_median"] for m, v in s["methods"].items()}
                      for n, s in run["sizes"].items()}, indent=1))


if __name__ == "__main__":
    main()
