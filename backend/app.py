"""Flask app: the HTTP protocol Label Studio speaks to an ML backend. Thin: validation, auth, JSON errors."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.config import Config, configure_logging
from backend.metrics import CONTENT_TYPE_LATEST
from backend.protocol import InvalidInput, parse_project_id
from backend.service import MLBackend

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/", "/health"})


def create_app(config: Config, backend: MLBackend | None = None) -> Flask:
    """Build the app. Without ``backend``, models are loaded here (gunicorn start-up), never in a request."""
    redactor = configure_logging(config)
    if backend is None:
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
        if config.basic_auth_enabled and request.path not in PUBLIC_PATHS and not _authorized(config):
            response = jsonify(error="unauthorized", message="HTTP basic authentication required")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="vlm-al-backend"'
            return response
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("started")
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> tuple[Response, int]:
        return jsonify(error=error.name.lower().replace(" ", "_"), message=error.description), error.code or 500

    @app.errorhandler(InvalidInput)
    def _invalid(error: InvalidInput) -> tuple[Response, int]:
        return jsonify(error=error.kind, message=str(error)), error.status

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify(error="internal_error", message=f"{type(error).__name__}: {error}"), 500

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify(backend.health())

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        project_id = parse_project_id(_required(body, "project"))
        schema = _optional_str(body, "schema")
        hostname = _optional_str(body, "hostname")
        access_token = _optional_str(body, "access_token")
        model_version = backend.setup(project_id, schema, hostname, access_token)
        return jsonify(model_version=model_version)

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = _tasks(body, "tasks")
        label_config = _optional_str(body, "label_config")
        response = backend.predict_response(tasks, project=body.get("project"), label_config=label_config)
        return jsonify(results=response.predictions, model_version=response.model_version)

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise InvalidInput("the webhook body needs an 'action' string")
        return jsonify(backend.handle_event(action, body))

    @app.post("/train")
    def train() -> Response:
        body = _json_object()
        project_id = parse_project_id(_required(body, "project"))
        tasks = _tasks(body, "annotations") if "annotations" in body else []
        label_config = _optional_str(body, "label_config")
        return jsonify(backend.train_legacy(project_id, tasks, label_config))

    @app.get("/versions")
    def versions() -> Response:
        project_raw = request.args.get("project")
        project_id = parse_project_id(project_raw) if project_raw else None
        return jsonify(versions=backend.versions(project_id))

    @app.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    return app


def _authorized(config: Config) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic" or auth.username is None or auth.password is None:
        return False
    user_ok = hmac.compare_digest(auth.username.encode(), (config.basic_auth_user or "").encode())
    pass_ok = hmac.compare_digest(auth.password.encode(), (config.basic_auth_pass or "").encode())
    return user_ok and pass_ok


def _json_object() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise InvalidInput("the request body must be valid JSON")
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


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
            raise InvalidInput(f"{key}[{position}] needs an integer 'id', got {task_id!r}")
        if not isinstance(task.get("data"), dict):
            raise InvalidInput(f"{key}[{position}] (task {task_id}) needs a 'data' object")
    return tasks
