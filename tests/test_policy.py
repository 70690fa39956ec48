"""Agents and per-token policy over real sockets (issue 3): agent disable/enable, method, path,
rate, lifetime and model limits (including decoys in multipart forms, repeated JSON keys and
boundary tricks), method-override headers, token budgets (charged from answers over 8 MiB and
from JSON arrays), limits under 50 concurrent requests, and usage metered from real-shaped
answers of each LLM provider (plain JSON and server-sent events). Tokens are minted in-process
(the CLI's own code); the CLI itself is tested in test_cli.py.

Every test mints its own tokens for a fresh agent, so counters and usage rows are its own.
Nothing is mocked: the broker is a subprocess, the providers are loopback FakeUpstreams that
answer 401 unless the real key arrives.

Layout: helpers → real-shaped LLM answers → agents → refusals per policy (security first) →
limits under concurrency → usage metering.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import (
    hanging_upstream, broker_env, wait_until,
    http_request,
    REAL_KEYS, Brokers, audit_json, Broker, FakeUpstream, RecordedRequest, Response, UpstreamHandler, auth_headers,
    call, error_type_and_message, fresh_agent, fresh_token, key_checked, ok, parse_table,
    send_request,
)

CONCURRENCY = 50
THREAD_JOIN_S = 60.0


# ============================================================================
# Helpers
# ============================================================================


def assert_denied(resp: Response, status: int, *words: str) -> str:
    """The broker's own JSON error with `status`; its message mentions every word given."""
    assert resp.status == status, (resp.status, resp.body[:300])
    data = resp.json()
    if isinstance(data, dict) and data.get("ok") is False:   # Telegram-shaped, for Telegram clients
        assert data.get("error_code") == status, data
        message = data.get("description")
        assert isinstance(message, str), data
    else:
        _, message = error_type_and_message(resp)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message {message!r}"
    return message


def token_row(broker: Broker, agent: str) -> Dict[str, str]:
    rows = [r for r in parse_table(ok(broker.cli("token", "list"))) if r["AGENT"] == agent]
    assert len(rows) == 1, rows
    return rows[0]


def usage_json(broker: Broker, *args: str) -> List[Dict[str, Any]]:
    """`usage --json` rows; these brokers have no [prices], so each row's cost is null (taken out)."""
    rows = [json.loads(line) for line in ok(broker.cli("usage", "--json", *args)).splitlines() if line.strip()]
    for row in rows:
        assert row.pop("cost_usd") is None, row
    return rows


def run_concurrently(n: int, fn: Callable[[int], Any]) -> List[Any]:
    """Run fn(0..n-1) in n threads released together by a barrier; every thread must finish."""
    barrier = threading.Barrier(n)
    results: List[Any] = [None] * n

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=THREAD_JOIN_S)
            results[i] = fn(i)
        except BaseException as exc:  # reported by the assertion below, not lost in a thread
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=THREAD_JOIN_S)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} client threads failed, first: {errors[0]!r}"
    return results


def requests_marked(up: FakeUpstream, path_part: str) -> List[RecordedRequest]:
    with up.lock:
        return [r for r in up.requests if path_part in r.target]


# ============================================================================
# Real-shaped LLM answers (what each provider sends, trimmed to the fields that matter)
# ============================================================================


def body_json(req: RecordedRequest) -> Dict[str, Any]:
    try:
        obj = json.loads(req.body or b"{}")
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def sse(obj: Any, event: Optional[str] = None, sep: bytes = b"\n\n") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj).encode() + sep


def send_in_pieces(h: UpstreamHandler, data: bytes, piece: int, content_type: str) -> None:
    """Send `data` chunked in `piece`-byte chunks (events and JSON split mid-line)."""
    h.send_stream(200, (data[i:i + piece] for i in range(0, len(data), piece)),
                  [("Content-Type", content_type)], delay=0.001)


def openai_answer(tin: int, tout: int, groq: bool = False, content: str = "Hello!",
                  piece: int = 0) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    """OpenAI (and Groq) chat completions. Like the real API, a stream carries usage only when
    asked with stream_options.include_usage; Groq's streams always end with x_groq.usage.
    With `piece`, a JSON answer is sent chunked in pieces of that size."""
    provider = "groq" if groq else "openai"

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        body = body_json(req)
        model = body.get("model", "gpt-4o-mini")
        caps = [body[k] for k in ("max_completion_tokens", "max_tokens") if isinstance(body.get(k), int)]
        out = min([tout] + caps)                   # like the real API: never more than asked for
        usage = {"prompt_tokens": tin, "completion_tokens": out, "total_tokens": tin + out}
        base = {"id": "chatcmpl-test", "created": 1700000000, "model": model, "system_fingerprint": "fp_test"}
        if body.get("stream") is not True:
            answer = {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                 "finish_reason": "stop"}],
                "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0}}}
            if piece:
                send_in_pieces(h, json.dumps(answer).encode(), piece, "application/json")
            else:
                h.send_json(200, answer)
            return
        include = (body.get("stream_options") or {}).get("include_usage") is True
        chunk = {**base, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include else {}
        events = [
            sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}], **extra}),
            sse({**chunk, "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None,
                                       "finish_reason": None}], **extra}),
        ]
        last = {**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], **extra}
        if groq:
            last["x_groq"] = {"id": "req_test", "usage": {"queue_time": 0.01, "prompt_tokens": tin,
                                                          "prompt_time": 0.002, "completion_tokens": out,
                                                          "completion_time": 0.03, "total_tokens": tin + out,
                                                          "total_time": 0.032}}
        events.append(sse(last))
        if include:
            events.append(sse({**chunk, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        h.send_sse(events, 0.0)
    return key_checked(provider, respond)


def anthropic_answer(tin: int, tout: int, piece: int = 0) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    """Anthropic Messages: usage in the message; in a stream, input tokens in message_start and
    the final output count in message_delta. With `piece`, the stream is cut into chunks of that
    many bytes, so events arrive split mid-line."""
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        body = body_json(req)
        model = body.get("model", "claude-3-5-haiku-20241022")
        if body.get("stream") is not True:
            h.send_json(200, {"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                              "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
                              "stop_sequence": None,
                              "usage": {"input_tokens": tin, "cache_creation_input_tokens": 0,
                                        "cache_read_input_tokens": 0, "output_tokens": tout}})
            return
        events = [
            sse({"type": "message_start", "message": {
                "id": "msg_test", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": tin, "output_tokens": 1}}}, "message_start"),
            sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start"),
            sse({"type": "ping"}, "ping"),
            sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
                "content_block_delta"),
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                 "usage": {"output_tokens": tout}}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]
        if piece:
            send_in_pieces(h, b"".join(events), piece, "text/event-stream")
        else:
            h.send_sse(events, 0.0)
    return key_checked("anthropic", respond)


def gemini_answer(tin: int, tout: int, thoughts: int = 0) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    """Gemini generateContent (usageMetadata) and streamGenerateContent?alt=sse, whose events are
    separated by CRLF CRLF and each carry the running usageMetadata (the last one is final)."""
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        m = re.search(r"/models/([^/:]+):(\w+)", req.path)
        model = m.group(1) if m else "gemini-2.0-flash"

        def usage(out: int) -> Dict[str, int]:
            u = {"promptTokenCount": tin, "candidatesTokenCount": out, "totalTokenCount": tin + out + thoughts}
            if thoughts:
                u["thoughtsTokenCount"] = thoughts
            return u

        def candidate(text: str, final: bool) -> Dict[str, Any]:
            c: Dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if final:
                c["finishReason"] = "STOP"
            return c

        if m and m.group(2) == "streamGenerateContent":
            h.send_sse([
                sse({"candidates": [candidate("Hel", False)], "usageMetadata": usage(1), "modelVersion": model},
                    sep=b"\r\n\r\n"),
                sse({"candidates": [candidate("lo", False)], "usageMetadata": usage(2), "modelVersion": model},
                    sep=b"\r\n\r\n"),
                sse({"candidates": [candidate("!", True)], "usageMetadata": usage(tout), "modelVersion": model},
                    sep=b"\r\n\r\n"),
            ], 0.0)
            return
        h.send_json(200, {"candidates": [candidate("Hello!", True)], "usageMetadata": usage(tout),
                          "modelVersion": model, "responseId": "resp-test"})
    return key_checked("gemini", respond)


def read_through(broker: Broker, provider: str, token: str, method: str, path: str, body: Optional[bytes]
                 ) -> Response:
    """A request whose whole answer (stream included) is read before returning."""
    resp = call(broker, provider, token, method, path, body, {"Accept": "text/event-stream, application/json"})
    assert resp.status == 200, (resp.status, resp.body[:300])
    return resp


# ============================================================================
# Agents: disable stops every token of the agent on its next request; enable restores
# ============================================================================


def test_agent_disable_stops_every_token_then_enable_restores(broker: Broker,
                                                             upstreams: Dict[str, FakeUpstream]) -> None:
    agent = fresh_agent("disable")
    other = fresh_agent("bystander")
    out = broker.cli("agent", "add", agent)
    assert out.returncode == 0, out.stderr
    assert broker.cli("agent", "add", agent).returncode == 1, "adding an existing agent must fail"
    tokens = {p: broker.mint(p, agent) for p in ("openai", "anthropic", "telegram")}
    bystander = broker.mint("openai", other)
    for p, t in tokens.items():
        assert call(broker, p, t, path="/getMe" if p == "telegram" else "/v1/models").status == 200, p

    agents = {r["NAME"]: r for r in parse_table(ok(broker.cli("agent", "list")))}
    assert agents[agent]["STATE"] == "enabled"
    assert agents[agent]["LIVE TOKENS"] == "3"

    ok(broker.cli("agent", "disable", agent))
    for u in upstreams.values():
        u.reset()
    for p, t in tokens.items():   # the very next request, no restart, no wait
        resp = call(broker, p, t, path="/getMe" if p == "telegram" else "/v1/models")
        assert_denied(resp, 401, "agent", "disabled")
    assert not any(u.requests for u in upstreams.values()), "a disabled agent's request reached upstream"
    assert call(broker, "openai", bystander).status == 200, "another agent must keep working"
    agents = {r["NAME"]: r for r in parse_table(ok(broker.cli("agent", "list")))}
    assert agents[agent]["STATE"] == "disabled"
    assert agents[other]["STATE"] == "enabled"

    ok(broker.cli("agent", "enable", agent))
    for p, t in tokens.items():
        assert call(broker, p, t, path="/getMe" if p == "telegram" else "/v1/models").status == 200, p
    agents = {r["NAME"]: r for r in parse_table(ok(broker.cli("agent", "list")))}
    assert agents[agent]["STATE"] == "enabled"


def test_agent_commands_refuse_unknown_agents(broker: Broker) -> None:
    for action in ("disable", "enable"):
        cp = broker.cli("agent", action, fresh_agent("nobody"))
        assert cp.returncode == 1, (action, cp.returncode, cp.stderr)
        assert "no agent" in cp.stderr.lower()


# ============================================================================
# Each policy refuses what it should, with the right status and a clear message
# ============================================================================


def test_method_policy(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "openai", "--allow-method", "get", prefix="method")
    assert call(broker, "openai", token, "GET", "/v1/models").status == 200
    for method in ("POST", "DELETE", "PUT"):
        resp = call(broker, "openai", token, method, "/v1/models", b"{}")
        message = assert_denied(resp, 403, f"method {method}", "not allowed", "GET")
        assert token not in message
    for method in ("get", "Get", "gET"):     # review finding: a case variant passed and went up as is
        assert_denied(call(broker, "openai", token, method, "/v1/models"), 403, f"method {method}")
    assert [r.method for r in upstreams["openai"].requests] == ["GET"]
    assert token_row(broker, agent)["POLICY"] == "methods=GET"


def test_method_policy_repeatable(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "openai", "--allow-method", "GET", "--allow-method", "POST", prefix="methods")
    assert call(broker, "openai", token, "GET").status == 200
    assert call(broker, "openai", token, "POST", "/v1/chat/completions", b"{}").status == 200
    assert_denied(call(broker, "openai", token, "DELETE", "/v1/models/x"), 403, "method DELETE")


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_method_override_header_under_a_methods_policy_is_403(
        broker: Broker, upstreams: Dict[str, FakeUpstream], header: str) -> None:
    """A method-override header cannot turn an allowed POST into a DELETE the upstream obeys."""
    _, token = fresh_token(broker, "openai", "--allow-method", "POST", prefix="override")
    resp = broker.request("POST", "/openai/v1/files/f1", {"Authorization": f"Bearer {token}",
                                                          header: "DELETE"}, b"")
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert error_type_and_message(resp)[0] == "permission_denied"
    assert upstreams["openai"].requests == []


def test_path_policy_is_a_segment_prefix(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "openai", "--allow-path", "/v1/chat", prefix="path")
    for path in ("/v1/chat", "/v1/chat/completions", "/v1/chat/completions/abc"):
        assert call(broker, "openai", token, "POST", path, b"{}").status == 200, path
    for path in ("/v1/chatty", "/v1/chat-completions", "/v1/embeddings", "/v1", "/v2/chat/completions",
                 "/v1/cha%74ty", "/x/v1/chat/completions"):
        resp = call(broker, "openai", token, "POST", path, b"{}")
        assert_denied(resp, 403, "path", "not allowed", "/v1/chat")
    got = [r.path for r in upstreams["openai"].requests]
    assert got == ["/v1/chat", "/v1/chat/completions", "/v1/chat/completions/abc"], got
    # encoded climbs out of the allowed prefix are refused before any upstream contact
    upstreams["openai"].reset()
    for path in ("/v1/chat/../embeddings", "/v1/chat/%2e%2e/embeddings", "/v1/chat/%252e%252e/embeddings"):
        resp = call(broker, "openai", token, "POST", path, b"{}")
        assert resp.status in (400, 403), (path, resp.status)
    assert not upstreams["openai"].requests
    assert token_row(broker, agent)["POLICY"] == "paths=/v1/chat"


def test_path_policy_repeatable(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "openai", "--allow-path", "/v1/chat/completions",
                        "--allow-path", "/v1/models", prefix="paths")
    assert call(broker, "openai", token, "POST", "/v1/chat/completions", b"{}").status == 200
    assert call(broker, "openai", token, "GET", "/v1/models/gpt-4o-mini").status == 200
    assert_denied(call(broker, "openai", token, "POST", "/v1/embeddings", b"{}"), 403, "path")


def test_telegram_path_policy_matched_without_the_token_segment(broker: Broker,
                                                                upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "telegram", "--allow-path", "/bot/sendMessage", prefix="tg")
    resp = call(broker, "telegram", token, "POST", "/sendMessage", b'{"chat_id": 1, "text": "hi"}')
    assert resp.status == 200, resp.body[:300]
    for path in ("/getUpdates", "/sendMessageX", "/deleteWebhook"):
        resp = call(broker, "telegram", token, "POST", path, b"{}")
        message = assert_denied(resp, 403, "path", "/bot/sendMessage")
        assert token.split(":", 1)[1] not in message
    reqs = upstreams["telegram"].requests
    assert [r.path for r in reqs] == [f"/bot{REAL_KEYS['telegram']}/sendMessage"]


def test_rate_policy_429_with_retry_after(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "openai", "--rate", "3/h", prefix="rate")
    for _ in range(3):
        assert call(broker, "openai", token).status == 200
    for _ in range(2):
        resp = call(broker, "openai", token)
        assert_denied(resp, 429, "rate limit", "3", "hour")
        retry = resp.headers.get("Retry-After")
        assert retry is not None and retry.isdigit(), f"Retry-After={retry!r}"
        # one request comes back every 3600/3 s
        assert 1 <= int(retry) <= 1200, retry
    assert len(upstreams["openai"].requests) == 3
    assert token_row(broker, agent)["POLICY"] == "rate=3/h"


def test_rate_policy_refills(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "openai", "--rate", "1/s", prefix="refill")
    t0 = time.monotonic()
    assert call(broker, "openai", token).status == 200
    resp = call(broker, "openai", token)
    assert resp.status == 429
    assert resp.headers.get("Retry-After") == "1"
    # a refused request takes nothing from the bucket: asking until one is let through is fair
    assert wait_until(lambda: call(broker, "openai", token).status == 200, 5, interval=0.05), "never refilled"
    assert time.monotonic() - t0 > 0.9, "refilled sooner than the rate allows"


def test_rate_flag_is_validated(broker: Broker) -> None:
    for bad in ("60", "0/m", "ten/m", "5/w", "-1/s"):
        cp = broker.cli("token", "mint", "--secret", "openai-key", "--agent", fresh_agent("bad"), "--rate", bad)
        assert cp.returncode == 2, (bad, cp.returncode, cp.stdout, cp.stderr)
        assert not cp.stdout.strip(), "no token may be printed for a refused mint"


def test_max_requests_policy(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "openai", "--max-requests", "3", prefix="maxreq")
    for _ in range(3):
        assert call(broker, "openai", token).status == 200
    for _ in range(2):
        refused = call(broker, "openai", token)
        assert_denied(refused, 403, "3 requests")
        assert refused.headers.get("x-should-retry") == "false"      # the SDKs' "do not retry"
    assert len(upstreams["openai"].requests) == 3
    row = token_row(broker, agent)
    assert row["POLICY"] == "max-requests=3"
    assert row["REQUESTS"] == "3"


def test_refused_requests_do_not_use_up_max_requests(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "openai", "--max-requests", "2", "--allow-method", "GET", prefix="maxreq403")
    for _ in range(3):
        assert call(broker, "openai", token, "POST", "/v1/models", b"{}").status == 403
    assert call(broker, "openai", token).status == 200
    assert call(broker, "openai", token).status == 200
    assert call(broker, "openai", token).status == 403


@pytest.mark.parametrize("provider,path,allowed,refused", [
    ("openai", "/v1/chat/completions", "gpt-4o-mini", "gpt-4o"),
    ("groq", "/openai/v1/chat/completions", "llama-3.1-8b-instant", "llama-3.3-70b-versatile"),
    ("anthropic", "/v1/messages", "claude-3-5-haiku-20241022", "claude-opus-4-20250514"),
])
def test_models_policy_on_json_body(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str, path: str,
                                    allowed: str, refused: str) -> None:
    """`model` in the JSON body (OpenAI, Groq, Anthropic), whatever the body's framing."""
    agent, token = fresh_token(broker, provider, "--models", f"{allowed},other-model", prefix="models")

    def body(model: str) -> bytes:
        return json.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}).encode()

    assert call(broker, provider, token, "POST", path, body(allowed)).status == 200
    assert call(broker, provider, token, "POST", path, iter([body("other-model")])).status == 200
    resp = call(broker, provider, token, "POST", path, body(refused))
    assert_denied(resp, 403, f"model '{refused}'", "not allowed", allowed)
    # the same, with the body sent chunked: the broker must still read the model
    resp = call(broker, provider, token, "POST", path, iter([body(refused)[:10], body(refused)[10:]]))
    assert_denied(resp, 403, f"model '{refused}'", "not allowed")
    sent = [json.loads(r.body or b"{}")["model"] for r in upstreams[provider].requests]
    assert sent == [allowed, "other-model"]
    assert token_row(broker, agent)["POLICY"] == f"models={allowed},other-model"


def test_models_policy_on_gemini_path(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "gemini", "--models", "gemini-2.0-flash", prefix="gmodels")
    body = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    for path in ("/v1beta/models/gemini-2.0-flash:generateContent",
                 "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                 "/v1/models/gemini-2.0-flash:countTokens"):
        assert call(broker, "gemini", token, "POST", path, body).status == 200, path
    for path in ("/v1beta/models/gemini-2.5-pro:generateContent",
                 "/v1beta/models/gemini-2.0-flash-thinking:streamGenerateContent?alt=sse",
                 "/v1beta/models/gemini-2.0-flas%68x:generateContent"):
        resp = call(broker, "gemini", token, "POST", path, body)
        assert_denied(resp, 403, "model", "not allowed", "gemini-2.0-flash")
    assert len(upstreams["gemini"].requests) == 3


def test_models_policy_on_gemini_path_survives_percent_encoding(broker: Broker,
                                                                upstreams: Dict[str, FakeUpstream]) -> None:
    """'%6D' is 'm' (RFC 3986 6.2.2.2: percent-encoded unreserved characters are equivalent to
    their decoded form, and servers normalise them), so '/v1beta/%6Dodels/gemini-2.5-pro:...'
    names gemini-2.5-pro. Like --allow-path, the model must be read from the normalised path;
    a request whose model cannot be read there is refused, never forwarded."""
    _, token = fresh_token(broker, "gemini", "--models", "gemini-2.0-flash", prefix="gmodels-enc")
    body = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    for path in ("/v1beta/%6Dodels/gemini-2.5-pro:generateContent",
                 "/v1beta/models%2Fgemini-2.5-pro:generateContent"):
        resp = call(broker, "gemini", token, "POST", path, body)
        assert resp.status in (400, 403), (path, resp.status, resp.body[:200])
    assert not upstreams["gemini"].requests, [r.target for r in upstreams["gemini"].requests]


CT_MP = "multipart/form-data; boundary=XyZ"
TRANSCRIBE = "/openai/v1/audio/transcriptions"


def _mp_headers(token: str, ctype: str = CT_MP) -> Dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": ctype}


def test_models_multipart_decoy_in_file_part_refused(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """--models reads the real multipart `model` field, not a byte search that a decoy inside a
    file part satisfies; a clean form naming the allowed model passes, body unchanged."""
    _, token = fresh_token(broker, "openai", "--models", "whisper-1", prefix="mp-decoy")
    decoy = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
             b"Content-Type: text/plain\r\n\r\n"
             b"hello name=\"model\"\r\n\r\nwhisper-1\r\n bye\r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XyZ--\r\n")
    resp = broker.request("POST", TRANSCRIBE, _mp_headers(token), decoy)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert error_type_and_message(resp)[0] == "permission_denied"
    assert upstreams["openai"].requests == [], "a forbidden model reached the upstream"
    # control: the same token with a clean form naming the allowed model passes, body unchanged
    clean = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
             b"Content-Type: audio/wav\r\n\r\nRIFF....WAVEfmt \r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n")
    resp = broker.request("POST", TRANSCRIBE, _mp_headers(token), clean)
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert upstreams["openai"].only_request().body == clean, "the multipart body must pass unchanged"


def test_models_multipart_two_model_fields_refused(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Two `model` fields (servers keep the last) cannot smuggle a model past the first."""
    _, token = fresh_token(broker, "openai", "--models", "whisper-1", prefix="mp-twice")
    twice = (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XyZ--\r\n")
    resp = broker.request("POST", TRANSCRIBE, _mp_headers(token), twice)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert upstreams["openai"].requests == []


def test_models_json_duplicate_model_keys_refused(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """JSON with two `model` keys is refused whichever one is allowed."""
    _, token = fresh_token(broker, "openai", "--models", "whisper-1", prefix="json-twice")
    for body in (b'{"model":"gpt-4o","model":"whisper-1"}', b'{"model":"whisper-1","model":"gpt-4o"}'):
        resp = broker.request("POST", TRANSCRIBE, _mp_headers(token, "application/json"), body)
        assert resp.status == 403, (body, resp.status, resp.body[:300])
    assert upstreams["openai"].requests == []


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
def test_multipart_model_is_read_from_the_real_boundary(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                        ctype: str) -> None:
    """The boundary is the `boundary` parameter as a MIME parser reads it, not an unanchored
    search that `xboundary=DECOY` fools into reading a decoy form inside a file part."""
    _, token = fresh_token(broker, "openai", "--models", "whisper-1", prefix="mp-boundary")
    resp = broker.request("POST", TRANSCRIBE, _mp_headers(token, ctype), FORM)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert upstreams["openai"].requests == [], "a forbidden model reached the upstream"


def test_multipart_with_a_quoted_boundary_and_the_allowed_model_passes(
        broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Positive control: a quoted boundary with a space, a preamble and a tricky filename."""
    upstreams["openai"].set_responder(lambda h, req: h.send_json(200, {"text": "ok"}))
    _, token = fresh_token(broker, "openai", "--models", "whisper-1", prefix="mp-quoted")
    form = (b"preamble\r\n--a b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x; name=model\"\r\n"
            b"\r\nRIFF\r\n--a b\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--a b--\r\n")
    resp = broker.request("POST", TRANSCRIBE, _mp_headers(token, 'multipart/form-data; boundary="a b"'), form)
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert upstreams["openai"].only_request().body == form


def test_budget_policy_sequential(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Budget 250, answers of 60 in + up to 40 out: each request reserves its bound (input bytes
    + 64, output cap lowered to what is left), so the budget is never passed; once what is left
    cannot hold a request's input bound, it is 403 (nothing in flight: it never will fit)."""
    upstreams["openai"].set_responder(openai_answer(60, 40))
    agent, token = fresh_token(broker, "openai", "--budget-tokens", "250", prefix="budget")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    bound = len(body) + 64
    read_through(broker, "openai", token, "POST", "/v1/chat/completions", body)       # 100 spent
    read_through(broker, "openai", token, "POST", "/v1/chat/completions", body)       # cap lowered
    caps = [json.loads(r.body)["max_completion_tokens"] for r in upstreams["openai"].requests]
    assert caps == [250 - bound, 150 - bound], caps
    spent = 100 + 60 + (150 - bound)
    for _ in range(2):
        refused = call(broker, "openai", token, "POST", "/v1/chat/completions", body)
        assert_denied(refused, 403, "budget", f"{250 - spent} left")
        assert refused.headers.get("x-should-retry") == "false"
    assert len(upstreams["openai"].requests) == 2
    row = token_row(broker, agent)
    assert row["TOKENS"] == str(spent) and spent <= 250
    assert row["POLICY"] == "budget=250"


@pytest.mark.parametrize("provider,method,path,body", [
    ("openai", "POST", "/v1/batches", b'{"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}'),
    ("openai", "GET", "/v1/batches/batch_1", None),
    ("openai", "POST", "/v1/fine_tuning/jobs", b'{"model": "gpt-4o-mini", "training_file": "f"}'),
    ("openai", "POST", "/v1/vector_stores/vs_1/file_batches", b'{"file_ids": ["f"]}'),
    ("openai", "POST", "/v1/responses", b'{"model": "gpt-4o-mini", "input": "hi", "background": true}'),
    ("openai", "POST", "/v1/responses", b'{"model": "gpt-4o-mini", "input": "hi", "background": tru'),
    ("groq", "POST", "/openai/v1/batches", b'{"input_file_id": "file-1"}'),
    ("anthropic", "POST", "/v1/messages/batches", b'{"requests": []}'),
    ("gemini", "POST", "/v1beta/models/gemini-2.0-flash:batchGenerateContent", b'{"batch": {}}'),
    ("gemini", "POST", "/v1beta/models/text-embedding-004:asyncBatchEmbedContent", b'{}'),
    ("gemini", "POST", "/v1beta/models/veo-2.0:predictLongRunning", b'{}'),
    ("gemini", "GET", "/v1beta/batches/b1", None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_budget_tokens_cannot_start_batch_or_background_jobs(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                             provider: str, method: str, path: str,
                                                             body: Optional[bytes]) -> None:
    """Their usage arrives later, in files or job objects the meter never reads: refused with a
    clear 403 for budget tokens, never forwarded."""
    _, token = fresh_token(broker, provider, "--budget-tokens", "1000", prefix="budget-batch")
    resp = call(broker, provider, token, method, path, body)
    assert_denied(resp, 403, "budget", "batch")
    assert not upstreams[provider].requests


def test_budget_tokens_may_use_responses_in_the_foreground(broker: Broker,
                                                           upstreams: Dict[str, FakeUpstream]) -> None:
    upstreams["openai"].set_responder(openai_answer(5, 5))
    _, token = fresh_token(broker, "openai", "--budget-tokens", "1000", prefix="budget-fg")
    body = b'{"model": "gpt-4o-mini", "input": "hi", "background": false}'
    assert call(broker, "openai", token, "POST", "/v1/responses", body).status == 200
    _, plain = fresh_token(broker, "openai", prefix="no-budget-batch")
    assert call(broker, "openai", plain, "POST", "/v1/batches", b'{"input_file_id": "f"}').status == 200


def test_openai_stream_budget_asks_for_usage(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """With --budget-tokens the broker adds stream_options.include_usage (also over an explicit
    false, which would otherwise make the budget unlimited), so each stream's last chunk carries
    usage, every request is charged, and the budget is never passed."""
    upstreams["openai"].set_responder(openai_answer(60, 40))
    for options in ({}, {"stream_options": {"include_usage": False}}):
        upstreams["openai"].requests.clear()
        agent, token = fresh_token(broker, "openai", "--budget-tokens", "500", prefix="budget-stream")
        body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [], **options}).encode()
        statuses = []
        for _ in range(8):
            resp = call(broker, "openai", token, "POST", "/v1/chat/completions", body)
            statuses.append(resp.status)
            if resp.status != 200:
                break
            assert b'"usage": {"prompt_tokens": 60' in resp.body
        assert statuses[-1] == 403 and statuses.count(200) >= 3, statuses
        reqs = upstreams["openai"].requests
        assert len(reqs) == statuses.count(200)
        for r in reqs:
            sent = json.loads(r.body or b"{}")
            assert sent["stream_options"]["include_usage"] is True
            assert sent["model"] == "gpt-4o-mini" and sent["messages"] == []
            assert r.header("Content-Length") == str(len(r.body or b""))
        rows = [x for x in audit_json(broker, "--agent", agent) if x["outcome"] == "ok"]
        spent = sum(x["tokens_in"] + x["tokens_out"] for x in rows)
        assert token_row(broker, agent)["TOKENS"] == str(spent) and spent <= 500


def test_budget_counts_a_stream_the_agent_abandons(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Anthropic reports the input tokens in message_start, the first event. An agent that reads
    that event and hangs up has still spent them (the provider bills the prompt): the broker saw
    them go past and must count them, or hanging up early makes any budget unlimited."""
    tin, tout = 80, 40
    events = [
        sse({"type": "message_start", "message": {
            "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": tin, "output_tokens": 1}}}, "message_start"),
        *[sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word "}},
              "content_block_delta") for _ in range(6)],
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": tout}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    hung_up = threading.Event()

    def stream() -> Iterator[bytes]:
        yield events[0]
        hung_up.wait(15)          # the rest only once the agent has hung up: it leaves mid-stream
        yield from events[1:]
    upstreams["anthropic"].set_responder(key_checked("anthropic", lambda h, req: h.send_sse(stream(), 0.05)))
    body = json.dumps({"model": "claude-3-5-haiku-20241022", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    budget = len(body) + 64 + 64          # exactly one request's bound: the input, then 64 out
    agent, token = fresh_token(broker, "anthropic", "--budget-tokens", str(budget), prefix="budget-hangup")
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=15)
    try:
        send_request(conn, "POST", "/anthropic/v1/messages",
                     {**auth_headers("anthropic", token), "Content-Type": "application/json"}, body)
        resp = conn.getresponse()
        assert resp.status == 200
        assert b"message_start" in resp.read1(65536)
    finally:
        conn.close()   # hang up after the first event
        hung_up.set()
    assert wait_until(lambda: audit_json(broker, "--agent", agent), 15, interval=0.1), \
        "the abandoned request has no audit row"
    rows = audit_json(broker, "--agent", agent)
    assert len(rows) == 1, rows
    assert rows[0]["outcome"] == "error" and "mid-answer" in rows[0]["reason"], rows   # it left mid-stream
    assert rows[0]["tokens_in"] == tin, json.dumps(rows[0])
    assert int(token_row(broker, agent)["TOKENS"]) >= tin
    assert_denied(call(broker, "anthropic", token, "POST", "/v1/messages", body), 403, "budget")


def test_repeated_stream_key_under_a_budget_is_403(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """A repeated "stream" key could make the meter and the upstream read different answers."""
    _, token = fresh_token(broker, "openai", "--budget-tokens", "1000", prefix="budget-stream-twice")
    body = b'{"model":"gpt-4o","stream":true,"stream":false,"messages":[]}'
    resp = broker.request("POST", "/openai/v1/chat/completions/",
                          {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, body)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert upstreams["openai"].requests == []


def _big_embeddings_body(size: int = 9_000_000) -> bytes:
    body = json.dumps({"object": "list",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.0123456] * (size // 11)}],
                       "model": "text-embedding-3-small",
                       "usage": {"prompt_tokens": 5000, "total_tokens": 5000}}).encode()
    assert len(body) > 8 * 1024 * 1024 and body.rstrip(b"}").endswith(b'"total_tokens": 5000')
    return body


def test_budget_charged_from_tail_of_9mb_json_answer(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Usage at the end of a JSON answer over 8 MiB (embeddings) is still charged."""
    up = upstreams["openai"]
    big = _big_embeddings_body()
    up.set_responder(key_checked("openai", lambda h, req: h.send_bytes(200, big, content_type="application/json")))
    _, token = fresh_token(broker, "openai", "--budget-tokens", "200", prefix="budget-9mb")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = b'{"model":"text-embedding-3-small","input":"x"}'
    first = broker.request("POST", "/openai/v1/embeddings", headers, body, timeout=60)
    assert first.status == 200 and len(first.body) == len(big), (first.status, len(first.body))
    second = broker.request("POST", "/openai/v1/embeddings", headers, body, timeout=60)
    assert second.status == 403, (f"5000 tokens used of a 200 budget, second request got {second.status} "
                                  f"({len(second.body)} bytes)")
    assert len(up.requests) == 1, "the over-budget request reached the upstream"


def test_gemini_stream_generate_content_json_array_charges_budget(
        broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Usage in a JSON array answer (Gemini streamGenerateContent without alt=sse) is charged."""
    up = upstreams["gemini"]
    item = {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}],
            "usageMetadata": {"promptTokenCount": 4000, "candidatesTokenCount": 1000, "totalTokenCount": 5000},
            "modelVersion": "gemini-2.0-flash"}
    answer = json.dumps([item, item]).encode()
    up.set_responder(key_checked("gemini", lambda h, req: h.send_bytes(200, answer, content_type="application/json")))
    _, token = fresh_token(broker, "gemini", "--budget-tokens", "100", prefix="budget-array")
    headers = {"x-goog-api-key": token, "Content-Type": "application/json"}
    path = "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    first = broker.request("POST", path, headers, b'{"contents":[]}')
    assert first.status == 200 and first.body == answer, (first.status, first.body[:300])
    second = broker.request("POST", path, headers, b'{"contents":[]}')
    assert second.status == 403, f"usageMetadata in a JSON array not charged: second request got {second.status}"
    assert len(up.requests) == 1


# ============================================================================
# Limits under 50 concurrent requests
# ============================================================================


def test_max_requests_exact_under_50_concurrent(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "openai", "--max-requests", "10", prefix="maxreq-conc")
    marker = secrets.token_hex(4)
    statuses = run_concurrently(CONCURRENCY, lambda i: call(broker, "openai", token,
                                                            path=f"/v1/models?c={marker}&i={i}").status)
    assert sorted(statuses).count(200) == 10, sorted(statuses)
    assert sorted(statuses).count(403) == CONCURRENCY - 10, sorted(statuses)
    assert len(requests_marked(upstreams["openai"], marker)) == 10
    assert token_row(broker, agent)["REQUESTS"] == "10"
    assert call(broker, "openai", token).status == 403


def test_rate_exact_under_50_concurrent(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    _, token = fresh_token(broker, "openai", "--rate", "5/h", prefix="rate-conc")
    marker = secrets.token_hex(4)
    results = run_concurrently(CONCURRENCY, lambda i: call(broker, "openai", token,
                                                           path=f"/v1/models?c={marker}&i={i}"))
    statuses = sorted(r.status for r in results)
    assert statuses.count(200) == 5, statuses
    assert statuses.count(429) == CONCURRENCY - 5, statuses
    assert all(r.headers.get("Retry-After", "").isdigit() for r in results if r.status == 429)
    assert len(requests_marked(upstreams["openai"], marker)) == 5


@pytest.mark.parametrize("concurrency", [5, CONCURRENCY])
def test_budget_is_never_overspent_under_concurrency(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                     concurrency: int) -> None:
    """Budget 1000, answers of 60 in + up to 40 out, `concurrency` clients each looping until
    refused for good (403); a 429 (requests in flight hold the rest) is retried. Each request
    reserves its bound before it is forwarded and settles to its usage after: the spend never
    passes the budget, and stops within one request's bound of it."""
    budget = 1000
    upstreams["openai"].set_responder(openai_answer(60, 40))
    agent, token = fresh_token(broker, "openai", "--budget-tokens", str(budget), prefix=f"budget-conc{concurrency}")
    body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
    bound = len(body) + 64

    def client(i: int) -> Tuple[int, List[int]]:
        allowed, others = 0, []
        for _ in range(400):
            resp = call(broker, "openai", token, "POST", "/v1/chat/completions", body)
            if resp.status == 200:
                allowed += 1
            elif resp.status == 429:
                assert resp.headers.get("Retry-After") == "1"
                time.sleep(0.005)
            elif resp.status == 403:
                return allowed, others
            else:
                others.append(resp.status)
        raise AssertionError("never refused")

    results = run_concurrently(concurrency, client)
    allowed = sum(a for a, _ in results)
    assert not any(o for _, o in results), [o for _, o in results if o]
    rows = [x for x in audit_json(broker, "--agent", agent) if x["outcome"] == "ok"]
    spent = int(token_row(broker, agent)["TOKENS"])
    assert spent == sum(x["tokens_in"] + x["tokens_out"] for x in rows) and len(rows) == allowed
    assert budget - bound < spent <= budget, (spent, allowed)
    assert len(upstreams["openai"].requests) == allowed
    after = run_concurrently(10, lambda i: call(broker, "openai", token, "POST", "/v1/chat/completions",
                                                body).status)
    assert after == [403] * 10
    [u] = usage_json(broker, "--agent", agent)
    assert (u["requests"], u["tokens"]) == (allowed, spent)


# ============================================================================
# Usage metered from real-shaped answers, streaming and not
# ============================================================================

USAGE_CASES = {
    # name: (provider, path, request body, responder, model, tokens_in, tokens_out)
    "openai-json": ("openai", "/v1/chat/completions",
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    openai_answer(12, 7), "gpt-4o-mini", 12, 7),
    "openai-sse": ("openai", "/v1/chat/completions",
                   {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]},
                   openai_answer(13, 21), "gpt-4o-mini", 13, 21),
    "openai-json-100k-chunked": ("openai", "/v1/chat/completions",
                                 {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "long"}]},
                                 openai_answer(15, 30000, content="z" * 100_000, piece=4096), "gpt-4o-mini",
                                 15, 30000),
    "groq-json": ("groq", "/openai/v1/chat/completions",
                  {"model": "llama-3.1-8b-instant", "messages": [{"role": "user", "content": "hi"}]},
                  openai_answer(31, 5, groq=True), "llama-3.1-8b-instant", 31, 5),
    "groq-sse-x_groq": ("groq", "/openai/v1/chat/completions",
                        {"model": "llama-3.1-8b-instant", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]},
                        openai_answer(17, 44, groq=True), "llama-3.1-8b-instant", 17, 44),
    "anthropic-json": ("anthropic", "/v1/messages",
                       {"model": "claude-3-5-haiku-20241022", "max_tokens": 64,
                        "messages": [{"role": "user", "content": "hi"}]},
                       anthropic_answer(25, 9), "claude-3-5-haiku-20241022", 25, 9),
    "anthropic-sse": ("anthropic", "/v1/messages",
                      {"model": "claude-3-5-haiku-20241022", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]},
                      anthropic_answer(25, 15), "claude-3-5-haiku-20241022", 25, 15),
    "anthropic-sse-split-mid-line": ("anthropic", "/v1/messages",
                                     {"model": "claude-3-5-haiku-20241022", "max_tokens": 64, "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]},
                                     anthropic_answer(31, 17, piece=7), "claude-3-5-haiku-20241022", 31, 17),
    "gemini-json": ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent",
                    {"contents": [{"parts": [{"text": "hi"}]}]},
                    gemini_answer(8, 5, thoughts=20), "gemini-2.5-flash", 8, 25),
    "gemini-sse": ("gemini", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                   {"contents": [{"parts": [{"text": "hi"}]}]},
                   gemini_answer(9, 12), "gemini-2.0-flash", 9, 12),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_counted_from_real_shaped_answers(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                case: str) -> None:
    provider, path, body, responder, model, tin, tout = USAGE_CASES[case]
    upstreams[provider].set_responder(responder)
    agent, token = fresh_token(broker, provider, prefix=f"usage-{case}")
    raw = json.dumps(body).encode()
    for _ in range(2):
        resp = read_through(broker, provider, token, "POST", path, raw)
        if "-sse" in case:
            assert resp.headers.get("Content-Type", "").startswith("text/event-stream")
    assert len(upstreams[provider].requests) == 2
    assert usage_json(broker, "--agent", agent) == [{
        "agent": agent, "provider": provider, "model": model, "requests": 2,
        "tokens_in": 2 * tin, "tokens_out": 2 * tout, "tokens": 2 * (tin + tout), "unmetered": 0}]
    row = token_row(broker, agent)
    assert (row["REQUESTS"], row["TOKENS"]) == ("2", str(2 * (tin + tout)))


def test_usage_groups_by_agent_provider_and_model(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    upstreams["openai"].set_responder(openai_answer(10, 2))
    upstreams["anthropic"].set_responder(anthropic_answer(7, 3))
    agent = fresh_agent("usage-mix")
    other = fresh_agent("usage-other")
    t_openai = broker.mint("openai", agent)
    t_anthropic = broker.mint("anthropic", agent)
    t_other = broker.mint("openai", other)
    for model, n in (("gpt-4o-mini", 3), ("gpt-4.1", 1)):
        for _ in range(n):
            read_through(broker, "openai", t_openai, "POST", "/v1/chat/completions",
                         json.dumps({"model": model, "messages": []}).encode())
    read_through(broker, "anthropic", t_anthropic, "POST", "/v1/messages",
                 json.dumps({"model": "claude-sonnet-4-20250514", "max_tokens": 8, "messages": []}).encode())
    read_through(broker, "openai", t_other, "POST", "/v1/chat/completions",
                 json.dumps({"model": "gpt-4o-mini", "messages": []}).encode())
    # a request with no LLM answer (GET /v1/models) counts as a request with no tokens
    upstreams["openai"].reset()
    assert call(broker, "openai", t_openai).status == 200
    # a refused request is not usage (anthropic token on the openai route: 403)
    assert call(broker, "openai", t_anthropic).status == 403

    got = usage_json(broker, "--agent", agent)
    key = lambda u: (u["provider"], u["model"] or "")  # noqa: E731
    assert sorted(got, key=key) == sorted([
        {"agent": agent, "provider": "anthropic", "model": "claude-sonnet-4-20250514", "requests": 1,
         "tokens_in": 7, "tokens_out": 3, "tokens": 10, "unmetered": 0},
        {"agent": agent, "provider": "openai", "model": None, "requests": 1,
         "tokens_in": 0, "tokens_out": 0, "tokens": 0, "unmetered": 0},
        {"agent": agent, "provider": "openai", "model": "gpt-4.1", "requests": 1,
         "tokens_in": 10, "tokens_out": 2, "tokens": 12, "unmetered": 0},
        {"agent": agent, "provider": "openai", "model": "gpt-4o-mini", "requests": 3,
         "tokens_in": 30, "tokens_out": 6, "tokens": 36, "unmetered": 0},
    ], key=key)
    assert usage_json(broker, "--agent", other) == [
        {"agent": other, "provider": "openai", "model": "gpt-4o-mini", "requests": 1,
         "tokens_in": 10, "tokens_out": 2, "tokens": 12, "unmetered": 0}]
    assert usage_json(broker, "--agent", agent, "--since", "1h") == got
    assert usage_json(broker, "--agent", agent, "--since", "2999-01-01") == []

    table = ok(broker.cli("usage", "--agent", agent))
    rows = parse_table(table)
    assert [r["AGENT"] for r in rows] == [agent] * 4
    mini = [r for r in rows if r["MODEL"] == "gpt-4o-mini"][0]
    assert (mini["REQUESTS"], mini["TOKENS IN"], mini["TOKENS OUT"], mini["TOTAL"]) == ("3", "30", "6", "36")
    # token list: per token
    tokens = {r["PROVIDER"]: r for r in parse_table(ok(broker.cli("token", "list"))) if r["AGENT"] == agent}
    assert (tokens["openai"]["REQUESTS"], tokens["openai"]["TOKENS"]) == ("5", "48")
    assert (tokens["anthropic"]["REQUESTS"], tokens["anthropic"]["TOKENS"]) == ("1", "10")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_budget_holds_across_workers_and_a_second_broker(procs: Brokers, upstreams: Dict[str, FakeUpstream],
                                                         stream: bool) -> None:
    """50 concurrent clients of one budget token, spread over `serve --workers 2` and a second
    broker on the same database: reservations live in the database, so the spend the upstream
    reports (summed from the audit rows) never passes the budget, and stops within one
    request's bound of it."""
    budget = 2000
    upstreams["openai"].set_responder(openai_answer(60, 40))
    base = procs.seed(("openai",), upstream_urls={"openai": upstreams["openai"].url})
    ports = [procs.serve(base, "--workers", "2", name="budget-workers").port, procs.serve(base, name="budget-second").port]
    agent, token = fresh_token(base, "openai", "--budget-tokens", str(budget), prefix=f"budget-multi-{stream}")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": stream}).encode()
    bound = len(body) + 64
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client(i: int) -> int:
        allowed = 0
        for n in range(400):
            port = ports[(i + n) % 2]
            resp = http_request(f"http://127.0.0.1:{port}/openai/v1/chat/completions", "POST", headers, body)
            if resp.status == 200:
                allowed += 1
            elif resp.status == 429:
                time.sleep(0.005)
            elif resp.status == 403:
                return allowed
            else:
                raise AssertionError((resp.status, resp.body[:200]))
        raise AssertionError("never refused")

    allowed = sum(run_concurrently(CONCURRENCY, client))
    rows = [x for x in audit_json(base, "--agent", agent) if x["outcome"] == "ok"]
    spent = sum(x["tokens_in"] + x["tokens_out"] for x in rows)
    assert len(rows) == allowed == len(upstreams["openai"].requests)
    assert budget - bound < spent <= budget, (spent, allowed)
    assert token_row(base, agent)["TOKENS"] == str(spent)


def test_a_crashed_brokers_reservation_is_settled_at_its_bound(procs: Brokers, upstreams: Dict[str, FakeUpstream]) -> None:
    """A budget request in flight when its broker is killed (SIGKILL): its reservation stays in
    the database, and the next broker on it settles it at its whole bound: the budget counts it
    as spent (the upstream may have billed it), nothing is released, the token is exhausted."""
    import sqlite3
    import threading
    hang = hanging_upstream("openai")
    try:
        base = procs.seed(("openai",), upstream_urls={"openai": hang.url})
        first = procs.serve(base, name="crash-first")
        agent, token = fresh_token(base, "openai", "--budget-tokens", "1000", prefix="budget-crash")
        body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
        errors: List[BaseException] = []

        def in_flight() -> None:
            try:
                call(first, "openai", token, "POST", "/v1/chat/completions", body)
            except BaseException as exc:   # noqa: BLE001 - the broker dies under it
                errors.append(exc)
        thread = threading.Thread(target=in_flight, daemon=True)
        thread.start()

        def held() -> List[Tuple[int, str]]:
            con = sqlite3.connect(str(base.db))
            try:
                return con.execute("SELECT amount, owner FROM reservations").fetchall()
            finally:
                con.close()
        assert wait_until(lambda: held(), 10), "no reservation while the request is in flight"
        [(amount, owner)] = held()
        assert amount == 1000 and owner.endswith(f":{first.pid}")
        first.kill()
        thread.join(10)
        second = procs.serve(base, env=broker_env({"openai": upstreams["openai"].url}), name="crash-second")
        refused = call(second, "openai", token, "POST", "/v1/chat/completions", body)
        assert_denied(refused, 403, "budget")
        assert held() == []
        assert token_row(base, agent)["TOKENS"] == "1000"
        assert upstreams["openai"].requests == []
    finally:
        hang.stop()


@pytest.mark.parametrize("answer", [{"response": "hi there", "model": "llama3"}, {"x_groq": "id-1", "usage": None},
                                    {"response": ["a"], "x_groq": 7}], ids=["ollama-native", "x_groq-text", "lists"])
def test_the_meter_passes_answers_of_other_shapes_untouched(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                            answer: Dict[str, object]) -> None:
    """An OpenAI-style route whose answer is shaped otherwise (Ollama's native `response` text,
    a non-object `x_groq`) is relayed as sent, with or without a budget; the meter finds no usage."""
    upstreams["openai"].set_responder(key_checked("openai", lambda h, req: h.send_json(200, answer)))
    for flags in ((), ("--budget-tokens", "1000")):
        _, token = fresh_token(broker, "openai", *flags, prefix="other-shape")
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
        resp = call(broker, "openai", token, "POST", "/v1/chat/completions", body)
        assert resp.status == 200 and json.loads(resp.body) == answer, (flags, resp.status, resp.body[:200])
