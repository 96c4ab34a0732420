"""Server configuration: the only place that reads the environment."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

QUERY_STRATEGIES = ("ours", "margin", "entropy", "least-confidence", "k-center", "random")
"""Strategies that can order a server's queue: those that need no retraining inside a query (ISO does)."""
WEAK_ANNOTATORS = ("semantic", "imagenet-map", "open-clip", "openai", "simulated", "none")
EMBEDDING_RUNTIMES = ("auto", "torch", "onnxruntime")  # model.runtime.RUNTIMES (not imported: it loads torch)
DEVICES = ("auto", "cpu", "cuda")  # model.runtime.DEVICES
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_FIELDS = ("label_studio_api_key", "basic_auth_pass", "vlm_api_key")


class ConfigError(ValueError):
    """An environment variable with a value the server cannot use; the message names the variable."""


def default_imagenet_map_file() -> Path:
    return Path(__file__).resolve().parent.parent / "model" / "data" / "fashion_mnist_imagenet_map.json"


@dataclass(frozen=True)
class Config:
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    model_dir: Path = Path("./model_dir")
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    workers: int = 1
    threads: int = 8
    backbone: str = "timm:efficientnet_lite0"
    image_size: int = 224
    weak_annotator: str = "semantic"
    semantic_classifier: str | None = None
    """timm model whose ImageNet head feeds the semantic annotator; None: the backbone when it has one, else lite0."""
    class_descriptions_file: Path | None = None
    imagenet_map_file: Path = field(default_factory=default_imagenet_map_file)
    simulated_weak_labels_file: Path | None = None
    """WEAK_ANNOTATOR=simulated: the table of weak answers ``vlm-al replay`` draws through a known T (replay only)."""
    open_clip_model: str = "ViT-B-32"
    open_clip_pretrained: str | None = None
    vlm_api_base_url: str | None = None
    vlm_api_key: str | None = field(default=None, repr=False)
    vlm_api_model: str | None = None
    fine_confidence_threshold: float = 0.5
    cost_weak: float = 0.02
    cost_full: float = 1.0
    query_batch_size: int = 20
    fit_debounce_seconds: float = 2.0
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_request_bytes: int = 100 * 1024 * 1024
    keep_model_versions: int = 3
    push_head_tasks: int = 50
    """A fit pushes this many tasks of the head of the queue at once; a background job pushes the rest."""
    push_batch_tasks: int = 5000
    """Predictions per Label Studio import request: pushes of the rest of a queue and of the cold start are split."""
    prune_label_studio_every: int = 10
    """Old model versions are deleted from Label Studio once this many piled up, all in one background job."""
    parent_map_file: Path | None = None
    taxonomy_coarse_level: int = 1
    push_predictions: bool = True
    redis_url: str | None = None
    torch_threads: int | None = None
    queue_tab: bool = False
    query_strategy: str = "ours"
    suggestion_precision: float = 0.9
    """A fine suggestion is pre-ticked only where its out-of-fold precision bound reaches this (0: always)."""
    """The strategy that orders the queue (model.query.STRATEGIES); ``ours`` is the benchmark's best."""
    auto_accept_precision: float = 0.0
    """Opt-in: label a task automatically where the per-class out-of-fold precision bound reaches this (0: off)."""
    auto_accept_audit_share: float = 0.1
    """Share of the tasks auto-accept would label that go to the head of the human queue as an audit instead."""
    auto_accept_user: str = "auto-accept@vlm-al.local"
    """The Label Studio user (e-mail) that auto-accepted annotations are completed by; created when missing."""
    label_errors_tab: bool = True
    """Keep a Data Manager tab "Likely label errors" filtered to the annotations cleanlab flags."""
    image_download_timeout_seconds: float = 30.0
    local_files_document_root: Path | None = None
    """Label Studio's LOCAL_FILES_DOCUMENT_ROOT as mounted on this host: Local Files images are read from it, not
    downloaded through Label Studio (which spends a CPU core serving them while a project is indexed)."""
    uploaded_files_root: Path | None = None
    """Label Studio's MEDIA_ROOT/upload folder as mounted on this host: images imported through its UI or API
    (``/data/upload/...``) are read from it, not downloaded through Label Studio."""
    predict_deadline_seconds: float = 30.0
    request_read_timeout_seconds: float = 10.0
    webhook_basic_auth: bool = True
    embedding_runtime: str = "auto"
    """auto: ONNX Runtime on a CPU when it passes the fidelity check, eager torch otherwise; torch; onnxruntime."""
    device: str = "auto"
    """auto: cuda when torch sees a GPU, else cpu."""

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user) and bool(self.basic_auth_pass)

    def secrets(self) -> list[str]:
        return [s for s in (getattr(self, name) for name in SECRET_FIELDS) if s]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build from environment variables (``os.environ`` by default); raise ConfigError naming a bad one."""
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        config = cls(
            label_studio_url=reader.url("LABEL_STUDIO_URL"),
            label_studio_api_key=reader.text("LABEL_STUDIO_API_KEY"),
            model_dir=reader.path("MODEL_DIR") or Path("./model_dir"),
            basic_auth_user=reader.text("BASIC_AUTH_USER"),
            basic_auth_pass=reader.text("BASIC_AUTH_PASS"),
            log_level=reader.choice("LOG_LEVEL", LOG_LEVELS, "INFO", upper=True),
            workers=reader.integer("WORKERS", 1, minimum=1),
            threads=reader.integer("THREADS", 8, minimum=1),
            backbone=reader.text("BACKBONE") or "timm:efficientnet_lite0",
            image_size=reader.integer("IMAGE_SIZE", 224, minimum=16),
            weak_annotator=reader.choice("WEAK_ANNOTATOR", WEAK_ANNOTATORS, "semantic"),
            semantic_classifier=reader.text("SEMANTIC_CLASSIFIER"),
            class_descriptions_file=reader.path("CLASS_DESCRIPTIONS_FILE"),
            imagenet_map_file=reader.path("IMAGENET_MAP_FILE") or default_imagenet_map_file(),
            simulated_weak_labels_file=reader.path("SIMULATED_WEAK_LABELS_FILE"),
            open_clip_model=reader.text("OPEN_CLIP_MODEL") or "ViT-B-32",
            open_clip_pretrained=reader.text("OPEN_CLIP_PRETRAINED"),
            vlm_api_base_url=reader.url("VLM_API_BASE_URL"),
            vlm_api_key=reader.text("VLM_API_KEY"),
            vlm_api_model=reader.text("VLM_API_MODEL"),
            fine_confidence_threshold=reader.number("FINE_CONFIDENCE_THRESHOLD", 0.5, minimum=0.0, maximum=1.0),
            cost_weak=reader.number("COST_WEAK", 0.02, minimum=0.0, exclusive_minimum=True),
            cost_full=reader.number("COST_FULL", 1.0, minimum=0.0, exclusive_minimum=True),
            query_batch_size=reader.integer("QUERY_BATCH_SIZE", 20, minimum=1),
            fit_debounce_seconds=reader.number("FIT_DEBOUNCE_SECONDS", 2.0, minimum=0.0),
            max_image_bytes=reader.integer("MAX_IMAGE_BYTES", 20 * 1024 * 1024, minimum=1),
            max_image_pixels=reader.integer("MAX_IMAGE_PIXELS", 40_000_000, minimum=1),
            max_request_bytes=reader.integer("MAX_REQUEST_BYTES", 100 * 1024 * 1024, minimum=1024),
            keep_model_versions=reader.integer("KEEP_MODEL_VERSIONS", 3, minimum=1),
            push_head_tasks=reader.integer("PUSH_HEAD_TASKS", 50, minimum=1),
            push_batch_tasks=reader.integer("PUSH_BATCH_TASKS", 5000, minimum=1),
            prune_label_studio_every=reader.integer("PRUNE_LABEL_STUDIO_EVERY", 10, minimum=1),
            parent_map_file=reader.path("PARENT_MAP_FILE"),
            taxonomy_coarse_level=reader.integer("TAXONOMY_COARSE_LEVEL", 1, minimum=1),
            push_predictions=reader.boolean("PUSH_PREDICTIONS", True),
            redis_url=reader.text("REDIS_URL"),
            torch_threads=reader.optional_integer("TORCH_THREADS", minimum=1),
            queue_tab=reader.boolean("QUEUE_TAB", False),
            query_strategy=reader.choice("QUERY_STRATEGY", QUERY_STRATEGIES, "ours"),
            suggestion_precision=reader.number("SUGGESTION_PRECISION", 0.9, minimum=0.0, maximum=1.0),
            auto_accept_precision=reader.number("AUTO_ACCEPT_PRECISION", 0.0, minimum=0.0, maximum=1.0),
            auto_accept_audit_share=reader.number("AUTO_ACCEPT_AUDIT_SHARE", 0.1, minimum=0.0, maximum=1.0),
            auto_accept_user=reader.text("AUTO_ACCEPT_USER") or "auto-accept@vlm-al.local",
            label_errors_tab=reader.boolean("LABEL_ERRORS_TAB", True),
            image_download_timeout_seconds=reader.number("IMAGE_DOWNLOAD_TIMEOUT_SECONDS", 30.0, minimum=0.0,
                                                         exclusive_minimum=True),
            local_files_document_root=reader.path("LOCAL_FILES_DOCUMENT_ROOT"),
            uploaded_files_root=reader.path("UPLOADED_FILES_ROOT"),
            predict_deadline_seconds=reader.number("PREDICT_DEADLINE_SECONDS", 30.0, minimum=0.0, maximum=90.0),
            request_read_timeout_seconds=reader.number("REQUEST_READ_TIMEOUT_SECONDS", 10.0, minimum=0.0,
                                                       exclusive_minimum=True),
            webhook_basic_auth=reader.boolean("WEBHOOK_BASIC_AUTH", True),
            embedding_runtime=reader.choice("EMBEDDING_RUNTIME", EMBEDDING_RUNTIMES, "auto"),
            device=reader.choice("DEVICE", DEVICES, "auto"),
        )
        if bool(config.basic_auth_user) != bool(config.basic_auth_pass):
            raise ConfigError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if config.weak_annotator == "openai" and not (config.vlm_api_base_url and config.vlm_api_model):
            raise ConfigError("WEAK_ANNOTATOR=openai needs VLM_API_BASE_URL and VLM_API_MODEL")
        if config.weak_annotator == "simulated" and not config.simulated_weak_labels_file:
            raise ConfigError("WEAK_ANNOTATOR=simulated needs SIMULATED_WEAK_LABELS_FILE (written by vlm-al replay)")
        if config.weak_annotator == "open-clip" and not config.open_clip_pretrained:
            raise ConfigError("WEAK_ANNOTATOR=open-clip needs OPEN_CLIP_PRETRAINED (a tag or a checkpoint path)")
        return config


class _EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def path(self, name: str) -> Path | None:
        value = self.text(name)
        return Path(value).expanduser() if value else None

    def url(self, name: str) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ConfigError(f"{name} must be an http(s) URL such as http://127.0.0.1:8080, got {value!r}")
        return value.rstrip("/")

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        value = self.optional_integer(name, minimum)
        return default if value is None else value

    def optional_integer(self, name: str, minimum: int | None = None) -> int | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        return value

    def number(
        self,
        name: str,
        default: float,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be finite, got {raw!r}")
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            raise ConfigError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be <= {maximum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, allowed: Iterable[str], default: str, upper: bool = False) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw
        allowed = tuple(allowed)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {raw!r}")
        return value


REDACTED = "[REDACTED]"


class SecretRedactingFilter(logging.Filter):
    """Replaces every known secret in a log record's rendered message (and exception text) by [REDACTED].

    Secrets can be added at run time (e.g. the access token Label Studio sends to /setup)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        # Very short strings would redact ordinary words; real keys are long.
        new = {s for s in secrets if isinstance(s, str) and len(s) >= 6}
        if new - self._secrets:
            with self._lock:
                self._secrets = self._secrets | new

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = str(record.msg)
        redacted = self._redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True


def configure_logging(config: Config, redactor: SecretRedactingFilter | None = None) -> SecretRedactingFilter:
    """Set the root log level and attach the secret filter to every root handler (adding one if none)."""
    redactor = redactor or SecretRedactingFilter()
    redactor.add_secrets(config.secrets())
    root = logging.getLogger()
    root.setLevel(config.log_level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
    return redactor

