"""Server latency through a real gunicorn server on 127.0.0.1.

1. /predict of 100 cached tasks: p50/p95 over repeated requests (target p95 <= 50 ms).
2. /health while a fit runs: p99 (target <= 20 ms).

A small fake Label Studio (in this process) serves the task list, the images and accepts the pushed predictions,
so the backend does all of its real work: downloads, efficientnet_lite0 embeddings, the weak annotator, fits.
Usage: python bench/server_latency.py [--tasks 100] [--repeats 50] [--out bench/results/server_latency.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.label_config import RECOMMENDED_FASHION_MNIST_CONFIG  # noqa: E402
from model.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, to_pil  # noqa: E402

API_KEY = "bench0123456789abcdef0123456789abcdef0123"
PROJECT = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fine_control_of(label_config: str) -> dict[str, str]:
    """fine class -> name of the fine <Choices> holding it, read from the shipped recommended config."""
    import xml.etree.ElementTree as ET

    owner = {}
    for choices in ET.fromstring(label_config).iter("Choices"):
        for choice in choices.iter("Choice"):
            owner[choice.get("value")] = choices.get("name")
    return owner


def build_fake_label_studio(n_tasks: int, n_labeled: int) -> tuple[Flask, dict]:
    images, labels = load_fashion_mnist("test")
    label_config = RECOMMENDED_FASHION_MNIST_CONFIG.read_text()
    owner = fine_control_of(label_config)
    files, tasks = {}, []
    for i in range(n_tasks):
        buffer = io.BytesIO()
        to_pil(images[i], invert=True, size=64, pad_fraction=0.1).save(buffer, format="PNG")
        files[f"{i}.png"] = buffer.getvalue()
        task = {"id": i + 1, "data": {"image": f"/data/local-files/?d=bench/{i}.png"}, "annotations": []}
        if i < n_labeled:
            fine = FASHION_MNIST_CLASSES[int(labels[i])]
            task["annotations"].append({"id": i + 1, "was_cancelled": False, "result": [
                {"from_name": owner[fine], "to_name": "image", "type": "choices", "value": {"choices": [fine]}}]})
        tasks.append(task)
    record = {"imports": 0, "patches": [], "label_config": label_config, "tasks": tasks}
    app = Flask("fake_ls")

    @app.get("/api/tasks/")
    def list_tasks():
        page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
        chunk = tasks[(page - 1) * size : page * size]
        if page > 1 and not chunk:
            return jsonify(detail="Invalid page."), 404
        return jsonify(tasks=chunk, total=len(tasks), total_annotations=n_labeled, total_predictions=0)

    @app.route("/api/projects/<int:pid>/", methods=["GET", "PATCH"])
    def project(pid):
        if request.method == "PATCH":
            record["patches"].append(request.get_json())
        return jsonify(id=pid, label_config=label_config)

    @app.post("/api/projects/<int:pid>/import/predictions")
    def import_predictions(pid):
        record["imports"] += 1
        return jsonify(created=len(request.get_json())), 201

    @app.post("/api/dm/actions/")
    def action():
        # No model is connected to this project here: Label Studio answers the Retrieve predictions action and
        # saves nothing, so the backend imports the queue head instead.
        return jsonify(processed_items=len(request.get_json()["selectedItems"]["included"]), detail="Retrieved")

    @app.get("/api/predictions/")
    def predictions():
        return jsonify([])

    @app.delete("/api/projects/<int:pid>/model-versions/")
    def delete_version(pid):
        return jsonify(deleted=1)

    @app.get("/data/local-files/")
    def local_file():
        return files[request.args["d"].split("/")[-1]], 200, {"Content-Type": "image/png"}

    return app, record


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "note": "shared box: other jobs were running; no GPU"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--labeled", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_latency.json")
    args = parser.parse_args(argv)

    ls_app, record = build_fake_label_studio(args.tasks, args.labeled)
    ls_server = make_server("127.0.0.1", free_port(), ls_app, threaded=True)
    ls_url = f"http://127.0.0.1:{ls_server.server_port}"
    threading.Thread(target=ls_server.serve_forever, daemon=True).start()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="vlm-al-bench-") as model_dir:
        env = {**os.environ, "MODEL_DIR": model_dir, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": API_KEY,
               "FIT_DEBOUNCE_SECONDS": "0", "LOG_LEVEL": "WARNING", "WORKERS": "1", "THREADS": str(args.threads)}
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "backend.wsgi:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--threads", str(args.threads), "--worker-class", "gthread", "--log-level", "warning"],
            cwd=ROOT, env=env,
        )
        try:
            started = time.perf_counter()
            while True:
                try:
                    if requests.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):  # the worker is still loading models
                    pass
                if server.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError("gunicorn did not come up")
                time.sleep(0.2)
            startup_s = time.perf_counter() - started
            session = requests.Session()
            body = {"tasks": record["tasks"], "project": f"{PROJECT}.1795294297", "label_config": record["label_config"]}
            t0 = time.perf_counter()
            first = session.post(f"{base}/predict", json=body, timeout=300)
            first.raise_for_status()
            cold_s = time.perf_counter() - t0
            assert len(first.json()["results"]) == args.tasks

            def metric(prefix: str) -> float:
                for line in session.get(f"{base}/metrics").text.splitlines():
                    if line.startswith(prefix):
                        return float(line.split()[-1])
                return 0.0

            def embeddings_computed() -> float:
                return metric("vlm_al_embeddings_computed_total")

            def fit_jobs_finished() -> float:
                return metric('vlm_al_job_seconds_count{kind="fit"}')

            computed_before = embeddings_computed()
            predict_times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                session.post(f"{base}/predict", json=body, timeout=60).raise_for_status()
                predict_times.append(time.perf_counter() - t0)
            computed_after = embeddings_computed()

            # /health while a fit runs
            version_before = session.post(f"{base}/setup", json={"project": f"{PROJECT}.1"}).json()["model_version"]
            fits_before = fit_jobs_finished()
            session.post(f"{base}/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}}).raise_for_status()
            health_times, fit_started = [], time.perf_counter()
            version_after = version_before
            while time.perf_counter() - fit_started < 120:
                t0 = time.perf_counter()
                session.get(f"{base}/health", timeout=5).raise_for_status()
                health_times.append(time.perf_counter() - t0)
                if len(health_times) % 20 == 0 and fit_jobs_finished() > fits_before:
                    break
                time.sleep(0.005)
            fit_s = time.perf_counter() - fit_started
            version_after = session.post(f"{base}/setup", json={"project": f"{PROJECT}.1"}).json()["model_version"]
            fit_outcome = {o: metric(f'vlm_al_fits_total{{outcome="{o}"}}') for o in ("trained", "skipped", "failed")}
        finally:
            server.terminate()
            server.wait(timeout=30)
            ls_server.shutdown()

    result = {
        "method": "real gunicorn (1 worker, gthread) on 127.0.0.1, requests.Session client, fake Label Studio "
                  "in the bench process; backbone timm:efficientnet_lite0 (packaged ImageNet weights), "
                  "weak annotator imagenet-map, Fashion-MNIST test images served as 64 px PNGs (backbone input 224 px)",
        "machine": machine(),
        "gunicorn_startup_s": round(startup_s, 2),
        "predict": {
            "tasks_per_request": args.tasks,
            "first_uncached_request_s": round(cold_s, 3),
            "repeats": args.repeats,
            "p50_ms": round(percentile(predict_times, 50), 2),
            "p95_ms": round(percentile(predict_times, 95), 2),
            "max_ms": round(max(predict_times) * 1000, 2),
            "embeddings_computed_during_repeats": computed_after - computed_before,
            "target_p95_ms": 50,
        },
        "health_during_fit": {
            "samples": len(health_times),
            "fit_wall_s": round(fit_s, 2),
            "model_version_before": version_before,
            "model_version_after": version_after,
            "fit_outcomes": fit_outcome,
            "p50_ms": round(percentile(health_times, 50), 2),
            "p99_ms": round(percentile(health_times, 99), 2),
            "max_ms": round(max(health_times) * 1000, 2),
            "target_p99_ms": 20,
        },
        "label_studio_requests": {"import_predictions": record["imports"], "patches": record["patches"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
