"""Fork server of test_fault_kill9: imports everything once, then for every ``run <model_dir> <n>`` line on stdin
forks a child that serves the model on disk and fits again and again until it is killed (kill -9 by the test).

The child prints ``PID <pid>``, ``SERVING <version> <loaded>`` after the warm start and ``FIT <version>`` after each
fit, or ``CRASH <error>`` if anything raises; the server prints ``DONE`` when the child is gone. The child never stops
on its own (it adds a task whenever it runs out), so the test's kill always finds it. Forking keeps 20 restarts within
the time budget."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import replace
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

from werkzeug.serving import make_server  # noqa: E402

import conftest as fixtures  # noqa: E402
from backend.config import Config  # noqa: E402
from backend.jobs import InlineJobRunner  # noqa: E402
from backend.ls_client import LabelStudioClientFactory  # noqa: E402
from backend.metrics import BackendMetrics  # noqa: E402
from backend.service import MLBackend  # noqa: E402
from model.embedding_store import EmbeddingStore  # noqa: E402

FINES = ["T-shirt", "Shirt", "Sneaker", "Boot"]


def main(model_dir: str, first_annotation: int) -> None:
    fake = fixtures.FakeLabelStudio(label_config=fixtures.label_config())
    for task_id in range(1, max(60, first_annotation) + 1):
        fake.add_task(task_id, FINES[(task_id - 1) % 4])
    for task_id in range(1, first_annotation + 1):
        fake.annotate(task_id, FINES[(task_id - 1) % 4])
    server = make_server("127.0.0.1", 0, fake.make_app(), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_port}"
    config = replace(Config(model_dir=Path(model_dir), torch_threads=1, query_batch_size=3, keep_model_versions=3),
                     label_studio_url=fake.url, label_studio_api_key=fixtures.API_KEY)
    backend = MLBackend(
        config, backbone=fixtures.FakeBackbone(), weak_annotator=fixtures.FakeWeakAnnotator(),
        embedding_store=EmbeddingStore(config.model_dir / "embeddings.sqlite"), image_codec=fixtures.image_codec(),
        ls_clients=LabelStudioClientFactory(config.model_dir / "downloads", config.max_image_bytes, fake.url,
                                            fixtures.API_KEY),
        jobs=InlineJobRunner(), metrics=BackendMetrics(),
    )
    backend.warm_start()
    model, version = backend.projects.served_model(fixtures.PROJECT_ID, None)
    print(f"SERVING {version} {model is not None}", flush=True)
    task_id = first_annotation
    while True:
        task_id += 1
        if task_id > len(fake.tasks):
            fake.add_task(task_id, FINES[(task_id - 1) % 4])
        fake.annotate(task_id, FINES[(task_id - 1) % 4])  # something new: every fit makes a version
        print(f"FIT {backend.run_fit(fixtures.PROJECT_ID)}", flush=True)


def serve_forks() -> None:
    import model.finegrained  # noqa: F401  (imported once here, shared by every fork)
    import model.noise  # noqa: F401
    import model.query  # noqa: F401
    import torch

    torch.set_num_threads(1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the optimiser's first use imports torch._dynamo (s)

    print("READY", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "run":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                print(f"PID {os.getpid()}", flush=True)
                main(parts[1], int(parts[2]))
            except BaseException as error:  # noqa: BLE001  (reported to the test, which fails on it)
                print(f"CRASH {type(error).__name__}: {error}".replace("\n", " "), flush=True)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        print("DONE", flush=True)


if __name__ == "__main__":
    serve_forks()
