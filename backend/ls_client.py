"""Every call to Label Studio, through label-studio-sdk."""

from __future__ import annotations

import base64
import ipaddress
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

from label_studio_sdk import LabelStudio
from label_studio_sdk.types import PredictionRequest

from backend.fetch import (
    FetchRefused,
    HttpURL,
    ImageFetcher,
    ImageFetchError,
    address_kind,
    authorization_header,
    parse_http_url,
    system_resolver,
)

logger = logging.getLogger(__name__)

TASK_PAGE_SIZE = 500
TASK_FIELDS_READ = ("id", "data", "annotations")
"""What the backend reads of a listed task; the other fields are dropped page by page."""
TASK_COUNTS_READ = ("total_annotations", "cancelled_annotations")
"""What the backend reads of a task listed without its annotations, beside its id and data."""
TASK_ONLY_FIELDS_READ = ("id", "data", *TASK_COUNTS_READ)
"""What the backend reads of a task listed without its annotations (and asks Label Studio for, ``include``)."""
# One import/predictions request per project is the fast way (section 5 of the protocol notes); give it time.
PUSH_TIMEOUT_SECONDS = 600.0
DEFAULT_DOWNLOAD_TIMEOUT_SECONDS = 30.0
_LOOPBACK_NAMES = {"localhost"}
_CLOUD_PREFIXES = ("s3://", "gs://", "azure-blob://")

__all__ = ["ImageFetchError", "LabelStudioAPI", "LabelStudioClient", "LabelStudioClientFactory", "LabelStudioError",
           "attach_annotations", "check_image_url", "image_request"]


class LabelStudioError(RuntimeError):
    """A Label Studio call failed; the message says which call and why."""


class LabelStudioAPI(Protocol):
    """What the service needs from Label Studio (a fake implements it in tests)."""

    def fetch_tasks(self, project_id: int) -> list[dict[str, Any]]: ...

    def task_pages(self, project_id: int, annotations: bool = True) -> Iterator[list[dict[str, Any]]]: ...

    def fetch_annotated_tasks(self, project_id: int) -> list[dict[str, Any]]: ...

    def get_project(self, project_id: int) -> dict[str, Any]: ...

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int: ...

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int]) -> None: ...

    def prediction_versions(self, task_id: int) -> set[str]: ...

    def set_model_version(self, project_id: int, model_version: str) -> None: ...

    def delete_model_version(self, project_id: int, model_version: str) -> None: ...

    def download_image(self, url: str, task_id: int | None = None) -> bytes: ...


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_origin(url: HttpURL, base: HttpURL) -> bool:
    """Same scheme, port and host; ``localhost`` and loopback addresses count as one host."""
    if url.scheme != base.scheme or url.port != base.port:
        return False
    return url.host == base.host or (_is_loopback(url.host) and _is_loopback(base.host))


def image_request(url: Any, base_url: str | HttpURL) -> tuple[HttpURL, bool]:
    """Where to GET a task's image: (URL on the Label Studio origin, whether it is a cloud presign request).

    Label Studio-relative URLs and absolute URLs on its origin (any loopback spelling of a loopback host) are
    fetched from ``base_url`` itself, so the connection and the token always go to the Label Studio host.
    Cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) go through Label Studio's presign endpoint. Anything
    else is refused before a connection is made. The one URL parser is ``backend.fetch.parse_http_url``."""
    base = base_url if isinstance(base_url, HttpURL) else parse_http_url(base_url)
    if not isinstance(url, str) or not url.strip():
        raise FetchRefused(f"the task's image URL is missing or not a string: {str(url)[:80]!r}")
    url = url.strip()
    if url.startswith(_CLOUD_PREFIXES):
        return base, True
    if url.startswith("upload/"):
        url = "/data/" + url
    if url.startswith("/") and not url.startswith("//"):
        return base.with_target(url), False
    if "://" not in url[:20]:
        raise FetchRefused(f"unsupported image URL {url[:80]!r}: expected a Label Studio URL")
    parsed = parse_http_url(url)
    if not _same_origin(parsed, base):
        raise FetchRefused(f"image URL {url[:80]!r} is not on the Label Studio host {base.host_header}")
    return base.with_target(parsed.target), False


def check_image_url(url: Any, hostname: str) -> str:
    """Accept Label Studio-relative URLs, cloud storage URIs and absolute URLs on Label Studio's own origin;
    return the URL unchanged. Anything else raises ImageFetchError (see ``image_request``)."""
    image_request(url, hostname)
    return url.strip()


LOCAL_FILES_PATH = "/data/local-files"
UPLOADS_PREFIX = "/data/upload/"


@dataclass(frozen=True)
class MountedFiles:
    """Label Studio's file folders as mounted on this host, read instead of downloading their files through
    Label Studio (whose Django view spent 16-19 ms of CPU per image in bench/scale.py's runs).

    ``local_files_root``: its LOCAL_FILES_DOCUMENT_ROOT, which serves ``/data/local-files/?d=<path>``.
    ``uploads_root``: its ``MEDIA_ROOT/upload`` folder (``<BASE_DATA_DIR>/media/upload``), which serves the files
    imported through its UI or API, ``/data/upload/<project>/<file>``. Both are resolved on construction."""

    local_files_root: Path | None = None
    uploads_root: Path | None = None

    def __post_init__(self) -> None:
        for name in ("local_files_root", "uploads_root"):
            folder = getattr(self, name)
            if folder is not None:
                object.__setattr__(self, name, Path(folder).resolve())

    def read(self, target: str, max_bytes: int) -> bytes | None:
        """The file a Label Studio request target names, read from its mounted folder; None when the target is
        neither kind, its folder is not mounted or the file is not on this host (then it is downloaded from Label
        Studio). A path that leads outside its folder, through ``..`` or a link, is refused; so is a file over
        ``max_bytes``."""
        parts = urlsplit(target)
        if parts.path.rstrip("/") == LOCAL_FILES_PATH and self.local_files_root is not None:
            relative = parse_qs(parts.query).get("d", [""])[0]
            return _read_inside(self.local_files_root, relative, "LOCAL_FILES_DOCUMENT_ROOT", max_bytes)
        if parts.path.startswith(UPLOADS_PREFIX) and self.uploads_root is not None:
            # Label Studio's route matches the percent-decoded path, as here.
            relative = unquote(parts.path[len(UPLOADS_PREFIX):])
            return _read_inside(self.uploads_root, relative, "UPLOADED_FILES_ROOT", max_bytes)
        return None


def _read_inside(root: Path, relative: str, setting: str, max_bytes: int) -> bytes | None:
    if not relative.strip("/"):
        return None
    try:
        path = (root / relative.lstrip("/")).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a link loop
        raise FetchRefused(f"local file {relative[:80]!r}: {exc}") from None
    if not path.is_relative_to(root):
        raise FetchRefused(f"local file {relative[:80]!r} is outside {setting}")
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageFetchError(f"local file {relative[:80]!r} is larger than MAX_IMAGE_BYTES ({max_bytes} bytes)")
    return data


class LabelStudioClient:
    """One Label Studio server and API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        download_root: Path,
        max_image_bytes: int,
        timeout_seconds: float = 60.0,
        sdk_client: LabelStudio | None = None,
        download_timeout_seconds: float = DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        mounted: MountedFiles = MountedFiles(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._mounted = mounted
        self._base = parse_http_url(self.base_url)
        self._sdk = sdk_client or LabelStudio(base_url=self.base_url, api_key=api_key, timeout=timeout_seconds)
        self._download_root = Path(download_root)  # unused: images are streamed into memory, never to disk
        self._max_image_bytes = int(max_image_bytes)
        self._fetcher = ImageFetcher(
            self._base,
            lambda: authorization_header(self._download_token()),
            max_bytes=self._max_image_bytes,
            timeout_seconds=download_timeout_seconds,
        )

    @property
    def _http(self):
        return self._sdk._client_wrapper.httpx_client

    def _download_token(self) -> str:
        # A personal access token is a JWT refresh token; the SDK keeps the matching access token, which is what
        # the file views accept. Legacy keys pass through unchanged.
        return self._sdk._client_wrapper._tokens_client.api_key

    def fetch_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks of the project with their annotations (only ``TASK_FIELDS_READ`` of each)."""
        return [task for page in self.task_pages(project_id) for task in page]

    def task_pages(self, project_id: int, annotations: bool = True) -> Iterator[list[dict[str, Any]]]:
        """The project's tasks with their annotations, a page of TASK_PAGE_SIZE at a time, each page requested
        when the one before has been consumed (only ``TASK_FIELDS_READ`` of each task).

        ``annotations=False``: Label Studio's ``task_only`` listing, each task with its annotation counts
        (``TASK_COUNTS_READ``) instead of its annotations. Label Studio then serialises no annotations and no
        predictions: 16.9 s against 26.9 s for 10k tasks in the measured protocol notes (shared/), with the
        predictions of several versions stored.

        That listing names the fields read (``include``, Label Studio's sparse fields): its task serializer's ~30
        other fields cost it most of a listing's CPU, which it takes from the cores the index embeds on (2,000
        tasks: 0.94 s of its CPU against 3.01 s, in bench/results/task_listing.json). A Label Studio without that
        parameter sends every field, and the fields not read are dropped here. The listing with annotations names
        none: Label Studio 1.23.2 then cuts each nested annotation down to its id, whatever ``include`` says of
        the annotations' own fields."""
        fields, kept = ("all", TASK_FIELDS_READ) if annotations else ("task_only", TASK_ONLY_FIELDS_READ)
        sparse = {} if annotations else {"include": ",".join(kept)}
        listed = 0
        page = 1
        while True:
            response = self._http.request(
                "api/tasks/",
                method="GET",
                params={"project": int(project_id), "fields": fields, **sparse, "page": page,
                        "page_size": TASK_PAGE_SIZE},
            )
            if response.status_code == 404 and page > 1:
                return  # past the last page
            _raise_for_status(response, f"GET /api/tasks?project={project_id}&page={page}")
            body = response.json()
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            # Without ``include`` Label Studio sends ~30 fields per task (drafts, predictions, timestamps, …); the
            # backend reads a few, and a listing of a large project is held while it is indexed.
            tasks = [{k: task[k] for k in kept if k in task} if isinstance(task, dict) else task for task in batch]
            listed += len(tasks)
            if tasks:
                yield tasks
            total = body.get("total") if isinstance(body, dict) else None
            if not batch or (total is not None and listed >= int(total)) or len(batch) < TASK_PAGE_SIZE:
                return
            page += 1

    def fetch_annotated_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Only the tasks that have annotations, with them (Label Studio's JSON export without unlabeled tasks):
        what a fit reads, at a cost that grows with the annotations, not with the project."""
        response = self._http.request(
            f"api/projects/{int(project_id)}/export",
            method="GET",
            params={"exportType": "JSON", "download_all_tasks": "false"},
            request_options={"timeout": PUSH_TIMEOUT_SECONDS},
        )
        if response.status_code == 404:
            # A Label Studio (or a stand-in) without the export view: the slow way, every task listed.
            logger.warning("project %s: no export endpoint in this Label Studio; listing every task to find the "
                           "annotated ones", project_id)
            return [task for task in self.fetch_tasks(project_id) if task.get("annotations")]
        _raise_for_status(response, f"GET /api/projects/{project_id}/export")
        body = response.json()
        if not isinstance(body, list):
            raise LabelStudioError(f"GET /api/projects/{project_id}/export: expected a list of tasks")
        return [task for task in body if isinstance(task, dict)]

    def get_project(self, project_id: int) -> dict[str, Any]:
        response = self._http.request(f"api/projects/{int(project_id)}/", method="GET")
        _raise_for_status(response, f"GET /api/projects/{project_id}")
        return response.json()

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Send every prediction in ONE request; return how many Label Studio created (logged if short)."""
        if not predictions:
            return 0
        request = [PredictionRequest(**dict(p)) for p in predictions]
        try:
            result = self._sdk.projects.import_predictions(
                id=int(project_id), request=request, request_options={"timeout": PUSH_TIMEOUT_SECONDS}
            )
        except Exception as exc:
            raise LabelStudioError(f"import/predictions for project {project_id} failed: {exc}") from exc
        created = int(result.created or 0)
        if created != len(predictions):
            logger.error(
                "project %s: Label Studio created %d of %d predictions (labels missing from the config are "
                "dropped silently)",
                project_id,
                created,
                len(predictions),
            )
        return created

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int]) -> None:
        """Label Studio's Data Manager action "Retrieve predictions" on these tasks: it asks the project's ML backend
        (this one) for them in one /predict and saves each prediction. Each save recounts its own task only, where
        an import/predictions request on a default install recounts every task of the project (bench/push_paths.py:
        50 tasks in 1.6 s at 2k and at 20k tasks, against 24 s for an import of 500 at 20k)."""
        from label_studio_sdk.actions.types import PrepareParamsRequestRequestSelectedItemsIncluded

        try:
            self._sdk.actions.create(
                id="retrieve_tasks_predictions", project=int(project_id),
                selected_items=PrepareParamsRequestRequestSelectedItemsIncluded(
                    all_=False, included=[int(task_id) for task_id in task_ids]),
                request_options={"timeout": PUSH_TIMEOUT_SECONDS},
            )
        except Exception as exc:
            raise LabelStudioError(f"retrieve_tasks_predictions for project {project_id} failed: {exc}") from exc

    def prediction_versions(self, task_id: int) -> set[str]:
        """The model versions of a task's predictions."""
        try:
            predictions = self._sdk.predictions.list(task=int(task_id))
        except Exception as exc:
            raise LabelStudioError(f"GET predictions of task {task_id} failed: {exc}") from exc
        return {str(p.model_version) for p in predictions if p.model_version is not None}

    def set_model_version(self, project_id: int, model_version: str) -> None:
        try:
            self._sdk.projects.update(id=int(project_id), model_version=model_version)
        except Exception as exc:
            raise LabelStudioError(f"PATCH project {project_id} model_version={model_version}: {exc}") from exc

    def delete_model_version(self, project_id: int, model_version: str) -> None:
        response = self._http.request(
            f"api/projects/{int(project_id)}/model-versions/",
            method="DELETE",
            json={"model_version": model_version},
            request_options={"timeout": PUSH_TIMEOUT_SECONDS},
        )
        _raise_for_status(response, f"DELETE model version {model_version} of project {project_id}")

    def ensure_webhook_headers(self, project_id: int, backend_host: str, headers: Mapping[str, str]) -> int:
        """Give this backend's project webhooks (``http(s)://<backend_host>/.../webhook``) the ``headers``.

        Label Studio creates that webhook with empty headers, even for a backend connected with basic auth, so
        with BASIC_AUTH_* set every annotation webhook would get 401. Returns how many webhooks were changed."""
        response = self._http.request("api/webhooks/", method="GET", params={"project": int(project_id)})
        _raise_for_status(response, f"GET /api/webhooks?project={project_id}")
        changed = 0
        body = response.json()
        for hook in body if isinstance(body, list) else []:
            url = hook.get("url") if isinstance(hook, dict) else None
            if not isinstance(url, str):
                continue
            try:
                parsed = parse_http_url(url)
            except ImageFetchError:
                continue
            if parsed.host_header.lower() != backend_host.lower() and f"{parsed.host_literal}:{parsed.port}" != \
                    backend_host.lower():
                continue
            if not parsed.target.split("?", 1)[0].rstrip("/").endswith("/webhook"):
                continue
            current = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
            if all(current.get(k) == v for k, v in headers.items()):
                continue
            patch = self._http.request(f"api/webhooks/{int(hook['id'])}/", method="PATCH",
                                       json={"headers": {**current, **headers}})
            _raise_for_status(patch, f"PATCH /api/webhooks/{hook['id']}")
            changed += 1
        return changed

    def download_image(self, url: str, task_id: int | None = None) -> bytes:
        """Stream the image into memory with the project's own fetcher (backend.fetch): Label Studio origin only,
        no redirects (cloud presign hops re-checked, without credentials), one deadline, a streaming byte cap."""
        target, cloud = image_request(url, self._base)
        if not cloud:
            local = self._mounted.read(target.target, self._max_image_bytes)
            if local is not None:
                return local
        if cloud:
            if task_id is None:
                raise ImageFetchError(f"cloud URI {url[:80]!r} needs a task id for Label Studio's presign endpoint")
            fileuri = base64.urlsafe_b64encode(url.strip().encode()).decode()
            target = self._base.with_target(f"/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}")
        logger.debug("downloading image of task %s", task_id)
        return self._fetcher.fetch(target, external_redirects=cloud)


def attach_annotations(client: LabelStudioAPI, project_id: int, tasks: list[dict[str, Any]]) -> None:
    """Give tasks listed without annotations (with their counts) their annotations, from Label Studio's export of
    the annotated tasks only, whose cost grows with the annotations, not with the project. A task whose listing
    says nothing of its annotations counts as possibly annotated."""

    def maybe_annotated(task: Mapping[str, Any]) -> bool:
        if task.get("annotations"):
            return True
        counts = [task[name] for name in TASK_COUNTS_READ if name in task]
        if not counts:
            return "annotations" not in task
        return any(not isinstance(count, int) or count > 0 for count in counts)

    listed = [task for task in tasks if isinstance(task, dict)]  # anything else fails where the list is kept
    annotated = any(maybe_annotated(task) for task in listed)
    exported = client.fetch_annotated_tasks(project_id) if annotated else []
    annotations = {task.get("id"): task.get("annotations") or [] for task in exported if isinstance(task, dict)}
    for task in listed:
        for name in TASK_COUNTS_READ:
            task.pop(name, None)
        task["annotations"] = annotations.get(task.get("id"), [])


def _raise_for_status(response: Any, what: str) -> None:
    if 200 <= response.status_code < 300:
        return
    text = response.text[:300] if hasattr(response, "text") else ""
    raise LabelStudioError(f"{what}: HTTP {response.status_code} {text}")


REFUSED_LABEL_STUDIO_KINDS = frozenset({"metadata", "link-local", "unspecified", "multicast"})


def _check_label_studio_host(url: str) -> None:
    """A Label Studio address must not be a cloud metadata service or another address no Label Studio has
    (link-local, unspecified, multicast): /setup's hostname cannot turn the API client into a probe of those.
    Loopback and private addresses stay allowed: that is where a self-hosted Label Studio usually lives."""
    base = parse_http_url(url)
    for address in system_resolver(base.host, base.port):
        kind = address_kind(address)
        if kind in REFUSED_LABEL_STUDIO_KINDS:
            raise FetchRefused(f"{base.host_header} resolves to {address} ({kind}), which is never a Label Studio")


class LabelStudioClientFactory:
    """Builds (and reuses) one client per Label Studio address and key.

    Credentials stay with the host they were given for: LABEL_STUDIO_API_KEY is only ever sent to
    LABEL_STUDIO_URL (without LABEL_STUDIO_URL it is not used at all), and a /setup token only to the /setup
    hostname it came with (``MLBackend.setup`` drops a stored token when the host changes without a new one).
    LABEL_STUDIO_URL wins over the /setup hostname: the operator's address is the one that works from the
    backend's network."""

    MAX_CLIENTS = 32

    def __init__(
        self,
        download_root: Path,
        max_image_bytes: int,
        default_url: str | None = None,
        default_api_key: str | None = None,
        download_timeout_seconds: float = DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        mounted: MountedFiles = MountedFiles(),
    ) -> None:
        self._download_root = download_root
        self._mounted = mounted
        self._max_image_bytes = max_image_bytes
        self._default_url = default_url
        self._default_api_key = default_api_key if default_url else None
        self._download_timeout = download_timeout_seconds
        self._clients: OrderedDict[tuple[str, str], LabelStudioClient] = OrderedDict()
        self._lock = threading.Lock()
        if default_api_key and not default_url:
            logger.warning("LABEL_STUDIO_API_KEY is ignored without LABEL_STUDIO_URL: a key is only sent to the "
                           "host it was configured for")

    def __call__(self, hostname: str | None, access_token: str | None) -> LabelStudioAPI:
        url = self._default_url or hostname
        key = (self._default_api_key or access_token) if self._default_url else access_token
        if not url:
            raise LabelStudioError("no Label Studio address: set LABEL_STUDIO_URL or connect the backend (/setup)")
        if not key:
            raise LabelStudioError("no Label Studio API key: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or "
                                   "connect the backend (/setup with its access_token)")
        with self._lock:
            client = self._clients.get((url, key))
            if client is not None:
                self._clients.move_to_end((url, key))
                return client
        try:
            _check_label_studio_host(url)
            client = LabelStudioClient(url, key, self._download_root, self._max_image_bytes,
                                       download_timeout_seconds=self._download_timeout,
                                       mounted=self._mounted)
        except ImageFetchError as exc:
            raise LabelStudioError(f"unusable Label Studio address: {exc}") from None
        with self._lock:
            self._clients[(url, key)] = client
            while len(self._clients) > self.MAX_CLIENTS:
                self._clients.popitem(last=False)
        return client
