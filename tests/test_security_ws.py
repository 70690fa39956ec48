"""Adversarial suite for issue 5 over WebSockets: the same promises as HTTP (closed forwarding,
the key never reaches the agent) for the RFC 6455 relay on provider routes and for the Discord
gateway route, where the token travels inside IDENTIFY/RESUME, and an upgrade carrying a body.

A raw WebSocket client (ws_helpers.ws_connect) talks to a real broker; a loopback WebSocket
upstream (ws_helpers.ScriptedServer) records every handshake and frame and sends whatever each
test scripts - including the real key, split over fragments, in control frames, in a close
reason, or compressed.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from conftest import REAL_KEYS, Broker, Brokers, TcpRecorder
from raw_http import RawResponse, raw_exchange, read_response, request_bytes
from ws_helpers import (
    OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, Handshake, Peer, ScriptedServer, close_payload,
    parse_close, ws_connect,
)

KEY = REAL_KEYS["openai"]
DISCORD_KEY = REAL_KEYS["discord"]
Frame = Tuple[bool, int, bytes]


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[ScriptedServer]:
    up = ScriptedServer("ws-upstream")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway_upstream() -> Iterator[ScriptedServer]:
    up = ScriptedServer("gateway-upstream")
    yield up
    up.stop()


@pytest.fixture(autouse=True)
def _reset(ws_upstream: ScriptedServer, gateway_upstream: ScriptedServer) -> None:
    ws_upstream.reset()
    gateway_upstream.reset()


@pytest.fixture(scope="module")
def ws_broker(broker_factory: Brokers, ws_upstream: ScriptedServer,
              gateway_upstream: ScriptedServer) -> Broker:
    return broker_factory({"openai": ws_upstream.url},
                          extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": gateway_upstream.ws_url},
                          providers=("openai", "discord"))


def bearer(b: Broker) -> List[Tuple[str, str]]:
    return [("Authorization", f"Bearer {b.token('openai')}")]


def session_frames(hs: Handshake, first: Optional[Tuple[int, bytes]] = None, limit: float = 3.0) -> List[Frame]:
    """Send `first` (opcode, payload) if given, then every frame until the close (or `limit`)."""
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.raw_head)
    try:
        if first is not None:
            hs.ws.send_frame(*first)
        return hs.ws.frames_until_close(limit)
    finally:
        hs.ws.close()


def everything_seen(hs: Handshake, frames: List[Frame]) -> bytes:
    """All the agent received: the handshake answer, any body, every frame payload, and the
    payloads inflated in case they were compressed."""
    out = hs.raw_head + hs.body + b"".join(p for _, _, p in frames)
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
                                                                       ws_upstream: ScriptedServer) -> None:
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime?model=gpt-test",
                 bearer(ws_broker) + [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
                                      ("Origin", "http://evil.example")])
    assert hs.status == 101 and hs.ws is not None, hs.raw_head
    try:
        hs.ws.send_frame(OP_TEXT, b'{"type":"ping"}')
        assert hs.ws.recv_frame()[2] == b'{"type":"ping"}'
    finally:
        hs.ws.close()
    assert len(ws_upstream.handshakes) == 1
    head = ws_upstream.handshakes[0].raw.decode("latin-1")
    assert head.startswith("GET /v1/realtime?model=gpt-test HTTP/1.1\r\n"), head
    assert f"authorization: bearer {KEY}".lower() in head.lower()
    assert "seks_" not in head, "the fake token reached the upstream"
    assert f"Host: 127.0.0.1:{ws_upstream.port}" in head
    assert "permessage-deflate" not in head.lower(), "compression offered upstream: frames could not be scrubbed"


WS_ROUTING_ATTACKS = ["/openai/%2e%2e/v1/realtime", "/openai//127.0.0.1:{A}/x",
                      "http://127.0.0.1:{A}/openai/v1/realtime", "/openai/v1\\..\\x"]


def test_ws_routing_attacks_are_refused(ws_broker: Broker, ws_upstream: ScriptedServer,
                                        attacker: TcpRecorder) -> None:
    """Every WS_ROUTING_ATTACKS target (one test, formerly one per target): 400, no connection
    right after it, and still none 0.1 s after the last one (each had at least that long)."""
    for target in WS_ROUTING_ATTACKS:
        hs = ws_connect(ws_broker.port, target.replace("{A}", str(attacker.port)), bearer(ws_broker))
        assert hs.status == 400, (target, hs.raw_head)
        assert ws_upstream.connections == 0 and not attacker.seen(), target
    time.sleep(0.1)
    assert ws_upstream.connections == 0 and not attacker.seen(), "after every routing attack"


def test_ws_without_token_is_401_and_never_opens_upstream(ws_broker: Broker, ws_upstream: ScriptedServer) -> None:
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime")
    assert hs.status == 401, hs.raw_head
    assert ws_upstream.connections == 0


# ============================================================================
# The key never reaches the agent over a WebSocket
# ============================================================================

def scripted(*frames: Tuple[int, bytes, bool, bool]) -> Callable[[Peer], None]:
    """Accept, wait for the client's first message, send `frames` (opcode, payload, fin, rsv1),
    then close and read the answer."""
    def behaviour(peer: Peer) -> None:
        ws = peer.accept().ws
        ws.recv_frame()
        for opcode, payload, fin, rsv1 in frames:
            ws.send_frame(opcode, payload, fin=fin, rsv=0x40 if rsv1 else 0)
            time.sleep(0.05)
        ws.send_close(1000, "bye")
        ws.recv_frame()
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
def test_ws_key_from_upstream_never_reaches_agent(ws_broker: Broker, ws_upstream: ScriptedServer, name: str) -> None:
    ws_upstream.behaviour = scripted(*WS_LEAKS[name])
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    frames = session_frames(hs, (OP_TEXT, b'{"type":"hello"}'))
    assert_no_key(everything_seen(hs, frames), KEY, name)


def test_ws_close_reason_with_key_is_scrubbed(ws_broker: Broker, ws_upstream: ScriptedServer) -> None:
    def behaviour(peer: Peer) -> None:
        ws = peer.accept().ws
        ws.recv_frame()
        ws.send_frame(OP_CLOSE, close_payload(4001, "bad key " + KEY))
        ws.recv_frame()
    ws_upstream.behaviour = behaviour
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    frames = session_frames(hs, (OP_TEXT, b"{}"))
    assert frames and frames[-1][1] == OP_CLOSE, frames
    assert_no_key(everything_seen(hs, frames), KEY, "close reason")


def test_ws_handshake_refusal_with_key_is_scrubbed(ws_broker: Broker, ws_upstream: ScriptedServer) -> None:
    ws_upstream.behaviour = lambda peer: peer.refuse(
        401, b'{"error":"invalid key ' + K + b'"}', [("WWW-Authenticate", f"Bearer key={KEY}")])
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    assert hs.status == 401, hs.raw_head
    assert_no_key(hs.raw_head + hs.body, KEY, "refused handshake")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 401 No\r\nX-Echo-" + KEY.encode() + b": 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 401 No\r\nX-A: a\nSet-Cookie: s=1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 401 No\r\nX-A: a\r\n b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 401 No\r\nX-A\x00: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 4\xc2\xb21 No\r\nContent-Length: 2\r\n\r\n{}",
], ids=["key-in-name", "bare-lf", "folded", "nul-in-name", "interim-100", "not-ascii-status"])
def test_ws_handshake_answer_is_parsed_strictly(ws_broker: Broker, ws_upstream: ScriptedServer,
                                               answer: bytes) -> None:
    """The upstream's answer to the upgrade goes through the same strict parser as any other
    answer: a malformed one (or an interim one, or a header name holding the key) is a 502,
    never relayed with a line break or the key in it."""
    ws_upstream.behaviour = lambda peer: peer.send_raw(answer)
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    assert hs.status == 502, hs.raw_head
    assert b"Set-Cookie" not in hs.raw_head and b"X-A" not in hs.raw_head, hs.raw_head
    assert_no_key(hs.raw_head + hs.body, KEY, "handshake answer")


def test_ws_handshake_answer_headers_not_passed(ws_broker: Broker, ws_upstream: ScriptedServer) -> None:
    ws_upstream.behaviour = lambda peer: ws_upstream.echo_until_close(
        peer.accept([("X-Echo-Key", KEY), ("Set-Cookie", f"k={KEY}")]))
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker))
    assert hs.status == 101 and hs.ws is not None, hs.raw_head
    hs.ws.close()
    assert_no_key(hs.raw_head, KEY, "101 headers")


# ============================================================================
# Discord gateway: token inside IDENTIFY, resume hosts pinned
# ============================================================================

HELLO = json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}).encode()


def gateway_script(up: ScriptedServer, *after_identify: bytes) -> Callable[[Peer], None]:
    """HELLO, then record the broker's frames (the session's .received); answer IDENTIFY with
    `after_identify` and a close."""
    def behaviour(peer: Peer) -> None:
        s = peer.accept()
        s.ws.send_frame(OP_TEXT, HELLO)
        while True:
            op, payload = up.next_message(s)
            if op == OP_CLOSE:
                up.finish_close(s, *parse_close(payload))    # echo the close, as RFC 6455 asks
                return
            if op == OP_TEXT and json.loads(payload).get("op") == 2:
                for msg in after_identify:
                    s.ws.send_frame(OP_TEXT, msg)
                s.ws.send_close(1000)
    return behaviour


def identify(token: str) -> bytes:
    return json.dumps({"op": 2, "d": {"token": token, "intents": 513,
                                      "properties": {"os": "linux", "browser": "t", "device": "t"}}}).encode()


def test_gateway_identify_swaps_token_and_scrubs_echo(ws_broker: Broker, gateway_upstream: ScriptedServer) -> None:
    ready = json.dumps({"op": 0, "t": "READY", "s": 1, "d": {"v": 10, "session_id": "s",
                        "echo": DISCORD_KEY, "resume_gateway_url": gateway_upstream.ws_url}})
    gateway_upstream.behaviour = gateway_script(gateway_upstream, ready.encode())
    hs = ws_connect(ws_broker.port, "/discord/gateway?v=10&encoding=json")
    assert hs.status == 101 and hs.ws is not None, hs.raw_head
    hello = hs.ws.recv_frame()
    assert b'"op": 10' in hello[2]
    frames = session_frames(hs, (OP_TEXT, identify(ws_broker.token("discord"))))
    received = gateway_upstream.received()
    sent = [json.loads(p) for op, p in received if op == OP_TEXT]
    assert sent and sent[0]["op"] == 2 and sent[0]["d"]["token"] == DISCORD_KEY, sent
    assert not any(b"seks_" in p for _, p in received), "fake token reached the gateway"
    seen = everything_seen(hs, frames)
    assert_no_key(seen, DISCORD_KEY, "gateway READY echo")
    assert b"READY" in seen
    assert b"/discord/gateway/resume/" in seen, "resume_gateway_url not pointed back at the broker route"
    assert f'"{gateway_upstream.ws_url}"'.encode() not in seen, "agent told to resume at the gateway itself"


@pytest.mark.parametrize("token", ["unknown", "other-provider", "none"])
def test_gateway_bad_identify_never_reaches_discord(ws_broker: Broker, gateway_upstream: ScriptedServer,
                                                    token: str) -> None:
    gateway_upstream.behaviour = gateway_script(gateway_upstream)
    hs = ws_connect(ws_broker.port, "/discord/gateway?v=10&encoding=json")
    assert hs.status == 101 and hs.ws is not None, hs.raw_head
    hs.ws.recv_frame()
    if token == "none":
        first = (OP_TEXT, json.dumps({"op": 8, "d": {"guild_id": "1"}}).encode())   # before IDENTIFY
    else:
        t = "seks_discord_" + "A" * 43 if token == "unknown" else ws_broker.token("openai")
        first = (OP_TEXT, identify(t))
    frames = session_frames(hs, first)
    assert frames and frames[-1][1] == OP_CLOSE, frames
    code = int.from_bytes(frames[-1][2][:2], "big")
    assert code in (4003, 4004), code
    got = [p for op, p in gateway_upstream.received() if op == OP_TEXT]
    assert not got, f"gateway received {got}"


RESUME_HOSTS = ["127.0.0.1:{A}", "127.0.0.1%3A{A}", "evil.example", "discord.gg.evil.example", "127.0.0.1"]


def test_gateway_resume_host_is_pinned(ws_broker: Broker, gateway_upstream: ScriptedServer,
                                       attacker: TcpRecorder) -> None:
    """Every RESUME_HOSTS host (one test, formerly one per host): refused, no connection right
    after it, and still none 0.1 s after the last one (each had at least that long)."""
    for host in RESUME_HOSTS:
        target = "/discord/gateway/resume/" + host.replace("{A}", str(attacker.port)) + "?v=10&encoding=json"
        hs = ws_connect(ws_broker.port, target)
        assert hs.status in (400, 403, 404), (host, hs.raw_head)
        assert not attacker.seen(), f"{host}: the broker connected to an agent-chosen resume host"
        assert gateway_upstream.connections == 0, host
    time.sleep(0.1)
    assert not attacker.seen(), "the broker connected to an agent-chosen resume host"
    assert gateway_upstream.connections == 0


# ============================================================================
# A refused upgrade is an HTTP answer: the same pipeline as every other answer
# (strict framing, gzip/deflate inflated before scanning, the hold-back scrubber, no cut)
# ============================================================================

WS_HANDSHAKE = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


MASK = b"[REDACTED-BY-SEKS]" + b"*" * (len(K) - 18)


def refused_upgrade(b: Broker, extra: Sequence[Tuple[str, str]] = ()) -> RawResponse:
    """Send an upgrade on a raw socket and read the whole answer (any framing)."""
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
        sock.sendall(request_bytes("GET", "/openai/v1/realtime", WS_HANDSHAKE + bearer(b) + list(extra)))
        return read_response(sock, "GET", close_wait=0.5)


def key_pieces_seen(data: bytes, key: str, shortest: int = 8) -> List[str]:
    """Every prefix or suffix of the key (at least `shortest` long) found in `data`: a key cut
    at a size limit shows up here even though the whole key does not."""
    k = key.encode()
    return [k[:n].decode() for n in range(shortest, len(k) + 1) if k[:n] in data] + \
           [k[-n:].decode() for n in range(shortest, len(k) + 1) if k[-n:] in data]


def raw_answer(head: bytes, body: bytes) -> Callable[[Peer], None]:
    def behaviour(peer: Peer) -> None:
        peer.send_raw(head + body)
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return behaviour


def test_ws_upgrade_with_a_body_is_400_and_closed(ws_broker: Broker, ws_upstream: ScriptedServer,
                                                  gateway_upstream: ScriptedServer) -> None:
    """An upgrade request carrying a body, on either WebSocket route (one test, formerly one per
    route), is refused and closed: the unread body is never run as the next request, and no
    upstream is contacted, right after the answer nor 0.2 s after the last one."""
    inner = request_bytes("POST", "/openai/v1/chat/completions", bearer(ws_broker) + [
        ("Content-Type", "application/json"), ("Content-Length", "2")]) + b"{}"
    for target in ("/openai/v1/realtime", "/discord/gateway?v=10&encoding=json"):
        data = request_bytes("GET", target, bearer(ws_broker) + WS_HANDSHAKE + [("Content-Length", str(len(inner)))]) \
            + inner
        resp = raw_exchange(ws_broker.port, data, close_wait=0.5)
        assert resp.status == 400, (target, resp)
        assert resp.closed and resp.raw.count(b"HTTP/1.1 ") == 1, (target, resp.raw[-300:])
        assert ws_upstream.connections == 0 and gateway_upstream.connections == 0, target
    time.sleep(0.2)
    assert ws_upstream.connections == 0 and gateway_upstream.connections == 0


@pytest.mark.parametrize("offset", [1, 2, 7, 15, len(KEY) - 1, len(KEY), len(KEY) + 3])
def test_ws_refusal_body_is_never_cut_inside_a_key(ws_broker: Broker, ws_upstream: ScriptedServer,
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


@pytest.mark.parametrize("coding,encode", [("gzip", gzip.compress), ("x-gzip", gzip.compress),
                                           ("deflate", zlib.compress), ("GZIP", gzip.compress)])
def test_ws_compressed_refusal_is_inflated_and_scrubbed(ws_broker: Broker, ws_upstream: ScriptedServer,
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


def everything_seen_http(r: RawResponse) -> bytes:
    """The raw answer, plus its body inflated every way an agent's client might try."""
    out = r.raw
    for wbits in (-15, 15, 31):
        try:
            out += zlib.decompressobj(wbits).decompress(r.body)
        except zlib.error:
            pass
    return out


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "identity, x-" + KEY.upper()])
def test_ws_refusal_with_an_uninspectable_coding_is_502(ws_broker: Broker, ws_upstream: ScriptedServer,
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
def test_ws_chunked_refusal_is_dechunked_before_scrubbing(ws_broker: Broker, ws_upstream: ScriptedServer,
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


def test_ws_handshake_asks_for_identity(ws_broker: Broker, ws_upstream: ScriptedServer) -> None:
    hs = ws_connect(ws_broker.port, "/openai/v1/realtime", bearer(ws_broker) + [("Accept-Encoding", "gzip, br")])
    assert hs.status == 101 and hs.ws is not None, hs.raw_head
    hs.ws.close()
    head = ws_upstream.handshakes[0].raw.decode("latin-1").lower()
    assert "accept-encoding: identity\r\n" in head, head
    assert "gzip" not in head


def test_ws_refusal_streams_like_any_answer(ws_broker: Broker, ws_upstream: ScriptedServer) -> None:
    """A large refusal (past the old 64 KiB cap) is relayed whole, sized, keys masked."""
    body = (b"0123456789" * 1000 + K) * 30
    head = b"HTTP/1.1 429 Slow\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ws_upstream.behaviour = raw_answer(head, body)
    r = refused_upgrade(ws_broker)
    assert r.status == 429 and len(r.body) == len(body), r
    assert r.body.count(b"[REDACTED-BY-SEKS]") == 30
    assert_no_key(r.raw, KEY, "large refusal")


def gateway_session(b: Broker, up: ScriptedServer, *after_identify: Tuple[int, bytes]) -> Tuple[Handshake, List[Frame]]:
    """HELLO, IDENTIFY with the broker's token, then the upstream sends `after_identify`
    (opcode, payload) frames and a close; returns the handshake and every frame the client got."""
    def behaviour(peer: Peer) -> None:
        s = peer.accept()
        s.ws.send_frame(OP_TEXT, HELLO)
        up.next_message(s)
        for opcode, payload in after_identify:
            s.ws.send_frame(opcode, payload)
        s.ws.send_close(1000)
        s.ws.recv_frame()
    up.behaviour = behaviour
    hs = ws_connect(b.port, "/discord/gateway?v=10&encoding=json")
    assert hs.status == 101 and hs.ws is not None, hs.raw_head
    hs.ws.recv_frame()
    return hs, session_frames(hs, (OP_TEXT, identify(b.token("discord"))), limit=5.0)


def decoded_json_texts(frames: List[Frame]) -> str:
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
                                                            gateway_upstream: ScriptedServer) -> None:
    """READY is re-encoded to point resume_gateway_url at the broker; a key the upstream wrote
    with JSON escapes becomes plain text in that re-encoding, so the scrubber reads the bytes
    actually sent, not the ones received."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in DISCORD_KEY)
    ready = ('{"op": 0, "t": "READY", "s": 1, "d": {"v": 10, "session_id": "s", "note": "' + escaped +
             '", "resume_gateway_url": "%s"}}' % gateway_upstream.ws_url).encode()
    hs, frames = gateway_session(ws_broker, gateway_upstream, (OP_TEXT, ready))
    assert any(b"READY" in p for _, _, p in frames), frames
    assert_no_key(everything_seen(hs, frames), DISCORD_KEY, "re-encoded READY")
    assert DISCORD_KEY not in decoded_json_texts(frames)


@pytest.mark.parametrize("payload", ["bomb", "cut", "not-zlib"])
def test_gateway_binary_frames_are_inflated_within_bounds(ws_broker: Broker, gateway_upstream: ScriptedServer,
                                                          payload: str) -> None:
    """A binary (zlib) frame from the gateway that inflates past the HTTP bound, is cut, or is
    not zlib ends the session with a close; the broker keeps serving."""
    if payload == "bomb":
        data = zlib.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", 9)
    elif payload == "cut":
        data = zlib.compress(json.dumps({"op": 11, "echo": DISCORD_KEY}).encode())[:-6]
    else:
        data = b"\x00\x01" + DISCORD_KEY.encode()
    hs, frames = gateway_session(ws_broker, gateway_upstream, (OP_BINARY, data))
    assert frames and frames[-1][1] == OP_CLOSE, frames
    code = int.from_bytes(frames[-1][2][:2], "big")
    assert code in (1009, 1011), code
    assert_no_key(everything_seen(hs, frames), DISCORD_KEY, payload)
    assert ws_broker.request("GET", "/healthz").status == 200
