"""gunicorn worker for `vlm-al serve`: gthread, but a request only takes a thread once it has fully arrived.

The stock gthread worker hands a connection to a thread as soon as its first byte arrives; the thread then blocks
while a slow client trickles headers or body. Sixteen such clients hold eight threads, and Label Studio's /health
(1 s timeout) waits behind them. This worker reads every request (head and body, Content-Length or chunked) in the
worker's event loop with non-blocking sockets, like a buffering proxy would, and dispatches it to the thread pool
only when it is complete. A request that is not complete within REQUEST_READ_TIMEOUT_SECONDS gets 408; a body over
MAX_REQUEST_BYTES gets 413 before it is read (Content-Length) or as soon as it grows past the limit (chunked);
a head over 64 KiB gets 431. Plain HTTP/1.x only (TLS and HTTP/2 are left to a proxy in front).
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import time
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

MAX_HEAD_BYTES = 64 * 1024
RECV_CHUNK = 256 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BufferedSocket:
    """A connection's socket with bytes already read by the event loop in front of it (what the parser sees)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.buffer = bytearray()
        self.swallow_continue = False

    def push(self, data: bytes) -> None:
        self.buffer += data

    def recv(self, size: int, *flags: int) -> bytes:
        if self.buffer:
            out = bytes(self.buffer[:size])
            del self.buffer[:size]
            return out
        return self._sock.recv(size, *flags)

    def recv_into(self, target, size: int = 0, *flags: int) -> int:
        if self.buffer:
            size = size or len(target)
            out = self.recv(size)
            target[: len(out)] = out
            return len(out)
        return self._sock.recv_into(target, size, *flags)

    def send(self, data: bytes, *flags: int) -> int:
        if self.swallow_continue and bytes(data) == CONTINUE:
            self.swallow_continue = False  # the event loop already sent it
            return len(data)
        return self._sock.send(data, *flags)

    def sendall(self, data: bytes, *flags: int) -> None:
        if self.swallow_continue and bytes(data) == CONTINUE:
            self.swallow_continue = False
            return None
        return self._sock.sendall(data, *flags)

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class RequestBuffer:
    """Incremental framing of one HTTP/1.x request: is it complete, too large, or malformed?"""

    NEED_MORE, COMPLETE, PASS_THROUGH = "need-more", "complete", "pass-through"

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.data = bytearray()
        self.head_end: int | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.continue_sent = False
        self._chunk_pos = 0
        self._chunk_total = 0

    def feed(self, data: bytes) -> tuple[str, int | None, str | None]:
        """(state, error status, error message) after adding ``data``."""
        self.data += data
        if self.head_end is None:
            end = self.data.find(b"\r\n\r\n")
            if end == -1:
                if len(self.data) > MAX_HEAD_BYTES:
                    return "error", 431, "the request head is larger than 64 KiB"
                return self.NEED_MORE, None, None
            if end > MAX_HEAD_BYTES:
                return "error", 431, "the request head is larger than 64 KiB"
            self.head_end = end + 4
            problem = self._read_head(bytes(self.data[:end]))
            if problem is not None:
                return problem
            self._chunk_pos = self.head_end
        if self.content_length is not None:
            if self.content_length > self.max_body:
                return "error", 413, f"the request body is larger than MAX_REQUEST_BYTES={self.max_body}"
            if len(self.data) - self.head_end >= self.content_length:
                return self.COMPLETE, None, None
            return self.NEED_MORE, None, None
        if self.chunked:
            return self._scan_chunks()
        return self.COMPLETE, None, None

    def _read_head(self, head: bytes) -> tuple[str, int | None, str | None] | None:
        lengths: set[str] = set()
        transfer_encoding: list[str] = []
        for line in head.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().lower()
            text = value.strip().decode("latin-1")
            if key == b"content-length":
                lengths.add(text)
            elif key == b"transfer-encoding":
                transfer_encoding.append(text.lower())
            elif key == b"expect" and text.lower() == "100-continue":
                self.expect_continue = True
        if transfer_encoding and lengths:
            return self.PASS_THROUGH, None, None  # gunicorn refuses the ambiguity itself (400)
        if transfer_encoding:
            if transfer_encoding[-1].split(",")[-1].strip() != "chunked":
                return self.PASS_THROUGH, None, None  # gunicorn answers unsupported encodings
            self.chunked = True
            return None
        if lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit() or len(next(iter(lengths))) > 18:
                return self.PASS_THROUGH, None, None  # gunicorn answers 400 for a bad Content-Length
            self.content_length = int(next(iter(lengths)))
        return None

    def _scan_chunks(self) -> tuple[str, int | None, str | None]:
        while True:
            line_end = self.data.find(b"\r\n", self._chunk_pos)
            if line_end == -1:
                if len(self.data) - self._chunk_pos > 1024:
                    return "error", 400, "a chunk size line is too long"
                return self.NEED_MORE, None, None
            size_text = bytes(self.data[self._chunk_pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                return "error", 400, "the chunked request body is malformed"
            if size < 0:
                return "error", 400, "the chunked request body is malformed"
            if size == 0:
                # last chunk: trailers (if any) end with an empty line
                trailer_start = line_end + 2
                if self.data[trailer_start:trailer_start + 2] == b"\r\n":
                    return self.COMPLETE, None, None
                if self.data.find(b"\r\n\r\n", trailer_start) != -1:
                    return self.COMPLETE, None, None
                if len(self.data) - trailer_start > MAX_HEAD_BYTES:
                    return "error", 431, "the chunked request's trailers are larger than 64 KiB"
                return self.NEED_MORE, None, None
            self._chunk_total += size
            if self._chunk_total > self.max_body:
                return "error", 413, f"the request body is larger than MAX_REQUEST_BYTES={self.max_body}"
            chunk_end = line_end + 2 + size + 2
            if len(self.data) < chunk_end:
                self._chunk_total -= size  # counted again once the whole chunk is here
                return self.NEED_MORE, None, None
            self._chunk_pos = chunk_end


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error page (``gunicorn.util.write_error``) as this backend's JSON error shape."""
    from gunicorn.util import write_nonblock

    message = mesg if status_int < 500 else "internal error"
    body = json.dumps({"error": reason.lower().replace(" ", "_"), "message": message or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    write_nonblock(sock, head + body)


class BufferedThreadWorker(ThreadWorker):
    """gthread that dispatches only complete requests (see the module docstring)."""

    def init_process(self) -> None:
        from backend.config import Config

        config = Config.from_env()
        self.read_timeout = config.request_read_timeout_seconds
        self.max_body = config.max_request_bytes
        self.reading: dict[int, tuple[object, RequestBuffer, float]] = {}
        from gunicorn import util

        util.write_error = write_json_error  # gunicorn's own 4xx (bad request line, headers...) as JSON too
        super().init_process()

    # --- new connections and kept-alive ones start by being read in the event loop -----------------------------

    def accept(self, listener) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        from gunicorn.workers.gthread import TConn

        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())  # sets non-blocking
        if self.cfg.is_ssl:
            client_sock.setblocking(True)
            self.enqueue_req(conn)  # TLS: left to the stock path (terminate TLS in a proxy)
            return
        conn.sock = BufferedSocket(client_sock)
        self._start_reading(conn, register=True)

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection has a new request: read it here first."""
        try:
            self.keepalived_conns.remove(conn)
        except ValueError:
            pass
        if not isinstance(conn.sock, BufferedSocket):
            self.poller.unregister(client)
            self.enqueue_req(conn)
            return
        self.poller.unregister(client)
        self._start_reading(conn, register=True)
        self._on_readable(conn, conn.sock)

    def _start_reading(self, conn, register: bool) -> None:
        conn.sock.setblocking(False)
        self.reading[id(conn)] = (conn, RequestBuffer(self.max_body), time.monotonic() + self.read_timeout)
        if register:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _client) -> None:
        entry = self.reading.get(id(conn))
        if entry is None:
            return
        _, buffer, _ = entry
        wrapper: BufferedSocket = conn.sock
        received = bytearray()
        if wrapper.buffer:  # pipelined bytes left from the previous request
            received += wrapper.buffer
            wrapper.buffer.clear()
        closed = False
        while True:
            try:
                chunk = wrapper._sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if len(received) >= RECV_CHUNK * 4:
                break
        state, status, message = buffer.feed(bytes(received)) if received else (RequestBuffer.NEED_MORE, None, None)
        if state == "error":
            self._refuse(conn, status or 400, message or "bad request")
            return
        if state in (RequestBuffer.COMPLETE, RequestBuffer.PASS_THROUGH):
            self._dispatch(conn, buffer)
            return
        if closed:
            self._drop(conn)
            return
        if buffer.expect_continue and buffer.head_end is not None and not buffer.continue_sent:
            buffer.continue_sent = True
            wrapper.swallow_continue = True
            try:
                wrapper._sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass

    def _dispatch(self, conn, buffer: RequestBuffer) -> None:
        self.reading.pop(id(conn), None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.push(bytes(buffer.data))
        conn.sock.setblocking(True)
        conn.data_ready = True
        self.enqueue_req(conn)

    def _refuse(self, conn, status: int, message: str) -> None:
        reasons = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
                   431: "Request Header Fields Too Large"}
        name = reasons.get(status, "Bad Request")
        body = json.dumps({"error": name.lower().replace(" ", "_"), "message": message}).encode()
        response = (f"HTTP/1.1 {status} {name}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode() + body
        try:
            conn.sock._sock.send(response)  # non-blocking, best effort: a small response fits the send buffer
        except OSError:
            pass
        self.log.info("refused a request from %s: %d %s", conn.client, status, message)
        self._drop(conn)

    def _drop(self, conn) -> None:
        self.reading.pop(id(conn), None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        try:
            conn.sock._sock.close()
        except OSError:
            pass

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        now = time.monotonic()
        for conn, buffer, deadline in list(self.reading.values()):
            if force:
                self._drop(conn)
            elif now >= deadline:
                started = buffer.head_end is not None or bool(buffer.data)
                if started:
                    self._refuse(conn, 408, f"the request did not arrive within REQUEST_READ_TIMEOUT_SECONDS="
                                            f"{self.read_timeout:g}")
                else:
                    self._drop(conn)  # an idle connection that never sent anything

    def finish_request(self, conn, fs) -> None:
        super().finish_request(conn, fs)
        wrapper = conn.sock
        if isinstance(wrapper, BufferedSocket) and wrapper.buffer and conn in self.keepalived_conns:
            self.on_client_socket_readable(conn, wrapper)  # pipelined request already buffered
