"""A local HTTP server that speaks the chat-completions protocol, for testing the VLM weak annotator.

It checks each request's shape, decodes the image, and answers from a table keyed by the image's centre pixel
colour. It can delay answers (timeouts), fail the next N requests with a status code (retries), and records
every request it saw.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


@dataclass
class StubRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    image_size: tuple[int, int] | None
    centre_colour: tuple[int, int, int] | None
    problems: list[str] = field(default_factory=list)


class VLMStubServer:
    """Use as a context manager; ``base_url`` is ``http://127.0.0.1:<random port>``."""

    def __init__(
        self,
        answers: Mapping[tuple[int, int, int], str],
        default_answer: str = "no idea",
        api_key: str | None = "test-key",
        model: str = "stub-vlm",
    ) -> None:
        self.answers = dict(answers)
        self.default_answer = default_answer
        self.api_key = api_key
        self.model = model
        self.delay_s = 0.0
        self.requests: list[StubRequest] = []
        self._failures_left = 0
        self._failure_status = 503
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._failures_left = count
            self._failure_status = status

    def problems(self) -> list[str]:
        return [problem for request in self.requests for problem in request.problems]

    def __enter__(self) -> VLMStubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _inspect(self, path: str, headers: dict[str, str], raw: bytes) -> StubRequest:
        record = StubRequest(path=path, headers=headers, body=None, image_size=None, centre_colour=None)
        if path != "/v1/chat/completions":
            record.problems.append(f"wrong path {path}")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            record.problems.append("missing or wrong bearer token")
        if "application/json" not in headers.get("content-type", ""):
            record.problems.append("content-type is not JSON")
        try:
            body = json.loads(raw)
        except ValueError:
            record.problems.append("body is not JSON")
            return record
        record.body = body
        if body.get("model") != self.model:
            record.problems.append(f"model {body.get('model')!r}")
        if body.get("temperature") != 0:
            record.problems.append(f"temperature {body.get('temperature')!r}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            record.problems.append("no user message")
            return record
        parts = messages[-1].get("content")
        if not isinstance(parts, list):
            record.problems.append("content is not a list of parts")
            return record
        texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
        urls = [p.get("image_url", {}).get("url", "") for p in parts if p.get("type") == "image_url"]
        if len(texts) != 1 or len(urls) != 1:
            record.problems.append(f"expected one text and one image part, got {len(texts)} and {len(urls)}")
            return record
        prefix = "data:image/"
        if not urls[0].startswith(prefix) or ";base64," not in urls[0]:
            record.problems.append("image is not a base64 data URL")
            return record
        try:
            image = Image.open(io.BytesIO(base64.b64decode(urls[0].split(";base64,", 1)[1], validate=True)))
            image = image.convert("RGB")
        except Exception as exc:
            record.problems.append(f"image does not decode: {exc}")
            return record
        record.image_size = image.size
        record.centre_colour = image.getpixel((image.width // 2, image.height // 2))
        return record

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                record = stub._inspect(self.path, headers, raw)
                with stub._lock:
                    stub.requests.append(record)
                    failing = stub._failures_left > 0
                    if failing:
                        stub._failures_left -= 1
                    status = stub._failure_status
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                if failing:
                    self._reply(status, {"error": {"message": "scripted failure"}})
                    return
                if record.problems:
                    self._reply(400, {"error": {"message": "; ".join(record.problems)}})
                    return
                answer = stub.answers.get(record.centre_colour, stub.default_answer)
                self._reply(
                    200,
                    {
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "model": stub.model,
                        "choices": [
                            {"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": answer}}
                        ],
                    },
                )

        return Handler
