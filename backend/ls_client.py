"""Every call to Label Studio, through label-studio-sdk."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from label_studio_sdk import LabelStudio
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path
from label_studio_sdk.types import PredictionRequest

logger = logging.getLogger(__name__)

TASK_PAGE_SIZE = 500
# One import/predictions request per project is the fast way (section 5 of the protocol notes); give it time.
PUSH_TIMEOUT_SECONDS = 600.0
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


class LabelStudioError(RuntimeError):
    """A Label Studio call failed; the message says which call and why."""


class ImageFetchError(ValueError):
    """A task image that cannot be used: missing, foreign, too large or not downloadable."""


class LabelStudioAPI(Protocol):
    """What the service needs from Label Studio (a fake implements it in tests)."""

    def fetch_tasks(self, project_id: int) -> list[dict[str, Any]]: ...

    def get_project(self, project_id: int) -> dict[str, Any]: ...

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int: ...

    def set_model_version(self, project_id: int, model_version: str) -> None: ...

    def delete_model_version(self, project_id: int, model_version: str) -> None: ...

    def download_image(self, url: str, task_id: int | None = None) -> bytes: ...


def _same_origin(url: str, base: str) -> bool:
    a, b = urlparse(url), urlparse(base)
    if a.scheme != b.scheme or (a.port or _default_port(a.scheme)) != (b.port or _default_port(b.scheme)):
        return False
    host_a, host_b = (a.hostname or "").lower(), (b.hostname or "").lower()
    return host_a == host_b or (_is_loopback(host_a) and _is_loopback(host_b))


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_image_url(url: Any, hostname: str) -> str:
    """Accept Label Studio-relative URLs, cloud storage URIs and absolute URLs on Label Studio's own host.

    Anything else is refused, so a task cannot make the backend fetch arbitrary addresses."""
    if not isinstance(url, str) or not url.strip():
        raise ImageFetchError(f"the task's image URL is missing or not a string: {url!r}")
    url = url.strip()
    if url.startswith(_CLOUD_PREFIXES):
        return url
    if url.startswith("/") and not url.startswith("//"):
        return url
    if url.startswith("upload/"):
        return url
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        if _same_origin(url, hostname):
            return url
        raise ImageFetchError(f"image URL {url!r} is not on the Label Studio host {hostname}")
    raise ImageFetchError(f"unsupported image URL {url!r}: expected a Label Studio URL")


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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._sdk = sdk_client or LabelStudio(base_url=self.base_url, api_key=api_key, timeout=timeout_seconds)
        self._download_root = Path(download_root)
        self._max_image_bytes = int(max_image_bytes)

    @property
    def _http(self):
        return self._sdk._client_wrapper.httpx_client

    def _download_token(self) -> str:
        # A personal access token is a JWT refresh token; the SDK keeps the matching access token, which is what
        # the file views accept. Legacy keys pass through unchanged.
        return self._sdk._client_wrapper._tokens_client.api_key

    def fetch_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks of the project with their annotations, page by page."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            response = self._http.request(
                "api/tasks/",
                method="GET",
                params={"project": int(project_id), "fields": "all", "page": page, "page_size": TASK_PAGE_SIZE},
            )
            if response.status_code == 404 and page > 1:
                break  # past the last page
            _raise_for_status(response, f"GET /api/tasks?project={project_id}&page={page}")
            body = response.json()
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            tasks.extend(batch)
            total = body.get("total") if isinstance(body, dict) else None
            if not batch or (total is not None and len(tasks) >= int(total)) or len(batch) < TASK_PAGE_SIZE:
                break
            page += 1
        return tasks

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

    def download_image(self, url: str, task_id: int | None = None) -> bytes:
        """Download through the SDK helper into a private temporary directory; enforce the byte limit."""
        url = check_image_url(url, self.base_url)
        self._download_root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="dl-", dir=self._download_root))
        try:
            try:
                path = get_local_path(
                    url,
                    cache_dir=str(work_dir),
                    image_dir=str(work_dir / "upload"),
                    hostname=self.base_url,
                    access_token=self._download_token(),
                    download_resources=True,
                    task_id=task_id,
                )
            except Exception as exc:
                raise ImageFetchError(f"cannot download {url}: {type(exc).__name__}: {exc}") from exc
            try:
                size = os.path.getsize(path)
            except OSError as exc:
                raise ImageFetchError(f"cannot read the downloaded image {url}: {exc}") from exc
            if size > self._max_image_bytes:
                raise ImageFetchError(
                    f"image {url} has {size} bytes, more than MAX_IMAGE_BYTES={self._max_image_bytes}"
                )
            with open(path, "rb") as handle:
                return handle.read()
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)


def _raise_for_status(response: Any, what: str) -> None:
    if 200 <= response.status_code < 300:
        return
    text = response.text[:300] if hasattr(response, "text") else ""
    raise LabelStudioError(f"{what}: HTTP {response.status_code} {text}")


class LabelStudioClientFactory:
    """Builds (and reuses) one client per Label Studio address and key.

    LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY win over what /setup sent: the operator's address is the one that works
    from the backend's network, and the /setup token is a legacy key that may be disabled."""

    def __init__(
        self,
        download_root: Path,
        max_image_bytes: int,
        default_url: str | None = None,
        default_api_key: str | None = None,
    ) -> None:
        self._download_root = download_root
        self._max_image_bytes = max_image_bytes
        self._default_url = default_url
        self._default_api_key = default_api_key
        self._clients: dict[tuple[str, str], LabelStudioClient] = {}
        self._lock = threading.Lock()

    def __call__(self, hostname: str | None, access_token: str | None) -> LabelStudioAPI:
        url = self._default_url or hostname
        key = self._default_api_key or access_token
        if not url:
            raise LabelStudioError("no Label Studio address: set LABEL_STUDIO_URL or connect the backend (/setup)")
        if not key:
            raise LabelStudioError("no Label Studio API key: set LABEL_STUDIO_API_KEY or connect the backend (/setup)")
        with self._lock:
            client = self._clients.get((url, key))
            if client is None:
                client = LabelStudioClient(url, key, self._download_root, self._max_image_bytes)
                self._clients[(url, key)] = client
            return client
