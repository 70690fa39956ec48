"""Every provider through a real broker: security first, then the happy path and header handling.

The fake upstreams check the real key themselves (401 otherwise) and record each request, so every
assertion below is about what really crossed the wire.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from conftest import (
    PROVIDERS, REAL_KEYS, Broker, FakeUpstream, Response, assert_no_traffic, assert_token_absent,
    auth_headers, error_type_and_message, key_check_failure, send_request, unknown_token,
)


# ============================================================================
# Per-provider calls, shaped like the official clients' requests
# ============================================================================


@dataclass
class Call:
    """A client request. `{T}` in path is replaced by the token; `{K}` in upstream by the real key."""
    name: str
    method: str
    path: str                 # broker path, without the /<provider> prefix
    upstream: str             # raw target the upstream must receive
    headers: Dict[str, str] = field(default_factory=dict)
    body: Optional[bytes] = None
    token_headers: Optional[Dict[str, str]] = None   # overrides auth_headers(provider, T)
    compare_query_parsed: bool = False                # the broker may rewrite the query (gemini ?key=)


JSON = {"Content-Type": "application/json"}

CALLS: Dict[str, List[Call]] = {
    "openai": [
        Call("chat", "POST", "/v1/chat/completions?stream=false", "/v1/chat/completions?stream=false",
             {**JSON, "OpenAI-Beta": "assistants=v2", "OpenAI-Organization": "org-test"},
             b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}'),
        Call("models", "GET", "/v1/models", "/v1/models"),
    ],
    "anthropic": [
        Call("messages", "POST", "/v1/messages", "/v1/messages",
             {**JSON, "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"},
             b'{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'),
        Call("oauth-bearer", "POST", "/v1/messages", "/v1/messages",
             {**JSON, "anthropic-version": "2023-06-01"}, b'{"model":"claude-test"}',
             token_headers={"Authorization": "Bearer {T}"}),
    ],
    "gemini": [
        Call("header", "POST", "/v1beta/models/gemini-2.0-flash:generateContent",
             "/v1beta/models/gemini-2.0-flash:generateContent", JSON,
             b'{"contents":[{"parts":[{"text":"hi"}]}]}'),
        Call("query-key", "GET", "/v1beta/models?key={T}&pageSize=5", "/v1beta/models?key={K}&pageSize=5",
             token_headers={}, compare_query_parsed=True),
    ],
    "groq": [
        Call("chat", "POST", "/openai/v1/chat/completions", "/openai/v1/chat/completions", JSON,
             b'{"model":"llama-test","messages":[]}'),
    ],
    "discord": [
        Call("me", "GET", "/api/v10/users/@me", "/api/v10/users/@me"),
        Call("message", "POST", "/api/v10/channels/123456789012345678/messages",
             "/api/v10/channels/123456789012345678/messages", JSON, b'{"content":"hello"}'),
    ],
    "telegram": [
        Call("getMe", "GET", "/bot{T}/getMe", "/bot{K}/getMe", token_headers={}),
        Call("sendMessage", "POST", "/bot{T}/sendMessage", "/bot{K}/sendMessage", JSON,
             b'{"chat_id":42,"text":"hi"}', token_headers={}),
        Call("file", "GET", "/file/bot{T}/documents/f.pdf", "/file/bot{K}/documents/f.pdf", token_headers={}),
    ],
    "github": [
        Call("user", "GET", "/user", "/user",
             {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}),
        Call("token-style", "GET", "/repos/o/r/issues?state=open&per_page=2", "/repos/o/r/issues?state=open&per_page=2",
             {"Accept": "application/vnd.github+json"}, token_headers={"Authorization": "token {T}"}),
    ],
    "notion": [
        Call("search", "POST", "/v1/search", "/v1/search", {**JSON, "Notion-Version": "2022-06-28"},
             b'{"query":"x"}'),
    ],
    "cloudflare": [
        Call("verify", "GET", "/client/v4/user/tokens/verify", "/client/v4/user/tokens/verify"),
    ],
    "brave": [
        Call("search", "GET", "/res/v1/web/search?q=seks+broker&count=3", "/res/v1/web/search?q=seks+broker&count=3",
             {"Accept": "application/json"}),
    ],
}

ALL_CALLS = [(p, c) for p in PROVIDERS for c in CALLS[p]]


def client_headers(provider: str, call: Call, token: str) -> Dict[str, str]:
    th = call.token_headers if call.token_headers is not None else auth_headers(provider, "{T}")
    hs = {k: v.replace("{T}", token) for k, v in th.items()}
    hs.update(call.headers)
    return hs


def do_call(broker: Broker, provider: str, call: Call, token: str, prefix: Optional[str] = None,
            extra_headers: Optional[Dict[str, str]] = None) -> Response:
    route = prefix if prefix is not None else f"/{provider}"
    hs = client_headers(provider, call, token)
    hs.update(extra_headers or {})
    return broker.request(call.method, route + call.path.replace("{T}", token), hs, call.body)


def assert_no_real_key(resp: Response) -> None:
    text = resp.body.decode("latin-1") + "\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
    for p, k in REAL_KEYS.items():
        assert k not in text, f"real {p} key in broker answer"


def other_provider(provider: str) -> str:
    return PROVIDERS[(PROVIDERS.index(provider) + 1) % len(PROVIDERS)]


# ============================================================================
# Security first: no token, bad token, other provider's token, unknown provider
# ============================================================================


@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_token_is_401(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str) -> None:
    call = CALLS[provider][0]
    path = "/getMe" if provider == "telegram" else call.path
    resp = broker.request(call.method, f"/{provider}{path}", call.headers, call.body)
    assert resp.status == 401, (resp.status, resp.body[:300])
    error_type_and_message(resp)
    assert_no_real_key(resp)
    assert_no_traffic(upstreams, settle=0)


@pytest.mark.parametrize("kind", ["unknown_seks", "garbage", "real_key"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_wrong_token_is_401(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str, kind: str) -> None:
    bad = {"unknown_seks": unknown_token(provider), "garbage": "not-a-seks-token",
           "real_key": REAL_KEYS[provider]}[kind]
    resp = do_call(broker, provider, CALLS[provider][0], bad)
    assert resp.status == 401, (resp.status, resp.body[:300])
    error_type_and_message(resp)
    assert_no_real_key(resp)
    assert_no_traffic(upstreams, settle=0)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_token_of_another_provider_is_403(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str) -> None:
    foreign = broker.token(other_provider(provider))
    resp = do_call(broker, provider, CALLS[provider][0], foreign)
    assert resp.status == 403, (resp.status, resp.body[:300])
    error_type_and_message(resp)
    assert_no_real_key(resp)
    assert_no_traffic(upstreams, settle=0)


@pytest.mark.parametrize("prefix", ["/nosuchprovider", "/api/nosuchprovider"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_unknown_provider_is_404(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str,
                                 prefix: str) -> None:
    resp = do_call(broker, provider, CALLS[provider][0], broker.token(provider), prefix=prefix)
    assert resp.status == 404, (resp.status, resp.body[:300])
    _, message = error_type_and_message(resp)
    assert_no_real_key(resp)
    assert broker.token(provider) not in message
    assert_no_traffic(upstreams, settle=0)


# ============================================================================
# Happy path: the real key arrives in the provider's style, the fake token never does
# ============================================================================


def check_forwarded(upstreams: Dict[str, FakeUpstream], provider: str, call: Call, token: str,
                    resp: Response) -> None:
    up = upstreams[provider]
    assert resp.status == 200, (resp.status, resp.body[:300], up.requests and up.requests[-1].headers)
    req = up.only_request()
    for p, u in upstreams.items():
        assert p == provider or not u.requests, f"{p} upstream contacted too"
    key = REAL_KEYS[provider]
    assert key_check_failure(provider, key, req) is None, key_check_failure(provider, key, req)
    assert_token_absent(req, token)
    assert req.method == call.method
    expected = call.upstream.replace("{K}", key)
    if call.compare_query_parsed:
        assert req.path == expected.split("?")[0]
        assert req.query == urllib.parse.parse_qs(expected.split("?", 1)[1])
    else:
        assert req.target == expected
    assert req.body == (call.body or b"")
    for name, value in call.headers.items():
        assert req.header_all(name) == [value], (name, req.header_all(name))
    # the upstream's answer reaches the client
    data = resp.json()
    assert data["provider"] == provider
    if key in req.path:
        # the echo quotes the real key (telegram's is in the path): the client gets it masked, same length
        before, after = req.path.split(key, 1)
        assert data["path"].startswith(before) and data["path"].endswith(after)
        assert len(data["path"]) == len(req.path) and key not in data["path"]
    else:
        assert data["path"] == req.path
    assert resp.headers.get("X-Upstream") == provider
    assert_no_real_key(resp)


@pytest.mark.parametrize("provider,call", ALL_CALLS, ids=[f"{p}-{c.name}" for p, c in ALL_CALLS])
def test_real_key_injected_token_never_forwarded(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                 provider: str, call: Call) -> None:
    token = broker.token(provider)
    resp = do_call(broker, provider, call, token)
    check_forwarded(upstreams, provider, call, token, resp)


def test_gemini_query_key_not_duplicated_into_header(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """The key is injected where it arrived: a ?key= request does not also gain a header with a token."""
    call = CALLS["gemini"][1]
    resp = do_call(broker, "gemini", call, broker.token("gemini"))
    assert resp.status == 200
    req = upstreams["gemini"].only_request()
    assert req.header_all("x-goog-api-key") in ([], [REAL_KEYS["gemini"]])
    assert req.query.get("key") == [REAL_KEYS["gemini"]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_api_prefix_alias(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str) -> None:
    call = CALLS[provider][0]
    token = broker.token(provider)
    resp = do_call(broker, provider, call, token, prefix=f"/api/{provider}")
    check_forwarded(upstreams, provider, call, token, resp)


@pytest.mark.parametrize("prefix", ["/claude", "/api/claude"])
def test_claude_alias_of_anthropic(broker: Broker, upstreams: Dict[str, FakeUpstream], prefix: str) -> None:
    call = CALLS["anthropic"][0]
    token = broker.token("anthropic")
    resp = do_call(broker, "anthropic", call, token, prefix=prefix)
    check_forwarded(upstreams, "anthropic", call, token, resp)


# ============================================================================
# Headers: client headers pass unchanged, hop-by-hop ones do not, Host is the upstream's
# ============================================================================

PASS_THROUGH = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "prompt-caching-2024-07-31,tools-2024-04-04",
    "OpenAI-Beta": "assistants=v2",
    "Notion-Version": "2022-06-28",
    "User-Agent": "seks-test-client/1.0 (+loopback)",
    "X-Stainless-Lang": "python",
    "X-Custom-Header": "a b, c; d=e \"quoted\"",
    "Accept": "application/json",
    "Idempotency-Key": "idem-0123456789",
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_other_client_headers_pass_unchanged(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                             provider: str) -> None:
    call = CALLS[provider][0]
    resp = do_call(broker, provider, call, broker.token(provider), extra_headers=PASS_THROUGH)
    assert resp.status == 200, resp.body[:300]
    req = upstreams[provider].only_request()
    for name, value in PASS_THROUGH.items():
        assert req.header_all(name) == [value], (name, req.header_all(name))


HOP_BY_HOP = [
    ("Connection", "keep-alive, X-Foo"),
    ("X-Foo", "named-in-connection"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("X-Keep-Me", "end-to-end"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hop_by_hop_headers_not_forwarded(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                          provider: str) -> None:
    call = CALLS[provider][0]
    resp = do_call(broker, provider, call, broker.token(provider), extra_headers=dict(HOP_BY_HOP))
    assert resp.status == 200, resp.body[:300]
    req = upstreams[provider].only_request()
    names = req.header_names()
    for gone in ("x-foo", "keep-alive", "proxy-authorization", "proxy-connection", "te"):
        assert gone not in names, f"hop-by-hop header {gone!r} forwarded: {req.headers}"
    assert req.header_all("X-Keep-Me") == ["end-to-end"]
    for conn_value in req.header_all("Connection"):
        tokens = {t.strip().lower() for t in conn_value.split(",")}
        assert tokens <= {"close", "keep-alive"}, f"client's Connection header forwarded: {conn_value!r}"
    assert "named-in-connection" not in req.wire_text()
    assert "cHJveHk6c2VjcmV0" not in req.wire_text()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_host_is_the_upstreams(broker: Broker, upstreams: Dict[str, FakeUpstream], provider: str) -> None:
    call = CALLS[provider][0]
    resp = do_call(broker, provider, call, broker.token(provider))
    assert resp.status == 200
    req = upstreams[provider].only_request()
    assert req.header_all("Host") == [f"127.0.0.1:{upstreams[provider].port}"]


def test_foreign_host_header_cannot_redirect(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """A client Host header is either refused, or ignored: the request still goes to the configured upstream."""
    call = CALLS["openai"][0]
    resp = do_call(broker, "openai", call, broker.token("openai"),
                   extra_headers={"Host": f"127.0.0.1:{upstreams['anthropic'].port}"})
    others = {p: len(u.requests) for p, u in upstreams.items() if p != "openai" and u.requests}
    assert not others, others
    if resp.status == 200:
        req = upstreams["openai"].only_request()
        assert req.header_all("Host") == [f"127.0.0.1:{upstreams['openai'].port}"]
    else:
        assert 400 <= resp.status < 500 and not upstreams["openai"].requests


def test_upstream_response_headers_pass_through(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    def respond(h, req):  # type: ignore[no-untyped-def]
        h.send_bytes(201, b'{"id":"x"}', [("X-Request-Id", "req_123"), ("openai-processing-ms", "42"),
                                          ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")],
                     content_type="application/json")
    upstreams["openai"].set_responder(respond)
    resp = do_call(broker, "openai", CALLS["openai"][0], broker.token("openai"))
    assert resp.status == 201
    assert resp.body == b'{"id":"x"}'
    assert resp.headers.get("X-Request-Id") == "req_123"
    assert resp.headers.get("openai-processing-ms") == "42"
    assert resp.headers.get("Content-Type") == "application/json"
    assert sorted(resp.headers.get_all("Set-Cookie") or []) == ["a=1; Path=/", "b=2; Path=/"]


# ============================================================================
# Connections: SDKs reuse keep-alive connections
# ============================================================================


def test_keep_alive_connection_serves_several_requests(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    token = broker.token("openai")
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=15)
    try:
        statuses = []
        for hs in (auth_headers("openai", token), {}, auth_headers("openai", token)):
            send_request(conn, "POST", "/openai/v1/chat/completions", {**hs, **JSON}, b'{"n":1}')
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=15)
        assert statuses == [200, 401, 200]
        assert len(upstreams["openai"].requests) == 2
    finally:
        conn.close()


def test_error_bodies_are_json_with_content_type(broker: Broker) -> None:
    resp = broker.request("GET", "/openai/v1/models")
    assert resp.status == 401
    assert resp.headers.get("Content-Type", "").startswith("application/json")
    assert int(resp.headers.get("Content-Length", "-1")) == len(resp.body)
    json.loads(resp.body)


def test_healthz(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    resp = broker.request("GET", "/healthz")
    assert resp.status == 200
    assert resp.json() == {"status": "ok"}
    assert_no_traffic(upstreams, settle=0)
