"""Large JPEGs for a 224-pixel backbone: decoding in full against decoding at a JPEG scale, side by side in one run.

Usage: python bench/jpeg_decode.py [--rounds 5] [--out bench/results/jpeg_decode.json]

The feature extractor decodes an image that only the backbone reads at the smallest of libjpeg's scales (1/2, 1/4,
1/8) that keeps both sides at least twice the backbone's input (``model.images.decode_image``'s ``at_least``), then
preprocesses it as always. For scikit-image's test photos upscaled 4x and 8x (with a little grain, the detail that
upscaling smooths away) and saved as JPEG (quality 90), this measures per image, in rounds that alternate the two
ways, the milliseconds of decoding plus preprocessing (medians of the rounds), and the cosine between the
efficientnet_lite0 embeddings (the packaged ImageNet weights, eager torch) of the two decodes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.embeddings import TimmBackbone  # noqa: E402
from model.images import decode_image  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
UPSCALES = (4, 8)
INPUT_SIDE = 224
AT_LEAST = 2 * INPUT_SIDE  # what backend.features asks for a 224-pixel backbone


def large_jpegs() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data as photos

    rng = np.random.default_rng(0)
    jpegs = {}
    for name in PHOTOS:
        photo = Image.fromarray(getattr(photos, name)()).convert("RGB")
        for factor in UPSCALES:
            large = photo.resize((photo.width * factor, photo.height * factor), Image.Resampling.LANCZOS)
            grain = rng.integers(-6, 7, size=(large.height, large.width, 3))
            large = Image.fromarray(np.clip(np.asarray(large, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
            buffer = io.BytesIO()
            large.save(buffer, format="JPEG", quality=90)
            jpegs[f"{name}-x{factor}"] = buffer.getvalue()
    return jpegs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "jpeg_decode.json")
    args = parser.parse_args(argv)

    backbone = TimmBackbone("efficientnet_lite0", weights="imagenet-package", image_size=INPUT_SIDE, batch_size=2)
    preprocess = backbone.preprocessing.array
    jpegs = large_jpegs()
    load_before = list(os.getloadavg())
    images = {}
    for name, data in jpegs.items():
        timings: dict[str, list[float]] = {"full": [], "scaled": []}
        for _ in range(args.rounds):
            for way, at_least in (("full", None), ("scaled", AT_LEAST)):
                started = time.perf_counter()
                preprocess(decode_image(data, at_least=at_least))
                timings[way].append((time.perf_counter() - started) * 1000)
        full, scaled = decode_image(data), decode_image(data, at_least=AT_LEAST)
        (e_full, e_scaled), logits = backbone.embed_and_logits([full, scaled])
        full_ms, scaled_ms = statistics.median(timings["full"]), statistics.median(timings["scaled"])
        images[name] = {
            "jpeg_bytes": len(data), "size": list(full.size), "decoded_size": list(scaled.size),
            "full_ms": round(full_ms, 2), "scaled_ms": round(scaled_ms, 2),
            "speedup": round(full_ms / scaled_ms, 2),
            "embedding_cosine": round(float(e_full @ e_scaled / np.linalg.norm(e_full) / np.linalg.norm(e_scaled)), 5),
            "same_imagenet_top1": bool(logits[0].argmax() == logits[1].argmax()),
        }
        print(name, json.dumps(images[name]), flush=True)
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "shared machine; the two ways alternate within each round"},
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rounds": args.rounds,
        "at_least": AT_LEAST,
        "images": images,
        "median_speedup": round(statistics.median(v["speedup"] for v in images.values()), 2),
        "min_embedding_cosine": min(v["embedding_cosine"] for v in images.values()),
        "all_same_imagenet_top1": all(v["same_imagenet_top1"] for v in images.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
