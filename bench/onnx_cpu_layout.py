"""ONNX Runtime on a CPU: the backbone session as the server runs it, side by side with the alternatives, in one run.

Usage: python bench/onnx_cpu_layout.py [--images 256] [--rounds 3] [--out bench/results/onnx_cpu_layout.json]

efficientnet_lite0 at 224 px on Fashion-MNIST renderings (the scale benchmark's images). Each configuration runs in a
child process of its own (glibc's heap settings are per process), the rounds interleave the configurations, and the
figures are medians of images per second:

1. batch size: runs of 4 images against 64, forward passes only (no arena, glibc's default heap);
2. the memory arena under the server's heap settings (``backend.memory.bound_heap_growth``), runs of 4: on against
   off;
3. the layout with decoding, as the feature extractor works: each chunk of 64 PNGs decoded and preprocessed outside
   the compute slot, then run in batches of 4 by one two-threaded run, or by one single-threaded run per core at
   once (``model.runtime.cpu_run_layout``), the server's heap settings and arena on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 64
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "batch_64": {"batch": 64, "arena": False, "server_heap": False, "layout": "one_run", "decode": False},
    "batch_4": {"batch": 4, "arena": False, "server_heap": False, "layout": "one_run", "decode": False},
    "server_heap_no_arena": {"batch": 4, "arena": False, "server_heap": True, "layout": "one_run", "decode": False},
    "server_heap_arena": {"batch": 4, "arena": True, "server_heap": True, "layout": "one_run", "decode": False},
    "decoding_one_run": {"batch": 4, "arena": True, "server_heap": True, "layout": "one_run", "decode": True},
    "decoding_parallel_runs": {"batch": 4, "arena": True, "server_heap": True, "layout": "parallel", "decode": True},
}
RATIOS = {  # name: (numerator, denominator)
    "batch_4_over_64": ("batch_4", "batch_64"),
    "arena_over_no_arena_under_server_heap": ("server_heap_arena", "server_heap_no_arena"),
    "parallel_runs_over_one_run_with_decoding": ("decoding_parallel_runs", "decoding_one_run"),
}


def task_pngs(n: int) -> list[bytes]:
    from model.datasets import load_fashion_mnist, to_pil

    raw, _ = load_fashion_mnist("train")
    pngs = []
    for i in range(n):
        buffer = io.BytesIO()
        to_pil(raw[i], invert=True, size=224, pad_fraction=0.15).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def run_child(configuration: dict[str, Any], cache_dir: Path, pngs_path: Path) -> float:
    """Images per second of one configuration (this process: the heap settings apply to it alone)."""
    if configuration["server_heap"]:
        from backend.memory import bound_heap_growth

        assert bound_heap_growth(), "glibc refused the server's heap settings"
    from model.backbone_spec import IMAGENET_PACKAGE, ImagePreprocessing
    from model.images import decode_image
    from model.runtime import TimmExportSpec, cpu_run_layout, find_cached_export, make_session

    export = find_cached_export(TimmExportSpec("efficientnet_lite0", IMAGENET_PACKAGE, 224), cache_dir)
    assert export is not None, "the parent exports first"
    layout = cpu_run_layout(2, parallel_runs=configuration["layout"] == "parallel")
    session = make_session(export.onnx_path, ["CPUExecutionProvider"], layout.threads_per_run,
                           memory_arena=configuration["arena"])

    preprocessing = ImagePreprocessing.from_dict(export.metadata["backbone"]["preprocessing"])
    pngs = json.loads(pngs_path.read_text())
    pngs = [bytes.fromhex(data) for data in pngs]
    names = [output.name for output in session.get_outputs()]
    batch = configuration["batch"]

    def forward(pixels: Any) -> None:
        for start in range(0, len(pixels), batch):
            session.run(names, {"pixels": pixels[start : start + batch]})

    chunks = [pngs[start : start + CHUNK] for start in range(0, len(pngs), CHUNK)]
    if not configuration["decode"]:
        prepared = [preprocessing.batch([decode_image(data) for data in chunk]) for chunk in chunks]
        forward(prepared[0][:8])  # warm-up
        started = time.perf_counter()
        for pixels in prepared:
            forward(pixels)
        return len(pngs) / (time.perf_counter() - started)
    slot = threading.Semaphore(layout.concurrent_runs)

    def chunk_work(chunk: list[bytes]) -> None:
        pixels = preprocessing.batch([decode_image(data) for data in chunk])  # outside the slot
        with slot:
            forward(pixels)

    chunk_work(chunks[0][:8])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(layout.concurrent_runs + 1) as pool:
        list(pool.map(chunk_work, chunks))
    return len(pngs) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx_cpu_layout.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pngs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(CONFIGURATIONS[args.child], args.cache_dir, args.pngs)))
        return 0

    from model.runtime import create_backbone

    with tempfile.TemporaryDirectory(prefix="vlm-al-onnx-layout-") as work:
        cache_dir = Path(work) / "runtime-cache"
        create_backbone("timm:efficientnet_lite0", runtime="auto", cache_dir=cache_dir, device="cpu")  # the export
        pngs_path = Path(work) / "pngs.json"
        pngs_path.write_text(json.dumps([data.hex() for data in task_pngs(args.images)]))
        load_before = list(os.getloadavg())
        rates: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
        for _ in range(args.rounds):
            for name in CONFIGURATIONS:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", name, "--cache-dir", str(cache_dir), "--pngs",
                     str(pngs_path)], capture_output=True, text=True, check=True, cwd=ROOT)
                rates[name].append(round(json.loads(done.stdout.strip().splitlines()[-1]), 1))
        load_after = list(os.getloadavg())
    medians = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    result = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "images": args.images,
        "rounds": args.rounds,
        "configurations": CONFIGURATIONS,
        "images_per_s_per_round": rates,
        "median_images_per_s": medians,
        "ratios_of_medians": {name: round(medians[a] / medians[b], 2) for name, (a, b) in RATIOS.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_images_per_s", "ratios_of_medians")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
