"""Label Studio's request shapes the backend checks: project ids, and the refusal that becomes an HTTP 4xx."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class InvalidInput(ValueError):
    """A request the backend refuses; becomes an HTTP 4xx with this message."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def parse_project_id(value: Any) -> int:
    """Label Studio sends ``"<id>.<created timestamp>"`` in /setup and /predict, an int in webhooks."""
    if isinstance(value, bool):
        raise InvalidInput(f"project must be an id, got {value!r}")
    if isinstance(value, int):
        project_id = value
    elif isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if not head.isdigit():
            raise InvalidInput(f"project must look like '<id>' or '<id>.<timestamp>', got {value!r}")
        project_id = int(head)
    elif isinstance(value, Mapping) and "id" in value:
        return parse_project_id(value["id"])
    else:
        raise InvalidInput(f"project must be an id, got {type(value).__name__}")
    if project_id < 0:
        raise InvalidInput(f"project id must be >= 0, got {project_id}")
    return project_id
