"""Segmentation projects: a <BrushLabels> over an <Image>, optionally next to an image-level <Choices>.

This module only translates Label Studio into ``model.segmentation`` calls: it reads the config with
label-studio-sdk's ``LabelInterface``, reads brush annotations into label masks and writes predicted masks back
with the SDK's brush converters (``label_studio_sdk.converter.brush.decode_rle`` / ``mask2rle``: Label Studio's
own RLE, never re-implemented here), downloads task images with the project's Label Studio client, and keeps
one fitted ``SegmentationModel`` per project.

A fit (from the webhooks, like every project) reads every task's mask and image-level labels, trains the model
on the human masks plus the confidence-weighted pseudo-masks of the other tasks, and pushes brush
pre-annotations for the unlabelled tasks: the head's mask restricted to the image's labels (human ones where the
<Choices> was answered, else predicted), one region per label with its mean probability as the region's score,
and a prediction score that orders Label Studio's queue (ascending: the least reliable mask first).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from backend.label_config import LabelConfigError, LabelLayout, read_label_interface
from backend.projects import Projects, schema_hash
from backend.state import COLD_START_VERSION
from model.errors import ModelInputError
from model.io import atomic_write_bytes
from model.spatial_features import FeaturePyramid

if TYPE_CHECKING:  # model.segmentation imports torch; it is imported where a fit or a prediction needs it
    from model.segmentation import SegmentationModel

logger = logging.getLogger(__name__)

MIN_REGION_SHARE = 0.002
"""Predicted regions below this share of the image are not sent (specks a person would have to erase)."""
QUERY_STRATEGY = "mask-uncertainty"
"""The mask strategy that orders a segmentation project's queue (``model.segmentation.SEGMENTATION_STRATEGIES``)."""
PREDICTION_SIDE = 112
"""The head predicts at this square resolution; masks are then resized to each image's own size."""


@dataclass(frozen=True)
class SegmentationLabeling:
    """The tags of a segmentation project: the brush control and its labels, and an optional image-level
    <Choices> whose values that match brush labels count as the image's labels."""

    image_name: str
    image_value_key: str
    brush_control: str
    labels: tuple[str, ...]
    choices_control: str | None = None
    choice_values: tuple[str, ...] = ()
    layout: LabelLayout = LabelLayout.BRUSH_SEGMENTATION


def parse_segmentation_config(xml: str) -> SegmentationLabeling | None:
    """The segmentation tags of a label config, or None when it has no <BrushLabels> (another layout's)."""
    if not isinstance(xml, str) or "brushlabels" not in xml.lower():
        return None
    _, interface = read_label_interface(xml)
    images = {o.name: o for o in (interface.objects or ()) if o.tag.lower() == "image"}
    brushes = [c for c in (interface.controls or ()) if c.tag.lower() == "brushlabels"]
    if not brushes:
        return None
    on_image = [c for c in brushes if any(name in images for name in c.to_name)]
    if not on_image:
        raise LabelConfigError(f'<BrushLabels name="{brushes[0].name}"> must point at an <Image> '
                               f"(images: {', '.join(images) or 'none'})")
    if len(on_image) > 1:
        raise LabelConfigError(f"several <BrushLabels> ({', '.join(c.name for c in on_image)}); use one")
    brush = on_image[0]
    labels = tuple(brush.labels)
    if not labels:
        raise LabelConfigError(f'<BrushLabels name="{brush.name}"> has no <Label> values')
    if len(set(labels)) != len(labels):
        raise LabelConfigError(f'<BrushLabels name="{brush.name}"> repeats a <Label> value')
    image_name = next(name for name in brush.to_name if name in images)
    value = str(images[image_name].value or "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f'<Image name="{image_name}"> needs value="$<task data key>", got "{value}"')
    choices = [c for c in (interface.controls or ())
               if c.tag.lower() == "choices" and image_name in c.to_name and set(c.labels) & set(labels)]
    choice = choices[0] if choices else None
    return SegmentationLabeling(
        image_name=image_name, image_value_key=value[1:], brush_control=brush.name, labels=labels,
        choices_control=choice.name if choice else None,
        choice_values=tuple(v for v in choice.labels if v in labels) if choice else (),
    )


# --- annotations and predictions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskAnnotation:
    """What a person gave one task: its mask (uint8 (H, W), 0 = background, k + 1 = label k) if any region was
    drawn, and its image-level labels (from the <Choices> and from the labels drawn)."""

    mask: np.ndarray | None
    labels: frozenset[str]


def decode_brush_region(value: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """bool (height, width): one brush region's pixels, decoded with the SDK's ``decode_rle``."""
    rle = value.get("rle")
    if not isinstance(rle, list) or not rle:
        raise ModelInputError("a brush region without 'rle' (only Label Studio's RLE brush format is read)")
    # Imported here: the SDK's converter package pulls in nltk, scipy.stats and scikit-learn (about 180 MB) that a
    # web process without segmentation projects never needs.
    from label_studio_sdk.converter.brush import decode_rle

    flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    if flat.size != width * height * 4:
        raise ModelInputError(f"a brush region decodes to {flat.size} values, not {width}x{height}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def read_annotation(labeling: SegmentationLabeling, annotation: Mapping[str, Any]) -> TaskAnnotation | None:
    """One annotation's mask and labels; None for a cancelled (skipped) annotation. Regions are painted in
    order, so a later region covers an earlier one where they overlap."""
    if annotation.get("was_cancelled"):
        return None
    mask: np.ndarray | None = None
    labels: set[str] = set()
    for result in annotation.get("result") or ():
        if not isinstance(result, Mapping):
            continue
        value = result.get("value") or {}
        if result.get("from_name") == labeling.brush_control and result.get("type") == "brushlabels":
            names = [n for n in value.get("brushlabels") or () if n in labeling.labels]
            width, height = int(result.get("original_width") or 0), int(result.get("original_height") or 0)
            if not names or width <= 0 or height <= 0:
                continue
            region = decode_brush_region(value, width, height)
            if mask is None:
                mask = np.zeros((height, width), dtype=np.uint8)
            if mask.shape != region.shape:
                raise ModelInputError(f"brush regions of one annotation disagree on the image size "
                                      f"({mask.shape} vs {region.shape})")
            mask[region] = labeling.labels.index(names[0]) + 1
            labels.add(names[0])
        elif labeling.choices_control and result.get("from_name") == labeling.choices_control:
            labels.update(c for c in value.get("choices") or () if c in labeling.labels)
    return TaskAnnotation(mask, frozenset(labels))


def latest_annotation(labeling: SegmentationLabeling, task: Mapping[str, Any]) -> TaskAnnotation | None:
    """The newest usable annotation of a task (by update time, then id), or None."""
    annotations = [a for a in task.get("annotations") or () if isinstance(a, Mapping) and not a.get("was_cancelled")]
    annotations.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
    for annotation in reversed(annotations):
        read = read_annotation(labeling, annotation)
        if read is not None and (read.mask is not None or read.labels):
            return read
    return None


def mask_results(labeling: SegmentationLabeling, mask: np.ndarray, probabilities: np.ndarray,
                 label_probabilities: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Label Studio results for a predicted mask (uint8 (H, W)): one ``brushlabels`` region per label in the SDK's
    RLE (``mask2rle``), scored by the label's mean probability over the region (``probabilities`` float
    (L + 1, H, W)); plus the image-level <Choices> if the config has one (labels whose probability reaches 0.5)."""
    # Imported here, like decode_rle (see decode_brush_region).
    from label_studio_sdk.converter.brush import mask2rle

    height, width = mask.shape
    results: list[dict[str, Any]] = []
    for k, name in enumerate(labeling.labels):
        region = mask == k + 1
        if region.mean() < MIN_REGION_SHARE:
            continue
        results.append({
            "from_name": labeling.brush_control, "to_name": labeling.image_name, "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(region.astype(np.uint8) * 255), "brushlabels": [name]},
            "score": round(float(probabilities[k + 1][region].mean()), 4),
        })
    if labeling.choices_control and label_probabilities is not None:
        chosen = [name for k, name in enumerate(labeling.labels)
                  if name in labeling.choice_values and label_probabilities[k] >= 0.5]
        if chosen:
            results.append({"from_name": labeling.choices_control, "to_name": labeling.image_name, "type": "choices",
                            "value": {"choices": chosen},
                            "score": round(float(min(label_probabilities[labeling.labels.index(c)] for c in chosen)), 4)})
    return results


def resize_label_mask(mask: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((side, side), Image.Resampling.NEAREST))


def resize_probabilities(probabilities: np.ndarray, width: int, height: int) -> np.ndarray:
    """float32 (c, height, width): bilinear resize of per-class probability maps."""
    return np.stack([np.asarray(Image.fromarray(p).resize((width, height), Image.Resampling.BILINEAR))
                     for p in probabilities.astype(np.float32)])


# --- per-project models ------------------------------------------------------------------------------------------


class PyramidCache:
    """Feature pyramids by image content key, one ``.npz`` each (float16 stages and the image's size), written
    atomically under ``directory``: a restarted process or a worker reads them instead of embedding again."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def get(self, key: str) -> tuple[FeaturePyramid, tuple[int, int]] | None:
        try:
            with np.load(self._path(key), allow_pickle=False) as data:
                stages = sum(1 for name in data.files if name.startswith("detail_"))
                pyramid = FeaturePyramid(data["coarse"][None], tuple(data[f"detail_{i}"][None] for i in range(stages)))
                width, height = (int(v) for v in data["size"])
        except (OSError, KeyError, ValueError):
            return None  # missing or damaged: embedded again
        return pyramid, (width, height)

    def put(self, key: str, pyramid: FeaturePyramid, size: tuple[int, int]) -> None:
        arrays = {"coarse": pyramid.coarse[0], "size": np.asarray(size, dtype=np.int64)}
        arrays.update({f"detail_{i}": detail[0] for i, detail in enumerate(pyramid.details)})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self._path(key), buffer.getvalue())


@dataclass
class ServedSegmentation:
    model: SegmentationModel | None = None
    version: str = COLD_START_VERSION


class SegmentationProjects:
    """Fits, saves and serves one ``SegmentationModel`` per project.

    A fit commits the model as a checkpoint of the project's ``ProjectState`` (``metadata.json`` names its kind),
    with the queue's priorities, and moves the project's pointer, so a restarted process, another web replica or an
    RQ worker serves the same version (it loads the checkpoint when the pointer moves). Feature pyramids are cached
    by image content key under ``maps_dir``, so a refit embeds only new images. ``extractor`` maps PIL images to
    their ``FeaturePyramid``."""

    def __init__(self, decode: Callable[[bytes], Image.Image], content_key: Callable[[bytes], str],
                 projects: Projects, maps_dir: Path,
                 extractor: Callable[[Sequence[Image.Image]], FeaturePyramid] | None = None, *,
                 batch_size: int = 10) -> None:
        self._decode = decode
        self._content_key = content_key
        self._projects = projects
        self._maps = PyramidCache(maps_dir)
        self._extractor = extractor
        self._batch_size = batch_size
        """Masks chosen together by the strategy for the head of the queue (QUERY_BATCH_SIZE)."""
        self._keys_by_url: dict[str, tuple[str, int, int]] = {}
        self._served: dict[int, ServedSegmentation] = {}
        self._lock = threading.Lock()

    def served(self, project_id: int, labeling: SegmentationLabeling | None = None
               ) -> tuple[SegmentationModel | None, str]:
        """(model or None, model_version); loads the checkpoint when another process moved the pointer. A model
        whose labels differ from the config's (the config changed since) is not served."""
        from model.segmentation import SegmentationModel

        current = self._projects.state(project_id).current()
        if current is None:
            return None, COLD_START_VERSION
        with self._lock:
            served = self._served.setdefault(project_id, ServedSegmentation())
            if served.version != current.model_version:
                try:
                    served.model = SegmentationModel.load(
                        self._projects.state(project_id).version_dir(current.model_version))
                except ModelInputError as exc:
                    logger.warning("project %s: cannot load segmentation model %s: %s", project_id,
                                   current.model_version, exc)
                    served.model = None
                served.version = current.model_version
            model = served.model
        if model is not None and labeling is not None and model.label_names != labeling.labels:
            return None, current.model_version
        return model, current.model_version

    def _extract(self, images: Sequence[Image.Image]) -> FeaturePyramid:
        if self._extractor is None:
            from model.spatial_features import image_feature_pyramid

            self._extractor = image_feature_pyramid
        return self._extractor(images)

    def task_maps(self, client: Any, tasks: Sequence[Mapping[str, Any]], labeling: SegmentationLabeling
                  ) -> tuple[list[int], FeaturePyramid | None, list[tuple[int, int]]]:
        """Positions of the tasks whose image could be used, their feature pyramids (None when no task's
        could), and each image's (W, H)."""
        positions: list[int] = []
        keys: list[str] = []
        new_images: dict[str, Image.Image] = {}
        found: dict[str, tuple[FeaturePyramid, tuple[int, int]]] = {}
        for position, task in enumerate(tasks):
            url = (task.get("data") or {}).get(labeling.image_value_key)
            if not isinstance(url, str) or not url:
                continue
            known = self._keys_by_url.get(url)
            cached = self._maps.get(known[0]) if known is not None else None
            if known is None or cached is None:
                try:
                    data = client.download_image(url, task.get("id"))
                    image = self._decode(data)
                except Exception as exc:  # noqa: BLE001 - one bad image must not fail the project
                    logger.warning("segmentation: task %s image unusable: %s", task.get("id"), str(exc)[:200])
                    continue
                known = (self._content_key(data), image.width, image.height)
                self._keys_by_url[url] = known
                cached = self._maps.get(known[0])
                if cached is None:
                    new_images[known[0]] = image
            if cached is not None:
                found[known[0]] = cached
            positions.append(position)
            keys.append(known[0])
        if new_images:
            computed = self._extract(list(new_images.values()))
            for row, (key, image) in enumerate(new_images.items()):
                one = computed.take(slice(row, row + 1))
                self._maps.put(key, one, (image.width, image.height))
                found[key] = (one, (image.width, image.height))
        if not keys:
            return positions, None, []
        pyramid = FeaturePyramid.stack([found[k][0] for k in keys])
        return positions, pyramid, [found[k][1] for k in keys]

    def fit(self, project_id: int, client: Any, tasks: Sequence[Mapping[str, Any]],
            labeling: SegmentationLabeling, label_config: str) -> dict[str, Any] | None:
        """Train on every task's annotation, save a version with the queue's priorities and serve it; returns a
        summary, or None when nothing can be learned yet."""
        from model.query import LabelCosts
        from model.segmentation import (
            SegmentationModel,
            SegmentationSettings,
            create_mask_strategy,
            mask_priority,
            mask_scores,
        )

        annotations = [latest_annotation(labeling, t) for t in tasks]
        if not any(a is not None for a in annotations):
            return None
        positions, maps, _ = self.task_maps(client, tasks, labeling)
        if maps is None:
            return None
        settings = SegmentationSettings()
        n_labels = len(labeling.labels)
        label_sets = np.zeros((len(positions), n_labels), dtype=bool)
        known = np.zeros(len(positions), dtype=bool)
        human: list[int] = []
        human_masks: list[np.ndarray] = []
        for row, position in enumerate(positions):
            annotation = annotations[position]
            if annotation is None:
                continue
            known[row] = True
            for name in annotation.labels:
                label_sets[row, labeling.labels.index(name)] = True
            if annotation.mask is not None:
                human.append(row)
                human_masks.append(resize_label_mask(annotation.mask, settings.side))
        masks = np.stack(human_masks) if human_masks else np.zeros((0, settings.side, settings.side), np.uint8)
        model = SegmentationModel(labeling.labels, settings).fit(maps, label_sets, known,
                                                                 np.asarray(human, dtype=np.int64), masks)
        unlabelled = np.flatnonzero(~known)
        priorities: dict[int, float] = {}
        if unlabelled.size:
            scores = mask_scores(model, maps, unlabelled)
            # The strategy's diverse batch heads the queue, then the rest by descending uncertainty.
            picked = create_mask_strategy(QUERY_STRATEGY).query(scores, float(self._batch_size), LabelCosts(),
                                                               np.random.default_rng(0))
            queue = mask_priority(scores, np.array([p.index for p in picked], dtype=np.int64), len(positions),
                                  known)
            priorities = {int(tasks[positions[row]]["id"]): float(queue[row]) for row in unlabelled}
        state = self._projects.state(project_id)
        version = state.next_version()
        metrics = {"task": "segmentation", "n_masks": len(human), "n_image_labels": int(known.sum()),
                   "n_tasks": len(positions), "labels": list(labeling.labels)}
        state.write_priorities(version, priorities)
        state.commit_version(version, model.save, schema_hash(label_config), metrics)
        with self._lock:
            self._served[project_id] = ServedSegmentation(model, version)
        return {"model_version": version, **{k: v for k, v in metrics.items() if k.startswith("n_")},
                "unlabelled_task_ids": [int(tasks[positions[r]]["id"]) for r in unlabelled]}

    def predictions(self, project_id: int, client: Any, tasks: Sequence[Mapping[str, Any]],
                    labeling: SegmentationLabeling) -> tuple[list[dict[str, Any]], str]:
        """One prediction per task, in order, and the version that made them: brush regions and a queue score
        once the project has a model; an empty result before its first fit (nothing to draw a mask from yet)."""
        model, version = self.served(project_id, labeling)
        predictions: list[dict[str, Any]] = [{"result": [], "model_version": version} for _ in tasks]
        if model is None or not tasks:
            return predictions, version
        positions, maps, sizes = self.task_maps(client, tasks, labeling)
        if maps is None:
            return predictions, version
        stored_version, priorities = self._projects.state(project_id).priorities()
        if stored_version != version:
            priorities = {}
        probabilities = model.predict_proba(maps, PREDICTION_SIDE)
        label_probabilities = model.label_probabilities(maps)
        for row, position in enumerate(positions):
            task = tasks[position]
            annotation = latest_annotation(labeling, task)
            present = (np.isin(labeling.labels, sorted(annotation.labels)) if annotation and annotation.labels
                       else label_probabilities[row] >= model.settings.min_label_probability)
            present = np.asarray(present, dtype=bool)
            if not present.any():
                present[int(label_probabilities[row].argmax())] = True
            allowed = np.concatenate([[True], present])
            width, height = sizes[row]
            restricted = np.where(allowed[:, None, None], probabilities[row], 0.0)
            restricted /= np.maximum(restricted.sum(axis=0, keepdims=True), 1e-6)
            full = resize_probabilities(restricted, width, height)
            mask = full.argmax(axis=0).astype(np.uint8)
            results = mask_results(labeling, mask, full, label_probabilities[row])
            score = priorities.get(int(task.get("id") or -1))
            if score is None:
                region_scores = [r["score"] for r in results if r["type"] == "brushlabels"]
                score = float(np.mean(region_scores)) if region_scores else 0.0
            predictions[position] = {"result": results, "score": round(float(score), 6), "model_version": version}
        return predictions, version

    def fit_and_push(self, project_id: int, client: Any, labeling: SegmentationLabeling, label_config: str, *,
                     push: bool) -> str | None:
        """A fit from the webhooks: train on the project's annotations, then (``push``) send brush
        pre-annotations of the unlabelled tasks to Label Studio under the new model version."""
        tasks = client.fetch_tasks(project_id)
        summary = self.fit(project_id, client, tasks, labeling, label_config)
        if summary is None:
            logger.info("project %s: no masks or image labels yet; nothing to fit", project_id)
            return None
        version = str(summary["model_version"])
        logger.info("project %s: segmentation %s from %d masks and %d labelled images of %d tasks", project_id,
                    version, summary["n_masks"], summary["n_image_labels"], summary["n_tasks"])
        if push:
            wanted = set(summary["unlabelled_task_ids"])
            todo = [t for t in tasks if int(t["id"]) in wanted]
            predictions, _ = self.predictions(project_id, client, todo, labeling)
            payload = [{"task": int(t["id"]), **p} for t, p in zip(todo, predictions) if p["result"]]
            if payload and client.import_predictions(project_id, payload) > 0:
                client.set_model_version(project_id, version)  # Label Studio refuses a version no prediction has
        return version
