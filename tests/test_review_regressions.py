"""Regression tests for the independent review's findings 1-6 (repros in the review's
scratch directory), over real sockets against a real `seks_broker.py serve` subprocess.

  1  audit: a lone surrogate in the JSON `model` (b'{"model":"\\ud800"}') made the audit
     INSERT raise outside `sqlite3.Error`; the whole group-commit batch was rolled back yet
     every request in it was answered 200 -> answers without audit rows.
  2  --models: multipart `model` was found by a byte search (a decoy inside a file part
     passed the check), the first of two `model` fields was checked (servers keep the last).
  3  --models: JSON with duplicate `model` keys was checked on the last one only.
  4  --budget-tokens: usage was not read from JSON answers over 8 MiB (embeddings) nor from
     JSON arrays (Gemini :streamGenerateContent without alt=sse) -> budget never charged.
  5  WebSockets: a session opened with a token kept relaying after the token was revoked.
  6  a token row edited to name another provider's secret sent that secret to this route.

Every wait is bounded; everything listens on 127.0.0.1; keys are the fake ones in conftest.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import sqlite3
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from conftest import (
    REAL_KEYS, Broker, FakeUpstream, RecordedRequest, UpstreamHandler, auth_headers,
    error_type_and_message, key_check_failure, secret_name,
)
from ws_helpers import (
    OP_BINARY, OP_CLOSE, OP_TEXT, FakeGateway, FakeRealtime, PeerClosed, WsConn, parse_close,
    ws_connect,
)

HTTP_PROVIDERS = ("openai", "gemini", "github")
WS_PROVIDERS = ("openai", "discord")
RT_PATH = "/openai/v1/realtime?model=gpt-test"
BROKER_POLL_S = 5.0            # the broker's WS_POLL_S: a silent session re-checks its token this often
T = 15.0                       # per-request timeout


# ============================================================================
# Fixtures and helpers
# ============================================================================


@pytest.fixture(scope="module")
def hb(broker_factory: Any, upstreams: Dict[str, FakeUpstream]) -> Broker:
    """HTTP broker: openai, gemini and github pointed at their recording FakeUpstreams."""
    return broker_factory({p: upstreams[p].url for p in HTTP_PROVIDERS}, providers=HTTP_PROVIDERS)



@pytest.fixture(scope="module")
def wsb(broker_factory: Any, upstreams: Dict[str, FakeUpstream], realtime: FakeRealtime,
        gateway: FakeGateway) -> Broker:
    """WebSocket broker: openai -> FakeRealtime, discord gateway -> FakeGateway."""
    return broker_factory({"openai": realtime.url, "discord": upstreams["discord"].url},
                          extra_env={"SEKS_UPSTREAM_DISCORD_GATEWAY": gateway.ws_url},
                          providers=WS_PROVIDERS)


def fresh_token(b: Broker, provider: str, *policy: str) -> Tuple[str, str]:
    agent = f"rr-{provider}-{secrets.token_hex(4)}"
    return agent, b.mint(provider, agent, *policy)


def db_ro(b: Broker) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{b.db}?mode=ro", uri=True, timeout=10)


def audit_count(b: Broker, where: str = "1=1", params: Tuple[Any, ...] = ()) -> int:
    conn = db_ro(b)
    try:
        return conn.execute(f"SELECT count(*) FROM audit WHERE {where}", params).fetchone()[0]
    finally:
        conn.close()


def post(b: Broker, path: str, headers: Dict[str, str], body: bytes,
         timeout: float = T) -> Tuple[Optional[int], bytes, bool]:
    """-> (status or None, body, complete). `complete` is False when the connection was cut
    before the whole body arrived (how the broker withholds an answer it could not audit)."""
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=timeout)
    status: Optional[int] = None
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        status = resp.status
        data = resp.read()
        return status, data, True
    except (http.client.HTTPException, OSError):
        return status, b"", False
    finally:
        conn.close()


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out ({timeout}s) waiting for {what}")


def no_key_responder(provider: str, answer: Any) -> Any:
    """A responder that checks the real key like the real API, then calls `answer(h, req)`."""
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        if key_check_failure(provider, REAL_KEYS[provider], req) is not None:
            h.send_json(401, {"error": {"message": "fake upstream: invalid key"}})
            return
        answer(h, req)
    return respond


# ============================================================================
# Finding 1: audit rows sanitised; no answer without its audit row
# ============================================================================

SURROGATE_BODY = b'{"model":"\\ud800","messages":[]}'     # JSON escape of a lone surrogate
BENIGN_BODY = b'{"model":"gpt-4o","messages":[]}'


def test_lone_surrogate_model_is_answered_and_audited(hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(hb, "openai")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, body, complete = post(hb, "/openai/v1/chat/completions", headers, SURROGATE_BODY)
    assert status == 200 and complete, (status, body[:300], hb.stderr_text()[-1500:])
    assert len(upstreams["openai"].requests) == 1
    wait_for(lambda: audit_count(hb, "agent = ?", (agent,)) >= 1, 5, "the surrogate request's audit row")
    conn = db_ro(hb)
    try:
        rows = conn.execute("SELECT status, outcome, model, path FROM audit WHERE agent = ?", (agent,)).fetchall()
    finally:
        conn.close()
    assert len(rows) == 1, rows
    st, outcome, _model, path = rows[0]
    assert st == 200 and outcome == "ok" and path == "/openai/v1/chat/completions", rows
    # the chain still verifies with the sanitised row in it
    cp = hb.cli("audit", "verify")
    assert cp.returncode == 0, cp.stderr


def test_concurrent_answers_all_have_audit_rows(hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """60 benign requests racing 20 surrogate ones, interleaved (they share group-commit
    batches): every request that got a complete 200 must have its audit row."""
    agent, token = fresh_token(hb, "openai")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bodies = [SURROGATE_BODY if i % 4 == 3 else BENIGN_BODY for i in range(80)]
    results: List[Tuple[bool, Optional[int], bool]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(bodies), timeout=20)

    def worker(body: bytes) -> None:
        try:
            start.wait()
        except threading.BrokenBarrierError:
            pass
        st, _, complete = post(hb, "/openai/v1/chat/completions", headers, body)
        with lock:
            results.append((body == SURROGATE_BODY, st, complete))

    threads = [threading.Thread(target=worker, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T + 25)
    assert len(results) == len(bodies), "some requests never finished"
    ok_benign = sum(1 for sur, st, c in results if not sur and st == 200 and c)
    ok_all = sum(1 for _, st, c in results if st == 200 and c)
    assert ok_all >= 20, f"too few complete 200s to judge: {results}"
    # rows are committed before an answer's last bytes; allow a moment anyway
    try:
        wait_for(lambda: audit_count(hb, "agent = ?", (agent,)) >= ok_all, 3, "audit rows")
    except AssertionError:
        pass
    rows = audit_count(hb, "agent = ?", (agent,))
    assert rows >= ok_all, (f"{ok_all} requests got a complete 200 but only {rows} audit rows exist "
                            f"(benign 200s: {ok_benign}); broker log: {hb.stderr_text()[-1500:]}")
    # and a surrogate in a batch must not cost the benign requests sharing it their answers
    assert ok_benign >= 55, f"only {ok_benign}/60 benign requests answered 200: {results}"


# ============================================================================
# Findings 2 and 3: --models read from the real multipart field / an unambiguous JSON key
# ============================================================================

CT_MP = "multipart/form-data; boundary=XyZ"
TRANSCRIBE = "/openai/v1/audio/transcriptions"


def _mp_headers(token: str, ctype: str = CT_MP) -> Dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": ctype}


def test_models_multipart_decoy_in_file_part_refused(hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(hb, "openai", "--models", "whisper-1")
    decoy = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
             b"Content-Type: text/plain\r\n\r\n"
             b"hello name=\"model\"\r\n\r\nwhisper-1\r\n bye\r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XyZ--\r\n")
    resp = hb.request("POST", TRANSCRIBE, _mp_headers(token), decoy)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert error_type_and_message(resp)[0] == "permission_denied"
    assert upstreams["openai"].requests == [], "a forbidden model reached the upstream"
    # control: the same token with a clean form naming the allowed model passes, body unchanged
    clean = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
             b"Content-Type: audio/wav\r\n\r\nRIFF....WAVEfmt \r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n")
    resp = hb.request("POST", TRANSCRIBE, _mp_headers(token), clean)
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert upstreams["openai"].only_request().body == clean, "the multipart body must pass unchanged"


def test_models_multipart_two_model_fields_refused(hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(hb, "openai", "--models", "whisper-1")
    twice = (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XyZ--\r\n")
    resp = hb.request("POST", TRANSCRIBE, _mp_headers(token), twice)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert upstreams["openai"].requests == []


def test_models_json_duplicate_model_keys_refused(hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(hb, "openai", "--models", "whisper-1")
    for body in (b'{"model":"gpt-4o","model":"whisper-1"}', b'{"model":"whisper-1","model":"gpt-4o"}'):
        resp = hb.request("POST", TRANSCRIBE, _mp_headers(token, "application/json"), body)
        assert resp.status == 403, (body, resp.status, resp.body[:300])
    assert upstreams["openai"].requests == []


# ============================================================================
# Finding 4: usage from >8 MiB JSON answers (tail) and from JSON arrays
# ============================================================================


def _big_embeddings_body(size: int = 9_000_000) -> bytes:
    body = json.dumps({"object": "list",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.0123456] * (size // 11)}],
                       "model": "text-embedding-3-small",
                       "usage": {"prompt_tokens": 5000, "total_tokens": 5000}}).encode()
    assert len(body) > 8 * 1024 * 1024 and body.rstrip(b"}").endswith(b'"total_tokens": 5000')
    return body


def test_budget_charged_from_tail_of_9mb_json_answer(hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    up = upstreams["openai"]
    big = _big_embeddings_body()
    up.set_responder(no_key_responder("openai", lambda h, req: h.send_bytes(200, big, content_type="application/json")))
    _, token = fresh_token(hb, "openai", "--budget-tokens", "100")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = b'{"model":"text-embedding-3-small","input":"x"}'
    first = hb.request("POST", "/openai/v1/embeddings", headers, body, timeout=60)
    assert first.status == 200 and len(first.body) == len(big), (first.status, len(first.body))
    second = hb.request("POST", "/openai/v1/embeddings", headers, body, timeout=60)
    assert second.status == 429, (f"5000 tokens used of a 100 budget, second request got {second.status} "
                                  f"({len(second.body)} bytes)")
    assert len(up.requests) == 1, "the over-budget request reached the upstream"


def test_gemini_stream_generate_content_json_array_charges_budget(
        hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    up = upstreams["gemini"]
    item = {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}],
            "usageMetadata": {"promptTokenCount": 4000, "candidatesTokenCount": 1000, "totalTokenCount": 5000},
            "modelVersion": "gemini-2.0-flash"}
    answer = json.dumps([item, item]).encode()
    up.set_responder(no_key_responder("gemini", lambda h, req: h.send_bytes(200, answer, content_type="application/json")))
    _, token = fresh_token(hb, "gemini", "--budget-tokens", "100")
    headers = {"x-goog-api-key": token, "Content-Type": "application/json"}
    path = "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    first = hb.request("POST", path, headers, b'{"contents":[]}')
    assert first.status == 200 and first.body == answer, (first.status, first.body[:300])
    second = hb.request("POST", path, headers, b'{"contents":[]}')
    assert second.status == 429, f"usageMetadata in a JSON array not charged: second request got {second.status}"
    assert len(up.requests) == 1


# ============================================================================
# Finding 5: open WebSocket sessions end when their token is revoked
# ============================================================================


def _rt_open(b: Broker, token: str) -> WsConn:
    hs = ws_connect(b.port, RT_PATH, [("Authorization", f"Bearer {token}")])
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.body[:300])
    first = hs.ws.recv_json()
    assert first["type"] == "session.created", first
    return hs.ws


def _revoke(b: Broker, token: str) -> None:
    cp = b.cli("token", "revoke", "-", input=token + "\n")
    assert cp.returncode == 0, cp.stderr


def _data_messages(realtime_session: Any) -> List[bytes]:
    return [p for op, p in list(realtime_session.received) if op in (OP_TEXT, OP_BINARY)]


def _close_code_within(ws: WsConn, timeout: float) -> Tuple[Optional[int], str]:
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


def test_ws_revoked_token_next_client_message_closes_1008(wsb: Broker, realtime: FakeRealtime) -> None:
    realtime.reset()
    _, token = fresh_token(wsb, "openai")
    ws = _rt_open(wsb, token)
    try:
        ws.send_text({"type": "echo", "n": 1})
        assert ws.recv_json()["event"]["n"] == 1
        s = realtime.wait_session()
        before = len(_data_messages(s))
        _revoke(wsb, token)
        ws.send_text({"type": "echo", "n": 2, "text": "after revoke"})
        code, reason = _close_code_within(ws, 4.0)
        assert code == 1008, (code, reason)
        time.sleep(0.3)
        after = _data_messages(s)
        assert len(after) == before and not any(b"after revoke" in m for m in after), \
            f"the upstream received data after the revocation: {after[before:]!r}"
    finally:
        ws.close()


def test_ws_revoked_token_silent_client_closed_by_poll(wsb: Broker, realtime: FakeRealtime) -> None:
    realtime.reset()
    _, token = fresh_token(wsb, "openai")
    ws = _rt_open(wsb, token)
    try:
        ws.send_text({"type": "echo", "n": 1})
        assert ws.recv_json()["event"]["n"] == 1
        s = realtime.wait_session()
        before = len(_data_messages(s))
        _revoke(wsb, token)
        t0 = time.monotonic()
        code, reason = _close_code_within(ws, BROKER_POLL_S + 2.5)   # client stays silent
        assert code == 1008, (code, reason)
        assert time.monotonic() - t0 < BROKER_POLL_S + 2.5
        assert len(_data_messages(s)) == before
        # the upstream side is closed too
        assert s.ended.wait(5.0), "upstream session still open after the revocation close"
    finally:
        ws.close()


def test_ws_discord_gateway_revoked_token_closes_4004(wsb: Broker, gateway: FakeGateway) -> None:
    gateway.reset()
    _, token = fresh_token(wsb, "discord")
    hs = ws_connect(wsb.port, "/discord/gateway?v=10&encoding=json")
    assert hs.status == 101 and hs.ws is not None, (hs.status, hs.body[:300])
    ws = hs.ws
    try:
        assert ws.recv_json()["op"] == 10
        ws.send_text({"op": 2, "d": {"token": token, "intents": 513, "compress": False,
                                     "properties": {"os": "linux", "browser": "t", "device": "t"}}})
        ready = ws.recv_json()
        assert ready["t"] == "READY", ready
        assert ws.recv_json()["t"] == "MESSAGE_CREATE"
        ops_before = list(gateway.ops_seen)
        _revoke(wsb, token)
        ws.send_text({"op": 1, "d": 2})
        code, reason = _close_code_within(ws, 4.0)
        assert code == 4004, (code, reason)
        time.sleep(0.3)
        assert gateway.ops_seen == ops_before, f"gateway got {gateway.ops_seen[len(ops_before):]} after revocation"
    finally:
        ws.close()


# ============================================================================
# Finding 6: a token row naming another provider's secret is refused
# ============================================================================


def test_token_row_pointing_at_other_providers_secret_gets_401(
        hb: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(hb, "openai")
    conn = sqlite3.connect(str(hb.db), timeout=10)
    try:
        with conn:
            n = conn.execute("UPDATE tokens SET secret_name = ? WHERE agent = ?",
                             (secret_name("github"), agent)).rowcount
        assert n == 1
    finally:
        conn.close()
    resp = hb.request("GET", "/openai/v1/models", auth_headers("openai", token))
    github_key = REAL_KEYS["github"]
    for p, up in upstreams.items():
        for req in up.requests:
            assert github_key not in req.wire_text(), f"the github key reached the {p} upstream"
    assert resp.status == 401, (resp.status, resp.body[:300])
    assert error_type_and_message(resp)[0] == "authentication_error"
    assert upstreams["openai"].requests == [], "the request was forwarded"
    assert github_key.encode() not in resp.body
