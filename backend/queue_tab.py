"""A Data Manager tab that keeps Label Studio's labeling stream in the active-learning order.

Label Studio has two ways into the labeling page. *Label All Tasks* asks for the next task with the project's
sampling: with Uncertainty sampling, ascending prediction score, the backend's queue. Opening (or reloading) the
labeling page from a Data Manager tab sends that tab's filters and ordering instead, and a tab without an ordering
serves tasks in ID order. A tab ordered by ``tasks:predictions_score`` ascending gives the queue order on that path
too; making it the first tab makes it the one a fresh browser opens. Tabs are shared by the organization's users.
"""

from __future__ import annotations

import logging
from typing import Any

from label_studio_sdk import LabelStudio

logger = logging.getLogger(__name__)

QUEUE_TAB_TITLE = "Queue (active learning)"
QUEUE_ORDERING = ["tasks:predictions_score"]


def queue_tab_data(title: str = QUEUE_TAB_TITLE) -> dict[str, Any]:
    """The tab's settings as the Data Manager stores them: every task, ascending prediction score."""
    return {
        "title": title,
        "type": "list",
        "target": "tasks",
        "ordering": list(QUEUE_ORDERING),
        "filters": {"conjunction": "and", "items": []},
    }


def _view_title(view: Any) -> str | None:
    data = getattr(view, "data", None)
    return data.get("title") if isinstance(data, dict) else None


def ensure_queue_tab(client: LabelStudio, project_id: int, title: str = QUEUE_TAB_TITLE) -> int:
    """Create the queue tab unless it exists, and make it the first tab; return its id.

    An existing tab of that title is kept as it is (an annotator may have added columns or filters)."""
    views = sorted(client.views.list(project=int(project_id)),
                   key=lambda v: (v.order if v.order is not None else 0, v.id or 0))
    queue = next((v for v in views if _view_title(v) == title), None)
    if queue is None:
        queue = client.views.create(project=int(project_id), data=queue_tab_data(title))
        views.append(queue)
        logger.info("project %s: created the Data Manager tab %r (ascending prediction score)", project_id, title)
    assert queue.id is not None
    ids = [int(v.id) for v in views if v.id is not None]
    if ids and ids[0] != queue.id:
        client.views.update_order(project=int(project_id), ids=[int(queue.id)] + [i for i in ids if i != queue.id])
    return int(queue.id)
