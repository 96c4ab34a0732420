"""Per-project memory: how to reach Label Studio, parsed label configs, the model each project is served."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.features import WeakAnnotators
from backend.label_config import LabelConfigError, ProjectLabeling, parse_label_config
from backend.protocol import InvalidInput
from backend.shared_store import FileStateStore, StateStore
from backend.state import COLD_START_VERSION, ProjectState, version_number
from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy

logger = logging.getLogger(__name__)

LABEL_CONFIG_CACHE_SIZE = 64


def schema_hash(label_config: str) -> str:
    return hashlib.sha256(label_config.encode("utf-8")).hexdigest()[:16]


@dataclass
class ProjectContext:
    project_id: int
    hostname: str | None = None
    access_token: str | None = None
    label_config: str | None = None
    model_version: str | None = None
    model: Any = None
    indexed_schema: str | None = None
    """Hash of the label config this process last queued or ran the project's index with (/setup comes often);
    cleared when an index fails, so the next /setup queues it again."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class LabelConfigs:
    """Parses label configs, cached by content (Label Studio resends the same one on every /setup)."""

    def __init__(self, parent_map_file: Path | None, coarse_level: int, weak_annotators: WeakAnnotators) -> None:
        self._parent_map = _read_parent_map(parent_map_file)
        self._coarse_level = coarse_level
        self._weak_annotators = weak_annotators
        self._labelings: OrderedDict[str, ProjectLabeling] = OrderedDict()
        self._labelings_lock = threading.Lock()

    def parse(self, label_config: str) -> ProjectLabeling:
        """Parse (and cache by content) a label config; unusable ones raise InvalidInput 422 naming the problem."""
        digest = schema_hash(label_config)
        with self._labelings_lock:
            cached = self._labelings.get(digest)
            if cached is not None:
                self._labelings.move_to_end(digest)
                return cached
        try:
            parsed = parse_label_config(label_config, parent_map=self._parent_map, coarse_level=self._coarse_level)
            # Build (and cache) the project's weak annotator now, so classes it cannot use are refused here.
            self._weak_annotators.for_hierarchy(parsed.hierarchy)
        except (LabelConfigError, ModelInputError) as exc:
            raise InvalidInput(f"unsupported label config: {exc}", status=422, kind="unsupported_label_config") from exc
        except (RecursionError, ValueError, TypeError, KeyError, IndexError, AttributeError, SyntaxError) as exc:
            # A hostile or broken XML document that the parsers choke on: a 422, never a 500.
            logger.warning("unparseable label config (%s: %s)", type(exc).__name__, str(exc)[:200])
            raise InvalidInput(f"unsupported label config: it cannot be parsed ({type(exc).__name__})", status=422,
                               kind="unsupported_label_config") from None
        with self._labelings_lock:
            self._labelings[digest] = parsed
            while len(self._labelings) > LABEL_CONFIG_CACHE_SIZE:
                self._labelings.popitem(last=False)
        return parsed


class Projects:
    """Each project's context, its ProjectState, and the fine classifier it is served (loaded from its checkpoint)."""

    def __init__(
        self,
        model_dir: Path,
        classifier_factory: Callable[..., Any] | None = None,
        classifier_loader: Callable[[Path, LabelHierarchy], Any] | None = None,
        state_store: StateStore | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.state_store: StateStore = state_store or FileStateStore(self.model_dir)
        self._classifier_factory = classifier_factory
        self._classifier_loader = classifier_loader
        self._contexts: dict[int, ProjectContext] = {}
        self._states: dict[int, ProjectState] = {}
        self._lock = threading.Lock()

    def context(self, project_id: int) -> ProjectContext:
        with self._lock:
            ctx = self._contexts.get(project_id)
            if ctx is None:
                ctx = ProjectContext(project_id)
                self._contexts[project_id] = ctx
            return ctx

    def state(self, project_id: int) -> ProjectState:
        """One ProjectState per project, so its parsed pointer and priorities stay cached between requests."""
        with self._lock:
            state = self._states.get(project_id)
            if state is None:
                records = self.state_store.project_records(project_id)
                state = self._states[project_id] = ProjectState(self.model_dir, project_id, records)
            return state

    def loaded_versions(self) -> dict[int, str]:
        """The model version each project is served in this process (memory only)."""
        with self._lock:
            return {pid: ctx.model_version for pid, ctx in self._contexts.items() if ctx.model_version}

    def current_model_version(self, project_id: int | None) -> str:
        if project_id is None:
            return COLD_START_VERSION
        current = self.state(project_id).current()
        return current.model_version if current is not None else COLD_START_VERSION

    def served_model(self, project_id: int, labeling: ProjectLabeling | None) -> tuple[Any, str]:
        """(fine classifier or None, model_version); reloads when another process moved the pointer (one read of
        its stamp per call: a file's stat, or one Redis HGET)."""
        current = self.state(project_id).current()
        if current is None:
            return None, COLD_START_VERSION
        ctx = self.context(project_id)
        with ctx.lock:
            if ctx.model_version != current.model_version:
                directory = self.state(project_id).version_dir(current.model_version)
                if not directory.is_dir():
                    # Pruned by a newer fit between reading the pointer and fetching it: the next call retries.
                    logger.warning("project %s: checkpoint %s is gone; serving no model this time", project_id,
                                   current.model_version)
                    return None, current.model_version
                ctx.model = self._load_classifier(project_id, current.model_version, directory)
                ctx.model_version = current.model_version
            model = ctx.model
        if model is not None and labeling is not None and model.hierarchy != labeling.hierarchy:
            # The label config changed since this model was trained; its classes no longer match.
            return None, current.model_version
        return model, current.model_version

    def serve(self, project_id: int, classifier: Any, model_version: str) -> None:
        ctx = self.context(project_id)
        with ctx.lock:
            ctx.model, ctx.model_version = classifier, model_version

    def _load_classifier(self, project_id: int, model_version: str, directory: Path) -> Any:
        if _checkpoint_kind(directory) is not None:
            return None  # another layout's model (multi-label, segmentation): its own module loads it
        try:
            if self._classifier_loader is not None:
                return self._classifier_loader(directory, None)
            from model.finegrained import FineGrainedClassifier

            return FineGrainedClassifier.load(directory)
        except Exception:
            logger.exception("project %s: cannot load model %s", project_id, model_version)
            return None

    def new_classifier(self, hierarchy: LabelHierarchy, dim: int, training_config: Any) -> Any:
        if self._classifier_factory is not None:
            return self._classifier_factory(hierarchy, dim, training_config)
        from model.finegrained import FineGrainedClassifier

        return FineGrainedClassifier(hierarchy, dim, training_config)

    def warm_start(self) -> None:
        """Load the current model of every project with records, so the first request after a restart is served."""
        try:
            project_ids = self.state_store.project_ids()
        except Exception:
            logger.exception("cannot list the projects of the state store; models load on first use")
            return
        for project_id in project_ids:
            try:
                self.served_model(project_id, None)
            except Exception:
                logger.exception("project %s: cannot load its current model", project_id)

    def versions(self, project_id: int | None) -> list[str]:
        if project_id is not None:
            return self.state(project_id).list_versions()
        found: set[str] = set()
        for known in self.state_store.project_ids():
            found.update(self.state(known).list_versions())
        return sorted(found, key=lambda v: (version_number(v) or 0, v))


def _checkpoint_kind(directory: Path) -> str | None:
    """The ``kind`` a checkpoint's metadata names; None for the fine-grained classifier's, which names none."""
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    kind = metadata.get("kind") if isinstance(metadata, dict) else None
    return kind if isinstance(kind, str) else None


def _read_parent_map(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"PARENT_MAP_FILE {path}: cannot read a JSON parent map: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"PARENT_MAP_FILE {path}: expected a JSON object {{fine: coarse}}")
    return {str(k): str(v) for k, v in data.items()}
