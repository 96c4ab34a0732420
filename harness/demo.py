"""`vlm-al demo`: Label Studio and this backend on loopback, connected, over Fashion-MNIST images.

It installs Label Studio into its own virtual environment if needed, starts it with a known user,
writes Fashion-MNIST test images as PNG files, creates a project with the recommended coarse-then-fine
layout and Uncertainty sampling, starts this backend under gunicorn, connects the two and imports the
tasks. The backend indexes them and pushes its first predictions. Ctrl-C stops both servers.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from label_studio_sdk import LabelStudio

from harness import ls_bootstrap as lsb
from backend.config import Config, ConfigError
from backend.queue_tab import QUEUE_TAB_TITLE, ensure_queue_tab

logger = logging.getLogger("vlm-al.demo")

PROJECT_TITLE = "Fashion-MNIST (vlm-al demo)"
DEMO_USERNAME = "demo@vlm-al.local"
ML_BACKEND_TITLE = "vlm-al"
IMAGES_SUBDIR = "fashion-mnist"
PREDICTIONS_TIMEOUT_S = 600.0
# If the background indexing has pushed nothing by then, ask Label Studio to call /predict as well.
PREDICTION_ACTION_AFTER_S = 90.0
# Progress while waiting: a line when the count changes, else one every this many seconds.
PROGRESS_EVERY_S = 30.0
# HTTP client libraries log every request at INFO; the demo's polling would flood the terminal.
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock")


def configure_output() -> None:
    """Progress lines (time and message) from the demo; only warnings from the libraries it uses."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlm-al demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="Label Studio port (next free one if busy)")
    parser.add_argument("--backend-port", type=int, default=9090, help="backend port (next free one if busy)")
    parser.add_argument("--tasks", type=int, default=300, help="number of Fashion-MNIST test images")
    parser.add_argument("--data-dir", type=Path, default=Path("demo_data"),
                        help="images, Label Studio database, model checkpoints (default ./demo_data)")
    parser.add_argument("--label-studio-venv", type=Path, default=None,
                        help=f"Label Studio's own venv; installed if missing (default {lsb.default_label_studio_venv()})")
    parser.add_argument("--no-wait", action="store_true",
                        help="set up, check that predictions exist, print the URL, stop both servers and exit")
    args = parser.parse_args(list(argv))
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    return args


def backend_environment(config: Config, label_studio_url: str, token: str, model_dir: Path) -> dict[str, str]:
    """The backend's settings: the demo's defaults, with the weak annotator switched to CLIP if one is configured."""
    env = {
        **lsb.clean_environment(Path(sys.executable).parent),
        "LABEL_STUDIO_URL": label_studio_url,
        "LABEL_STUDIO_API_KEY": token,
        "MODEL_DIR": str(model_dir),
        "BACKBONE": config.backbone,
        "WEAK_ANNOTATOR": "imagenet-map",
        "LOG_LEVEL": config.log_level,
        "WORKERS": "1",
    }
    if config.open_clip_pretrained:
        env.update(WEAK_ANNOTATOR="open-clip", OPEN_CLIP_PRETRAINED=config.open_clip_pretrained,
                   OPEN_CLIP_MODEL=config.open_clip_model)
    if config.torch_threads:
        env["TORCH_THREADS"] = str(config.torch_threads)
    return env


def find_project(client: LabelStudio, title: str) -> int | None:
    for project in client.projects.list():
        if project.title == title:
            return int(project.id)
    return None


def ensure_ml_backend(client: LabelStudio, project_id: int, url: str) -> int:
    """Connect the backend, or point an existing connection (from an earlier run) at its current URL."""
    for ml_backend in client.ml.list(project=project_id):
        if ml_backend.url != url:
            client.ml.update(id=ml_backend.id, url=url)
        return int(ml_backend.id)
    return lsb.connect_ml_backend(client, project_id, url, title=ML_BACKEND_TITLE)


def wait_for_predictions(client: LabelStudio, project_id: int, ml_backend_id: int, timeout_s: float) -> int:
    """Wait until the tasks hold predictions of the project's model_version (what Uncertainty sampling reads).

    The backend pushes them after indexing and moves the project's model_version. If nothing arrives for a
    while, ask Label Studio to call /predict ("Retrieve predictions") and point the project at that version.
    """
    started = time.monotonic()
    nudged = False
    reported_at = started

    def count() -> int:
        nonlocal nudged, reported_at
        version = client.projects.get(project_id).model_version
        n = 0
        if version and version != ML_BACKEND_TITLE:
            n = sum(1 for p in client.predictions.list(project=project_id) if p.model_version == version)
        now = time.monotonic()
        if n == 0 and now - reported_at >= PROGRESS_EVERY_S:
            reported_at = now
            logger.info("still indexing (embeddings and the VLM's coarse labels): %.0f s so far", now - started)
        if n == 0 and time.monotonic() - started > PREDICTION_ACTION_AFTER_S:
            if not nudged:
                nudged = True
                logger.info("no predictions pushed yet; asking Label Studio to retrieve them")
                lsb.request_predictions(client, project_id)
            backend_version = client.ml.get(ml_backend_id).model_version
            if backend_version and any(p.model_version == backend_version
                                       for p in client.predictions.list(project=project_id)):
                lsb.set_project_model_version(client, project_id, backend_version)
        return n

    return int(lsb.wait_until(count, timeout_s, "the first predictions", interval_s=2.0))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_output()
    try:
        config = Config.from_env()
    except ConfigError as error:
        print(f"vlm-al demo: {error}", file=sys.stderr)
        return 2

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    data_dir = args.data_dir.expanduser().resolve()
    label_studio: lsb.LabelStudioServer | None = None
    backend: lsb.BackendServer | None = None
    starting: ThreadPoolExecutor | None = None
    try:
        venv_dir = lsb.ensure_label_studio_venv(args.label_studio_venv, log=logger.info)
        login = lsb.load_or_create_login(data_dir / "label-studio-login.json", DEMO_USERNAME)
        document_root = data_dir / "files"
        images_dir = document_root / IMAGES_SUBDIR
        images = lsb.write_fashion_mnist_pngs(images_dir, args.tasks)
        logger.info("%d Fashion-MNIST images in %s", len(images.paths), images_dir)

        ls_port = lsb.first_free_port(args.port)
        backend_port = lsb.first_free_port(args.backend_port if args.backend_port != ls_port else ls_port + 1)
        label_studio = lsb.LabelStudioServer(
            venv_dir, data_dir / "label-studio", document_root, login, port=ls_port,
            log_path=data_dir / "logs" / "label-studio.log",
        )
        backend = lsb.BackendServer(
            backend_environment(config, label_studio.url, login.token, data_dir / "model_dir"),
            log_path=data_dir / "logs" / "backend.log",
            port=backend_port,
        )
        logger.info("starting Label Studio on %s (a first start migrates its database: a minute or two) "
                    "and the backend on %s", label_studio.url, backend.url)
        # The backend loads its models while Label Studio migrates.
        starting = ThreadPoolExecutor(max_workers=2)
        for started in [starting.submit(label_studio.start), starting.submit(backend.start)]:
            started.result()
        client = label_studio.client()

        from backend.label_config import recommended_label_config
        from model.datasets import fashion_mnist_hierarchy

        label_config = recommended_label_config(fashion_mnist_hierarchy())
        project_id = find_project(client, PROJECT_TITLE)
        if project_id is not None and client.projects.get(project_id).label_config != label_config:
            # A project from an earlier run gets the current layout (same classes: annotations stay valid).
            client.projects.update(project_id, label_config=label_config)
            logger.info("project %d: label config updated to the current recommended layout", project_id)
        if project_id is None:
            project_id = lsb.create_project(client, PROJECT_TITLE, label_config)
            lsb.connect_local_files_storage(client, project_id, images_dir, document_root)
            lsb.import_image_tasks(
                client, project_id, images.paths, document_root,
                extra_data=[{"dataset_index": i} for i in images.dataset_indices],
            )
            logger.info("project %d: %d tasks imported", project_id, len(images.paths))

        # Opening the labeling page from the Data Manager follows the first tab's ordering, not the sampling.
        queue_tab_id = ensure_queue_tab(client, project_id)
        ml_backend_id = ensure_ml_backend(client, project_id, backend.url)
        logger.info("backend connected: it indexes the %d images, then pushes its first predictions",
                    len(images.paths))
        n_predictions = wait_for_predictions(client, project_id, ml_backend_id, PREDICTIONS_TIMEOUT_S)
        logger.info("%d predictions in Label Studio", n_predictions)

        print_banner(label_studio, backend, login, project_id, queue_tab_id, n_predictions, data_dir)
        if args.no_wait:
            return 0
        while not stop_requested.is_set():
            for server in (label_studio, backend):
                if not server.is_running():
                    logger.error("%s exited; see %s", server.name, server.log_path)
                    return 1
            stop_requested.wait(2.0)
        return 0
    except KeyboardInterrupt:
        return 0 if stop_requested.is_set() else 130
    except (lsb.LabelStudioError, TimeoutError, ValueError, OSError) as error:
        print(f"vlm-al demo: {error}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C while stopping must not leave a server behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for server in (backend, label_studio):
            if server is not None:
                server.stop()
        if starting is not None:
            starting.shutdown(wait=True)  # a start still polling sees its process gone and returns
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logger.info("stopped")


def print_banner(
    label_studio: lsb.LabelStudioServer,
    backend: lsb.BackendServer,
    login: lsb.LabelStudioLogin,
    project_id: int,
    queue_tab_id: int,
    n_predictions: int,
    data_dir: Path,
) -> None:
    lines = [
        "",
        "vlm-al demo is running",
        f"  Label Studio:  {label_studio.url}/projects/{project_id}/data?tab={queue_tab_id}",
        f"  user:          {login.username}",
        f"  password:      {login.password}",
        f"  API token:     {login.token}",
        f"  ML backend:    {backend.url}  ({n_predictions} predictions so far)",
        f"  data and logs: {data_dir}",
        "  The labeling queue follows the backend's priorities both ways into the labeling page:",
        "    'Label All Tasks' (Uncertainty sampling), and opening a task from the first Data Manager tab,",
        f"    '{QUEUE_TAB_TITLE}' (ascending prediction score). Other tabs serve their own order.",
        "  The prediction tab's percentage is the queue score (lower = label sooner), not a confidence.",
        "  Press Ctrl-C to stop both servers.",
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
