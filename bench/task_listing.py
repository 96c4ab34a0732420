"""What Label Studio's CPU pays to list a project's tasks and to serve its images, beside the backend's index.

Usage: python bench/task_listing.py [--tasks 2000] [--rounds 3] [--images 300]
                                    [--out bench/results/task_listing.json]

An index lists every task of the project and, unless the backend reads Local Files itself
(LOCAL_FILES_DOCUMENT_ROOT), downloads every image through Label Studio. On a host whose cores Label Studio shares
with the backend, each CPU second Label Studio spends is one the backbone does not get. A fresh Label Studio 1.23.2
(its defaults, Django runserver) with one project of --tasks Fashion-MNIST tasks in a Local Files storage:

1. Listing: every page (TASK_PAGE_SIZE tasks) of ``GET /api/tasks`` without annotations (``fields=task_only``),
   with and without ``include`` naming only the fields the backend reads, and with annotations (``fields=all``).
   --rounds rounds, the variants in turn within a round; each variant's median of Label Studio's CPU seconds
   (user + system of its process, from /proc) and of the wall time.
2. Serving: --images images downloaded one by one through Label Studio (``/data/local-files/?d=…``, the URL the
   tasks hold), one connection per image as the backend's fetcher downloads them, then all over one kept-alive
   connection; Label Studio's CPU milliseconds per image each way.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import cpu_seconds, load, make_project  # noqa: E402

from backend.ls_client import TASK_ONLY_FIELDS_READ, TASK_PAGE_SIZE  # noqa: E402
from harness import ls_bootstrap as lsb  # noqa: E402
from model.io import atomic_write_json  # noqa: E402

LISTINGS: dict[str, dict[str, str]] = {
    "task_only": {"fields": "task_only"},
    "task_only_include": {"fields": "task_only", "include": ",".join(TASK_ONLY_FIELDS_READ)},
    "all": {"fields": "all"},
}
"""The task listings measured: ``task_only_include`` is what an index asks and ``all`` what a listing with
annotations asks (LabelStudioClient.task_pages). ``include`` with ``fields=all`` is not measured: Label Studio
1.23.2 then cuts each nested annotation down to its id."""


def list_every_page(session: requests.Session, base_url: str, project_id: int,
                    params: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Every page of the project's task list: ({tasks, bytes received}, the fields of the first task)."""
    page, tasks, received, fields = 1, 0, 0, []
    while True:
        response = session.get(f"{base_url}/api/tasks/", params={"project": project_id, "page": page,
                                                                 "page_size": TASK_PAGE_SIZE, **params}, timeout=600)
        if response.status_code == 404 and page > 1:
            break
        response.raise_for_status()
        received += len(response.content)
        batch = response.json()["tasks"]
        if batch and not fields:
            fields = sorted(batch[0])
        tasks += len(batch)
        if len(batch) < TASK_PAGE_SIZE:
            break
        page += 1
    return {"tasks": tasks, "bytes": received}, fields


def measure(base_url: str, token: str, label_studio_pid: int, project_id: int, rounds: int,
            images: int) -> dict[str, Any]:
    """Label Studio's CPU and the wall time of each listing (medians of ``rounds``), and its CPU per image served."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LISTINGS}
    fields: dict[str, list[str]] = {}
    for _round in range(rounds):
        for name, params in LISTINGS.items():
            cpu, began = cpu_seconds(label_studio_pid), time.perf_counter()
            listed, fields[name] = list_every_page(session, base_url, project_id, params)
            runs[name].append({**listed, "wall_s": round(time.perf_counter() - began, 3),
                               "label_studio_cpu_s": round(cpu_seconds(label_studio_pid) - cpu, 3)})
    listings = {
        name: {"label_studio_cpu_s": statistics.median(r["label_studio_cpu_s"] for r in measured),
               "wall_s": statistics.median(r["wall_s"] for r in measured),
               "rounds": measured, "tasks": measured[0]["tasks"], "bytes": measured[0]["bytes"],
               "fields": fields[name], "params": LISTINGS[name]}
        for name, measured in runs.items()}
    urls = [task["data"]["image"] for task in session.get(
        f"{base_url}/api/tasks/", params={"project": project_id, "page_size": images, **LISTINGS["task_only_include"]},
        timeout=600).json()["tasks"]]

    def serve(get: Any) -> dict[str, Any]:
        cpu, began = cpu_seconds(label_studio_pid), time.perf_counter()
        served = 0
        for url in urls:
            response = get(base_url + url, headers=session.headers, timeout=60)
            response.raise_for_status()
            served += len(response.content)
        return {"images": len(urls), "bytes": served, "wall_s": round(time.perf_counter() - began, 2),
                "label_studio_cpu_ms_per_image": round(1000 * (cpu_seconds(label_studio_pid) - cpu) / len(urls), 2)}

    # one connection per image (requests.get), then every image over one kept-alive connection, in turn each round
    ways = {"serving_images": requests.get, "serving_images_one_connection": session.get}
    served_runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    for _round in range(rounds):
        for way, get in ways.items():
            served_runs[way].append(serve(get))
    serving = {way: {**measured[0], "wall_s": statistics.median(r["wall_s"] for r in measured),
                     "label_studio_cpu_ms_per_image": statistics.median(
                         r["label_studio_cpu_ms_per_image"] for r in measured),
                     "rounds_label_studio_cpu_ms_per_image": [r["label_studio_cpu_ms_per_image"] for r in measured]}
               for way, measured in served_runs.items()}
    return {
        "listings": listings,
        **serving,
        "label_studio_cpu_task_only_over_task_only_include": round(
            listings["task_only"]["label_studio_cpu_s"] / listings["task_only_include"]["label_studio_cpu_s"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "task_listing.json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vlm-al-listing-"))
    login = lsb.LabelStudioLogin("listing@vlm-al.local", secrets.token_urlsafe(12), lsb.new_token())
    ls = lsb.LabelStudioServer(lsb.ensure_label_studio_venv(), root / "label-studio", root / "files", login,
                               port=lsb.ephemeral_port(), log_path=root / "label-studio.log")
    ls.start()
    try:
        project = make_project(ls.client(), args.tasks, root / "files", f"listing-{args.tasks}", seed=0)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        load_before = load()
        measured = measure(ls.url, login.token, ls.process.pid, project.project_id, args.rounds, args.images)
        result = {"created_at": started, "cpu_count": os.cpu_count(), "load_before": load_before,
                  "load_after": load(), "label_studio": f"{lsb.LABEL_STUDIO_VERSION}, its defaults (Django runserver)",
                  "n_tasks": args.tasks, "page_size": TASK_PAGE_SIZE, "rounds": args.rounds, **measured}
    finally:
        ls.stop()
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "listings"}, indent=2))
    print(json.dumps({name: {k: v for k, v in listing.items() if k != "rounds"}
                      for name, listing in result["listings"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
