"""SSRF: task image URLs and redirects that point anywhere but Label Studio are refused before any connection."""

from __future__ import annotations

import pytest

from backend.fetch import AddressPolicy, FetchRefused, ImageFetcher, parse_http_url

from .conftest import TOKEN

PROJECT = 101


@pytest.fixture(scope="module")
def ssrf_project(backend, fake_ls):
    assert backend.setup(PROJECT, fake_ls).status_code == 200
    return PROJECT


# {ls} = the fake Label Studio's port, {trap} = a 127.0.0.1 port that must never be connected to
HOSTILE_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://127.0.0.1:{trap}/x",
    "http://localhost:{trap}/x",
    "http://[::1]:{trap}/x",
    "http://127.0.0.1:{ls}@127.0.0.1:{trap}/x",
    "http://127.0.0.1:{trap}\\@127.0.0.1:{ls}/x",
    "http://127.0.0.1:{ls}\t@127.0.0.1:{trap}/x",
    "http://0x7f.1:{trap}/x",
    "http://2130706433:{trap}/x",
    "http://127.1:{ls}/data/local-files/?d=ok.png",
    "http://[::ffff:127.0.0.1]:{trap}/x",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://127.0.0.1%2f@127.0.0.1:{trap}/x",
    "http://user:pass@127.0.0.1:{ls}/data/local-files/?d=ok.png",
    "http://127.0.0.1:{ls}:{trap}/x",
    "http://[fe80::1%25lo]:{trap}/x",
    "HTTP://127.0.0.1:{trap}/x",
    "http://127.0.0.1.:{trap}/x",
    "http://\u2113ocalhost:{trap}/x",
    "//127.0.0.1:{trap}/x",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{trap}/_x",
    "ftp://127.0.0.1:{trap}/x",
    "http://metadata.google.internal/computeMetadata/v1/",
    "/data/local-files/?d=redirect-trap",
    "/data/local-files/?d=redirect-metadata",
    "/data/local-files/?d=redirect-relative-trap",
    "/data/local-files/?d=redirect-same",
    "s3://bucket/key.png",
    "http://127.0.0.1:{ls}/" + "a" * 9000,
]


@pytest.mark.parametrize("template", HOSTILE_URLS)
def test_hostile_image_url_is_refused_without_a_connection(template, backend, fake_ls, trap, ssrf_project):
    url = template.format(ls=fake_ls.port, trap=trap.port)
    before = trap.connections
    response = backend.predict(ssrf_project, [url])
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "unusable_images"
    assert trap.connections == before, "the backend connected to a refused address"
    assert str(backend.model_dir) not in response.text and "Traceback" not in response.text


def test_a_good_image_on_the_label_studio_host_is_fetched(backend, fake_ls, ssrf_project):
    response = backend.predict(ssrf_project, ["/data/local-files/?d=ok-ssrf.png"])
    assert response.status_code == 200, response.text  # (no weak annotator in the suite: an empty result)
    assert len(response.json()["results"]) == 1 and "score" in response.json()["results"][0]


# --- in process: the resolver and the connector are spies; a refusal must come before connecting --------------


class Spy:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.resolved: list[str] = []
        self.connected: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        return self.answers[host]

    def connect(self, address: str, port: int, timeout: float):
        self.connected.append((address, port))
        raise ConnectionRefusedError("spy: no real connection in this test")


@pytest.mark.parametrize(
    "addresses",
    [["169.254.169.254"], ["10.0.0.5"], ["192.168.1.1"], ["127.0.0.1"], ["::1"], ["fe80::1"], ["0.0.0.0"],
     ["::ffff:169.254.169.254"], ["fd00:ec2::254"], ["100.100.100.200"]],
    ids=lambda a: a[0],
)
def test_a_public_label_studio_host_that_resolves_to_a_refused_address_is_never_connected(addresses):
    spy = Spy({"ls.example.com": ["93.184.216.34"]})
    base = parse_http_url("https://ls.example.com")
    fetcher = ImageFetcher(base, lambda: f"Token {TOKEN}", max_bytes=1000, timeout_seconds=2,
                           resolver=spy.resolve, connector=spy.connect)
    spy.answers["ls.example.com"] = addresses  # DNS rebinding after the policy was made
    with pytest.raises(FetchRefused, match="refused address"):
        fetcher.fetch(base.with_target("/data/upload/1/a.png"))
    assert spy.connected == []


def test_the_checked_address_is_the_one_connected():
    spy = Spy({"ls.example.com": ["93.184.216.34"]})
    base = parse_http_url("http://ls.example.com:8080")
    fetcher = ImageFetcher(base, lambda: None, max_bytes=1000, timeout_seconds=2,
                           resolver=spy.resolve, connector=spy.connect)
    with pytest.raises(Exception):
        fetcher.fetch(base.with_target("/x"))
    assert spy.connected == [("93.184.216.34", 8080)] and spy.resolved.count("ls.example.com") == 2


def test_a_loopback_label_studio_allows_loopback_only_for_itself():
    policy = AddressPolicy({"loopback"})
    assert policy.check("localhost", ["127.0.0.1"]) == "127.0.0.1"
    for refused in ("169.254.169.254", "10.1.2.3", "fe80::1"):
        with pytest.raises(FetchRefused):
            policy.check("x", [refused])
    with pytest.raises(FetchRefused):
        AddressPolicy({"link-local", "metadata"}).check("x", ["169.254.169.254"])  # metadata never
