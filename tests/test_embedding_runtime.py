"""The embedding runtime: ONNX export of the timm backbone, its cache, the fidelity gate, DEVICE and the settings."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model.runtime as runtime
from backend.config import DEVICES, EMBEDDING_RUNTIMES, Config, ConfigError
from model.embeddings import TimmBackbone
from model.errors import ModelInputError
from model.runtime import (
    EmbeddingRuntimeError,
    OnnxRuntimeBackbone,
    build_backbone,
    create_backbone,
    device_plan,
    fidelity_passes,
    measure_fidelity,
    resolve_device,
    row_cosines,
)

pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real test photos")

SIZE = 64  # small input: an export and its fidelity check take a few seconds


@pytest.fixture(scope="module")
def eager() -> TimmBackbone:
    return TimmBackbone("efficientnet_lite0", weights="imagenet-package", image_size=SIZE, batch_size=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def fast(eager, cache_dir) -> OnnxRuntimeBackbone:
    return OnnxRuntimeBackbone.from_eager(eager, cache_dir=cache_dir, threads=2)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee()),
            Image.fromarray(skimage_data.camera()), Image.fromarray(skimage_data.astronaut()),
            Image.fromarray(skimage_data.rocket())]


@pytest.fixture
def count_exports(monkeypatch):
    calls = []
    real = runtime.export_onnx

    def spy(eager):
        calls.append(eager.name)
        return real(eager)

    monkeypatch.setattr(runtime, "export_onnx", spy)
    return calls


def _only_file(folder, suffix):
    files = sorted(folder.glob(f"*{suffix}"))
    assert len(files) == 1, files
    return files[0]


def test_fidelity_check_passes_and_is_recorded_beside_the_export(fast, cache_dir):
    assert fast.export.exported
    report = fast.fidelity
    assert report["embedding_min_cosine"] >= 0.9999 and report["logits_min_cosine"] >= 0.9999
    assert report["top1_agreement"] == 1.0
    assert any(name.startswith("skimage.") for name in report["images"]) and len(report["images"]) >= 8
    metadata = json.loads(_only_file(cache_dir, ".json").read_text())
    assert metadata["fidelity"]["CPUExecutionProvider"] == report
    key = metadata["key"]
    assert (key["model"], key["weights"], key["image_size"]) == ("efficientnet_lite0", "imagenet-package", SIZE)
    assert {"torch", "timm", "onnxruntime", "opset", "weights_sha256"} <= set(key)
    assert _only_file(cache_dir, ".onnx").name.startswith(f"efficientnet_lite0-{SIZE}px-")


def test_keeps_the_timm_backbone_interface_and_name(fast, eager):
    assert fast.name == eager.name  # same vectors (fp32): the embedding cache stays shared
    assert (fast.dim, fast.num_classes, fast.model_name, fast.image_size) == (1280, 1000, "efficientnet_lite0", SIZE)
    assert fast.runtime == "onnxruntime" and eager.runtime == "torch"
    for method in ("preprocess", "embed", "embed_and_logits", "classify_logits"):
        assert callable(getattr(fast, method))
    assert torch.equal(fast.preprocess(Image.new("RGB", (10, 20))), eager.preprocess(Image.new("RGB", (10, 20))))


def test_embed_and_logits_agree_with_eager(fast, eager, photos):
    reference_embeddings, reference_logits = eager.embed_and_logits(photos)
    embeddings, logits = fast.embed_and_logits(photos)
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 1280) and logits.shape == (5, 1000)
    assert row_cosines(embeddings, reference_embeddings).min() >= 0.9999
    assert row_cosines(logits, reference_logits).min() >= 0.9999
    np.testing.assert_allclose(embeddings, reference_embeddings, atol=1e-3)
    assert list(np.argmax(logits, 1)) == list(np.argmax(reference_logits, 1))
    np.testing.assert_array_equal(fast.embed(photos), embeddings)
    np.testing.assert_array_equal(fast.classify_logits(photos), logits)
    one, _ = fast.embed_and_logits(photos[:1])  # another batch size through the dynamic axis
    np.testing.assert_allclose(one[0], embeddings[0], atol=1e-4)
    empty_embeddings, empty_logits = fast.embed_and_logits([])
    assert empty_embeddings.shape == (0, 1280) and empty_logits.shape == (0, 1000)


def test_a_cpu_session_runs_small_batches_with_the_same_vectors(fast, eager, cache_dir, photos):
    """ONNX Runtime on a CPU runs ONNX_CPU_BATCH_SIZE images per run (faster than one large batch) unless a batch
    size is given; the rows do not depend on how the images were batched."""
    assert fast.batch_size == runtime.ONNX_CPU_BATCH_SIZE == 4
    built = create_backbone("timm:efficientnet_lite0", image_size=SIZE, runtime="auto", cache_dir=cache_dir)
    assert isinstance(built, OnnxRuntimeBackbone) and built.batch_size == runtime.ONNX_CPU_BATCH_SIZE
    assert create_backbone("timm:efficientnet_lite0", image_size=SIZE, runtime="auto", cache_dir=cache_dir,
                           batch_size=16).batch_size == 16
    assert create_backbone("timm:efficientnet_lite0", image_size=SIZE, runtime="torch").batch_size == 64
    runs: list[int] = []
    session_run = fast._session.run

    def counting(names, feeds):
        runs.append(len(feeds["pixels"]))
        return session_run(names, feeds)

    fast._session = _SessionSpy(fast._session, counting)
    try:
        small, _ = fast.embed_and_logits(photos)
    finally:
        fast._session = fast._session.inner
    assert runs == [4, 1]
    whole, _ = OnnxRuntimeBackbone.from_eager(eager, cache_dir=cache_dir, batch_size=64).embed_and_logits(photos)
    np.testing.assert_allclose(small, whole, atol=1e-4)


class _SessionSpy:
    def __init__(self, inner, run):
        self.inner, self.run = inner, run

    def get_outputs(self):
        return self.inner.get_outputs()


def test_session_does_not_spin_and_uses_the_given_threads(fast, eager, cache_dir):
    """On a CPU the given threads become concurrent single-threaded runs (a FeatureExtractor runs that many), or,
    asked for, one run on every thread."""
    options = fast._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.enable_cpu_mem_arena  # small batches keep it small; without it runs page-fault their buffers
    assert (options.intra_op_num_threads, fast.concurrent_runs) == (1, 2)
    assert fast.providers == ["CPUExecutionProvider"]
    one_run = OnnxRuntimeBackbone.from_export(
        runtime.find_cached_export(runtime.TimmExportSpec.of(eager), cache_dir), threads=2, parallel_runs=False)
    assert (one_run._session.get_session_options().intra_op_num_threads, one_run.concurrent_runs) == (2, 1)
    assert runtime.cpu_run_layout(3) == runtime.CpuRunLayout(threads_per_run=1, concurrent_runs=3)


def test_second_construction_reads_the_cache_without_exporting(fast, cache_dir, count_exports):
    onnx_file = _only_file(cache_dir, ".onnx")
    mtime = onnx_file.stat().st_mtime_ns
    again = create_backbone("timm:efficientnet_lite0", image_size=SIZE, runtime="onnxruntime", cache_dir=cache_dir)
    assert isinstance(again, OnnxRuntimeBackbone) and not again.export.exported
    assert count_exports == [] and onnx_file.stat().st_mtime_ns == mtime
    assert again.name == fast.name


@pytest.mark.parametrize("damage", ["onnx-truncated", "metadata-garbage"])
def test_a_corrupted_cache_is_rebuilt(eager, fast, cache_dir, tmp_path, count_exports, damage, photos):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    onnx_file, metadata_file = _only_file(copy, ".onnx"), _only_file(copy, ".json")
    if damage == "onnx-truncated":
        onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    else:
        metadata_file.write_text("{not json")
    rebuilt = OnnxRuntimeBackbone.from_eager(eager, cache_dir=copy, threads=1)
    assert rebuilt.export.exported and count_exports == [eager.name]
    metadata = json.loads(metadata_file.read_text())
    assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == metadata["sha256"]
    np.testing.assert_allclose(rebuilt.embed(photos[:2]), fast.embed(photos[:2]), atol=1e-4)


def test_forced_fidelity_failure_falls_back_under_auto_and_raises_under_onnxruntime(
    fast, cache_dir, monkeypatch, caplog
):
    monkeypatch.setattr(runtime, "FIDELITY_MIN_COSINE", 1.5)  # no cosine reaches it
    with caplog.at_level(logging.WARNING, logger="model.runtime"):
        chosen = create_backbone("timm:efficientnet_lite0", image_size=SIZE, runtime="auto", cache_dir=cache_dir)
    assert isinstance(chosen, TimmBackbone) and chosen.runtime == "torch" and chosen.name == fast.name
    assert "min cosine" in caplog.text and "eager torch" in caplog.text
    with pytest.raises(EmbeddingRuntimeError, match=r"differs from eager fp32 torch: min cosine 1\.0+ < 1\.5"):
        create_backbone("timm:efficientnet_lite0", image_size=SIZE, runtime="onnxruntime", cache_dir=cache_dir)


def test_a_wrong_runtime_fails_the_fidelity_measurement(eager, photos):
    images = [(f"photo{i}", p) for i, p in enumerate(photos)]

    def perturbed(pictures):
        embeddings, logits = eager.embed_and_logits(pictures)
        rng = np.random.default_rng(0)
        return embeddings + rng.normal(0, embeddings.std(), embeddings.shape).astype(np.float32), logits

    assert fidelity_passes(measure_fidelity(eager.embed_and_logits, eager.embed_and_logits, images))
    report = measure_fidelity(eager.embed_and_logits, perturbed, images)
    assert report["embedding_min_cosine"] < 0.99 and not fidelity_passes(report)


def test_auto_without_onnxruntime_uses_torch_and_onnxruntime_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    chosen = create_backbone("timm:efficientnet_lite0:random", image_size=32, runtime="auto", cache_dir=tmp_path)
    assert isinstance(chosen, TimmBackbone)
    with pytest.raises(EmbeddingRuntimeError, match="onnxruntime is not installed"):
        create_backbone("timm:efficientnet_lite0:random", image_size=32, runtime="onnxruntime", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_classifier_exports_one_output(tmp_path):
    eager = TimmBackbone("efficientnet_lite0", weights=None, image_size=32, batch_size=8)
    eager.model.reset_classifier(0)
    fast = OnnxRuntimeBackbone.from_eager(eager, cache_dir=tmp_path, threads=1)
    assert fast.num_classes == 0 and "logits_min_cosine" not in fast.fidelity
    images = [Image.new("RGB", (40, 30), (i * 40, 100, 200 - i * 30)) for i in range(3)]
    assert row_cosines(fast.embed(images), eager.embed(images)).min() >= 0.9999
    with pytest.raises(ModelInputError, match="no classifier head"):
        fast.embed_and_logits(images)


def test_device_auto_and_a_clear_error_for_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(EmbeddingRuntimeError, match=r"DEVICE=cuda, but torch .* sees no CUDA GPU.*DEVICE=cpu"):
        create_backbone("timm:efficientnet_lite0:random", image_size=32, device="cuda")
    with pytest.raises(EmbeddingRuntimeError, match="DEVICE must be one of"):
        resolve_device("tpu")
    with pytest.raises(EmbeddingRuntimeError, match="EMBEDDING_RUNTIME must be one of"):
        create_backbone("timm:efficientnet_lite0:random", runtime="tensorrt")
    monkeypatch.setattr(runtime, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


class RecordingEager:
    """A stand-in for TimmBackbone built by a factory: it records its settings, and its embeddings are fixed
    vectors, bent by ``error[precision on device]`` (0: the fp32 reference's)."""

    base = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)

    def __init__(self, made: list, error: dict, **settings) -> None:
        self.settings = {"precision": "fp32", "channels_last": False, **settings}
        self.precision, self.device = self.settings["precision"], self.settings["device"]
        self.name, self.num_classes, self.batch_size = f"fake:{self.precision}", 0, settings["batch_size"]
        self.error = error.get(f"{self.precision} on {self.device}", 0.0)
        made.append(self.settings)

    def embed(self, images):
        bent = self.base[: len(images)] + self.error * self.base[1 : len(images) + 1]
        return bent


def recording_factory(error: dict) -> tuple[list, object]:
    made: list = []
    return made, lambda **settings: RecordingEager(made, error, **settings)


def test_batch_size_and_precision_fit_the_device(monkeypatch):
    assert device_plan("cpu") == runtime.DevicePlan("cpu", 64, "fp32", False)
    assert device_plan("cuda") == runtime.DevicePlan("cuda", 256, "fp16", True)
    assert device_plan("cuda", batch_size=8).batch_size == 8
    # On CUDA, auto picks eager torch with the CUDA plan (no ONNX export) once the plan passes the fidelity check
    # against eager fp32 on the CPU; checked here with a recording factory.
    monkeypatch.setattr(runtime, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    made, factory = recording_factory({"fp16 on cuda": 0.01})
    chosen = build_backbone(factory, kind="timm", device="auto", runtime="auto")
    assert chosen.settings == {"batch_size": 256, "device": "cuda", "precision": "fp16", "channels_last": True}
    assert made[0] == {"batch_size": 64, "device": "cpu", "precision": "fp32", "channels_last": False}  # reference
    assert 0.999 < chosen.fidelity["embedding_min_cosine"] < 1.0
    assert runtime.embedding_setup(chosen) == {
        "runtime": "torch", "device": "cuda", "precision": "fp16", "batch_size": 256, "concurrent_runs": 1,
        "fidelity_min_cosine": round(chosen.fidelity["embedding_min_cosine"], 7)}
    made, factory = recording_factory({})
    assert build_backbone(factory, kind="open_clip", device="cpu", runtime="auto").settings == {
        "batch_size": 64, "device": "cpu", "precision": "fp32", "channels_last": False}


def test_a_gpu_precision_that_fails_the_fidelity_check_is_not_used(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # fp16 bends the vectors past the threshold: fp32 on the GPU, checked too, is used instead
    made, factory = recording_factory({"fp16 on cuda": 0.2})
    with caplog.at_level(logging.WARNING, logger="model.runtime"):
        chosen = build_backbone(factory, kind="timm", device="cuda", runtime="torch")
    assert (chosen.precision, chosen.device, chosen.settings["channels_last"]) == ("fp32", "cuda", True)
    assert runtime.fidelity_min_cosine(chosen.fidelity) > 0.9999
    assert "fake:fp16 on cuda in fp16 differs from eager fp32 on the CPU: min cosine 0.9" in caplog.text
    # neither passes (e.g. TF32 convolutions gone wrong): the CPU, in fp32, unchecked since it is the reference
    made, factory = recording_factory({"fp16 on cuda": 0.2, "fp32 on cuda": 0.1})
    with caplog.at_level(logging.WARNING, logger="model.runtime"):
        chosen = build_backbone(factory, kind="timm", device="cuda", runtime="torch")
    assert chosen.settings == {"batch_size": 64, "device": "cpu", "precision": "fp32", "channels_last": False}
    assert [m["device"] for m in made] == ["cpu", "cuda", "cuda", "cpu"]
    assert "no precision on cuda passed the fidelity check; embedding on the CPU instead" in caplog.text


def test_reduced_precision_is_held_to_eager_fp32_with_real_weights():
    """The check on real ImageNet weights, on the CPU (whose autocast has both types): fp16 passes it, bf16 does not
    (its embeddings had a cosine of about 0.99 to fp32), so a bf16 plan gets fp32 instead."""
    def factory(**settings):
        return TimmBackbone("efficientnet_lite0", **settings)

    fp16 = runtime.checked_precision_backbone(factory, runtime.DevicePlan("cpu", 8, "fp16", False))
    assert fp16.precision == "fp16" and fp16.name.endswith(":fp16")
    assert runtime.fidelity_min_cosine(fp16.fidelity) >= runtime.FIDELITY_MIN_COSINE
    assert fp16.fidelity["top1_agreement"] == 1.0
    bf16_plan = runtime.checked_precision_backbone(factory, runtime.DevicePlan("cpu", 8, "bf16", False))
    assert bf16_plan.precision == "fp32" and not bf16_plan.name.endswith(":bf16")
    assert runtime.fidelity_min_cosine(bf16_plan.fidelity) > 0.99999
    bf16 = TimmBackbone("efficientnet_lite0", precision="bf16")
    reference = TimmBackbone("efficientnet_lite0")
    report = measure_fidelity(reference.embed_and_logits, bf16.embed_and_logits, runtime.fidelity_images())
    assert not fidelity_passes(report) and runtime.fidelity_min_cosine(report) > 0.98
    with pytest.raises(EmbeddingRuntimeError, match="timm backbones only"):
        build_backbone(lambda **kwargs: kwargs, kind="open_clip", device="cpu", runtime="onnxruntime")


def test_reduced_precision_and_channels_last_paths_run_and_are_named(photos):
    """The CUDA plan's code (autocast, channels_last) run on the CPU: bf16 is the CPU's autocast type."""
    photos = photos[:2]
    reference = TimmBackbone("efficientnet_lite0", image_size=32, batch_size=4)
    nhwc = TimmBackbone("efficientnet_lite0", image_size=32, batch_size=4, channels_last=True)
    assert nhwc.name == reference.name
    np.testing.assert_allclose(nhwc.embed(photos), reference.embed(photos), atol=1e-3)
    half = TimmBackbone("efficientnet_lite0", image_size=32, batch_size=4, precision="bf16")
    assert half.name == reference.name + ":bf16"  # other vectors: not shared with the fp32 cache
    assert row_cosines(half.embed(photos), reference.embed(photos)).min() > 0.98
    with pytest.raises(ModelInputError, match="precision"):
        TimmBackbone("efficientnet_lite0", image_size=32, precision="int4")


def test_chunks_in_flight_fit_the_device(fast, eager):
    assert runtime.chunks_in_flight(fast) == 3  # two single-threaded ONNX runs, and one chunk being prepared
    assert runtime.chunks_in_flight(eager) == 2  # torch.device("cpu")
    gpu = RecordingEager([], {}, batch_size=256, device=torch.device("cuda"))
    assert runtime.chunks_in_flight(gpu, cores=16) == 16 and runtime.chunks_in_flight(gpu, cores=1) == 2


def test_embedding_setup_says_where_and_how_each_backbone_embeds(fast, eager):
    setup = runtime.embedding_setup(fast)
    assert setup == {"runtime": "onnxruntime", "device": "cpu", "precision": "fp32", "batch_size": 4,
                     "concurrent_runs": 2, "fidelity_min_cosine": setup["fidelity_min_cosine"]}
    assert runtime.FIDELITY_MIN_COSINE <= setup["fidelity_min_cosine"] <= 1.0
    assert runtime.embedding_setup(eager) == {"runtime": "torch", "device": "cpu", "precision": "fp32",
                                              "batch_size": 4, "concurrent_runs": 1, "fidelity_min_cosine": None}


def test_build_components_passes_device_runtime_threads_and_cache(fast, cache_dir, tmp_path, count_exports):
    from backend.components import build_components

    shutil.copytree(cache_dir, tmp_path / "runtime-cache")
    config = Config(model_dir=tmp_path, image_size=SIZE, weak_annotator="none", embedding_runtime="onnxruntime",
                    device="cpu", torch_threads=1)
    previous = torch.get_num_threads()
    try:
        backbone = build_components(config).backbone
    finally:
        torch.set_num_threads(previous)
    assert isinstance(backbone, OnnxRuntimeBackbone) and count_exports == []
    assert backbone._session.get_session_options().intra_op_num_threads == 1
    assert backbone.export.onnx_path.parent == tmp_path / "runtime-cache"


def test_config_reads_embedding_runtime_and_device():
    config = Config.from_env({})
    assert (config.embedding_runtime, config.device) == ("auto", "auto")
    config = Config.from_env({"EMBEDDING_RUNTIME": "onnxruntime", "DEVICE": "cuda"})
    assert (config.embedding_runtime, config.device) == ("onnxruntime", "cuda")
    assert Config.from_env({"EMBEDDING_RUNTIME": " torch ", "DEVICE": "cpu"}).embedding_runtime == "torch"
    for name, value in (("EMBEDDING_RUNTIME", "tensorrt"), ("DEVICE", "gpu"), ("DEVICE", "CUDA")):
        with pytest.raises(ConfigError, match=name):
            Config.from_env({name: value})
    assert EMBEDDING_RUNTIMES == runtime.RUNTIMES and DEVICES == runtime.DEVICES


@pytest.mark.bench
def test_benchmark_script_writes_speed_ratio_and_cosine(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "embedding_runtime.json"
    subprocess.run(
        [sys.executable, str(root / "bench" / "embedding_runtime.py"), "--out", str(out), "--images", "16",
         "--rounds", "2", "--image-size", "64"],
        check=True, cwd=root, timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["cosine"]["embedding_min"] >= 0.999 and result["cosine"]["logits_min"] >= 0.999
    assert result["end_to_end"]["speed_ratio_of_medians"] > 1.0  # ONNX Runtime is the faster one
    assert {"load_average_before", "machine", "model_only"} <= set(result)


@pytest.mark.bench
def test_layout_benchmark_measures_every_configuration_in_its_own_process(tmp_path):
    """bench/onnx_cpu_layout.py: each configuration (batch size, arena under the server's heap settings, one run or
    parallel runs with decoding) runs in a child and lands in the file with the ratios the README quotes."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "onnx_cpu_layout.json"
    subprocess.run([sys.executable, str(root / "bench" / "onnx_cpu_layout.py"), "--out", str(out), "--images", "16",
                    "--rounds", "1"], check=True, cwd=root, timeout=600)
    result = json.loads(out.read_text())
    assert set(result["median_images_per_s"]) == set(result["configurations"]) == {
        "batch_64", "batch_4", "server_heap_no_arena", "server_heap_arena", "decoding_one_run",
        "decoding_parallel_runs"}
    assert all(len(rates) == 1 and rates[0] > 0 for rates in result["images_per_s_per_round"].values())
    assert set(result["ratios_of_medians"]) == {"batch_4_over_64", "arena_over_no_arena_under_server_heap",
                                                "parallel_runs_over_one_run_with_decoding"}


@pytest.mark.bench
def test_scale_benchmark_measures_the_runtime_alone_in_rounds_and_keeps_the_median(tmp_path, photos, monkeypatch):
    """bench/scale.py's denominator: every runtime in each round, in turn, and each one's median of the rounds."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import scale

    alone = scale.runtime_alone([photo.resize((224, 224)) for photo in photos] * 2, tmp_path, rounds=3)
    assert {"auto", "torch"} <= set(alone)
    for measured in alone.values():
        assert len(measured["rounds"]) == 3 and min(measured["rounds"]) > 0
        assert measured["images_per_s"] == round(float(np.median(measured["rounds"])), 1)
        assert measured["cpu_ms_per_image"] > 0
    assert scale.fastest_runtime(alone) != "torch"


def test_scale_summary_bounds_indexing_by_the_cpu_label_studio_and_the_runtime_take_per_image(monkeypatch):
    """bench/scale.py's bound: with Label Studio's measured CPU per image and the runtime's (every core busy), the
    cores can index no faster, whatever the backend does besides."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import scale

    def size(n: int, seconds: float, ls_cpu: float, backend_cpu: float) -> dict:
        rounds = [{"round": 1, "version": "vlm-al-v1", "seconds": 5.0, "health_p99_ms": 9.0, "health_max_ms": 12.0}]
        return {"n_tasks": n, "index_seconds": seconds, "load_after_index": [1.0, 1.0, 1.0], "rounds": rounds,
                "peak_rss_mb": 500.0, "label_studio_cpu_s_during_index": ls_cpu,
                "backend_cpu_s_during_index": backend_cpu}

    result = {"cpu_count": 2, "sizes": {"2000": size(2000, 20.0, 10.0, 30.0), "6000": size(6000, 60.0, 30.0, 90.0)},
              "runtime_alone": {"auto": {"images_per_s": 200.0, "runtime": "OnnxRuntimeBackbone",
                                         "cpu_ms_per_image": 9.5},
                                "torch": {"images_per_s": 25.0, "runtime": "TimmBackbone"}}}
    scale.summarise(result, [2000, 6000])
    indexing = result["indexing"]
    assert indexing["end_to_end_images_per_s"] == 100.0
    assert indexing["label_studio_cpu_ms_per_image"] == 5.0  # 40 s over 8000 images
    assert indexing["backend_cpu_ms_per_image"] == 15.0
    assert indexing["runtime_alone_all_cores_ms_per_image"] == 10.0  # 2 cores over 200 images/s
    assert indexing["runtime_alone_cpu_ms_per_image"] == 9.5  # as measured
    assert indexing["bound_images_per_s"] == round(2000 / 15.0, 1)


def test_scale_runtime_alone_is_the_median_of_the_rounds_before_and_after_the_indexes(monkeypatch):
    """The denominator of the indexing ratio spans the indexes it is set against: rounds before and after them."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import scale

    before = {"auto": {"images_per_s": 190.0, "rounds": [195.0, 190.0, 120.0], "cpu_ms_per_image": 10.0,
                       "cpu_ms_rounds": [10.0, 9.0, 12.0], "runtime": "OnnxRuntimeBackbone", "concurrent_runs": 2},
              "torch": {"images_per_s": 21.0, "rounds": [21.0, 21.0, 20.0], "cpu_ms_per_image": 80.0,
                        "cpu_ms_rounds": [80.0, 80.0, 81.0], "runtime": "TimmBackbone", "concurrent_runs": 1}}
    after = {"auto": {"images_per_s": 150.0, "rounds": [150.0, 140.0, 160.0], "cpu_ms_per_image": 13.0,
                      "cpu_ms_rounds": [13.0, 14.0, 12.5]},
             "torch": {"images_per_s": 20.0, "rounds": [20.0, 19.0, 20.0], "cpu_ms_rounds": [82.0, 83.0, 84.0]}}
    merged = scale.bracketed(before, after)
    assert merged["auto"]["rounds"] == [195.0, 190.0, 120.0, 150.0, 140.0, 160.0]
    assert merged["auto"]["images_per_s"] == 155.0  # the median of all six, not of the first three (190)
    assert merged["auto"]["cpu_ms_per_image"] == 12.25
    assert merged["auto"]["rounds_before_indexing"] == 3
    assert merged["auto"]["runtime"] == "OnnxRuntimeBackbone" and merged["auto"]["concurrent_runs"] == 2
    assert merged["torch"]["images_per_s"] == 20.0


def test_numpy_preprocessing_is_bit_identical_to_the_torch_formula(eager, photos):
    """Cached embeddings are keyed by the backbone's name: the faster numpy preprocessing must not move them."""
    rng = np.random.default_rng(3)
    every_byte = (np.arange(SIZE * SIZE * 3) % 256).astype(np.uint8).reshape(SIZE, SIZE, 3)  # kept by the resize
    images = photos + [Image.fromarray(rng.integers(0, 256, (37, 91, 4), dtype=np.uint8), "RGBA"),
                       Image.fromarray(rng.integers(0, 256, (300, 20), dtype=np.uint8), "L"),
                       Image.fromarray(every_byte, "RGB")]
    mean = torch.tensor(eager.preprocessing.mean).reshape(3, 1, 1)
    std = torch.tensor(eager.preprocessing.std).reshape(3, 1, 1)
    for image in images:
        resized = image.convert("RGB").resize((SIZE, SIZE), getattr(Image.Resampling, eager.preprocessing.interpolation.upper()))
        expected = (torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / 255.0 - mean) / std
        assert torch.equal(eager.preprocess(image), expected)
        assert eager.preprocess_array(image).flags.c_contiguous


def test_uint8_planes_hold_the_same_input_at_a_quarter_of_the_bytes(eager, fast, photos):
    """What the index holds between decoding and the forward pass: uint8 planes, normalised as each batch runs (on
    the CPU by numpy, on a GPU by the same table there), to the bits the images' float32 batch has; so both runtimes'
    forward passes over planes give exactly their embed_and_logits."""
    from model.embeddings import normalise_on_device

    rng = np.random.default_rng(4)
    images = photos + [Image.fromarray(rng.integers(0, 256, (37, 91, 4), dtype=np.uint8), "RGBA"),
                       Image.fromarray(rng.integers(0, 256, (300, 20), dtype=np.uint8), "L")]
    preprocessing = eager.preprocessing
    planes = eager.preprocess_batch(images)
    assert planes.dtype == np.uint8 and planes.shape == (len(images), 3, SIZE, SIZE)
    assert planes.nbytes * 4 == preprocessing.batch(images).nbytes
    np.testing.assert_array_equal(preprocessing.normalise(planes), preprocessing.batch(images))
    table = torch.from_numpy(preprocessing.byte_values.copy())
    assert torch.equal(normalise_on_device(table, planes), torch.from_numpy(preprocessing.batch(images)))
    for backbone in (eager, fast):
        embeddings, logits = backbone.forward_pixels(backbone.preprocess_batch(images), with_logits=True)
        expected_embeddings, expected_logits = backbone.embed_and_logits(images)
        np.testing.assert_array_equal(embeddings, expected_embeddings)
        np.testing.assert_array_equal(logits, expected_logits)
        with pytest.raises(ModelInputError, match=r"expected prepared planes, uint8 \(n, 3, 64, 64\); got float32"):
            backbone.forward_pixels(preprocessing.batch(images))


def test_any_failure_of_the_fast_path_falls_back_under_auto(monkeypatch, tmp_path, caplog):
    def broken_export(eager):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(runtime, "export_onnx", broken_export)
    with caplog.at_level(logging.WARNING, logger="model.runtime"):
        chosen = create_backbone("timm:efficientnet_lite0:random", image_size=32, runtime="auto", cache_dir=tmp_path)
    assert isinstance(chosen, TimmBackbone) and "exporter crashed" in caplog.text
    with pytest.raises(RuntimeError, match="exporter crashed"):
        create_backbone("timm:efficientnet_lite0:random", image_size=32, runtime="onnxruntime", cache_dir=tmp_path)


_FRESH_PROCESS = """
import json, sys
from PIL import Image
from model.runtime import create_backbone
backbone = create_backbone("timm:efficientnet_lite0:random", image_size=32, runtime=sys.argv[2], device="auto",
                           cache_dir=sys.argv[1], threads=1)
images = [Image.new("RGB", (40 + 9 * i, 30), (40 * i, 100, 200 - 30 * i)) for i in range(3)]
print(json.dumps({"torch": "torch" in sys.modules, "timm": "timm" in sys.modules,
                  "runtime": backbone.runtime, "exported": backbone.export.exported, "name": backbone.name,
                  "embeddings": backbone.embed(images).tolist()}))
"""


def _fresh_process(cache_dir, runtime_name="onnxruntime"):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(cache_dir), runtime_name], cwd=root,
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_process_without_torch_exports_in_a_child_then_runs_the_cached_export(tmp_path):
    """The export needs torch; the process that embeds does not: it exports in a child process, and a later start
    finds the cached export. Neither process imports torch or timm, and the vectors are eager torch's."""
    first = _fresh_process(tmp_path)
    assert first["runtime"] == "onnxruntime" and first["exported"]
    assert not first["torch"] and not first["timm"]
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    again = _fresh_process(tmp_path, "auto")
    assert again["runtime"] == "onnxruntime" and not again["exported"] and not again["torch"]
    eager = TimmBackbone("efficientnet_lite0", weights=None, image_size=32)
    assert first["name"] == again["name"] == eager.name
    images = [Image.new("RGB", (40 + 9 * i, 30), (40 * i, 100, 200 - 30 * i)) for i in range(3)]
    reference = eager.embed(images)
    for run in (first, again):
        assert row_cosines(np.array(run["embeddings"]), reference).min() >= 0.9999


def test_a_failed_child_export_is_a_clear_error(tmp_path):
    spec = runtime.TimmExportSpec("efficientnet_lite0", "no-such-tag-anywhere", 32)
    with pytest.raises(EmbeddingRuntimeError, match="child process failed .*no-such-tag-anywhere"):
        runtime.export_in_child(spec, tmp_path, 1)
    assert list(tmp_path.glob("*.onnx")) == []
