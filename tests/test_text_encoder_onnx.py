"""The packaged MiniLM run by ONNX Runtime: exported once beside the unpacked model, the same vectors as
sentence-transformers, and a process that loads the cached export imports neither sentence-transformers nor
transformers nor scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.weak.text_encoder import (
    OnnxTextEncoder,
    SentenceTransformerEncoder,
    packaged_minilm,
    packaged_minilm_zip,
    unpack_model_zip,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return unpack_model_zip(packaged_minilm_zip(), tmp_path_factory.mktemp("text-encoders"))


def test_onnx_text_encoder_matches_sentence_transformers_and_is_exported_once(folder):
    encoder = OnnxTextEncoder(folder, name="minilm")
    assert encoder.fidelity_min_cosine >= 0.999
    export = folder / "onnx" / "model.onnx"
    exported_at = export.stat().st_mtime_ns
    texts = ["Ankle boot", "a photo of a pullover", "bag " * 300, ""]  # a text past the 256-token limit, an empty one
    reference = SentenceTransformerEncoder(folder).encode(texts)
    vectors = encoder.encode(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(vectors * reference, axis=1)) > 0.9999
    again = OnnxTextEncoder(folder, name="minilm", idle_close_seconds=0.3)
    assert export.stat().st_mtime_ns == exported_at  # read from the cache, not exported again
    assert np.array_equal(again.encode(texts[:2]), vectors[:2])
    assert again.session is not None  # kept for the next calls of the same label config
    time.sleep(1.0)
    assert again.session is None  # closed once idle: its weights are not kept
    assert np.array_equal(again.encode([texts[1], texts[0], texts[1]]), vectors[[1, 0, 1]])
    assert again.encode([]).shape == (0, 384)


def test_a_process_with_the_cached_export_loads_no_sentence_transformers(folder):
    OnnxTextEncoder(folder)  # exported (or already there)
    probe = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r})\n"
             "from model.weak.text_encoder import packaged_minilm\n"
             f"encoder = packaged_minilm({str(folder.parent)!r}, onnx=True)\n"
             "vector = encoder.encode(['Sneaker'])\n"
             "print(json.dumps({'kind': type(encoder).__name__, 'norm': float((vector ** 2).sum()),"
             " 'loaded': [m for m in ('sentence_transformers', 'transformers', 'sklearn') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["kind"] == "OnnxTextEncoder" and report["loaded"] == []
    assert report["norm"] == pytest.approx(1.0, abs=1e-5)


def test_packaged_minilm_keeps_sentence_transformers_unless_asked(folder):
    assert isinstance(packaged_minilm(folder.parent), SentenceTransformerEncoder)
    assert packaged_minilm(folder.parent, onnx=True).name == packaged_minilm(folder.parent).name


def test_a_process_without_torch_exports_in_a_child_process(tmp_path):
    """The first start exports (torch, transformers) in a child process; the server process loads neither."""
    fresh = unpack_model_zip(packaged_minilm_zip(), tmp_path)
    assert not (fresh / "onnx" / "model.onnx").exists()
    probe = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r})\n"
             "from model.weak.text_encoder import OnnxTextEncoder\n"
             f"encoder = OnnxTextEncoder({str(fresh)!r})\n"
             "print(json.dumps({'cosine': encoder.fidelity_min_cosine, 'vector': encoder.encode(['Sneaker'])[0].tolist(),"
             " 'loaded': [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["cosine"] >= 0.999
    assert (fresh / "onnx" / "model.onnx").is_file()
    reference = SentenceTransformerEncoder(fresh).encode(["Sneaker"])[0]
    assert float(np.dot(report["vector"], reference)) > 0.9999
