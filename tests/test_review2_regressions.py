"""Regression tests for the second independent review (agent-facing side), over real sockets
against a real `seks_broker.py serve` subprocess in front of recording loopback upstreams.

  1  Expect: 100-continue: after the interim 100, a refusal (403, 502, ...) was swallowed and
     the agent saw EOF.
  2  --models: the multipart boundary was found by an unanchored search, so
     `xboundary=DECOY; boundary=REAL` read a decoy `model` hidden in a file part.
  3  WebSocket sessions ignored --models and --budget-tokens (a realtime model is named in the
     query or a frame; nothing is metered).
  4  A duplicate Content-Length on a request answered before framing was checked (/healthz,
     404, 400) kept the connection open and ran the body as a second request.
  5  A WebSocket upgrade with a body: the unread body was run as the next request.
  6  The gateway's `v=` accepted Unicode digits.
  7  A percent-encoded token (`%73eks_...`) in a refused path was logged and audited whole.
  and, from the review's "suspicious" list: a method-override header under a methods policy,
  a repeated "stream" key under a token budget, a second gateway IDENTIFY with another token.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from typing import Any, Callable, Dict, Tuple

import pytest

from conftest import Broker, FakeUpstream, error_type_and_message
from raw_http import RawResponse, SocketReader as _Reader, raw_exchange, read_response, request_bytes
from ws_helpers import FakeGateway, ws_connect

T = 15.0


@pytest.fixture(scope="module")
def rb(broker_factory: Callable[..., Broker], upstreams: Dict[str, FakeUpstream],
       gateway: FakeGateway) -> Broker:
    return broker_factory({p: upstreams[p].url for p in ("openai", "telegram", "discord")},
                          extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": gateway.ws_url},
                          providers=("openai", "telegram", "discord"))


def fresh_token(b: Broker, provider: str, *policy: str) -> str:
    return b.mint(provider, f"r2-{provider}-{secrets.token_hex(4)}", *policy)


def chat(model: str = "gpt-4o") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


def expect_continue(b: Broker, token: str, body: bytes) -> Tuple[bytes, RawResponse]:
    """POST with Expect: 100-continue; send the body only after the interim answer."""
    head = request_bytes("POST", "/openai/v1/chat/completions", [
        ("Authorization", f"Bearer {token}"), ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))), ("Expect", "100-continue")])
    with socket.create_connection(("127.0.0.1", b.port), timeout=T) as sock:
        sock.sendall(head)
        reader = _Reader(sock)
        interim = reader.until(b"\r\n\r\n") or b""
        sock.sendall(body)
        return interim, read_response(sock, "POST", 0.3, reader=reader)


# ============================================================================
# 1: Expect: 100-continue, then the final answer is still sent
# ============================================================================


def test_expect_continue_then_a_refusal_still_gets_its_answer(rb: Broker,
                                                              upstreams: Dict[str, FakeUpstream]) -> None:
    token = fresh_token(rb, "openai", "--models", "gpt-4o-mini")
    interim, resp = expect_continue(rb, token, chat("gpt-4o"))
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
    assert resp.status == 403, resp
    assert upstreams["openai"].requests == []


def test_expect_continue_then_success(rb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    upstreams["openai"].set_responder(lambda h, req: h.send_json(200, {"ok": True}))
    interim, resp = expect_continue(rb, fresh_token(rb, "openai"), chat())
    assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
    assert resp.status == 200 and json.loads(resp.body) == {"ok": True}, resp


# ============================================================================
# 2: the multipart boundary is the `boundary` parameter, as a MIME parser reads it
# ============================================================================

DECOY_FILE = (b"--DECOY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
              b"--DECOY--\r\n")
FORM = (b"--REAL\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n"
        b"--REAL\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        b"Content-Type: audio/wav\r\n\r\n" + DECOY_FILE + b"\r\n--REAL--\r\n")


@pytest.mark.parametrize("ctype", [
    "multipart/form-data; xboundary=DECOY; boundary=REAL",
    "multipart/form-data; boundary=DECOY; boundary=REAL",         # repeated: refused as unreadable
    "multipart/form-data; boundary=REAL",
])
def test_multipart_model_is_read_from_the_real_boundary(rb: Broker, upstreams: Dict[str, FakeUpstream],
                                                        ctype: str) -> None:
    token = fresh_token(rb, "openai", "--models", "whisper-1")
    resp = rb.request("POST", "/openai/v1/audio/transcriptions",
                      {"Authorization": f"Bearer {token}", "Content-Type": ctype}, FORM)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert upstreams["openai"].requests == [], "a forbidden model reached the upstream"


def test_multipart_with_a_quoted_boundary_and_the_allowed_model_passes(
        rb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    upstreams["openai"].set_responder(lambda h, req: h.send_json(200, {"text": "ok"}))
    token = fresh_token(rb, "openai", "--models", "whisper-1")
    form = (b"preamble\r\n--a b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x; name=model\"\r\n"
            b"\r\nRIFF\r\n--a b\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--a b--\r\n")
    resp = rb.request("POST", "/openai/v1/audio/transcriptions",
                      {"Authorization": f"Bearer {token}",
                       "Content-Type": 'multipart/form-data; boundary="a b"'}, form)
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert upstreams["openai"].only_request().body == form


# ============================================================================
# 3: a WebSocket session cannot be checked against models or a budget: refused
# ============================================================================


@pytest.mark.parametrize("policy", [("--models", "gpt-4o-mini"), ("--budget-tokens", "10")])
def test_websocket_upgrade_with_a_models_or_budget_token_is_403(
        rb: Broker, upstreams: Dict[str, FakeUpstream], policy: Tuple[str, str]) -> None:
    token = fresh_token(rb, "openai", *policy)
    hs = ws_connect(rb.port, "/openai/v1/realtime?model=gpt-4o-realtime-preview",
                    [("Authorization", f"Bearer {token}")])
    assert hs.status == 403, (hs.status, hs.body[:300])
    assert upstreams["openai"].requests == []


# ============================================================================
# 4 and 5: bytes after a head are never run as a second request
# ============================================================================

def smuggled(b: Broker) -> bytes:
    return request_bytes("POST", "/openai/v1/chat/completions", [
        ("Authorization", f"Bearer {b.token('openai')}"), ("Content-Type", "application/json"),
        ("Content-Length", "2")]) + b"{}"


@pytest.mark.parametrize("target", ["/healthz", "/nosuchprovider/x", "/openai/v1/a%zz"])
def test_duplicate_content_length_is_refused_before_any_answer(
        rb: Broker, upstreams: Dict[str, FakeUpstream], target: str) -> None:
    inner = smuggled(rb)
    data = request_bytes("GET", target, [("Content-Length", "0"), ("Content-Length", str(len(inner)))]) + inner
    resp = raw_exchange(rb.port, data, close_wait=0.5)
    assert resp.status == 400, resp
    assert resp.closed and resp.raw.count(b"HTTP/1.1 ") == 1, resp.raw[-300:]
    time.sleep(0.2)
    assert upstreams["openai"].requests == [], "the body ran as a second request"


@pytest.mark.parametrize("target", ["/openai/v1/realtime", "/discord/gateway?v=10&encoding=json"])
def test_websocket_upgrade_with_a_body_is_400_and_closed(rb: Broker, upstreams: Dict[str, FakeUpstream],
                                                         gateway: FakeGateway, target: str) -> None:
    inner = smuggled(rb)
    data = request_bytes("GET", target, [
        ("Authorization", f"Bearer {rb.token('openai')}"), ("Upgrade", "websocket"),
        ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"), ("Content-Length", str(len(inner)))]) + inner
    resp = raw_exchange(rb.port, data, close_wait=0.5)
    assert resp.status == 400, resp
    assert resp.closed and resp.raw.count(b"HTTP/1.1 ") == 1, resp.raw[-300:]
    time.sleep(0.2)
    assert upstreams["openai"].requests == []


# ============================================================================
# 6: the gateway version is ASCII digits
# ============================================================================


@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A1", "1x"])
def test_gateway_version_must_be_ascii_digits(rb: Broker, gateway: FakeGateway, version: str) -> None:
    gateway.reset()
    hs = ws_connect(rb.port, f"/discord/gateway?v={version}&encoding=json")
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.body[:300])
    try:
        code, _ = hs.ws.recv_close(5.0)
        assert code == 1003, code
    finally:
        hs.ws.close()
    assert gateway.ops_seen == [], "the broker opened the gateway for a bad version"


# ============================================================================
# 7: a percent-encoded token in a refused path is cut in logs and audit rows
# ============================================================================


def test_percent_encoded_token_in_a_refused_path_is_not_logged(rb: Broker) -> None:
    token = rb.token("telegram")
    bot_id, rest = token.split(":", 1)
    encoded = bot_id + ":%73" + rest[1:]                  # the 's' of 'seks_' as %73
    secret_part = rest[len("seks_telegram_"):]
    for target in (f"/telegram/bot{encoded}/x/../getMe", f"/telegram/bot%25{encoded[1:]}/../getMe"):
        resp = raw_exchange(rb.port, request_bytes("GET", target))
        assert resp.status == 400, resp
    deadline = time.monotonic() + 10               # both lines are written (after the answers)
    while time.monotonic() < deadline:
        logged = [l for l in rb.stderr_text().splitlines() if "/telegram/bot" in l and "400" in l
                  and "seks_telegram_" in l]
        if len(logged) >= 2:
            break
        time.sleep(0.05)
    assert len(logged) >= 2, rb.stderr_text()[-800:]
    assert secret_part not in rb.stderr_text(), "the token reached the log"
    audit = rb.cli("audit", "--json").stdout
    assert secret_part[:12] not in audit, "the token reached an audit row"


# ============================================================================
# Suspicious list: method override, repeated "stream", a second IDENTIFY
# ============================================================================


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_method_override_header_under_a_methods_policy_is_403(
        rb: Broker, upstreams: Dict[str, FakeUpstream], header: str) -> None:
    token = fresh_token(rb, "openai", "--allow-method", "POST")
    resp = rb.request("POST", "/openai/v1/files/f1", {"Authorization": f"Bearer {token}",
                                                       header: "DELETE"}, b"")
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert error_type_and_message(resp)[0] == "permission_denied"
    assert upstreams["openai"].requests == []


def test_repeated_stream_key_under_a_budget_is_403(rb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    token = fresh_token(rb, "openai", "--budget-tokens", "1000")
    body = b'{"model":"gpt-4o","stream":true,"stream":false,"messages":[]}'
    resp = rb.request("POST", "/openai/v1/chat/completions/",
                      {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, body)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert upstreams["openai"].requests == []


def test_second_gateway_identify_with_another_token_is_closed_4005(rb: Broker, gateway: FakeGateway) -> None:
    gateway.reset()
    first, second = fresh_token(rb, "discord"), fresh_token(rb, "discord")
    hs = ws_connect(rb.port, "/discord/gateway?v=10&encoding=json")
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.body[:300])
    ws = hs.ws
    identify: Dict[str, Any] = {"op": 2, "d": {"intents": 513, "compress": False,
                                               "properties": {"os": "linux", "browser": "t", "device": "t"}}}
    try:
        assert ws.recv_json()["op"] == 10
        identify["d"]["token"] = first
        ws.send_text(identify)
        assert ws.recv_json()["t"] == "READY"
        identifies = len(gateway.identifies)
        identify["d"]["token"] = second
        ws.send_text(identify)
        code, _ = ws.recv_close(5.0)
        assert code == 4005, code
        time.sleep(0.2)
        assert len(gateway.identifies) == identifies, "the second IDENTIFY reached Discord"
    finally:
        ws.close()
