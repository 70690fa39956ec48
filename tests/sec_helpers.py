"""Helpers for the adversarial suites (test_security*.py): a raw-socket HTTP client that controls
every byte, a TCP recorder standing in for an attacker's server, and a second broker process
serving the same DB as a conftest `Broker`.

Nothing here mocks the broker: every request crosses a real socket into `seks_broker.py serve`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from conftest import BROKER_PY, LISTEN_RE, START_TIMEOUT_S, Broker, FakeUpstream, HeaderLookup

RAW_TIMEOUT_S = 10.0


def load_broker_module() -> Any:
    """seks_broker as a module, loaded from the file the broker subprocesses run (BROKER_PY), so
    the pure-function tests and the socket tests always exercise the same code."""
    import importlib.util
    existing = sys.modules.get("seks_broker")
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == BROKER_PY:
        return existing
    name = "seks_broker" if existing is None else "seks_broker_under_test"
    spec = importlib.util.spec_from_file_location(name, str(BROKER_PY))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

# ============================================================================
# Raw-socket HTTP client
# ============================================================================


@dataclass
class RawResponse(HeaderLookup):
    """One response read off a raw socket. status 0 means the broker sent nothing at all."""
    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes
    raw: bytes                       # every byte received, response and anything after it
    closed: bool                     # the broker closed the connection after the response
    interim: List[int] = field(default_factory=list)   # 1xx statuses seen before the final one
    extra: bytes = b""               # bytes that arrived after the response (a second response?)


    def text(self) -> str:
        return self.raw.decode("latin-1")

    def __repr__(self) -> str:
        return f"RawResponse({self.status} {self.reason!r} closed={self.closed} raw={self.raw[:400]!r})"


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.raw = b""
        self.eof = False

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.raw += data
        return True

    def until(self, marker: bytes, limit: int = 1 << 20) -> Optional[bytes]:
        while marker not in self.buf:
            if len(self.buf) > limit or not self._more():
                return None
        idx = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:idx], self.buf[idx:]
        return out

    def exactly(self, n: int) -> Optional[bytes]:
        while len(self.buf) < n:
            if not self._more():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out


def read_response(sock: socket.socket, method: str = "GET", close_wait: float = 2.0,
                  reader: Optional[_Reader] = None) -> RawResponse:
    """Read one HTTP/1.1 response (skipping 1xx), then wait up to `close_wait` s to see whether
    the broker closes the connection (recv -> b'') or sends anything more."""
    rd = reader or _Reader(sock)
    interim: List[int] = []
    while True:
        head = rd.until(b"\r\n\r\n")
        if head is None:
            return RawResponse(0, "", [], b"", rd.raw, True, interim)
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    lower = {k.lower(): v for k, v in headers}
    body = b""
    if method == "HEAD" or status in (204, 304):
        pass
    elif "chunked" in lower.get("transfer-encoding", "").lower():
        while True:
            size_line = rd.until(b"\r\n")
            if size_line is None:
                break
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                rd.until(b"\r\n")
                break
            piece = rd.exactly(size)
            if piece is None:
                break
            body += piece
            rd.exactly(2)
    elif "content-length" in lower:
        body = rd.exactly(int(lower["content-length"])) or b""
    else:
        body = rd.rest()
    closed = rd.eof
    extra = b""
    if not closed:
        extra = rd.buf
        rd.buf = b""
        sock.settimeout(close_wait)
        try:
            data = sock.recv(65536)
            if data:
                extra += data
                rd.raw += data
            else:
                closed = True
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            closed = True
    return RawResponse(status, reason, headers, body, rd.raw, closed, interim, extra)


def raw_exchange(port: int, data: bytes, *, method: str = "", close_wait: float = 0.2,
                 timeout: float = RAW_TIMEOUT_S, shut_write: bool = False) -> RawResponse:
    """Send `data` on a fresh connection and read one response."""
    if not method:
        method = data.split(b" ", 1)[0].decode("latin-1", "replace")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker may answer and close before we are done sending
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return read_response(sock, method, close_wait)


def request_bytes(method: str, target: str, headers: Sequence[Tuple[str, str]] = (),
                  body: bytes = b"", version: str = "HTTP/1.1", host: Optional[str] = "broker") -> bytes:
    """Bytes of one request; the caller decides every header (no Content-Length is added)."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ============================================================================
# An attacker's server: records every TCP connection and every byte
# ============================================================================


class TcpRecorder:
    """Listens on 127.0.0.1; `.connections` holds the bytes of each accepted connection."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.connections: List[bytearray] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="attacker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            buf = bytearray()
            with self.lock:
                self.connections.append(buf)
            threading.Thread(target=self._drain, args=(conn, buf), daemon=True).start()

    def _drain(self, conn: socket.socket, buf: bytearray) -> None:
        conn.settimeout(0.5)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:
                    buf.extend(data)
        except OSError:
            pass
        finally:
            conn.close()

    def clear(self) -> None:
        with self.lock:
            self.connections.clear()

    def seen(self) -> List[bytes]:
        with self.lock:
            return [bytes(b) for b in self.connections]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def assert_no_traffic(upstreams: Dict[str, FakeUpstream], attacker: Optional[TcpRecorder],
                      what: str = "", settle: float = 0.05) -> None:
    """No FakeUpstream recorded a request and the attacker saw no connection at all."""
    time.sleep(settle)   # let a (wrong) connection reach the recorder threads
    for name, up in upstreams.items():
        with up.lock:
            got = [f"{r.method} {r.target}" for r in up.requests]
        assert not got, f"{what}: upstream {name} received {got}"
    if attacker is not None:
        seen = attacker.seen()
        assert not seen, f"{what}: attacker server got {len(seen)} connection(s): {seen[:2]!r}"


def requests_to(upstreams: Dict[str, FakeUpstream]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for name, up in upstreams.items():
        with up.lock:
            if up.requests:
                out[name] = [f"{r.method} {r.target}" for r in up.requests]
    return out


# ============================================================================
# A second broker process on the same DB (the conftest Broker always makes its own DB)
# ============================================================================

def spawn_and_wait(b: Broker, argv: List[str]) -> None:
    """Start `argv` as b's serve process (stderr to b.stderr_path) and wait for its listen line."""
    err = open(b.stderr_path, "wb")
    out = open(b.stdout_path, "wb")
    try:
        b.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  env=b.env, cwd=str(b.workdir))
    finally:
        err.close()
        out.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        m = LISTEN_RE.search(b.stderr_text())
        if m:
            b.host, b.port = m.group(1), int(m.group(2))
            b.url = f"http://127.0.0.1:{b.port}"
            return
        if b.proc.poll() is not None:
            raise RuntimeError(f"broker exited rc={b.proc.returncode}: {b.stderr_text()[-3000:]}")
        time.sleep(0.02)
    b.stop()
    raise RuntimeError(f"broker did not print its listening line: {b.stderr_text()[-3000:]}")


def second_process(first: Broker, name: str = "second") -> Broker:
    """Another `serve` process on the same DB (same env, secrets and tokens) as `first`."""
    b = object.__new__(Broker)
    b.workdir = first.workdir
    b.db = first.db
    b.env = dict(first.env)
    b.keys = dict(first.keys)
    b._tokens = dict(first._tokens)
    b.proc = None
    b.stderr_path = first.workdir / f"broker-{name}.stderr"
    b.stdout_path = first.workdir / f"broker-{name}.stdout"
    spawn_and_wait(b, [sys.executable, str(BROKER_PY), "--db", str(b.db), "serve",
                       "--host", "127.0.0.1", "--port", "0"])
    return b


# ============================================================================
# WebSocket: a recording upstream and a raw client
# ============================================================================

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _ws_mask(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_encode(opcode: int, payload: bytes, masked: bool, fin: bool = True, rsv1: bool = False) -> bytes:
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if masked:
        mask = os.urandom(4)
        return head + mask + _ws_mask(payload, mask)
    return head + payload


def ws_decode(rd: "_Reader") -> Optional[Tuple[bool, int, bytes]]:
    """One frame (fin, opcode, unmasked payload) or None at EOF."""
    b = rd.exactly(2)
    if b is None:
        return None
    fin, opcode, masked, n = bool(b[0] & 0x80), b[0] & 0x0F, bool(b[1] & 0x80), b[1] & 0x7F
    if n == 126:
        ext = rd.exactly(2)
        n = int.from_bytes(ext or b"\0\0", "big")
    elif n == 127:
        ext = rd.exactly(8)
        n = int.from_bytes(ext or bytes(8), "big")
    mask = rd.exactly(4) if masked else b""
    payload = rd.exactly(n) if n else b""
    if payload is None or mask is None:
        return None
    return fin, opcode, _ws_mask(payload, mask) if masked else payload


class WsConn:
    """One connection accepted by WsUpstream, as its behaviour function sees it."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self.sock = sock
        self.head = head
        self.rd = _Reader(sock)

    def header(self, name: str) -> Optional[str]:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    def accept(self, extra: Sequence[Tuple[str, str]] = ()) -> None:
        key = self.header("Sec-WebSocket-Key") or ""
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Accept: {accept}"] + [f"{k}: {v}" for k, v in extra]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def refuse(self, status: int, body: bytes, headers: Sequence[Tuple[str, str]] = ()) -> None:
        lines = [f"HTTP/1.1 {status} Refused"] + [f"{k}: {v}" for k, v in headers] + \
                [f"Content-Length: {len(body)}", "Connection: close"]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def send(self, opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> None:
        self.sock.sendall(ws_encode(opcode, payload, masked=False, fin=fin, rsv1=rsv1))

    def recv(self) -> Optional[Tuple[bool, int, bytes]]:
        return ws_decode(self.rd)


class WsUpstream:
    """A loopback WebSocket server. `.heads` records each handshake request head; `.frames`
    every (opcode, payload) the broker sent; `.behaviour(conn)` answers (default: accept, echo)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.heads: List[bytes] = []
        self.frames: List[Tuple[int, bytes]] = []
        self.behaviour: Callable[[WsConn], None] = self.echo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ws-upstream", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self.lock:
            self.heads.clear()
            self.frames.clear()
            self.behaviour = self.echo

    def echo(self, conn: WsConn) -> None:
        conn.accept()
        self.pump(conn, echo=True)

    def pump(self, conn: WsConn, echo: bool = False) -> None:
        """Record the broker's frames until close; echo data frames if asked."""
        while True:
            frame = conn.recv()
            if frame is None:
                return
            fin, opcode, payload = frame
            with self.lock:
                self.frames.append((opcode, payload))
            if opcode == 0x8:
                try:
                    conn.send(0x8, payload[:2])
                except OSError:
                    pass
                return
            if echo and opcode in (0x1, 0x2):
                conn.send(opcode, payload)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        s.settimeout(10)
        try:
            rd = _Reader(s)
            head = rd.until(b"\r\n\r\n")
            if head is None:
                return
            with self.lock:
                self.heads.append(head)
            conn = WsConn(s, head)
            conn.rd = rd
            self.behaviour(conn)
        except OSError:
            pass
        finally:
            s.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class WsClient:
    """A raw WebSocket client (frames masked, as RFC 6455 requires of clients)."""

    def __init__(self, port: int, target: str, headers: Sequence[Tuple[str, str]] = (),
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        hs = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key),
              ("Sec-WebSocket-Version", "13")] + list(headers)
        self.sock.sendall(request_bytes("GET", target, hs))
        self.rd = _Reader(self.sock)
        head = self.rd.until(b"\r\n\r\n") or b""
        self.head = head
        self.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        self.body = b""
        if self.status != 101:
            m = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
            if m:
                self.body = self.rd.exactly(int(m[0].split(b":")[1])) or b""

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(ws_encode(opcode, payload, masked=True, fin=fin))

    def recv(self) -> Optional[Tuple[bool, int, bytes]]:
        try:
            return ws_decode(self.rd)
        except socket.timeout:
            return None

    def recv_all(self, limit: float = 3.0) -> List[Tuple[bool, int, bytes]]:
        """Frames until the broker closes (or `limit` seconds)."""
        self.sock.settimeout(limit)
        out = []
        while True:
            frame = self.recv()
            if frame is None:
                return out
            out.append(frame)
            if frame[1] == 0x8:
                return out

    def close(self) -> None:
        self.sock.close()
