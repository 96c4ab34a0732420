"""Embedding speed: eager torch fp32 vs ONNX Runtime (EMBEDDING_RUNTIME) on the same images, in one process.

Usage: python bench/embedding_runtime.py [--out bench/results/embedding_runtime.json] [--images 64] [--rounds 5]
       [--image-size 224] [--threads N] [--cache-dir DIR]

Both runtimes run the packaged efficientnet_lite0 at the server's default size, with the same thread count
(``--threads``, default torch's), in alternating rounds (the order flips each round, so a burst of load from other
work hits both alike). Two timings per round: the full ``embed_and_logits`` call the server makes (PIL resize and
normalisation included) and the model alone on the already preprocessed batch. The speed is quoted as the ratio
of the medians and as the median of the per-round ratios; the cosine similarity of every image's embedding and
logits between the two runtimes, the load average and the machine are written with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.embeddings import TimmBackbone, configure_torch_threads  # noqa: E402
from model.io import atomic_write_json  # noqa: E402
from model.runtime import OnnxRuntimeBackbone, fidelity_images, row_cosines  # noqa: E402


def bench_images(n: int) -> tuple[list, str]:
    """Fashion-MNIST test images as the demo shows them (224 px, dark on white), with the fidelity photos first;
    seeded synthetic images when the data set is not installed."""
    images = [image for name, image in fidelity_images(seed=1) if name.startswith("skimage.")]
    source = "skimage.data photos"
    try:
        from model.datasets import load_fashion_mnist, to_pil

        pixels, _ = load_fashion_mnist("test")
        images += [to_pil(pixels[i], invert=True, size=224, pad_fraction=0.15) for i in range(n - len(images))]
        source += " + Fashion-MNIST test images (to_pil, 224 px)"
    except Exception as exc:  # the Debian data set is missing: synthetic images keep the bench runnable
        seed = 2
        while len(images) < n:
            images += [image for _, image in fidelity_images(seed=seed)]
            seed += 1
        source += f" + seeded synthetic images ({type(exc).__name__})"
    return images[:n], source


def machine() -> dict:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": model_name,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(__file__).resolve().parent / "results" / "embedding_runtime.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        configure_torch_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()

    images, source = bench_images(args.images)
    eager = TimmBackbone("efficientnet_lite0", image_size=args.image_size, batch_size=64)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        fast = OnnxRuntimeBackbone.from_eager(eager, cache_dir=args.cache_dir or scratch, threads=threads)
        setup_seconds = time.perf_counter() - started

        pixels = torch.stack([eager.preprocess(image) for image in images])
        pixels_np = np.ascontiguousarray(pixels.numpy())

        def eager_forward() -> None:
            with torch.inference_mode():
                model = eager.model
                model.get_classifier()(model.forward_head(model.forward_features(pixels), pre_logits=True))

        def fast_forward() -> None:
            fast._session.run(None, {"pixels": pixels_np})

        runs = {
            "end_to_end": {
                "torch": lambda: eager.embed_and_logits(images),
                "onnxruntime": lambda: fast.embed_and_logits(images),
            },
            "model_only": {"torch": eager_forward, "onnxruntime": fast_forward},
        }
        for calls in runs.values():  # warm-up: first calls allocate and pick kernels
            for call in calls.values():
                call()
        seconds: dict[str, dict[str, list[float]]] = {kind: {"torch": [], "onnxruntime": []} for kind in runs}
        for round_index in range(args.rounds):
            order = ["torch", "onnxruntime"] if round_index % 2 == 0 else ["onnxruntime", "torch"]
            for kind, calls in runs.items():
                for name in order:
                    started = time.perf_counter()
                    calls[name]()
                    seconds[kind][name].append(time.perf_counter() - started)
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{kind} torch {seconds[kind]['torch'][-1]:.2f} s, onnxruntime {seconds[kind]['onnxruntime'][-1]:.2f} s"
                for kind in runs), flush=True)

        eager_embeddings, eager_logits = eager.embed_and_logits(images)
        fast_embeddings, fast_logits = fast.embed_and_logits(images)
        export_fidelity = fast.fidelity

    n = len(images)
    result: dict = {
        "task": {"model": eager.name, "images": n, "image_source": source, "rounds": args.rounds,
                 "threads": threads, "batch_size": eager.batch_size, "onnx_spinning": "off",
                 "onnx_setup_seconds": round(setup_seconds, 2)},
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cosine": {
            "embedding_min": float(row_cosines(fast_embeddings, eager_embeddings).min()),
            "logits_min": float(row_cosines(fast_logits, eager_logits).min()),
            "embedding_max_abs_diff": float(np.abs(fast_embeddings - eager_embeddings).max()),
            "top1_agreement": float(np.mean(fast_logits.argmax(1) == eager_logits.argmax(1))),
            "export_fidelity_check": export_fidelity,
        },
    }
    for kind in runs:
        per_round = [t / o for t, o in zip(seconds[kind]["torch"], seconds[kind]["onnxruntime"])]
        result[kind] = {
            name: {"median_images_per_second": round(n / statistics.median(values), 1),
                   "seconds_per_round": [round(v, 3) for v in values]}
            for name, values in seconds[kind].items()
        }
        result[kind]["speed_ratio_of_medians"] = round(
            statistics.median(seconds[kind]["torch"]) / statistics.median(seconds[kind]["onnxruntime"]), 2)
        result[kind]["speed_ratio_median_per_round"] = round(statistics.median(per_round), 2)
    atomic_write_json(args.out, result)
    for kind in runs:
        print(f"{kind}: torch {result[kind]['torch']['median_images_per_second']} img/s, onnxruntime "
              f"{result[kind]['onnxruntime']['median_images_per_second']} img/s, ratio "
              f"{result[kind]['speed_ratio_of_medians']}x "
              f"(per-round median {result[kind]['speed_ratio_median_per_round']}x)")
    print(f"cosine min: embedding {result['cosine']['embedding_min']:.7f}, "
          f"logits {result['cosine']['logits_min']:.7f}; "
          f"load average {result['load_average_before']} -> {result['load_average_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
