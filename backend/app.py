"""Flask app: the HTTP protocol Label Studio speaks to an ML backend. Thin: validation, auth, JSON errors."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.config import Config, configure_logging
from backend.metrics import CONTENT_TYPE_LATEST
from backend.protocol import (
    InvalidInput,
    parse_json_body,
    parse_project_id,
    printable,
    validate_access_token,
    validate_hostname,
    validate_task_id,
)
from backend.service import MLBackend
from backend.state import check_model_dir

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("backend.access")

PUBLIC_PATHS = frozenset({"/", "/health"})


def create_app(config: Config, backend: MLBackend | None = None) -> Flask:
    """Build the app. Without ``backend``, models are loaded here (gunicorn start-up), never in a request."""
    redactor = configure_logging(config)
    if config.log_level != "DEBUG":
        # httpx logs every Label Studio API call at INFO; the request log and the per-batch lines say enough.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if backend is None:
        check_model_dir(config.model_dir)  # one clear start-up error naming the path, before any model loads
        backend = MLBackend.from_config(config, redactor=redactor)
    elif backend.redactor is None:
        backend.redactor = redactor
    app = Flask("vlm_al_backend")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["vlm_al_backend"] = backend
    metrics = backend.metrics

    @app.before_request
    def _start() -> Response | None:
        g.started = time.perf_counter()
        if config.basic_auth_enabled and request.path not in PUBLIC_PATHS:
            problem = _authorization_problem(config)
            if problem is not None:
                # Visible in the log: a Label Studio webhook without credentials otherwise fails silently.
                logger.warning("refused %s %s: %s%s", request.method, printable(request.path), problem,
                               " (a Label Studio webhook without the basic auth header? see README, Security)"
                               if request.path == "/webhook" else "")
                response = jsonify(error="unauthorized", message=f"HTTP basic authentication required: {problem}")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Basic realm="vlm-al-backend"'
                return response
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("started")
        if started is not None:
            seconds = time.perf_counter() - started
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.request_seconds.labels(endpoint=endpoint).observe(seconds)
            # method, path (no query string, no headers, no body), status, milliseconds: nothing secret
            access_logger.info("%s %s %d %.1f ms", printable(request.method, 16), printable(request.path),
                               response.status_code, seconds * 1000.0)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> tuple[Response, int]:
        code = error.code or 500
        name = (error.name or "error").lower().replace(" ", "_")
        message = error.description if code < 500 else "internal error"
        if code == 413:
            message = f"the request body is larger than MAX_REQUEST_BYTES={config.max_request_bytes}"
        return jsonify(error=name, message=message), code

    @app.errorhandler(InvalidInput)
    def _invalid(error: InvalidInput) -> tuple[Response, int]:
        return jsonify(error=error.kind, message=str(error)), error.status

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> tuple[Response, int]:
        # The body names no path, exception text or secret: those stay in the server log, under a reference.
        reference = uuid.uuid4().hex[:12]
        logger.exception("unhandled error in %s %s (reference %s)", request.method, printable(request.path),
                         reference)
        return jsonify(error="internal_error", message=f"internal error (reference {reference} in the server log)"), 500

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify(backend.health())

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object(config)
        project_id = parse_project_id(_required(body, "project"))
        schema = _optional_str(body, "schema")
        hostname = validate_hostname(_optional_str(body, "hostname"))
        access_token = validate_access_token(_optional_str(body, "access_token"))
        model_version = backend.setup(project_id, schema, hostname, access_token,
                                      backend_host=printable(request.host, 300))
        return jsonify(model_version=model_version)

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object(config)
        tasks = _tasks(body, "tasks")
        label_config = _optional_str(body, "label_config")
        response = backend.predict_response(tasks, project=body.get("project"), label_config=label_config)
        return jsonify(results=response.predictions, model_version=response.model_version)

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object(config)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise InvalidInput("the webhook body needs an 'action' string")
        if len(action) > 100 or not action.isascii() or not action.isprintable():
            raise InvalidInput("the webhook 'action' must be a short printable ASCII string")
        return jsonify(backend.handle_event(action, body))

    @app.post("/train")
    def train() -> Response:
        body = _json_object(config)
        project_id = parse_project_id(_required(body, "project"))
        tasks = _tasks(body, "annotations") if "annotations" in body else []
        label_config = _optional_str(body, "label_config")
        return jsonify(backend.train_legacy(project_id, tasks, label_config))

    @app.get("/versions")
    def versions() -> Response:
        project_raw = request.args.get("project")
        project_id = parse_project_id(project_raw) if project_raw else None
        return jsonify(versions=backend.versions(project_id))

    @app.get("/report/<name>")
    def report(name: str) -> Response:
        """The project report (backend/report.py): ``/report/<id>`` is HTML, ``/report/<id>.json`` the same data."""
        from backend.report import build_report, render_html

        as_json = name.endswith(".json")
        data = build_report(backend, parse_project_id(name[: -len(".json")] if as_json else name))
        return jsonify(data) if as_json else Response(render_html(data), mimetype="text/html")

    @app.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    return app


def _authorization_problem(config: Config) -> str | None:
    """None when the request carries the configured basic auth credentials, else what is wrong (no secret)."""
    header = request.headers.get("Authorization")
    if not header:
        return "no Authorization header"
    try:
        auth = request.authorization
    except Exception:  # undecodable bytes in the header
        return "malformed Authorization header"
    if auth is None or auth.type != "basic" or auth.username is None or auth.password is None:
        return "not HTTP basic credentials"
    try:
        user_ok = hmac.compare_digest(auth.username.encode("utf-8"), (config.basic_auth_user or "").encode())
        pass_ok = hmac.compare_digest(auth.password.encode("utf-8"), (config.basic_auth_pass or "").encode())
    except UnicodeError:
        return "malformed Authorization header"
    return None if (user_ok and pass_ok) else "wrong user name or password"


def _authorized(config: Config) -> bool:
    return _authorization_problem(config) is None


def _body_bytes(config: Config) -> bytes:
    """The raw body, at most MAX_REQUEST_BYTES: a Content-Length above it and a chunked body that grows past it
    are both refused with 413 (never truncated)."""
    limit = config.max_request_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise InvalidInput(f"the request body is larger than MAX_REQUEST_BYTES={limit}", 413, "request_too_large")
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return b""
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is None and not (chunked or request.environ.get("wsgi.input_terminated")):
        return b""
    want = length if length is not None else limit + 1
    parts: list[bytes] = []
    total = 0
    while total < want:
        chunk = stream.read(min(65536, want - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    if total > limit:
        raise InvalidInput(f"the request body is larger than MAX_REQUEST_BYTES={limit}", 413, "request_too_large")
    return b"".join(parts)


def _json_object(config: Config) -> dict[str, Any]:
    return parse_json_body(_body_bytes(config))


def _required(body: dict[str, Any], key: str) -> Any:
    if key not in body or body[key] is None:
        raise InvalidInput(f"missing required key {key!r}")
    return body[key]


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _tasks(body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    tasks = _required(body, key)
    if not isinstance(tasks, list):
        raise InvalidInput(f"{key!r} must be a list of tasks, got {type(tasks).__name__}")
    for position, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise InvalidInput(f"{key}[{position}] must be an object, got {type(task).__name__}")
        task_id = task.get("id")
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise InvalidInput(f"{key}[{position}] needs an integer 'id', got {printable(repr(task_id), 40)}")
        validate_task_id(task_id, f"{key}[{position}]")
        if not isinstance(task.get("data"), dict):
            raise InvalidInput(f"{key}[{position}] (task {task_id}) needs a 'data' object")
    return tasks
