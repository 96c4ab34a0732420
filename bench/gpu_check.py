"""The GPU check (DEVICE=cuda): one prepared script for a lent GPU machine, sized to a few minutes there.

Usage: python bench/gpu_check.py [--device cuda] [--images 2048] [--rounds 3] [--out bench/results/gpu_check.json]
On the device machine: ``bash scripts/gpu_check.sh run`` (README, "The GPU check").

In one process:
1. **The product's choice.** ``create_backbone("timm:efficientnet_lite0", device=..., runtime="auto")``, what a server
   with ``DEVICE=<device>`` runs, with its fidelity report against eager fp32 on the CPU
   (``checked_precision_backbone``). On a GPU, fp32 there is checked too (its convolutions may run in TF32).
2. **Speed, side by side**, in rounds that take the measurements in turn, medians:
   - ``device_forward``: the chosen backbone on prepared planes (``forward_pixels``), in its batch size;
   - ``device_embed``: the chosen backbone on decoded images, preprocessing included (``embed_and_logits``, one
     caller): the runtime alone, as ``bench/scale.py`` measures it;
   - ``prepare_1_thread`` / ``prepare_all_cores``: decoding and preprocessing the encoded images (JPEG photos of
     640 px and PNGs of 224 px, half each) on one thread and split over every core;
   - ``index_pipeline``: the encoded images to embeddings as the server's index works (chunks of 64,
     ``chunks_in_flight`` of them at once, one per core on a GPU), and
     ``index_pipeline_one_chunk_beside_the_pass``: the same with the CPU's count (one chunk prepared beside the
     forward passes): what indexing reaches with the images already on the machine, both ways;
   - ``cpu_auto`` (the CPU's choice under auto, ONNX Runtime) and ``cpu_eager_torch`` (eager fp32, the reference)
     on the same decoded images, preprocessing included, on every core of the machine.

``--device cpu`` runs the same code on the CPU (the tests do, with few images): the "device" is then the CPU's
auto runtime. The images are made from scikit-image's photos (no data set is needed on the device machine).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.images import decode_image  # noqa: E402
from model.io import atomic_write_json  # noqa: E402
from model.runtime import (  # noqa: E402
    DevicePlan,
    EmbeddingRuntimeError,
    checked_precision_backbone,
    chunks_in_flight,
    create_backbone,
    default_threads,
    embedding_setup,
    fidelity_min_cosine,
    resolve_device,
)

SPEC = "timm:efficientnet_lite0"
INDEX_CHUNK = 64
"""backend.features.FEATURE_CHUNK (the device machine lacks the backend's Label Studio packages; a test compares)."""
CPU_TORCH_IMAGES = 128
"""Eager torch fp32 on the CPU embeds this many of the images per round: it is the slow reference."""


def encoded_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` encoded images cut from scikit-image's photos: even ones JPEG (quality 90, 640 px on the long side),
    odd ones PNG (224 px), as Label Studio projects hold them."""
    from skimage import data as skimage_data

    photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
              for name in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        width, height = photo.size
        side = int(rng.integers(min(width, height) // 2, min(width, height) + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        buffer = io.BytesIO()
        if i % 2 == 0:
            crop.resize((640, 640), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        else:
            crop.resize((224, 224), Image.Resampling.BILINEAR).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def prepare(backbone: Any, encoded: Sequence[bytes]) -> np.ndarray:
    """Decode (a JPEG at the scale the server asks: twice the input side) and preprocess, as the index does."""
    at_least = 2 * int(backbone.image_size)
    return backbone.preprocess_batch([decode_image(data, at_least=at_least) for data in encoded])


def prepare_split(backbone: Any, encoded: Sequence[bytes], pool: ThreadPoolExecutor, parts: int) -> np.ndarray:
    """``prepare`` split into ``parts`` runs on ``pool``, concatenated in order."""
    if parts <= 1 or len(encoded) < 2:
        return prepare(backbone, encoded)
    step = -(-len(encoded) // parts)
    pieces = [encoded[start : start + step] for start in range(0, len(encoded), step)]
    return np.concatenate(list(pool.map(lambda piece: prepare(backbone, piece), pieces)))


def forward_all(backbone: Any, pixels: np.ndarray) -> int:
    """Every batch through the device; each call returns numpy arrays, so the GPU's work is done when it returns."""
    batch = int(backbone.batch_size)
    for start in range(0, len(pixels), batch):
        backbone.forward_pixels(pixels[start : start + batch], with_logits=True)
    return len(pixels)


def index_pipeline(backbone: Any, encoded: Sequence[bytes], in_flight: int) -> int:
    """The encoded images to embeddings as the server's index works through them (``FeatureExtractor``): chunks of
    INDEX_CHUNK images, ``in_flight`` of them at once, each decoded and preprocessed on its own thread, their forward
    passes ``concurrent_runs`` at a time."""
    slot = threading.Semaphore(max(1, int(getattr(backbone, "concurrent_runs", 1))))
    chunks = [encoded[start : start + INDEX_CHUNK] for start in range(0, len(encoded), INDEX_CHUNK)]

    def one(chunk: Sequence[bytes]) -> int:
        pixels = prepare(backbone, chunk)
        with slot:
            backbone.forward_pixels(pixels, with_logits=True)
        return len(chunk)

    with ThreadPoolExecutor(in_flight) as pool:
        return sum(pool.map(one, chunks))


def timed(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    n = run()
    return round(n / (time.perf_counter() - started), 1)


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "cores_for_this_process": default_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "load_average_start": os.getloadavg(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    try:
        device = resolve_device(args.device)
    except EmbeddingRuntimeError as exc:  # DEVICE=cuda on a machine without a GPU
        print(f"gpu check: {exc}", file=sys.stderr)
        return 2
    cores = default_threads()
    result: dict[str, Any] = {"machine": machine(device), "device": device, "images": args.images,
                              "rounds": args.rounds}

    with tempfile.TemporaryDirectory(prefix="vlm-al-gpu-check-") as cache_dir:
        chosen = create_backbone(SPEC, device=device, runtime="auto", cache_dir=cache_dir)
        result["chosen"] = {"name": chosen.name, **embedding_setup(chosen)}
        result["fidelity"] = {"chosen": getattr(chosen, "fidelity", None)}
        if device != "cpu":
            from model.embeddings import TimmBackbone

            plan = DevicePlan(device, int(chosen.batch_size), "fp32", True)
            fp32 = checked_precision_backbone(lambda **settings: TimmBackbone("efficientnet_lite0", **settings), plan)
            result["fidelity"]["fp32_on_device"] = (
                fp32.fidelity if fp32 is not None else "fp32 on the device failed the check (see the log)")
            del fp32
        cpu_auto = create_backbone(SPEC, device="cpu", runtime="auto", cache_dir=cache_dir)
        cpu_torch = create_backbone(SPEC, device="cpu", runtime="torch")
        result["cpu_auto"] = {"name": cpu_auto.name, **embedding_setup(cpu_auto)}

        made = time.monotonic()
        encoded = encoded_images(args.images)
        result["encoded_mb"] = round(sum(len(data) for data in encoded) / 1e6, 1)
        result["encoding_seconds"] = round(time.monotonic() - made, 1)
        in_flight = chunks_in_flight(chosen)
        runs = max(1, int(getattr(chosen, "concurrent_runs", 1)))
        result["chunks_in_flight"] = in_flight
        with ThreadPoolExecutor(cores) as pool:
            pixels = prepare_split(chosen, encoded, pool, cores)
            decoded = [decode_image(data, at_least=2 * int(chosen.image_size)) for data in encoded]
            torch_images = decoded[:CPU_TORCH_IMAGES]
            forward_all(chosen, pixels[: int(chosen.batch_size)])  # warm-up: kernels, cuDNN's choices
            measurements: dict[str, Callable[[], int]] = {
                "device_forward": lambda: forward_all(chosen, pixels),
                "device_embed": lambda: _embed_concurrently(chosen, decoded),
                "prepare_1_thread": lambda: len(prepare(chosen, encoded)),
                "prepare_all_cores": lambda: len(prepare_split(chosen, encoded, pool, cores)),
                "index_pipeline": lambda: index_pipeline(chosen, encoded, in_flight),
                "index_pipeline_one_chunk_beside_the_pass": lambda: index_pipeline(chosen, encoded, runs + 1),
                "cpu_auto": lambda: _embed_concurrently(cpu_auto, decoded),
                "cpu_eager_torch": lambda: len(cpu_torch.embed_and_logits(torch_images)[0]),
            }
            rates: dict[str, list[float]] = {name: [] for name in measurements}
            for _round in range(args.rounds):
                for name, run in measurements.items():
                    rates[name].append(timed(run))
                    logging.info("%s: %.1f images/s", name, rates[name][-1])
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result["images_per_s"] = medians
    result["images_per_s_rounds"] = rates
    result["ratios"] = {
        "device_embed_vs_cpu_auto": round(medians["device_embed"] / medians["cpu_auto"], 2),
        "device_embed_vs_cpu_eager_torch": round(medians["device_embed"] / medians["cpu_eager_torch"], 2),
        "index_pipeline_vs_device_embed": round(medians["index_pipeline"] / medians["device_embed"], 3),
        "index_pipeline_vs_cpu_eager_torch": round(medians["index_pipeline"] / medians["cpu_eager_torch"], 2),
        "index_pipeline_vs_prepare_all_cores": round(medians["index_pipeline"] / medians["prepare_all_cores"], 3),
        "index_pipeline_vs_one_chunk_beside_the_pass": round(
            medians["index_pipeline"] / medians["index_pipeline_one_chunk_beside_the_pass"], 2),
    }
    chosen_report = result["fidelity"]["chosen"]
    result["chosen_fidelity_min_cosine"] = (fidelity_min_cosine(chosen_report)
                                            if isinstance(chosen_report, dict) else None)
    result["seconds"] = round(time.monotonic() - began, 1)
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"gpu check on {device}: {result['chosen']}; images/s {medians}; ratios {result['ratios']}; "
          f"{result['seconds']} s -> {args.out}")
    return 0


def _embed_concurrently(backbone: Any, images: Sequence[Image.Image]) -> int:
    """The backbone's embeddings of ``images`` in chunks of its batch size or 64 (the index's chunk), whichever is
    larger, with as many callers as it wants at once (an ONNX Runtime session on a CPU: one per core)."""
    callers = int(getattr(backbone, "concurrent_runs", 1))
    size = max(64, int(backbone.batch_size))
    chunks = [images[start : start + size] for start in range(0, len(images), size)]
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(backbone.embed_and_logits, chunks))
    return len(images)


if __name__ == "__main__":
    sys.exit(main())
