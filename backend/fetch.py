"""Image fetching owned by this project: one URL parser, one DNS lookup, a pinned connection, no blind redirects.

Why not a library call: ``requests``/the SDK's ``get_local_path`` follow redirects to any host, parse the URL again
with a different parser than the check did, resolve the host again at connect time (DNS rebinding) and read the
whole body before a size check. Here:

- ``parse_http_url`` is the only URL parser; the check and the fetch both use its result (``HttpURL``), and the
  fetch connects to ``HttpURL.host``/``port`` exactly, never to a re-parsed string.
- The host is resolved once per request; every address is classified (``address_kind``) and refused unless it is
  global or of a kind the Label Studio host itself has (a Label Studio on loopback may be fetched from loopback).
  Cloud metadata addresses are always refused. The socket connects to the address that was checked.
- Redirects are refused, except where the caller allows hops (the cloud-storage presign endpoint): every hop is
  parsed and checked again, and credentials are only ever sent to the Label Studio origin.
- One deadline per download covers connect, headers and body (a watchdog shuts the socket down when it passes,
  so a trickling server cannot hold a thread), and the byte cap is enforced while streaming.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 8192
READ_CHUNK = 64 * 1024
USER_AGENT = "vlm-al-backend"

# Addresses of cloud instance-metadata services: never fetched, whatever the Label Studio host is.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "192.0.0.192", "fd00:ec2::254")
)

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?$")
_NUMERIC_HOST_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]*))*$")
_PATH_CHARS_RE = re.compile(r"^[\x21-\x7e]*$")


class ImageFetchError(ValueError):
    """A task image that cannot be used: missing, foreign, too large, too slow or not downloadable."""


class FetchRefused(ImageFetchError):
    """Refused before any connection was attempted (URL or address not allowed)."""


@dataclass(frozen=True)
class HttpURL:
    """An http(s) URL as this project understands it. ``target`` is the request target (path and query)."""

    scheme: str
    host: str
    """Lower-case hostname, or an IP address without brackets."""
    port: int
    target: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def host_literal(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host_literal if self.port == default else f"{self.host_literal}:{self.port}"

    def with_target(self, target: str) -> HttpURL:
        if not target.startswith("/") or not _PATH_CHARS_RE.match(target):
            raise FetchRefused(f"invalid request target {target[:80]!r}")
        return HttpURL(self.scheme, self.host, self.port, target)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_literal}:{self.port}{self.target}"


def parse_http_url(url: object) -> HttpURL:
    """Parse an absolute http(s) URL strictly; refuse anything two parsers could read differently.

    Refused: non-ASCII or control characters, whitespace, backslashes, user info (``user@host``), percent signs or
    odd characters in the host, non-canonical numeric hosts (``0x7f.1``, ``2130706433``), IPv6 zone ids, ports
    outside 1..65535, other schemes."""
    if not isinstance(url, str):
        raise FetchRefused(f"URL must be a string, got {type(url).__name__}")
    if len(url) > MAX_URL_LENGTH:
        raise FetchRefused(f"URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or not _PATH_CHARS_RE.match(url):
        raise FetchRefused(f"URL {url[:80]!r} has whitespace, control or non-ASCII characters")
    if "\\" in url:
        raise FetchRefused(f"URL {url[:80]!r} has a backslash")
    match = _SCHEME_RE.match(url)
    if not match or match.group(1).lower() not in ("http", "https"):
        raise FetchRefused(f"URL {url[:80]!r} is not an absolute http(s) URL")
    scheme = match.group(1).lower()
    rest = url[match.end():]
    end = len(rest)
    for delimiter in "/?#":
        position = rest.find(delimiter)
        if position != -1:
            end = min(end, position)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise FetchRefused(f"URL {url[:80]!r} has user info before the host; refused")
    host, port = _split_authority(authority, url)
    tail = tail.split("#", 1)[0]
    if not tail.startswith("/"):
        tail = "/" + tail
    return HttpURL(scheme, host, port if port is not None else (443 if scheme == "https" else 80), tail)


def _split_authority(authority: str, url: str) -> tuple[str, int | None]:
    if not authority:
        raise FetchRefused(f"URL {url[:80]!r} has no host")
    port_text: str | None = None
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise FetchRefused(f"URL {url[:80]!r} has an unclosed IPv6 literal")
        literal, after = authority[1:close], authority[close + 1 :]
        if "%" in literal:
            raise FetchRefused(f"URL {url[:80]!r} has an IPv6 zone id; refused")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise FetchRefused(f"URL {url[:80]!r} has an invalid IPv6 literal") from None
        if after:
            if not after.startswith(":"):
                raise FetchRefused(f"URL {url[:80]!r} has characters after the IPv6 literal")
            port_text = after[1:]
    else:
        if authority.count(":") > 1:
            raise FetchRefused(f"URL {url[:80]!r} has an unbracketed IPv6 address or several ports")
        host, _, port_text_found = authority.partition(":")
        port_text = port_text_found if ":" in authority else None
        host = host.lower()
        if _NUMERIC_HOST_RE.match(host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise FetchRefused(f"URL {url[:80]!r} has a non-canonical numeric host; refused") from None
        elif not _HOSTNAME_RE.match(host):
            raise FetchRefused(f"URL {url[:80]!r} has an invalid host name")
        host = host.rstrip(".")
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            raise FetchRefused(f"URL {url[:80]!r} has an invalid port")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise FetchRefused(f"URL {url[:80]!r} has a port outside 1..65535")
    return host, port


# --- addresses ----------------------------------------------------------------------------------------------------


def address_kind(address: str) -> str:
    """``global`` or why the address is not: metadata, loopback, link-local, private, unspecified, multicast,
    reserved or special. IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            ip = mapped
        elif ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64: the embedded IPv4 address is what is reached
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_global:
        return "global"
    if ip.is_reserved:
        return "reserved"
    return "special"  # e.g. 100.64.0.0/10 (carrier-grade NAT)


Resolver = Callable[[str, int], list[str]]
Connector = Callable[[str, int, float], socket.socket]


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(f"cannot resolve {host}: {exc}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def tcp_connector(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


class AddressPolicy:
    """Which resolved addresses may be connected to: global ones, plus the kinds the Label Studio host has."""

    def __init__(self, allowed_kinds: Iterable[str]) -> None:
        self.allowed_kinds = frozenset(k for k in allowed_kinds if k != "metadata") | {"global"}

    @classmethod
    def for_label_studio(cls, base: HttpURL, resolver: Resolver) -> AddressPolicy:
        """Allow what Label Studio's own host resolves to now (e.g. loopback for a local Label Studio)."""
        try:
            kinds = {address_kind(a) for a in resolver(base.host, base.port)}
        except ImageFetchError:
            kinds = set()
        return cls(kinds)

    def check(self, host: str, addresses: Iterable[str]) -> str:
        """The first allowed address; refuse if none is (naming the kinds found)."""
        found = []
        for address in addresses:
            kind = address_kind(address)
            if kind in self.allowed_kinds:
                return address
            found.append(f"{address} ({kind})")
        raise FetchRefused(f"{host} resolves to a refused address: {', '.join(found) or 'none'}")


# --- deadline watchdog -----------------------------------------------------------------------------------------


class _Watchdog:
    """One thread that shuts down sockets whose download deadline has passed (blocking reads then return)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._cancelled: set[int] = set()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, sock: socket.socket) -> int:
        token = next(self._ids)
        with self._cond:
            heapq.heappush(self._heap, (deadline, token, sock))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="vlm-al-fetch-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._cancelled.add(token)
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._cond.wait(30.0)
                    continue
                deadline, token, sock = self._heap[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to the already checked address, with the URL's host in the Host header (and SNI)."""

    def __init__(self, url: HttpURL, address: str, timeout: float, connector: Connector,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(url.host, url.port, timeout=timeout)
        self._address = address
        self._connector = connector
        self._ssl_context = ssl_context
        self._url = url

    def connect(self) -> None:
        sock = self._connector(self._address, self._url.port, self.timeout)
        if self._url.scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=self._url.host)
        self.sock = sock


@dataclass(frozen=True)
class FetchResult:
    data: bytes
    url: HttpURL
    hops: int


class ImageFetcher:
    """Downloads from one Label Studio origin, with the credentials bound to that origin."""

    def __init__(
        self,
        base: HttpURL,
        authorization: Callable[[], str | None],
        *,
        max_bytes: int,
        timeout_seconds: float,
        max_redirects: int = 3,
        resolver: Resolver = system_resolver,
        connector: Connector = tcp_connector,
        policy: AddressPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base = base
        self._authorization = authorization
        self.max_bytes = int(max_bytes)
        self.timeout_seconds = float(timeout_seconds)
        self.max_redirects = int(max_redirects)
        self._resolver = resolver
        self._connector = connector
        self._ssl_context = ssl_context
        self.policy = policy or AddressPolicy.for_label_studio(base, resolver)

    def fetch(self, url: HttpURL, *, external_redirects: bool = False) -> bytes:
        """GET ``url`` (on the Label Studio origin). ``external_redirects`` lets a hop leave the origin (cloud
        presigned URLs): such hops must be https to a global address and carry no credentials."""
        deadline = time.monotonic() + self.timeout_seconds
        current = url
        for hop in range(self.max_redirects + 1):
            same_origin = current.origin == self.base.origin
            if not same_origin and (hop == 0 or not external_redirects):
                raise FetchRefused(f"{current.host_header} is not the Label Studio host {self.base.host_header}")
            if not same_origin and current.scheme != "https":
                raise FetchRefused(f"redirect to a non-https URL on {current.host_header}; refused")
            policy = self.policy if same_origin else AddressPolicy(())
            status, location, data = self._get(current, policy, same_origin, deadline)
            if status in (301, 302, 303, 307, 308):
                if location is None:
                    raise ImageFetchError(f"HTTP {status} from {current.host_header} without a Location")
                if hop >= self.max_redirects or not external_redirects:
                    raise FetchRefused(f"HTTP {status} redirect from {current.host_header} refused")
                current = self._resolve_location(current, location)
                logger.debug("image redirect hop %d -> %s", hop + 1, current.host_header)
                continue
            if not 200 <= status < 300:
                raise ImageFetchError(f"HTTP {status} from {current.host_header}{current.target[:120]}")
            return data  # type: ignore[return-value]
        raise FetchRefused("too many redirects")

    @staticmethod
    def _resolve_location(current: HttpURL, location: str) -> HttpURL:
        if location.startswith("/") and not location.startswith("//"):
            return current.with_target(location)
        return parse_http_url(location)

    def _get(
        self, url: HttpURL, policy: AddressPolicy, send_credentials: bool, deadline: float
    ) -> tuple[int, str | None, bytes | None]:
        addresses = self._resolver(url.host, url.port)
        address = policy.check(url.host, addresses)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(f"download deadline of {self.timeout_seconds:g} s passed")
        connection = _PinnedConnection(url, address, remaining, self._connector, self._ssl_context)
        token: int | None = None
        try:
            try:
                connection.connect()
            except OSError as exc:
                raise ImageFetchError(f"cannot connect to {url.host_header}: {exc}") from None
            token = _WATCHDOG.watch(deadline, connection.sock)
            headers = {"Host": url.host_header, "User-Agent": USER_AGENT, "Accept": "image/*, */*;q=0.5",
                       "Accept-Encoding": "identity", "Connection": "close"}
            if send_credentials:
                authorization = self._authorization()
                if authorization:
                    headers["Authorization"] = authorization
            try:
                connection.putrequest("GET", url.target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers.items():
                    connection.putheader(name, value)
                connection.endheaders()
                response = connection.getresponse()
                status = response.status
                if status in (301, 302, 303, 307, 308):
                    return status, response.getheader("Location"), None
                if not 200 <= status < 300:
                    return status, None, None
                declared = response.getheader("Content-Length")
                if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
                    raise ImageFetchError(
                        f"image declares {int(declared)} bytes, more than MAX_IMAGE_BYTES={self.max_bytes}"
                    )
                chunks: list[bytes] = []
                total = 0
                while True:
                    if time.monotonic() >= deadline:
                        raise ImageFetchError(f"download deadline of {self.timeout_seconds:g} s passed")
                    chunk = response.read1(READ_CHUNK) if hasattr(response, "read1") else response.read(READ_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ImageFetchError(f"image is larger than MAX_IMAGE_BYTES={self.max_bytes}; stopped reading")
                    chunks.append(chunk)
                if time.monotonic() >= deadline:
                    raise ImageFetchError(f"download deadline of {self.timeout_seconds:g} s passed")
                if response.length not in (None, 0):
                    raise ImageFetchError(f"image download from {url.host_header} ended early")
                return status, None, b"".join(chunks)
            except ImageFetchError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                if time.monotonic() >= deadline - 0.01:
                    raise ImageFetchError(f"download deadline of {self.timeout_seconds:g} s passed") from None
                raise ImageFetchError(f"download from {url.host_header} failed: {type(exc).__name__}: {exc}") from None
        finally:
            if token is not None:
                _WATCHDOG.cancel(token)
            connection.close()


_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def authorization_header(token: str | None) -> str | None:
    """``Bearer`` for a JWT access token, ``Token`` for a legacy key (what Label Studio's file views accept)."""
    if not token:
        return None
    return f"Bearer {token}" if _JWT_RE.match(token) else f"Token {token}"
