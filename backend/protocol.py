"""Label Studio's request shapes the backend checks: project ids, bodies, and the refusal that becomes an HTTP 4xx."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

MAX_ID = 2**63 - 1
"""Largest project or task id: SQLite's INTEGER range (and 19 digits, a short file name)."""
MAX_JSON_DEPTH = 64
"""Label Studio's payloads nest about 10 deep; deeper bodies are refused before any handler walks them."""
MAX_TOKEN_LENGTH = 2048

_DIGITS = re.compile(r"^[0-9]{1,19}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


class InvalidInput(ValueError):
    """A request the backend refuses; becomes an HTTP 4xx with this message."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def printable(value: Any, limit: int = 200) -> str:
    """A short, log-safe rendering: control and non-ASCII characters escaped, cut at ``limit``."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\n", "\\n").replace("\r", "\\r")


def _bounded_id(number: int, what: str) -> int:
    if number < 0 or number > MAX_ID:
        raise InvalidInput(f"{what} must be between 0 and {MAX_ID}, got {printable(number, 40)}")
    return number


def parse_project_id(value: Any) -> int:
    """Label Studio sends ``"<id>.<created timestamp>"`` in /setup and /predict, an int in webhooks."""
    if isinstance(value, bool):
        raise InvalidInput(f"project must be an id, got {value!r}")
    if isinstance(value, int):
        return _bounded_id(value, "project id")
    if isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if not _DIGITS.match(head):
            raise InvalidInput(f"project must look like '<id>' or '<id>.<timestamp>', got {printable(value, 60)!r}")
        return _bounded_id(int(head), "project id")
    if isinstance(value, Mapping) and "id" in value:
        return parse_project_id(value["id"])
    raise InvalidInput(f"project must be an id, got {type(value).__name__}")


def validate_task_id(task_id: int, where: str) -> int:
    return _bounded_id(task_id, f"{where} 'id'")


def validate_hostname(hostname: str | None) -> str | None:
    """The /setup ``hostname``: an absolute http(s) URL this backend's fetcher can parse, or None."""
    if hostname is None or not hostname.strip():
        return None
    from backend.fetch import ImageFetchError, parse_http_url

    hostname = hostname.strip().rstrip("/")
    try:
        parse_http_url(hostname)
    except ImageFetchError as exc:
        raise InvalidInput(f"'hostname' must be Label Studio's http(s) base URL: {exc}") from None
    return hostname


def validate_access_token(token: str | None) -> str | None:
    """The /setup ``access_token``: printable ASCII without spaces (it goes into an HTTP header), or None."""
    if token is None or token == "":
        return None
    if len(token) > MAX_TOKEN_LENGTH or not _TOKEN.match(token):
        raise InvalidInput(f"'access_token' must be printable ASCII without spaces, at most {MAX_TOKEN_LENGTH} "
                           "characters")
    return token


def _reject_constant(name: str) -> Any:
    raise InvalidInput(f"the request body has {name}, which is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion to blow)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json_body(data: bytes) -> dict[str, Any]:
    """A request body as a JSON object; every malformed body is an InvalidInput naming the problem."""
    if not data:
        raise InvalidInput("the request body must be valid JSON (it is empty)")
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except InvalidInput:
        raise
    except RecursionError:
        raise InvalidInput(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except UnicodeDecodeError:
        raise InvalidInput("the request body must be valid JSON in UTF-8") from None
    except ValueError as exc:
        raise InvalidInput(f"the request body must be valid JSON: {printable(exc, 120)}") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object, got {type(body).__name__}")
    if _depth(body) > MAX_JSON_DEPTH:
        raise InvalidInput(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return body
