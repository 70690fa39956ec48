"""Shared fixtures and helpers: real broker subprocesses in front of real loopback upstreams.

Nothing of the broker is mocked. Each test talks to `seks_broker.py serve` over a real socket on
127.0.0.1; the broker forwards to `FakeUpstream` servers (one per provider) that record every
request they receive and check that the *real* key arrived where that provider expects it (they
answer 401 otherwise, like the real APIs do).

Layout of this file:
  constants → small shared helpers → HTTP client helpers → FakeUpstream (and the attacker's
  recorder) → the broker (its DB, seeded in-process, and its serve process) → pytest fixtures.
Raw-socket HTTP is in raw_http.py, WebSockets in ws_helpers.py, certificates and the Prometheus
parser in ops_helpers.py.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import hashlib
import http.client
import importlib.util
import itertools
import json
import os
import py_compile
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

import cli_fork
from raw_http import HeaderLookup, LoopbackServer, SocketReader

# ============================================================================
# Constants
# ============================================================================

ROOT = Path(__file__).resolve().parent.parent
# SEKS_TEST_BROKER runs the suite against another copy of the broker (e.g. an installed one).
BROKER_PY = Path(os.environ.get("SEKS_TEST_BROKER") or ROOT / "seks_broker.py").resolve()

PROVIDERS: Tuple[str, ...] = (
    "openai", "anthropic", "gemini", "groq", "discord",
    "telegram", "github", "notion", "cloudflare", "brave",
)

# Obviously fake "real" keys. Distinct, none a substring of another.
REAL_KEYS: Dict[str, str] = {
    "openai": "sk-test-openai-0123456789abcdef",
    "anthropic": "sk-ant-test-anthropic-0123456789abcdef",
    "gemini": "AIzaTest-gemini-0123456789abcdef",
    "groq": "gsk_test_groq_0123456789abcdef",
    "discord": "test-discord-bot-0123456789abcdef",
    "telegram": "1234567890:AAtest-telegram-0123456789abcdef",
    "github": "ghp_test_github_0123456789abcdef",
    "notion": "secret_test_notion_0123456789abcdef",
    "cloudflare": "test-cloudflare-0123456789abcdef",
    "brave": "test-brave-0123456789abcdef",
}

BEARER_PROVIDERS = ("openai", "groq", "github", "notion", "cloudflare")

MASTER_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode("ascii")

# The line `serve` prints once it listens (a TLS listener says https; --admin-port adds its port).
READY_RE = re.compile(r"seks-broker listening on (https?)://([0-9.]+):(\d+)"
                      r"(?: and https?://\[::1\]:\d+)?(?: \(admin on http://([0-9.]+):(\d+)\))?")

CLI_TIMEOUT_S = 30.0
START_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 15.0

# Bodies larger than this are not kept in RecordedRequest.body (only length + sha256).
RECORD_BODY_LIMIT = 8 * 1024 * 1024


def secret_name(provider: str) -> str:
    return f"{provider}-key"


def agent_name(provider: str) -> str:
    return f"agent-{provider}"


# ============================================================================
# Small shared helpers
# ============================================================================


def load_broker_module() -> Any:
    """seks_broker as a module, loaded from the file the broker subprocesses run (BROKER_PY), so
    the pure-function tests, the in-process seeding and the socket tests all use the same code."""
    existing = sys.modules.get("seks_broker")
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == BROKER_PY:
        return existing
    name = "seks_broker" if existing is None else "seks_broker_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(BROKER_PY))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def ok(cp: subprocess.CompletedProcess) -> str:
    """The stdout of a command that must have succeeded."""
    assert cp.returncode == 0, f"rc={cp.returncode}\nstdout={cp.stdout}\nstderr={cp.stderr}"
    return cp.stdout


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Poll `pred` until it holds or `timeout` seconds pass; its last answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def fresh_agent(prefix: str = "agent") -> str:
    """An agent name no other test uses (so counters, usage and audit rows are this test's)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def random_part(token: str) -> str:
    """The random part of a fake token (what must never be shown or stored)."""
    m = re.search(r"seks_[a-z-]+_([A-Za-z0-9_-]+)$", token)
    assert m, token
    return m.group(1)


def unknown_token(provider: str = "openai") -> str:
    """A well-formed token of `provider` that no DB knows (Telegram-shaped for telegram)."""
    rand = secrets.token_urlsafe(32)
    return f"9876543210:seks_telegram_{rand}" if provider == "telegram" else f"seks_{provider}_{rand}"


def db_bytes(db: Path) -> bytes:
    """The DB and its WAL/SHM/journal companions (everything a backup could copy), key file excluded."""
    return b"".join(f.read_bytes() for f in sorted(db.parent.iterdir())
                    if f.name.startswith(db.name) and not f.name.endswith(".key") and f.is_file())


def parse_table(text: str) -> List[Dict[str, str]]:
    """A print_table table as dicts: columns are sliced at the header's column starts
    (column names may hold single spaces; columns are separated by two or more)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "empty table"
    cols = [(m.start(), m.group(0)) for m in re.finditer(r"\S+(?: \S+)*", lines[0])]
    rows = []
    for line in lines[1:]:
        rows.append({name: line[start:(cols[i + 1][0] if i + 1 < len(cols) else None)].strip()
                     for i, (start, name) in enumerate(cols)})
    return rows


def file_text(path: Path) -> str:
    """A process's captured output so far ('' before the file exists)."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then closed): a dead upstream, or a
    port to hand to --admin-port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_tcp_row(local_port: int, remote_port: int) -> Optional[List[str]]:
    """The fields of one loopback TCP connection's row in /proc/net/tcp(6), seen from its end on
    `local_port` (state at [3], "tx_queue:rx_queue" at [4]); [] if it is gone, None where there is
    no /proc (not Linux)."""
    found: Optional[List[str]] = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        found = []
        for row in rows:
            fields = row.split()
            if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == \
                    (local_port, remote_port):
                return fields
    return found


def deterministic_chunks(total: int, chunk: int = 1024 * 1024, seed: int = 1234) -> Iterator[bytes]:
    """`total` pseudo-random bytes in `chunk`-sized pieces, generated lazily (never all in memory)."""
    import random
    rng = random.Random(seed)
    left = total
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def sha256_of_chunks(total: int, chunk: int = 1024 * 1024, seed: int = 1234) -> str:
    h = hashlib.sha256()
    for piece in deterministic_chunks(total, chunk, seed):
        h.update(piece)
    return h.hexdigest()


# ============================================================================
# HTTP client helpers (http.client only)
# ============================================================================

HeaderInput = Union[None, Dict[str, str], Sequence[Tuple[str, str]]]


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def __iter__(self) -> Iterator[Any]:  # allows: status, headers, body = http_request(...)
        return iter((self.status, self.headers, self.body))

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def _header_items(headers: HeaderInput) -> List[Tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def send_request(
    conn: http.client.HTTPConnection,
    method: str,
    target: str,
    headers: HeaderInput = None,
    body: Union[None, bytes, str, Iterable[bytes]] = None,
) -> None:
    """Write one request on `conn`. `body` may be bytes or an iterable of byte chunks.

    If the headers ask for `Transfer-Encoding: chunked`, the body is chunk-encoded here; with an
    iterable body and no Content-Length/Transfer-Encoding header, chunked is used too.
    """
    items = _header_items(headers)
    names = {k.lower() for k, _ in items}
    if isinstance(body, str):
        body = body.encode("utf-8")
    chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in items)
    conn.putrequest(method, target, skip_host="host" in names,
                    skip_accept_encoding="accept-encoding" in names)
    for k, v in items:
        conn.putheader(k, v)
    if body is not None and not chunked and "content-length" not in names:
        if isinstance(body, (bytes, bytearray)):
            conn.putheader("Content-Length", str(len(body)))
        else:
            conn.putheader("Transfer-Encoding", "chunked")
            chunked = True
    conn.endheaders()
    if body is None:
        return
    pieces: Iterable[bytes] = [bytes(body)] if isinstance(body, (bytes, bytearray)) else body
    for piece in pieces:
        if not piece:
            continue
        if chunked:
            conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
        else:
            conn.send(piece)
    if chunked:
        conn.send(b"0\r\n\r\n")


def http_request(
    url: str,
    method: str = "GET",
    headers: HeaderInput = None,
    body: Union[None, bytes, str, Iterable[bytes]] = None,
    timeout: float = HTTP_TIMEOUT_S,
    context: Optional[ssl.SSLContext] = None,
) -> Response:
    """One request on a fresh connection (http, or https with `context`) to 127.0.0.1; returns
    Response(status, headers, body) (also unpackable)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1", url
    target = url[len(f"{parts.scheme}://{parts.netloc}"):] or "/"
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=timeout)
    try:
        send_request(conn, method, target, headers, body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def call(broker: "Broker", provider: str, token: str, method: str = "GET", path: str = "/v1/models",
         body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
         timeout: float = 30.0) -> Response:
    """One request for `provider` carrying `token` the way that provider's client does.
    For telegram, `path` is the method part (`/sendMessage`) and the token goes in the path."""
    if provider == "telegram":
        target = f"/telegram/bot{token}{path}"
    else:
        target = f"/{provider}{path}"
    hs = {**auth_headers(provider, token), **(headers or {})}
    if body is not None:
        hs.setdefault("Content-Type", "application/json")
    return http_request(broker.url + target, method, hs, body, timeout)


def error_type_and_message(resp: Response) -> Tuple[str, str]:
    """Parse the broker's `{"error": {"type": ..., "message": ...}}` body (asserting its shape).
    Telegram routes answer in Telegram's own shape `{"ok": false, "error_code", "description"}`
    (aiogram parses every answer that way); the type is then derived from the status."""
    data = resp.json()
    if isinstance(data, dict) and data.get("ok") is False and "error_code" in data:
        assert data["error_code"] == resp.status, resp.body[:500]
        assert isinstance(data.get("description"), str), resp.body[:500]
        kinds = {400: "invalid_request", 401: "authentication_error", 403: "permission_denied",
                 404: "not_found", 413: "payload_too_large", 429: "rate_limited",
                 502: "upstream_error", 504: "upstream_timeout"}
        return kinds.get(resp.status, "error"), data["description"]
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), resp.body[:500]
    err = data["error"]
    assert isinstance(err.get("type"), str) and isinstance(err.get("message"), str), resp.body[:500]
    return err["type"], err["message"]


# Where each provider's official clients put the credential: (header, value prefix). Gemini
# and Telegram have other places too (?key=, the path) and are handled where it matters.
KEY_HEADERS: Dict[str, Tuple[str, str]] = {
    **{p: ("Authorization", "Bearer ") for p in BEARER_PROVIDERS},
    "anthropic": ("x-api-key", ""), "gemini": ("x-goog-api-key", ""), "discord": ("Authorization", "Bot "),
    "brave": ("X-Subscription-Token", ""),
}


def auth_headers(provider: str, token: str) -> Dict[str, str]:
    """Headers an official client sends to carry `token` (empty for telegram: it is in the path)."""
    if provider == "telegram":
        return {}
    name, prefix = KEY_HEADERS[provider]
    return {name: prefix + token}


# ============================================================================
# FakeUpstream: a recording loopback HTTP/1.1 server
# ============================================================================


@dataclass
class RecordedRequest(HeaderLookup):
    """One request as the upstream saw it on the wire."""
    method: str
    target: str                      # raw request target: path + "?" + query, exactly as received
    headers: List[Tuple[str, str]]   # in arrival order, duplicates kept
    body: Optional[bytes]            # None when larger than RECORD_BODY_LIMIT
    body_len: int
    body_sha256: str
    chunked: bool                    # request body arrived with Transfer-Encoding: chunked
    received_at: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> Dict[str, List[str]]:
        q = self.target.split("?", 1)[1] if "?" in self.target else ""
        return urllib.parse.parse_qs(q, keep_blank_values=True)

    def header_names(self) -> List[str]:
        return [k.lower() for k, _ in self.headers]

    def wire_text(self) -> str:
        """Everything received, as one string, for 'is X anywhere?' checks."""
        head = self.method + " " + self.target + "\n" + "\n".join(f"{k}: {v}" for k, v in self.headers)
        body = (self.body or b"").decode("latin-1")
        return head + "\n\n" + body + "\n" + urllib.parse.unquote(self.target)


Responder = Callable[["UpstreamHandler", RecordedRequest], None]


class UpstreamHandler(BaseHTTPRequestHandler):
    """Reads the request (Content-Length or chunked), records it, then calls the upstream's responder.

    Responders answer with the send_* helpers below.
    """
    protocol_version = "HTTP/1.1"
    timeout = 60  # per-socket-operation timeout so a stuck broker cannot pin the thread forever
    server: "_UpstreamServer"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- request side ---------------------------------------------------------------------------
    def _read_body(self) -> Tuple[Optional[bytes], int, str, bool]:
        h = hashlib.sha256()
        kept = bytearray()
        total = 0
        keep = True

        def take(data: bytes) -> None:
            nonlocal total, keep
            h.update(data)
            total += len(data)
            if keep:
                if total > RECORD_BODY_LIMIT:
                    keep = False
                    kept.clear()
                else:
                    kept.extend(data)

        def read_exactly(left: int, eof: str) -> None:
            while left:
                data = self.rfile.read(min(left, 1024 * 1024))
                if not data:
                    raise ConnectionError(eof)
                take(data)
                left -= len(data)

        te = ",".join(self.headers.get_all("Transfer-Encoding") or []).lower()
        if "chunked" in te:
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionError("eof in chunk size")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:  # trailers
                        t = self.rfile.readline(65536)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                read_exactly(size, "eof in chunk")
                self.rfile.readline(16)  # CRLF after the chunk
            return (bytes(kept) if keep else None), total, h.hexdigest(), True
        cl = self.headers.get("Content-Length")
        if cl is not None:
            read_exactly(int(cl), "eof in body")
        return (bytes(kept) if keep else None), total, h.hexdigest(), False

    def _handle(self) -> None:
        body, n, digest, chunked = self._read_body()
        req = RecordedRequest(self.command, self.path, list(self.headers.items()), body, n, digest, chunked)
        up = self.server.upstream
        with up.lock:
            up.requests.append(req)
            responder = up.responder
        try:
            responder(self, req)
        except (BrokenPipeError, ConnectionResetError) as exc:
            up.errors.append(f"{type(exc).__name__}: {exc}")
            self.close_connection = True
        except Exception as exc:  # a responder bug must be visible in the test, not silent
            up.errors.append(f"{type(exc).__name__}: {exc}")
            self.close_connection = True
            raise

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    # -- response helpers -----------------------------------------------------------------------
    def send_head(self, status: int, headers: Sequence[Tuple[str, str]] = ()) -> None:
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()

    def send_bytes(self, status: int, body: bytes, headers: Sequence[Tuple[str, str]] = (),
                   content_type: str = "application/octet-stream") -> None:
        hs = list(headers)
        if not any(k.lower() == "content-type" for k, _ in hs):
            hs.append(("Content-Type", content_type))
        hs.append(("Content-Length", str(len(body))))
        self.send_head(status, hs)
        if self.command != "HEAD" and status not in (204, 304) and body:
            self.wfile.write(body)
            self.wfile.flush()

    def send_json(self, status: int, obj: Any, headers: Sequence[Tuple[str, str]] = ()) -> None:
        self.send_bytes(status, json.dumps(obj).encode("utf-8"), headers, "application/json")

    def send_stream(self, status: int, chunks: Iterable[bytes], headers: Sequence[Tuple[str, str]] = (),
                    length: Optional[int] = None, delay: float = 0.0) -> None:
        """Stream `chunks`; with `length` as Content-Length, otherwise chunked transfer encoding."""
        hs = list(headers)
        hs.append(("Content-Length", str(length)) if length is not None else ("Transfer-Encoding", "chunked"))
        self.send_head(status, hs)
        for piece in chunks:
            if not piece:
                continue
            if length is None:
                self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            else:
                self.wfile.write(piece)
            self.wfile.flush()
            if delay:
                time.sleep(delay)
        if length is None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def send_sse(self, events: Sequence[bytes], delay: float, framing: str = "chunked") -> None:
        """Send server-sent events one at a time: write, flush, note the send time, sleep `delay`.

        framing "chunked": Transfer-Encoding chunked; "close": no length, end of body = connection close.
        Send times (time.monotonic) are appended to self.server.upstream.sse_sent_at.
        """
        up = self.server.upstream
        hs = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        if framing == "chunked":
            hs.append(("Transfer-Encoding", "chunked"))
        else:
            hs.append(("Connection", "close"))
            self.close_connection = True
        self.send_head(200, hs)
        for i, ev in enumerate(events):
            if i:
                time.sleep(delay)
            self.wfile.write((b"%x\r\n" % len(ev) + ev + b"\r\n") if framing == "chunked" else ev)
            self.wfile.flush()
            up.sse_sent_at.append(time.monotonic())
        if framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


def key_check_failure(provider: str, key: str, req: RecordedRequest) -> Optional[str]:
    """None if `req` carries the real `key` in the provider's style, else why not."""
    if provider in KEY_HEADERS and provider != "gemini":
        name, prefix = KEY_HEADERS[provider]
        vals = req.header_all(name)
        return None if vals == [prefix + key] else f"{name}={vals!r}"
    if provider == "gemini":
        hv = req.header_all("x-goog-api-key")
        qv = req.query.get("key", [])
        if not hv and not qv:
            return "no x-goog-api-key header and no ?key="
        if hv and hv != [key]:
            return f"x-goog-api-key={hv!r}"
        if qv and qv != [key]:
            return f"key={qv!r}"
        return None
    if provider == "telegram":
        p = req.path
        if p.startswith(f"/bot{key}/") or p.startswith(f"/file/bot{key}/"):
            return None
        return f"path={p!r}"
    raise AssertionError(provider)


def default_responder(provider: str, key: str) -> Responder:
    """Like a real API: 401 unless the real key is where the provider expects it; else echo JSON."""
    def echo(h: UpstreamHandler, req: RecordedRequest) -> None:
        h.send_json(200, {"ok": True, "provider": provider, "method": req.method,
                          "path": req.path, "body_len": req.body_len},
                    headers=[("X-Upstream", provider)])
    return key_checked(provider, echo, key)


def key_checked(provider: str, respond: Responder, key: Optional[str] = None) -> Responder:
    """A responder that answers 401 like the real API unless the real key arrived where
    `provider` expects it, and otherwise calls `respond`."""
    def wrapper(h: UpstreamHandler, req: RecordedRequest) -> None:
        if key_check_failure(provider, key if key is not None else REAL_KEYS[provider], req) is not None:
            h.send_json(401, {"error": {"message": "fake upstream: invalid key"}})
            return
        respond(h, req)
    return wrapper


class _UpstreamServer(ThreadingHTTPServer):
    """Counts the TCP connections it accepts; with an SSL context, speaks TLS on each of them."""
    daemon_threads = True
    # stop() does not wait for the handler threads: a broker keeps upstream connections in its
    # pool until it exits, and the brokers of a module may still be shutting down (stop_all)
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128    # listen backlog: tests open dozens of connections at once
    upstream: "FakeUpstream"
    ssl_context: Optional[ssl.SSLContext] = None

    def get_request(self) -> Tuple[Any, Any]:
        sock, addr = self.socket.accept()
        # a head and then a body are two writes: without NODELAY the body waits for the
        # broker's (delayed, ~40 ms) ACK of the head. Real API servers set it too.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.upstream.lock:
            self.upstream.accepted += 1
            self.upstream.peers.append(addr[1])
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(10)
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                with self.upstream.lock:
                    self.upstream.handshake_failures.append(f"{type(exc).__name__}: {exc}")
                return
        super().finish_request(request, client_address)


class FakeUpstream:
    """A loopback HTTP/1.1 server standing in for one provider's API.

    .requests: every RecordedRequest received; .responder: the function answering (reset() restores
    the key-checking default); .sse_sent_at: monotonic send times of SSE events; .errors: responder
    errors; .accepted / .peers: TCP connections accepted (and their client ports). With `tls`
    (cert, key) it speaks HTTPS; failed TLS handshakes are in .handshake_failures.
    """

    def __init__(self, provider: str, key: Optional[str] = None,
                 tls: Optional[Tuple[Path, Path]] = None) -> None:
        self.provider = provider
        self.key = key if key is not None else REAL_KEYS[provider]
        self.lock = threading.Lock()
        self.requests: List[RecordedRequest] = []
        self.sse_sent_at: List[float] = []
        self.errors: List[str] = []
        self.accepted = 0
        self.peers: List[int] = []
        self.handshake_failures: List[str] = []
        self.release = threading.Event()  # set at stop(); responders that hang wait on it
        self.responder: Responder = default_responder(provider, self.key)
        self._server = _UpstreamServer(("127.0.0.1", 0), UpstreamHandler)
        self._server.upstream = self
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.ssl_context = ctx
            scheme = "https"
        self.port: int = self._server.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"upstream-{provider}", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.sse_sent_at.clear()
            self.errors.clear()
            self.accepted = 0
            self.peers.clear()
            self.handshake_failures.clear()
            self.responder = default_responder(self.provider, self.key)

    def set_responder(self, fn: Responder) -> None:
        with self.lock:
            self.responder = fn

    def only_request(self) -> RecordedRequest:
        with self.lock:
            assert len(self.requests) == 1, f"{self.provider} upstream got {len(self.requests)} requests"
            return self.requests[0]

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def hanging_upstream(provider: str) -> FakeUpstream:
    """An upstream that reads the request and never answers (until it is stopped)."""
    up = FakeUpstream(provider)

    def hang(h: UpstreamHandler, req: RecordedRequest) -> None:
        up.release.wait(30)
        h.close_connection = True

    up.set_responder(hang)
    return up


# ============================================================================
# The attacker's server, and "nobody received anything"
# ============================================================================


class TcpRecorder(LoopbackServer):
    """Listens on 127.0.0.1 for an attacker; `seen()` holds the bytes of each accepted
    connection. It never answers."""

    def __init__(self) -> None:
        self.readers: List[SocketReader] = []
        super().__init__("attacker")

    def serve(self, sock: socket.socket) -> None:
        rd = SocketReader(sock)
        with self.lock:
            self.readers.append(rd)
        sock.settimeout(0.5)
        try:
            rd.rest()
        except OSError:
            pass
        finally:
            sock.close()

    def clear(self) -> None:
        with self.lock:
            self.readers.clear()
            self.connections = 0

    def seen(self) -> List[bytes]:
        with self.lock:
            return [rd.raw for rd in self.readers]


def requests_to(upstreams: Dict[str, FakeUpstream]) -> Dict[str, List[str]]:
    """{provider: ["METHOD target", ...]} for every upstream that received a request."""
    out: Dict[str, List[str]] = {}
    for name, up in upstreams.items():
        with up.lock:
            if up.requests:
                out[name] = [f"{r.method} {r.target}" for r in up.requests]
    return out


def assert_no_traffic(upstreams: Dict[str, FakeUpstream], attacker: Optional[TcpRecorder] = None,
                      what: str = "", settle: float = 0.05) -> None:
    """No FakeUpstream recorded a request and the attacker saw no connection at all, `settle`
    seconds after the answer (a wrong connection would be on its way by then)."""
    if settle:
        time.sleep(settle)
    got = requests_to(upstreams)
    assert not got, f"{what}: upstream(s) received {got}"
    if attacker is not None:
        seen = attacker.seen()
        assert not seen, f"{what}: attacker server got {len(seen)} connection(s): {seen[:2]!r}"


def assert_token_absent(req: RecordedRequest, token: str) -> None:
    """The fake token (or its random part) must appear nowhere the upstream could see."""
    wire = req.wire_text()
    m = re.search(r"seks_[a-z]+_([A-Za-z0-9_-]+)$", token)
    rand = m.group(1) if m else token
    assert token not in wire, f"fake token reached upstream: {req.method} {req.target}"
    assert rand not in wire, f"fake token's random part reached upstream: {req.method} {req.target}"
    assert "seks_" not in wire.lower(), f"'seks_' reached upstream: {req.method} {req.target}"


# ============================================================================
# The broker: its DB (seeded in-process, or through the real CLI) and its serve processes
# ============================================================================


def broker_env(upstream_urls: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, str]] = None,
               master_key: Optional[str] = MASTER_KEY) -> Dict[str, str]:
    """A clean environment: no inherited SEKS_* or proxy variables. master_key None: the
    commands use (and create) the key file <db>.key."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("SEKS_") and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    if master_key is not None:
        env["SEKS_MASTER_KEY"] = master_key
    for provider, url in (upstream_urls or {}).items():
        env[f"SEKS_UPSTREAM_{provider.upper()}"] = url
    env.update(extra or {})
    return env


_BYTECODE_READY: List[bool] = []


def broker_command(env: Dict[str, str], python: str = sys.executable) -> Tuple[List[str], Dict[str, str]]:
    """(argv prefix, env) that run BROKER_PY as a command: `python -m seks_broker` with its
    bytecode compiled once per session, else `python seks_broker.py`.

    A script's bytecode is never cached, so `python seks_broker.py` compiles its ~9,000 lines
    again at every start (about half the cost of a short command); run as a module (as the
    installed `seks-broker` command imports it) it loads the compiled file. The code that runs is
    the same: `__name__` is "__main__", and sys.argv[0] and __file__ are BROKER_PY's absolute path
    either way. Tests about the README's `python3 seks_broker.py` spelling start it themselves."""
    if not _BYTECODE_READY:
        try:                                # beside the source, where an import looks for it
            py_compile.compile(str(BROKER_PY), doraise=True)
            _BYTECODE_READY.append(True)
        except (OSError, py_compile.PyCompileError):    # e.g. a read-only installed copy
            _BYTECODE_READY.append(False)
    if python != sys.executable or not _BYTECODE_READY[0]:
        return [python, str(BROKER_PY)], env
    path = os.pathsep.join(p for p in (str(BROKER_PY.parent), env.get("PYTHONPATH", "")) if p)
    return [python, "-m", BROKER_PY.stem], {**env, "PYTHONPATH": path}


def run_cli(db: Union[str, Path], *args: str, input: Optional[str] = None,
            env: Optional[Dict[str, str]] = None, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python3 seks_broker.py --db DB ARGS...` (started as broker_command says): the real CLI,
    text stdin/stdout/stderr captured. A separate process each time; forked from one that has
    imported the broker already where cli_fork.py says that is the same, else a Python start."""
    return run_command(["--db", str(db), *args], input=input, env=env, cwd=Path(db).parent,
                       timeout=timeout)


def run_command(argv: Sequence[str], input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                cwd: Optional[Path] = None, timeout: float = CLI_TIMEOUT_S,
                fork: bool = True) -> subprocess.CompletedProcess:
    """`python3 seks_broker.py ARGV...` in cwd (this process's by default), as run_cli runs it;
    fork=False: always a Python start."""
    cmd, run_env = broker_command(env if env is not None else broker_env())
    where = str(cwd) if cwd else os.getcwd()
    done = None
    if fork and cmd[1] == "-m" and not os.environ.get("SEKS_TEST_NO_FORK"):
        done = cli_fork.fork_run(BROKER_PY, cmd, argv, input or "", run_env, where, timeout,
                                 server_env=broker_command(broker_env(master_key=None))[1])
    return done or subprocess.run([*cmd, *argv], input=input or "", capture_output=True, text=True,
                                  timeout=timeout, env=run_env, cwd=where)


_MINT_PARSER: List[Any] = []
_PROVIDERS_CACHE: Dict[Optional[str], Dict[str, Any]] = {}
_SERVE_COUNT = itertools.count(1)


def _mint_args(flags: Sequence[str]) -> Any:
    """`token mint` flags parsed by the broker's own CLI parser (the same names, checks, repeats)."""
    if not _MINT_PARSER:
        _MINT_PARSER.append(load_broker_module().build_parser()[0])
    return _MINT_PARSER[0].parse_args(["token", "mint", *flags])


def _providers(config: Optional[Path]) -> Dict[str, Any]:
    """The broker's providers (built-in plus the config file's custom ones), as a command sees them."""
    key = str(config) if config else None
    if key not in _PROVIDERS_CACHE:
        sb = load_broker_module()
        _PROVIDERS_CACHE[key] = sb.load_providers(sb.resolve_settings(key, {}, {}), strict=False)
    return _PROVIDERS_CACHE[key]


class Broker:
    """A broker under test: its database (secrets, tokens, the environment its commands run in, an
    optional config file) and, once started, one `seks_broker.py serve` subprocess on 127.0.0.1.

    `seed_broker()` makes the database; `.serve(*flags, env=, config=, python=, name=)` starts a
    serve process on it and returns it as a Broker sharing the DB, keys and tokens (call it again
    for a second process on the same DB). The process side: `.url`, `.port`, `.scheme` (https
    with --tls-cert), `.admin_port`, `.ready_line`, stderr/stdout, `signal`, `wait`, `stop` (by PID).

    Setup writes (secrets, tokens) run in this process through seks_broker's own Store and
    cipher, which is what `secret add` and `token mint` do, minus a Python start each; a broker
    made with `via_cli=True` (or a call with via_cli=True) runs the real CLI instead, for tests
    whose subject is the CLI; `.cli()` always runs the real CLI.
    """

    def __init__(self, db: Path, env: Dict[str, str], keys: Optional[Dict[str, str]] = None,
                 config: Optional[Path] = None, via_cli: bool = False) -> None:
        self.db = Path(db)
        self.via_cli = via_cli                  # every write through the real CLI (test_cli.py)
        self.workdir = self.db.parent
        self.env = env
        self.keys: Dict[str, str] = keys if keys is not None else dict(REAL_KEYS)
        self.config = config
        self.tokens: Dict[str, str] = {}        # the token seeded for each provider
        self.proc: Optional[subprocess.Popen] = None
        self.pid = 0
        self.scheme, self.host, self.port, self.url = "http", "127.0.0.1", 0, ""
        self.admin_port: Optional[int] = None
        self.ready_line = ""
        self.stderr_path = self.workdir / "not-started.stderr"
        self.stdout_path = self.workdir / "not-started.stdout"

    def __repr__(self) -> str:
        return f"Broker({self.db}, pid={self.pid or None}, url={self.url or None})"

    # -- the DB: secrets, tokens, the CLI -------------------------------------------------------
    def token(self, provider: str) -> str:
        return self.tokens[provider]

    def key(self, provider: str) -> str:
        return self.keys[provider]

    def cli(self, *args: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            timeout: float = CLI_TIMEOUT_S, db: Optional[Path] = None) -> subprocess.CompletedProcess:
        """The real CLI on this DB (with this broker's env and config file)."""
        pre = ("--config", str(self.config)) if self.config else ()
        return run_cli(db or self.db, *pre, *args, input=input,
                       env=env if env is not None else self.env, timeout=timeout)

    def _store(self) -> Any:
        return load_broker_module().Store(str(self.db))

    def add_secret(self, name: str, provider: str, value: str, via_cli: Optional[bool] = None) -> None:
        """`secret add NAME --provider P` with `value` on stdin."""
        if self.via_cli if via_cli is None else via_cli:
            ok(self.cli("secret", "add", name, "--provider", provider, input=value + "\n"))
            return
        sb = load_broker_module()
        provider = _providers(self.config)[provider].name
        store = self._store()
        try:
            master = sb.load_master_key(str(self.db), self.env, store)
            plain = sb.pack_parts(json.loads(value)) if value.startswith("{") else value.encode()
            ciphertext = sb.SecretCipher(master).encrypt(plain, sb.secret_ad(name, provider))
            store.put_secret(name, provider, ciphertext, replace=False, check=sb.derive_key(master, "key-check"))
        finally:
            store.close()

    def mint(self, provider: str, agent: Optional[str] = None, *flags: str, secret: Optional[str] = None,
             via_cli: Optional[bool] = None) -> str:
        """`token mint --secret <provider>-key --agent AGENT FLAGS...`: the new token."""
        argv = ["--secret", secret or secret_name(provider), "--agent", agent or agent_name(provider), *flags]
        if self.via_cli if via_cli is None else via_cli:
            lines = ok(self.cli("token", "mint", *argv)).strip().splitlines()
            assert len(lines) == 1, f"token mint printed {len(lines)} lines"
            return lines[0].strip()
        sb = load_broker_module()
        args = _mint_args(argv)
        store = self._store()
        try:                                        # what `token mint` runs, minus a Python start
            master = sb.load_master_key(str(self.db), self.env, store)
            token = sb.mint_token(store, master, _providers(self.config), args.secret, args.agent, args)[0]
        finally:
            store.close()
        return token

    def revoke(self, token: str) -> None:
        """`token revoke -` (the token on stdin), through the real CLI."""
        ok(self.cli("token", "revoke", "-", input=token + "\n"))

    # -- the serve process ----------------------------------------------------------------------
    def serve(self, *serve_args: str, env: Optional[Dict[str, str]] = None, config: Optional[Path] = None,
              python: str = sys.executable, port_flag: bool = True, name: str = "serve",
              timeout: float = START_TIMEOUT_S) -> "Broker":
        """`python seks_broker.py --db DB [--config F] serve --host 127.0.0.1 [--port 0] FLAGS`,
        waited for until it prints its listening line; returned as a Broker on the same DB."""
        b = copy.copy(self)
        if env is not None:
            b.env = env
        if config is not None:
            b.config = config
        b._start(list(serve_args), python, port_flag, f"{name}-{next(_SERVE_COUNT)}", timeout)
        return b

    def _start(self, serve_args: List[str], python: str, port_flag: bool, name: str, timeout: float) -> None:
        cmd, env = broker_command(self.env, python)
        cmd = [*cmd, "--db", str(self.db)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        cmd += ["serve", "--host", "127.0.0.1"] + (["--port", "0"] if port_flag else []) + serve_args
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.stdout_path = self.workdir / f"{name}.stdout"
        err = open(self.stderr_path, "wb")
        out = open(self.stdout_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=env, cwd=str(self.workdir))
        finally:
            err.close()
            out.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            m = READY_RE.search(self.stderr_text())
            if m:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited rc={self.proc.returncode}: {self.stderr_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"broker did not print its listening line: {self.stderr_text()[-3000:]}")
            time.sleep(0.01)
        text = self.stderr_text()
        end = text.find("\n", m.start())
        self.ready_line = text[m.start(): end if end >= 0 else len(text)]
        self.scheme, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
        assert self.host == "127.0.0.1", m.group(0)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.admin_port = int(m.group(5)) if m.group(5) else None

    # -- output ---------------------------------------------------------------------------------
    def stderr_text(self) -> str:
        return file_text(self.stderr_path)

    def stdout_text(self) -> str:
        return file_text(self.stdout_path)

    def lines_after_ready(self) -> List[str]:
        text = self.stderr_text()
        idx = text.find(self.ready_line)
        assert idx >= 0
        rest = text[idx + len(self.ready_line):]
        return [line for line in rest.split("\n")[1:] if line != ""]

    def wait_for_lines(self, n: int, timeout: float = 5.0) -> List[str]:
        """Request log lines are written after the answer: wait until at least n are there."""
        wait_until(lambda: len(self.lines_after_ready()) >= n, timeout)
        return self.lines_after_ready()

    def wait_for_log(self, pred: Callable[[str], Any], timeout: float = 10.0) -> str:
        """stderr once `pred(stderr)` holds (log lines are written after the answer), asserted."""
        assert wait_until(lambda: pred(self.stderr_text()), timeout), \
            f"the broker log never showed what was expected:\n{self.stderr_text()[-1500:]}"
        return self.stderr_text()

    # -- lifecycle ------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None if still running after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self, timeout: float = 8.0) -> Optional[int]:
        """SIGTERM by PID, wait, SIGKILL if it does not go. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    # -- requests -------------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: HeaderInput = None,
                body: Union[None, bytes, str, Iterable[bytes]] = None, timeout: float = HTTP_TIMEOUT_S,
                context: Optional[ssl.SSLContext] = None, port: Optional[int] = None) -> Response:
        """One request on a fresh connection to this broker's agent port (or `port`)."""
        return http_request(f"{self.scheme}://127.0.0.1:{port or self.port}{path}", method, headers, body,
                            timeout, context)

    def admin_get(self, path: str, port: Optional[int] = None) -> Response:
        p = port or self.admin_port
        assert p, "no admin port"
        return http_request(f"http://127.0.0.1:{p}{path}")

    def reset_peak_rss(self) -> None:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so a later peak is this test's."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def vm_hwm_bytes(self) -> Optional[int]:
        """Peak resident memory of the broker process (Linux), or None where /proc is missing."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.M)
        return int(m.group(1)) * 1024 if m else None


def seed_broker(workdir: Path, providers: Sequence[str] = PROVIDERS, *,
                upstream_urls: Optional[Dict[str, str]] = None, extra_env: Optional[Dict[str, str]] = None,
                env: Optional[Dict[str, str]] = None, keys: Optional[Dict[str, str]] = None,
                config: Optional[Path] = None, via_cli: bool = False) -> Broker:
    """A DB in `workdir` with, per provider, its secret `<provider>-key` (the value in `keys`,
    else REAL_KEYS) and one token for `agent-<provider>`. No process is started. via_cli: made
    (and later written) through the real CLI."""
    b = Broker(workdir / "seks.db", env if env is not None else broker_env(upstream_urls, extra_env),
               dict(REAL_KEYS, **(keys or {})), config, via_cli)
    if not via_cli:
        for p in providers:
            b.add_secret(secret_name(p), p, b.keys[p])
            b.tokens[p] = b.mint(p)
        return b
    # the real CLI: the first command makes the DB (and key file), the rest run side by side
    # (every write is its own BEGIN IMMEDIATE transaction, as with several operators at once)
    first, rest = providers[:1], list(providers[1:])
    for p in first:
        b.add_secret(secret_name(p), p, b.keys[p])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: b.add_secret(secret_name(p), p, b.keys[p]), rest))
        b.tokens.update(zip(providers, pool.map(b.mint, providers)))
    return b


def audit_json(broker: Broker, *args: str, db: Optional[Path] = None) -> List[Dict[str, Any]]:
    """The audit rows as `audit --json` prints them (real CLI), oldest first; `args` filter."""
    cp = run_cli(db or broker.db, "audit", "--json", "--limit", "1000000", *args, env=broker.env)
    return [json.loads(line) for line in ok(cp).splitlines() if line.strip()]


def fresh_token(broker: Broker, provider: str, *policy_flags: str, prefix: str = "agent") -> Tuple[str, str]:
    """(agent, token): a token of `provider` for a new agent of its own, limited by
    `policy_flags` as `token mint` takes them (--allow-method GET, --budget-tokens 100, ...)."""
    agent = fresh_agent(prefix)
    return agent, broker.mint(provider, agent, *policy_flags)


class Brokers:
    """Makes brokers for one fixture and stops every process it started (by PID) at its end.

    brokers(upstream_urls, extra_env, providers, serve_args=(), **seed options) -> a seeded,
    running Broker; .seed(providers, **options) -> a seeded DB, no process;
    .serve(base, *flags, **options) -> a process on base's DB."""

    def __init__(self, mktemp: Callable[[str], Path]) -> None:
        self._mktemp = mktemp
        self.started: List[Broker] = []

    def seed(self, providers: Sequence[str] = PROVIDERS, **options: Any) -> Broker:
        return seed_broker(self._mktemp("broker"), providers, **options)

    def serve(self, base: Broker, *serve_args: str, **options: Any) -> Broker:
        b = base.serve(*serve_args, **options)
        self.started.append(b)
        return b

    def __call__(self, upstream_urls: Optional[Dict[str, str]] = None, extra_env: Optional[Dict[str, str]] = None,
                 providers: Sequence[str] = PROVIDERS, *, serve_args: Sequence[str] = (), name: str = "broker",
                 **seed_options: Any) -> Broker:
        base = self.seed(providers, upstream_urls=upstream_urls, extra_env=extra_env, **seed_options)
        return self.serve(base, *serve_args, name=name)

    def stop_all(self) -> None:
        """SIGTERM to every process at once (they drain side by side); waiting for each to end
        (SIGKILL by PID if it does not) happens in the background, so the next test does not sit
        through their shutdown. The session's end waits for every one (_brokers_stopped)."""
        started, self.started = list(self.started), []
        for b in started:
            b.signal(signal.SIGTERM)

        def finish() -> None:
            for b in reversed(started):
                try:
                    b.stop()
                except Exception:  # noqa: BLE001 - stop the others regardless
                    b.kill()
        _STOPPING.submit(finish)


_STOPPING = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="broker-stop")


# ============================================================================
# Fixtures
# ============================================================================


@pytest.fixture(scope="session", autouse=True)
def _broker_exists() -> None:
    assert BROKER_PY.is_file(), f"{BROKER_PY} is missing"


@pytest.fixture(scope="session", autouse=True)
def _brokers_stopped() -> Iterator[None]:
    """At the session's end, every broker a fixture stopped (Brokers.stop_all) has ended."""
    yield
    _STOPPING.shutdown(wait=True)
    cli_fork.stop()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Dict[str, FakeUpstream]]:
    """One recording FakeUpstream per provider, shared by the module."""
    ups = {p: FakeUpstream(p) for p in PROVIDERS}
    yield ups
    for u in ups.values():
        u.stop()


@pytest.fixture(autouse=True)
def _reset_upstreams(request: pytest.FixtureRequest) -> None:
    """Each test starts with empty request logs and the default key-checking responders."""
    if "upstreams" in request.fixturenames:
        for u in request.getfixturevalue("upstreams").values():
            u.reset()


@pytest.fixture(scope="module")
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    """Brokers for the module (see Brokers), all stopped at module end."""
    brokers = Brokers(tmp_path_factory.mktemp)
    yield brokers
    brokers.stop_all()


@pytest.fixture
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    """Brokers for one test (see Brokers), all stopped when it ends, pass or fail."""
    brokers = Brokers(tmp_path_factory.mktemp)
    yield brokers
    brokers.stop_all()


@pytest.fixture(scope="module")
def broker(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    """The module's shared broker, every provider pointed at its FakeUpstream."""
    return broker_factory({p: u.url for p, u in upstreams.items()})


@pytest.fixture(scope="module")
def silent_upstream() -> Iterator[FakeUpstream]:
    """An anthropic upstream that reads every request and never answers (until the module ends)."""
    up = hanging_upstream("anthropic")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def _attacker_server() -> Iterator[TcpRecorder]:
    rec = TcpRecorder()
    yield rec
    rec.stop()


@pytest.fixture
def attacker(_attacker_server: TcpRecorder) -> TcpRecorder:
    """A server the attacker controls; every test starts with its log empty."""
    _attacker_server.clear()
    return _attacker_server


# ============================================================================
# WebSocket fakes shared by the WebSocket test modules (tests/ws_helpers.py)
# ============================================================================

@pytest.fixture(scope="module")
def realtime() -> Iterator[Any]:
    """A fake OpenAI Realtime server that requires the real Bearer key in the handshake."""
    from ws_helpers import FakeRealtime
    srv = FakeRealtime(REAL_KEYS["openai"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Any]:
    """A fake Discord gateway that requires the real token in IDENTIFY/RESUME."""
    from ws_helpers import FakeGateway
    srv = FakeGateway(REAL_KEYS["discord"])
    yield srv
    srv.stop()
