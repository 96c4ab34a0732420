"""Label Studio label configs: the label hierarchy of a project, its annotations read back as labels, and
predictions written in the project's own tags.

Four layouts are supported (see ``LabelLayout``). Parsing uses label-studio-sdk's ``LabelInterface``; the
parts it does not expose (``visibleWhen`` wrappers, the Taxonomy tree) are read from the same XML.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

# Label configs arrive over HTTP: defusedxml refuses entity-expansion and external-entity tricks.
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as _xml_fromstring
from label_studio_sdk.label_interface import LabelInterface

from model.errors import HierarchyError
from model.hierarchy import LabelHierarchy

logger = logging.getLogger(__name__)

RECOMMENDED_FASHION_MNIST_CONFIG = Path(__file__).with_name("data") / "recommended_fashion_mnist.xml"
"""The recommended layout for the Fashion-MNIST demo groups (output of ``recommended_label_config``)."""

RECOMMENDED_IMAGE_NAME = "image"
RECOMMENDED_COARSE_NAME = "coarse"
RECOMMENDED_FINE_PREFIX = "fine_"
RECOMMENDED_CONFIDENCE_NAME = "model_confidence"
"""A read-only <TextArea> the predictions fill with the model's coarse and fine confidence (Label Studio shows no
per-result score for choices, and shows the prediction's queue score as a percentage)."""
RECOMMENDED_IMAGE_MAX_WIDTH = "320px"
RECOMMENDED_ROW_STYLE = "display: flex; flex-wrap: wrap; align-items: flex-start; gap: 8px 24px"
RECOMMENDED_IMAGE_COLUMN_STYLE = "flex: 0 1 320px; min-width: 160px; max-width: 320px"
RECOMMENDED_CHOICES_COLUMN_STYLE = "flex: 1 1 260px; min-width: 240px"

_ORIGIN_PREDICTION = "prediction"
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


class LabelConfigError(ValueError):
    """A label config this backend cannot use; the message names the tag and what is missing."""


class LabelLayout(enum.Enum):
    RECOMMENDED = "recommended"
    """A coarse <Choices>, then one fine <Choices> per coarse value inside a ``visibleWhen`` <View>."""
    TAXONOMY = "taxonomy"
    """One <Taxonomy>: nodes at ``coarse_level`` are coarse classes, leaves are fine classes."""
    TWO_CHOICES = "two_choices"
    """A coarse <Choices> and a fine <Choices>; the hierarchy comes from a parent map."""
    FLAT_CHOICES = "flat_choices"
    """One <Choices> of fine classes; the coarse classes come from a parent map."""
    BRUSH_SEGMENTATION = "brush_segmentation"
    """A <BrushLabels> over the image (optionally with an image-level <Choices>): masks, read and written by
    ``backend.segmentation``, not a class hierarchy."""
    MULTI_LABEL = "multi_label"
    """One <Choices choice="multiple"> over the image: a set of labels per image (backend.multilabel), an empty
    set meaning "none of these". The hierarchy is flat: every label its own coarse class."""


def _frozen_map() -> Mapping:
    return MappingProxyType({})


@dataclass(frozen=True)
class ProjectLabeling:
    """What a project's label config means to the backend: the hierarchy and the tags that carry it."""

    hierarchy: LabelHierarchy
    layout: LabelLayout
    image_name: str
    """Name of the <Image> tag: the ``to_name`` of every result."""
    image_value_key: str
    """Task data key of the image URL (``"image"`` for ``value="$image"``)."""
    coarse_control: str | None = None
    """Coarse <Choices> (RECOMMENDED, TWO_CHOICES)."""
    fine_control: str | None = None
    """Fine <Choices> (TWO_CHOICES, FLAT_CHOICES)."""
    fine_control_by_coarse: Mapping[str, str] = field(default_factory=_frozen_map)
    """RECOMMENDED: coarse value -> name of the fine <Choices> shown for it."""
    taxonomy_control: str | None = None
    coarse_level: int = 1
    """TAXONOMY: tree depth of the coarse classes (1 = top level)."""
    taxonomy_path_of_fine: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen_map)
    """TAXONOMY: root -> leaf path of every fine class."""
    taxonomy_path_of_coarse: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen_map)
    """TAXONOMY: root -> node path of every coarse class."""
    taxonomy_node_paths: frozenset[tuple[str, ...]] = frozenset()
    interface: LabelInterface | None = field(default=None, compare=False, repr=False)
    """The parsed config, kept so predictions are built without re-parsing it."""

    @property
    def image_key(self) -> str:
        """The name docs/ARCHITECTURE.md uses for ``image_value_key``."""
        return self.image_value_key

    @property
    def fine_controls(self) -> tuple[str, ...]:
        """Every control that can carry a fine label."""
        if self.layout is LabelLayout.RECOMMENDED:
            return tuple(self.fine_control_by_coarse.values())
        if self.layout is LabelLayout.TAXONOMY:
            return (self.taxonomy_control,)  # type: ignore[return-value]
        return (self.fine_control,)  # type: ignore[return-value]


@dataclass(frozen=True)
class AnnotationLabels:
    """The labels one annotation gives a task.

    ``coarse_is_trusted``: a human decided the coarse class (a fine label implies it, or the coarse choice was
    set or changed by hand), so (coarse, VLM answer) is a fair pair for the noise matrix.
    """

    fine: str | None
    coarse: str | None
    coarse_is_trusted: bool
    cancelled: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def parse_label_config(
    xml: str,
    *,
    parent_map: Mapping[str, str] | None = None,
    coarse_level: int = 1,
    coarse_control: str | None = None,
    fine_control: str | None = None,
) -> ProjectLabeling:
    """Read the label hierarchy and the tags that carry it from a Label Studio label config.

    Without ``coarse_control``/``fine_control`` the layout is detected: ``visibleWhen`` groups -> RECOMMENDED,
    else a <Taxonomy> -> TAXONOMY, else two <Choices> -> TWO_CHOICES, else one <Choices> -> FLAT_CHOICES.
    ``coarse_control`` may also name the <Taxonomy>. ``parent_map`` ({fine: coarse}) is needed by the two
    Choices layouts and ignored by the others, whose config holds the hierarchy.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty: expected <View>...</View> XML")
    if isinstance(coarse_level, bool) or not isinstance(coarse_level, int) or coarse_level < 1:
        raise LabelConfigError(f"coarse_level must be an integer >= 1, got {coarse_level!r}")
    root, interface = read_label_interface(xml)
    parents = _checked_parent_map(parent_map)
    return _ConfigReader(root, interface, parents, coarse_level).read(coarse_control, fine_control)


def read_label_interface(xml: str) -> tuple[ElementTree.Element, LabelInterface]:
    """The config's XML tree and label-studio-sdk's reading of it. defusedxml parses first, so hostile XML (entity
    expansion, external entities) is refused before the SDK reads it; either failure is a LabelConfigError."""
    try:
        root = _xml_fromstring(xml)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from exc
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises plain Exception subclasses
        raise LabelConfigError(f"label-studio-sdk cannot read the label config: {exc}") from exc
    return root, interface


def _checked_parent_map(parent_map: Mapping[str, str] | None) -> dict[str, str] | None:
    if parent_map is None:
        return None
    if not isinstance(parent_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in parent_map.items()
    ):
        raise LabelConfigError("the parent map must map fine class names to coarse class names (strings)")
    if not parent_map:
        raise LabelConfigError("the parent map is empty")
    return dict(parent_map)


def _describe(control: Any) -> str:
    return f'<{control.tag} name="{control.name}">'


def _split_when_values(raw: str) -> list[str]:
    # Label Studio reads whenChoiceValue as a comma-separated list.
    return [part.strip() for part in raw.split(",") if part.strip()]


class _ConfigReader:
    """One parse: the SDK's view of the config plus the raw XML tree for what the SDK does not expose."""

    def __init__(
        self,
        root: ElementTree.Element,
        interface: LabelInterface,
        parent_map: dict[str, str] | None,
        coarse_level: int,
    ) -> None:
        self.root = root
        self.interface = interface
        self.parent_map = parent_map
        self.coarse_level = coarse_level
        self.controls = {c.name: c for c in (interface.controls or ())}
        self.images = {o.name: o for o in (interface.objects or ()) if o.tag.lower() == "image"}
        self.elements: dict[str, ElementTree.Element] = {}
        for element in root.iter():
            name = element.get("name")
            if name is None:
                continue
            if name in self.elements:
                raise LabelConfigError(f'two tags are named "{name}" (<{self.elements[name].tag}> and '
                                       f"<{element.tag}>); tag names must be unique")
            self.elements[name] = element

    # -- control selection -----------------------------------------------------------------------------------

    def read(self, coarse_name: str | None, fine_name: str | None) -> ProjectLabeling:
        if not self.images:
            found = ", ".join(f'<{o.tag} name="{o.name}">' for o in (self.interface.objects or ())) or "none"
            raise LabelConfigError(f"the label config has no <Image> object tag (object tags found: {found})")
        labeling_controls = [c for c in self.controls.values() if c.tag.lower() in ("choices", "taxonomy")]
        if not labeling_controls:
            found = ", ".join(_describe(c) for c in self.controls.values()) or "none"
            raise LabelConfigError(
                f"the label config has no <Choices> or <Taxonomy> control (controls found: {found})"
            )
        coarse = self._named_control(coarse_name, "coarse_control")
        fine = self._named_control(fine_name, "fine_control")
        if coarse is not None or fine is not None:
            return self._read_named(coarse, fine)
        return self._read_detected(labeling_controls)

    def _named_control(self, name: str | None, argument: str) -> Any:
        if name is None:
            return None
        if name not in self.controls:
            raise LabelConfigError(f'{argument}="{name}": the label config has no control of that name '
                                   f"(controls: {sorted(self.controls)})")
        control = self.controls[name]
        if control.tag.lower() not in ("choices", "taxonomy"):
            raise LabelConfigError(f"{argument}: {_describe(control)} is not a <Choices> or <Taxonomy>")
        return control

    def _read_named(self, coarse: Any, fine: Any) -> ProjectLabeling:
        for control in (coarse, fine):
            if control is not None and control.tag.lower() == "taxonomy":
                if coarse is not None and fine is not None and coarse is not fine:
                    raise LabelConfigError(f"{_describe(control)}: a <Taxonomy> holds both levels; "
                                           "name it alone, not together with another control")
                return self._taxonomy(control)
        if coarse is not None and fine is not None:
            return self._two_choices(coarse, fine)
        if coarse is not None:
            if self._group_views(coarse.name):
                return self._recommended(coarse)
            raise LabelConfigError(
                f'{_describe(coarse)} is the coarse control but no fine <Choices> goes with it: add '
                f'<View visibleWhen="choice-selected" whenTagName="{coarse.name}" whenChoiceValue="..."> groups, '
                "or name the fine control too"
            )
        return self._flat_choices(fine)

    def _read_detected(self, labeling_controls: list[Any]) -> ProjectLabeling:
        # A choice-selected <View> around a <TextArea> (say) is no fine group; one around a <Choices> is.
        group_parents: list[str] = []
        for element in self.root.iter():
            name = element.get("whenTagName")
            if (
                element.get("visibleWhen") == "choice-selected"
                and name in self.controls
                and name not in group_parents
                and self.controls[name].tag.lower() == "choices"
                and any(e.tag.lower() == "choices" for e in element.iter())
            ):
                group_parents.append(name)
        if len(group_parents) > 1:
            raise LabelConfigError(
                f"several <Choices> have visibleWhen groups ({', '.join(group_parents)}); "
                "pass coarse_control to say which one is the coarse control"
            )
        if group_parents:
            return self._recommended(self.controls[group_parents[0]])

        on_image = [c for c in labeling_controls if self._images_of(c)]
        if not on_image:
            control = labeling_controls[0]
            raise LabelConfigError(
                f'{_describe(control)} points at toName="{",".join(control.to_name)}", which is not an '
                f"<Image> tag (images: {', '.join(self.images)})"
            )
        taxonomies = [c for c in on_image if c.tag.lower() == "taxonomy"]
        if len(taxonomies) > 1:
            raise LabelConfigError(
                f"several <Taxonomy> controls ({', '.join(c.name for c in taxonomies)}); "
                "pass coarse_control to say which one to use"
            )
        if taxonomies:
            return self._taxonomy(taxonomies[0])
        choices = [c for c in on_image if c.tag.lower() == "choices"]
        if len(choices) == 1 and choices[0].attr.get("choice") == "multiple":
            return self._multi_label(choices[0])
        if len(choices) == 1:
            return self._flat_choices(choices[0])
        if len(choices) == 2:
            coarse, fine = self._guess_coarse_and_fine(choices[0], choices[1])
            return self._two_choices(coarse, fine)
        raise LabelConfigError(
            f"{len(choices)} <Choices> point at the image ({', '.join(c.name for c in choices)}); "
            "pass coarse_control and fine_control to say which ones carry the classes"
        )

    def _guess_coarse_and_fine(self, first: Any, second: Any) -> tuple[Any, Any]:
        """The assignment whose choices the parent map covers best (its keys are fine, its values coarse);
        on a tie, config order (coarse first). A bad map then fails with a precise message."""
        if self.parent_map is None:
            raise LabelConfigError(
                f"two <Choices> ({_describe(first)}, {_describe(second)}) but no parent map: pass a JSON map "
                "fine class -> coarse class, or use the recommended layout with visibleWhen groups"
            )
        fine_names, coarse_names = set(self.parent_map), set(self.parent_map.values())

        def coverage(coarse: Any, fine: Any) -> int:
            return len(set(coarse.labels) & coarse_names) + len(set(fine.labels) & fine_names)

        if coverage(second, first) > coverage(first, second):
            return second, first
        return first, second

    # -- helpers ---------------------------------------------------------------------------------------------

    def _images_of(self, control: Any) -> list[str]:
        return [name for name in control.to_name if name in self.images]

    def _image_of(self, *controls: Any) -> str:
        image_names: list[str] = []
        for control in controls:
            names = self._images_of(control)
            if not names:
                raise LabelConfigError(
                    f'{_describe(control)} points at toName="{",".join(control.to_name)}", which is not an '
                    f"<Image> tag (images: {', '.join(self.images)})"
                )
            if names[0] not in image_names:
                image_names.append(names[0])
        if len(image_names) > 1:
            raise LabelConfigError(
                f"the class controls point at different images ({', '.join(image_names)}); one image per task "
                "is supported"
            )
        return image_names[0]

    def _image_value_key(self, image_name: str) -> str:
        value = self.images[image_name].value or ""
        if not re.fullmatch(r"\$[\w.-]+", value):
            raise LabelConfigError(
                f'<Image name="{image_name}"> has value="{value}"; it must name a task data field like "$image"'
            )
        return value[1:]

    def _require_single_choice(self, control: Any) -> None:
        if control.attr.get("choice") == "multiple":
            raise LabelConfigError(
                f'{_describe(control)} has choice="multiple"; one class per image is needed, use choice="single"'
            )

    def _labels_of(self, control: Any) -> list[str]:
        labels = list(control.labels or ())
        if not labels:
            raise LabelConfigError(
                f"{_describe(control)} has no <Choice> values (labels loaded from task data or apiUrl are not "
                "supported)"
            )
        return labels

    def _hierarchy(self, build: Any, where: str) -> LabelHierarchy:
        try:
            return build()
        except HierarchyError as exc:
            raise LabelConfigError(f"{where}: {exc}") from exc

    def _ignored_parent_map(self, layout: LabelLayout) -> None:
        if self.parent_map is not None:
            logger.info("the %s label config defines the hierarchy itself; the parent map is not used",
                        layout.value)

    def _group_views(self, coarse_name: str) -> list[ElementTree.Element]:
        return [
            e for e in self.root.iter()
            if e.get("visibleWhen") == "choice-selected" and e.get("whenTagName") == coarse_name
        ]

    # -- layouts ---------------------------------------------------------------------------------------------

    def _recommended(self, coarse: Any) -> ProjectLabeling:
        if coarse.tag.lower() != "choices":
            raise LabelConfigError(f"{_describe(coarse)}: the coarse control of visibleWhen groups must be <Choices>")
        self._require_single_choice(coarse)
        coarse_labels = self._labels_of(coarse)
        label_of_value = {
            e.get("value"): e.get("alias") or e.get("value") for e in self.elements[coarse.name].iter("Choice")
        }
        fine_by_coarse: dict[str, str] = {}
        for view in self._group_views(coarse.name):
            where = f'<{view.tag} visibleWhen="choice-selected" whenTagName="{coarse.name}"'
            raw = view.get("whenChoiceValue")
            exact = raw in label_of_value or raw in coarse_labels
            values = [raw] if exact else _split_when_values(raw or "")
            if not values:
                raise LabelConfigError(f"{where}> has no whenChoiceValue: name the coarse value of its group")
            where += f' whenChoiceValue="{raw}">'
            if len(values) > 1:
                raise LabelConfigError(
                    f"{where} names several coarse values {values}; each fine group must belong to exactly one"
                )
            value = label_of_value.get(values[0], values[0])
            if value not in coarse_labels:
                raise LabelConfigError(
                    f"{where}: {values[0]!r} is not a choice of {_describe(coarse)} (choices: {coarse_labels})"
                )
            if value in fine_by_coarse:
                raise LabelConfigError(f"{where}: coarse value {value!r} has two fine groups")
            candidates = [view] if view.tag.lower() == "choices" else [
                e for e in view.iter() if e is not view and e.tag.lower() == "choices"
            ]
            fine_controls = [self.controls[e.get("name")] for e in candidates if e.get("name") in self.controls]
            if len(fine_controls) != 1:
                found = ", ".join(_describe(c) for c in fine_controls) or "none"
                raise LabelConfigError(f"{where} must hold exactly one fine <Choices> (found: {found})")
            fine = fine_controls[0]
            self._require_single_choice(fine)
            fine_by_coarse[value] = fine.name

        missing = [c for c in coarse_labels if c not in fine_by_coarse]
        if missing:
            raise LabelConfigError(
                f"coarse values of {_describe(coarse)} without a fine group: {missing}; add "
                f'<View visibleWhen="choice-selected" whenTagName="{coarse.name}" whenChoiceValue="{missing[0]}"> '
                "holding a fine <Choices> for each"
            )
        groups: dict[str, list[str]] = {}
        group_of_fine: dict[str, str] = {}
        for coarse_value in coarse_labels:
            fine = self.controls[fine_by_coarse[coarse_value]]
            groups[coarse_value] = self._labels_of(fine)
            for fine_label in groups[coarse_value]:
                if fine_label in group_of_fine:
                    raise LabelConfigError(
                        f"fine class {fine_label!r} appears under coarse values {group_of_fine[fine_label]!r} and "
                        f"{coarse_value!r} ({_describe(fine)}); a fine class may have only one parent"
                    )
                group_of_fine[fine_label] = coarse_value
        image = self._image_of(coarse, *(self.controls[n] for n in fine_by_coarse.values()))
        hierarchy = self._hierarchy(lambda: LabelHierarchy.from_groups(groups), _describe(coarse))
        self._ignored_parent_map(LabelLayout.RECOMMENDED)
        return ProjectLabeling(
            hierarchy=hierarchy,
            layout=LabelLayout.RECOMMENDED,
            image_name=image,
            image_value_key=self._image_value_key(image),
            coarse_control=coarse.name,
            fine_control_by_coarse=MappingProxyType(dict(fine_by_coarse)),
            interface=self.interface,
        )

    def _two_choices(self, coarse: Any, fine: Any) -> ProjectLabeling:
        if coarse.tag.lower() != "choices" or fine.tag.lower() != "choices":
            raise LabelConfigError(f"{_describe(coarse)} and {_describe(fine)} must both be <Choices>")
        if coarse is fine:
            raise LabelConfigError(f"{_describe(coarse)} cannot be both the coarse and the fine control")
        if self.parent_map is None:
            raise LabelConfigError(
                f"two <Choices> ({_describe(coarse)} coarse, {_describe(fine)} fine) but no parent map: pass a "
                "JSON map fine class -> coarse class, or use the recommended layout with visibleWhen groups"
            )
        for control in (coarse, fine):
            self._require_single_choice(control)
        coarse_labels, fine_labels = self._labels_of(coarse), self._labels_of(fine)
        orphans = [f for f in fine_labels if f not in self.parent_map]
        if orphans:
            raise LabelConfigError(
                f"choices of the fine {_describe(fine)} without a parent in the parent map: {orphans}"
            )
        strangers = sorted({self.parent_map[f] for f in fine_labels} - set(coarse_labels))
        if strangers:
            raise LabelConfigError(
                f"the parent map names parents that are not choices of the coarse {_describe(coarse)}: {strangers} "
                f"(choices: {coarse_labels})"
            )
        image = self._image_of(coarse, fine)
        hierarchy = self._hierarchy(
            lambda: LabelHierarchy.from_parent_map({f: self.parent_map[f] for f in fine_labels}, coarse_labels),
            f"coarse {_describe(coarse)}",
        )
        return ProjectLabeling(
            hierarchy=hierarchy,
            layout=LabelLayout.TWO_CHOICES,
            image_name=image,
            image_value_key=self._image_value_key(image),
            coarse_control=coarse.name,
            fine_control=fine.name,
            interface=self.interface,
        )

    def _flat_choices(self, fine: Any) -> ProjectLabeling:
        if fine.tag.lower() != "choices":
            raise LabelConfigError(f"{_describe(fine)} must be a <Choices>")
        if self.parent_map is None:
            raise LabelConfigError(
                f"one {_describe(fine)} holds the fine classes but no parent map (fine class -> coarse class) "
                "was given, so the coarse classes are unknown"
            )
        self._require_single_choice(fine)
        fine_labels = self._labels_of(fine)
        orphans = [f for f in fine_labels if f not in self.parent_map]
        if orphans:
            raise LabelConfigError(f"choices of {_describe(fine)} without a parent in the parent map: {orphans}")
        image = self._image_of(fine)
        hierarchy = self._hierarchy(
            lambda: LabelHierarchy.from_parent_map({f: self.parent_map[f] for f in fine_labels}), _describe(fine)
        )
        return ProjectLabeling(
            hierarchy=hierarchy,
            layout=LabelLayout.FLAT_CHOICES,
            image_name=image,
            image_value_key=self._image_value_key(image),
            fine_control=fine.name,
            interface=self.interface,
        )

    def _multi_label(self, control: Any) -> ProjectLabeling:
        from model.multilabel.labels import flat_label_hierarchy

        labels = self._labels_of(control)
        image = self._image_of(control)
        self._ignored_parent_map(LabelLayout.MULTI_LABEL)
        return ProjectLabeling(
            hierarchy=self._hierarchy(lambda: flat_label_hierarchy(labels), _describe(control)),
            layout=LabelLayout.MULTI_LABEL,
            image_name=image,
            image_value_key=self._image_value_key(image),
            fine_control=control.name,
            interface=self.interface,
        )

    def _taxonomy(self, taxonomy: Any) -> ProjectLabeling:
        where = _describe(taxonomy)
        node_paths: set[tuple[str, ...]] = set()
        leaves: list[tuple[str, ...]] = []

        def walk(element: ElementTree.Element, prefix: tuple[str, ...]) -> bool:
            found = False
            for child in element:
                if child.tag != "Choice":
                    found = walk(child, prefix) or found
                    continue
                label = child.get("alias") or child.get("value")
                if not label:
                    continue
                found = True
                path = prefix + (label,)
                node_paths.add(path)
                if not walk(child, path):
                    leaves.append(path)
            return found

        walk(self.elements[taxonomy.name], ())
        if not leaves:
            raise LabelConfigError(
                f"{where} has no <Choice> children (labels loaded from task data or apiUrl are not supported)"
            )
        level = self.coarse_level
        shallow = [p for p in leaves if len(p) <= level]
        if shallow:
            raise LabelConfigError(
                f"{where}: leaves {[' > '.join(p) for p in shallow]} sit at or above coarse_level={level}, so they "
                "have no coarse class; every leaf must lie below a coarse node"
            )
        path_of_fine: dict[str, tuple[str, ...]] = {}
        path_of_coarse: dict[str, tuple[str, ...]] = {}
        for path in leaves:
            if path[-1] in path_of_fine:
                raise LabelConfigError(
                    f"{where}: leaf {path[-1]!r} appears twice ({' > '.join(path_of_fine[path[-1]])} and "
                    f"{' > '.join(path)}); fine class names must be unique"
                )
            path_of_fine[path[-1]] = path
            coarse_path = path[:level]
            known = path_of_coarse.setdefault(coarse_path[-1], coarse_path)
            if known != coarse_path:
                raise LabelConfigError(
                    f"{where}: two level-{level} nodes are named {coarse_path[-1]!r} ({' > '.join(known)} and "
                    f"{' > '.join(coarse_path)}); coarse class names must be unique"
                )
        image = self._image_of(taxonomy)
        hierarchy = self._hierarchy(
            lambda: LabelHierarchy.from_parent_map({f: p[level - 1] for f, p in path_of_fine.items()}), where
        )
        self._ignored_parent_map(LabelLayout.TAXONOMY)
        return ProjectLabeling(
            hierarchy=hierarchy,
            layout=LabelLayout.TAXONOMY,
            image_name=image,
            image_value_key=self._image_value_key(image),
            taxonomy_control=taxonomy.name,
            coarse_level=level,
            taxonomy_path_of_fine=MappingProxyType(path_of_fine),
            taxonomy_path_of_coarse=MappingProxyType(path_of_coarse),
            taxonomy_node_paths=frozenset(node_paths),
            interface=self.interface,
        )


# ---------------------------------------------------------------------------------------------------------------
# Annotations -> labels


class _SkipAnnotation(Exception):
    """An annotation that cannot be read as labels; the message says why."""


def annotation_to_labels(labeling: ProjectLabeling, annotation: Mapping[str, Any]) -> AnnotationLabels | None:
    """The labels of one Label Studio annotation, or None (with a warning) when it cannot be read.

    A fine label gives coarse = its parent, trusted. A coarse-only label is trusted only if its result item's
    ``origin`` is not "prediction" (an unchanged pre-annotation may just echo the VLM). When a fine label and a
    coarse choice disagree, the fine label wins. Results of other controls are ignored.
    """
    if not isinstance(annotation, Mapping):
        logger.warning("skipping an annotation that is not a JSON object: %r", annotation)
        return None
    if annotation.get("was_cancelled"):
        return AnnotationLabels(fine=None, coarse=None, coarse_is_trusted=False, cancelled=True)
    try:
        return _read_annotation(labeling, annotation)
    except _SkipAnnotation as exc:
        logger.warning("skipping annotation %s: %s", annotation.get("id"), exc)
        return None


def task_labels(labeling: ProjectLabeling, task: Mapping[str, Any]) -> AnnotationLabels | None:
    """The labels that count for a task, or None if no annotation gives one.

    Cancelled annotations are ignored. Ground-truth annotations come first, then the most recently updated; the
    first of them that yields a label counts (an unreadable one is skipped with a warning).
    """
    if not isinstance(task, Mapping):
        logger.warning("skipping a task that is not a JSON object: %r", task)
        return None
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        logger.warning("task %s: 'annotations' is not a list", task.get("id"))
        return None
    candidates = [a for a in annotations if isinstance(a, Mapping) and not a.get("was_cancelled")]
    candidates.sort(key=_annotation_rank, reverse=True)
    for annotation in candidates:
        labels = annotation_to_labels(labeling, annotation)
        if labels is not None and (labels.fine is not None or labels.coarse is not None):
            return labels
    return None


def _annotation_rank(annotation: Mapping[str, Any]) -> tuple[bool, datetime, int]:
    stamp = _parse_time(annotation.get("updated_at")) or _parse_time(annotation.get("created_at")) or _EPOCH
    annotation_id = annotation.get("id")
    return bool(annotation.get("ground_truth")), stamp, annotation_id if isinstance(annotation_id, int) else -1


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)


@dataclass
class _Picks:
    coarse: list[tuple[str, bool]] = field(default_factory=list)  # (coarse class, decided by a human)
    fine: list[str] = field(default_factory=list)


def _read_annotation(labeling: ProjectLabeling, annotation: Mapping[str, Any]) -> AnnotationLabels:
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise _SkipAnnotation("'result' is not a list")
    hierarchy = labeling.hierarchy
    coarse_controls = {labeling.coarse_control} - {None}
    fine_controls = set(labeling.fine_controls) - {None}
    picks = _Picks()
    for item in result:
        if not isinstance(item, Mapping):
            raise _SkipAnnotation(f"a result item is not a JSON object: {item!r}")
        from_name = item.get("from_name")
        human = item.get("origin") != _ORIGIN_PREDICTION
        if labeling.layout is LabelLayout.TAXONOMY:
            if from_name == labeling.taxonomy_control:
                for path in _values(item, "taxonomy"):
                    _pick_taxonomy_path(labeling, path, human, picks)
        elif from_name in coarse_controls:
            for name in _values(item, "choices"):
                if name not in hierarchy.coarse_classes:
                    raise _SkipAnnotation(f'unknown coarse class {name!r} in <Choices name="{from_name}">')
                picks.coarse.append((name, human))
        elif from_name in fine_controls:
            for name in _values(item, "choices"):
                if name not in hierarchy.fine_classes:
                    raise _SkipAnnotation(f'unknown fine class {name!r} in <Choices name="{from_name}">')
                picks.fine.append(name)
    return _resolve(labeling, picks, annotation.get("id"))


def _values(item: Mapping[str, Any], key: str) -> list:
    value = item.get("value")
    values = value.get(key) if isinstance(value, Mapping) else None
    if not isinstance(values, list):
        raise _SkipAnnotation(f"result of {item.get('from_name')!r} has no list value.{key}: {value!r}")
    for entry in values:
        ok = isinstance(entry, str) if key == "choices" else (
            isinstance(entry, list) and entry and all(isinstance(part, str) for part in entry)
        )
        if not ok:
            raise _SkipAnnotation(f"malformed value.{key} of {item.get('from_name')!r}: {values!r}")
    return values


def _pick_taxonomy_path(labeling: ProjectLabeling, path: list[str], human: bool, picks: _Picks) -> None:
    path_tuple = tuple(path)
    leaf = path_tuple[-1]
    if leaf in labeling.taxonomy_path_of_fine:
        expected = labeling.taxonomy_path_of_fine[leaf]
        if expected != path_tuple:
            logger.warning("taxonomy path %s does not match the tree (%s); the fine class %r wins",
                           " > ".join(path_tuple), " > ".join(expected), leaf)
        picks.fine.append(leaf)
    elif path_tuple in labeling.taxonomy_node_paths:
        if len(path_tuple) >= labeling.coarse_level:
            picks.coarse.append((path_tuple[labeling.coarse_level - 1], human))
        # A node above the coarse level says nothing about the coarse class.
    else:
        raise _SkipAnnotation(f'unknown taxonomy path {" > ".join(path_tuple)!r} in <Taxonomy '
                              f'name="{labeling.taxonomy_control}">')


def _resolve(labeling: ProjectLabeling, picks: _Picks, annotation_id: Any) -> AnnotationLabels:
    hierarchy = labeling.hierarchy
    coarse_names = list(dict.fromkeys(name for name, _ in picks.coarse))
    if len(coarse_names) > 1:
        raise _SkipAnnotation(f"several coarse classes picked: {coarse_names}")
    coarse = coarse_names[0] if coarse_names else None
    fine_names = list(dict.fromkeys(picks.fine))
    if len(fine_names) > 1 and coarse is not None:
        # Choices in a hidden group may keep a stale pick; the one under the chosen coarse class is the answer.
        fine_names = [f for f in fine_names if hierarchy.parent_name(f) == coarse] or fine_names
    if len(fine_names) > 1:
        raise _SkipAnnotation(f"several fine classes picked: {fine_names}")
    if fine_names:
        fine = fine_names[0]
        parent = hierarchy.parent_name(fine)
        if coarse is not None and coarse != parent:
            logger.warning("annotation %s: fine class %r lies under %r but coarse %r was picked; the fine label "
                           "wins", annotation_id, fine, parent, coarse)
        return AnnotationLabels(fine=fine, coarse=parent, coarse_is_trusted=True)
    if coarse is not None:
        human = any(decided for name, decided in picks.coarse if name == coarse)
        return AnnotationLabels(fine=None, coarse=coarse, coarse_is_trusted=human)
    return AnnotationLabels(fine=None, coarse=None, coarse_is_trusted=False)


# ---------------------------------------------------------------------------------------------------------------
# Predictions


def build_prediction(
    labeling: ProjectLabeling,
    *,
    coarse: str | None,
    coarse_score: float,
    fine: str | None,
    fine_score: float | None,
    score: float,
    model_version: str,
) -> dict[str, Any]:
    """One Label Studio prediction in the project's own tags.

    The VLM's coarse label pre-fills the coarse control; the fine suggestion fills the fine control of its group
    (RECOMMENDED, TWO_CHOICES), or replaces the partial Taxonomy path by the full one. Rule: when the fine
    suggestion's parent disagrees with the VLM coarse label, the coarse label is kept and the fine suggestion
    dropped, so the annotator never sees a contradictory pair. With no coarse label, the fine suggestion's parent
    pre-fills the coarse control (the RECOMMENDED layout shows only the selected group). FLAT_CHOICES has no
    coarse control, so it carries the fine suggestion alone, whatever the VLM said.
    ``score`` is the queue priority (ascending = label first); each result item carries its own score.
    """
    hierarchy = labeling.hierarchy
    _check_probability("score", score)
    if not isinstance(model_version, str) or not model_version:
        raise ValueError(f"model_version must be a non-empty string, got {model_version!r}")
    if coarse is not None:
        hierarchy.coarse_index(coarse)
        _check_probability("coarse_score", coarse_score)
    if fine is not None:
        hierarchy.fine_index(fine)
        if fine_score is None:
            raise ValueError(f"fine suggestion {fine!r} needs a fine_score")
        _check_probability("fine_score", fine_score)
        if (
            coarse is not None
            and labeling.layout is not LabelLayout.FLAT_CHOICES
            and hierarchy.parent_name(fine) != coarse
        ):
            fine = None

    result: list[dict[str, Any]] = []
    if labeling.layout is LabelLayout.TAXONOMY:
        if fine is not None:
            path, region_score = labeling.taxonomy_path_of_fine[fine], fine_score
        elif coarse is not None:
            path, region_score = labeling.taxonomy_path_of_coarse[coarse], coarse_score
        else:
            path = None
        if path is not None:
            result.append(_region(labeling, labeling.taxonomy_control, region_score, taxonomy=[list(path)]))
    elif labeling.layout is LabelLayout.FLAT_CHOICES:
        if fine is not None:
            result.append(_region(labeling, labeling.fine_control, fine_score, fine))
    else:
        shown_coarse, shown_score = (coarse, coarse_score) if coarse is not None else (
            (hierarchy.parent_name(fine), fine_score) if fine is not None else (None, None)
        )
        if shown_coarse is not None:
            result.append(_region(labeling, labeling.coarse_control, shown_score, shown_coarse))
        if fine is not None:
            control = (
                labeling.fine_control_by_coarse[hierarchy.parent_name(fine)]
                if labeling.layout is LabelLayout.RECOMMENDED
                else labeling.fine_control
            )
            result.append(_region(labeling, control, fine_score, fine))
    return {"result": result, "score": float(score), "model_version": model_version}


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
        0.0 <= value <= 1.0
    ):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _region(labeling: ProjectLabeling, control_name: Any, region_score: Any, label: str | None = None,
            **value: Any) -> dict[str, Any]:
    if labeling.interface is None:
        raise ValueError("this ProjectLabeling has no parsed config; make it with parse_label_config")
    control = labeling.interface.get_control(control_name)
    region = control.label(label, labeling.image_name, **value) if label is not None else control.label(
        to_name=labeling.image_name, **value
    )
    # Region.to_json() would add a random id (the UI was checked with id-less results, and equal predictions
    # should compare equal) and calls pydantic's deprecated .dict(), so the item is assembled from its fields.
    return {
        "from_name": region.from_tag.name,
        "to_name": region.to_tag.name,
        "type": region.from_tag.tag.lower(),
        "value": region.value.model_dump(),
        "score": float(region_score),
    }


# ---------------------------------------------------------------------------------------------------------------
# The recommended layout


def recommended_label_config(hierarchy: LabelHierarchy, image_key: str = "image") -> str:
    """The recommended layout for ``hierarchy``: a coarse <Choices> pre-filled by the model, then one required
    fine <Choices> per coarse class (``fine_<slug>``), shown only while that class is selected, beside an image
    capped at 320 px, and a read-only ``model_confidence`` text the predictions fill in."""
    if not isinstance(image_key, str) or not re.fullmatch(r"[\w.-]+", image_key):
        raise ValueError(f"image_key must be a task data field name like 'image', got {image_key!r}")
    with_comma = [c for c in hierarchy.coarse_classes if "," in c]
    if with_comma:
        raise ValueError(f"coarse classes {with_comma} contain a comma, which Label Studio's whenChoiceValue "
                         "reads as a separator")
    # Image and choices side by side (wrapping under each other on a narrow panel), the image capped in size, so
    # an annotator at 1280x720 sees the image, the coarse choices and the chosen group's fine choices unscrolled.
    root = ElementTree.Element("View", style=RECOMMENDED_ROW_STYLE)
    image_column = ElementTree.SubElement(root, "View", style=RECOMMENDED_IMAGE_COLUMN_STYLE)
    ElementTree.SubElement(image_column, "Image", name=RECOMMENDED_IMAGE_NAME, value=f"${image_key}",
                           maxWidth=RECOMMENDED_IMAGE_MAX_WIDTH)
    choices_column = ElementTree.SubElement(root, "View", style=RECOMMENDED_CHOICES_COLUMN_STYLE)
    ElementTree.SubElement(choices_column, "Header", value="Coarse (model)")
    coarse = ElementTree.SubElement(
        choices_column, "Choices", name=RECOMMENDED_COARSE_NAME, toName=RECOMMENDED_IMAGE_NAME, choice="single",
        showInline="true",
    )
    for coarse_class in hierarchy.coarse_classes:
        ElementTree.SubElement(coarse, "Choice", value=coarse_class)
    for coarse_class, slug in zip(hierarchy.coarse_classes, _unique_slugs(hierarchy.coarse_classes)):
        view = ElementTree.SubElement(
            choices_column, "View", visibleWhen="choice-selected", whenTagName=RECOMMENDED_COARSE_NAME,
            whenChoiceValue=coarse_class,
        )
        ElementTree.SubElement(view, "Header", value=f"{coarse_class}: fine class")
        fine = ElementTree.SubElement(
            view, "Choices", name=f"{RECOMMENDED_FINE_PREFIX}{slug}", toName=RECOMMENDED_IMAGE_NAME,
            choice="single", required="true",
        )
        for fine_class in hierarchy.children(coarse_class):
            ElementTree.SubElement(fine, "Choice", value=fine_class)
    ElementTree.SubElement(
        choices_column, "TextArea", name=RECOMMENDED_CONFIDENCE_NAME, toName=RECOMMENDED_IMAGE_NAME,
        editable="false", maxSubmissions="1", rows="2", placeholder="the model's confidence appears here",
    )
    ElementTree.indent(root, space="  ")
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def _unique_slugs(names: Sequence[str]) -> list[str]:
    slugs: list[str] = []
    for name in names:
        base = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "group"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}_{n}", n + 1
        slugs.append(slug)
    return slugs
