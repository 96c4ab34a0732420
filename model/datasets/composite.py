"""Scenes composited from 2-4 openclipart drawings, with per-pixel ground truth from their alpha channels.

A benchmark for tasks that single drawings cannot pose: multi-label classification (which classes are in the
picture) and segmentation (which pixels belong to which class). Every scene is drawn from a seed: how many
objects, which classes (distinct within a scene), which drawing of each class, its size and place, and the
background. Only the layout (a few numbers per object) is computed up front; pixels are rendered when an image or
mask is asked for, so a split of thousands of scenes costs little memory.

- Drawings come from ``OpenClipartDataset``'s splits: train scenes use only train drawings and test scenes only
  test drawings, so the variants of one drawing stay on one side of the split.
- Labels are ``SCENE_CLASSES``, eight fine openclipart classes that are concrete things of distinct shapes and
  hold enough drawings on both sides of the split (body parts, stick figures and toys are left out: thin line
  drawings or too few test drawings). Eight labels with 2-4 per scene gives label sets of every size without
  making any label rare. Outline drawings (under ``MIN_FILL`` opaque) are skipped.
- Objects are placed so that two boxes share at most ``MAX_OVERLAP`` of the smaller one, so every listed label
  stays visible; later objects still occlude earlier ones in the mask.
- Backgrounds: the photos and renderings of Debian's ``gnome-backgrounds`` where installed (random crops), plus
  plain colours and smooth colour noise. Without the package, only the latter two.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from model.datasets.base import (
    DatasetLayoutError,
    DatasetNotFoundError,
    check_split_name,
    read_image_size,
    short_digest,
)
from model.datasets.openclipart import OPENCLIPART_ROOT, OpenClipartDataset
from model.datasets.tree import PathLoader
from model.errors import ModelInputError

SCENE_CLASSES: tuple[str, ...] = (
    "birds", "bugs", "mammals", "beverages", "desserts", "fruit", "music", "vehicles",
)  # fmt: skip
"""The labels: fine classes of ``OpenClipartDataset``."""

GNOME_BACKGROUNDS_ROOT = "/usr/share/backgrounds/gnome"
"""Where ``apt-get install gnome-backgrounds`` puts its wallpapers (raster ones are used; SVGs are skipped)."""

BACKGROUND_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

DEFAULT_CANVAS = 224
DEFAULT_TRAIN_SCENES = 1200
DEFAULT_TEST_SCENES = 400
MIN_OBJECTS, MAX_OBJECTS = 2, 4
SCALE_RANGE = (0.32, 0.6)
"""An object's longest side, as a fraction of the canvas side."""
MAX_OVERLAP = 0.25
"""Two objects' boxes may share at most this fraction of the smaller box (rejection sampling), so that no
object hides another."""
PLACEMENT_TRIES = 50
DRAWING_MAX_SIDE = 256
"""Drawings are decoded once, shrunk to this side, and kept in a small cache (objects are smaller on the canvas)."""
ALPHA_THRESHOLD = 128
"""A pixel belongs to an object where the resized alpha is at least this."""
MIN_FILL = 0.1
"""Drawings whose opaque pixels cover less than this share of their frame are not used: outlines and blueprints
(thin strokes) vanish from the mask once shrunk onto the canvas, and their label would be invisible."""
SCENE_VERSION = "scenes-v1"
"""Part of every content_id: bump it when rendering or layout rules change."""
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass(frozen=True)
class PlacedObject:
    """One drawing in a scene: its label index, file, and box on the canvas (left, top, width, height)."""

    label: int
    path: Path
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneLayout:
    """Everything needed to render one scene; ``background`` is ("plain" | "noise" | a file path, its seed)."""

    objects: tuple[PlacedObject, ...]
    background: str
    background_seed: int


@lru_cache(maxsize=256)
def _drawing_rgba(path: Path) -> Image.Image:
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    rgba.thumbnail((DRAWING_MAX_SIDE, DRAWING_MAX_SIDE), Image.Resampling.LANCZOS)
    return rgba


@lru_cache(maxsize=None)
def drawing_fill(path: Path) -> float:
    """Share of the drawing's frame that is opaque (alpha at least ``ALPHA_THRESHOLD``)."""
    return float((np.asarray(_drawing_rgba(path))[..., 3] >= ALPHA_THRESHOLD).mean())


@lru_cache(maxsize=32)
def _background_photo(path: str, side: int) -> Image.Image:
    with Image.open(path) as image:
        image.draft("RGB", (side, side))
        rgb = image.convert("RGB")
    rgb.thumbnail((side, side), Image.Resampling.BILINEAR)
    return rgb


def find_backgrounds(root: str | Path = GNOME_BACKGROUNDS_ROOT) -> tuple[Path, ...]:
    """Raster wallpapers under ``root`` (none if the folder is missing)."""
    folder = Path(root)
    if not folder.is_dir():
        return ()
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in BACKGROUND_EXTENSIONS and p.is_file()))


def render_background(kind: str, seed: int, canvas: int) -> Image.Image:
    """A plain colour, smooth colour noise, or a random crop of a wallpaper file, ``canvas`` pixels square."""
    rng = np.random.default_rng(seed)
    if kind == "plain":
        colour = tuple(int(c) for c in rng.integers(90, 256, size=3))
        return Image.new("RGB", (canvas, canvas), colour)
    if kind == "noise":
        coarse = rng.uniform(60, 255, size=(4, 4, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((canvas, canvas), Image.Resampling.BICUBIC), np.float32)
        grain = rng.normal(0, 12, size=smooth.shape)
        return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
    photo = _background_photo(kind, 2 * canvas)
    crop = int(rng.uniform(0.4, 1.0) * min(photo.size))
    left = int(rng.integers(0, photo.width - crop + 1))
    top = int(rng.integers(0, photo.height - crop + 1))
    return photo.crop((left, top, left + crop, top + crop)).resize((canvas, canvas), Image.Resampling.BILINEAR)


def render_scene(layout: SceneLayout, canvas: int) -> tuple[Image.Image, np.ndarray]:
    """The scene as RGB and its mask (uint8, 0 = background, k + 1 = label k; later objects on top)."""
    image = render_background(layout.background, layout.background_seed, canvas).convert("RGBA")
    mask = np.zeros((canvas, canvas), dtype=np.uint8)
    for placed in layout.objects:
        left, top, width, height = placed.box
        drawing = _drawing_rgba(placed.path).resize((width, height), Image.Resampling.LANCZOS)
        image.alpha_composite(drawing, (left, top))
        alpha = np.asarray(drawing)[..., 3]
        region = mask[top : top + height, left : left + width]
        region[alpha >= ALPHA_THRESHOLD] = placed.label + 1
    return image.convert("RGB"), mask


class SceneSplit:
    """One split of composited scenes.

    ``label_sets`` (bool, n x L): which labels are in each scene (every scene has 2-4). ``groups``: one id per
    scene (each scene is its own composition; drawing variants are already kept apart between splits).
    ``content_id``: a digest of the layouts, drawings, backgrounds and rendering version, usable as a cache key.
    """

    def __init__(self, *, dataset: str, split: str, label_names: tuple[str, ...], layouts: list[SceneLayout],
                 canvas: int, content_id: str) -> None:
        self.dataset = dataset
        self.split = split
        self.label_names = label_names
        self.canvas = canvas
        self.content_id = content_id
        self._layouts = layouts
        label_sets = np.zeros((len(layouts), len(label_names)), dtype=bool)
        for row, layout in enumerate(layouts):
            for placed in layout.objects:
                label_sets[row, placed.label] = True
        label_sets.setflags(write=False)
        self.label_sets = label_sets
        groups = np.arange(len(layouts), dtype=np.int64)
        groups.setflags(write=False)
        self.groups = groups
        self._rendered: OrderedDict[int, tuple[Image.Image, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._layouts)

    def __repr__(self) -> str:
        return f"SceneSplit({self.dataset!r}, {self.split!r}, n={len(self)}, content_id={self.content_id!r})"

    def layout(self, index: int) -> SceneLayout:
        return self._layouts[self._check_index(index)]

    def _check_index(self, index: int) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise ModelInputError(f"scene index must be an integer, got {type(index).__name__}")
        if not 0 <= int(index) < len(self):
            raise ModelInputError(f"scene index {index} is out of range for {self.dataset} {self.split} "
                                  f"({len(self)} scenes)")
        return int(index)

    def _render(self, index: int) -> tuple[Image.Image, np.ndarray]:
        index = self._check_index(index)
        if index in self._rendered:
            self._rendered.move_to_end(index)
            return self._rendered[index]
        rendered = render_scene(self._layouts[index], self.canvas)
        self._rendered[index] = rendered
        if len(self._rendered) > 16:  # image(i) then mask(i) render once; older scenes are dropped
            self._rendered.popitem(last=False)
        return rendered

    def image(self, index: int) -> Image.Image:
        """Scene ``index`` as an RGB ``canvas`` x ``canvas`` image (a fresh copy)."""
        return self._render(index)[0].copy()

    def images(self, indices) -> list[Image.Image]:
        return [self.image(i) for i in indices]

    def mask(self, index: int) -> np.ndarray:
        """uint8 (canvas, canvas): 0 = background, k + 1 = label k (a fresh copy)."""
        return self._render(index)[1].copy()

    def head(self, n: int) -> SceneSplit:
        """The first ``n`` scenes (scenes are independent draws, so any prefix is a fair sample)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= len(self):
            raise ModelInputError(f"head(n) needs an integer in [0, {len(self)}], got {n!r}")
        if n == len(self):
            return self
        return SceneSplit(dataset=self.dataset, split=self.split, label_names=self.label_names,
                          layouts=self._layouts[:n], canvas=self.canvas,
                          content_id=short_digest(f"{self.content_id}\nhead {int(n)}"))


class CompositeSceneDataset:
    """``SceneSplit``s of ``n_train`` and ``n_test`` scenes on a ``canvas``-pixel square, drawn from ``seed``."""

    def __init__(
        self,
        root: str | Path = OPENCLIPART_ROOT,
        *,
        backgrounds_root: str | Path = GNOME_BACKGROUNDS_ROOT,
        canvas: int = DEFAULT_CANVAS,
        n_train: int = DEFAULT_TRAIN_SCENES,
        n_test: int = DEFAULT_TEST_SCENES,
        seed: int = 0,
        classes: tuple[str, ...] = SCENE_CLASSES,
    ) -> None:
        if canvas < 32:
            raise ModelInputError(f"canvas must be at least 32 pixels, got {canvas}")
        if n_train < 1 or n_test < 1:
            raise ModelInputError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
        if len(classes) < MAX_OBJECTS:
            raise ModelInputError(f"at least {MAX_OBJECTS} classes are needed, got {len(classes)}")
        self.name = "openclipart-scenes"
        self.canvas = int(canvas)
        self.seed = int(seed)
        drawings = OpenClipartDataset(root)
        missing = [c for c in classes if c not in drawings.hierarchy.fine_classes]
        if missing:
            raise DatasetNotFoundError(f"openclipart under {root} lacks the scene classes {missing}")
        self.label_names: tuple[str, ...] = tuple(classes)
        self.backgrounds = find_backgrounds(backgrounds_root)
        background_kinds = ["plain", "noise", *(str(p) for p in self.backgrounds)]
        self._splits: dict[str, SceneSplit] = {}
        for split, n in (("train", n_train), ("test", n_test)):
            source = drawings.split(split)
            loader = source.loader
            if not isinstance(loader, PathLoader):
                raise DatasetLayoutError("openclipart splits are expected to load from files")
            pools = [
                [
                    loader.paths[i]
                    for i in np.flatnonzero(source.fine_labels == drawings.hierarchy.fine_index(name))
                    if drawing_fill(loader.paths[i]) >= MIN_FILL
                ]
                for name in classes
            ]
            empty = [name for name, pool in zip(classes, pools) if not pool]
            if empty:
                raise DatasetLayoutError(f"openclipart {split} split has no drawings of {empty}")
            layouts = [self._layout(split, i, pools, background_kinds) for i in range(n)]
            self._splits[split] = SceneSplit(
                dataset=self.name, split=split, label_names=self.label_names, layouts=layouts, canvas=self.canvas,
                content_id=self._content_id(split, source.content_id, layouts),
            )

    def _layout(self, split: str, index: int, pools: list[list[Path]], background_kinds: list[str]) -> SceneLayout:
        # Weight photo backgrounds as much as plain and noise together, when there are photos.
        rng = np.random.default_rng((self.seed, _SPLIT_CODES[split], index))
        n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        labels = rng.choice(len(pools), size=n_objects, replace=False)
        placed: list[PlacedObject] = []
        boxes: list[tuple[int, int, int, int]] = []
        for label in labels:
            pool = pools[int(label)]
            path = pool[int(rng.integers(len(pool)))]
            width, height = read_image_size(path)
            for _ in range(PLACEMENT_TRIES):
                side = rng.uniform(*SCALE_RANGE) * self.canvas
                scale = side / max(width, height)
                box_w, box_h = max(4, int(round(width * scale))), max(4, int(round(height * scale)))
                left = int(rng.integers(0, self.canvas - box_w + 1))
                top = int(rng.integers(0, self.canvas - box_h + 1))
                box = (left, top, box_w, box_h)
                if all(_overlap(box, other) <= MAX_OVERLAP * min(box_w * box_h, other[2] * other[3])
                       for other in boxes):
                    break
            else:
                continue  # no room left for this object: the scene keeps fewer (at least the first always fits)
            boxes.append(box)
            placed.append(PlacedObject(int(label), path, box))
        if len(placed) < MIN_OBJECTS:  # rare: retry with the next draw of the same generator
            return self._layout(split, index + 1_000_003, pools, background_kinds)
        n_files = len(background_kinds) - 2
        weights = np.array([1.0, 1.0] + ([2.0 / n_files] * n_files if n_files else []))
        background = background_kinds[int(rng.choice(len(background_kinds), p=weights / weights.sum()))]
        return SceneLayout(tuple(placed), background, int(rng.integers(2**31)))

    def _content_id(self, split: str, source_id: str, layouts: list[SceneLayout]) -> str:
        digest = hashlib.sha256(
            json.dumps([SCENE_VERSION, self.name, split, source_id, self.canvas, self.label_names]).encode()
        )
        for path in self.backgrounds:
            stat = path.stat()
            digest.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        for layout in layouts:
            objects = [(o.label, o.path.name, o.box) for o in layout.objects]
            digest.update(json.dumps([objects, Path(layout.background).name, layout.background_seed]).encode())
        return short_digest(digest.hexdigest())

    def __repr__(self) -> str:
        return (f"CompositeSceneDataset({len(self.label_names)} labels, canvas={self.canvas}, seed={self.seed}, "
                f"{len(self.backgrounds)} background files)")

    def split(self, name: str) -> SceneSplit:
        return self._splits[check_split_name(name)]


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, width) * max(0, height)
