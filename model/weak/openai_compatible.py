"""A weak annotator that asks a chat-completions VLM (OpenAI-compatible API) for each image's coarse class."""

from __future__ import annotations

import base64
import io
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from PIL import Image

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL
from model.weak.base import WeakLabels

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Which one of these categories does the main object in the image belong to?\n"
    "Categories: {classes}.\n"
    "Answer with exactly one category name from the list and nothing else."
)
"""``{classes}`` is replaced by the coarse class names, separated by semicolons."""

DEFAULT_LIST_PROMPT = (
    "Which of these categories appear in the image?\n"
    "Categories: {classes}.\n"
    "Answer with every category that appears, separated by semicolons, or with the single word none if none does."
)
"""The multi-label question (``score_labels``); ``{classes}`` as in ``DEFAULT_PROMPT``."""
NONE_ANSWERS = frozenset({"none", "no", "nothing", "none of these", "none of them"})

_RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class VLMRequestError(ModelInputError):
    """The VLM endpoint refused the request for a reason retries cannot fix (bad key, model, URL or body)."""


def normalise_answer(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: how answers and class names are compared."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def match_answer(answer: str, coarse_classes: Sequence[str]) -> int:
    """Index of the class the answer names, or -1.

    An exact match (after normalisation) wins; otherwise the answer must contain exactly one class name as
    whole words, ignoring names that are part of a longer contained name ("shirt" inside "t shirt").
    """
    normalised = normalise_answer(answer)
    if not normalised:
        return MISSING_LABEL
    names = [normalise_answer(c) for c in coarse_classes]
    for index, name in enumerate(names):
        if name == normalised:
            return index
    padded = f" {normalised} "
    contained = [i for i, name in enumerate(names) if name and f" {name} " in padded]
    maximal = [i for i in contained if not any(j != i and f" {names[i]} " in f" {names[j]} " for j in contained)]
    return maximal[0] if len(maximal) == 1 else MISSING_LABEL


def match_answer_list(answer: str, classes: Sequence[str]) -> set[int] | None:
    """The classes a list answer names (semicolons, commas or lines between them); an empty set for "none";
    None when the answer names no class and is not "none" (no usable answer)."""
    if normalise_answer(answer) in NONE_ANSWERS:
        return set()
    named = {match_answer(part, classes) for part in re.split(r"[;,\n]|\band\b", answer)}
    named.discard(MISSING_LABEL)
    return named or None


class OpenAICompatibleVLM:
    """POSTs each image (as a data URL) and the coarse class list to ``{base_url}/v1/chat/completions``.

    Temperature 0. Timeouts, connection errors, 429 and 5xx are retried with exponential backoff; an image
    that still fails gets -1 (logged). Other 4xx mean a configuration problem and raise VLMRequestError.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        coarse_classes: Sequence[str],
        timeout_s: float = 30.0,
        max_retries: int = 2,
        cost_per_label: float = 0.02,
        image_size: int = 224,
        prompt: str = DEFAULT_PROMPT,
        list_prompt: str = DEFAULT_LIST_PROMPT,
        max_workers: int = 4,
        backoff_s: float = 0.5,
        max_tokens: int = 32,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ModelInputError(f"VLM base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ModelInputError("VLM model name is empty")
        self.coarse_classes = tuple(coarse_classes)
        if len(self.coarse_classes) < 2 or len(set(self.coarse_classes)) != len(self.coarse_classes):
            raise ModelInputError(f"need at least 2 distinct coarse classes, got {list(self.coarse_classes)}")
        normalised = [normalise_answer(c) for c in self.coarse_classes]
        if len(set(normalised)) != len(normalised) or not all(normalised):
            raise ModelInputError(f"coarse classes are not distinguishable in text answers: {self.coarse_classes}")
        if timeout_s <= 0 or max_retries < 0 or image_size < 8 or max_workers < 1 or backoff_s < 0:
            raise ModelInputError("timeout_s, image_size, max_workers must be positive; retries, backoff >= 0")
        if cost_per_label < 0:
            raise ModelInputError(f"cost_per_label must be non-negative, got {cost_per_label}")
        if "{classes}" not in prompt or "{classes}" not in list_prompt:
            raise ModelInputError("the VLM prompts must contain '{classes}'")
        base = base_url.rstrip("/")
        # Accept base URLs given with or without the API version.
        self.url = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
        self.model = model
        self._api_key = api_key or None
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.cost_per_label = float(cost_per_label)
        self.image_size = int(image_size)
        self.prompt = prompt.replace("{classes}", "; ".join(self.coarse_classes))
        self.list_prompt = list_prompt.replace("{classes}", "; ".join(self.coarse_classes))
        self.max_workers = int(max_workers)
        self.backoff_s = float(backoff_s)
        self.max_tokens = int(max_tokens)
        self._session = session or requests.Session()
        self._sleep = sleep
        parsed = urllib.parse.urlsplit(base)
        # The name ends up in logs and file names: keep credentials that a URL may carry out of it.
        self.name = f"vlm:{model}@{parsed.hostname}{f':{parsed.port}' if parsed.port else ''}{parsed.path}"

    def __repr__(self) -> str:  # never shows the API key
        return f"OpenAICompatibleVLM(url={self.url!r}, model={self.model!r}, classes={len(self.coarse_classes)})"

    def image_data_url(self, image: Image.Image) -> str:
        """The image fitted into ``image_size`` squared (small images are enlarged), PNG, as a data URL."""
        if not isinstance(image, Image.Image):
            raise ModelInputError(f"expected a PIL image, got {type(image).__name__}")
        rgb = image.convert("RGB")
        scale = self.image_size / max(rgb.size)
        if scale != 1.0:
            new_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def request_body(self, image: Image.Image, prompt: str | None = None) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.prompt if prompt is None else prompt},
                        {"type": "image_url", "image_url": {"url": self.image_data_url(image)}},
                    ],
                }
            ],
        }

    def ask(self, image: Image.Image, prompt: str | None = None) -> str | None:
        """The model's answer text, or None when every attempt failed for a retryable reason."""
        body = self.request_body(image, prompt)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._session.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except (requests.Timeout, requests.ConnectionError) as exc:
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    return _answer_text(response)
                if response.status_code not in _RETRYABLE_STATUS:
                    raise VLMRequestError(
                        f"VLM endpoint {self.url} answered HTTP {response.status_code}: {response.text[:300]!r}"
                    )
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after_seconds(response)
            if attempt < self.max_retries:
                delay = retry_after if retry_after is not None else self.backoff_s * (2**attempt)
                logger.info("VLM request failed (%s); retry %d/%d in %.2fs", problem, attempt + 1,
                            self.max_retries, delay)
                self._sleep(min(delay, 60.0))
        logger.warning("VLM request to %s failed after %d attempts (%s); image left without a weak label",
                       self.url, self.max_retries + 1, problem)
        return None

    def annotate(self, images: Sequence[Image.Image]) -> WeakLabels:
        images = list(images)
        for image in images:
            if not isinstance(image, Image.Image):
                raise ModelInputError(f"expected PIL images, got {type(image).__name__}")
        if self.max_workers == 1 or len(images) <= 1:
            answers = [self.ask(image) for image in images]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(images))) as pool:
                answers = list(pool.map(self.ask, images))
        indices = np.full(len(images), MISSING_LABEL, dtype=np.int64)
        for position, answer in enumerate(answers):
            if answer is None:
                continue
            indices[position] = match_answer(answer, self.coarse_classes)
            if indices[position] == MISSING_LABEL:
                logger.info("VLM answer %r matches no coarse class; dropped", answer[:100])
        return WeakLabels.from_indices(indices, len(self.coarse_classes))

    def score_labels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Per-label scores for a multi-label project (``LabelScorer``): the VLM is asked for the list of classes
        in each image; 1 for a named class, 0 for the others, a NaN row where no usable answer came back."""
        images = list(images)
        for image in images:
            if not isinstance(image, Image.Image):
                raise ModelInputError(f"expected PIL images, got {type(image).__name__}")

        def ask_list(image: Image.Image) -> str | None:
            return self.ask(image, self.list_prompt)

        if self.max_workers == 1 or len(images) <= 1:
            answers = [ask_list(image) for image in images]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(images))) as pool:
                answers = list(pool.map(ask_list, images))
        scores = np.full((len(images), len(self.coarse_classes)), np.nan, dtype=np.float32)
        for position, answer in enumerate(answers):
            named = None if answer is None else match_answer_list(answer, self.coarse_classes)
            if named is None:
                if answer is not None:
                    logger.info("VLM list answer %r names no class; dropped", answer[:100])
                continue
            scores[position] = 0.0
            scores[position, sorted(named)] = 1.0
        return scores


def _answer_text(response: requests.Response) -> str:
    """The first choice's message text; malformed replies read as an empty answer (dropped later)."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        logger.warning("VLM reply is not a chat completion: %r", response.text[:200])
        return ""
    if isinstance(content, list):  # some servers return content parts
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
