"""Any folder of images laid out as ``DIR/<coarse>/<fine>/<images>`` as a two-level data set."""

from __future__ import annotations

import os
from pathlib import Path

from model.datasets.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    DatasetLayoutError,
    DatasetNotFoundError,
    readable_name,
)
from model.datasets.tree import IMAGE_EXTENSIONS, TreeDataset, TreeScanner, is_hidden, is_image_name, list_images
from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy

MIN_IMAGES_PER_CLASS = 2
"""One image cannot be split between train and test, nor tell a class apart from its variants."""


class ImageFolderDataset(TreeDataset):
    """``DIR/<coarse>/<fine>/<images>`` as an ``ImageDataset``.

    Folder names become class names (underscores as spaces). Images are files ending in one of
    ``IMAGE_EXTENSIONS`` (any case); hidden files and folders are ignored, and so are other files (a README).
    Images in deeper folders under a fine folder belong to that fine class. Decoding, the pixel cap, variant
    groups and the group-aware split are the same as for openclipart. A layout the loader cannot use raises a
    DatasetLayoutError naming the problem and the path.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if max_side <= 0 or max_pixels <= 0:
            raise ModelInputError(f"max_side and max_pixels must be positive, got {max_side}, {max_pixels}")
        root = Path(root).expanduser()
        if not root.exists():
            raise DatasetNotFoundError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise DatasetLayoutError(f"image folder {root} is not a directory")
        self.root = root.resolve()
        self.name = f"imagefolder:{self.root}"
        self.max_side = max_side
        self.max_pixels = max_pixels

        files_by_fine: dict[str, list[Path]] = {}
        parent_by_fine: dict[str, str] = {}
        folder_of_fine: dict[str, Path] = {}
        _no_images_here(self.root, "directly under the data set folder; put them in <coarse>/<fine>/ folders")
        coarse_folders = _subfolders(self.root)
        for coarse_folder in coarse_folders:
            _no_images_here(coarse_folder, "directly in a coarse class folder; put them in a fine class folder")
            fine_folders = _subfolders(coarse_folder)
            if not fine_folders:
                raise DatasetLayoutError(
                    f"coarse class folder {coarse_folder} holds no fine class folders (expected "
                    f"{coarse_folder}/<fine>/<images>)"
                )
            for fine_folder in fine_folders:
                fine = readable_name(fine_folder.name)
                if fine in folder_of_fine:
                    raise DatasetLayoutError(
                        f"fine class {fine!r} appears twice: {folder_of_fine[fine]} and {fine_folder}; fine class "
                        f"names must be unique across coarse classes"
                    )
                folder_of_fine[fine] = fine_folder
                parent_by_fine[fine] = readable_name(coarse_folder.name)
                files_by_fine[fine] = list_images(fine_folder)
        coarse_names = [readable_name(folder.name) for folder in coarse_folders]
        if len(set(coarse_names)) < len(coarse_names):
            raise DatasetLayoutError(
                f"{self.root}: coarse class folders whose names differ only in underscores/spaces: "
                f"{[f.name for f in coarse_folders]}"
            )
        if len(coarse_folders) < 2:
            raise DatasetLayoutError(
                f"{self.root} holds {len(coarse_folders)} coarse class folder(s) "
                f"({[f.name for f in coarse_folders]}); a hierarchy needs at least 2"
            )
        empty = [str(folder_of_fine[f]) for f, files in files_by_fine.items() if not files]
        if empty:
            raise DatasetLayoutError(
                f"fine class folders without images ({', '.join(sorted(IMAGE_EXTENSIONS))}): {empty}"
            )
        usable, skipped = TreeScanner(self.root, max_pixels).usable(files_by_fine)
        self.skipped: dict[str, int] = dict(sorted(skipped.items()))
        too_few = {
            str(folder_of_fine[f]): len(images) for f, images in usable.items() if len(images) < MIN_IMAGES_PER_CLASS
        }
        if too_few:
            raise DatasetLayoutError(
                f"fine classes need at least {MIN_IMAGES_PER_CLASS} usable images (one cannot be split); "
                f"usable images per folder: {too_few}; skipped files: {self.skipped or 'none'}"
            )
        self.hierarchy = LabelHierarchy.from_parent_map(parent_by_fine, coarse_order=coarse_names)
        self._build_splits("imagefolder", usable, max_side, max_pixels)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        (folder / name for name in os.listdir(folder) if not is_hidden(name) and (folder / name).is_dir()),
        key=lambda path: path.name,
    )


def _no_images_here(folder: Path, problem: str) -> None:
    strays = sorted(name for name in os.listdir(folder) if is_image_name(name) and (folder / name).is_file())
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        raise DatasetLayoutError(f"image files {problem}: {folder}: {shown}")
