"""Task features: image URL -> content key -> embedding + weak coarse answer, all cached."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from backend.label_config import ProjectLabeling
from backend.ls_client import ImageFetchError, LabelStudioAPI, LabelStudioError
from backend.metrics import BackendMetrics
from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy
from model.runtime import chunks_in_flight

logger = logging.getLogger(__name__)

FEATURE_CHUNK = 64
"""Images decoded and embedded at a time, at most (bounds memory while indexing a large project)."""
FEATURE_CHUNK_MIN = 8
"""The smallest chunk of a guided split (``guided_chunks``), but for the last one."""
DOWNLOAD_THREADS = 4
"""Concurrent downloads per project: each project has its own pool, so slow images of one never block another."""
DOWNLOAD_POOLS = 64
"""Projects with a download pool at a time (least recently used pools are closed beyond it)."""
CLAIM_ATTEMPTS = 3
"""Rounds of claim, work and wait before what is still missing is left pending."""
CLAIM_WAIT_SECONDS = 300.0
"""How long a caller waits for URLs that another caller (thread or replica) claimed."""
NOT_READY = "not ready yet: the image is being downloaded and embedded in the background"
WEAK_ANNOTATOR_CACHE_SIZE = 64
STORE_READ_BATCH = 2048
"""Vectors read from the store at a time: its float32 answer is packed into float16 rows batch by batch, so a read
of a whole project never holds every vector as a float32 array of its own."""
RESIDENT_MIN_ROWS = 1024
"""A read of at least this many vectors (an index, a fit, a push: a whole project) goes through the namespace's
ResidentVectors and adds to it; smaller reads (a /predict batch) use what is kept without adding to it."""
RESIDENT_READS_KEPT = 16
"""Large reads after which a kept row that none of them asked for counts as unused (see ResidentVectors)."""


# --- component protocols (the model library implements them; tests inject small fakes) ------------------------


class Backbone(Protocol):
    name: str
    dim: int

    def embed(self, images: Sequence[Any]) -> np.ndarray: ...


class PixelBackbone(Backbone, Protocol):
    """A backbone whose preprocessing is an array step of its own (both timm runtimes): a chunk is prepared outside
    the compute slot, beside another chunk's forward pass. ``preprocess_batch`` gives the compact prepared form (the
    timm runtimes: uint8 planes, a quarter of the float32 input's bytes, so the chunks in flight hold little), and
    ``forward_pixels`` takes it."""

    image_size: int
    """The side of the square input its preprocessing resizes every image to."""

    def preprocess_batch(self, images: Sequence[Any]) -> np.ndarray: ...

    def forward_pixels(self, pixels: np.ndarray, with_logits: bool = False) -> tuple[np.ndarray, np.ndarray]: ...


class WeakAnnotator(Protocol):
    name: str
    coarse_classes: Sequence[str]
    cost_per_label: float

    def annotate(self, images: Sequence[Any]) -> Any: ...


class EmbeddingStoreLike(Protocol):
    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, np.ndarray]: ...

    def put_many(self, namespace: str, vectors: Mapping[str, np.ndarray]) -> None: ...


class ImageKeyIndexLike(Protocol):
    """(project, image URL) -> content key: backend.state.ImageKeyIndex (SQLite) or, with REDIS_URL, one every
    replica shares (backend.shared_store.RedisImageKeyIndex)."""

    def get_many(self, project_id: int, urls: Iterable[str]) -> dict[str, str]: ...

    def put_many(self, project_id: int, keys_by_url: Mapping[str, str]) -> None: ...


WeakAnnotatorFactory = Callable[[LabelHierarchy], WeakAnnotator]
"""Builds a weak annotator prompted with a project's own classes (the heavy model is loaded once, beforehand)."""


class ImageDecoder(Protocol):
    def __call__(self, data: bytes, *, at_least: int | None = None) -> Any:
        """The decoded RGB image; ``at_least``: the smallest side the caller needs (model.images.decode_image)."""


@dataclass(frozen=True)
class ImageCodec:
    """Turns downloaded bytes into a content key and a decoded RGB image (model.images / embedding_store)."""

    content_key: Callable[[bytes], str]
    decode: ImageDecoder


def weak_namespace(annotator: WeakAnnotator) -> str:
    """Store namespace of an annotator's answers; it names the class set, so answers for two sets never mix."""
    classes_digest = hashlib.sha256(json.dumps(list(annotator.coarse_classes)).encode()).hexdigest()[:8]
    return f"weak:{annotator.name}:classes-{classes_digest}"


def weak_in_project_order(
    probabilities: np.ndarray, weak_classes: Sequence[str] | None, hierarchy: LabelHierarchy
) -> np.ndarray:
    """Reorder weak probability columns (annotator class order) into the project's coarse order by name.

    Classes the project lacks are dropped and rows renormalised; a row left at zero means no answer."""
    n = probabilities.shape[0]
    out = np.zeros((n, hierarchy.n_coarse), dtype=np.float32)
    if weak_classes is None or n == 0:
        return out
    for column, name in enumerate(weak_classes):
        if name in hierarchy.coarse_classes:
            out[:, hierarchy.coarse_index(name)] = probabilities[:, column]
    totals = out.sum(axis=1, keepdims=True)
    np.divide(out, totals, out=out, where=totals > 0)
    return out


class PackedVectors(Mapping[str, np.ndarray]):
    """Vectors by content key as rows of one float16 matrix: the store's own precision, no Python object per vector.

    A read gives the row as float32 (the values the store gives back, bit for bit). A 1,280-d embedding costs 2.5 KB
    here, against 5.2 KB as a float32 array of its own in a dict.

    Rows are only ever added, each written before its key is published, so readers in other threads need no lock:
    a grown matrix is filled before it replaces the old one. ``select`` gives some keys as a PackedVectors that reads
    this matrix (no copy) and adds the vectors it is given here."""

    def __init__(self, capacity: int = 0) -> None:
        self._rows: dict[str, int] = {}
        self._capacity = max(int(capacity), 1)
        self._matrix: np.ndarray | None = None
        self._source: PackedVectors | None = None
        """The PackedVectors whose matrix a selection reads; None when this one owns its matrix."""
        self._lock = threading.Lock()

    def _array(self) -> np.ndarray | None:
        return self._source._matrix if self._source is not None else self._matrix

    def __getitem__(self, key: str) -> np.ndarray:
        return self._array()[self._rows[key]].astype(np.float32)  # type: ignore[index]

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def update(self, vectors: Mapping[str, np.ndarray]) -> None:
        if self._source is not None:
            self._source.update(vectors)
            for key in vectors:
                self._rows[key] = self._source._rows[key]
            return
        with self._lock:
            for key, vector in vectors.items():
                row = self._rows.get(key)
                if row is None:
                    row = len(self._rows)
                    self._reserve(row + 1, np.shape(vector))
                self._matrix[row] = vector  # type: ignore[index]
                self._rows[key] = row  # published after its row is written

    def _reserve(self, n_rows: int, shape: tuple[int, ...]) -> None:
        if self._matrix is None:
            self._matrix = np.empty((max(self._capacity, n_rows), *shape), dtype=np.float16)
        elif n_rows > self._matrix.shape[0]:
            # 1.5x: amortised appends with at most half a matrix of slack (a whole one at 2x is 128 MB at 100k)
            grown = np.empty((max(self._matrix.shape[0] * 3 // 2, n_rows), *self._matrix.shape[1:]),
                             dtype=np.float16)
            grown[: len(self._rows)] = self._matrix[: len(self._rows)]
            self._matrix = grown

    def select(self, keys: Iterable[str]) -> PackedVectors:
        """The vectors of ``keys`` (each held here), in that order, reading this matrix: no copy."""
        owner = self._source or self
        selection = PackedVectors()
        selection._source = owner
        selection._rows = {key: self._rows[key] for key in keys}
        return selection

    def row_indices(self, keys: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._rows[k] for k in keys), dtype=np.int64, count=len(keys))

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """float32 rows of ``keys`` in that order, converted block by block (no float16 copy of them all first)."""
        matrix = self._array()
        dim = matrix.shape[1:] if matrix is not None else (0,)
        out = np.empty((len(keys), *dim), dtype=np.float32)
        index = self.row_indices(keys)
        for start in range(0, len(keys), STORE_READ_BATCH):
            block = index[start : start + STORE_READ_BATCH]
            out[start : start + len(block)] = matrix[block]  # type: ignore[index]
        return out

    def half_row(self, key: str) -> np.ndarray:
        return self._array()[self._rows[key]]  # type: ignore[index]

    def half_rows(self, keys: Sequence[str]) -> np.ndarray:
        """float16 rows of ``keys`` in that order: a view of the matrix when they are its first rows in order (a
        fit's whole project), else a float16 copy; half a float32 copy either way."""
        index = self.row_indices(keys)
        matrix = self._array()
        if matrix is None:
            return np.empty((0, 0), dtype=np.float16)
        if np.array_equal(index, np.arange(index.size)):
            return matrix[: index.size]
        return matrix[index]

    def nbytes(self) -> int:
        """Bytes of the matrix held, slack included (what a caller keeps alive by keeping these vectors)."""
        matrix = self._array()
        return 0 if matrix is None else int(matrix.nbytes)


class ResidentVectors:
    """One store namespace's vectors kept in memory between large reads (a fit, an index, a push: RESIDENT_MIN_ROWS
    or more), so the next read takes only new keys from the store (at 100k tasks a full read takes about 6 s) and
    concurrent reads of a project share one matrix instead of holding a copy each.

    Content keys name immutable vectors, so a kept row is never stale. Rows that no large read asked for in the last
    RESIDENT_READS_KEPT reads (deleted tasks, a project gone) are dropped when they are half the rows."""

    def __init__(self, capacity: int) -> None:
        self.vectors = PackedVectors(capacity)
        self._last_read = np.zeros(0, dtype=np.int64)
        self._reads = 0

    def read(self, keys: Sequence[str], load: Callable[[Sequence[str]], Mapping[str, np.ndarray]]) -> PackedVectors:
        """The vectors of ``keys`` that this or the store (``load``, a batch at a time) holds, in that order."""
        missing = [key for key in keys if key not in self.vectors]
        for start in range(0, len(missing), STORE_READ_BATCH):
            batch = missing[start : start + STORE_READ_BATCH]
            found = load(batch)
            self.vectors.update({key: found[key] for key in batch if key in found})  # rows in the order asked
        held = [key for key in keys if key in self.vectors]
        self._reads += 1
        self._stamps()[self.vectors.row_indices(held)] = self._reads
        return self.vectors.select(held)

    def _stamps(self) -> np.ndarray:
        """Per row, the read that last asked for it; a row added since (a computed vector) counts as read now."""
        n_rows = len(self.vectors)
        if self._last_read.size < n_rows:
            self._last_read = np.concatenate(
                [self._last_read, np.full(n_rows - self._last_read.size, self._reads, dtype=np.int64)])
        return self._last_read[:n_rows]

    def _live(self) -> np.ndarray:
        return self._stamps() > self._reads - RESIDENT_READS_KEPT

    def unread_rows(self) -> int:
        return int(np.count_nonzero(~self._live()))

    def compacted(self) -> ResidentVectors:
        """A copy holding only the rows read lately (selections of this one keep reading this one)."""
        with self.vectors._lock:  # a selection may be adding computed vectors meanwhile
            rows = list(self.vectors._rows.items())
        live = self._live()
        keys = [key for key, row in rows if row < live.size and live[row]]
        kept = ResidentVectors(len(keys))
        for start in range(0, len(keys), STORE_READ_BATCH):
            kept.vectors.update({key: self.vectors.half_row(key) for key in keys[start : start + STORE_READ_BATCH]})
        kept._reads = self._reads
        kept._last_read = self._stamps()[self.vectors.row_indices(keys)]
        return kept


@dataclass
class TaskFeatures:
    """Per task position: content key or the error that made the task unusable."""

    keys: list[str | None]
    errors: dict[int, str]
    embeddings: Mapping[str, np.ndarray]
    """By content key: a PackedVectors from the extractor."""
    weak_probabilities: Mapping[str, np.ndarray]
    """In the weak annotator's own class order."""
    weak_classes: tuple[str, ...] | None = None
    """The weak annotator's class order; None without a weak annotator."""
    pending: set[int] = field(default_factory=set)
    """Positions not computed yet (``features(fetch=False)``); also listed in ``errors`` with NOT_READY."""
    downloaded: int = 0
    """Images this call downloaded."""
    embedded: int = 0
    """Embeddings this call computed (the rest came from the cache or another process's work)."""

    def usable_positions(self) -> list[int]:
        return [i for i, key in enumerate(self.keys) if key is not None]

    def embedding_matrix(self, positions: Sequence[int]) -> np.ndarray:
        return _rows_of(self.embeddings, [self.keys[i] for i in positions])  # type: ignore[misc]

    def pool_embeddings(self, positions: Sequence[int]) -> np.ndarray:
        """The rows a fit trains and ranks on: float16 from the packed matrix (model/ converts them in chunks)."""
        keys = [self.keys[i] for i in positions]
        if isinstance(self.embeddings, PackedVectors):
            return self.embeddings.half_rows(keys)  # type: ignore[arg-type]
        return _rows_of(self.embeddings, keys)  # type: ignore[arg-type]

    def weak_matrix(self, positions: Sequence[int], hierarchy: LabelHierarchy) -> np.ndarray:
        """Weak probabilities of the tasks at ``positions`` in the project's coarse order (zero rows: no answer)."""
        if self.weak_classes is None or not positions:
            return np.zeros((len(positions), hierarchy.n_coarse), dtype=np.float32)
        raw = _rows_of(self.weak_probabilities, [self.keys[i] for i in positions])  # type: ignore[misc]
        return weak_in_project_order(raw, self.weak_classes, hierarchy)

    def subset(self, positions: Sequence[int]) -> TaskFeatures:
        """The features of the tasks at ``positions``, in that order (errors dropped: only usable tasks are taken)."""
        return TaskFeatures(
            keys=[self.keys[i] for i in positions],
            errors={},
            embeddings=self.embeddings,
            weak_probabilities=self.weak_probabilities,
            weak_classes=self.weak_classes,
        )


def _rows_of(vectors: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    if isinstance(vectors, PackedVectors):
        return vectors.rows(keys)
    return np.stack([vectors[k] for k in keys]).astype(np.float32)


class WeakAnnotators:
    """The weak annotator of each project: one fixed annotator (its classes matched by name), or one built per
    hierarchy by a factory and cached, so each project is prompted with its own class names."""

    def __init__(self, fixed: WeakAnnotator | None = None, factory: WeakAnnotatorFactory | None = None) -> None:
        if fixed is not None and factory is not None:
            raise ValueError("give a fixed weak annotator or a weak annotator factory, not both")
        self.fixed = fixed
        self.factory = factory
        self._built: OrderedDict[LabelHierarchy, WeakAnnotator] = OrderedDict()
        self._lock = threading.Lock()

    def for_hierarchy(self, hierarchy: LabelHierarchy) -> WeakAnnotator | None:
        if self.factory is None:
            return self.fixed
        with self._lock:
            annotator = self._built.get(hierarchy)
            if annotator is not None:
                self._built.move_to_end(hierarchy)
                return annotator
        annotator = self.factory(hierarchy)
        with self._lock:
            self._built[hierarchy] = annotator
            while len(self._built) > WEAK_ANNOTATOR_CACHE_SIZE:
                self._built.popitem(last=False)
        return annotator

    def describe(self) -> str | None:
        """For /health: the fixed annotator's name, or what the factory builds."""
        if self.fixed is not None:
            return self.fixed.name
        if self.factory is not None:
            return getattr(self.factory, "description", "per-project")
        return None


class ProjectDownloadPools:
    """One small download pool per project (least recently used pools closed beyond ``max_pools``).

    Every download has its own deadline (backend.fetch), so a project's pool is busy for a bounded time, and a
    project whose images are slow only ever waits on its own pool."""

    def __init__(self, threads_per_project: int, max_pools: int) -> None:
        self.threads_per_project = threads_per_project
        self.max_pools = max_pools
        self._pools: OrderedDict[int, ThreadPoolExecutor] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, project_id: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Submit under the lock, so a pool closed by the LRU between lookup and submit is never used."""
        with self._lock:
            pool = self._pools.get(project_id)
            if pool is None:
                pool = ThreadPoolExecutor(self.threads_per_project, thread_name_prefix=f"vlm-al-download-{project_id}")
                self._pools[project_id] = pool
            self._pools.move_to_end(project_id)
            future = pool.submit(fn, *args)
            while len(self._pools) > self.max_pools:
                _, old = self._pools.popitem(last=False)
                old.shutdown(wait=False)  # its queued and running downloads still finish (each has a deadline)
            return future

    def map(self, project_id: int, fn: Callable[[int], Any], items: Sequence[int]) -> Any:
        futures = [self.submit(project_id, fn, item) for item in items]
        return (future.result() for future in futures)


class InflightClaims(Protocol):
    """Who is downloading and embedding which task image right now (per project and URL)."""

    def claim(self, project_id: int, urls: Sequence[str]) -> set[str]:
        """Claim the URLs nobody holds; returns those this caller now holds."""

    def release(self, project_id: int, urls: Iterable[str]) -> None: ...

    def wait(self, project_id: int, urls: Sequence[str], timeout: float) -> None:
        """Until none of ``urls`` is held by anyone (done or given up), or ``timeout``."""


class LocalInflightClaims:
    """Claims among the threads of this process (/predict and the index job); RQ replicas share theirs through
    Redis (backend.rq_jobs.RedisInflightClaims)."""

    def __init__(self) -> None:
        self._held: set[tuple[int, str]] = set()
        self._cond = threading.Condition()

    def claim(self, project_id: int, urls: Sequence[str]) -> set[str]:
        with self._cond:
            mine = {u for u in urls if (project_id, u) not in self._held}
            self._held.update((project_id, u) for u in mine)
            return mine

    def release(self, project_id: int, urls: Iterable[str]) -> None:
        with self._cond:
            self._held.difference_update((project_id, u) for u in urls)
            self._cond.notify_all()

    def wait(self, project_id: int, urls: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while any((project_id, u) in self._held for u in urls):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)


def guided_chunks(n: int, largest: int, parallel: int) -> list[tuple[int, int]]:
    """(start, end) of the chunks ``n`` items are worked in: each the share of what is left that one of ``parallel``
    forward passes takes (guided scheduling), between FEATURE_CHUNK_MIN and ``largest`` images. The chunks shrink
    towards the end, so a pass that ends early waits for a few images, not for a whole chunk: with equal chunks of
    64, the last chunk of an index often ran alone, one core idle for most of a second."""
    smallest = min(FEATURE_CHUNK_MIN, largest)
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < n:
        size = min(largest, max(smallest, -(-(n - start) // max(1, parallel))))
        bounds.append((start, min(n, start + size)))
        start += size
    return bounds


def _task_url(task: Mapping[str, Any], labeling: ProjectLabeling) -> str | None:
    data = task.get("data") if isinstance(task, Mapping) else None
    url = data.get(labeling.image_value_key) if isinstance(data, Mapping) else None
    return url.strip() if isinstance(url, str) and url.strip() else None


class FeatureExtractor:
    """Embeddings and weak answers of tasks' images: cache first, download and compute what is missing."""

    def __init__(
        self,
        *,
        backbone: Backbone,
        weak_annotators: WeakAnnotators,
        embedding_store: EmbeddingStoreLike,
        image_codec: ImageCodec,
        image_index: ImageKeyIndexLike,
        metrics: BackendMetrics,
        client_for: Callable[[int], LabelStudioAPI],
        claims: InflightClaims | None = None,
    ) -> None:
        self.backbone = backbone
        self.weak_annotators = weak_annotators
        self.store = embedding_store
        self.codec = image_codec
        self.image_index = image_index
        self.metrics = metrics
        self._client_for = client_for
        self._downloads = ProjectDownloadPools(DOWNLOAD_THREADS, DOWNLOAD_POOLS)
        self.claims = claims or LocalInflightClaims()
        runs = max(1, int(getattr(backbone, "concurrent_runs", 1)))
        self._compute_slot = threading.Semaphore(runs)
        """Forward passes at once in this process: as many as the backbone wants (``concurrent_runs``: an ONNX
        Runtime session on a CPU runs one thread per run, one run per core), one for a backbone whose single run
        uses every core it is given (a second would only double its working memory)."""
        self._chunks_in_flight = chunks_in_flight(backbone)
        """Chunks worked on at once by one features() call (``model.runtime.chunks_in_flight``): on a CPU one more
        than the forward passes, so a chunk is always downloading, decoding and preprocessing while the others run;
        on a GPU one per core, since the cores only prepare chunks for it."""
        self._resident: dict[str, ResidentVectors] = {}
        """Per store namespace, the vectors of the large reads (see ResidentVectors)."""
        self._resident_lock = threading.Lock()
        """One large read at a time: a fit and a push that read together read the store once, into one matrix."""

    def features(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        labeling: ProjectLabeling,
        client: LabelStudioAPI | None = None,
        fetch: bool = True,
    ) -> TaskFeatures:
        """Embeddings and weak answers of the tasks' images: cache first, download and compute what is missing.

        ``fetch=False`` answers from the caches only; the other tasks are listed in ``pending``. Missing work is
        done in chunks of at most FEATURE_CHUNK images that shrink towards the end (``guided_chunks``), as many in
        flight as ``chunks_in_flight`` says (on a CPU one more than the backbone's concurrent forward passes, so one
        is downloaded, decoded and preprocessed while the others run; on a GPU one per core), each chunk's image
        bytes freed when it is done. Each chunk's image URLs are claimed
        first (``claims``: this process, or every replica through Redis): a URL another caller is working on is
        waited for and read from the cache, never downloaded or embedded twice."""
        started = time.monotonic()
        result = self._pass(project_id, tasks, labeling, client, fetch=False)
        if not fetch or not result.pending:
            if result.errors and not result.pending:  # a pass that leaves work pending is counted when it is done
                self.metrics.image_errors.inc(len(result.errors))
            return result
        own_errors: dict[int, str] = {}
        downloaded = embedded = 0
        for _attempt in range(CLAIM_ATTEMPTS):
            work = sorted(result.pending)
            # guided by the chunks worked on while one more is prepared: the forward passes on a CPU
            chunks = [work[a:b] for a, b in guided_chunks(len(work), FEATURE_CHUNK, self._chunks_in_flight - 1)]
            waiting: list[str] = []
            # Each call has its own threads: /predict never queues behind an index job's chunks.
            with ThreadPoolExecutor(min(self._chunks_in_flight, len(chunks)),
                                    thread_name_prefix="vlm-al-chunk") as pipeline:
                done = list(pipeline.map(lambda chunk: self._claimed_chunk(project_id, tasks, chunk, labeling, client),
                                         chunks))
            for errors, others, n_downloaded, n_embedded in done:
                own_errors.update(errors)
                waiting.extend(others)
                downloaded += n_downloaded
                embedded += n_embedded
            if waiting:
                self.claims.wait(project_id, waiting, CLAIM_WAIT_SECONDS)
            result = self._pass(project_id, tasks, labeling, client, fetch=False)
            for position, message in own_errors.items():
                result.pending.discard(position)
                result.keys[position] = None
                result.errors[position] = message
            if not result.pending:
                break
        result.downloaded, result.embedded = downloaded, embedded
        failed = len([i for i in result.errors if i not in result.pending])
        self.metrics.image_errors.inc(failed)
        logger.info("project %s: features of %d tasks in %.2f s: %d downloaded, %d embeddings computed, %d failed, "
                    "%d pending%s", project_id, len(tasks), time.monotonic() - started, downloaded, embedded, failed,
                    len(result.pending),
                    f" (first failure: {result.errors[min(own_errors)]})" if own_errors else "")
        return result

    def _claimed_chunk(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        positions: Sequence[int],
        labeling: ProjectLabeling,
        client: LabelStudioAPI | None,
    ) -> tuple[dict[int, str], list[str], int, int]:
        """Claim the chunk's URLs, do the claimed ones, release them: (errors by position, URLs others hold,
        images downloaded, embeddings computed)."""
        urls = {i: _task_url(tasks[i], labeling) for i in positions}
        mine = self.claims.claim(project_id, [u for u in urls.values() if u])
        own = [i for i in positions if urls[i] in mine]
        others = sorted({u for i, u in urls.items() if u and u not in mine})
        if not own:
            return {}, others, 0, 0
        try:
            done = self._pass(project_id, [tasks[i] for i in own], labeling, client, fetch=True)
        finally:
            self.claims.release(project_id, mine)
        return ({own[j]: message for j, message in done.errors.items()}, others, done.downloaded,
                done.embedded)

    def _pass(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        labeling: ProjectLabeling,
        client: LabelStudioAPI | None = None,
        fetch: bool = True,
    ) -> TaskFeatures:
        """One pass over ``tasks`` without claims: cache first, then (``fetch``) download and compute the rest."""
        pending: set[int] = set()
        weak_annotator = self.weak_annotators.for_hierarchy(labeling.hierarchy)
        namespace = weak_namespace(weak_annotator) if weak_annotator is not None else None
        urls: list[str | None] = []
        errors: dict[int, str] = {}
        for position, task in enumerate(tasks):
            data = task.get("data") if isinstance(task, Mapping) else None
            url = data.get(labeling.image_value_key) if isinstance(data, Mapping) else None
            if not isinstance(url, str) or not url.strip():
                errors[position] = f"the task has no image URL under data.{labeling.image_value_key}"
                urls.append(None)
            else:
                urls.append(url.strip())
        known = self.image_index.get_many(project_id, [u for u in urls if u])
        keys: list[str | None] = [known.get(u) if u else None for u in urls]

        downloaded: dict[int, bytes] = {}
        n_embedded = 0
        need_download = [i for i, u in enumerate(urls) if u and keys[i] is None]
        if need_download and not fetch:
            pending.update(need_download)
            need_download = []
        if need_download:
            self._download(project_id, tasks, urls, need_download, client, downloaded, errors)
            new_keys: dict[str, str] = {}
            for i, data_bytes in downloaded.items():
                keys[i] = self.codec.content_key(data_bytes)
                new_keys[urls[i]] = keys[i]  # type: ignore[index]
            self.image_index.put_many(project_id, new_keys)

        present = list(dict.fromkeys(k for k in keys if k))  # task order: a fit's rows are then a view (half_rows)
        embeddings = self._read_packed(self.backbone.name, present)
        weak = self._read_packed(namespace, present) if namespace else PackedVectors()
        missing_positions: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key and (key not in embeddings or (namespace and key not in weak)):
                missing_positions.setdefault(key, i)
        if missing_positions and not fetch:
            pending.update(i for i, key in enumerate(keys) if key in missing_positions)
            missing_positions = {}
        if missing_positions:
            redownload = [i for i in missing_positions.values() if i not in downloaded]
            if redownload:
                self._download(project_id, tasks, urls, redownload, client, downloaded, errors)
            plan = self._compute_plan(weak_annotator)
            items = [(key, i) for key, i in missing_positions.items() if i in downloaded]
            for start in range(0, len(items), FEATURE_CHUNK):
                # Decoding and preprocessing run before the slot, beside the other chunk's forward pass.
                prepared = self._prepare(items[start : start + FEATURE_CHUNK], downloaded, errors, plan)
                if not prepared.keys:
                    continue
                with self._compute_slot:  # the backbone's forward passes at once; another chunk is prepared
                    n_embedded += self._compute(weak_annotator, namespace, plan, prepared, embeddings, weak)
        for i, key in enumerate(keys):
            if key is not None and key not in embeddings and i not in errors and i not in pending:
                failed = next((errors[j] for j, k in enumerate(keys) if k == key and j in errors), "no embedding")
                errors[i] = failed
        for i in errors:
            keys[i] = None
        for i in pending:
            keys[i] = None
            errors.setdefault(i, NOT_READY)
        for i, message in sorted(errors.items()):
            if i not in pending:
                logger.debug("project %s task %s: %s", project_id, tasks[i].get("id"), message)
        weak_classes = tuple(weak_annotator.coarse_classes) if weak_annotator is not None else None
        return TaskFeatures(
            keys=keys, errors=errors, embeddings=embeddings, weak_probabilities=weak, weak_classes=weak_classes,
            pending=pending, downloaded=len(downloaded), embedded=n_embedded,
        )

    def _read_packed(self, namespace: str, keys: Sequence[str]) -> PackedVectors:
        """The vectors of ``keys`` in that order (those the store has): a large read through the namespace's
        ResidentVectors (a selection of its matrix), a small one copied from it and the store."""
        if len(keys) >= RESIDENT_MIN_ROWS:
            with self._resident_lock:
                resident = self._resident.get(namespace)
                if resident is None:
                    resident = self._resident[namespace] = ResidentVectors(len(keys))
                elif resident.unread_rows() > max(RESIDENT_MIN_ROWS, len(resident.vectors) // 2):
                    resident = self._resident[namespace] = resident.compacted()
                return resident.read(keys, lambda batch: self.store.get_many(namespace, batch))
        kept = self._resident.get(namespace)
        resident = kept.vectors if kept is not None else PackedVectors()
        packed = PackedVectors(len(keys))
        missing = [key for key in keys if key not in resident]
        found = self.store.get_many(namespace, missing) if missing else {}
        packed.update({key: resident.half_row(key) if key in resident else found[key]
                       for key in keys if key in resident or key in found})  # rows in the order asked
        return packed

    def _download(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        urls: list[str | None],
        positions: list[int],
        client: LabelStudioAPI | None,
        downloaded: dict[int, bytes],
        errors: dict[int, str],
    ) -> None:
        try:
            client = client or self._client_for(project_id)
        except LabelStudioError as exc:
            for i in positions:
                errors[i] = str(exc)
            return

        def fetch(i: int) -> tuple[int, bytes | None, str | None]:
            try:
                return i, client.download_image(urls[i], task_id=tasks[i].get("id")), None  # type: ignore[arg-type]
            except (ImageFetchError, LabelStudioError, OSError) as exc:
                return i, None, str(exc)

        for i, data_bytes, error in self._downloads.map(project_id, fetch, positions):
            if error is not None:
                errors[i] = error
            else:
                downloaded[i] = data_bytes  # type: ignore[assignment]
                self.metrics.images_downloaded.inc()

    def _compute_plan(self, weak_annotator: WeakAnnotator | None) -> _ComputePlan:
        shares_backbone = weak_annotator is not None and getattr(weak_annotator, "backbone", None) is self.backbone
        pixels = hasattr(self.backbone, "forward_pixels")
        weak_from_logits = (
            shares_backbone
            and (pixels or hasattr(self.backbone, "embed_and_logits"))
            and hasattr(weak_annotator, "annotate_logits")
        )
        weak_from_embeddings = shares_backbone and hasattr(weak_annotator, "annotate_embeddings")
        # Decoded images are kept past preprocessing only for a weak annotator that reads images itself.
        keep_images = not pixels or (
            weak_annotator is not None and not weak_from_embeddings and not weak_from_logits
        )
        return _ComputePlan(pixels, weak_from_logits, weak_from_embeddings, keep_images)

    def _prepare(
        self,
        items: Sequence[tuple[str, int]],
        downloaded: Mapping[int, bytes],
        errors: dict[int, str],
        plan: _ComputePlan,
    ) -> _PreparedChunk:
        """Decode one chunk's downloaded images and, for a backbone with array preprocessing, preprocess them."""
        images, keys = [], []
        # Images that only feed the backbone's preprocessing are decoded at a JPEG scale that keeps twice its input
        # side: its antialiased resize then does the last step, and the embeddings stay within a cosine of about
        # 0.999 of a full decode's (tests/test_embeddings.py) for a fraction of the decoding.
        at_least = 2 * cast(PixelBackbone, self.backbone).image_size if plan.pixels and not plan.keep_images else None
        for key, i in items:
            try:
                images.append(self.codec.decode(downloaded[i], at_least=at_least))
                keys.append(key)
            except (ModelInputError, OSError, ValueError) as exc:
                errors[i] = f"unreadable image: {exc}"
        pixels = cast(PixelBackbone, self.backbone).preprocess_batch(images) if plan.pixels and images else None
        return _PreparedChunk(keys, images if plan.keep_images else [], pixels)

    def _forward(
        self, prepared: _PreparedChunk, rows: Sequence[int], with_logits: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The backbone's embeddings (and logits) of the chunk's ``rows``, from pixels when it has them."""
        self.metrics.forward_images.labels(model=self.backbone.name).inc(len(rows))
        if prepared.pixels is not None:
            pixels = prepared.pixels if len(rows) == len(prepared.pixels) else prepared.pixels[list(rows)]
            vectors, logits = cast(PixelBackbone, self.backbone).forward_pixels(pixels, with_logits=with_logits)
            return vectors, logits if with_logits else None
        images = [prepared.images[j] for j in rows]
        if with_logits:
            return self.backbone.embed_and_logits(images)  # type: ignore[attr-defined]
        return np.asarray(self.backbone.embed(images), dtype=np.float32), None

    def _compute(
        self,
        weak_annotator: WeakAnnotator | None,
        namespace: str | None,
        plan: _ComputePlan,
        prepared: _PreparedChunk,
        embeddings: PackedVectors,
        weak: PackedVectors,
    ) -> int:
        """Embed (and weakly label) one prepared chunk; returns how many embeddings it computed."""
        keys = prepared.keys
        computed = 0
        need_embedding = [j for j, key in enumerate(keys) if key not in embeddings]
        if need_embedding:
            # With a label map on the backbone's logits, one forward pass gives both.
            vectors, logits = self._forward(prepared, need_embedding, with_logits=plan.weak_from_logits)
            new = {keys[j]: np.asarray(vectors[row], np.float32) for row, j in enumerate(need_embedding)}
            self.store.put_many(self.backbone.name, new)
            embeddings.update(new)  # packed as float16, like the store: a fresh result equals the cached one
            self.metrics.embeddings_computed.inc(len(new))
            computed = len(new)
            if logits is not None:
                missing_weak = [row for row, j in enumerate(need_embedding) if keys[j] not in weak]
                if missing_weak:
                    answers = weak_annotator.annotate_logits(  # type: ignore[union-attr]
                        np.asarray(logits)[missing_weak])
                    self._store_weak(namespace, weak, {keys[need_embedding[row]]: answers.coarse_probabilities[k]
                                                       for k, row in enumerate(missing_weak)})
        if weak_annotator is None or namespace is None:
            return computed
        need_weak = [j for j, key in enumerate(keys) if key not in weak]
        if not need_weak:
            return computed
        if plan.weak_from_embeddings:
            answers = weak_annotator.annotate_embeddings(  # type: ignore[attr-defined]
                np.stack([embeddings[keys[j]] for j in need_weak]))
        elif plan.weak_from_logits:  # the embeddings were cached, the answers were not
            answers = weak_annotator.annotate_logits(  # type: ignore[attr-defined]
                self._forward(prepared, need_weak, with_logits=True)[1])
        else:
            answers = weak_annotator.annotate([prepared.images[j] for j in need_weak])
            # A local model's own pass (an API VLM is counted under its annotator's name).
            model = getattr(getattr(weak_annotator, "backbone", None), "name", weak_annotator.name)
            self.metrics.forward_images.labels(model=model).inc(len(need_weak))
        self._store_weak(namespace, weak, {keys[j]: answers.coarse_probabilities[row]
                                           for row, j in enumerate(need_weak)})
        return computed

    def _store_weak(self, namespace: str | None, weak: PackedVectors, answers: Mapping[str, Any]) -> None:
        new_weak = {key: np.asarray(probabilities, np.float32) for key, probabilities in answers.items()}
        self.store.put_many(namespace, new_weak)  # type: ignore[arg-type]
        weak.update(new_weak)
        self.metrics.weak_labels_computed.inc(len(new_weak))


@dataclass(frozen=True)
class _ComputePlan:
    """How a chunk is computed with this backbone and weak annotator."""

    pixels: bool
    """The backbone preprocesses to arrays (preprocess_batch) and runs on them (forward_pixels)."""
    weak_from_logits: bool
    """The weak annotator maps the backbone's own logits (one forward pass gives both)."""
    weak_from_embeddings: bool
    """The weak annotator reads the backbone's embeddings."""
    keep_images: bool
    """Decoded images are needed after preprocessing (a backbone without arrays, or an annotator reading images)."""


@dataclass
class _PreparedChunk:
    keys: list[str]
    images: list[Any]
    pixels: np.ndarray | None
