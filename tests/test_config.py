"""Config.from_env: defaults, parsing, clear errors, secrets kept out of repr and logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backend.config import REDACTED, Config, ConfigError, SecretRedactingFilter, configure_logging


def test_defaults_from_an_empty_environment():
    config = Config.from_env({})
    assert config.model_dir == Path("./model_dir")
    assert config.backbone == "timm:efficientnet_lite0"
    assert config.image_size == 224
    assert config.weak_annotator == "semantic"  # works for any project's class names
    assert config.semantic_classifier is None and config.class_descriptions_file is None
    assert config.imagenet_map_file.name == "fashion_mnist_imagenet_map.json"
    assert (config.fine_confidence_threshold, config.cost_weak, config.cost_full) == (0.5, 0.02, 1.0)
    assert config.fit_debounce_seconds == 2.0 and config.keep_model_versions == 3
    assert config.push_predictions is True and config.torch_threads is None
    assert not config.basic_auth_enabled


def test_values_are_parsed():
    config = Config.from_env({
        "LABEL_STUDIO_URL": "http://127.0.0.1:8080/", "LABEL_STUDIO_API_KEY": "k" * 40, "MODEL_DIR": "/tmp/m",
        "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p" * 12, "LOG_LEVEL": "debug", "WORKERS": "2", "THREADS": "4",
        "IMAGE_SIZE": "64", "WEAK_ANNOTATOR": "none", "FINE_CONFIDENCE_THRESHOLD": "0.7", "COST_WEAK": "0.1",
        "QUERY_BATCH_SIZE": "50", "FIT_DEBOUNCE_SECONDS": "0.5", "PUSH_PREDICTIONS": "false", "TORCH_THREADS": "1",
        "PARENT_MAP_FILE": "/tmp/parents.json", "TAXONOMY_COARSE_LEVEL": "2", "MAX_IMAGE_BYTES": "1000",
    })
    assert config.label_studio_url == "http://127.0.0.1:8080"
    assert config.log_level == "DEBUG" and (config.workers, config.threads) == (2, 4)
    assert config.image_size == 64 and config.weak_annotator == "none"
    assert config.fine_confidence_threshold == 0.7 and config.cost_weak == 0.1
    assert config.query_batch_size == 50 and config.fit_debounce_seconds == 0.5
    assert config.push_predictions is False and config.torch_threads == 1
    assert config.parent_map_file == Path("/tmp/parents.json") and config.taxonomy_coarse_level == 2
    assert config.basic_auth_enabled and config.max_image_bytes == 1000


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKERS", "many"), ("WORKERS", "0"), ("IMAGE_SIZE", "3.5"), ("FINE_CONFIDENCE_THRESHOLD", "1.5"),
        ("COST_WEAK", "0"), ("COST_FULL", "nan"), ("PUSH_PREDICTIONS", "maybe"), ("WEAK_ANNOTATOR", "gpt"),
        ("LOG_LEVEL", "LOUD"), ("LABEL_STUDIO_URL", "localhost:8080"), ("KEEP_MODEL_VERSIONS", "0"),
        ("FIT_DEBOUNCE_SECONDS", "-1"), ("TORCH_THREADS", "x"),
    ],
)
def test_invalid_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value})


def test_inconsistent_settings_are_refused():
    with pytest.raises(ConfigError, match="BASIC_AUTH"):
        Config.from_env({"BASIC_AUTH_USER": "admin"})
    with pytest.raises(ConfigError, match="VLM_API_BASE_URL"):
        Config.from_env({"WEAK_ANNOTATOR": "openai"})
    with pytest.raises(ConfigError, match="OPEN_CLIP_PRETRAINED"):
        Config.from_env({"WEAK_ANNOTATOR": "open-clip"})


def test_repr_hides_secrets():
    config = Config.from_env({"LABEL_STUDIO_API_KEY": "secret-api-key-123", "BASIC_AUTH_USER": "u",
                              "BASIC_AUTH_PASS": "secret-password-456", "VLM_API_KEY": "secret-vlm-789"})
    text = repr(config)
    assert "secret-api-key-123" not in text and "secret-password-456" not in text and "secret-vlm-789" not in text
    assert set(config.secrets()) == {"secret-api-key-123", "secret-password-456", "secret-vlm-789"}


def test_redacting_filter_removes_secrets_from_messages_args_and_tracebacks(caplog):
    key = "abcdef0123456789abcdef"
    logger = logging.getLogger("test.redaction")
    redactor = SecretRedactingFilter([key])
    caplog.handler.addFilter(redactor)
    try:
        with caplog.at_level(logging.INFO, logger="test.redaction"):
            logger.info("plain %s", key)
            logger.info(f"inline Token {key}")
            try:
                raise RuntimeError(f"request failed with {key}")
            except RuntimeError:
                logger.exception("boom")
            redactor.add_secrets(["late-secret-value"])
            logger.warning("later: late-secret-value")
    finally:
        caplog.handler.removeFilter(redactor)
    assert key not in caplog.text and "late-secret-value" not in caplog.text
    assert caplog.text.count(REDACTED) >= 4


def test_configure_logging_attaches_the_filter_to_root_handlers(caplog):
    config = Config.from_env({"LABEL_STUDIO_API_KEY": "configured-key-0001"})
    redactor = configure_logging(config)
    try:
        assert redactor in caplog.handler.filters
        logging.getLogger("backend.somewhere").error("calling with configured-key-0001")
        assert "configured-key-0001" not in caplog.text
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(redactor)
