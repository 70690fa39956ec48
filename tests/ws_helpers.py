"""The suite's one WebSocket test stack (test_websocket.py, test_security_ws.py, and the by-hand
SDK scripts): standard library only; HTTP heads are read with raw_http.

  * `WsConn`      one side of an RFC 6455 connection on a raw socket: frames in and out, with
                  full control (masking, fragments, reserved bits, raw bytes), every read bounded.
  * `ws_connect`  the client handshake on a fresh socket to 127.0.0.1 -> `Handshake`
                  (status, headers, raw head, body; `.ws` is a client `WsConn` after a 101).
  * `WsTestServer` a loopback WebSocket server: reads the HTTP head, lets a subclass accept or
                  refuse it, answers 101 and runs one thread per session, recording everything.
  * `ScriptedServer` a WsTestServer whose `behaviour(peer)` answers the handshake itself (accept
                  with any headers, refuse with any answer, or raw bytes) and scripts the session:
                  how the attack tests play a hostile upstream.
  * `FakeRealtime` an OpenAI-Realtime-like upstream: requires `Authorization: Bearer <real key>`
                  (401 otherwise), sends session.created, then obeys scripted client events
                  (echo, echo the key, fragments, pings, close, abort, bursts, big messages).
  * `FakeGateway`  a Discord-gateway-like upstream: HELLO -> IDENTIFY with the REAL token (4004
                  otherwise) -> READY (resume_gateway_url = itself) -> MESSAGE_CREATE [-> op 7],
                  RESUME with the real token -> RESUMED; heartbeats ACKed; zlib-stream if asked.

Nothing here imports pytest or the broker, so the scratch SDK scripts can import it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from raw_http import HeaderLookup, LoopbackServer, SocketReader, parse_head

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
IO_TIMEOUT_S = 10.0          # default wait for a frame / handshake in these helpers
SEND_TIMEOUT_S = 60.0        # a send to a peer that reads nothing fails after this
MiB = 1024 * 1024
RAW_KEEP = 40 * MiB          # WsConn.raw_in keeps at most about this much


def ws_accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    """Mask/unmask fast enough for 16 MiB (one big-int XOR instead of a Python loop)."""
    n = len(payload)
    if not n:
        return payload
    stream = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, masked: bool, fin: bool = True, rsv: int = 0,
                 mask: Optional[bytes] = None) -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv & 0x70) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if masked:
        mask = mask or os.urandom(4)
        return head + mask + xor_mask(payload, mask)
    return head + payload


def close_payload(code: Optional[int], reason: str = "") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason.encode("utf-8")


def parse_close(payload: bytes) -> Tuple[Optional[int], str]:
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class PeerClosed(Exception):
    """The TCP connection ended (EOF or reset)."""


class WsConn:
    """One end of a WebSocket on a socket. `mask_out`: this end masks what it sends (a client).
    `expect_masked`: frames it reads must be masked (a server) -- checked, since the broker must
    mask what it sends upstream and must not mask what it sends to the agent."""

    def __init__(self, sock: socket.socket, mask_out: bool, pending: bytes = b"",
                 name: str = "ws") -> None:
        self.sock = sock
        self.mask_out = mask_out
        self.expect_masked = not mask_out
        self.buf = bytearray(pending)
        self.name = name
        self.lock = threading.Lock()
        self._parts: List[bytes] = []
        self._first_op = 0
        self.mask_violations = 0
        self.frames_in = 0
        self.raw_in = bytearray(pending)      # every byte received (first RAW_KEEP bytes)
        # Reads wait with select() up to their own deadline; this timeout bounds only a send
        # that cannot progress (a peer that does not read for a minute).
        sock.settimeout(SEND_TIMEOUT_S)

    # -- sending -------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True,
                   masked: Optional[bool] = None, rsv: int = 0) -> None:
        self.send_raw(encode_frame(opcode, payload, self.mask_out if masked is None else masked,
                                   fin, rsv))

    def send_text(self, text: Any) -> None:
        if not isinstance(text, (str, bytes)):
            text = json.dumps(text)
        self.send_frame(OP_TEXT, text.encode("utf-8") if isinstance(text, str) else text)

    def send_binary(self, data: bytes) -> None:
        self.send_frame(OP_BINARY, data)

    def send_fragments(self, opcode: int, parts: Sequence[bytes],
                       between: Optional[Callable[[int], None]] = None) -> None:
        """One message as len(parts) frames; `between(i)` runs after frame i (e.g. a ping)."""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            self.send_frame(opcode if i == 0 else OP_CONT, part, fin=last)
            if between is not None and not last:
                between(i)

    def send_close(self, code: Optional[int] = 1000, reason: str = "") -> None:
        self.send_frame(OP_CLOSE, close_payload(code, reason))

    # -- receiving -----------------------------------------------------------------------------
    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"{self.name}: no complete frame in time")
            if not select.select([self.sock], [], [], min(left, 1.0))[0]:
                continue
            try:
                data = self.sock.recv(max(262144, n - len(self.buf)))
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(f"{self.name}: {exc}") from None
            if not data:
                raise PeerClosed(f"{self.name}: EOF")
            self.buf += data
            if len(self.raw_in) < RAW_KEEP:
                self.raw_in += data

    def _take(self, n: int, deadline: float) -> bytes:
        self._fill(n, deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_frame(self, timeout: float = IO_TIMEOUT_S) -> Tuple[bool, int, bytes, int]:
        """-> (fin, opcode, payload, rsv). Raises PeerClosed on EOF, socket.timeout on silence."""
        deadline = time.monotonic() + timeout
        b1, b2 = self._take(2, deadline)
        fin, rsv, opcode = bool(b1 & 0x80), b1 & 0x70, b1 & 0x0F
        masked, n = bool(b2 & 0x80), b2 & 0x7F
        if masked != self.expect_masked:
            self.mask_violations += 1
        if n == 126:
            n = struct.unpack("!H", self._take(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._take(8, deadline))[0]
        mask = self._take(4, deadline) if masked else b""
        payload = self._take(n, deadline) if n else b""
        self.frames_in += 1
        return fin, opcode, (xor_mask(payload, mask) if masked else payload), rsv

    def recv_message(self, timeout: float = IO_TIMEOUT_S) -> Tuple[int, bytes]:
        """The next whole data message, or the next control frame as soon as it arrives (also
        between the fragments of a message, which are kept for the next call)."""
        deadline = time.monotonic() + timeout
        while True:
            fin, opcode, payload, _ = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if opcode >= OP_CLOSE:
                return opcode, payload
            if opcode != OP_CONT:
                assert not self._parts, f"{self.name}: new message inside a fragmented one"
                self._first_op = opcode
            else:
                assert self._parts or self._first_op, f"{self.name}: continuation without a message"
            self._parts.append(payload)
            if fin:
                message, self._parts = b"".join(self._parts), []
                op, self._first_op = self._first_op, 0
                return op, message

    def recv_data(self, timeout: float = IO_TIMEOUT_S, answer_pings: bool = True) -> Tuple[int, bytes]:
        """The next data message (text/binary); pings are answered, pongs skipped; a close
        frame is returned as (OP_CLOSE, payload)."""
        deadline = time.monotonic() + timeout
        while True:
            op, payload = self.recv_message(max(0.01, deadline - time.monotonic()))
            if op == OP_PING:
                if answer_pings:
                    self.send_frame(OP_PONG, payload)
                continue
            if op == OP_PONG:
                continue
            return op, payload

    def recv_json(self, timeout: float = IO_TIMEOUT_S) -> Any:
        op, payload = self.recv_data(timeout)
        assert op == OP_TEXT, f"{self.name}: expected a text message, got opcode {op}: {payload[:200]!r}"
        return json.loads(payload)

    def recv_close(self, timeout: float = IO_TIMEOUT_S) -> Tuple[Optional[int], str]:
        """Read (and drop data) until a close frame; -> (code, reason)."""
        deadline = time.monotonic() + timeout
        while True:
            op, payload = self.recv_message(max(0.01, deadline - time.monotonic()))
            if op == OP_CLOSE:
                return parse_close(payload)

    def frames_until_close(self, timeout: float = 3.0) -> List[Tuple[bool, int, bytes]]:
        """Every frame (fin, opcode, payload) until a close frame (included), EOF, or `timeout`
        seconds in all."""
        deadline = time.monotonic() + timeout
        out: List[Tuple[bool, int, bytes]] = []
        while True:
            try:
                fin, opcode, payload, _ = self.recv_frame(max(0.01, deadline - time.monotonic()))
            except (PeerClosed, socket.timeout):
                return out
            out.append((fin, opcode, payload))
            if opcode == OP_CLOSE:
                return out

    def wait_eof(self, timeout: float = 5.0) -> bool:
        """True when the peer closes the TCP connection within `timeout` (data is discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.sock], [], [], max(0.0, min(0.5, deadline - time.monotonic())))[0]:
                continue
            try:
                data = self.sock.recv(262144)
            except OSError:
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self, reset: bool = False) -> None:
        """Drop the TCP connection without a close frame (RST when `reset`)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


# ============================================================================
# Client handshake
# ============================================================================


@dataclass
class Handshake(HeaderLookup):
    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes
    ws: Optional[WsConn]
    raw_head: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def read_head(sock: socket.socket, deadline: float) -> Tuple[bytes, bytes]:
    """(HTTP head, bytes already read after it); PeerClosed at EOF, socket.timeout at the deadline."""
    rd = SocketReader(sock, deadline=deadline)
    head = rd.head(65536)
    if head is None:
        if rd.eof:
            raise PeerClosed("EOF before the end of the HTTP head")
        raise AssertionError("HTTP head too large")
    return head, rd.take()


def ws_connect(port: int, target: str, headers: Sequence[Tuple[str, str]] = (),
               after_head: bytes = b"", key: Optional[str] = None, version: str = "13",
               timeout: float = IO_TIMEOUT_S, host: Optional[str] = None) -> Handshake:
    """Open a WebSocket to 127.0.0.1:port. `after_head`: bytes sent in the same write right
    behind the handshake (e.g. a first frame). Non-101 answers come back with their body."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lines = [f"GET {target} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    lines += [f"{k}: {v}" for k, v in headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + after_head)
    deadline = time.monotonic() + timeout
    try:
        head, pending = read_head(sock, deadline)
    except BaseException:
        sock.close()
        raise
    first, hdrs = parse_head(head)
    parts = first.split(" ", 2)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    hs = Handshake(status, reason, hdrs, b"", None, head)
    if status == 101:
        assert hs.header("Sec-WebSocket-Accept") == ws_accept_value(key), "bad Sec-WebSocket-Accept"
        assert (hs.header("Upgrade") or "").lower() == "websocket"
        hs.ws = WsConn(sock, mask_out=True, pending=pending, name="client")
        return hs
    length = int(hs.header("Content-Length") or "0")
    rd = SocketReader(sock, pending, deadline)
    try:
        hs.body = rd.exactly(length) or rd.take()
    except socket.timeout:
        hs.body = rd.take()
    finally:
        sock.close()
    return hs


# ============================================================================
# Loopback WebSocket servers
# ============================================================================


@dataclass
class ServerSession(HeaderLookup):
    """One accepted upstream session, as the fake server saw it."""
    target: str
    headers: List[Tuple[str, str]]
    ws: WsConn
    received: List[Tuple[int, bytes]] = field(default_factory=list)   # data messages and controls
    close_received: Optional[Tuple[Optional[int], str]] = None
    ended: threading.Event = field(default_factory=threading.Event)   # session thread finished
    eof: bool = False                                                 # peer closed TCP
    error: str = ""
    data: Dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> Dict[str, List[str]]:
        return urllib.parse.parse_qs(self.target.partition("?")[2], keep_blank_values=True)

    def messages(self, opcode: Optional[int] = None) -> List[bytes]:
        return [p for op, p in list(self.received) if opcode is None or op == opcode]


@dataclass
class HandshakeRecord(HeaderLookup):
    target: str
    headers: List[Tuple[str, str]]
    status: int
    raw: bytes = b""                 # the request head exactly as received

    def wire_text(self) -> str:
        return self.target + "\n" + "\n".join(f"{k}: {v}" for k, v in self.headers)


class Peer(HeaderLookup):
    """The server end of a connection whose handshake head was read and not answered yet."""

    def __init__(self, server: "WsTestServer", sock: socket.socket, head: bytes, pending: bytes) -> None:
        self.server = server
        self.sock = sock
        self.head = head
        self.pending = pending
        first, self.headers = parse_head(head)
        self.target = first.split(" ")[1] if " " in first else ""
        self.session: Optional[ServerSession] = None

    def _record(self, status: int) -> None:
        with self.server.lock:
            self.server.handshakes.append(HandshakeRecord(self.target, self.headers, status, self.head))

    def refuse(self, status: int, body: bytes, headers: Sequence[Tuple[str, str]] = (
            ("Content-Type", "application/json"),)) -> None:
        self._record(status)
        lines = [f"HTTP/1.1 {status} Refused"] + [f"{k}: {v}" for k, v in headers] + \
                [f"Content-Length: {len(body)}", "Connection: close"]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def send_raw(self, data: bytes) -> None:
        """Answer the handshake with exactly these bytes (a malformed answer, say)."""
        self._record(0)
        self.sock.sendall(data)

    def accept(self, extra: Sequence[Tuple[str, str]] = (), subprotocol: Optional[str] = None) -> ServerSession:
        """Answer 101 (with `extra` headers); the session, recorded before the 101 goes out."""
        key = self.header("Sec-WebSocket-Key") or ""
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Accept: {ws_accept_value(key)}"]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        lines += [f"{k}: {v}" for k, v in extra]
        self.session = ServerSession(self.target, self.headers, WsConn(
            self.sock, mask_out=False, pending=self.pending, name=f"{self.server.name}-server"))
        self._record(101)
        with self.server.lock:
            self.server.sessions.append(self.session)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return self.session


class WsTestServer(LoopbackServer):
    """A threaded loopback WebSocket server. Subclasses override `refuse` (return (status, body)
    to refuse the handshake), `subprotocol` and `run(session)`."""

    def __init__(self, name: str = "ws") -> None:
        self.handshakes: List[HandshakeRecord] = []
        self.sessions: List[ServerSession] = []
        self.errors: List[str] = []
        super().__init__(name)
        self.ws_url = f"ws://127.0.0.1:{self.port}"

    # -- to override ---------------------------------------------------------------------------
    def refuse(self, target: str, headers: List[Tuple[str, str]]) -> Optional[Tuple[int, bytes]]:
        return None

    def subprotocol(self, offered: List[str]) -> Optional[str]:
        return None

    def run(self, s: ServerSession) -> None:
        raise NotImplementedError

    # -- machinery -----------------------------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self.handshakes.clear()
            self.sessions.clear()
            self.errors.clear()
            self.connections = 0

    def wait_session(self, n: int = 1, timeout: float = 5.0) -> ServerSession:
        """The n-th session (1-based) once it exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.sessions) >= n:
                    return self.sessions[n - 1]
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: no session #{n} within {timeout}s "
                             f"(handshakes: {[h.target for h in self.handshakes]})")

    def stop(self) -> None:
        with self.lock:
            sessions = list(self.sessions)
        for s in sessions:
            s.ws.close()
        super().stop()

    def serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer: Optional[Peer] = None
        try:
            head, pending = read_head(sock, time.monotonic() + IO_TIMEOUT_S)
            peer = Peer(self, sock, head, pending)
            self.handle(peer)
        except PeerClosed:
            if peer is not None and peer.session is not None:
                peer.session.eof = True
        except Exception as exc:  # noqa: BLE001 -- a fake's bug must show in the test
            msg = f"{type(exc).__name__}: {exc}"
            if peer is not None and peer.session is not None:
                peer.session.error = msg
            with self.lock:
                self.errors.append(msg)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            if peer is not None and peer.session is not None:
                peer.session.ended.set()

    def handle(self, peer: "Peer") -> None:
        """Answer a handshake: refuse it (`refuse`), or accept it and run the session (`run`)."""
        refused = self.refuse(peer.target, peer.headers)
        if refused is None and not any(k.lower() == "upgrade" and v.lower() == "websocket"
                                       for k, v in peer.headers):
            refused = (400, b'{"error": "not a websocket request"}')
        if refused is not None:
            peer.refuse(*refused)
            return
        offered = [p.strip() for k, v in peer.headers if k.lower() == "sec-websocket-protocol"
                   for p in v.split(",") if p.strip()]
        self.run(peer.accept(subprotocol=self.subprotocol(offered)))

    # -- helpers for run() ---------------------------------------------------------------------
    @staticmethod
    def next_message(s: ServerSession, timeout: float = 60.0) -> Tuple[int, bytes]:
        """Next frame/message; records it; answers pings; records a close (not answered)."""
        op, payload = s.ws.recv_message(timeout)
        s.received.append((op, payload if len(payload) <= MiB else
                           b"sha256:" + hashlib.sha256(payload).hexdigest().encode()
                           + b" len:%d" % len(payload)))
        if op == OP_PING:
            s.ws.send_frame(OP_PONG, payload)
        elif op == OP_CLOSE:
            s.close_received = parse_close(payload)
        return op, payload

    def echo_until_close(self, s: ServerSession) -> None:
        """Echo data messages until the peer closes; answer its close with the same code."""
        while True:
            op, payload = self.next_message(s)
            if op == OP_CLOSE:
                self.finish_close(s, *parse_close(payload))
                return
            if op in (OP_TEXT, OP_BINARY):
                s.ws.send_frame(op, payload)

    @staticmethod
    def finish_close(s: ServerSession, code: Optional[int], reason: str, wait: float = 5.0) -> None:
        """Answer a close the peer sent, then wait (bounded) for its TCP close."""
        try:
            s.ws.send_close(code, reason)
        except OSError:
            return
        s.eof = s.ws.wait_eof(wait)


# ----------------------------------------------------------------------------------------------
# Fake OpenAI Realtime
# ----------------------------------------------------------------------------------------------


def deterministic_bytes(n: int, seed: int = 7) -> bytes:
    """n reproducible pseudo-random bytes, quickly (SHA-256 in counter mode over 1 MiB blocks)."""
    block = b"".join(hashlib.sha256(b"%d:%d" % (seed, i)).digest() for i in range(MiB // 32))
    return (block * (n // len(block) + 1))[:n]


class FakeRealtime(WsTestServer):
    """Requires `Authorization: Bearer <key>` (401 with an OpenAI-shaped error otherwise; the
    body echoes the Authorization it got, like a careless server would). After the 101 it sends
    `session.created`, then answers client events by their "type":

      echo                    {"type": "echo", "event": <the event>}
      session.update          {"type": "session.updated", "session": <its session>}
      echo.key                the real key inside a message; options: "split": n fragments with
                              the key cut across fragments (and a ping in between), "binary": true
      fragments               {"parts": [...]} sent as one text message in those fragments,
                              with a ping between every two
      ping                    a ping with payload {"payload"}; the pong is recorded
      close                   close with {"code"}, {"reason"}; the client's answer is recorded
      abort                   drop the TCP connection (RST when {"reset": true})
      burst                   {"count"} text messages of {"size"} bytes each, as fast as possible
      big                     one binary message of {"size"} deterministic bytes
      big.text                one text message of {"size"} bytes of 'a'
    A binary message from the client is echoed as binary (above 1 MiB: a text
    {"type": "got", "len", "sha256"} instead). A client close is answered with
    `close_answer` (default: the same code and reason)."""

    def __init__(self, key: str, name: str = "realtime") -> None:
        self.key = key
        self.close_answer: Optional[Tuple[Optional[int], str]] = None
        super().__init__(name)

    def refuse(self, target: str, headers: List[Tuple[str, str]]) -> Optional[Tuple[int, bytes]]:
        auth = [v for k, v in headers if k.lower() == "authorization"]
        if auth != [f"Bearer {self.key}"]:
            return 401, json.dumps({"error": {"message": f"Incorrect API key provided: {auth}",
                                              "type": "invalid_request_error",
                                              "code": "invalid_api_key"}}).encode()
        return None

    def subprotocol(self, offered: List[str]) -> Optional[str]:
        return "realtime" if "realtime" in offered else None

    def run(self, s: ServerSession) -> None:
        ws = s.ws
        ws.send_text({"type": "session.created", "event_id": "event_0",
                      "session": {"id": "sess_fake", "model": s.query.get("model", ["?"])[0]}})
        while True:
            op, payload = self.next_message(s)
            if op == OP_CLOSE:
                code, reason = self.close_answer or parse_close(payload)
                self.finish_close(s, code, reason)
                return
            if op in (OP_PING, OP_PONG):
                continue
            if op == OP_BINARY:
                if len(payload) > MiB:
                    ws.send_text({"type": "got", "len": len(payload),
                                  "sha256": hashlib.sha256(payload).hexdigest()})
                else:
                    ws.send_binary(payload)
                continue
            if len(payload) > MiB:
                ws.send_text({"type": "got", "len": len(payload),
                              "sha256": hashlib.sha256(payload).hexdigest()})
                continue
            try:
                ev = json.loads(payload)
            except ValueError:
                ws.send_text({"type": "error", "error": {"message": "not JSON"}})
                continue
            kind = ev.get("type")
            if kind == "echo":
                ws.send_text({"type": "echo", "event": ev})
            elif kind == "session.update":       # what the official SDK sends first
                ws.send_text({"type": "session.updated", "event_id": f"event_{len(s.received)}",
                              "session": dict({"id": "sess_fake", "type": "realtime"},
                                              **(ev.get("session") or {}))})
            elif kind == "echo.key":
                text = json.dumps({"type": "error", "error": {
                    "message": f"you sent Authorization: Bearer {self.key} -- key {self.key}!"}}).encode()
                opcode = OP_BINARY if ev.get("binary") else OP_TEXT
                n = int(ev.get("split") or 1)
                if n <= 1:
                    ws.send_frame(opcode, text)
                else:
                    first = text.index(self.key.encode())
                    cuts = sorted({first + max(1, len(self.key) * i // n) for i in range(1, n)})
                    bounds = [0] + cuts + [len(text)]
                    parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
                    ws.send_fragments(opcode, parts, lambda i: ws.send_frame(OP_PING, b"mid-%d" % i))
            elif kind == "fragments":
                parts = [p.encode() for p in ev["parts"]]
                ws.send_fragments(OP_TEXT, parts, lambda i: ws.send_frame(OP_PING, b"between-%d" % i))
            elif kind == "ping":
                ws.send_frame(OP_PING, ev.get("payload", "").encode())
            elif kind == "close":
                ws.send_close(ev.get("code"), ev.get("reason", ""))
                deadline = time.monotonic() + 10
                while s.close_received is None and time.monotonic() < deadline:
                    self.next_message(s, max(0.01, deadline - time.monotonic()))
                s.eof = ws.wait_eof(5)
                return
            elif kind == "abort":
                ws.abort(reset=bool(ev.get("reset")))
                return
            elif kind == "burst":
                size = int(ev["size"])
                for i in range(int(ev["count"])):
                    head = json.dumps({"type": "burst", "i": i, "pad": ""})[:-2]
                    ws.send_text(head + "x" * max(0, size - len(head) - 2) + '"}')
                s.data["burst_sent_at"] = time.monotonic()
            elif kind == "big":
                ws.send_binary(deterministic_bytes(int(ev["size"])))
            elif kind == "big.text":
                ws.send_frame(OP_TEXT, b"a" * int(ev["size"]))
            else:
                ws.send_text({"type": "error", "error": {"message": f"unknown event {kind}"}})


class EchoServer(WsTestServer):
    """Accepts anything and echoes data messages (any provider's generic WebSocket)."""

    def subprotocol(self, offered: List[str]) -> Optional[str]:
        return offered[0] if offered else None

    def run(self, s: ServerSession) -> None:
        self.echo_until_close(s)


class ScriptedServer(WsTestServer):
    """A hostile or odd upstream: `behaviour(peer)` answers the handshake itself (`peer.accept`,
    `peer.refuse`, `peer.send_raw`) and scripts the session; the default accepts and echoes.
    `reset()` restores the default. What the broker sent: `.handshakes` (with the raw head) and
    `received()` (every message of every session)."""

    def __init__(self, name: str = "scripted") -> None:
        self.behaviour: Callable[[Peer], None] = self.echo
        super().__init__(name)

    def reset(self) -> None:
        super().reset()
        self.behaviour = self.echo

    def handle(self, peer: Peer) -> None:
        self.behaviour(peer)

    def echo(self, peer: Peer) -> None:
        self.echo_until_close(peer.accept())

    def received(self) -> List[Tuple[int, bytes]]:
        with self.lock:
            sessions = list(self.sessions)
        return [m for s in sessions for m in list(s.received)]


# ----------------------------------------------------------------------------------------------
# Fake Discord gateway
# ----------------------------------------------------------------------------------------------

DISCORD_USER = {"id": "111111111111111111", "username": "fakebot", "discriminator": "0000",
                "global_name": None, "avatar": None, "bot": True, "flags": 0,
                "mfa_enabled": False, "verified": True, "email": None}


def message_create(seq: int, content: str, channel: str = "333333333333333333") -> Dict[str, Any]:
    return {"op": 0, "t": "MESSAGE_CREATE", "s": seq, "d": {
        "id": str(900000000000000000 + seq), "channel_id": channel, "type": 0,
        "content": content, "author": {"id": "444444444444444444", "username": "human",
                                       "discriminator": "0000", "global_name": "Human",
                                       "avatar": None, "bot": False},
        "attachments": [], "embeds": [], "mentions": [], "mention_roles": [], "pinned": False,
        "mention_everyone": False, "tts": False, "timestamp": "2026-01-01T00:00:00.000000+00:00",
        "edited_timestamp": None, "flags": 0, "components": [], "nonce": None}}


class FakeGateway(WsTestServer):
    """HELLO (op 10) -> IDENTIFY (op 2) with d.token == the REAL token, else close 4004 ->
    READY (resume_gateway_url = this server, session_id) -> MESSAGE_CREATE -> [op 7 RECONNECT
    when `reconnect_after_ready`]. RESUME (op 6) with the real token and the right session_id
    -> the missed MESSAGE_CREATE is replayed, then RESUMED. Heartbeats (op 1) get op 11.
    `message_content` is the MESSAGE_CREATE text (put the key in it to test scrubbing).
    Honours compress=zlib-stream like Discord (one zlib context, Z_SYNC_FLUSH per message), and
    IDENTIFY `compress: true` without it (payload compression: READY as a standalone zlib
    binary frame), as Discord documents."""

    SESSION_ID = "fake-session-0123456789"

    def __init__(self, key: str, name: str = "gateway") -> None:
        self.key = key
        self.reconnect_after_ready = False
        self.message_content = "hello from the fake gateway"
        self.identifies: List[Dict[str, Any]] = []
        self.resumes: List[Dict[str, Any]] = []
        self.ops_seen: List[Any] = []
        self.extra_ready: Dict[str, Any] = {}
        # Discord's documented payload compression: IDENTIFY `compress: true` on a connection
        # WITHOUT transport compression -> some payloads (here: READY) arrive as binary frames,
        # each a standalone zlib stream. ("Payload compression will be disabled if you use
        # transport compression.")
        self.payload_compression = True
        super().__init__(name)

    def reset(self) -> None:
        super().reset()
        self.reconnect_after_ready = False
        self.message_content = "hello from the fake gateway"
        self.identifies.clear()
        self.resumes.clear()
        self.ops_seen.clear()
        self.extra_ready = {}
        self.payload_compression = True

    def _real_token(self, s: ServerSession, d: Any, seen: List[Any]) -> bool:
        """IDENTIFY/RESUME (recorded in `seen`) must carry the real token; else close 4004 like Discord."""
        with self.lock:
            seen.append(d)
        if isinstance(d, dict) and d.get("token") == self.key:
            return True
        s.ws.send_close(4004, "Authentication failed.")
        s.eof = s.ws.wait_eof(5)
        return False

    def run(self, s: ServerSession) -> None:
        ws = s.ws
        zctx = zlib.compressobj() if s.query.get("compress", [""])[0] == "zlib-stream" else None
        seq = 0
        per_payload = [False]          # payload compression switched on by IDENTIFY

        def send(obj: Dict[str, Any], big: bool = False) -> None:
            data = json.dumps(obj).encode()
            if zctx is not None:
                ws.send_binary(zctx.compress(data) + zctx.flush(zlib.Z_SYNC_FLUSH))
            elif per_payload[0] and big:
                ws.send_binary(zlib.compress(data))
            else:
                ws.send_frame(OP_TEXT, data)

        send({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        while True:
            op, payload = self.next_message(s)
            if op == OP_CLOSE:
                self.finish_close(s, *parse_close(payload))
                return
            if op not in (OP_TEXT, OP_BINARY):
                continue
            try:
                msg = json.loads(payload)
            except ValueError:
                ws.send_close(4002, "Error while decoding payload.")
                s.eof = ws.wait_eof(5)
                return
            gop, d = msg.get("op"), msg.get("d")
            with self.lock:
                self.ops_seen.append(gop)
            if gop == 1:
                send({"op": 11, "d": None, "s": None, "t": None})
            elif gop == 2:
                if not self._real_token(s, d, self.identifies):
                    return
                per_payload[0] = bool(d.get("compress")) and self.payload_compression
                seq += 1
                ready = {"v": 10, "user": DISCORD_USER, "guilds": [], "session_id": self.SESSION_ID,
                         "resume_gateway_url": self.ws_url, "session_type": "normal",
                         "private_channels": [], "relationships": [], "user_settings": {},
                         "application": {"id": "222222222222222222", "flags": 0}}
                ready.update(self.extra_ready)
                if "shard" in d:
                    ready["shard"] = d["shard"]
                send({"op": 0, "t": "READY", "s": seq, "d": ready}, big=True)
                seq += 1
                send(message_create(seq, self.message_content))
                if self.reconnect_after_ready:
                    send({"op": 7, "d": None, "s": None, "t": None})
            elif gop == 6:
                if not self._real_token(s, d, self.resumes):
                    return
                if d.get("session_id") != self.SESSION_ID:
                    send({"op": 9, "d": False, "s": None, "t": None})
                    continue
                seq = int(d.get("seq") or 0) + 1
                send(message_create(seq, "missed while you were away"))
                seq += 1
                send({"op": 0, "t": "RESUMED", "s": seq, "d": {}})
            elif gop == 99:        # test hook: ask for a RECONNECT now
                send({"op": 7, "d": None, "s": None, "t": None})
