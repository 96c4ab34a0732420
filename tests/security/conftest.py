"""Hostile-input suite: a real `vlm-al serve` on 127.0.0.1, a programmable fake Label Studio, and a trap port.

Nothing here talks to anything but 127.0.0.1. Addresses the backend must refuse (cloud metadata, other local
ports) are either refused before any connection (the in-process fetcher cases spy on the resolver and the
connector) or stood in for by a *trap*: a listener on another 127.0.0.1 port that counts the connections it gets.

With HOSTILE_RESULTS=<path> the session writes {"cases", "held", "failed", ...} there (bench/hostile.py does).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from backend.label_config import recommended_label_config
from model.hierarchy import LabelHierarchy

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ls-token-0123456789abcdef0123456789abcdef"
OTHER_TOKEN = "other-token-abcdef0123456789abcdef012345"
BASIC_USER, BASIC_PASS = "ls-backend", "s3cret-basic-pass-42"
GROUPS = {"Top": ["T-shirt", "Shirt"], "Shoe": ["Sneaker", "Boot"]}

# Server settings of the suite (everything else is the default of `vlm-al serve`).
DOWNLOAD_TIMEOUT_S = 2.0
PREDICT_DEADLINE_S = 4.0
READ_TIMEOUT_S = 3.0
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def label_config() -> str:
    return recommended_label_config(LabelHierarchy.from_groups(GROUPS))


def png(colour=(200, 30, 30), size=24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the trap: a port the backend must never connect to ---------------------------------------------------------


class Trap:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


# --- fake Label Studio ------------------------------------------------------------------------------------------


@dataclass
class FakeLS:
    """Serves images with hostile behaviours by name (/data/local-files/?d=<name>) and records every request."""

    trap_port: int
    url: str = ""
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    tasks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, path_part: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if path_part in r["path"] + "?" + r["query"]]

    def __call__(self, environ, start_response):
        request = Request(environ)
        with self.lock:
            self.requests.append({"method": request.method, "path": request.path,
                                  "query": request.query_string.decode("latin-1"),
                                  "auth": request.headers.get("Authorization")})
        if request.path.startswith("/data/local-files/"):
            return self.image(request.args.get("d", ""), request)(environ, start_response)
        if request.path.startswith("/tasks/") and request.path.endswith("/presign/"):
            return Response(status=302, headers={"Location": f"http://127.0.0.1:{self.trap_port}/bucket/key"})(
                environ, start_response)
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            return Response(json.dumps({"detail": "no"}), 401, mimetype="application/json")(environ, start_response)
        if request.path == "/api/tasks/":
            project = int(request.args.get("project", 0))
            body = {"tasks": self.tasks.get(project, []), "total": len(self.tasks.get(project, []))}
            return Response(json.dumps(body), mimetype="application/json")(environ, start_response)
        if request.path.startswith("/api/projects/") and request.path.endswith("/import/predictions"):
            body = json.loads(request.get_data() or b"[]")
            return Response(json.dumps({"created": len(body)}), 201, mimetype="application/json")(
                environ, start_response)
        if request.path.startswith("/api/projects/"):
            pid = int(request.path.split("/")[3])
            return Response(json.dumps({"id": pid, "label_config": label_config(), "model_version": "x"}),
                            mimetype="application/json")(environ, start_response)
        if request.path == "/api/webhooks/" and request.method == "GET":
            with self.lock:
                hooks = list(self.webhooks)
            return Response(json.dumps(hooks), mimetype="application/json")(environ, start_response)
        if request.path.startswith("/api/webhooks/") and request.method == "PATCH":
            hook_id = int(request.path.strip("/").split("/")[-1])
            patch = json.loads(request.get_data())
            with self.lock:
                for hook in self.webhooks:
                    if hook["id"] == hook_id:
                        hook.update(patch)
            return Response("{}", mimetype="application/json")(environ, start_response)
        return Response("{}", 404, mimetype="application/json")(environ, start_response)

    def image(self, name: str, request: Request) -> Response:
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            return Response("auth", 401)
        trap = f"http://127.0.0.1:{self.trap_port}/x"
        if name.startswith("ok"):
            return Response(png(), mimetype="image/png")
        if name == "redirect-trap":
            return Response(status=302, headers={"Location": trap})
        if name == "redirect-metadata":
            return Response(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        if name == "redirect-same":
            return Response(status=301, headers={"Location": "/data/local-files/?d=ok.png"})
        if name == "redirect-relative-trap":
            return Response(status=307, headers={"Location": f"//127.0.0.1:{self.trap_port}/x"})
        if name.startswith("trickle"):
            def trickle():
                for _ in range(600):
                    time.sleep(0.1)
                    yield b"\x89"
            return Response(trickle(), mimetype="image/png")
        if name.startswith("slow"):
            def slow():
                time.sleep(8.0)
                yield png()
            return Response(slow(), mimetype="image/png")
        if name == "huge-declared":
            def declared():
                self._count(name, 0)
                for _ in range(200):
                    self._count(name, 65536)
                    yield b"\0" * 65536
            return Response(declared(), headers={"Content-Length": str(10**9)}, mimetype="image/png")
        if name == "huge-streamed":
            def streamed():
                for _ in range(800):  # 50 MiB if read to the end
                    self._count(name, 65536)
                    yield b"\0" * 65536
            return Response(streamed(), mimetype="image/png")
        if name in HOSTILE_FILES:
            return Response(HOSTILE_FILES[name](), mimetype="application/octet-stream")
        return Response("missing", 404)

    def _count(self, name: str, n: int) -> None:
        with self.lock:
            self.bytes_sent[name] = self.bytes_sent.get(name, 0) + n


def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
            b"(%pipe%touch /tmp/vlm-al-eps-pwned) (w) file\nshowpage\n%%EOF\n")


def _pil(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), 128).save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")  # 900 Mpx, a few KB
    return buffer.getvalue()


HOSTILE_FILES = {
    "eps": _eps,
    "ico": lambda: _pil("ICO"),
    "pcx": lambda: _pil("PCX"),
    "tga": lambda: _pil("TGA"),
    "ppm": lambda: _pil("PPM"),
    "xbm": lambda: _pil("XBM", "1"),
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "bomb": _bomb,
    "truncated": lambda: png()[:40],
    "html": lambda: b"<html>not an image</html>",
}


@pytest.fixture(scope="session")
def trap() -> Iterator[Trap]:
    trap = Trap()
    yield trap
    trap.close()


def _serve(app) -> tuple[Any, int]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, server.server_port


@pytest.fixture(scope="session")
def fake_ls(trap: Trap) -> Iterator[FakeLS]:
    fake = FakeLS(trap_port=trap.port)
    server, fake.port = _serve(fake)
    fake.url = f"http://127.0.0.1:{fake.port}"
    yield fake
    server.shutdown()


@pytest.fixture(scope="session")
def other_ls(trap: Trap) -> Iterator[FakeLS]:
    """A second 'Label Studio' (an attacker's host in the token cases)."""
    fake = FakeLS(trap_port=trap.port)
    server, fake.port = _serve(fake)
    fake.url = f"http://127.0.0.1:{fake.port}"
    yield fake
    server.shutdown()


# --- the backend under test: `vlm-al serve` -----------------------------------------------------------------------


@dataclass
class Backend:
    url: str
    process: subprocess.Popen
    log_path: Path
    model_dir: Path
    auth: tuple[str, str] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: Any = None, *, data: bytes | None = None, timeout: float = 30.0,
             headers: dict[str, str] | None = None) -> requests.Response:
        kwargs: dict[str, Any] = {"timeout": timeout, "headers": headers or {}}
        if self.auth:
            kwargs["auth"] = self.auth
        if data is not None:
            kwargs["data"] = data
            kwargs["headers"].setdefault("Content-Type", "application/json")
        else:
            kwargs["json"] = body
        return requests.post(self.url + path, **kwargs)

    def setup(self, project: int, ls: FakeLS, token: str | None = TOKEN) -> requests.Response:
        body = {"project": f"{project}.1795294297", "schema": label_config(), "hostname": ls.url}
        if token is not None:
            body["access_token"] = token
        return self.post("/setup", body)

    def predict(self, project: int, urls: list[str], timeout: float = 60.0) -> requests.Response:
        tasks = [{"id": i + 1, "data": {"image": u}} for i, u in enumerate(urls)]
        return self.post("/predict", {"tasks": tasks, "project": f"{project}.1795294297",
                                      "label_config": label_config()}, timeout=timeout)


def start_backend(tmp: Path, port: int, extra_env: dict[str, str] | None = None) -> Backend:
    model_dir = tmp / "model_dir"
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.update({
        "MODEL_DIR": str(model_dir),
        "WEAK_ANNOTATOR": "none",  # the hostile cases never reach the weak annotator; it only slows start-up
        "IMAGE_DOWNLOAD_TIMEOUT_SECONDS": str(DOWNLOAD_TIMEOUT_S),
        "PREDICT_DEADLINE_SECONDS": str(PREDICT_DEADLINE_S),
        "REQUEST_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT_S),
        "MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "FIT_DEBOUNCE_SECONDS": "0.2",
        "TORCH_THREADS": "1",
        **(extra_env or {}),
    })
    handle = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vlm-al serve exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                auth = (extra_env or {}).get("BASIC_AUTH_USER")
                return Backend(url, process, log_path, model_dir,
                               (auth, (extra_env or {})["BASIC_AUTH_PASS"]) if auth else None)
        except requests.RequestException:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("vlm-al serve did not answer /health within 240 s")


def stop_backend(backend: Backend) -> None:
    backend.process.terminate()
    try:
        backend.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        backend.process.kill()


@pytest.fixture(scope="session")
def backend(tmp_path_factory) -> Iterator[Backend]:
    server = start_backend(tmp_path_factory.mktemp("hostile-backend"), free_port())
    yield server
    stop_backend(server)


@pytest.fixture(scope="session")
def auth_backend(tmp_path_factory) -> Iterator[Backend]:
    server = start_backend(tmp_path_factory.mktemp("hostile-auth-backend"), free_port(),
                           {"BASIC_AUTH_USER": BASIC_USER, "BASIC_AUTH_PASS": BASIC_PASS})
    yield server
    stop_backend(server)


# --- results for bench/results/hostile.json ---------------------------------------------------------------------

_RESULTS: dict[str, str] = {}


def pytest_runtest_logreport(report) -> None:
    if "tests/security/" not in report.nodeid.replace("\\", "/") and not report.nodeid.startswith("test_"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _RESULTS[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus) -> None:
    target = os.environ.get("HOSTILE_RESULTS")
    if not target or not _RESULTS:
        return
    by_kind: dict[str, dict[str, int]] = {}
    for nodeid, outcome in _RESULTS.items():
        module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_")
        kind = by_kind.setdefault(module, {"cases": 0, "held": 0, "failed": 0})
        kind["cases"] += 1
        kind["held" if outcome == "passed" else "failed"] += 1
    result = {
        "cases": len(_RESULTS),
        "held": sum(1 for o in _RESULTS.values() if o == "passed"),
        "failed": sum(1 for o in _RESULTS.values() if o != "passed"),
        "by_kind": by_kind,
        "failed_cases": sorted(n for n, o in _RESULTS.items() if o != "passed"),
        "server": "vlm-al serve on 127.0.0.1 (WEAK_ANNOTATOR=none; see tests/security/conftest.py for the limits)",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(result, indent=2) + "\n")
