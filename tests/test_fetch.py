"""The image fetcher's URL parser and address policy, the request framing of the serve worker, state hygiene."""

from __future__ import annotations

import http.server
import threading

import pytest

from backend.fetch import FetchRefused, ImageFetcher, ImageFetchError, address_kind, parse_http_url
from backend.ls_client import image_request
from backend.state import ModelDirError, ProjectState, check_model_dir
from backend.worker import RequestBuffer


@pytest.mark.parametrize(
    ("url", "origin", "target"),
    [
        ("http://127.0.0.1:8080/data/x?d=1", ("http", "127.0.0.1", 8080), "/data/x?d=1"),
        ("HTTPS://LS.Example.com/a#frag", ("https", "ls.example.com", 443), "/a"),
        ("http://[::1]:9/", ("http", "::1", 9), "/"),
        ("http://ls.example.com?x=1", ("http", "ls.example.com", 80), "/?x=1"),
    ],
)
def test_parse_http_url_accepts_plain_urls(url, origin, target):
    parsed = parse_http_url(url)
    assert parsed.origin == origin and parsed.target == target


@pytest.mark.parametrize(
    "url",
    ["http://a@b/", "http://b\\@c/", "http://0x7f.1/", "http://017700000001/", "http://127.1/", "http://[::1%lo]/",
     "http://h:0/", "http://h:65536/", "http://h:1:2/", "http://h h/", "http://ex%61mple.com/", "ftp://h/",
     "http:///x", "http://\u00e9.com/", "http://-bad-.com/", "javascript:alert(1)", 5, None],
)
def test_parse_http_url_refuses_ambiguous_urls(url):
    with pytest.raises(FetchRefused):
        parse_http_url(url)


@pytest.mark.parametrize(
    ("address", "kind"),
    [("8.8.8.8", "global"), ("127.0.0.2", "loopback"), ("10.0.0.1", "private"), ("169.254.169.254", "metadata"),
     ("169.254.1.1", "link-local"), ("::ffff:10.0.0.1", "private"), ("0.0.0.0", "unspecified"),
     ("100.64.0.1", "special"), ("224.0.0.1", "multicast"), ("64:ff9b::a9fe:a9fe", "metadata")],
)
def test_address_kinds(address, kind):
    assert address_kind(address) == kind


def test_image_requests_always_go_to_the_configured_origin():
    base = "http://127.0.0.1:8080"
    assert str(image_request("http://localhost:8080/data/a?d=1", base)[0]) == "http://127.0.0.1:8080/data/a?d=1"
    assert str(image_request("upload/3/a.png", base)[0]) == "http://127.0.0.1:8080/data/upload/3/a.png"
    assert image_request("s3://bucket/a.png", base)[1] is True
    with pytest.raises(FetchRefused):
        image_request("http://127.0.0.1:8081/a.png", base)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(self.headers.get("Authorization", "none")[:5].encode().ljust(5))

    def log_message(self, *args):
        pass


def test_the_fetcher_sends_the_token_and_refuses_redirects():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = parse_http_url(f"http://127.0.0.1:{server.server_port}")
        fetcher = ImageFetcher(base, lambda: "Token abc", max_bytes=100, timeout_seconds=5)
        assert fetcher.fetch(base.with_target("/ok")) == b"Token"
        with pytest.raises(FetchRefused, match="redirect"):
            fetcher.fetch(base.with_target("/redirect"))
        small = ImageFetcher(base, lambda: None, max_bytes=3, timeout_seconds=5)
        with pytest.raises(ImageFetchError, match="MAX_IMAGE_BYTES"):
            small.fetch(base.with_target("/ok"))
    finally:
        server.shutdown()


def test_request_framing():
    buffer = RequestBuffer(max_body=10)
    assert buffer.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")[0] == RequestBuffer.NEED_MORE
    assert buffer.feed(b"cd")[0] == RequestBuffer.COMPLETE
    assert RequestBuffer(10).feed(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")[1] == 413
    chunked = RequestBuffer(10)
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert chunked.feed(head + b"5\r\nabcde\r\n")[0] == RequestBuffer.NEED_MORE
    assert chunked.feed(b"0\r\n\r\n")[0] == RequestBuffer.COMPLETE
    assert RequestBuffer(10).feed(head + b"6\r\nabcdef\r\n6\r\nabcdef\r\n")[1] == 413
    assert RequestBuffer(10).feed(head + b"zz\r\n")[1] == 400
    assert RequestBuffer(10).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000)[1] == 431
    assert RequestBuffer(10).feed(b"GET /health HTTP/1.1\r\n\r\n")[0] == RequestBuffer.COMPLETE


def test_model_dir_check_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ModelDirError, match=str(blocker)):
        check_model_dir(blocker / "m")
    assert check_model_dir(tmp_path / "fresh").is_dir()


def test_torn_transition_lines_are_skipped_and_repeats_keep_the_committed_record(tmp_path):
    state = ProjectState(tmp_path, 1)
    state.append_transition({"model_version": "vlm-al-v1", "n_trusted": 1})
    with open(state.history_path, "a") as handle:
        handle.write('{"model_version": "vlm-al-v2", "n_tr')  # a kill mid-write
    state.append_transition({"model_version": "vlm-al-v2", "n_trusted": 2})
    assert [(h["model_version"], h["n_trusted"]) for h in state.transition_history()] == [
        ("vlm-al-v1", 1), ("vlm-al-v2", 2)]
