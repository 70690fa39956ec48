#!/usr/bin/env python3
"""bench.py - seks-broker side by side with a direct connection (and mitmproxy, if given).

One run starts, on 127.0.0.1 only:
  * a loopback upstream (a single-threaded selectors server in its own process, canned answers,
    minimal parsing; it reports its own CPU time so you can see it is not the bottleneck),
  * the broker (``seks_broker.py serve``) on temp databases made with the broker's own CLI,
  * optionally mitmproxy (``mitmdump --mode reverse:...`` with a header-swapping addon),
and prints one table: direct vs broker, with a verdict per target of issue 6.

    python3 bench/bench.py                  # full run (a few minutes)
    python3 bench/bench.py --quick          # smoke test (< 60 s)
    python3 bench/bench.py --only latency,sse --mitmdump /path/to/venv/bin/mitmdump
    python3 bench/bench.py --py-spy /path/to/py-spy   # adds where the broker's time goes
    python3 bench/bench.py --workers 2      # adds a `serve --workers 2` column
    python3 bench/bench.py --baseline old/seks_broker.py   # another build, interleaved
    python3 bench/bench.py --check          # exit 1 when a target is missed by more than 50%

Measures (--only names): conns, latency, idle, tokens, rps, sse, download, upload, streams.
("idle" is a diagnostic without a target: the latency case with a pause before each request,
the state an agent meets after thinking, and the state the SSE case starts its streams in.)
Standard library only; Python 3.9+. Every process it starts is stopped by PID at the end.
"""

import argparse
import base64
import collections
import errno
import hashlib
import heapq
import http.client
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

try:
    import resource
except ImportError:                     # not on Windows
    resource = None  # type: ignore[assignment]

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BROKER = os.path.join(os.path.dirname(HERE), "seks_broker.py")
HOST = "127.0.0.1"
REAL_KEY = "sk-test-bench-" + "0123456789abcdef0123456789abcdef"
AUTH_OK = b"Bearer " + REAL_KEY.encode()
MIB = 1024 * 1024
MEASURES = ("conns", "latency", "idle", "tokens", "rps", "sse", "download", "upload", "streams")

SMALL_REQUEST = json.dumps({"model": "gpt-bench", "messages": [
    {"role": "user", "content": "Say hello."}]}, separators=(",", ":")).encode()
SMALL_ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "gpt-bench", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Hello from the bench upstream."},
        "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}},
    separators=(",", ":")).encode()
EVENT_RE = re.compile(rb'"i":(\d+),"t":(\d+)')


# ================================================================================================
# The upstream: one selectors loop in its own process
# ================================================================================================

def _response(status: int, reason: str, body: bytes, ctype: bytes = b"application/json",
              close: bool = False) -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
            % (status, reason.encode(), ctype, len(body),
               b"Connection: close\r\n" if close else b"") + body)


SMALL_RESPONSE = _response(200, "OK", SMALL_ANSWER)
DENIED_BODY = b'{"error":{"message":"Incorrect API key provided (bench upstream)"}}'
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
SSE_DONE = b"data: [DONE]\n\n"

# request phases
P_HEAD, P_LEN, P_CSIZE, P_CDATA, P_CCRLF, P_TRAILER, P_BUSY = range(7)


class UpConn:
    __slots__ = ("sock", "inbuf", "out", "phase", "left", "close_after", "dl_left", "sse_left",
                 "sse_delay", "sse_seq", "route", "query", "auth_ok", "received", "closed", "mask")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out: "collections.deque[memoryview]" = collections.deque()
        self.phase = P_HEAD
        self.left = 0
        self.close_after = False
        self.dl_left = 0
        self.sse_left = 0
        self.sse_delay = 0.0
        self.sse_seq = 0
        self.route = b""
        self.query = b""
        self.auth_ok = False
        self.received = 0
        self.closed = False
        self.mask = selectors.EVENT_READ


class Upstream:
    """Fast, minimal HTTP/1.1 server. Routes (any prefix before /v1 is ignored):
    POST /v1/chat/completions  small JSON        GET /v1/sse?n=N&delay_ms=D  SSE, chunked
    GET  /v1/download?size=N   N bytes           POST /v1/upload             counts the body
    GET  /_stats               counters (no auth needed)
    Every /v1 request must carry ``Authorization: Bearer <REAL_KEY>`` (401 otherwise)."""

    def __init__(self, port: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, port))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.big = memoryview(bytes(range(256)) * (4 * MIB // 256))
        self.rbuf = bytearray(4 * MIB)
        self.rmv = memoryview(self.rbuf)
        self.timers: List[Tuple[float, int, UpConn]] = []
        self.seq = 0
        self.conns = 0
        self.stats = {"accepted": 0, "requests": 0, "auth_failures": 0, "bytes_in": 0,
                      "bytes_out": 0, "sse_streams": 0}

    @property
    def port(self) -> int:
        return self.lsock.getsockname()[1]

    def run(self) -> None:
        sel, timers = self.sel, self.timers
        while True:
            timeout = None
            if timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            for key, mask in sel.select(timeout):
                conn = key.data
                if conn is None:
                    self._accept()
                    continue
                if mask & selectors.EVENT_READ and not conn.closed:
                    self._readable(conn)
                if mask & selectors.EVENT_WRITE and not conn.closed:
                    self._flush(conn)
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    _, _, conn = heapq.heappop(timers)
                    if not conn.closed:
                        self._sse_event(conn)

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = UpConn(sock)
            self.sel.register(sock, selectors.EVENT_READ, conn)
            self.stats["accepted"] += 1
            self.conns += 1

    def _close(self, conn: UpConn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns -= 1
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _want(self, conn: UpConn, mask: int) -> None:
        if conn.mask != mask and not conn.closed:
            conn.mask = mask
            self.sel.modify(conn.sock, mask, conn)

    def _readable(self, conn: UpConn) -> None:
        sock = conn.sock
        for _ in range(64):
            if conn.phase == P_LEN and not conn.inbuf:          # bulk body: count, keep nothing
                try:
                    n = sock.recv_into(self.rmv, min(conn.left, len(self.rbuf)))
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._close(conn)
                    return
                if not n:
                    self._close(conn)
                    return
                conn.left -= n
                conn.received += n
                if conn.left == 0:
                    self._dispatch(conn)
                    self._process(conn)
                continue
            try:
                data = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            conn.inbuf += data
            self._process(conn)
            if conn.closed or conn.phase in (P_HEAD, P_BUSY):
                return

    def _process(self, conn: UpConn) -> None:
        buf = conn.inbuf
        while not conn.closed:
            phase = conn.phase
            if phase == P_HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        self._close(conn)
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[:end + 4]
                try:
                    _method, target, version = lines[0].split(b" ", 2)
                except ValueError:
                    self._close(conn)
                    return
                length, chunked, auth = 0, False, b""
                conn.close_after = version == b"HTTP/1.0"
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                    elif name == b"authorization":
                        auth = value.strip()
                    elif name == b"connection" and b"close" in value.lower():
                        conn.close_after = True
                path, _, conn.query = target.partition(b"?")
                conn.route = path[path.find(b"/v1/"):] if b"/v1/" in path else path
                conn.auth_ok = auth == AUTH_OK
                conn.received = 0
                if chunked:
                    conn.phase = P_CSIZE
                elif length:
                    conn.phase, conn.left = P_LEN, length
                else:
                    self._dispatch(conn)
            elif phase == P_LEN:
                take = min(len(buf), conn.left)
                if take:
                    del buf[:take]
                    conn.left -= take
                    conn.received += take
                if conn.left:
                    return
                self._dispatch(conn)
            elif phase == P_CSIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0].strip() or b"0", 16)
                del buf[:end + 2]
                conn.phase, conn.left = (P_CDATA, size) if size else (P_TRAILER, 0)
            elif phase == P_CDATA:
                take = min(len(buf), conn.left)
                del buf[:take]
                conn.left -= take
                conn.received += take
                if conn.left:
                    return
                conn.phase = P_CCRLF
            elif phase == P_CCRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                conn.phase = P_CSIZE
            elif phase == P_TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                empty = end == 0
                del buf[:end + 2]
                if empty:
                    self._dispatch(conn)
            else:                                   # P_BUSY: answer in progress
                return

    def _param(self, conn: UpConn, name: bytes, default: int) -> int:
        for part in conn.query.split(b"&"):
            key, _, value = part.partition(b"=")
            if key == name:
                try:
                    return int(value)
                except ValueError:
                    return default
        return default

    def _dispatch(self, conn: UpConn) -> None:
        stats = self.stats
        stats["requests"] += 1
        stats["bytes_in"] += conn.received
        conn.phase = P_BUSY
        route = conn.route
        if route == b"/_stats":
            stats["open"] = self.conns
            times = os.times()
            stats["cpu_s"] = times.user + times.system
            self._queue(conn, _response(200, "OK", json.dumps(stats).encode()))
        elif not route.startswith(b"/v1/"):
            self._queue(conn, _response(404, "Not Found", b'{"error":"no such route"}'))
        elif not conn.auth_ok:
            stats["auth_failures"] += 1
            self._queue(conn, _response(401, "Unauthorized", DENIED_BODY))
        elif route == b"/v1/chat/completions":
            self._queue(conn, SMALL_RESPONSE)
        elif route == b"/v1/upload":
            body = json.dumps({"received": conn.received}).encode()
            self._queue(conn, _response(200, "OK", body))
        elif route == b"/v1/download":
            size = self._param(conn, b"size", MIB)
            conn.dl_left = size
            stats["bytes_out"] += size
            self._queue(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"Content-Length: %d\r\n\r\n" % size)
        elif route == b"/v1/sse":
            stats["sse_streams"] += 1
            n = max(1, self._param(conn, b"n", 20))
            conn.sse_delay = max(0, self._param(conn, b"delay_ms", 10)) / 1000.0
            conn.sse_left = n
            conn.sse_seq = 0
            conn.out.append(memoryview(SSE_HEAD))
            self._sse_event(conn)                   # the first event goes with the head
            return
        else:
            self._queue(conn, _response(404, "Not Found", b'{"error":"no such route"}'))
        self._flush(conn)

    def _queue(self, conn: UpConn, data: bytes) -> None:
        conn.out.append(memoryview(data))

    def _sse_event(self, conn: UpConn) -> None:
        i = conn.sse_seq
        conn.sse_seq += 1
        conn.sse_left -= 1
        event = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","i":%d,"t":%d,'
                 b'"choices":[{"index":0,"delta":{"content":"tok%d"}}]}\n\n'
                 % (i, time.time_ns(), i))
        data = b"%x\r\n%s\r\n" % (len(event), event)
        if conn.sse_left <= 0:
            data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(SSE_DONE), SSE_DONE)
        else:
            self.seq += 1
            heapq.heappush(self.timers, (time.monotonic() + conn.sse_delay, self.seq, conn))
        conn.out.append(memoryview(data))
        self._flush(conn)

    def _flush(self, conn: UpConn) -> None:
        sock, out = conn.sock, conn.out
        try:
            while True:
                if out:
                    buf = out[0]
                    n = sock.send(buf)
                    if n < len(buf):
                        out[0] = buf[n:]
                        self._want(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
                        return
                    out.popleft()
                    continue
                if conn.dl_left:
                    k = min(conn.dl_left, len(self.big))
                    n = sock.send(self.big[:k])
                    conn.dl_left -= n
                    if n < k:
                        self._want(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
                        return
                    continue
                break
        except (BlockingIOError, InterruptedError):
            self._want(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except OSError:
            self._close(conn)
            return
        self._want(conn, selectors.EVENT_READ)
        if conn.phase == P_BUSY and conn.sse_left <= 0:     # the answer is complete
            if conn.close_after:
                self._close(conn)
                return
            conn.phase = P_HEAD
            if conn.inbuf:
                self._process(conn)


def upstream_main(argv: List[str]) -> int:
    port = int(argv[0]) if argv else 0
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = Upstream(port)
    sys.stdout.write(f"PORT {server.port}\n")
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


# ================================================================================================
# The floor: the least a Python forwarder can do (a reference column for the latency cases)
# ================================================================================================

def floor_main(argv: List[str]) -> int:
    """A thread-per-connection forwarder with one keep-alive upstream connection per agent
    connection, Content-Length bodies only, the token swapped by a plain byte replace and no
    checks at all: what any Python proxy pays on this machine before doing its job."""
    upstream_port, fake, real = int(argv[0]), argv[1].encode(), argv[2].encode()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    def read_message(sock: socket.socket, buf: bytearray) -> Optional[bytes]:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return None
            buf += data
        end = buf.index(b"\r\n\r\n") + 4
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", bytes(buf[:end]))
        total = end + (int(match.group(1)) if match else 0)
        while len(buf) < total:
            data = sock.recv(65536)
            if not data:
                return None
            buf += data
        message = bytes(buf[:total])
        del buf[:total]
        return message

    def handle(agent: socket.socket) -> None:
        agent.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = socket.create_connection((HOST, upstream_port))
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        abuf, ubuf = bytearray(), bytearray()
        try:
            while True:
                request = read_message(agent, abuf)
                if request is None:
                    return
                up.sendall(request.replace(b" /openai/", b" /", 1).replace(fake, real, 1))
                answer = read_message(up, ubuf)
                if answer is None:
                    return
                agent.sendall(answer)
        except OSError:
            return
        finally:
            up.close()
            agent.close()

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    sys.stdout.write(f"PORT {listener.getsockname()[1]}\n")
    sys.stdout.flush()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# ================================================================================================
# Client helpers (raw sockets, so the client costs little next to what it measures)
# ================================================================================================

class Target:
    """Where a client sends: host, port, path prefix and the credential it presents."""

    def __init__(self, name: str, port: int, prefix: str, credential: str) -> None:
        self.name = name
        self.port = port
        self.prefix = prefix.encode()
        self.auth = b"Bearer " + credential.encode()

    def request(self, method: str, path: str, body: bytes = b"",
                extra: bytes = b"") -> bytes:
        head = (b"%s %s%s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: %s\r\n%s"
                % (method.encode(), self.prefix, path.encode(), HOST.encode(), self.port,
                   self.auth, extra))
        if body or method == "POST":
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        return head + b"\r\n" + body

    def connect(self, timeout: float = 30.0) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _read_head(sock: socket.socket, buf: bytearray) -> Tuple[int, Dict[bytes, bytes]]:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before the response head")
        buf += data
    lines = bytes(buf[:end]).split(b"\r\n")
    del buf[:end + 4]
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def iter_body(sock: socket.socket, buf: bytearray, headers: Dict[bytes, bytes]
              ) -> Iterator[Tuple[bytes, int, float]]:
    """Yield (data, wall ns, perf s) for each piece of a response body, stamped at the recv
    that completed it; leftovers stay in buf for the next response on the connection."""
    stamp_ns, stamp_perf = time.time_ns(), time.perf_counter()

    def more() -> None:
        nonlocal stamp_ns, stamp_perf
        data = sock.recv(262144)
        stamp_ns, stamp_perf = time.time_ns(), time.perf_counter()
        if not data:
            raise ConnectionError("connection closed inside a response body")
        buf.extend(data)

    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            while b"\r\n" not in buf:
                more()
            end = buf.find(b"\r\n")
            size = int(bytes(buf[:end]).split(b";")[0].strip() or b"0", 16)
            del buf[:end + 2]
            if size == 0:
                while True:                                  # trailers up to the empty line
                    while b"\r\n" not in buf:
                        more()
                    end = buf.find(b"\r\n")
                    del buf[:end + 2]
                    if end == 0:
                        return
            left = size
            while left:                                      # hand over what has arrived
                if not buf:
                    more()
                piece = bytes(buf[:left])
                del buf[:len(piece)]
                left -= len(piece)
                yield piece, stamp_ns, stamp_perf
            while len(buf) < 2:
                more()
            del buf[:2]
    elif b"content-length" in headers:
        left = int(headers[b"content-length"])
        while left:
            if not buf:
                more()
            piece = bytes(buf[:left])
            del buf[:len(piece)]
            left -= len(piece)
            yield piece, stamp_ns, stamp_perf
    else:                                                    # delimited by close
        while True:
            if buf:
                piece = bytes(buf)
                del buf[:]
                yield piece, stamp_ns, stamp_perf
            try:
                more()
            except ConnectionError:
                return


def exchange(sock: socket.socket, buf: bytearray, request: bytes) -> Tuple[int, bytes]:
    sock.sendall(request)
    status, headers = _read_head(sock, buf)
    body = b"".join(piece for piece, _, _ in iter_body(sock, buf, headers))
    return status, body


def rps_worker_main(argv: List[str]) -> int:
    """One client process of the throughput test: keep-alive, sequential, until end time."""
    port, prefix, credential = int(argv[0]), argv[1], argv[2]
    target = Target("w", port, prefix, credential)
    request = target.request("POST", "/v1/chat/completions", SMALL_REQUEST)
    sock = target.connect(timeout=10.0)
    buf = bytearray()
    exchange(sock, buf, request)                              # warm: connection is up
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline().split()
    start_at, end_at = float(line[0]), float(line[1])
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    ok = errors = 0
    first = time.time()
    try:
        while time.time() < end_at:
            status, _ = exchange(sock, buf, request)
            if status == 200:
                ok += 1
            else:
                errors += 1
    except OSError as exc:
        errors += 1
        sys.stderr.write(f"rps worker: {type(exc).__name__}: {exc}\n")
    sys.stdout.write(json.dumps({"ok": ok, "errors": errors, "start": first,
                                 "end": time.time()}) + "\n")
    sys.stdout.flush()
    return 0


# ================================================================================================
# Process management and small utilities
# ================================================================================================

class Procs:
    """Everything the bench starts, each in its own session; stopped by process-group id."""

    def __init__(self) -> None:
        self.items: List[subprocess.Popen] = []

    def start(self, argv: List[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.items.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)               # the group: --workers children too
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.items)):
            self.stop(proc, grace=3.0)


def percentile(values: List[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def proc_status(pid: int) -> Optional[Dict[str, int]]:
    """VmRSS, VmHWM (kB) and Threads of a process, summed over its children (--workers)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except OSError:
        return None
    out: Dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            out[name] = int(value.split()[0])
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_cpu(pid: int) -> Optional[float]:
    """user + system CPU seconds of a process (and its reaped children), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks


def group_pids(pgid: int) -> List[int]:
    pids = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return [pgid]
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return pids or [pgid]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f} s")


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# ================================================================================================
# The bench
# ================================================================================================

class Broker:
    def __init__(self, label: str, proc: subprocess.Popen, port: int, db: str,
                 stderr_path: str) -> None:
        self.label = label
        self.proc = proc
        self.port = port
        self.db = db
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="seks-bench-")
        self.master_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self.results: Dict[str, Any] = {}
        self.notes: List[str] = []
        self.upstream_port = 0
        self.control: Optional[Tuple[socket.socket, bytearray]] = None
        self.token = ""
        self.brokers: Dict[str, Broker] = {}
        self.mitm_port = 0
        self.floor_port = 0
        self.flags = ""

    # --- setup ---------------------------------------------------------------------------------
    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEKS_")}
        env["SEKS_MASTER_KEY"] = self.master_key
        env["SEKS_UPSTREAM_OPENAI"] = f"http://{HOST}:{self.upstream_port}"
        return env

    def cli(self, db: str, *argv: str, stdin: Optional[str] = None, broker: str = "") -> str:
        done = subprocess.run([sys.executable, broker or self.args.broker, "--db", db, *argv],
                              input=stdin, capture_output=True, text=True, env=self.env(),
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"broker CLI {' '.join(argv[:2])} failed ({done.returncode}): "
                               f"{done.stderr.strip()[:500]}")
        return done.stdout

    def start_upstream(self) -> None:
        proc = self.procs.start([sys.executable, os.path.abspath(__file__), "_upstream", "0"],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = read_line(proc, 15.0)
        if not line.startswith("PORT "):
            raise RuntimeError(f"upstream did not start: {line!r}")
        self.upstream_port = int(line.split()[1])
        self.upstream_proc = proc
        sock = socket.create_connection((HOST, self.upstream_port), timeout=10)
        self.control = (sock, bytearray())

    def start_floor(self) -> None:
        proc = self.procs.start([sys.executable, os.path.abspath(__file__), "_floor",
                                 str(self.upstream_port), self.token, REAL_KEY],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = read_line(proc, 15.0)
        if not line.startswith("PORT "):
            raise RuntimeError(f"floor forwarder did not start: {line!r}")
        self.floor_port = int(line.split()[1])

    def upstream_stats(self) -> Dict[str, Any]:
        assert self.control is not None
        sock, buf = self.control
        status, body = exchange(sock, buf, b"GET /_stats HTTP/1.1\r\nHost: x\r\n\r\n")
        return json.loads(body)

    def make_databases(self) -> None:
        base = os.path.join(self.tmp, "base.db")
        # made by the baseline's CLI when there is one: a newer broker migrates an older
        # database forward, an older one refuses a newer schema
        maker = self.args.baseline or self.args.broker
        self.cli(base, "secret", "add", "bench-openai", "--provider", "openai",
                 stdin=REAL_KEY + "\n", broker=maker)
        self.token = self.cli(base, "token", "mint", "--secret", "bench-openai",
                              "--agent", "bench", broker=maker).strip()
        if not self.token.startswith("seks_openai_"):
            raise RuntimeError(f"unexpected token shape from token mint: {self.token[:16]!r}")
        insert_tokens(base, 9)                                 # 10 tokens in all
        for name in ("a", "n", "w", "small", "big"):
            copy_db(base, os.path.join(self.tmp, f"{name}.db"))

    def serve_flags(self) -> str:
        if not self.flags:
            done = subprocess.run([sys.executable, self.args.broker, "serve", "--help"],
                                  capture_output=True, text=True, timeout=30, env=self.env())
            self.flags = done.stdout + done.stderr
        return self.flags

    def supports(self, flag: str) -> bool:
        return flag in self.serve_flags()

    def start_broker(self, label: str, db_name: str, extra: List[str],
                     path: str = "") -> Broker:
        db = os.path.join(self.tmp, f"{db_name}.db")
        err_path = os.path.join(self.tmp, f"broker-{label}.stderr")
        max_body = max(self.args.size + MIB, 512 * MIB)
        argv = [sys.executable, path or self.args.broker, "--db", db, "serve", "--host", HOST,
                "--port", "0", "--quiet", "--max-body", str(max_body)] + extra
        with open(err_path, "wb") as err:
            proc = self.procs.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=self.env())
        deadline = time.monotonic() + 30
        pattern = re.compile(r"seks-broker listening on https?://\[?([^\]\s]+?)\]?:(\d+)")
        while time.monotonic() < deadline:
            with open(err_path, "r", errors="replace") as fh:
                match = pattern.search(fh.read())
            if match:
                broker = Broker(label, proc, int(match.group(2)), db, err_path)
                self.brokers[label] = broker
                return broker
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        with open(err_path, "r", errors="replace") as fh:
            text = fh.read()
        self.procs.stop(proc)
        raise RuntimeError(f"broker {label} did not start: {text.strip()[-800:]}")

    def start_mitm(self) -> None:
        addon = os.path.join(self.tmp, "seks_bench_addon.py")
        with open(addon, "w") as fh:
            fh.write(MITM_ADDON.format(fake=self.token, real=REAL_KEY))
        self.mitm_port = free_port()
        conf = os.path.join(self.tmp, "mitm-conf")
        os.makedirs(conf, exist_ok=True)
        err_path = os.path.join(self.tmp, "mitm.stderr")
        with open(err_path, "wb") as err:
            proc = self.procs.start(
                [self.args.mitmdump, "--mode", f"reverse:http://{HOST}:{self.upstream_port}",
                 "--listen-host", HOST, "-p", str(self.mitm_port), "-s", addon, "-q",
                 "--set", f"confdir={conf}", "--set", "termlog_verbosity=error"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            wait_port(self.mitm_port, proc, 60.0)
        except RuntimeError as exc:
            with open(err_path, "r", errors="replace") as fh:
                text = fh.read()
            raise RuntimeError(f"mitmdump: {exc}: {text.strip()[-600:]}") from None
        self.mitm_proc = proc

    # --- targets -------------------------------------------------------------------------------
    def direct(self) -> Target:
        return Target("direct", self.upstream_port, "", REAL_KEY)

    def via(self, label: str) -> Target:
        return Target(label, self.brokers[label].port, "/openai", self.token)

    def mitm(self) -> Target:
        return Target("mitmproxy", self.mitm_port, "", self.token)

    def columns(self) -> List[Target]:
        """Every target for the comparative measures: direct, brokers, mitmproxy."""
        out = [self.direct()]
        for label in ("broker", "baseline", "workers"):
            if label in self.brokers:
                out.append(self.via(label))
        if self.mitm_port:
            out.append(self.mitm())
        return out

    # --- measures ------------------------------------------------------------------------------
    def m_conns(self) -> None:
        """Upstream connections opened for 1,000 sequential requests (fresh broker)."""
        n = self.args.conn_requests
        targets = [t for t in self.columns() if t.name in ("broker", "mitmproxy")]
        for target in targets:
            before = self.upstream_stats()["accepted"]
            sock, buf = target.connect(), bytearray()
            req = target.request("POST", "/v1/chat/completions", SMALL_REQUEST)
            errors = 0
            for _ in range(n):
                status, _ = exchange(sock, buf, req)
                errors += status != 200
            sock.close()
            opened = self.upstream_stats()["accepted"] - before
            self.results[f"conns.{target.name}"] = opened
            if errors:
                self.results[f"conns.{target.name}.errors"] = errors
        self.results["conns.direct"] = 1
        log(f"conns: {n} sequential requests -> " + ", ".join(
            f"{t.name} {self.results[f'conns.{t.name}']}" for t in targets))

    def m_latency(self, pause: float = 0.0, key: str = "lat") -> None:
        """Sequential small-JSON requests on one http.client connection per target, in
        interleaved blocks (so drift on a shared machine hits every column alike). With a
        ``pause`` (seconds) before each request, every process on the path has gone idle."""
        if pause:
            n, warm, block = self.args.idle_requests, 20, 10
        else:
            n, warm, block = self.args.requests, self.args.warmup, 50
        targets = self.columns()
        if self.floor_port:
            targets.append(Target("floor", self.floor_port, "/openai", self.token))
        conns = {}
        for t in targets:
            conn = http.client.HTTPConnection(HOST, t.port, timeout=30)
            conns[t.name] = conn
        samples: Dict[str, List[float]] = {t.name: [] for t in targets}
        errors: Dict[str, int] = {t.name: 0 for t in targets}
        headers = {"Content-Type": "application/json"}

        def one(t: Target) -> float:
            conn = conns[t.name]
            headers["Authorization"] = t.auth.decode()
            path = t.prefix.decode() + "/v1/chat/completions"
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            conn.request("POST", path, body=SMALL_REQUEST, headers=headers)
            resp = conn.getresponse()
            resp.read()
            elapsed = time.perf_counter() - t0
            if resp.status != 200:
                errors[t.name] += 1
            return elapsed

        cpu0 = {label: sum(proc_cpu(p) or 0.0 for p in group_pids(b.pid))
                for label, b in self.brokers.items()}
        for t in targets:
            for _ in range(warm):
                one(t)
        done = 0
        while done < n:
            size = min(block, n - done)
            for t in targets:
                out = samples[t.name]
                for _ in range(size):
                    out.append(one(t))
            done += size
        for conn in conns.values():
            conn.close()
        for t in targets:
            if t.name in cpu0:
                cpu = sum(proc_cpu(p) or 0.0 for p in group_pids(self.brokers[t.name].pid))
                self.results[f"{key}.{t.name}.cpu_us"] = (cpu - cpu0[t.name]) / (n + warm) * 1e6
        base50 = percentile(samples["direct"], 50) * 1000
        base99 = percentile(samples["direct"], 99) * 1000
        for t in targets:
            p50 = percentile(samples[t.name], 50) * 1000
            p99 = percentile(samples[t.name], 99) * 1000
            self.results[f"{key}.{t.name}.p50"] = p50
            self.results[f"{key}.{t.name}.p99"] = p99
            if t.name != "direct":
                self.results[f"{key}.{t.name}.add50"] = p50 - base50
                self.results[f"{key}.{t.name}.add99"] = p99 - base99
            if errors[t.name]:
                self.results[f"{key}.{t.name}.errors"] = errors[t.name]
        log(f"{'after idle ' if pause else ''}latency p50/p99 ms: " + ", ".join(
            f"{t.name} {self.results[f'{key}.{t.name}.p50']:.3f}/"
            f"{self.results[f'{key}.{t.name}.p99']:.3f}" for t in targets))

    def m_tokens(self) -> None:
        """p50 of a request with 10 tokens vs 100,000 tokens in the DB: two fresh brokers, same
        config and DB history except the token count, measured in interleaved blocks."""
        n, block = self.args.requests, 20
        targets = [self.via("small"), self.via("big")]
        socks = {t.name: (t.connect(), bytearray()) for t in targets}
        reqs = {t.name: t.request("POST", "/v1/chat/completions", SMALL_REQUEST) for t in targets}
        samples: Dict[str, List[float]] = {t.name: [] for t in targets}
        errors = 0
        for t in targets:
            sock, buf = socks[t.name]
            for _ in range(self.args.warmup):
                exchange(sock, buf, reqs[t.name])
        done = 0
        while done < n:
            size = min(block, n - done)
            for t in targets:
                sock, buf = socks[t.name]
                req, out = reqs[t.name], samples[t.name]
                for _ in range(size):
                    t0 = time.perf_counter()
                    status, _ = exchange(sock, buf, req)
                    out.append(time.perf_counter() - t0)
                    errors += status != 200
            done += size
        for sock, _ in socks.values():
            sock.close()
        small = percentile(samples["small"], 50) * 1000
        big = percentile(samples["big"], 50) * 1000
        self.results["tok.small.p50"] = small
        self.results["tok.big.p50"] = big
        self.results["tok.ratio"] = big / small if small else float("nan")
        if errors:
            self.results["tok.errors"] = errors
        log(f"tokens: p50 10 tokens {small:.3f} ms, {self.args.tokens:,} tokens {big:.3f} ms")

    def m_rps(self) -> None:
        """Requests/s with N client processes (not threads: one Python process would saturate
        its GIL before the broker), each on its own keep-alive connection."""
        for t in self.columns():
            stats0 = self.upstream_stats()
            broker = self.brokers.get(t.name)
            pids = group_pids(broker.pid) if broker else []
            cpu0 = sum(proc_cpu(p) or 0.0 for p in pids)
            rps, errors, total = self.run_clients(t)
            stats1 = self.upstream_stats()
            cpu1 = sum(proc_cpu(p) or 0.0 for p in group_pids(broker.pid)) if broker else 0.0
            self.results[f"rps.{t.name}"] = rps
            if errors:
                self.results[f"rps.{t.name}.errors"] = errors
            if total:
                up_cpu = (stats1["cpu_s"] - stats0["cpu_s"]) / total * 1e6
                self.results[f"rps.{t.name}.upstream_us"] = up_cpu
                if broker:
                    self.results[f"rps.{t.name}.broker_us"] = (cpu1 - cpu0) / total * 1e6
            log(f"rps {t.name}: {rps:,.0f}/s ({errors} errors)")

    def run_clients(self, t: Target) -> Tuple[float, int, int]:
        workers = []
        try:
            for _ in range(self.args.clients):
                workers.append(self.procs.start(
                    [sys.executable, os.path.abspath(__file__), "_rps", str(t.port),
                     t.prefix.decode(), t.auth.decode()[len("Bearer "):]],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for w in workers:
                line = read_line(w, 60.0)
                if line.strip() != "ready":
                    raise RuntimeError(f"rps worker for {t.name} failed to start: {line!r}")
            start = time.time() + 0.3
            end = start + self.args.duration
            for w in workers:
                assert w.stdin is not None
                w.stdin.write(f"{start} {end}\n")
                w.stdin.flush()
            ok = errors = 0
            for w in workers:
                line = read_line(w, self.args.duration + 60.0)
                result = json.loads(line)
                ok += result["ok"]
                errors += result["errors"]
            return ok / self.args.duration, errors, ok + errors
        finally:
            for w in workers:
                self.procs.stop(w, grace=2.0)

    def m_sse(self) -> None:
        """First-event time (request sent -> first event parsed) and per-event delay
        (receive wall time - the event's send timestamp written by the upstream)."""
        streams, events, delay = self.args.sse_streams, self.args.sse_events, self.args.sse_delay_ms
        targets = self.columns()
        conns = {t.name: (t.connect(), bytearray()) for t in targets}
        first: Dict[str, List[float]] = {t.name: [] for t in targets}
        per_event: Dict[str, List[float]] = {t.name: [] for t in targets}
        errors: Dict[str, int] = {t.name: 0 for t in targets}
        path = f"/v1/sse?n={events}&delay_ms={delay}"
        for t in targets:                                  # warm-up stream
            sock, buf = conns[t.name]
            run_stream(sock, buf, t.request("GET", path))
        for round_ in range(streams):                     # each round starts with another
            shift = round_ % len(targets)                  # column: no column always follows
            for t in targets[shift:] + targets[:shift]:    # the same one (that biased it)
                sock, buf = conns[t.name]
                try:
                    f, delays, count = run_stream(sock, buf, t.request("GET", path))
                except (OSError, ValueError) as exc:
                    errors[t.name] += 1
                    log(f"sse {t.name}: {type(exc).__name__}: {exc}")
                    sock.close()
                    conns[t.name] = (t.connect(), bytearray())
                    continue
                if count != events:
                    errors[t.name] += 1
                first[t.name].append(f)
                per_event[t.name].extend(delays)
        for sock, _ in conns.values():
            sock.close()
        base = percentile(first["direct"], 50) * 1000
        for t in targets:
            f50 = percentile(first[t.name], 50) * 1000
            self.results[f"sse.{t.name}.first50"] = f50
            self.results[f"sse.{t.name}.event99"] = percentile(per_event[t.name], 99) / 1e6
            self.results[f"sse.{t.name}.event50"] = percentile(per_event[t.name], 50) / 1e6
            if t.name != "direct":
                self.results[f"sse.{t.name}.addfirst50"] = f50 - base
            if errors[t.name]:
                self.results[f"sse.{t.name}.errors"] = errors[t.name]
        log("sse first-event p50 / per-event p99 ms: " + ", ".join(
            f"{t.name} {self.results[f'sse.{t.name}.first50']:.3f}/"
            f"{self.results[f'sse.{t.name}.event99']:.3f}" for t in targets))

    def m_transfer(self, kind: str) -> None:
        size = self.args.size
        targets = [self.direct(), self.via("broker")]
        broker = self.brokers["broker"]
        for t in targets:
            rss0 = proc_status(broker.pid)
            reset_ok = reset_hwm(broker.pid)
            try:
                seconds = (download if kind == "download" else upload)(t, size)
            except (OSError, ValueError, RuntimeError) as exc:
                log(f"{kind} {t.name}: {type(exc).__name__}: {exc}")
                self.results[f"{kind}.{t.name}.error"] = str(exc)[:200]
                continue
            self.results[f"{kind}.{t.name}"] = size / MIB / seconds
            if t.name == "broker":
                rss1 = proc_status(broker.pid)
                if rss0 and rss1:                      # peak during the transfer - before
                    growth = max(0, rss1["VmHWM"] - rss0["VmRSS"])
                    self.results[f"{kind}.rss_growth_mb"] = growth * 1024 / 1e6
                    self.results[f"{kind}.rss_after_mb"] = rss1["VmRSS"] * 1024 / 1e6
                    if not reset_ok:
                        self.notes.append("peak RSS could not be reset (clear_refs); growth "
                                          "is the process's lifetime peak - RSS before")

    def m_streams(self) -> None:
        """N concurrently open SSE streams through the broker: all get their first event, the
        broker's RSS stays bounded, and a normal request is still served meanwhile."""
        count, hold_ms = self.args.open_streams, self.args.hold_ms
        broker = self.brokers["broker"]
        t = self.via("broker")
        reset_hwm(broker.pid)
        request = t.request("GET", f"/v1/sse?n=2&delay_ms={hold_ms}")
        sel = selectors.DefaultSelector()
        streams: List[Dict[str, Any]] = []
        tally = {"first": 0, "done": 0, "error": 0}
        errors: List[str] = []
        started = time.perf_counter()
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                st = {"sock": s, "sent": False, "buf": bytearray(), "first": None,
                      "done": False, "error": None}
                streams.append(st)
                err = s.connect_ex((HOST, t.port))
                if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                    st["error"] = f"connect: {os.strerror(err)}"
                    tally["error"] += 1
                    continue
                sel.register(s, selectors.EVENT_WRITE, st)

            def fail(st: Dict[str, Any], why: str) -> None:
                st["error"] = why
                tally["error"] += 1
                errors.append(why)
                sel.unregister(st["sock"])

            def pump(until: float, goal: str) -> None:
                while time.perf_counter() < until:
                    if tally[goal] + tally["error"] >= count:
                        return
                    for key, _ in sel.select(0.2):
                        st = key.data
                        s = st["sock"]
                        try:
                            if not st["sent"]:
                                s.send(request)            # small: goes out in one send
                                st["sent"] = True
                                sel.modify(s, selectors.EVENT_READ, st)
                                continue
                            data = s.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as exc:
                            fail(st, f"{type(exc).__name__}: {exc}")
                            continue
                        if not data:
                            fail(st, "closed by the broker")
                            continue
                        buf = st["buf"]
                        buf += data
                        if st["first"] is None and b'"i":0,' in buf:
                            st["first"] = time.perf_counter() - started
                            tally["first"] += 1
                        if b"[DONE]" in buf and buf.endswith(b"0\r\n\r\n"):
                            st["done"] = True
                            tally["done"] += 1
                            st["buf"] = bytearray()
                            sel.unregister(s)

            pump(started + self.args.stream_timeout, "first")
            firsts = [st["first"] for st in streams if st["first"] is not None]
            status = proc_status(broker.pid)
            open_now = self.upstream_stats()["open"] - 1          # less the control one
            self.results["streams.count"] = count
            self.results["streams.first"] = len(firsts)
            self.results["streams.all_first_s"] = max(firsts) if firsts else float("nan")
            self.results["streams.upstream_open"] = open_now
            side: List[float] = []                 # a normal request while they are open
            side_ok = 0
            try:
                conn = http.client.HTTPConnection(HOST, t.port, timeout=15)
                for _ in range(20):
                    t0 = time.perf_counter()
                    conn.request("POST", "/openai/v1/chat/completions", body=SMALL_REQUEST,
                                 headers={"Authorization": t.auth.decode(),
                                          "Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    side.append(time.perf_counter() - t0)
                    side_ok += resp.status == 200
                conn.close()
            except (OSError, http.client.HTTPException) as exc:
                log(f"streams: side request failed: {type(exc).__name__}: {exc}")
            self.results["streams.side_ok"] = side_ok
            self.results["streams.side_p50_ms"] = percentile(side, 50) * 1000 if side else None
            pump(time.perf_counter() + hold_ms / 1000.0 + self.args.stream_timeout, "done")
            status2 = proc_status(broker.pid)
            if status and status2:
                self.results["streams.rss_mb"] = status["VmRSS"] * 1024 / 1e6
                self.results["streams.hwm_mb"] = max(status["VmHWM"],
                                                     status2["VmHWM"]) * 1024 / 1e6
                self.results["streams.threads"] = status["Threads"]
            self.results["streams.done"] = tally["done"]
            if tally["error"]:
                self.results["streams.errors"] = tally["error"]
                log(f"streams: {tally['error']} errors, e.g. {errors[:3]}")
        finally:
            for st in streams:
                try:
                    st["sock"].close()
                except OSError:
                    pass
            sel.close()
        log(f"streams: {self.results.get('streams.first')}/{count} first events, "
            f"{self.results.get('streams.done')}/{count} complete, "
            f"RSS {self.results.get('streams.rss_mb', float('nan')):.0f} MB")

    # --- profiling -----------------------------------------------------------------------------
    def m_profile(self) -> None:
        """py-spy on the broker, apart from the measures (sampling perturbs them): sequential
        small requests (the latency case), then 32 client processes (the throughput case)."""
        t = self.via("broker")
        profiler = self.start_profiler("sequential")
        if profiler is not None:
            sock, buf = t.connect(), bytearray()
            req = t.request("POST", "/v1/chat/completions", SMALL_REQUEST)
            for _ in range(max(3000, self.args.requests)):
                exchange(sock, buf, req)
            sock.close()
            self.finish_profiler(profiler, "sequential small requests (latency case)")
        profiler = self.start_profiler("concurrent", gil=True)
        if profiler is not None:
            self.run_clients(t)
            self.finish_profiler(profiler, f"{self.args.clients} client processes (throughput "
                                           f"case), GIL holders only")
        profiler = self.start_profiler("download", gil=True)
        if profiler is not None:
            download(t, min(self.args.size, 256 * MIB))
            self.finish_profiler(profiler, "one download (bulk case), GIL holders only")

    def start_profiler(self, label: str, gil: bool = False
                       ) -> Optional[Tuple[subprocess.Popen, str]]:
        out = os.path.join(self.args.profile_dir, f"profile-{label}.txt")
        proc = self.procs.start([self.args.py_spy, "record", "--pid", str(self.brokers["broker"].pid),
                                 "--format", "raw", "-o", out, "--rate", "500", "--nonblocking"]
                                + (["--gil"] if gil else []),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        if proc.poll() is not None:
            assert proc.stderr is not None
            log(f"py-spy failed: {proc.stderr.read().strip()[:300]}")
            self.procs.stop(proc)
            return None
        return proc, out

    def finish_profiler(self, profiler: Tuple[subprocess.Popen, str], what: str) -> None:
        proc, out = profiler
        try:
            os.kill(proc.pid, signal.SIGINT)                 # py-spy writes its file on SIGINT
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.procs.stop(proc)
        self.notes.extend(summarize_profile(out, what))

    # --- run -----------------------------------------------------------------------------------
    def run(self) -> None:
        only = self.args.only
        log(f"temp dir {self.tmp}")
        self.start_upstream()
        self.make_databases()
        if "tokens" in only:
            insert_tokens(os.path.join(self.tmp, "big.db"), self.args.tokens - 10)
        self.start_broker("broker", "a", [])
        variants = []
        if self.args.baseline:
            self.start_broker("baseline", "n", [], self.args.baseline)
        if self.args.workers:
            variants.append(("workers", "w", ["--workers", str(self.args.workers)]))
        for label, db, extra in variants:
            if not self.supports(extra[0]):
                self.results[f"{label}.unsupported"] = "n/a (flag not supported)"
                continue
            try:
                self.start_broker(label, db, extra)
            except RuntimeError as exc:                   # a variant is optional
                log(f"{label} column skipped: {exc}")
                self.results[f"{label}.unsupported"] = "n/a (did not start)"
                self.notes.append(f"broker {' '.join(extra)} did not start: "
                                  f"{str(exc).strip().splitlines()[-1][:200]}")
        if self.args.mitmdump:
            try:
                self.start_mitm()
            except (OSError, RuntimeError) as exc:
                log(f"mitmproxy column skipped: {exc}")
                self.notes.append(f"mitmproxy not run: {exc}")
                self.mitm_port = 0
        if self.args.floor and ("latency" in only or "idle" in only):
            self.start_floor()
        if "tokens" in only:
            self.start_broker("small", "small", [])
            self.start_broker("big", "big", [])
        plan = [("conns", self.m_conns), ("latency", self.m_latency),
                ("idle", lambda: self.m_latency(self.args.idle_ms / 1000.0, "idle")),
                ("tokens", self.m_tokens), ("rps", self.m_rps), ("sse", self.m_sse),
                ("download", lambda: self.m_transfer("download")),
                ("upload", lambda: self.m_transfer("upload")), ("profile", self.m_profile),
                ("streams", self.m_streams)]
        for name, fn in plan:
            if name == "profile" and not self.args.py_spy:
                continue
            if name != "profile" and name not in only:
                continue
            if name == "streams":                       # idle brokers only take memory now
                for label in ("baseline", "workers", "small", "big"):
                    if label in self.brokers:
                        self.procs.stop(self.brokers.pop(label).proc)
                if self.mitm_port:
                    self.procs.stop(self.mitm_proc)
                    self.mitm_port = 0
            log(f"measure {name} ...")
            t0 = time.monotonic()
            try:
                fn()
            except Exception as exc:                    # one broken measure: report, go on
                log(f"measure {name} failed: {type(exc).__name__}: {exc}")
                self.results[f"{name}.failed"] = f"{type(exc).__name__}: {exc}"[:200]
            log(f"measure {name} took {time.monotonic() - t0:.1f} s")
        stats = self.upstream_stats()
        self.results["upstream.auth_failures"] = stats["auth_failures"]
        self.results["upstream.cpu_s"] = stats["cpu_s"]
        for broker in self.brokers.values():
            if broker.proc.poll() is not None:
                self.notes.append(f"broker {broker.label} exited early "
                                  f"(code {broker.proc.returncode})")

    def close(self) -> None:
        if self.control is not None:
            try:
                self.control[0].close()
            except OSError:
                pass
        self.procs.stop_all()
        if self.args.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


MITM_ADDON = '''\
# written by seks-broker bench/bench.py: swap the fake token for the real key, stream SSE
from mitmproxy import http

FAKE = "Bearer {fake}"
REAL = "Bearer {real}"


class Swap:
    def request(self, flow):
        if flow.request.headers.get("authorization") == FAKE:
            flow.request.headers["authorization"] = REAL
        else:
            flow.response = http.Response.make(401, b'{{"error":"unknown token"}}',
                                               {{"Content-Type": "application/json"}})

    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True          # mitmproxy buffers bodies unless told not to


addons = [Swap()]
'''


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout, or RuntimeError after timeout (never blocks forever)."""
    assert proc.stdout is not None
    result: List[str] = []

    def reader() -> None:
        try:
            result.append(proc.stdout.readline())  # type: ignore[union-attr]
        except (OSError, ValueError):
            result.append("")

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive() or not result:
        raise RuntimeError(f"no answer from child process {proc.pid} within {timeout:.0f} s")
    return result[0]


def copy_db(src: str, dst: str) -> None:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def insert_tokens(db_path: str, count: int) -> None:
    """Add `count` live tokens (sha256 of random tokens) for the same secret and agent, as
    Store.add_token would: a tokens row and a token_usage row each."""
    if count <= 0:
        return
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        secret, agent = db.execute("SELECT secret_name, agent FROM tokens LIMIT 1").fetchone()
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        db.execute("BEGIN")
        rows = []
        for _ in range(count):
            token = "seks_openai_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
            rows.append(("tok_" + os.urandom(6).hex(), hashlib.sha256(token.encode()).digest()))
        db.executemany("INSERT INTO tokens (id, token_hash, secret_name, provider, agent, "
                       "created_at, expires_at, policy) VALUES (?, ?, ?, 'openai', ?, ?, NULL, "
                       "'{}')", [(i, h, secret, agent, now) for i, h in rows])
        db.executemany("INSERT INTO token_usage (token_id) VALUES (?)", [(i,) for i, _ in rows])
        db.execute("COMMIT")
    finally:
        db.close()


def run_stream(sock: socket.socket, buf: bytearray, request: bytes
               ) -> Tuple[float, List[int], int]:
    """One SSE stream: (seconds to first event, [ns delay per event], number of events)."""
    t0 = time.perf_counter()
    sock.sendall(request)
    status, headers = _read_head(sock, buf)
    if status != 200:
        for _ in iter_body(sock, buf, headers):
            pass
        raise ValueError(f"status {status}")
    first = -1.0
    delays: List[int] = []
    text = b""
    for piece, stamp_ns, stamp_perf in iter_body(sock, buf, headers):
        text += piece
        while b"\n\n" in text:
            event, text = text.split(b"\n\n", 1)
            match = EVENT_RE.search(event)
            if match is None:
                continue
            if first < 0:
                first = stamp_perf - t0
            delays.append(stamp_ns - int(match.group(2)))
    return first, delays, len(delays)


def download(t: Target, size: int) -> float:
    sock = t.connect(timeout=60)
    try:
        mv = memoryview(bytearray(4 * MIB))
        t0 = time.perf_counter()
        sock.sendall(t.request("GET", f"/v1/download?size={size}"))
        buf = bytearray()
        status, headers = _read_head(sock, buf)
        if status != 200:
            raise RuntimeError(f"status {status}")
        left = int(headers[b"content-length"]) - len(buf)
        while left > 0:
            n = sock.recv_into(mv, min(left, len(mv)))
            if not n:
                raise RuntimeError(f"connection closed with {left} bytes to go")
            left -= n
        return time.perf_counter() - t0
    finally:
        sock.close()


def upload(t: Target, size: int) -> float:
    sock = t.connect(timeout=60)
    try:
        chunk = memoryview(bytes(range(256)) * (4 * MIB // 256))
        head = (b"POST %s/v1/upload HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                % (t.prefix, HOST.encode(), t.auth, size))
        t0 = time.perf_counter()
        sock.sendall(head)
        left = size
        while left:
            k = min(left, len(chunk))
            sock.sendall(chunk[:k])
            left -= k
        buf = bytearray()
        status, headers = _read_head(sock, buf)
        body = b"".join(p for p, _, _ in iter_body(sock, buf, headers))
        elapsed = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"status {status}: {body[:200]!r}")
        received = json.loads(body)["received"]
        if received != size:
            raise RuntimeError(f"upstream received {received} of {size} bytes")
        return elapsed
    finally:
        sock.close()


def summarize_profile(path: str, what: str) -> List[str]:
    """Where the broker's samples go, from py-spy's raw (collapsed) output: the leaf frame,
    the deepest seks_broker.py frame (its own work plus the stdlib it calls), and inclusive."""
    leaf: Dict[str, int] = collections.Counter()
    deepest: Dict[str, int] = collections.Counter()
    incl: Dict[str, int] = collections.Counter()
    total = 0
    try:
        with open(path) as fh:
            for line in fh:
                stack, _, count_text = line.rstrip("\n").rpartition(" ")
                if not stack or not count_text.isdigit():
                    continue
                count = int(count_text)
                frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")]
                frames = [f for f in frames if not f.startswith(("process ", "thread "))]
                if not frames:
                    continue
                total += count
                leaf[frames[-1]] += count
                own = [f for f in frames if "seks_broker.py" in f]
                if own:
                    deepest[own[-1]] += count
                for f in set(own):
                    incl[f] += count
    except (OSError, ValueError) as exc:
        return [f"profile unreadable: {exc}"]
    if not total:
        return [f"py-spy ({what}): no samples"]

    def top(counter: Dict[str, int], n: int) -> List[str]:
        return [f"      {100.0 * c / total:5.1f}%  {name}" for name, c in
                collections.Counter(counter).most_common(n)]

    return ([f"py-spy, broker, {what}: {total} samples (raw stacks: {path})",
             "    leaf frame:"] + top(leaf, 10) +
            ["    deepest broker frame (its own work + stdlib below it):"] + top(deepest, 12) +
            ["    inclusive, broker functions:"] + top(incl, 12))


# ================================================================================================
# Report
# ================================================================================================

def verdict(value: Optional[float], target: float, kind: str) -> str:
    """PASS, MISS (within 50% of the target) or FAIL (missed by more than 50%)."""
    if value is None or value != value:
        return "n/a"
    if kind == "le":
        ok, bad = value <= target, value > target * 1.5
    elif kind == "ge":
        ok, bad = value >= target, value < target * 0.5
    elif kind == "band":                       # value is a ratio; target the allowed deviation
        dev = abs(value - 1.0)
        ok, bad = dev <= target, dev > target * 1.5
    else:
        raise ValueError(kind)
    return "PASS" if ok else ("FAIL" if bad else "MISS")


def fmt(value: Any, spec: str = ".3f", prefix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value != value:
        return "n/a"
    text = format(value, spec)
    if prefix == "+" and value >= 0:
        text = "+" + text
    return text


def report(bench: Bench) -> Tuple[str, bool]:
    r, args = bench.results, bench.args
    cols = ["direct", "broker"]
    if args.baseline:
        cols.append("baseline")
    if args.workers:
        cols.append("workers")
    if args.mitmdump:
        cols.append("mitmproxy")
    if "lat.floor.p50" in r or "idle.floor.p50" in r:
        cols.append("floor")
    heads = {"direct": "direct", "broker": "broker", "baseline": "baseline",
             "workers": f"--workers {args.workers}", "mitmproxy": "mitmproxy",
             "floor": "stdlib floor"}

    def cell(key_fmt: str, col: str, spec: str = ".3f", prefix: str = "") -> str:
        if r.get(f"{col}.unsupported"):
            return r[f"{col}.unsupported"]
        value = r.get(key_fmt.format(c=col))
        text = fmt(value, spec, prefix)
        if r.get(key_fmt.split(".")[0] + f".{col}.errors"):
            text += " (errors!)"
        return text

    rows: List[List[str]] = []
    failed = False

    def add(measure: str, cells: Dict[str, str], target: str, v: str) -> None:
        nonlocal failed
        failed = failed or v.startswith("FAIL")
        rows.append([measure] + [cells.get(c, "") for c in cols] + [target, v])

    only = args.only
    if "latency" in only and "lat.broker.p50" in r:
        c = {col: cell("lat.{c}.add50", col, ".3f", "+") for col in cols if col != "direct"}
        c["direct"] = fmt(r.get("lat.direct.p50")) + " abs"
        add("added latency p50, small JSON (ms)", c, "<= 0.3",
            verdict(r.get("lat.broker.add50"), 0.3, "le"))
        c = {col: cell("lat.{c}.add99", col, ".3f", "+") for col in cols if col != "direct"}
        c["direct"] = fmt(r.get("lat.direct.p99")) + " abs"
        add("added latency p99, small JSON (ms)", c, "<= 1", verdict(r.get("lat.broker.add99"), 1.0, "le"))
    if "idle" in only and "idle.broker.p50" in r:
        c = {col: cell("idle.{c}.add50", col, ".3f", "+") for col in cols if col != "direct"}
        c["direct"] = fmt(r.get("idle.direct.p50")) + " abs"
        add(f"  the same, {args.idle_ms:g} ms idle before each (ms)", c, "-", "info")
    if "rps" in only and "rps.broker" in r:
        c = {col: cell("rps.{c}", col, ",.0f") for col in cols}
        best, which = r.get("rps.broker"), "broker"
        if (r.get("rps.workers") or 0) > (best or 0):
            best, which = r.get("rps.workers"), f"--workers {args.workers}"
        add(f"requests/s, {args.clients} client processes", c, ">= 2,500",
            verdict(best, 2500, "ge") + f" ({which})")
    if "sse" in only and "sse.broker.first50" in r:
        c = {col: cell("sse.{c}.addfirst50", col, ".3f", "+") for col in cols if col != "direct"}
        c["direct"] = fmt(r.get("sse.direct.first50")) + " abs"
        add("SSE first-event overhead p50 (ms)", c, "<= 0.3",
            verdict(r.get("sse.broker.addfirst50"), 0.3, "le"))
        c = {col: cell("sse.{c}.event99", col) for col in cols}
        add("SSE per-event delay p99 (ms, absolute)", c, "<= 1",
            verdict(r.get("sse.broker.event99"), 1.0, "le"))
    size_label = f"{args.size / 1024 ** 3:g} GiB" if args.size >= 1024 ** 3 else f"{args.size // MIB} MiB"
    for kind, target in (("download", 2000), ("upload", 1200)):
        if kind in only and (f"{kind}.broker" in r or f"{kind}.broker.error" in r):
            c = {"direct": fmt(r.get(f"{kind}.direct"), ",.0f"),
                 "broker": fmt(r.get(f"{kind}.broker", r.get(f"{kind}.broker.error")), ",.0f")}
            add(f"{kind} MiB/s, {size_label}", c, f">= {target:,}",
                verdict(r.get(f"{kind}.broker"), target, "ge"))
            rss = r.get(f"{kind}.rss_growth_mb")
            add(f"  broker peak RSS growth, {kind} (MB)",
                {"broker": fmt(rss, ".1f") if rss is not None else "n/a (no /proc)"},
                "<= 30", verdict(rss, 30, "le"))
    if "conns" in only and "conns.broker" in r:
        c = {col: fmt(r.get(f"conns.{col}"), "d") for col in cols if f"conns.{col}" in r}
        add(f"upstream connections, {args.conn_requests:,} sequential requests", c, "1",
            verdict(r.get("conns.broker"), 1, "le"))
    if "tokens" in only and "tok.ratio" in r:
        add("token check p50, 10 tokens stored (ms)", {"broker": fmt(r.get("tok.small.p50"))},
            "", "")
        add(f"token check p50, {args.tokens:,} tokens stored (ms)",
            {"broker": fmt(r.get("tok.big.p50")) + f" (x{r['tok.ratio']:.3f})"}, "x1 +/-10%",
            verdict(r.get("tok.ratio"), 0.10, "band"))
    if "streams" in only and "streams.first" in r:
        n = r["streams.count"]
        got = r.get("streams.first", 0)
        done = r.get("streams.done", 0)
        served = got == n and done == n and r.get("streams.side_ok", 0) == 20
        add(f"{n:,} open SSE streams: first event / complete",
            {"broker": f"{got}/{n} / {done}/{n}"}, "all",
            "PASS" if served else ("FAIL" if got < n * 0.5 else "MISS"))
        add("  normal request meanwhile, p50 (ms)",
            {"broker": fmt(r.get("streams.side_p50_ms")) + f" ({r.get('streams.side_ok', 0)}/20 ok)"},
            "served", "PASS" if r.get("streams.side_ok", 0) == 20 else "FAIL")
        hwm = r.get("streams.hwm_mb")
        add("  broker peak RSS with the streams open (MB)",
            {"broker": (fmt(hwm, ".0f") + f" ({r.get('streams.threads', '?')} threads)")
             if hwm is not None else "n/a (no /proc)"}, "<= 300", verdict(hwm, 300, "le"))

    header = ["measure"] + [heads[c] for c in cols] + ["target", "verdict"]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    out = []
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out.append(line)
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        out.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) if i < len(cols) + 1
                             else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    # mitmproxy ratios
    if args.mitmdump and ("lat.mitmproxy.add50" in r or "rps.mitmproxy" in r):
        ratios = []
        if r.get("lat.mitmproxy.add50") is not None and r.get("lat.broker.add50"):
            ratios.append(f"added latency p50 x{r['lat.mitmproxy.add50'] / r['lat.broker.add50']:.1f}"
                          if r["lat.broker.add50"] > 0 else "added latency p50: broker <= 0")
        if r.get("lat.mitmproxy.add99") is not None and r.get("lat.broker.add99"):
            ratios.append(f"p99 x{r['lat.mitmproxy.add99'] / r['lat.broker.add99']:.1f}"
                          if r["lat.broker.add99"] > 0 else "p99: broker <= 0")
        if r.get("rps.mitmproxy") and r.get("rps.broker"):
            ratios.append(f"requests/s x{r['rps.broker'] / r['rps.mitmproxy']:.1f} in the broker's favour")
        if r.get("sse.mitmproxy.addfirst50") is not None and r.get("sse.broker.addfirst50"):
            if r["sse.broker.addfirst50"] > 0:
                ratios.append(f"SSE first-event overhead x{r['sse.mitmproxy.addfirst50'] / r['sse.broker.addfirst50']:.1f}")
        if r.get("sse.mitmproxy.event99") and r.get("sse.broker.event99"):
            ratios.append(f"SSE per-event p99 x{r['sse.mitmproxy.event99'] / r['sse.broker.event99']:.1f}")
        if ratios:
            out.append("")
            out.append("mitmproxy / broker: " + "; ".join(ratios))
    return "\n".join(out), failed


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
            f"Python {platform.python_version()}")


def broker_version(path: str) -> str:
    try:
        done = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(path)), "rev-parse",
                               "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = done.stdout.strip()
        dirty = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(path)), "status",
                                "--porcelain", "--", os.path.basename(path)],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" + uncommitted changes" if dirty else "") if commit else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=DEFAULT_BROKER, help="path to seks_broker.py")
    p.add_argument("--quick", action="store_true", help="small counts and sizes (< 60 s)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when any target is missed by more than 50%%")
    p.add_argument("--only", help="comma-separated measures: " + ",".join(MEASURES))
    p.add_argument("--size", help="download/upload size, e.g. 1G, 256M (default 1G; quick 64M)")
    p.add_argument("--workers", type=int, default=0,
                   help="also run `serve --workers N` (throughput and latency columns)")
    p.add_argument("--baseline", help="another seks_broker.py (e.g. the previous release): adds "
                                      "its column, interleaved with the broker's in the same run")
    p.add_argument("--mitmdump", help="mitmdump binary: adds a mitmproxy column (reverse proxy; "
                                      "default: mitmdump on PATH, if any)")
    p.add_argument("--no-mitm", action="store_true", help="no mitmproxy column")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the stdlib-floor column of the latency cases (a minimal forwarder)")
    p.add_argument("--py-spy", help="py-spy binary: profile the broker in a separate phase "
                                    "(sequential requests, N clients, one download)")
    p.add_argument("--profile-dir", default=None,
                   help="where py-spy's raw stacks go (default: a new temp dir, kept)")
    p.add_argument("--requests", type=int, help="sequential requests per latency column (2000)")
    p.add_argument("--idle-ms", type=float, default=5.0,
                   help="pause before each request of the idle case (5)")
    p.add_argument("--clients", type=int, default=32, help="client processes for requests/s")
    p.add_argument("--duration", type=float, help="seconds per requests/s column (5)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens stored for the lookup test")
    p.add_argument("--open-streams", type=int, help="concurrently open SSE streams (1000)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (DBs, logs)")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.only = set(MEASURES) if not args.only else {m.strip() for m in args.only.split(",")}
    unknown = args.only - set(MEASURES)
    if unknown:
        p.error(f"unknown measure(s) {', '.join(sorted(unknown))}; known: {', '.join(MEASURES)}")
    args.size = parse_size(args.size) if args.size else (64 * MIB if quick else 1024 ** 3)
    args.requests = args.requests or (300 if quick else 2000)
    args.warmup = 50 if quick else 200
    args.idle_requests = 60 if quick else 400
    args.duration = args.duration or (1.0 if quick else 5.0)
    args.conn_requests = 200 if quick else 1000
    args.open_streams = args.open_streams or (200 if quick else 1000)
    args.hold_ms = 3000 if quick else 15000
    args.stream_timeout = 20.0 if quick else 60.0
    args.sse_streams = 8 if quick else 50
    args.sse_events = 10 if quick else 20
    args.sse_delay_ms = 5
    if args.tokens < 10:
        p.error("--tokens must be at least 10")
    if quick and args.tokens == 100_000:
        args.tokens = 20_000
    if args.no_mitm:
        args.mitmdump = None
    elif not args.mitmdump:
        args.mitmdump = shutil.which("mitmdump")
    elif not os.path.exists(args.mitmdump):
        p.error(f"no mitmdump at {args.mitmdump}")
    if args.py_spy and not os.path.exists(args.py_spy):
        p.error(f"no py-spy at {args.py_spy}")
    if not os.path.exists(args.broker):
        p.error(f"no broker at {args.broker}")
    args.broker = os.path.abspath(args.broker)
    return args


def parse_size(text: str) -> int:
    match = re.match(r"^(\d+(?:\.\d+)?)\s*([kmg]?)i?b?$", text.strip(), re.IGNORECASE)
    if not match:
        raise SystemExit(f"bad size {text!r} (e.g. 1G, 256M, 1048576)")
    unit = {"": 1, "k": 1024, "m": MIB, "g": 1024 ** 3}[match.group(2).lower()]
    return int(float(match.group(1)) * unit)


def main(argv: List[str]) -> int:
    if argv and argv[0] == "_upstream":
        return upstream_main(argv[1:])
    if argv and argv[0] == "_floor":
        return floor_main(argv[1:])
    if argv and argv[0] == "_rps":
        return rps_worker_main(argv[1:])
    args = parse_args(argv)
    if resource is not None:                       # 1,000 streams: sockets on three sides
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
        if soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError):
                pass
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 3 * args.open_streams + 200:
            log("warning: open-file limit is low for the streams measure (ulimit -n)")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    bench.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if bench.load_before > 0.5:
        log(f"warning: load average {bench.load_before:.2f} before the run: other work on "
            f"this machine will skew the numbers")
    if args.py_spy and args.profile_dir is None:
        args.profile_dir = tempfile.mkdtemp(prefix="seks-bench-profile-")
    started = time.monotonic()
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (OSError, RuntimeError, ValueError) as exc:
        log(f"bench failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        bench.close()
    table, failed = report(bench)
    r = bench.results
    print(f"seks-broker bench: {machine_line()}")
    print(f"broker {args.broker} @ {broker_version(args.broker)}; "
          f"{'quick run' if args.quick else 'full run'} in {time.monotonic() - started:.0f} s; "
          f"loopback upstream in its own process")
    print("command: python3 bench/bench.py " + " ".join(argv))
    if hasattr(os, "getloadavg"):
        print(f"1-min load average before the run: {bench.load_before:.2f} (other work on the "
              f"machine skews every number)")
    print(f"client, broker and upstream share the machine's {os.cpu_count()} cores "
          f"(the 32 client processes and the upstream take CPU the broker would otherwise get)")
    print()
    print(table)
    print()
    print("notes:")
    if "lat.broker.p50" in r:
        print(f"  latency: {args.requests:,} sequential POSTs per column after {args.warmup} "
              f"warm-up, http.client keep-alive, columns interleaved in blocks of 50; "
              f"'added' = column minus direct (same percentile)")
    if "idle.broker.p50" in r:
        print(f"  idle: {args.idle_requests} of the same requests per column, each after "
              f"{args.idle_ms:g} ms with nothing to do (as for an agent that thinks between calls, "
              f"and as each SSE stream starts); no target, it shows what idle costs every hop")
    if "lat.floor.p50" in r or "idle.floor.p50" in r:
        print("  stdlib floor: a minimal thread-per-connection forwarder (bench.py _floor): "
              "keep-alive upstream, Content-Length only, token swapped by a byte replace, no checks")
    seq = [f"{col} {r[f'lat.{col}.cpu_us']:,.0f} us" for col in ("broker", "baseline", "workers")
           if f"lat.{col}.cpu_us" in r]
    if seq:
        print("  broker CPU per request, sequential (latency case): " + ", ".join(seq))
    for col in ("direct", "broker", "baseline", "workers", "mitmproxy"):
        up, br = r.get(f"rps.{col}.upstream_us"), r.get(f"rps.{col}.broker_us")
        if up is not None:
            extra = f", broker {br:,.0f} us" if br is not None else ""
            print(f"  CPU per request during requests/s [{col}]: upstream {up:,.1f} us{extra}")
    if "sse.broker.first50" in r:
        print(f"  SSE: {args.sse_streams} streams x {args.sse_events} events, "
              f"{args.sse_delay_ms} ms apart; first event goes with the response head; per-event "
              f"delay = receive wall time - upstream's send timestamp (p50 broker "
              f"{fmt(r.get('sse.broker.event50'))} ms, direct {fmt(r.get('sse.direct.event50'))} ms)")
    if "tokens" in args.only and "tok.ratio" in r:
        print(f"  token check: two brokers with the same config, one DB with 10 tokens and one "
              f"with {args.tokens:,}, measured in interleaved blocks of 20 (raw-socket client)")
    if "streams.first" in r:
        print(f"  streams: all {r['streams.count']} first events within "
              f"{fmt(r.get('streams.all_first_s'), '.1f')} s of opening; "
              f"{r.get('streams.upstream_open')} upstream connections open then; RSS then "
              f"{fmt(r.get('streams.rss_mb'), '.0f')} MB")
    if r.get("upstream.auth_failures"):
        print(f"  WARNING: upstream saw {r['upstream.auth_failures']} requests without the real key")
    for key, value in sorted(r.items()):
        if key.endswith(".failed") or key.endswith(".errors") or key.endswith(".error"):
            print(f"  {key}: {value}")
    if "mitmproxy" in "".join(r.keys()):
        print("  mitmproxy: mitmdump --mode reverse, addon swaps Authorization and sets "
              "flow.response.stream for text/event-stream (its default buffers whole bodies)")
    for note in bench.notes:
        print(f"  {note}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": r, "machine": machine_line(),
                       "args": {k: (sorted(v) if isinstance(v, set) else v)
                                for k, v in vars(args).items()}}, fh, indent=2, sort_keys=True)
    if args.check and failed:
        print("\n--check: at least one target missed by more than 50%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
