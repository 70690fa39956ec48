"""WebSockets through the broker over real sockets (issue 7): the generic relay on any provider
route, OpenAI Realtime (Bearer in the handshake), the Discord gateway (token checked and swapped
inside IDENTIFY/RESUME, READY's resume_gateway_url and /gateway/bot rewritten, zlib-stream for
the agent, `v=` ASCII digits only, a second IDENTIFY refused), RFC 6455 edge cases, sessions
refused for tokens with limits they cannot hold (request counts, models, budgets) and ended
when their token is revoked, the audit row of a session, and no real key in any frame or log.

Upstreams are loopback WebSocket servers from ws_helpers.py (standard library): FakeRealtime
(401 unless `Authorization: Bearer <real key>`), FakeGateway (4004 unless IDENTIFY/RESUME carry
the real token) and EchoServer. The client is ws_helpers.WsConn on a raw socket, so every byte
and frame bit is under the test's control. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import struct
import termios
import threading
import time
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, audit_json, broker_env,
    fresh_token, free_port, run_cli, wait_until,
)
from ws_helpers import (
    OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, EchoServer, FakeGateway, FakeRealtime,
    MiB, PeerClosed, WsConn, deterministic_bytes, encode_frame, parse_close, ws_connect,
)

WS_PROVIDERS = ("openai", "gemini", "anthropic", "discord")
RT_PATH = "/openai/v1/realtime?model=gpt-test"
MAX_MESSAGE = 16 * MiB            # the broker's WS_MAX_MESSAGE
BROKER_POLL_S = 0.5               # the ws_poll these tests give the broker (its default is 5 s)
MIN_POLL_S = 0.1                  # the smallest ws_poll the broker takes
END_S = 5.0                       # "soon": the other side's socket must be closed within this
MASK_LABEL = b"[REDACTED-BY-SEKS]"
ZLIB_SUFFIX = b"\x00\x00\xff\xff"


# ============================================================================
# Fixtures
# ============================================================================



@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    srv = EchoServer("echo")
    yield srv
    srv.stop()


def discord_rest_responder(h: UpstreamHandler, req: RecordedRequest) -> None:
    """Discord REST: 401 unless `Authorization: Bot <real>`; /gateway(/bot) name the real gateway."""
    if req.header_all("Authorization") != [f"Bot {REAL_KEYS['discord']}"]:
        h.send_json(401, {"message": "401: Unauthorized", "code": 0})
        return
    path = re.sub(r"^/api(/v\d+)?", "", req.path)
    if path == "/gateway/bot":
        h.send_json(200, {"url": "wss://gateway.discord.gg", "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}})
    elif path == "/gateway":
        h.send_json(200, {"url": "wss://gateway.discord.gg"})
    else:
        h.send_json(404, {"message": "404: Not Found", "code": 0})


@pytest.fixture(scope="module")
def discord_rest() -> Iterator[FakeUpstream]:
    up = FakeUpstream("discord")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def wsb(broker_factory: Brokers, realtime: FakeRealtime, gateway: FakeGateway, echo: EchoServer,
        discord_rest: FakeUpstream) -> Broker:
    """One broker for the module: openai -> FakeRealtime, gemini/anthropic -> EchoServer,
    discord REST -> a FakeUpstream, discord gateway (env) -> FakeGateway. `.expiring`: an openai
    token minted with the shortest --ttl (1s) as the broker starts, and the time it expires by:
    the bad-token test uses it once expired, without waiting out a second of its own."""
    b = broker_factory(
        {"openai": realtime.url, "gemini": echo.url, "anthropic": echo.url, "discord": discord_rest.url},
        extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": gateway.ws_url, "SEKS_WS_POLL": f"{BROKER_POLL_S}s"},
        providers=WS_PROVIDERS)
    b.expiring = (b.mint("openai", "agent-expired-rt", "--ttl", "1s"), time.time() + 1)  # type: ignore[attr-defined]
    return b


@pytest.fixture(autouse=True)
def _fresh(realtime: FakeRealtime, gateway: FakeGateway, echo: EchoServer,
           discord_rest: FakeUpstream) -> None:
    for srv in (realtime, gateway, echo):
        srv.reset()
    realtime.close_answer = None
    discord_rest.reset()
    discord_rest.set_responder(discord_rest_responder)


# ============================================================================
# Helpers
# ============================================================================


def bearer(token: str) -> List[Tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def rt_open(b: Broker, token: Optional[str] = None, target: str = RT_PATH,
            headers: Sequence[Tuple[str, str]] = (), after_head: bytes = b"") -> WsConn:
    """A Realtime session through the broker, past session.created."""
    hs = ws_connect(b.port, target, bearer(token or b.token("openai")) + list(headers), after_head)
    assert hs.status == 101, (hs.status, hs.body[:500])
    assert hs.ws is not None
    first = hs.ws.recv_json()
    assert first["type"] == "session.created", first
    return hs.ws


def assert_no_key(data: bytes, provider: str, where: str) -> None:
    key = REAL_KEYS[provider].encode()
    assert key not in data, f"real {provider} key reached the client in {where}"
    # also no recognisable half of it (a split echo must not leak in two pieces)
    assert key[: len(key) // 2 + 2] not in data and key[len(key) // 2 - 2:] not in data, \
        f"part of the real {provider} key reached the client in {where}"


def assert_masked(data: bytes, provider: str) -> None:
    assert_no_key(data, provider, "a frame")
    assert MASK_LABEL[:8] in data, f"no mask where the key was echoed: {data[:300]!r}"


def close_cleanly(ws: WsConn, code: int = 1000, reason: str = "bye") -> Tuple[Optional[int], str]:
    ws.send_close(code, reason)
    got = ws.recv_close()
    assert ws.wait_eof(END_S), "the broker did not close the agent's socket after the close handshake"
    ws.close()
    return got


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive buffer that nobody has read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


def wait_writes_to_agent_blocked(ws: WsConn, still: float = 0.1, timeout: float = 10.0) -> None:
    """Until the bytes the agent has not read (it reads nothing) stop growing for `still` seconds:
    its receive buffer is full, so the broker's writes to it are blocked now."""
    last, since = -1, time.monotonic()

    def stalled() -> bool:
        nonlocal last, since
        unread = unread_bytes(ws.sock)
        if unread != last:
            last, since = unread, time.monotonic()
        return unread > 0 and time.monotonic() - since >= still
    assert wait_until(stalled, timeout), f"the agent's receive buffer kept changing ({last} bytes unread)"


def wait_audit(b: Broker, agent: str, n: int = 1, timeout: float = 10.0) -> List[Dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: List[Dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = audit_json(b, "--agent", agent)
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"expected {n} audit row(s) for {agent}, got {rows}")


def gw_target(extra: str = "compress=zlib-stream", path: str = "/discord/gateway") -> str:
    """discord.py's own query (yarl's with_query replaces the whole query string)."""
    return f"{path}?v=10&encoding=json" + (f"&{extra}" if extra else "")


class GatewayClient:
    """A Discord gateway client over WsConn: inflates zlib-stream with ONE context (like
    discord.py's _ZlibDecompressionContext) and keeps every decoded payload."""

    def __init__(self, ws: WsConn, compressed: bool) -> None:
        self.ws = ws
        self.compressed = compressed
        self.inflator = zlib.decompressobj() if compressed else None
        self.decoded: List[bytes] = []
        self.opcodes: List[int] = []

    def recv(self, timeout: float = 10.0) -> Dict[str, Any]:
        op, payload = self.ws.recv_data(timeout)
        if op == OP_CLOSE:
            raise AssertionError(f"gateway closed: {parse_close(payload)}")
        self.opcodes.append(op)
        if self.compressed:
            assert op == OP_BINARY, f"zlib-stream asked, got opcode {op}"
            assert payload.endswith(ZLIB_SUFFIX), "zlib-stream message not ending in Z_SYNC_FLUSH"
            assert self.inflator is not None
            text = self.inflator.decompress(payload)
        else:
            assert op == OP_TEXT, f"json without compression must be text, got opcode {op}"
            text = payload
        self.decoded.append(text)
        return json.loads(text)

    def send(self, obj: Dict[str, Any]) -> None:
        self.ws.send_text(json.dumps(obj))

    def everything(self) -> bytes:
        return bytes(self.ws.raw_in) + b"".join(self.decoded)


def identify(token: str, compress: bool = False) -> Dict[str, Any]:
    """IDENTIFY; discord.py sends `compress: true` (payload compression) -- see the test of it."""
    return {"op": 2, "d": {"token": token, "intents": 513, "compress": compress, "large_threshold": 250,
                           "properties": {"os": "linux", "browser": "test", "device": "test"}}}


def gw_open(b: Broker, compressed: bool = True, target: Optional[str] = None) -> GatewayClient:
    hs = ws_connect(b.port, target or gw_target("compress=zlib-stream" if compressed else ""))
    assert hs.status == 101, (hs.status, hs.body[:500])
    assert hs.ws is not None
    gc = GatewayClient(hs.ws, compressed)
    hello = gc.recv()
    assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] == 41250, hello
    return gc


def resume_url(b: Broker, gateway: FakeGateway) -> str:
    return f"ws://127.0.0.1:{b.port}/discord/gateway/resume/127.0.0.1:{gateway.port}"


# ============================================================================
# OpenAI Realtime: handshake, token check, key never echoed back
# ============================================================================


def test_realtime_handshake_swaps_bearer_and_echoes(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    ws.send_text({"type": "echo", "event_id": "e1", "text": "héllo"})
    got = ws.recv_json()
    assert got == {"type": "echo", "event": {"type": "echo", "event_id": "e1", "text": "héllo"}}
    assert close_cleanly(ws) == (1000, "bye")
    s = realtime.wait_session()
    assert s.target == "/v1/realtime?model=gpt-test"
    assert s.header("Authorization") == f"Bearer {REAL_KEYS['openai']}"
    assert s.ws.mask_violations == 0, "frames the broker sends upstream must be masked"
    assert ws.mask_violations == 0, "frames the broker sends to the agent must not be masked"
    wire = realtime.handshakes[0].wire_text()
    assert "seks_" not in wire and wire.count(REAL_KEYS["openai"]) == 1
    assert_no_key(bytes(ws.raw_in), "openai", "the session")
    assert s.ended.wait(END_S) and s.close_received == (1000, "bye")


def test_realtime_subprotocol_passed_and_extensions_not_offered(wsb: Broker, realtime: FakeRealtime) -> None:
    hs = ws_connect(wsb.port, RT_PATH, bearer(wsb.token("openai")) + [
        ("Sec-WebSocket-Protocol", "realtime"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Origin", "http://agent.example")])
    assert hs.status == 101 and hs.ws is not None
    assert hs.header("Sec-WebSocket-Protocol") == "realtime"
    assert hs.header("Sec-WebSocket-Extensions") is None, "the broker cannot relay permessage-deflate"
    assert hs.ws.recv_json()["type"] == "session.created"
    up = realtime.handshakes[0]
    assert up.header("Sec-WebSocket-Protocol") == "realtime"
    assert up.header("Sec-WebSocket-Extensions") is None
    close_cleanly(hs.ws)


def test_realtime_frame_sent_right_behind_the_handshake(wsb: Broker) -> None:
    """A client may pipeline its first frame in the same write as the handshake."""
    frame = encode_frame(OP_TEXT, json.dumps({"type": "echo", "n": 1}).encode(), masked=True)
    ws = rt_open(wsb, after_head=frame)
    assert ws.recv_json() == {"type": "echo", "event": {"type": "echo", "n": 1}}
    close_cleanly(ws)


# "expired" last: wsb.expiring, minted as the broker started, has had the most time to run out
@pytest.mark.parametrize("case", ["missing", "unknown", "revoked", "not_seks", "other_provider", "expired"])
def test_realtime_bad_token_refused_before_upgrade(wsb: Broker, realtime: FakeRealtime, case: str) -> None:
    if case == "missing":
        headers: List[Tuple[str, str]] = []
    elif case == "unknown":
        headers = bearer("seks_openai_" + "A" * 43)
    elif case == "revoked":
        tok = wsb.mint("openai", "agent-revoked-rt")
        assert wsb.cli("token", "revoke", tok).returncode == 0
        headers = bearer(tok)
    elif case == "expired":
        tok, expires_by = wsb.expiring  # type: ignore[attr-defined]
        assert wait_until(lambda: time.time() > expires_by, 2)
        headers = bearer(tok)
    elif case == "not_seks":
        headers = bearer("sk-not-a-seks-token")
    else:
        headers = bearer(wsb.token("anthropic"))
    hs = ws_connect(wsb.port, RT_PATH, headers)
    assert hs.ws is None, "upgraded without a valid token"
    assert hs.status == (403 if case == "other_provider" else 401), (hs.status, hs.body)
    assert "error" in hs.json()
    time.sleep(0.2)
    assert realtime.connections == 0, "the upstream was contacted for a refused token"


@pytest.mark.parametrize("limits", [("--allow-method", "GET", "--max-requests", "1"), ("--max-requests", "5"),
                                    ("--rate", "1/m"), ("--allow-method", "GET"),
                                    ("--allow-method", "GET", "--allow-method", "HEAD")],
                         ids=["get-and-one-request", "max-requests", "rate", "read-only", "get-head"])
def test_realtime_refused_for_tokens_whose_limits_count_requests(wsb: Broker, realtime: FakeRealtime,
                                                                 limits: Tuple[str, ...]) -> None:
    """A session is one request carrying any number of paid messages: a token limited by
    request count, rate or to read methods gets a clear 403, and the upstream is never asked."""
    agent, tok = fresh_token(wsb, "openai", *limits, prefix="ws-limits")
    hs = ws_connect(wsb.port, RT_PATH, bearer(tok))
    assert hs.ws is None and hs.status == 403, (hs.status, hs.body)
    message = hs.json()["error"]["message"]
    assert "WebSocket" in message, message
    time.sleep(0.2)
    assert realtime.connections == 0, "the upstream was contacted for a refused session"
    [row] = wait_audit(wsb, agent)
    assert row["outcome"] == "denied" and row["status"] == 403 and "WebSocket" in row["reason"], row


@pytest.mark.parametrize("policy", [("--models", "gpt-4o-mini"), ("--budget-tokens", "10")])
def test_realtime_refused_for_models_or_budget_tokens(wsb: Broker, realtime: FakeRealtime,
                                                      policy: Tuple[str, str]) -> None:
    """A session names its model in the query or a frame and is never metered: a token with
    --models or --budget-tokens gets 403 before the upgrade, and the upstream is never asked."""
    _, tok = fresh_token(wsb, "openai", *policy, prefix="ws-models")
    hs = ws_connect(wsb.port, "/openai/v1/realtime?model=gpt-4o-realtime-preview", bearer(tok))
    assert hs.status == 403, (hs.status, hs.body[:300])
    assert realtime.connections == 0


def close_code_within(ws: WsConn, timeout: float) -> Tuple[Optional[int], str]:
    """The close frame the broker sends within `timeout`; any data message relayed to the
    client before it (the session still working after the revocation) fails the test."""
    deadline = time.monotonic() + timeout
    relayed: List[bytes] = []
    try:
        while True:
            op, payload = ws.recv_data(max(0.01, deadline - time.monotonic()))
            if op == OP_CLOSE:
                assert not relayed, f"data relayed after the revocation: {relayed!r}"
                return parse_close(payload)
            relayed.append(payload[:200])
    except PeerClosed:
        raise AssertionError("the broker dropped the connection without a close frame "
                             f"(relayed before: {relayed!r})") from None
    except socket.timeout:
        raise AssertionError(f"no close frame within {timeout}s of the revocation; the session "
                             f"kept going (relayed: {relayed!r})") from None


def data_messages(s: Any) -> List[bytes]:
    return [p for op, p in list(s.received) if op in (OP_TEXT, OP_BINARY)]


def session_then_revoke(wsb: Broker, realtime: FakeRealtime) -> Tuple[WsConn, Any, int]:
    """A working Realtime session of a fresh token, then that token revoked (real CLI):
    (the agent's end, the upstream session, how many data messages reached the upstream)."""
    _, token = fresh_token(wsb, "openai", prefix="ws-revoke")
    ws = rt_open(wsb, token)
    ws.send_text({"type": "echo", "n": 1})
    assert ws.recv_json()["event"]["n"] == 1
    s = realtime.wait_session()
    before = len(data_messages(s))
    wsb.revoke(token)
    return ws, s, before


def test_realtime_revoked_token_next_client_message_closes_1008(wsb: Broker, realtime: FakeRealtime) -> None:
    """A session opened with a token ends (1008) at the client's next message once the token is
    revoked; that message never reaches the upstream."""
    ws, s, before = session_then_revoke(wsb, realtime)
    try:
        ws.send_text({"type": "echo", "n": 2, "text": "after revoke"})
        code, reason = close_code_within(ws, 4.0)
        assert code == 1008, (code, reason)
        s.ended.wait(2.0)                  # the upstream side is closed (or data would be there by now)
        after = data_messages(s)
        assert len(after) == before and not any(b"after revoke" in m for m in after), \
            f"the upstream received data after the revocation: {after[before:]!r}"
    finally:
        ws.close()


def test_realtime_revoked_token_silent_client_closed_by_poll(wsb: Broker, realtime: FakeRealtime) -> None:
    """A revoked token's session ends (1008) within the broker's poll even if the client stays
    silent, and the upstream side is closed too."""
    ws, s, before = session_then_revoke(wsb, realtime)
    try:
        t0 = time.monotonic()
        code, reason = close_code_within(ws, BROKER_POLL_S + 2.5)   # client stays silent
        assert code == 1008, (code, reason)
        assert time.monotonic() - t0 < BROKER_POLL_S + 2.5
        assert len(data_messages(s)) == before
        assert s.ended.wait(5.0), "upstream session still open after the revocation close"
    finally:
        ws.close()


def test_realtime_allowed_for_tokens_that_may_write(wsb: Broker, realtime: FakeRealtime) -> None:
    agent, tok = fresh_token(wsb, "openai", "--allow-method", "GET", "--allow-method", "POST", "--ttl", "1h",
                             prefix="ws-write")
    ws = rt_open(wsb, tok)
    close_cleanly(ws)


@pytest.mark.parametrize("limits", [("--max-requests", "1"), ("--rate", "10/s"), ("--allow-method", "GET")])
def test_gateway_identify_refused_for_tokens_whose_limits_count_requests(
        wsb: Broker, gateway: FakeGateway, limits: Tuple[str, ...]) -> None:
    agent, tok = fresh_token(wsb, "discord", *limits, prefix="gw-limits")
    gc = gw_open(wsb, compressed=False)
    gc.send(identify(tok))
    code, reason = gc.ws.recv_close()
    assert code == 4004 and "WebSocket" in reason, (code, reason)
    s = gateway.wait_session()
    assert s.ended.wait(END_S)
    assert gateway.identifies == [], "an IDENTIFY of a limited token reached the gateway"
    [row] = wait_audit(wsb, agent)
    assert row["outcome"] == "denied" and row["status"] == 403, row


def test_realtime_upstream_refusal_is_relayed_and_scrubbed(wsb: Broker, realtime: FakeRealtime) -> None:
    """A token whose stored key the upstream rejects: the upstream's 401 reaches the agent as an
    HTTP answer (no upgrade) and the key it echoes in its body is masked."""
    wrong = "sk-test-openai-WRONGWRONG-42"
    wsb.add_secret("openai-wrong", "openai", wrong)
    hs = ws_connect(wsb.port, RT_PATH, bearer(wsb.mint("openai", "agent-wrong-key", secret="openai-wrong")))
    assert hs.status == 401 and hs.ws is None
    assert wrong.encode() not in hs.body and MASK_LABEL[:8] in hs.body, hs.body
    assert hs.json()["error"]["code"] == "invalid_api_key"
    assert realtime.handshakes[0].status == 401


@pytest.mark.parametrize("style", ["subprotocol_only", "bearer_and_subprotocol"])
def test_realtime_browser_subprotocol_token_never_reaches_upstream(wsb: Broker, realtime: FakeRealtime,
                                                                   style: str) -> None:
    """Browser-style Realtime clients put the key in `Sec-WebSocket-Protocol: realtime,
    openai-insecure-api-key.<KEY>`. Whatever the broker does with it (swap it, or refuse with
    401), the fake token must not be forwarded to the upstream in that header."""
    tok = wsb.token("openai")
    headers = [("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{tok}, openai-beta.realtime-v1")]
    if style == "bearer_and_subprotocol":
        headers += bearer(tok)
    hs = ws_connect(wsb.port, RT_PATH, headers)
    for rec in realtime.handshakes:
        assert "seks_" not in rec.wire_text(), f"fake token forwarded upstream: {rec.wire_text()}"
    if hs.ws is not None:
        assert tok not in (hs.header("Sec-WebSocket-Protocol") or "")
        close_cleanly(hs.ws)
    else:
        assert hs.status in (401, 403)          # 403: the leaked-token check (#17 item 4) saw it


def test_concurrent_sessions_close_handshakes_complete(wsb: Broker, realtime: FakeRealtime) -> None:
    """20 agents x 10 sessions each: every echo arrives and every close started by the agent is
    answered with a close frame before the broker's FIN (never a bare EOF, which client
    libraries report as an abnormal 1006 closure). A race between the two pumps shows up here
    as an occasional "EOF at close" (a few sessions in a few hundred)."""
    errors: List[str] = []

    def agent(i: int) -> None:
        for k in range(10):
            step = "open"
            try:
                ws = rt_open(wsb)
                for j in range(3):
                    ws.send_text({"type": "echo", "i": i, "k": k, "j": j})
                    step = f"echo {j}"
                    assert ws.recv_json()["event"] == {"type": "echo", "i": i, "k": k, "j": j}
                step = "close"
                ws.send_close(1000, "bye")
                assert ws.recv_close() == (1000, "bye")
                step = "eof"
                assert ws.wait_eof(END_S)
                ws.close()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"agent {i} session {k} at {step}: {type(exc).__name__}: {exc}")
    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(realtime.sessions) == 200
    assert wait_until(lambda: all(s.ended.is_set() for s in realtime.sessions), END_S), "all upstream sessions ended"


@pytest.mark.parametrize("split", [1, 2, 7])
@pytest.mark.parametrize("binary", [False, True])
def test_realtime_key_echo_in_frames_is_masked(wsb: Broker, split: int, binary: bool) -> None:
    """The upstream echoes the real key inside a message -- whole, or cut across 2 or 7
    fragments with pings between them: the agent sees a same-length mask, never the key."""
    ws = rt_open(wsb)
    ws.send_text({"type": "echo.key", "split": split, "binary": binary})
    pings = []
    while True:
        op, payload = ws.recv_message()
        if op == OP_PING:
            pings.append(payload)
            ws.send_frame(OP_PONG, payload)
            continue
        break
    assert op == (OP_BINARY if binary else OP_TEXT)
    assert pings == [b"mid-%d" % i for i in range(split - 1)]
    assert_masked(payload, "openai")
    body = json.loads(payload)
    assert body["type"] == "error" and len(body["error"]["message"]) == \
        len(f"you sent Authorization: Bearer {REAL_KEYS['openai']} -- key {REAL_KEYS['openai']}!")
    assert_no_key(bytes(ws.raw_in), "openai", "the raw stream")
    close_cleanly(ws)


# ============================================================================
# Frames: fragments, control frames, sizes, masking, binary
# ============================================================================


def test_fragmented_client_message_with_controls_between(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    text = json.dumps({"type": "echo", "text": "fragmented across three frames"}).encode()
    parts = [text[:5], text[5:20], text[20:]]
    ws.send_frame(OP_TEXT, parts[0], fin=False)
    ws.send_frame(OP_PING, b"client-ping")
    ws.send_frame(OP_CONT, parts[1], fin=False)
    ws.send_frame(OP_PONG, b"unsolicited")
    ws.send_frame(OP_CONT, parts[2], fin=True)
    op, payload = ws.recv_message()
    assert (op, payload) == (OP_PONG, b"client-ping"), "the ping between fragments was not answered"
    assert ws.recv_json() == {"type": "echo", "event": json.loads(text)}
    s = realtime.wait_session()
    kinds = [(op, p) for op, p in s.received[:3]]
    assert kinds == [(OP_PING, b"client-ping"), (OP_PONG, b"unsolicited"), (OP_TEXT, text)], kinds
    close_cleanly(ws)


def test_fragmented_server_message_with_pings_between(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    parts = ['{"type": "frag', 'mented", "a', 'nswer": "ok ünïcode"}']
    ws.send_text({"type": "fragments", "parts": parts})
    seen = []
    while True:
        op, payload = ws.recv_message()
        seen.append(op)
        if op == OP_PING:
            ws.send_frame(OP_PONG, payload)
            continue
        break
    assert seen == [OP_PING, OP_PING, OP_TEXT]
    assert json.loads(payload) == {"type": "fragmented", "answer": "ok ünïcode"}
    s = realtime.wait_session()
    assert wait_until(lambda: len([1 for op, _ in s.received if op == OP_PONG]) == 2, END_S), "pongs upstream"
    assert [p for op, p in s.received if op == OP_PONG] == [b"between-0", b"between-1"]
    close_cleanly(ws)


def test_ping_pong_both_ways(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    ws.send_frame(OP_PING, b"from-client")
    assert ws.recv_message() == (OP_PONG, b"from-client")
    ws.send_text({"type": "ping", "payload": "from-server"})
    assert ws.recv_message() == (OP_PING, b"from-server")
    ws.send_frame(OP_PONG, b"from-server")
    s = realtime.wait_session()
    assert wait_until(lambda: (OP_PONG, b"from-server") in s.received, END_S), "the pong upstream"
    ws.send_frame(OP_PING, b"")          # empty control payloads are fine too
    assert ws.recv_message() == (OP_PONG, b"")
    close_cleanly(ws)


def test_binary_frames_both_ways(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    for data in (b"\x00\xff\xfe not utf-8 \x80", os.urandom(70000), b""):
        ws.send_binary(data)
        assert ws.recv_data() == (OP_BINARY, data)
    s = realtime.wait_session()
    assert s.messages(OP_BINARY)[0] == b"\x00\xff\xfe not utf-8 \x80"
    close_cleanly(ws)


@pytest.mark.parametrize("fragments", [1, 4])
def test_16_mib_message_to_upstream(wsb: Broker, fragments: int) -> None:
    ws = rt_open(wsb)
    data = deterministic_bytes(MAX_MESSAGE, seed=fragments)
    step = len(data) // fragments
    ws.send_fragments(OP_BINARY, [data[i * step:(i + 1) * step] for i in range(fragments)])
    got = ws.recv_json(timeout=60)
    assert got == {"type": "got", "len": MAX_MESSAGE, "sha256": hashlib.sha256(data).hexdigest()}
    close_cleanly(ws)


def test_16_mib_message_to_client(wsb: Broker) -> None:
    ws = rt_open(wsb)
    ws.send_text({"type": "big", "size": MAX_MESSAGE})
    op, payload = ws.recv_data(timeout=60)
    assert op == OP_BINARY and len(payload) == MAX_MESSAGE
    assert hashlib.sha256(payload).digest() == hashlib.sha256(deterministic_bytes(MAX_MESSAGE)).digest()
    close_cleanly(ws)


@pytest.mark.parametrize("how", ["one_frame", "fragments"])
def test_message_over_16_mib_is_closed_1009(wsb: Broker, realtime: FakeRealtime, how: str) -> None:
    ws = rt_open(wsb)
    try:                                  # the broker may close while the rest is on its way
        if how == "one_frame":
            ws.send_raw(encode_frame(OP_BINARY, b"\x00" * (MAX_MESSAGE + 1), masked=True))
        else:
            half = b"\x00" * (MAX_MESSAGE // 2 + 1)
            ws.send_fragments(OP_BINARY, [half, half])
    except OSError:
        pass
    assert ws.recv_close(timeout=30)[0] == 1009
    assert ws.wait_eof(END_S)
    s = realtime.wait_session()
    assert s.ended.wait(END_S), "the upstream session was not ended"
    assert not s.messages(OP_BINARY), "an oversized message reached the upstream"


@pytest.mark.parametrize("bad", ["unmasked", "reserved_bit", "unknown_opcode", "bad_utf8",
                                 "continuation_first", "fragmented_ping", "long_ping"])
def test_protocol_violations_close_the_session(wsb: Broker, realtime: FakeRealtime, bad: str) -> None:
    ws = rt_open(wsb)
    expected = 1002
    if bad == "unmasked":
        ws.send_frame(OP_TEXT, b'{"type": "echo"}', masked=False)
    elif bad == "reserved_bit":
        ws.send_frame(OP_TEXT, b'{"type": "echo"}', rsv=0x40)
    elif bad == "unknown_opcode":
        ws.send_frame(0x3, b"?")
    elif bad == "bad_utf8":
        ws.send_frame(OP_TEXT, b'{"type": "echo", "x": "\xff\xfe"}')
        expected = 1007
    elif bad == "continuation_first":
        ws.send_frame(OP_CONT, b"orphan")
    elif bad == "fragmented_ping":
        ws.send_frame(OP_PING, b"p", fin=False)
    else:
        ws.send_frame(OP_PING, b"p" * 126)
    code, _ = ws.recv_close()
    assert code == expected, bad
    assert ws.wait_eof(END_S), "the broker kept the agent's socket open after a protocol error"
    s = realtime.wait_session()
    assert s.ended.wait(END_S), "the upstream session outlived the protocol error"
    assert not s.messages(OP_TEXT), "the offending message reached the upstream"


# ============================================================================
# Close: codes and reasons both ways, abrupt ends, slow readers
# ============================================================================


def test_close_started_by_client_code_and_reason_both_ways(wsb: Broker, realtime: FakeRealtime) -> None:
    realtime.close_answer = (4322, "server agrees")
    ws = rt_open(wsb)
    ws.send_close(4321, "client says bye ✓")
    assert ws.recv_close() == (4322, "server agrees")
    assert ws.wait_eof(END_S)
    s = realtime.wait_session()
    assert s.ended.wait(END_S)
    assert s.close_received == (4321, "client says bye ✓")


def test_close_started_by_server_code_and_reason_both_ways(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    ws.send_text({"type": "close", "code": 4100, "reason": "server says bye"})
    assert ws.recv_close() == (4100, "server says bye")
    ws.send_close(4101, "client ok")
    assert ws.wait_eof(END_S), "the broker did not close the agent's socket after the close handshake"
    s = realtime.wait_session()
    assert s.ended.wait(END_S)
    assert s.close_received == (4101, "client ok")
    assert s.eof


def test_close_without_code(wsb: Broker, realtime: FakeRealtime) -> None:
    ws = rt_open(wsb)
    ws.send_close(None)
    code, _ = ws.recv_close()
    assert code in (None, 1005)
    assert ws.wait_eof(END_S)
    assert realtime.wait_session().ended.wait(END_S)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_dies_upstream_closed_soon(wsb: Broker, realtime: FakeRealtime, reset: bool) -> None:
    ws = rt_open(wsb)
    ws.send_text({"type": "echo"})
    ws.recv_json()
    s = realtime.wait_session()
    ws.abort(reset=reset)
    assert s.ended.wait(END_S), "the upstream socket stayed open after the agent vanished"
    if s.close_received is not None:
        assert s.close_received[0] in (1001, 1006, 1011), s.close_received


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_upstream_dies_client_closed_soon(wsb: Broker, reset: bool) -> None:
    ws = rt_open(wsb)
    ws.send_text({"type": "abort", "reset": reset})
    t0 = time.monotonic()
    try:
        code, reason = ws.recv_close(timeout=END_S)
        assert code in (1011, 1001, 1006), (code, reason)
    except PeerClosed:
        pass
    assert ws.wait_eof(max(0.1, END_S - (time.monotonic() - t0))), \
        "the agent's socket stayed open after the upstream vanished"


def slow_agent_reader(wsb: Broker, pause: float) -> None:
    """The agent asks for 8 MiB in 128 messages and reads nothing until the broker's writes to it
    are blocked, nor for `pause` seconds more, then reads everything: all messages arrive, in
    order, intact (TCP back-pressure, no drop, no close)."""
    count, size = 128, 64 * 1024
    ws = rt_open(wsb)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    ws.send_text({"type": "burst", "count": count, "size": size})
    wait_writes_to_agent_blocked(ws)
    time.sleep(pause)
    for i in range(count):
        op, payload = ws.recv_data(timeout=30)
        assert op == OP_TEXT, (i, op, payload[:200])
        assert len(payload) == size
        assert json.loads(payload)["i"] == i
    ws.send_text({"type": "echo", "after": "burst"})
    assert ws.recv_json()["event"]["after"] == "burst"
    close_cleanly(ws)


def slow_upstream_reader(wsb: Broker, pause: float) -> None:
    """The other direction: the agent sends 8 MiB while the upstream is busy for `pause` seconds
    after the broker's writes to the agent block (it is still sending a 16 MiB answer the agent
    does not read yet); nothing is lost."""
    ws = rt_open(wsb)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    ws.send_text({"type": "big", "size": MAX_MESSAGE})     # upstream blocks in sendall on this
    chunks = [deterministic_bytes(64 * 1024, seed=i) for i in range(128)]
    sent = threading.Event()

    def writer() -> None:
        for c in chunks:
            ws.send_binary(c)
        sent.set()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    wait_writes_to_agent_blocked(ws)
    time.sleep(pause)
    op, payload = ws.recv_data(timeout=60)
    assert op == OP_BINARY and len(payload) == MAX_MESSAGE
    for c in chunks:
        assert ws.recv_data(timeout=30) == (OP_BINARY, c)
    t.join(30)
    assert sent.is_set()
    close_cleanly(ws)


def test_slow_reader_loses_nothing(wsb: Broker, realtime: FakeRealtime) -> None:
    """An agent that reads nothing until the broker's writes to it block loses nothing (see
    slow_agent_reader)."""
    slow_agent_reader(wsb, 0.0)


def test_slow_readers_past_the_broker_poll_lose_nothing(broker_factory: Brokers, realtime: FakeRealtime) -> None:
    """Either side silent for longer than the broker's poll (three polls once the broker's writes
    to the agent block; this broker polls every 100 ms, its smallest ws_poll): an agent that
    reads nothing (slow_agent_reader) and an upstream busy sending (slow_upstream_reader) lose
    nothing. The two sessions (each its own connection and upstream session) wait side by side,
    and each one's checks hold as when it ran alone."""
    b = broker_factory({"openai": realtime.url}, providers=("openai",),
                       extra_env={"SEKS_WS_POLL": f"{MIN_POLL_S}s"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waits = [pool.submit(reader, b, 3 * MIN_POLL_S) for reader in (slow_agent_reader, slow_upstream_reader)]
        for w in waits:
            w.result(timeout=120)


# ============================================================================
# Generic relay on other provider routes (credential where that provider's clients put it)
# ============================================================================


@pytest.mark.parametrize("style", ["gemini_header", "gemini_query", "anthropic_header"])
def test_generic_relay_injects_key_where_the_provider_expects(wsb: Broker, echo: EchoServer, style: str) -> None:
    provider = style.split("_")[0]
    tok = wsb.token(provider)
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    if style == "gemini_header":
        hs = ws_connect(wsb.port, f"/gemini{path}", [("x-goog-api-key", tok)])
    elif style == "gemini_query":
        hs = ws_connect(wsb.port, f"/gemini{path}?alt=ws&key={tok}")
    else:
        hs = ws_connect(wsb.port, "/anthropic/v1/ws", [("x-api-key", tok), ("Sec-WebSocket-Protocol", "p1, p2")])
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.body)
    hs.ws.send_text("ping?")
    assert hs.ws.recv_data() == (OP_TEXT, b"ping?")
    close_cleanly(hs.ws)
    up = echo.handshakes[0]
    key = REAL_KEYS[provider]
    if style == "gemini_header":
        assert up.header("x-goog-api-key") == key and up.target == path
    elif style == "gemini_query":
        assert up.target == f"{path}?alt=ws&key={key}" and up.header("x-goog-api-key") is None
    else:
        assert up.header("x-api-key") == key and up.header("Authorization") is None
        assert up.header("Sec-WebSocket-Protocol") == "p1, p2" and hs.header("Sec-WebSocket-Protocol") == "p1"
    assert "seks_" not in up.wire_text()


def test_generic_relay_refuses_bad_handshake(wsb: Broker, echo: EchoServer) -> None:
    hs = ws_connect(wsb.port, "/gemini/ws/x", [("x-goog-api-key", wsb.token("gemini"))], version="8")
    assert hs.status == 400 and hs.ws is None
    assert echo.connections == 0


def test_unreachable_upstreams_502_before_upgrade(broker_factory: Brokers) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    b = broker_factory({"openai": dead, "discord": dead}, providers=("openai", "discord"),
                       extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": f"ws://127.0.0.1:{free_port()}"})
    hs = ws_connect(b.port, RT_PATH, bearer(b.token("openai")))
    assert hs.ws is None and hs.status == 502, (hs.status, hs.body)
    hs = ws_connect(b.port, gw_target())
    assert hs.ws is None and hs.status == 502, (hs.status, hs.body)


def test_gateway_close_from_discord_is_passed_on(broker_factory: Brokers, discord_rest: FakeUpstream) -> None:
    """The stored Discord key is wrong (e.g. reset at Discord): the broker swaps it in, Discord
    answers 4004 itself, and the agent gets that code and reason; the wrong key is not shown."""
    srv = FakeGateway(REAL_KEYS["discord"], "gateway-wrong-key")
    wrong = "test-discord-WRONG-key-0000000000"
    keys = dict(REAL_KEYS, discord=wrong)
    b = broker_factory({"discord": discord_rest.url}, providers=("discord",), keys=keys,
                       extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": srv.ws_url})
    try:
        gc = gw_open(b, compressed=True)
        gc.send(identify(b.token("discord")))
        assert gc.ws.recv_close() == (4004, "Authentication failed.")
        gc.ws.send_close(4004)                 # answered like a client does: the session ends
        assert gc.ws.wait_eof(END_S)
        assert [d["token"] for d in srv.identifies] == [wrong]
        assert wrong.encode() not in bytes(gc.ws.raw_in)
    finally:
        srv.stop()
    log = b.wait_for_log(lambda text: "GET /discord/gateway" in text)    # the session's line, once it ended
    assert wrong not in log


# ============================================================================
# Audit: one row per session
# ============================================================================


def test_audit_one_row_per_realtime_session(wsb: Broker) -> None:
    agent, tok = fresh_token(wsb, "openai", prefix="rt-audit")
    ws = rt_open(wsb, tok)
    for i in range(3):
        ws.send_text({"type": "echo", "i": i})
        ws.recv_json()
    close_cleanly(ws, 1000, "done")
    [row] = wait_audit(wsb, agent)
    assert row["status"] == 101 and row["provider"] == "openai" and row["agent"] == agent
    assert row["method"] == "GET" and row["path"].startswith("/openai/v1/realtime")
    assert row["outcome"] == "ok"
    reason = row["reason"] or ""
    assert "websocket" in reason and "close=1000" in reason, reason
    m = re.search(r"in=(\d+) out=(\d+)", reason)
    assert m and int(m.group(1)) >= 4 and int(m.group(2)) >= 4, reason   # 3 events + close each way
    time.sleep(0.5)
    assert len(audit_json(wsb, "--agent", agent)) == 1


# ============================================================================
# Discord gateway
# ============================================================================


@pytest.mark.parametrize("compressed", [False, True], ids=["json", "zlib-stream"])
def test_gateway_identify_ready_dispatch(wsb: Broker, gateway: FakeGateway, compressed: bool) -> None:
    gc = gw_open(wsb, compressed)
    gc.send({"op": 1, "d": None})                      # heartbeat before IDENTIFY is allowed
    assert gc.recv()["op"] == 11
    gc.send(identify(wsb.token("discord")))
    ready = gc.recv()
    assert ready["op"] == 0 and ready["t"] == "READY" and ready["s"] == 1
    assert ready["d"]["session_id"] == FakeGateway.SESSION_ID
    assert ready["d"]["resume_gateway_url"] == resume_url(wsb, gateway)
    assert ready["d"]["user"]["username"] == "fakebot"
    msg = gc.recv()
    assert msg["t"] == "MESSAGE_CREATE" and msg["d"]["content"] == "hello from the fake gateway"
    gc.send({"op": 1, "d": 2})
    assert gc.recv()["op"] == 11
    assert gc.opcodes == [OP_BINARY if compressed else OP_TEXT] * len(gc.opcodes)
    s = gateway.wait_session()
    assert s.target == "/?v=10&encoding=json", "the broker must ask upstream for plain JSON"
    assert [d["token"] for d in gateway.identifies] == [REAL_KEYS["discord"]]
    assert gateway.identifies[0]["intents"] == 513 and gateway.identifies[0]["properties"]["os"] == "linux"
    assert s.ws.mask_violations == 0 and gc.ws.mask_violations == 0
    assert_no_key(gc.everything(), "discord", "the gateway stream")
    assert close_cleanly(gc.ws, 1000, "") == (1000, "")
    assert s.ended.wait(END_S)


@pytest.mark.parametrize("compressed", [True, False], ids=["zlib-stream", "json"])
def test_gateway_identify_with_payload_compression_flag(wsb: Broker, gateway: FakeGateway, compressed: bool) -> None:
    """discord.py's IDENTIFY says `"compress": true` AND its URL asks compress=zlib-stream.
    Talking to Discord directly, transport compression disables payload compression. The
    broker drops transport compression upstream, so unless it also clears `d.compress` (or
    inflates each binary payload), Discord sends READY as a standalone zlib payload: then the
    READY is neither scrubbed nor rewritten (resume_gateway_url leads straight to Discord) and
    a zlib-stream client inflates it to zlib bytes instead of JSON."""
    gc = gw_open(wsb, compressed)
    gc.send(identify(wsb.token("discord"), compress=True))
    op, payload = gc.ws.recv_data()
    if compressed:
        assert op == OP_BINARY
        text = gc.inflator.decompress(payload)              # type: ignore[union-attr]
    else:
        assert op == OP_TEXT, "a binary (payload-compressed) READY reached a plain JSON client"
        text = payload
    try:
        ready = json.loads(text)
    except ValueError:
        raise AssertionError(f"READY is not JSON after the client's inflate: {text[:40]!r}") from None
    assert ready["t"] == "READY"
    assert ready["d"]["resume_gateway_url"] == resume_url(wsb, gateway)
    close_cleanly(gc.ws)


def test_gateway_zlib_stream_is_one_context(wsb: Broker, gateway: FakeGateway) -> None:
    """Every binary message ends in 00 00 ff ff and only inflates with the context of the ones
    before it (one zlib stream per connection, as discord.py expects)."""
    gc = gw_open(wsb, compressed=True)
    gc.send(identify(wsb.token("discord")))
    gc.recv()
    gc.recv()
    ws = gc.ws
    gc.send({"op": 1, "d": 2})
    op, payload = ws.recv_data()
    assert op == OP_BINARY and payload.endswith(ZLIB_SUFFIX)
    with pytest.raises(zlib.error):
        zlib.decompressobj().decompress(payload)        # not a stream of its own: no zlib header
    assert json.loads(gc.inflator.decompress(payload))["op"] == 11   # type: ignore[union-attr]
    close_cleanly(ws)


@pytest.mark.parametrize("compressed", [False, True], ids=["json", "zlib-stream"])
def test_gateway_key_in_dispatch_is_masked(wsb: Broker, gateway: FakeGateway, compressed: bool) -> None:
    key = REAL_KEYS["discord"]
    gateway.message_content = f"someone pasted {key} in chat"
    gc = gw_open(wsb, compressed)
    gc.send(identify(wsb.token("discord")))
    gc.recv()
    msg = gc.recv()
    content = msg["d"]["content"]
    assert key not in content and len(content) == len(f"someone pasted {key} in chat")
    assert content.startswith("someone pasted [REDACTED-BY-SEKS]")
    assert_no_key(gc.everything(), "discord", "the gateway stream")
    close_cleanly(gc.ws)


@pytest.mark.parametrize("case", ["unknown", "revoked", "other_provider", "missing", "not_a_string", "bot_prefix_unknown"])
def test_gateway_bad_token_closes_4004_before_discord(wsb: Broker, gateway: FakeGateway, case: str) -> None:
    if case == "unknown":
        token: Any = "seks_discord_" + "B" * 43
    elif case == "revoked":
        token = wsb.mint("discord", "agent-revoked-gw")
        assert wsb.cli("token", "revoke", token).returncode == 0
    elif case == "other_provider":
        token = wsb.token("openai")
    elif case == "missing":
        token = None
    elif case == "not_a_string":
        token = 12345
    else:
        token = "Bot seks_discord_" + "C" * 43
    gc = gw_open(wsb, compressed=True)
    payload = identify("x")
    if token is None:
        del payload["d"]["token"]
    else:
        payload["d"]["token"] = token
    gc.send(payload)
    code, reason = gc.ws.recv_close()
    assert code == 4004, (code, reason)
    assert gc.ws.wait_eof(END_S)
    s = gateway.wait_session()
    assert s.ended.wait(END_S), "the upstream gateway connection stayed open"
    assert gateway.identifies == [], "an IDENTIFY with a bad token reached the gateway"
    assert 2 not in gateway.ops_seen


def test_gateway_revoked_token_closes_4004(wsb: Broker, gateway: FakeGateway) -> None:
    """An identified gateway session ends (4004) at the client's next payload once its token is
    revoked; nothing more reaches Discord."""
    _, token = fresh_token(wsb, "discord", prefix="gw-revoke")
    gc = gw_open(wsb, compressed=False)
    try:
        gc.send(identify(token))
        assert gc.recv()["t"] == "READY"
        assert gc.recv()["t"] == "MESSAGE_CREATE"
        ops_before = list(gateway.ops_seen)
        wsb.revoke(token)
        gc.send({"op": 1, "d": 2})
        code, reason = close_code_within(gc.ws, 4.0)
        assert code == 4004, (code, reason)
        gateway.wait_session().ended.wait(2.0)
        assert gateway.ops_seen == ops_before, f"gateway got {gateway.ops_seen[len(ops_before):]} after revocation"
    finally:
        gc.ws.close()


def test_gateway_second_identify_with_another_token_is_closed_4005(wsb: Broker, gateway: FakeGateway) -> None:
    """A session identified with one token cannot switch to another (a second IDENTIFY: 4005)."""
    (_, first), (_, second) = fresh_token(wsb, "discord", prefix="gw-first"), fresh_token(wsb, "discord", prefix="gw-second")
    gc = gw_open(wsb, compressed=False)
    try:
        gc.send(identify(first))
        assert gc.recv()["t"] == "READY"
        identifies = len(gateway.identifies)
        gc.send(identify(second))
        code, _ = gc.ws.recv_close(5.0)
        assert code == 4005, code
        gateway.wait_session().ended.wait(2.0)
        assert len(gateway.identifies) == identifies, "the second IDENTIFY reached Discord"
    finally:
        gc.ws.close()


@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A1", "1x"])
def test_gateway_version_must_be_ascii_digits(wsb: Broker, gateway: FakeGateway, version: str) -> None:
    """`v=` takes ASCII digits only (not Unicode digits): 1003, and the gateway is never opened."""
    hs = ws_connect(wsb.port, f"/discord/gateway?v={version}&encoding=json")
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.body[:300])
    try:
        code, _ = hs.ws.recv_close(5.0)
        assert code == 1003, code
    finally:
        hs.ws.close()
    assert gateway.ops_seen == [], "the broker opened the gateway for a bad version"


def test_gateway_resume_with_bad_token_closes_4004(wsb: Broker, gateway: FakeGateway) -> None:
    gc = gw_open(wsb, compressed=False,
                 target=gw_target("", f"/discord/gateway/resume/127.0.0.1:{gateway.port}"))
    gc.send({"op": 6, "d": {"token": "seks_discord_" + "D" * 43, "session_id": FakeGateway.SESSION_ID,
                            "seq": 2}})
    assert gc.ws.recv_close()[0] == 4004
    assert gateway.resumes == []


def test_gateway_payload_before_identify_closes_4003(wsb: Broker, gateway: FakeGateway) -> None:
    gc = gw_open(wsb, compressed=False)
    gc.send({"op": 3, "d": {"status": "online", "since": 0, "activities": [], "afk": False}})
    assert gc.ws.recv_close()[0] == 4003
    assert 3 not in gateway.ops_seen


def test_gateway_reconnect_op7_then_resume_through_broker(wsb: Broker, gateway: FakeGateway) -> None:
    gateway.reconnect_after_ready = True
    gc = gw_open(wsb, compressed=True)
    gc.send(identify(wsb.token("discord")))
    ready = gc.recv()
    assert gc.recv()["t"] == "MESSAGE_CREATE"
    assert gc.recv()["op"] == 7
    # discord.py closes the socket on op 7 and reconnects to READY's resume_gateway_url
    gc.ws.send_close(4000, "")
    gc.ws.recv_close()
    gc.ws.close()
    url = ready["d"]["resume_gateway_url"]
    assert url == resume_url(wsb, gateway)
    path = url.split(f"127.0.0.1:{wsb.port}", 1)[1]
    gc2 = gw_open(wsb, compressed=True, target=gw_target("compress=zlib-stream", path))
    gc2.send({"op": 6, "d": {"token": wsb.token("discord"), "session_id": ready["d"]["session_id"],
                             "seq": 2}})
    missed = gc2.recv()
    assert missed["t"] == "MESSAGE_CREATE" and missed["d"]["content"] == "missed while you were away"
    resumed = gc2.recv()
    assert resumed["t"] == "RESUMED"
    assert [d["token"] for d in gateway.resumes] == [REAL_KEYS["discord"]]
    assert gateway.resumes[0]["session_id"] == FakeGateway.SESSION_ID and gateway.resumes[0]["seq"] == 2
    s2 = gateway.wait_session(2)
    assert s2.target == "/?v=10&encoding=json"
    assert_no_key(gc2.everything(), "discord", "the resumed stream")
    close_cleanly(gc2.ws)


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:443", "discord.gg.evil.example.com",
                                  "evildiscord.gg", "127.0.0.1:{closed}", "localhost:{gw}", "127.0.0.2:{gw}",
                                  "127.0.0.1%3A{gw}%2F..%2Fx", "[::1]:{gw}", "user@127.0.0.1:{gw}"])
def test_gateway_resume_to_other_hosts_refused(wsb: Broker, gateway: FakeGateway, host: str) -> None:
    host = host.format(closed=free_port(), gw=gateway.port)
    hs = ws_connect(wsb.port, gw_target("compress=zlib-stream", f"/discord/gateway/resume/{host}"))
    assert hs.ws is None, f"resume to {host} was upgraded"
    assert hs.status in (400, 403, 404), (hs.status, hs.body)
    assert gateway.connections == 0


def test_gateway_resume_route_shapes(wsb: Broker, gateway: FakeGateway) -> None:
    for path in ("/discord/gateway/resume", "/discord/gateway/other/127.0.0.1",
                 f"/discord/gateway/resume/127.0.0.1:{gateway.port}/extra"):
        hs = ws_connect(wsb.port, gw_target("", path))
        assert hs.ws is None and hs.status in (400, 403, 404), (path, hs.status)
    assert gateway.connections == 0


@pytest.mark.parametrize("query,code_words", [
    ("v=10&encoding=etf", ("etf", "json")),
    ("v=10&encoding=etf&compress=zlib-stream", ("etf", "json")),
])
def test_gateway_unsupported_encoding_gets_clear_close(wsb: Broker, gateway: FakeGateway, query: str,
                                                       code_words: Tuple[str, ...]) -> None:
    hs = ws_connect(wsb.port, f"/discord/gateway?{query}")
    if hs.ws is None:                                  # refusing before the upgrade is fine too
        assert hs.status == 400 and any(w in hs.body.decode() for w in code_words), hs.body
    else:
        code, reason = hs.ws.recv_close()
        assert code is not None and code >= 1000, code
        assert any(w in reason.lower() for w in code_words), reason
        assert hs.ws.wait_eof(END_S)
    assert gateway.connections == 0


def test_gateway_zstd_stream_request(wsb: Broker, gateway: FakeGateway) -> None:
    """discord.py asks compress=zstd-stream when `zstandard` is installed (discord.py[speed]) or
    on Python 3.14. The stdlib cannot write zstd; acceptable answers: a close that says so, or
    uncompressed TEXT frames (discord.py parses text frames as JSON whatever it asked for)."""
    hs = ws_connect(wsb.port, "/discord/gateway?v=10&encoding=json&compress=zstd-stream")
    if hs.ws is None:
        assert hs.status == 400 and b"compress" in hs.body, hs.body
        return
    op, payload = hs.ws.recv_data()
    if op == OP_CLOSE:
        code, reason = parse_close(payload)
        assert code is not None and "compress" in reason.lower(), (code, reason)
        assert gateway.connections == 0
        return
    assert op == OP_TEXT and json.loads(payload)["op"] == 10, (op, payload[:100])
    gc = GatewayClient(hs.ws, compressed=False)
    gc.send(identify(wsb.token("discord"), compress=True))
    assert gc.recv()["t"] == "READY"
    close_cleanly(hs.ws)


def test_gateway_route_requires_upgrade(wsb: Broker, gateway: FakeGateway) -> None:
    r = wsb.request("GET", "/discord/gateway?v=10&encoding=json")
    assert r.status == 400
    assert gateway.connections == 0


@pytest.mark.parametrize("prefix", ["/discord", "/api/discord"])
@pytest.mark.parametrize("rest", ["/api/v10/gateway/bot", "/api/v10/gateway", "/api/gateway/bot"])
def test_gateway_rest_url_rewritten(wsb: Broker, discord_rest: FakeUpstream, prefix: str, rest: str) -> None:
    r = wsb.request("GET", prefix + rest, {"Authorization": f"Bot {wsb.token('discord')}"})
    assert r.status == 200, r.body
    body = r.json()
    assert body["url"] == f"ws://127.0.0.1:{wsb.port}{prefix}/gateway"
    if rest.endswith("/bot"):
        assert body["shards"] == 1 and body["session_start_limit"]["max_concurrency"] == 1
    assert "discord.gg" not in r.body.decode()
    assert discord_rest.only_request().header("Authorization") == f"Bot {REAL_KEYS['discord']}"


def test_gateway_rest_other_answers_untouched(wsb: Broker, discord_rest: FakeUpstream) -> None:
    discord_rest.set_responder(lambda h, req: h.send_json(200, {"url": "https://discord.com/x", "id": 1}))
    r = wsb.request("GET", "/discord/api/v10/channels/1", {"Authorization": f"Bot {wsb.token('discord')}"})
    assert r.json() == {"url": "https://discord.com/x", "id": 1}


def test_gateway_audit_row_per_session(wsb: Broker, gateway: FakeGateway) -> None:
    agent, tok = fresh_token(wsb, "discord", prefix="gw-audit")
    gc = gw_open(wsb, compressed=True)
    gc.send(identify(tok))
    gc.recv()
    gc.recv()
    close_cleanly(gc.ws, 1000, "")
    [row] = wait_audit(wsb, agent)
    assert row["status"] == 101 and row["provider"] == "discord" and row["agent"] == agent
    assert row["path"].startswith("/discord/gateway")
    assert "websocket" in (row["reason"] or "") and "close=1000" in row["reason"], row


def test_gateway_denied_session_is_audited(wsb: Broker, gateway: FakeGateway) -> None:
    tok = wsb.mint("discord", "agent-gw-revoked-audit")
    assert wsb.cli("token", "revoke", tok).returncode == 0
    before = len(audit_json(wsb, "--provider", "discord"))
    gc = gw_open(wsb, compressed=False)
    gc.send(identify(tok))
    assert gc.ws.recv_close()[0] == 4004
    assert wait_until(lambda: len(audit_json(wsb, "--provider", "discord")) > before, 10), "the audit row"
    row = audit_json(wsb, "--provider", "discord")[-1]
    assert row["outcome"] == "denied" and row["status"] in (401, 403), row
    assert "revoked" in (row["reason"] or ""), row
    # like a denied HTTP request with a revoked token, the row names the token's agent, so
    # `audit --agent X` shows the attempt
    assert row["agent"] == "agent-gw-revoked-audit", row


def test_gateway_urls_use_public_url(broker_factory: Brokers, gateway: FakeGateway,
                                     discord_rest: FakeUpstream) -> None:
    """Behind a TLS front end (`--public-url https://…`), the URLs handed to the bot are wss://
    URLs of that public address."""
    b = broker_factory({"discord": discord_rest.url}, providers=("discord",),
                       extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": gateway.ws_url},
                       serve_args=("--public-url", "https://broker.example:8443"))
    r = b.request("GET", "/discord/api/v10/gateway/bot", {"Authorization": f"Bot {b.token('discord')}"})
    assert r.json()["url"] == "wss://broker.example:8443/discord/gateway"
    gc = gw_open(b, compressed=False)
    gc.send(identify(b.token("discord")))
    ready = gc.recv()
    assert ready["d"]["resume_gateway_url"] == \
        f"wss://broker.example:8443/discord/gateway/resume/127.0.0.1:{gateway.port}"
    close_cleanly(gc.ws)


def test_shutdown_closes_sessions_with_1001_and_audits_them(broker_factory: Brokers, realtime: FakeRealtime) -> None:
    """SIGTERM with a session open: within the grace period the agent gets a close frame
    (1001 going away / 1012 restart), the upstream is closed too, and the session has its row."""
    b = broker_factory({"openai": realtime.url}, providers=("openai",), serve_args=("--grace", "3s"))
    agent, tok = fresh_token(b, "openai", prefix="rt-shutdown")
    ws = rt_open(b, tok)
    ws.send_text({"type": "echo"})
    ws.recv_json()
    s = realtime.wait_session()
    t0 = time.monotonic()
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    try:
        code, _ = ws.recv_close(timeout=10)
    except PeerClosed:
        code = None
    elapsed = time.monotonic() - t0
    b.proc.wait(10)
    assert s.ended.wait(END_S)
    rows = audit_json(b, "--agent", agent)
    problems = []
    if code not in (1001, 1012):
        problems.append(f"no close frame at shutdown (got {code} after {elapsed:.1f}s)")
    if not (len(rows) == 1 and rows[0]["status"] == 101):
        problems.append(f"audit rows of the session: {rows}")
    assert not problems, problems


def test_shutdown_within_grace_when_the_client_stopped_reading(broker_factory: Brokers,
                                                               realtime: FakeRealtime) -> None:
    """The upstream floods a client that reads nothing, so the broker's writes to it block: the
    broker still exits within the grace period, and the session's row says it was cut."""
    grace = 0.3
    b = broker_factory({"openai": realtime.url}, providers=("openai",), serve_args=("--grace", f"{grace}s"))
    agent, tok = fresh_token(b, "openai", prefix="rt-stuck")
    ws = rt_open(b, tok)
    ws.send_text({"type": "burst", "count": 400, "size": 256 * 1024})    # 100 MiB, never read
    s = realtime.wait_session()
    wait_writes_to_agent_blocked(ws)
    assert b.proc is not None
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    try:
        rc = b.proc.wait(6)
    except Exception:                        # noqa: BLE001 - judged below
        rc = None
    took = time.monotonic() - t0
    ws.close()
    assert rc == 0 and took < grace + 3.0, f"rc={rc} after {took:.1f}s with --grace {grace}s"
    rows = audit_json(b, "--agent", agent)
    assert len(rows) == 1, rows
    assert rows[0]["status"] == 101 and "cut at shutdown" in rows[0]["reason"], rows
    assert rows[0]["bytes_out"] > 1024 * 1024, rows      # the upstream bytes relayed so far
    assert s.ended.wait(END_S)


# ============================================================================
# Logs
# ============================================================================


def test_broker_log_has_no_real_key_nor_fake_token(wsb: Broker) -> None:
    """Runs last in this module: everything above went through this broker."""
    # make sure at least one session of each kind is in the log
    ws = rt_open(wsb)
    close_cleanly(ws)
    log = wsb.stderr_text()
    assert "websocket" in log.lower() or "101" in log
    for provider in WS_PROVIDERS:
        assert REAL_KEYS[provider] not in log, f"real {provider} key in the broker log"
        assert wsb.token(provider) not in log, f"full {provider} fake token in the broker log"
    assert "sk-test-openai-WRONGWRONG-42" not in log


def test_ws_poll_is_bounded(tmp_path) -> None:
    """1ms would wake every quiet session a thousand times a second; hours would let a revoked
    token's silent session run on: both refused by serve and by config check, with the range."""
    cp = run_cli(tmp_path / "w.db", "serve", "--port", "0", "--ws-poll", "1ms", env=broker_env())
    assert cp.returncode != 0 and "ws_poll is 100ms to 60s" in cp.stderr, cp.stderr
    (tmp_path / "c.ini").write_text("[limits]\nws_poll = 2h\n")
    cp = run_cli(tmp_path / "w.db", "config", "check", str(tmp_path / "c.ini"), env=broker_env())
    assert cp.returncode == 1 and "ws_poll is 100ms to 60s" in cp.stdout, cp.stdout
