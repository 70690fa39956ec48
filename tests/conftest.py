"""Shared fixtures: a real broker subprocess in front of real loopback upstreams.

Nothing of the broker is mocked. Each test talks to `seks_broker.py serve` over a real
socket on 127.0.0.1; the broker forwards to `FakeUpstream` servers (one per provider) that
record every request they receive and check that the *real* key arrived where that
provider expects it (they answer 401 otherwise, like the real APIs do).

Layout of this file:
  constants (providers, fake real keys, paths) → HTTP client helpers → FakeUpstream →
  broker process wrapper → pytest fixtures.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
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

LISTEN_RE = re.compile(r"seks-broker listening on http://([0-9.]+):(\d+)")

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
) -> Response:
    """One request on a fresh connection; returns Response(status, headers, body) (also unpackable)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1", url
    target = url[len(f"{parts.scheme}://{parts.netloc}"):] or "/"
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=timeout)
    try:
        send_request(conn, method, target, headers, body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


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


def auth_headers(provider: str, token: str) -> Dict[str, str]:
    """Headers an official client sends to carry `token` (empty for telegram: it is in the path)."""
    if provider in BEARER_PROVIDERS:
        return {"Authorization": f"Bearer {token}"}
    if provider == "anthropic":
        return {"x-api-key": token}
    if provider == "gemini":
        return {"x-goog-api-key": token}
    if provider == "discord":
        return {"Authorization": f"Bot {token}"}
    if provider == "brave":
        return {"X-Subscription-Token": token}
    if provider == "telegram":
        return {}
    raise AssertionError(provider)


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound then closed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
# FakeUpstream: a recording loopback HTTP/1.1 server
# ============================================================================


def file_text(path: Path) -> str:
    """A process's captured output so far ('' before the file exists)."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class HeaderLookup:
    """Case-insensitive lookups over a ``headers`` list of (name, value) pairs."""

    headers: List[Tuple[str, str]]

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


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
                left = size
                while left:
                    data = self.rfile.read(min(left, 1024 * 1024))
                    if not data:
                        raise ConnectionError("eof in chunk")
                    take(data)
                    left -= len(data)
                self.rfile.readline(16)  # CRLF after the chunk
            return (bytes(kept) if keep else None), total, h.hexdigest(), True
        cl = self.headers.get("Content-Length")
        if cl is not None:
            left = int(cl)
            while left:
                data = self.rfile.read(min(left, 1024 * 1024))
                if not data:
                    raise ConnectionError("eof in body")
                take(data)
                left -= len(data)
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
    if provider in BEARER_PROVIDERS:
        vals = req.header_all("Authorization")
        return None if vals == [f"Bearer {key}"] else f"Authorization={vals!r}"
    if provider == "anthropic":
        vals = req.header_all("x-api-key")
        return None if vals == [key] else f"x-api-key={vals!r}"
    if provider == "discord":
        vals = req.header_all("Authorization")
        return None if vals == [f"Bot {key}"] else f"Authorization={vals!r}"
    if provider == "brave":
        vals = req.header_all("X-Subscription-Token")
        return None if vals == [key] else f"X-Subscription-Token={vals!r}"
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
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        why = key_check_failure(provider, key, req)
        if why is not None:
            h.send_json(401, {"error": {"message": "fake upstream: invalid key", "where": "key check"}})
            return
        h.send_json(200, {"ok": True, "provider": provider, "method": req.method,
                          "path": req.path, "body_len": req.body_len},
                    headers=[("X-Upstream", provider)])
    return respond


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    upstream: "FakeUpstream"


class FakeUpstream:
    """A loopback HTTP/1.1 server standing in for one provider's API.

    .requests: every RecordedRequest received; .responder: the function answering (reset() restores
    the key-checking default); .sse_sent_at: monotonic send times of SSE events; .errors: responder errors.
    """

    def __init__(self, provider: str, key: Optional[str] = None) -> None:
        self.provider = provider
        self.key = key if key is not None else REAL_KEYS[provider]
        self.lock = threading.Lock()
        self.requests: List[RecordedRequest] = []
        self.sse_sent_at: List[float] = []
        self.errors: List[str] = []
        self.release = threading.Event()  # set at stop(); responders that hang wait on it
        self.responder: Responder = default_responder(provider, self.key)
        self._server = _UpstreamServer(("127.0.0.1", 0), UpstreamHandler)
        self._server.upstream = self
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"upstream-{provider}", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.sse_sent_at.clear()
            self.errors.clear()
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


# ============================================================================
# Broker process
# ============================================================================


def broker_env(upstream_urls: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, str]] = None,
               master_key: Optional[str] = MASTER_KEY) -> Dict[str, str]:
    """A clean environment: no inherited SEKS_* or proxy variables."""
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


def run_cli(db: Union[str, Path], *args: str, input: Optional[str] = None,
            env: Optional[Dict[str, str]] = None, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python3 seks_broker.py --db DB ARGS...` with text stdin/stdout/stderr captured."""
    return subprocess.run(
        [sys.executable, str(BROKER_PY), "--db", str(db), *args],
        input=input if input is not None else "",
        capture_output=True, text=True, timeout=timeout,
        env=env if env is not None else broker_env(), cwd=str(Path(db).parent),
    )


class Broker:
    """A `seks_broker.py serve --port 0` subprocess with its own DB, secrets and one token per provider."""

    def __init__(self, workdir: Path, upstream_urls: Dict[str, str],
                 extra_env: Optional[Dict[str, str]] = None,
                 providers: Sequence[str] = PROVIDERS,
                 keys: Optional[Dict[str, str]] = None,
                 serve_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.db = workdir / "seks.db"
        self.env = broker_env(upstream_urls, extra_env)
        self.keys = dict(keys or REAL_KEYS)
        self._tokens: Dict[str, str] = {}
        self.proc: Optional[subprocess.Popen] = None
        self.stderr_path = workdir / "broker.stderr"
        self.stdout_path = workdir / "broker.stdout"
        for provider in providers:
            cp = self.cli("secret", "add", secret_name(provider), "--provider", provider,
                          input=self.keys[provider] + "\n")
            assert cp.returncode == 0, f"secret add {provider}: rc={cp.returncode} {cp.stderr}"
            self._tokens[provider] = self.mint(provider)
        self._start(serve_args)

    # -- CLI ----------------------------------------------------------------------------------
    def cli(self, *args: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return run_cli(self.db, *args, input=input, env=env if env is not None else self.env, timeout=timeout)

    def mint(self, provider: str, agent: Optional[str] = None, *extra: str) -> str:
        cp = self.cli("token", "mint", "--secret", secret_name(provider),
                      "--agent", agent or agent_name(provider), *extra)
        assert cp.returncode == 0, f"token mint {provider}: rc={cp.returncode} {cp.stderr}"
        lines = cp.stdout.strip().splitlines()
        assert len(lines) == 1, f"token mint printed {len(lines)} lines"
        return lines[0].strip()

    def token(self, provider: str) -> str:
        return self._tokens[provider]

    def key(self, provider: str) -> str:
        return self.keys[provider]

    # -- process ------------------------------------------------------------------------------
    def _start(self, serve_args: Sequence[str]) -> None:
        err = open(self.stderr_path, "wb")
        out = open(self.stdout_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(BROKER_PY), "--db", str(self.db), "serve",
                 "--host", "127.0.0.1", "--port", "0", *serve_args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env, cwd=str(self.workdir),
            )
        finally:
            err.close()
            out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(self.stderr_text())
            if m:
                assert m.group(1) == "127.0.0.1", m.group(0)
                self.host, self.port = m.group(1), int(m.group(2))
                self.url = f"http://127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited rc={self.proc.returncode}: {self.stderr_text()[-3000:]}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"broker did not print its listening line: {self.stderr_text()[-3000:]}")

    def stderr_text(self) -> str:
        return file_text(self.stderr_path)

    def stdout_text(self) -> str:
        return file_text(self.stdout_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate by PID, wait with a timeout, kill if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    # -- requests -----------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: HeaderInput = None,
                body: Union[None, bytes, str, Iterable[bytes]] = None,
                timeout: float = HTTP_TIMEOUT_S) -> Response:
        return http_request(self.url + path, method, headers, body, timeout)

    def reset_peak_rss(self) -> None:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so a later peak is this test's."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def vm_hwm_bytes(self) -> Optional[int]:
        """Peak resident memory of the broker process (Linux), or None where /proc is missing."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.M)
        return int(m.group(1)) * 1024 if m else None


# ============================================================================
# Fixtures
# ============================================================================


@pytest.fixture(scope="session", autouse=True)
def _broker_exists() -> None:
    assert BROKER_PY.is_file(), f"{BROKER_PY} is missing"


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
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Broker]]:
    """start(upstream_urls, extra_env=None, providers=PROVIDERS, ...) -> Broker; all stopped at module end."""
    started: List[Broker] = []

    def start(upstream_urls: Dict[str, str], extra_env: Optional[Dict[str, str]] = None,
              providers: Sequence[str] = PROVIDERS, **kw: Any) -> Broker:
        b = Broker(tmp_path_factory.mktemp("broker"), upstream_urls, extra_env, providers, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture(scope="module")
def broker(broker_factory: Callable[..., Broker], upstreams: Dict[str, FakeUpstream]) -> Broker:
    """The module's shared broker, every provider pointed at its FakeUpstream."""
    return broker_factory({p: u.url for p, u in upstreams.items()})


def assert_token_absent(req: RecordedRequest, token: str) -> None:
    """The fake token (or its random part) must appear nowhere the upstream could see."""
    wire = req.wire_text()
    m = re.search(r"seks_[a-z]+_([A-Za-z0-9_-]+)$", token)
    rand = m.group(1) if m else token
    assert token not in wire, f"fake token reached upstream: {req.method} {req.target}"
    assert rand not in wire, f"fake token's random part reached upstream: {req.method} {req.target}"
    assert "seks_" not in wire.lower(), f"'seks_' reached upstream: {req.method} {req.target}"


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
