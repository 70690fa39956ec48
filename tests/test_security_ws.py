"""Adversarial suite for issue 5 over WebSockets: the same promises as HTTP (closed forwarding,
the key never reaches the agent) for the RFC 6455 relay on provider routes and for the Discord
gateway route, where the token travels inside IDENTIFY/RESUME.

A raw WebSocket client talks to a real broker; a loopback WebSocket upstream (sec_helpers.WsUpstream)
records every handshake and frame and sends whatever each test scripts - including the real key,
split over fragments, in control frames, in a close reason, or compressed.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from conftest import REAL_KEYS, Broker
from sec_helpers import TcpRecorder, WsClient, WsConn, WsUpstream

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KEY = REAL_KEYS["openai"]
DISCORD_KEY = REAL_KEYS["discord"]


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WsUpstream]:
    up = WsUpstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway_upstream() -> Iterator[WsUpstream]:
    up = WsUpstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def attacker() -> Iterator[TcpRecorder]:
    rec = TcpRecorder()
    yield rec
    rec.stop()


@pytest.fixture(autouse=True)
def _reset(ws_upstream: WsUpstream, gateway_upstream: WsUpstream, attacker: TcpRecorder) -> None:
    ws_upstream.reset()
    gateway_upstream.reset()
    attacker.clear()


@pytest.fixture(scope="module")
def ws_broker(broker_factory: Callable[..., Broker], ws_upstream: WsUpstream,
              gateway_upstream: WsUpstream) -> Broker:
    return broker_factory({"openai": ws_upstream.url},
                          extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": f"ws://127.0.0.1:{gateway_upstream.port}"},
                          providers=("openai", "discord"))


def bearer(b: Broker) -> List[Tuple[str, str]]:
    return [("Authorization", f"Bearer {b.token('openai')}")]


def everything_seen(c: WsClient, frames: List[Tuple[bool, int, bytes]]) -> bytes:
    """All the agent received: the handshake answer, any body, every frame payload, and the
    payloads inflated in case they were compressed."""
    out = c.head + c.body + b"".join(p for _, _, p in frames)
    for _, _, p in frames:
        for wbits in (-15, 15, 31):
            try:
                out += zlib.decompressobj(wbits).decompress(p)
            except zlib.error:
                pass
    return out


def assert_no_key(data: bytes, key: str, what: str) -> None:
    assert key.encode() not in data, f"{what}: real key reached the agent"


# ============================================================================
# Closed forwarding and the handshake
# ============================================================================


def test_ws_handshake_carries_the_real_key_to_the_configured_upstream(ws_broker: Broker,
                                                                       ws_upstream: WsUpstream) -> None:
    c = WsClient(ws_broker.port, "/openai/v1/realtime?model=gpt-test",
                 bearer(ws_broker) + [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
                                      ("Origin", "http://evil.example")])
    try:
        assert c.status == 101, c.head
        c.send(OP_TEXT, b'{"type":"ping"}')
        echo = c.recv()
        assert echo is not None and echo[2] == b'{"type":"ping"}', echo
    finally:
        c.close()
    assert len(ws_upstream.heads) == 1
    head = ws_upstream.heads[0].decode("latin-1")
    assert head.startswith("GET /v1/realtime?model=gpt-test HTTP/1.1\r\n"), head
    assert f"authorization: bearer {KEY}".lower() in head.lower()
    assert "seks_" not in head, "the fake token reached the upstream"
    assert f"Host: 127.0.0.1:{ws_upstream.port}" in head
    assert "permessage-deflate" not in head.lower(), "compression offered upstream: frames could not be scrubbed"


@pytest.mark.parametrize("target", ["/openai/%2e%2e/v1/realtime", "/openai//127.0.0.1:{A}/x",
                                    "http://127.0.0.1:{A}/openai/v1/realtime", "/openai/v1\\..\\x"])
def test_ws_routing_attacks_are_refused(ws_broker: Broker, ws_upstream: WsUpstream, attacker: TcpRecorder,
                                        target: str) -> None:
    c = WsClient(ws_broker.port, target.replace("{A}", str(attacker.port)), bearer(ws_broker))
    c.close()
    assert c.status == 400, c.head
    time.sleep(0.1)
    assert not ws_upstream.heads and not attacker.seen()


def test_ws_without_token_is_401_and_never_opens_upstream(ws_broker: Broker, ws_upstream: WsUpstream) -> None:
    c = WsClient(ws_broker.port, "/openai/v1/realtime")
    c.close()
    assert c.status == 401, c.head
    assert not ws_upstream.heads


# ============================================================================
# The key never reaches the agent over a WebSocket
# ============================================================================

def scripted(*frames: Tuple[int, bytes, bool, bool]) -> Callable[[WsConn], None]:
    """Accept, wait for the client's first message, send `frames` (opcode, payload, fin, rsv1),
    then record until close."""
    def behaviour(conn: WsConn) -> None:
        conn.accept()
        conn.recv()
        for opcode, payload, fin, rsv1 in frames:
            conn.send(opcode, payload, fin=fin, rsv1=rsv1)
            time.sleep(0.05)
        conn.send(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye")
        conn.recv()
    return behaviour


K = KEY.encode()
WS_LEAKS: Dict[str, Tuple[Tuple[int, bytes, bool, bool], ...]] = {
    "text": ((OP_TEXT, b'{"echo":"' + K + b'"}', True, False),),
    "binary": ((OP_BINARY, b"\x00\x01" + K + b"\xff", True, False),),
    "fragmented-3": ((OP_TEXT, b'{"echo":"' + K[:4], False, False), (OP_CONT, K[4:17], False, False),
                     (OP_CONT, K[17:] + b'"}', True, False)),
    "ping-payload": ((OP_PING, b"k=" + K, True, False),),
    "pong-payload": ((OP_PONG, b"k=" + K, True, False),),
    "ping-inside-fragments": ((OP_TEXT, K[:10], False, False), (OP_PING, K, True, False),
                              (OP_CONT, K[10:], True, False)),
    "compressed-rsv1": ((OP_TEXT, zlib.compress(b'{"echo":"' + K + b'"}')[2:-4], True, True),),
}


@pytest.mark.parametrize("name", list(WS_LEAKS))
def test_ws_key_from_upstream_never_reaches_agent(ws_broker: Broker, ws_upstream: WsUpstream, name: str) -> None:
    ws_upstream.behaviour = scripted(*WS_LEAKS[name])
    c = WsClient(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    try:
        assert c.status == 101, c.head
        c.send(OP_TEXT, b'{"type":"hello"}')
        frames = c.recv_all(limit=3.0)
    finally:
        c.close()
    assert_no_key(everything_seen(c, frames), KEY, name)


def test_ws_close_reason_with_key_is_scrubbed(ws_broker: Broker, ws_upstream: WsUpstream) -> None:
    def behaviour(conn: WsConn) -> None:
        conn.accept()
        conn.recv()
        conn.send(OP_CLOSE, (4001).to_bytes(2, "big") + b"bad key " + K)
        conn.recv()
    ws_upstream.behaviour = behaviour
    c = WsClient(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    try:
        c.send(OP_TEXT, b"{}")
        frames = c.recv_all(limit=3.0)
    finally:
        c.close()
    assert frames and frames[-1][1] == OP_CLOSE, frames
    assert_no_key(everything_seen(c, frames), KEY, "close reason")


def test_ws_handshake_refusal_with_key_is_scrubbed(ws_broker: Broker, ws_upstream: WsUpstream) -> None:
    ws_upstream.behaviour = lambda conn: conn.refuse(
        401, b'{"error":"invalid key ' + K + b'"}', [("WWW-Authenticate", f"Bearer key={KEY}")])
    c = WsClient(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    c.close()
    assert c.status == 401, c.head
    assert_no_key(c.head + c.body, KEY, "refused handshake")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 401 No\r\nX-Echo-" + KEY.encode() + b": 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 401 No\r\nX-A: a\nSet-Cookie: s=1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 401 No\r\nX-A: a\r\n b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 401 No\r\nX-A\x00: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 4\xc2\xb21 No\r\nContent-Length: 2\r\n\r\n{}",
], ids=["key-in-name", "bare-lf", "folded", "nul-in-name", "interim-100", "not-ascii-status"])
def test_ws_handshake_answer_is_parsed_strictly(ws_broker: Broker, ws_upstream: WsUpstream,
                                               answer: bytes) -> None:
    """The upstream's answer to the upgrade goes through the same strict parser as any other
    answer: a malformed one (or an interim one, or a header name holding the key) is a 502,
    never relayed with a line break or the key in it."""
    ws_upstream.behaviour = lambda conn: conn.sock.sendall(answer)
    c = WsClient(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    c.close()
    assert c.status == 502, c.head
    assert b"Set-Cookie" not in c.head and b"X-A" not in c.head, c.head
    assert_no_key(c.head + c.body, KEY, "handshake answer")


def test_ws_handshake_answer_headers_not_passed(ws_broker: Broker, ws_upstream: WsUpstream) -> None:
    def behaviour(conn: WsConn) -> None:
        conn.accept([("X-Echo-Key", KEY), ("Set-Cookie", f"k={KEY}")])
        ws_upstream.pump(conn, echo=True)
    ws_upstream.behaviour = behaviour
    c = WsClient(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    c.close()
    assert c.status == 101
    assert_no_key(c.head, KEY, "101 headers")


# ============================================================================
# Discord gateway: token inside IDENTIFY, resume hosts pinned
# ============================================================================


def gateway_script(up: WsUpstream, *after_identify: bytes) -> Callable[[WsConn], None]:
    """HELLO, then record the broker's frames (in up.frames); answer IDENTIFY with
    `after_identify` and a close."""
    def behaviour(conn: WsConn) -> None:
        conn.accept()
        conn.send(OP_TEXT, json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}).encode())
        while True:
            frame = conn.recv()
            if frame is None:
                return
            _, opcode, payload = frame
            with up.lock:
                up.frames.append((opcode, payload))
            if opcode == OP_CLOSE:
                try:
                    conn.send(OP_CLOSE, payload[:2])     # echo the close, as RFC 6455 asks
                except OSError:
                    pass
                return
            if opcode == OP_TEXT and json.loads(payload).get("op") == 2:
                for msg in after_identify:
                    conn.send(OP_TEXT, msg)
                conn.send(OP_CLOSE, (1000).to_bytes(2, "big"))
    return behaviour


def identify(token: str) -> bytes:
    return json.dumps({"op": 2, "d": {"token": token, "intents": 513,
                                      "properties": {"os": "linux", "browser": "t", "device": "t"}}}).encode()


def test_gateway_identify_swaps_token_and_scrubs_echo(ws_broker: Broker, gateway_upstream: WsUpstream) -> None:
    ready = json.dumps({"op": 0, "t": "READY", "s": 1, "d": {"v": 10, "session_id": "s",
                        "echo": DISCORD_KEY, "resume_gateway_url": f"ws://127.0.0.1:{gateway_upstream.port}"}})
    gateway_upstream.behaviour = gateway_script(gateway_upstream, ready.encode())
    c = WsClient(ws_broker.port, "/discord/gateway?v=10&encoding=json")
    try:
        assert c.status == 101, c.head
        hello = c.recv()
        assert hello is not None and b'"op": 10' in hello[2]
        c.send(OP_TEXT, identify(ws_broker.token("discord")))
        frames = c.recv_all(limit=3.0)
    finally:
        c.close()
    sent = [json.loads(p) for op, p in gateway_upstream.frames if op == OP_TEXT]
    assert sent and sent[0]["op"] == 2 and sent[0]["d"]["token"] == DISCORD_KEY, sent
    assert not any(b"seks_" in p for _, p in gateway_upstream.frames), "fake token reached the gateway"
    seen = everything_seen(c, frames)
    assert_no_key(seen, DISCORD_KEY, "gateway READY echo")
    assert b"READY" in seen
    assert b"/discord/gateway/resume/" in seen, "resume_gateway_url not pointed back at the broker route"
    assert f'"ws://127.0.0.1:{gateway_upstream.port}"'.encode() not in seen, "agent told to resume at the gateway itself"


@pytest.mark.parametrize("token", ["unknown", "other-provider", "none"])
def test_gateway_bad_identify_never_reaches_discord(ws_broker: Broker, gateway_upstream: WsUpstream,
                                                    token: str) -> None:
    gateway_upstream.behaviour = gateway_script(gateway_upstream)
    c = WsClient(ws_broker.port, "/discord/gateway?v=10&encoding=json")
    try:
        assert c.status == 101, c.head
        c.recv()
        if token == "none":
            c.send(OP_TEXT, json.dumps({"op": 8, "d": {"guild_id": "1"}}).encode())   # before IDENTIFY
        else:
            t = "seks_discord_" + "A" * 43 if token == "unknown" else ws_broker.token("openai")
            c.send(OP_TEXT, identify(t))
        frames = c.recv_all(limit=3.0)
    finally:
        c.close()
    assert frames and frames[-1][1] == OP_CLOSE, frames
    code = int.from_bytes(frames[-1][2][:2], "big")
    assert code in (4003, 4004), code
    got = [p for op, p in gateway_upstream.frames if op == OP_TEXT]
    assert not got, f"gateway received {got}"


@pytest.mark.parametrize("host", ["127.0.0.1:{A}", "127.0.0.1%3A{A}", "evil.example", "discord.gg.evil.example",
                                  "127.0.0.1"])
def test_gateway_resume_host_is_pinned(ws_broker: Broker, gateway_upstream: WsUpstream, attacker: TcpRecorder,
                                       host: str) -> None:
    target = "/discord/gateway/resume/" + host.replace("{A}", str(attacker.port)) + "?v=10&encoding=json"
    c = WsClient(ws_broker.port, target)
    c.close()
    assert c.status in (400, 403, 404), c.head
    time.sleep(0.1)
    assert not attacker.seen(), "the broker connected to an agent-chosen resume host"
    assert not gateway_upstream.heads


# ============================================================================
# A refused upgrade is an HTTP answer: the same pipeline as every other answer
# (strict framing, gzip/deflate inflated before scanning, the hold-back scrubber, no cut)
# ============================================================================

from sec_helpers import read_response, request_bytes  # noqa: E402

WS_HANDSHAKE = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


MASK = b"[REDACTED-BY-SEKS]" + b"*" * (len(K) - 18)


def refused_upgrade(b: Broker, extra: List[Tuple[str, str]] = ()) -> Any:
    """Send an upgrade on a raw socket and read the whole answer (any framing)."""
    import socket
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
        sock.sendall(request_bytes("GET", "/openai/v1/realtime", WS_HANDSHAKE + bearer(b) + list(extra)))
        return read_response(sock, "GET", close_wait=0.5)


def key_pieces_seen(data: bytes, key: str, shortest: int = 8) -> List[str]:
    """Every prefix or suffix of the key (at least `shortest` long) found in `data`: a key cut
    at a size limit shows up here even though the whole key does not."""
    k = key.encode()
    return [k[:n].decode() for n in range(shortest, len(k) + 1) if k[:n] in data] + \
           [k[-n:].decode() for n in range(shortest, len(k) + 1) if k[-n:] in data]


def raw_answer(head: bytes, body: bytes) -> Callable[[WsConn], None]:
    def behaviour(conn: WsConn) -> None:
        conn.sock.sendall(head + body)
        try:
            conn.sock.shutdown(1)
        except OSError:
            pass
    return behaviour


@pytest.mark.parametrize("offset", [1, 2, 7, 15, len(KEY) - 1, len(KEY), len(KEY) + 3])
def test_ws_refusal_body_is_never_cut_inside_a_key(ws_broker: Broker, ws_upstream: WsUpstream,
                                                   offset: int) -> None:
    """The refusal echoes the key so that it straddles 64 KiB (the old cut) at several offsets:
    the agent gets the whole body with the key masked, never a prefix of it."""
    pad = b"x" * (65536 - offset)
    body = pad + K + b"y" * 5000
    head = (b"HTTP/1.1 400 Bad\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body))
    ws_upstream.behaviour = raw_answer(head, body)
    r = refused_upgrade(ws_broker)
    assert r.status == 400, r
    assert not key_pieces_seen(r.raw, KEY), key_pieces_seen(r.raw, KEY)
    assert len(r.body) == len(body), "a refusal body is relayed whole (masked in place)"
    assert b"[REDACTED-BY-SEKS]" in r.body


def _gzip(data: bytes) -> bytes:
    import gzip
    return gzip.compress(data)


@pytest.mark.parametrize("coding,encode", [("gzip", _gzip), ("x-gzip", _gzip), ("deflate", zlib.compress),
                                           ("GZIP", _gzip)])
def test_ws_compressed_refusal_is_inflated_and_scrubbed(ws_broker: Broker, ws_upstream: WsUpstream,
                                                        coding: str, encode: Callable[[bytes], bytes]) -> None:
    body = encode((b'{"error":{"message":"bad key ' + K + b'"}}') * 50)
    head = (b"HTTP/1.1 401 No\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (coding.encode(), len(body)))
    ws_upstream.behaviour = raw_answer(head, body)
    r = refused_upgrade(ws_broker)
    assert r.status == 401, r
    assert r.header("content-encoding") is None, "the body is relayed inflated"
    assert_no_key(everything_seen_http(r), KEY, coding)
    assert r.body.count(b"bad key [REDACTED-BY-SEKS]") == 50


def everything_seen_http(r: Any) -> bytes:
    """The raw answer, plus its body inflated every way an agent's client might try."""
    out = r.raw
    for wbits in (-15, 15, 31):
        try:
            out += zlib.decompressobj(wbits).decompress(r.body)
        except zlib.error:
            pass
    return out


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "identity, x-" + KEY.upper()])
def test_ws_refusal_with_an_uninspectable_coding_is_502(ws_broker: Broker, ws_upstream: WsUpstream,
                                                        coding: str) -> None:
    body = b"\x1b\x02" + K
    head = (b"HTTP/1.1 403 No\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (coding.encode(), len(body)))
    ws_upstream.behaviour = raw_answer(head, body)
    r = refused_upgrade(ws_broker)
    assert r.status == 502, r
    assert_no_key(r.raw.lower(), KEY.lower(), coding)
    assert coding.encode().lower() not in r.raw.lower() or coding in ("br", "zstd", "compress"), \
        "a broker-made message quotes the upstream's header"


@pytest.mark.parametrize("split", [1, 5, 16, len(KEY) - 1])
def test_ws_chunked_refusal_is_dechunked_before_scrubbing(ws_broker: Broker, ws_upstream: WsUpstream,
                                                          split: int) -> None:
    """The key is split across chunks (and a Content-Length stands beside the chunking): the
    scrubber sees the decoded body, so no framing can hide the key from it."""
    a, b_ = b"echo " + K[:split], K[split:] + b" end"
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(a), a, len(b_), b_)
    for extra in (b"", b"Content-Length: 7\r\n"):
        head = (b"HTTP/1.1 401 No\r\nTransfer-Encoding: chunked\r\n" + extra +
                b"Connection: close\r\n\r\n")
        ws_upstream.behaviour = raw_answer(head, chunks)
        r = refused_upgrade(ws_broker)
        assert r.status == 401, r
        assert_no_key(r.raw, KEY, f"chunked split at {split}")
        assert not key_pieces_seen(r.raw, KEY, shortest=len(KEY) // 2 + 1)
        assert r.body == b"echo " + MASK + b" end", r.body


def test_ws_handshake_asks_for_identity(ws_broker: Broker, ws_upstream: WsUpstream) -> None:
    c = WsClient(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker) + [("Accept-Encoding", "gzip, br")])
    c.close()
    assert c.status == 101, c.head
    head = ws_upstream.heads[0].decode("latin-1").lower()
    assert "accept-encoding: identity\r\n" in head, head
    assert "gzip" not in head


def test_ws_refusal_streams_like_any_answer(ws_broker: Broker, ws_upstream: WsUpstream) -> None:
    """A large refusal (past the old 64 KiB cap) is relayed whole, sized, keys masked."""
    body = (b"0123456789" * 1000 + K) * 30
    head = b"HTTP/1.1 429 Slow\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ws_upstream.behaviour = raw_answer(head, body)
    r = refused_upgrade(ws_broker)
    assert r.status == 429 and len(r.body) == len(body), r
    assert r.body.count(b"[REDACTED-BY-SEKS]") == 30
    assert_no_key(r.raw, KEY, "large refusal")


def gateway_session(b: Broker, up: WsUpstream, *after_identify: Tuple[int, bytes]) -> Tuple[Any, List[Tuple[bool, int, bytes]]]:
    """HELLO, IDENTIFY with the broker's token, then the upstream sends `after_identify`
    (opcode, payload) frames and a close; returns the client and every frame it got."""
    def behaviour(conn: WsConn) -> None:
        conn.accept()
        conn.send(OP_TEXT, json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}).encode())
        frame = conn.recv()
        if frame is None:
            return
        with up.lock:
            up.frames.append((frame[1], frame[2]))
        for opcode, payload in after_identify:
            conn.send(opcode, payload)
        conn.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        conn.recv()
    up.behaviour = behaviour
    c = WsClient(b.port, "/discord/gateway?v=10&encoding=json")
    assert c.status == 101, c.head
    c.recv()
    c.send(OP_TEXT, identify(b.token("discord")))
    frames = c.recv_all(limit=5.0)
    c.close()
    return c, frames


def decoded_json_texts(frames: List[Tuple[bool, int, bytes]]) -> str:
    """The text frames as the agent's JSON parser reads them (escapes decoded)."""
    out = []
    for _, op, p in frames:
        if op == OP_TEXT:
            try:
                out.append(json.dumps(json.loads(p), ensure_ascii=False))
            except ValueError:
                out.append(p.decode("utf-8", "replace"))
    return "\n".join(out)


def test_gateway_scrubs_what_it_sends_after_rewriting_ready(ws_broker: Broker,
                                                            gateway_upstream: WsUpstream) -> None:
    """READY is re-encoded to point resume_gateway_url at the broker; a key the upstream wrote
    with JSON escapes becomes plain text in that re-encoding, so the scrubber reads the bytes
    actually sent, not the ones received."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in DISCORD_KEY)
    ready = ('{"op": 0, "t": "READY", "s": 1, "d": {"v": 10, "session_id": "s", "note": "' + escaped +
             '", "resume_gateway_url": "ws://127.0.0.1:%d"}}' % gateway_upstream.port).encode()
    c, frames = gateway_session(ws_broker, gateway_upstream, (OP_TEXT, ready))
    assert any(b"READY" in p for _, _, p in frames), frames
    assert_no_key(everything_seen(c, frames), DISCORD_KEY, "re-encoded READY")
    assert DISCORD_KEY not in decoded_json_texts(frames)


@pytest.mark.parametrize("payload", ["bomb", "cut", "not-zlib"])
def test_gateway_binary_frames_are_inflated_within_bounds(ws_broker: Broker, gateway_upstream: WsUpstream,
                                                          payload: str) -> None:
    """A binary (zlib) frame from the gateway that inflates past the HTTP bound, is cut, or is
    not zlib ends the session with a close; the broker keeps serving."""
    if payload == "bomb":
        data = zlib.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", 9)
    elif payload == "cut":
        data = zlib.compress(json.dumps({"op": 11, "echo": DISCORD_KEY}).encode())[:-6]
    else:
        data = b"\x00\x01" + DISCORD_KEY.encode()
    c, frames = gateway_session(ws_broker, gateway_upstream, (OP_BINARY, data))
    assert frames and frames[-1][1] == OP_CLOSE, frames
    code = int.from_bytes(frames[-1][2][:2], "big")
    assert code in (1009, 1011), code
    assert_no_key(everything_seen(c, frames), DISCORD_KEY, payload)
    assert ws_broker.request("GET", "/healthz").status == 200
