"""HTTP/1.1 on a raw socket, every byte under the test's control: the one reader of heads and
answers for the whole suite (the security tests' raw client, the WebSocket stack's handshakes
and fake servers).

  * `SocketReader`   buffered reads off a socket (`until`, `exactly`, `rest`), keeping every byte
                     received in `.raw`; EOF or a reset reads as None; an optional deadline bounds
                     the whole read, not just each recv.
  * `HeaderLookup`   case-insensitive header lookups over (name, value) pairs.
  * `parse_head`     a head's first line and its (name, value) fields, in order, duplicates kept.
  * `request_bytes`  the bytes of one request; the caller decides every header.
  * `read_response`  one answer (1xx skipped and noted, any framing), then whether the peer closed
                     the connection or sent more (a second answer?) -> `RawResponse`.
  * `raw_exchange`   send bytes on a fresh connection to 127.0.0.1 and read one answer.
  * `LoopbackServer` a TCP listener on 127.0.0.1 that hands each connection to `serve(sock)` in a
                     thread of its own: the base of the fake servers that are not HTTP servers.

Standard library only, no pytest: ws_helpers (and scratch scripts) import it too.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

RAW_TIMEOUT_S = 10.0


class SocketReader:
    """Buffered reads off `sock`. EOF (or a reset) makes a read return None; silence past the
    socket's timeout (or past `deadline`, a time.monotonic() value) raises socket.timeout."""

    def __init__(self, sock: socket.socket, pending: bytes = b"", deadline: Optional[float] = None) -> None:
        self.sock = sock
        self.buf = bytes(pending)
        self.raw = bytes(pending)        # every byte received, whatever was consumed since
        self.eof = False
        self.deadline = deadline

    def _more(self) -> bool:
        if self.eof:
            return False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no complete read before the deadline")
            self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.raw += data
        return True

    def until(self, marker: bytes, limit: int = 1 << 20) -> Optional[bytes]:
        """Bytes up to and including `marker`; None at EOF or past `limit` bytes without it."""
        while marker not in self.buf:
            if len(self.buf) > limit or not self._more():
                return None
        idx = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:idx], self.buf[idx:]
        return out

    def head(self, limit: int = 65536) -> Optional[bytes]:
        """One HTTP head (status or request line and fields, CRLF CRLF included)."""
        return self.until(b"\r\n\r\n", limit)

    def exactly(self, n: int) -> Optional[bytes]:
        while len(self.buf) < n:
            if not self._more():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        """Everything until the peer closes."""
        while self._more():
            pass
        return self.take()

    def take(self) -> bytes:
        """The bytes read but not consumed yet (they now belong to the caller)."""
        out, self.buf = self.buf, b""
        return out


def parse_head(head: bytes) -> Tuple[str, List[Tuple[str, str]]]:
    """(first line, [(name, value), ...]) of a head; lines without a colon are skipped."""
    first, *lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            fields.append((k.strip(), v.strip()))
    return first, fields


def request_bytes(method: str, target: str, headers: Sequence[Tuple[str, str]] = (),
                  body: bytes = b"", version: str = "HTTP/1.1", host: Optional[str] = "broker") -> bytes:
    """Bytes of one request; the caller decides every header (no Content-Length is added)."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HeaderLookup:
    """Case-insensitive lookups over a ``headers`` list of (name, value) pairs, duplicates kept
    (shared by every recorded request, answer and handshake in the suite)."""

    headers: List[Tuple[str, str]]

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RawResponse(HeaderLookup):
    """One response read off a raw socket. status 0 means the peer sent no head at all."""
    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes
    raw: bytes                       # every byte received, response and anything after it
    closed: bool                     # the peer closed the connection after the response
    interim: List[int] = field(default_factory=list)   # 1xx statuses seen before the final one
    extra: bytes = b""               # bytes that arrived after the response (a second response?)

    def text(self) -> str:
        return self.raw.decode("latin-1")

    def __repr__(self) -> str:
        return f"RawResponse({self.status} {self.reason!r} closed={self.closed} raw={self.raw[:400]!r})"


def read_response(sock: socket.socket, method: str = "GET", close_wait: Optional[float] = 2.0,
                  reader: Optional[SocketReader] = None) -> RawResponse:
    """Read one HTTP/1.1 response (skipping 1xx), then wait up to `close_wait` s to see whether
    the peer closes the connection (recv -> b'') or sends anything more. close_wait None: do not
    wait (`closed` is then only true when the close was already seen)."""
    rd = reader or SocketReader(sock)
    interim: List[int] = []
    while True:
        head = rd.head(1 << 20)
        if head is None:
            return RawResponse(0, "", [], b"", rd.raw, True, interim)
        first, headers = parse_head(head)
        parts = first.split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
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
        extra = rd.take()
        if close_wait is not None:
            rd.deadline = None
            sock.settimeout(close_wait)
            try:
                if not rd._more():
                    closed = True
                else:
                    extra += rd.take()
            except socket.timeout:
                pass
    return RawResponse(status, reason, headers, body, rd.raw, closed, interim, extra)


def raw_exchange(port: int, data: bytes, *, method: str = "", close_wait: Optional[float] = None,
                 timeout: float = RAW_TIMEOUT_S, shut_write: bool = False) -> RawResponse:
    """Send `data` on a fresh connection to 127.0.0.1:port and read one response. A test that
    judges whether the peer closed the connection or sent more gives `close_wait` (seconds)."""
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


class LoopbackServer:
    """Listens on 127.0.0.1 (port 0); each accepted connection goes to `serve(sock)` in its own
    daemon thread; `.connections` counts them. `stop()` closes the listener."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.connections = 0
        self._stop = threading.Event()
        self._lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._lsock.settimeout(0.05)
        self.port: int = self._lsock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self.serve, args=(sock,), name=f"{self.name}-conn", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._lsock.close()
        self._thread.join(timeout=5)
