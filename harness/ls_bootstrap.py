"""Run a real Label Studio next to this backend: install, start, stop, and set up a project.

Used by `vlm-al demo` and the end-to-end tests. Label Studio is a separate application with its own
dependencies, so it lives in its own virtual environment and runs as a subprocess.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from filelock import FileLock
from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"
LOOPBACK_HOST = "127.0.0.1"
UNCERTAINTY_SAMPLING = "Uncertainty sampling"
# Measured: a fresh database takes 42-56 s to migrate on a 2-core box; leave room for a busy machine.
DEFAULT_STARTUP_TIMEOUT_S = 240.0
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or driven."""


class PortInUseError(LabelStudioError):
    """The requested port is taken (Label Studio would silently move to the next one)."""


def default_label_studio_venv() -> Path:
    return Path.home() / ".cache" / "vlm-al" / "label-studio-venv"


def label_studio_executable(venv_dir: Path) -> Path:
    return Path(venv_dir) / "bin" / "label-studio"


def ensure_label_studio_venv(
    venv_dir: Path | str | None = None,
    version: str = LABEL_STUDIO_VERSION,
    log: Callable[[str], None] = logger.info,
) -> Path:
    """Return a virtual environment with `label-studio==version`, creating it if it is missing.

    A first install downloads about 1 GB and takes ~90 s. A file lock keeps two processes from
    installing into the same directory at once.
    """
    venv_path = Path(venv_dir) if venv_dir is not None else default_label_studio_venv()
    venv_path = venv_path.expanduser().resolve()
    if label_studio_executable(venv_path).exists():
        return venv_path
    venv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv_path) + ".lock"):
        if label_studio_executable(venv_path).exists():
            return venv_path
        log(f"Installing label-studio=={version} into {venv_path} (about 1 GB, a minute or two)")
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_path)
        pip = [str(venv_path / "bin" / "python"), "-m", "pip"]
        result = subprocess.run(
            [*pip, "install", "--disable-pip-version-check", "--quiet", f"label-studio=={version}"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not label_studio_executable(venv_path).exists():
            raise LabelStudioError(
                f"pip install label-studio=={version} into {venv_path} failed "
                f"(exit {result.returncode}): {result.stderr[-2000:]}"
            )
    return venv_path


def port_is_free(port: int, host: str = LOOPBACK_HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR ignores TIME_WAIT leftovers but still fails on a listening socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def first_free_port(preferred: int, host: str = LOOPBACK_HOST, attempts: int = 50) -> int:
    """The preferred port if free, else the next free one above it."""
    for port in range(preferred, preferred + attempts):
        if port_is_free(port, host):
            return port
    raise PortInUseError(f"no free port in {preferred}..{preferred + attempts - 1} on {host}")


def ephemeral_port(host: str = LOOPBACK_HOST) -> int:
    """A port the kernel considers free right now (for tests that need no fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def clean_environment(bin_dir: Path | None = None) -> dict[str, str]:
    """A minimal environment for a server subprocess, to which its settings are added explicitly.

    Label Studio reads LABEL_STUDIO_X, HEARTEX_X and then plain X, so a stray USERNAME, HOST or PORT
    in the caller's environment would leak into it; the backend gets exactly the settings it is given.
    """
    path = f"{bin_dir}:{_SYSTEM_PATH}" if bin_dir is not None else _SYSTEM_PATH
    return {"PATH": path, "HOME": str(Path.home()), "LANG": "C.UTF-8"}


def new_token() -> str:
    """A legacy API token: more than 5 characters, at most 40 (the database column)."""
    return secrets.token_hex(20)


class ManagedProcess:
    """A server subprocess in its own process group, logged to a file, stopped with SIGTERM then SIGKILL."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        health_url: str,
        cwd: Path | None = None,
        startup_timeout_s: float = 120.0,
        stop_grace_s: float = 20.0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        # start() may run in a helper thread while the main thread is told to stop (Ctrl-C).
        self._state_lock = threading.Lock()
        self._stop_requested = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._state_lock, open(self.log_path, "ab") as log_file:
            if self._stop_requested:
                raise LabelStudioError(f"{self.name} was stopped before it started")
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: SIGTERM reaches every worker it forks
            )
        started = time.monotonic()
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        logger.info("%s healthy after %.1f s (log: %s)", self.name, self.startup_seconds, self.log_path)

    def _wait_healthy(self, started: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise LabelStudioError(
                    f"{self.name} exited with code {self.process.returncode} before it was healthy; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                if requests.get(self.health_url, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() - started > self.startup_timeout_s:
                raise LabelStudioError(
                    f"{self.name} not healthy at {self.health_url} after {self.startup_timeout_s:.0f} s; "
                    f"last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """Stop the whole process group; return the exit code (None if it was never started)."""
        with self._state_lock:
            self._stop_requested = True
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, self.stop_grace_s)
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=10)
        # Workers forked by the server may outlive it; clean up the rest of the group.
        self._signal_group(signal.SIGKILL)
        return self.process.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class LabelStudioLogin:
    """The account Label Studio creates on first start. `token` is the legacy API token."""

    username: str
    password: str
    token: str


def load_or_create_login(path: Path, username: str) -> LabelStudioLogin:
    """The login saved at `path`, or a new one saved there.

    Label Studio creates the user and token only with a fresh database, so a restarted server on the
    same data directory must be given the same login again.
    """
    from model.io import atomic_write_json

    path = Path(path)
    if path.exists():
        saved = json.loads(path.read_text())
        return LabelStudioLogin(username=saved["username"], password=saved["password"], token=saved["token"])
    login = LabelStudioLogin(username=username, password=secrets.token_urlsafe(12), token=new_token())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"username": login.username, "password": login.password, "token": login.token})
    path.chmod(0o600)
    return login


class LabelStudioServer(ManagedProcess):
    """`label-studio start` on a loopback port with a known user and legacy token, local files served."""

    def __init__(
        self,
        venv_dir: Path,
        data_dir: Path,
        document_root: Path,
        login: LabelStudioLogin,
        port: int = 8080,
        host: str = LOOPBACK_HOST,
        log_path: Path | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.venv_dir = Path(venv_dir)
        self.data_dir = Path(data_dir).resolve()
        self.document_root = Path(document_root).resolve()
        self.login = login
        self.host = host
        self.port = port
        env = {
            **clean_environment(self.venv_dir / "bin"),
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            # Both are needed for a loopback ML backend: one guards the ML URL, the other its webhook.
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            # Offline and private: no error reports to Label Studio's Sentry project.
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            **(extra_env or {}),
            # The login goes through the environment, never the command line (visible to every user in ps).
            # Label Studio creates this user and token on a fresh database.
            "LABEL_STUDIO_USERNAME": login.username,
            "LABEL_STUDIO_PASSWORD": login.password,
            "LABEL_STUDIO_USER_TOKEN": login.token,
        }
        command = [
            str(label_studio_executable(self.venv_dir)),
            "start",
            "--no-browser",
            "--internal-host", host,
            "--port", str(port),
            "--data-dir", str(self.data_dir),
            "--enable-legacy-api-token",
        ]  # fmt: skip
        super().__init__(
            name="Label Studio",
            command=command,
            env=env,
            log_path=log_path or self.data_dir / "label-studio.log",
            health_url=f"http://{host}:{port}/health",
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        if not label_studio_executable(self.venv_dir).exists():
            raise LabelStudioError(f"no label-studio in {self.venv_dir}; call ensure_label_studio_venv first")
        if not port_is_free(self.port, self.host):
            raise PortInUseError(f"port {self.port} on {self.host} is in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.document_root.mkdir(parents=True, exist_ok=True)
        super().start()

    def client(self) -> LabelStudio:
        return LabelStudio(base_url=self.url, api_key=self.login.token)

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self


def backend_command(python: Path | str, host: str, port: int) -> list[str]:
    """`vlm-al serve` (gunicorn) for this interpreter."""
    return [str(python), "-m", "backend.cli", "serve", "--host", host, "--port", str(port)]


class BackendServer(ManagedProcess):
    """This ML backend as a subprocess (gunicorn via `vlm-al serve`), configured through its environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        port: int = 9090,
        host: str = LOOPBACK_HOST,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        startup_timeout_s: float = 180.0,
    ) -> None:
        self.host = host
        self.port = port
        super().__init__(
            name="ML backend",
            command=command or backend_command(sys.executable, host, port),
            env=env,
            log_path=log_path,
            health_url=f"http://{host}:{port}/health",
            cwd=cwd,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        if not port_is_free(self.port, self.host):
            raise PortInUseError(f"port {self.port} on {self.host} is in use")
        super().start()

    def __enter__(self) -> BackendServer:
        self.start()
        return self


# --- project set-up through label-studio-sdk ---------------------------------------------------------


def create_project(
    client: LabelStudio,
    title: str,
    label_config: str,
    sampling: str = UNCERTAINTY_SAMPLING,
) -> int:
    """Create a project whose queue follows the backend's prediction scores; return its id."""
    project = client.projects.create(
        title=title,
        label_config=label_config,
        sampling=sampling,
        show_collab_predictions=True,
    )
    assert project.id is not None
    return int(project.id)


def local_files_url(relative_path: str) -> str:
    """The URL Label Studio serves a file under LOCAL_FILES_DOCUMENT_ROOT at."""
    return "/data/local-files/?d=" + quote(relative_path, safe="/")


def connect_local_files_storage(client: LabelStudio, project_id: int, directory: Path, document_root: Path) -> int:
    """Register `directory` as a Local Files storage so Label Studio serves the files in it.

    Files are served only when some project has a storage containing them, and the storage must be a
    subdirectory of the document root (the root itself is refused).
    """
    directory = Path(directory).resolve()
    document_root = Path(document_root).resolve()
    if directory == document_root or document_root not in directory.parents:
        raise LabelStudioError(f"{directory} must be a subdirectory of the document root {document_root}")
    storage = client.import_storage.local.create(
        project=project_id,
        path=str(directory),
        regex_filter=r".*\.png$",
        use_blob_urls=True,
        title=directory.name,
    )
    assert storage.id is not None
    return int(storage.id)


def import_image_tasks(
    client: LabelStudio,
    project_id: int,
    image_paths: Sequence[Path],
    document_root: Path,
    extra_data: Sequence[Mapping[str, Any]] | None = None,
    image_key: str = "image",
) -> list[int]:
    """Import one task per image (as `/data/local-files/` URLs, in the given order); return the task ids."""
    document_root = Path(document_root).resolve()
    tasks = []
    for i, path in enumerate(image_paths):
        relative = Path(path).resolve().relative_to(document_root).as_posix()
        data: dict[str, Any] = {image_key: local_files_url(relative)}
        if extra_data is not None:
            data.update(extra_data[i])
        tasks.append({"data": data})
    response = client.projects.import_tasks(project_id, request=tasks, return_task_ids=True)
    task_ids = [int(t) for t in (response.task_ids or [])]
    if len(task_ids) != len(tasks):
        raise LabelStudioError(f"imported {len(task_ids)} tasks of {len(tasks)}")
    return task_ids


def connect_ml_backend(client: LabelStudio, project_id: int, url: str, title: str = "vlm-al") -> int:
    """Register the backend with the project (Label Studio calls /health and /setup); return its id."""
    ml_backend = client.ml.create(
        project=project_id, url=url, title=title, is_interactive=False, auto_update=True
    )
    assert ml_backend.id is not None
    return int(ml_backend.id)


def set_project_model_version(client: LabelStudio, project_id: int, model_version: str) -> None:
    """Point the project at a version; Uncertainty sampling only uses predictions of that version."""
    client.projects.update(project_id, model_version=model_version)


def request_predictions(client: LabelStudio, project_id: int) -> None:
    """The Data Manager action "Retrieve predictions" for every task (LS skips up-to-date ones)."""
    client.actions.create(
        id="retrieve_tasks_predictions",
        project=project_id,
        selected_items={"all": True, "excluded": []},
    )


def api_get(base_url: str, token: str, path: str, timeout_s: float = 30.0, **params: Any) -> Any:
    """A plain authenticated GET for endpoints the SDK lacks (e.g. `/api/projects/{id}/next/`)."""
    response = requests.get(
        base_url.rstrip("/") + path,
        headers={"Authorization": f"Token {token}"},
        params=params or None,
        timeout=timeout_s,
    )
    if not response.ok:
        raise LabelStudioError(f"GET {path} -> {response.status_code}: {response.text[:500]}")
    return response.json()


def next_task(base_url: str, token: str, project_id: int) -> dict[str, Any]:
    """The task Label Studio's queue hands this user next (trailing slash required)."""
    return api_get(base_url, token, f"/api/projects/{project_id}/next/")


def project_predictions(client: LabelStudio, project_id: int) -> list[dict[str, Any]]:
    """Every prediction in the project, as plain dicts."""
    return [p.model_dump() for p in client.predictions.list(project=project_id)]


def wait_until(
    condition: Callable[[], Any],
    timeout_s: float,
    what: str,
    interval_s: float = 0.5,
) -> Any:
    """Poll `condition` until it returns something truthy; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # a server mid-restart is not a reason to stop polling
            last_error = error
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{detail}")
        time.sleep(interval_s)


@dataclass(frozen=True)
class DatasetImages:
    """PNG files written for a project, with the data set index and true class of each."""

    paths: list[Path]
    dataset_indices: list[int]
    class_names: list[str]


def write_fashion_mnist_pngs(
    directory: Path,
    count: int,
    split: str = "test",
    size: int = 224,
    invert: bool = True,
    pad_fraction: float = 0.15,
    seed: int = 0,
) -> DatasetImages:
    """Write `count` random Fashion-MNIST images as PNG files.

    The defaults (dark object on white with a margin, 224 px) are what the shipped ImageNet map was
    chosen on. Files that already exist are kept, so a restarted demo serves the same images.
    """
    import numpy as np

    from model.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, to_pil

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    images, labels = load_fashion_mnist(split)  # type: ignore[arg-type]
    if count > len(images):
        raise ValueError(f"count {count} exceeds the {len(images)} images of the {split} split")
    indices = sorted(int(i) for i in np.random.default_rng(seed).choice(len(images), size=count, replace=False))
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{split}-{index:05d}.png" for index in indices]
    missing = [(i, p) for i, p in zip(indices, paths) if not p.exists()]
    write_pngs(
        (to_pil(images[i], invert=invert, size=size, pad_fraction=pad_fraction) for i, _ in missing),
        directory,
        [p.name for _, p in missing],
    )
    return DatasetImages(
        paths=paths,
        dataset_indices=indices,
        class_names=[FASHION_MNIST_CLASSES[int(labels[i])] for i in indices],
    )


def write_pngs(images: Iterable[Any], directory: Path, names: Sequence[str]) -> list[Path]:
    """Save PIL images as PNG files (atomically, so a half-written file is never served)."""
    from model.io import atomic_write_bytes

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names, strict=True):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = directory / name
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
