"""Clip art from Debian's ``openclipart-png`` package (public domain) as a two-level data set.

The package sorts its 8,121 PNGs into two levels of folders (``animals/birds``, ``food/fruit``...). The second
level gives the fine classes and the first level their coarse classes, for the folders chosen in
``OPENCLIPART_FOLDERS``. Files inside deeper folders (``animals/mammals/bears``) belong to the second-level
folder; files lying directly in a first-level folder belong to no fine class and are not used.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from model.datasets.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    DatasetLayoutError,
    DatasetNotFoundError,
    readable_name,
)
from model.datasets.tree import TreeDataset, TreeImage, TreeScanner, list_images
from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy

OPENCLIPART_ROOT = "/usr/share/openclipart/png"
"""Where ``apt-get install openclipart-png`` puts the PNGs."""

MIN_IMAGES_PER_FINE = 20
"""A fine class needs this many usable images (after skipping, and dropping duplicates) to be kept."""

MIN_FINE_PER_COARSE = 2
"""A coarse class needs this many kept fine classes, or fine labels would add nothing to it."""

# The chosen folders: {coarse folder: fine folders}. Chosen so that a person (or a VLM) can name the coarse
# class from the picture alone: concrete things (animals, food, people, plants, transportation...). Whole
# first-level folders left out as abstract, icon-like or catch-all: buttons, computer (mostly desktop icons),
# containers (no sub-folders), decorations, education, geography (maps), logos, office, science, shapes
# (stars, arrows, flowchart), signs_and_symbols (flags, LEDs, map symbols), special (templates, patterns),
# tools (one usable sub-folder: weapons), unsorted. Sub-folders left out inside chosen ones:
#   animals/amphibian, animals/fantasy: (almost) empty;
#   people/clothing: a hat or a pair of tights is not a picture of people;
#   people/smilies: emoticon icons;
#   recreation/games: 90% four decks of playing cards (symbols, and each card four times);
#   recreation/party, holiday, religion, art: themes, not things (party is mostly ice cream and balloons);
#   transportation/roadsigns, aiga-symbols: signs and pictograms;
#   food/dairy: 4 files.
# Listed candidates that the size rules then remove (fewer than MIN_IMAGES_PER_FINE usable images, or a coarse
# class left with fewer than MIN_FINE_PER_COARSE fine classes) stay listed, so the rules, not this list, decide:
# animals/dinosaurs (15), buildings/furniture (10) and with it buildings, electronics (battery 6, bulb 10),
# food/vegetables (13).
OPENCLIPART_FOLDERS: dict[str, tuple[str, ...]] = {
    "animals": ("birds", "bugs", "dinosaurs", "fish", "mammals"),
    "buildings": ("furniture", "homes"),
    "electronics": ("battery", "bulb"),
    "food": ("beverages", "breads_and_carbs", "desserts", "fruit", "meats_and_eggs", "vegetables"),
    "people": ("bodypart", "stickmen"),
    "plants": ("flowers", "trees"),
    "recreation": ("music", "sports", "toys"),
    "transportation": ("boating", "vehicles"),
}

OPENCLIPART_CLASS_NAMES: dict[str, str] = {
    "people/bodypart": "body parts",
    "people/stickmen": "stick figures",
}
"""Class names for folders whose own name is not the plain words a text encoder should match (the rest are
the folder name with underscores as spaces)."""

OPENCLIPART_EXCLUDED_FOLDERS: tuple[str, ...] = (
    "buttons", "computer", "containers", "decorations", "education", "geography", "logos", "office", "science",
    "shapes", "signs_and_symbols", "special", "tools", "unsorted",
    "animals/amphibian", "animals/fantasy", "food/dairy", "people/clothing", "people/smilies", "recreation/art",
    "recreation/games", "recreation/holiday", "recreation/party", "recreation/religion",
    "transportation/aiga-symbols", "transportation/roadsigns",
)  # fmt: skip
"""Folders deliberately not used (see the comment above OPENCLIPART_FOLDERS)."""


class OpenClipartDataset(TreeDataset):
    """The chosen openclipart folders as an ``ImageDataset``.

    Files whose PNG header declares more than ``max_pixels`` pixels (default 25 MP) are skipped before any
    pixel is decoded: the package holds renderings of 169 MP (food/*/..._mateya_01.png) and one of 623 MP.
    ``skipped`` counts the files left out of the chosen folders, by reason ("over pixel cap", "unreadable",
    "duplicate": an identical file already in the class, "in two classes": the same picture filed under two
    chosen classes, so it has no single label). Images are RGB, transparency composited onto white, shrunk to
    ``max_side``. ``folders`` maps each kept folder ("animals/birds") to its fine class name. Variants of one
    drawing (``name_01``, ``name_02``, ``name_bw``...) share a group, and whole
    groups go to train or test (see ``model.datasets.tree.build_splits``).
    """

    def __init__(
        self,
        root: str | Path = OPENCLIPART_ROOT,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if max_side <= 0 or max_pixels <= 0:
            raise ModelInputError(f"max_side and max_pixels must be positive, got {max_side}, {max_pixels}")
        self.name = "openclipart"
        self.root = Path(root)
        self.max_side = max_side
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"openclipart PNGs not found at {self.root}. Install them with 'apt-get install openclipart-png' "
                f"(Debian) or pass root= the folder holding animals/, food/, ..."
            )
        scanner = TreeScanner(self.root, max_pixels)
        files: dict[tuple[str, str], list[Path]] = {
            (coarse, fine): list_images(self.root / coarse / fine)
            for coarse, fines in OPENCLIPART_FOLDERS.items()
            for fine in fines
            if (self.root / coarse / fine).is_dir()
        }
        # Which classes survive depends on which duplicates are dropped, and that on which classes take part:
        # repeat until the kept set no longer changes (twice or three times).
        active = set(files)
        while True:
            usable, skipped = scanner.usable({f"{c}/{f}": files[(c, f)] for c, f in files if (c, f) in active})
            kept = {(c, f) for c, f in active if len(usable[f"{c}/{f}"]) >= MIN_IMAGES_PER_FINE}
            per_coarse = Counter(c for c, _ in kept)
            kept = {(c, f) for c, f in kept if per_coarse[c] >= MIN_FINE_PER_COARSE}
            if kept == active:
                break
            active = kept
        if len({c for c, _ in active}) < 2:
            raise DatasetLayoutError(
                f"{self.root}: fewer than 2 coarse classes keep {MIN_FINE_PER_COARSE} fine classes of at least "
                f"{MIN_IMAGES_PER_FINE} usable images each; is this the openclipart-png folder?"
            )
        self.skipped: dict[str, int] = dict(sorted(skipped.items()))
        self.folders: dict[str, str] = _class_names(sorted(active))  # "coarse/fine" folder -> fine class name
        parent_map = {self.folders[f"{c}/{f}"]: readable_name(c) for c, f in sorted(active)}
        self.hierarchy = LabelHierarchy.from_parent_map(parent_map)
        images_by_fine: dict[str, list[TreeImage]] = {
            self.folders[folder]: images for folder, images in usable.items()
        }
        self._build_splits("openclipart", images_by_fine, max_side, max_pixels)


def _class_names(folders: list[tuple[str, str]]) -> dict[str, str]:
    """Fine class names: readable words, qualified with the parent where two folders would share one."""
    names = {f"{c}/{f}": OPENCLIPART_CLASS_NAMES.get(f"{c}/{f}", readable_name(f)) for c, f in folders}
    counts = Counter(names.values())
    coarse_names = {readable_name(c) for c, _ in folders}
    return {
        folder: f"{name} ({readable_name(folder.split('/')[0])})" if counts[name] > 1 or name in coarse_names else name
        for folder, name in names.items()
    }
