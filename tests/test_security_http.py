"""Adversarial suite for issue 5, part 4: strict and bounded HTTP parsing, over raw sockets.

Every framing attack carries a valid token, so the broker's request parser (not the token check)
is what refuses it. For each refusal: the status, the connection closed right after the answer
(recv returns b''), no second answer (no request smuggled out of a body), and no complete request
at any upstream. Limits: 414 / 431 / 413 (answered before the body is sent), idle and slow
clients, the connection cap (503), dead and silent upstreams (502 / 504). Framing is checked
before any answer, even the broker's own (/healthz, 404); a refusal after `Expect:
100-continue` still arrives. A seeded fuzz loop mixes framing headers and malformed lines.

Client timeouts and the connection cap are shortened with the real `serve` flags
(--client-timeout, --header-timeout, --max-connections), so no test waits 60 s.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, assert_no_traffic,
    auth_headers, free_port, fresh_token, key_check_failure, requests_to, wait_until,
)
from raw_http import RawResponse, SocketReader, raw_exchange, read_response, request_bytes

CHAT = "/openai/v1/chat/completions"


def auth(broker: Broker, provider: str = "openai") -> List[Tuple[str, str]]:
    return list(auth_headers(provider, broker.token(provider)).items())


def assert_refused_and_closed(resp: RawResponse, statuses: Sequence[int], what: str) -> None:
    assert resp.status in statuses, f"{what}: expected {statuses}, got {resp!r}"
    assert resp.header("Content-Type") == "application/json", resp
    assert resp.closed, f"{what}: connection left open after {resp.status}"
    assert resp.extra == b"", f"{what}: bytes after the answer (a second response?): {resp.extra[:200]!r}"


# ============================================================================
# Content-Length / Transfer-Encoding: ambiguity is a 400 and a closed connection
# ============================================================================

SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

# (id, framing headers, body bytes, http version)
FRAMING_ATTACKS: List[Tuple[str, List[Tuple[str, str]], bytes, str]] = [
    ("cl-duplicate-same", [("Content-Length", "5"), ("Content-Length", "5")], b"hello", "HTTP/1.1"),
    ("cl-duplicate-conflict", [("Content-Length", "5"), ("Content-Length", str(5 + len(SMUGGLED)))],
     b"hello" + SMUGGLED, "HTTP/1.1"),
    ("cl-list", [("Content-Length", "5, 5")], b"hello", "HTTP/1.1"),
    ("cl-list-conflict", [("Content-Length", "5, 40")], b"hello", "HTTP/1.1"),
    ("cl-plus", [("Content-Length", "+5")], b"hello", "HTTP/1.1"),
    ("cl-negative", [("Content-Length", "-5")], b"hello", "HTTP/1.1"),
    ("cl-hex", [("Content-Length", "0x5")], b"hello", "HTTP/1.1"),
    ("cl-float", [("Content-Length", "5.0")], b"hello", "HTTP/1.1"),
    ("cl-exp", [("Content-Length", "5e0")], b"hello", "HTTP/1.1"),
    ("cl-empty", [("Content-Length", "")], b"", "HTTP/1.1"),
    ("cl-inner-space", [("Content-Length", "5 5")], b"hello", "HTTP/1.1"),
    ("cl-overflow", [("Content-Length", "9" * 30)], b"hello", "HTTP/1.1"),
    ("cl-unicode-digit", [("Content-Length", "\xb9")], b"h", "HTTP/1.1"),
    ("cl-then-te", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
     b"0\r\n\r\n" + SMUGGLED, "HTTP/1.1"),
    ("te-then-cl", [("Transfer-Encoding", "chunked"), ("Content-Length", "40")],
     b"0\r\n\r\n" + SMUGGLED, "HTTP/1.1"),
    ("cl-zero-and-te", [("Content-Length", "0"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n", "HTTP/1.1"),
    ("te-gzip-chunked", [("Transfer-Encoding", "gzip, chunked")], b"5\r\nhello\r\n0\r\n\r\n", "HTTP/1.1"),
    ("te-chunkedx", [("Transfer-Encoding", "chunkedx")], b"5\r\nhello\r\n0\r\n\r\n", "HTTP/1.1"),
    ("te-x-chunked", [("Transfer-Encoding", "x-chunked")], b"5\r\nhello\r\n0\r\n\r\n", "HTTP/1.1"),
    ("te-chunked-identity", [("Transfer-Encoding", "chunked, identity")], b"5\r\nhello\r\n0\r\n\r\n", "HTTP/1.1"),
    ("te-identity", [("Transfer-Encoding", "identity")], b"hello", "HTTP/1.1"),
    ("te-gzip", [("Transfer-Encoding", "gzip")], b"hello", "HTTP/1.1"),
    ("te-empty", [("Transfer-Encoding", "")], b"", "HTTP/1.1"),
    ("te-chunked-twice-list", [("Transfer-Encoding", "chunked, chunked")], b"0\r\n\r\n", "HTTP/1.1"),
    ("te-chunked-two-fields", [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
     b"0\r\n\r\n", "HTTP/1.1"),
    ("te-quoted", [("Transfer-Encoding", '"chunked"')], b"0\r\n\r\n", "HTTP/1.1"),
    ("te-params", [("Transfer-Encoding", "chunked;q=1")], b"0\r\n\r\n", "HTTP/1.1"),
    ("te-vertical-tab", [("Transfer-Encoding", "\x0bchunked")], b"0\r\n\r\n", "HTTP/1.1"),
    ("te-http10", [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n", "HTTP/1.0"),
]


def test_ambiguous_framing_is_400_and_closed(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Every FRAMING_ATTACKS case (one test, formerly one per case): 400 and closed, no
    traffic right after it, and still none 0.1 s after the last one (each had at least that long)."""
    for name, framing, body, version in FRAMING_ATTACKS:
        data = request_bytes("POST", CHAT, auth(broker) + [("Content-Type", "application/json")] + framing,
                             body, version=version)
        resp = raw_exchange(broker.port, data, close_wait=2.0)
        assert_refused_and_closed(resp, (400,), name)
        assert_no_traffic(upstreams, None, name, settle=0)
    assert_no_traffic(upstreams, None, "after every framing attack", settle=0.1)


# Malformed header lines: each one refused outright.
MALFORMED_HEADER_LINES = [
    ("obs-fold-te", b"Transfer-Encoding: identity\r\n chunked\r\n"),
    ("obs-fold-tab", b"X-A: 1\r\n\tcontinued\r\n"),
    ("space-before-colon-te", b"Transfer-Encoding : chunked\r\n"),
    ("space-before-colon-cl", b"Content-Length : 5\r\n"),
    ("tab-before-colon", b"Content-Length\t: 5\r\n"),
    ("no-colon", b"X-A 1\r\n"),
    ("empty-name", b": 1\r\n"),
    ("bare-lf-line", b"X-A: 1\nX-B: 2\r\n"),
    ("bare-cr-in-value", b"X-A: 1\rX-B: 2\r\n"),
    ("nul-in-value", b"X-A: a\x00b\r\n"),
    ("ctl-in-value", b"X-A: a\x01b\r\n"),
    ("del-in-value", b"X-A: a\x7fb\r\n"),
    ("non-token-name", b"X(A): 1\r\n"),
    ("utf8-name", b"X-\xc3\xa9: 1\r\n"),
]


def test_malformed_header_line_is_400_and_closed(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Every MALFORMED_HEADER_LINES case (one test, formerly one per case): 400 and closed, no
    traffic right after it, and still none 0.1 s after the last one (each had at least that long)."""
    head = request_bytes("POST", CHAT, auth(broker) + [("Content-Length", "5")])[:-2]
    for name, line in MALFORMED_HEADER_LINES:
        resp = raw_exchange(broker.port, head + line + b"\r\nhello", close_wait=2.0)
        assert_refused_and_closed(resp, (400,), name)
        assert_no_traffic(upstreams, None, name, settle=0)
    assert_no_traffic(upstreams, None, "after every malformed header line", settle=0.1)


MALFORMED_REQUEST_LINES = [
    ("lowercase-version", b"GET /healthz http/1.1\r\n"),
    ("http2", b"GET /healthz HTTP/2.0\r\n"),
    ("http09", b"GET /healthz\r\n"),
    ("double-space", b"GET  /healthz HTTP/1.1\r\n"),
    ("trailing-space", b"GET /healthz HTTP/1.1 \r\n"),
    ("bare-lf", b"GET /healthz HTTP/1.1\n"),
    ("method-with-slash", b"GE/T /healthz HTTP/1.1\r\n"),
    ("leading-space", b" GET /healthz HTTP/1.1\r\n"),
    ("nul-method", b"G\x00ET /healthz HTTP/1.1\r\n"),
    ("version-http11x", b"GET /healthz HTTP/1.11\r\n"),
]


@pytest.mark.parametrize("name,line", MALFORMED_REQUEST_LINES, ids=[m[0] for m in MALFORMED_REQUEST_LINES])
def test_malformed_request_line_is_400_and_closed(broker: Broker, name: str, line: bytes) -> None:
    resp = raw_exchange(broker.port, line + b"Host: x\r\n\r\n", close_wait=2.0)
    assert_refused_and_closed(resp, (400,), name)


# ============================================================================
# Chunked bodies: bad chunk sizes are a 400 and a closed connection
# ============================================================================

BAD_CHUNKED = [
    ("non-hex", b"zz\r\nhello\r\n0\r\n\r\n", (400,)),
    ("negative", b"-5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("plus-sign", b"+5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("inner-space", b"5 5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("empty-size", b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("huge-17-digits", b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("huge-64-bit", b"FFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n", (400, 413)),
    ("huge-many-digits", b"F" * 200 + b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("size-line-too-long", b"5;" + b"e" * 4000 + b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("bare-lf-size", b"5\nhello\r\n0\r\n\r\n", (400,)),
    ("missing-crlf-after-data", b"5\r\nhelloXX0\r\n\r\n", (400,)),
    ("lf-only-after-data", b"5\r\nhello\n0\r\n\r\n", (400,)),
    ("size-too-small", b"3\r\nhello\r\n0\r\n\r\n", (400,)),
    ("second-chunk-bad", b"5\r\nhello\r\nxyz\r\nabc\r\n0\r\n\r\n", (400,)),
    ("smuggle-after-bad-size", b"5\r\nhello\r\ng\r\n" + SMUGGLED, (400,)),
]


def test_bad_chunked_body_is_400_and_closed(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Every BAD_CHUNKED case (one test, formerly one per case): refused and closed, no traffic
    right after it, and still none 0.1 s after the last one (each had at least that long)."""
    for name, body, statuses in BAD_CHUNKED:
        data = request_bytes("POST", CHAT, auth(broker) + [("Content-Type", "application/json"),
                                                           ("Transfer-Encoding", "chunked")], body)
        resp = raw_exchange(broker.port, data, close_wait=2.0)
        assert_refused_and_closed(resp, statuses, name)
        assert_no_traffic(upstreams, None, name, settle=0)
    assert_no_traffic(upstreams, None, "after every bad chunked body", settle=0.1)


def test_good_chunked_body_with_extensions_and_trailers_is_forwarded(broker: Broker,
                                                                     upstreams: Dict[str, FakeUpstream]) -> None:
    """Positive control for the chunked parser: odd but valid framing reaches the upstream intact."""
    body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    data = request_bytes("POST", CHAT, auth(broker) + [("Transfer-Encoding", "Chunked")], body)
    resp = raw_exchange(broker.port, data)
    assert resp.status == 200, resp
    req = upstreams["openai"].only_request()
    assert req.body == b"hello0123456789"


# ============================================================================
# Smuggling: a body is never taken for the next request
# ============================================================================

SMUGGLE_CASES = [
    ("healthz-with-body", "GET", "/healthz", False),
    ("missing-token-401", "POST", CHAT, False),
    ("unknown-provider-404", "POST", "/nosuch/v1/x", True),
    ("wrong-provider-403", "POST", "/anthropic/v1/messages", True),
    ("bad-path-400", "POST", "/openai/v1/%2e%2e/x", True),
]


def test_unread_body_is_never_a_second_request(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Every SMUGGLE_CASES case (one test, formerly one per case): no second answer, no traffic
    right after it, and still none 0.1 s after the last one (each had at least that long)."""
    inner = request_bytes("GET", "/openai/v1/models", auth(broker))     # would be a 200 from upstream
    for name, method, path, with_token in SMUGGLE_CASES:
        hs = [("Authorization", f"Bearer {broker.token('openai')}")] if with_token else []
        hs.append(("Content-Length", str(len(inner))))
        resp = raw_exchange(broker.port, request_bytes(method, path, hs, inner), close_wait=1.5)
        assert resp.status != 0, (name, resp)
        assert resp.extra == b"", f"{name}: the body was answered as a request: {resp.extra[:300]!r}"
        assert_no_traffic(upstreams, None, name, settle=0)
    assert_no_traffic(upstreams, None, "after every unread body", settle=0.1)


def test_duplicate_content_length_is_refused_before_any_answer(broker: Broker,
                                                               upstreams: Dict[str, FakeUpstream]) -> None:
    """Framing is checked before any answer, even one the broker makes itself (/healthz, 404,
    400): a body behind two Content-Lengths is never run as a second request (one test, formerly
    one per target: no traffic right after each, and still none 0.2 s after the last one)."""
    inner = request_bytes("POST", CHAT, auth(broker) + [("Content-Type", "application/json"),
                                                        ("Content-Length", "2")]) + b"{}"
    for target in ("/healthz", "/nosuchprovider/x", "/openai/v1/a%zz"):
        data = request_bytes("GET", target, [("Content-Length", "0"), ("Content-Length", str(len(inner)))]) + inner
        resp = raw_exchange(broker.port, data, close_wait=0.5)
        assert resp.status == 400, (target, resp)
        assert resp.closed and resp.raw.count(b"HTTP/1.1 ") == 1, (target, resp.raw[-300:])
        assert_no_traffic(upstreams, None, f"{target}: the body ran as a second request", settle=0)
    assert_no_traffic(upstreams, None, "the body ran as a second request", settle=0.2)


def expect_continue(b: Broker, token: str, body: bytes) -> Tuple[bytes, RawResponse]:
    """POST with Expect: 100-continue; send the body only after the interim answer."""
    head = request_bytes("POST", CHAT, [
        ("Authorization", f"Bearer {token}"), ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))), ("Expect", "100-continue")])
    with socket.create_connection(("127.0.0.1", b.port), timeout=15) as sock:
        sock.sendall(head)
        reader = SocketReader(sock)
        interim = reader.head() or b""
        sock.sendall(body)
        return interim, read_response(sock, "POST", close_wait=None, reader=reader)


def chat_body(model: str = "gpt-4o") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_expect_continue_then_a_refusal_still_gets_its_answer(broker: Broker,
                                                              upstreams: Dict[str, FakeUpstream]) -> None:
    """After the interim 100 Continue, a refusal (here --models: 403) is still sent, not EOF."""
    _, token = fresh_token(broker, "openai", "--models", "gpt-4o-mini", prefix="expect")
    interim, resp = expect_continue(broker, token, chat_body("gpt-4o"))
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
    assert resp.status == 403, resp
    assert upstreams["openai"].requests == []


def test_expect_continue_then_success(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Positive control: after the interim 100 Continue the upstream's answer arrives."""
    upstreams["openai"].set_responder(lambda h, req: h.send_json(200, {"ok": True}))
    _, token = fresh_token(broker, "openai", prefix="expect-ok")
    interim, resp = expect_continue(broker, token, chat_body())
    assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
    assert resp.status == 200 and json.loads(resp.body) == {"ok": True}, resp


def test_keep_alive_works_so_closing_tests_mean_something(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Positive control: after a clean 200 and a body-less 401 the connection stays open; the
    'closed' assertions above would be vacuous if the broker closed every connection. Each answer
    but the last is followed by the next request on the same connection (a close would read as
    status 0); the last one is given 0.3 s to show a close."""
    requests = [request_bytes("GET", "/healthz"),
                request_bytes("GET", "/openai/v1/models", auth(broker)),
                request_bytes("GET", "/openai/v1/models"),          # 401, no body
                request_bytes("GET", "/healthz")]
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        rd = SocketReader(sock)
        for n, data in enumerate(requests, 1):
            sock.sendall(data)
            resp = read_response(sock, close_wait=0.3 if n == len(requests) else None, reader=rd)
            assert resp.status in (200, 401), resp
            assert not resp.closed, f"connection closed after {resp.status}: {resp!r}"


# ============================================================================
# Size limits: 414, 431, 413
# ============================================================================


def line_of_length(n: int) -> bytes:
    """A request line of exactly n bytes, CRLF included, to the openai upstream."""
    fixed = len(b"GET /openai/v1/ HTTP/1.1\r\n")
    return b"GET /openai/v1/" + b"a" * (n - fixed) + b" HTTP/1.1\r\n"


def test_request_line_over_8k_is_414_and_closed(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Each size (one test, formerly one per size): 414 and closed, no traffic right after it,
    and still none 0.1 s after the last one (each had at least that long)."""
    for size in (8 * 1024 + 1, 9000, 64 * 1024, 1024 * 1024):
        data = line_of_length(size) + b"Authorization: Bearer " + broker.token("openai").encode() + b"\r\n\r\n"
        resp = raw_exchange(broker.port, data, close_wait=2.0)
        assert_refused_and_closed(resp, (414,), f"request line {size}")
        assert_no_traffic(upstreams, None, f"414 for {size}", settle=0)
    assert_no_traffic(upstreams, None, "after every 414", settle=0.1)


def test_request_line_of_exactly_8k_is_accepted(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    line = line_of_length(8 * 1024)
    assert len(line) == 8192
    resp = raw_exchange(broker.port, line + b"Authorization: Bearer " + broker.token("openai").encode() + b"\r\n\r\n")
    assert resp.status == 200, resp
    assert len(upstreams["openai"].only_request().target) == 8192 - len(b"GET  HTTP/1.1\r\n") - len("/openai")


OVERSIZED_HEADERS: Dict[str, List[Tuple[str, str]]] = {
    "one-huge-header": [("X-Big", "b" * (33 * 1024))],
    "many-medium-headers": [(f"X-M{i}", "m" * 1000) for i in range(40)],
    "101-headers": [(f"X-N{i}", "n") for i in range(101)],
    "huge-name": [("X-" + "h" * (33 * 1024), "1")],
}


def test_headers_over_limit_are_431_and_closed(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Every OVERSIZED_HEADERS shape (one test, formerly one per shape): 431 and closed, no
    traffic right after it, and still none 0.1 s after the last one (each had at least that long)."""
    for shape, extra in OVERSIZED_HEADERS.items():
        resp = raw_exchange(broker.port, request_bytes("GET", "/openai/v1/models", auth(broker) + extra),
                            close_wait=2.0)
        assert_refused_and_closed(resp, (431,), shape)
        assert_no_traffic(upstreams, None, shape, settle=0)
    assert_no_traffic(upstreams, None, "after every 431", settle=0.1)


def test_headers_just_under_limits_are_accepted(broker: Broker) -> None:
    """Positive controls at the edges: ~31 KiB of headers, and 100 header fields ('more' -> 431)."""
    resp = raw_exchange(broker.port, request_bytes("GET", "/healthz", [("X-Big", "b" * (31 * 1024))]))
    assert resp.status == 200, resp
    hundred = [(f"X-N{i}", "n") for i in range(99)]       # + Host = 100 header fields
    resp = raw_exchange(broker.port, request_bytes("GET", "/healthz", hundred))
    assert resp.status == 200, f"exactly 100 header fields refused: {resp!r}"


@pytest.fixture(scope="module")
def small_body_broker(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    return broker_factory({"openai": upstreams["openai"].url}, providers=("openai",),
                          serve_args=("--max-body", "1000"))


def test_body_over_max_body_is_413_before_the_body_is_sent(small_body_broker: Broker,
                                                           upstreams: Dict[str, FakeUpstream]) -> None:
    """Each length, with and without Expect: 100-continue (one test, formerly one per case): 413
    with no body byte sent, and closed; no traffic right after it, and still none 0.1 s after
    the last one (each had at least that long)."""
    for length in (1001, 1_000_000, 10 ** 17):
        for expect in (False, True):
            what = f"Content-Length {length}" + (" with Expect: 100-continue" if expect else "")
            hs = auth(small_body_broker) + [("Content-Type", "application/json"), ("Content-Length", str(length))]
            if expect:
                hs.append(("Expect", "100-continue"))
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", small_body_broker.port), timeout=5) as sock:
                sock.sendall(request_bytes("POST", CHAT, hs))          # headers only; no body byte sent
                resp = read_response(sock, "POST", close_wait=2.0)
            assert resp.status == 413, f"{what}: no 413 before the body: {resp!r}"
            assert time.monotonic() - t0 < 4, what
            assert resp.interim == [], f"{what}: sent {resp.interim} before refusing the body"
            assert resp.closed, f"{what}: connection left open after 413"
            assert_no_traffic(upstreams, None, what, settle=0)
    assert_no_traffic(upstreams, None, "after every 413", settle=0.1)


def test_body_at_max_body_is_accepted(small_body_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    resp = small_body_broker.request("POST", CHAT, auth_headers("openai", small_body_broker.token("openai")),
                                     b"x" * 1000)
    assert resp.status == 200
    assert upstreams["openai"].only_request().body_len == 1000


def test_chunked_body_over_max_body_is_413(small_body_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    body = b"258\r\n" + b"a" * 600 + b"\r\n258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n"
    data = request_bytes("POST", CHAT, auth(small_body_broker) + [("Transfer-Encoding", "chunked")], body)
    resp = raw_exchange(small_body_broker.port, data, close_wait=2.0)
    assert_refused_and_closed(resp, (413,), "chunked over max-body")
    assert_no_traffic(upstreams, None, "chunked 413", settle=0.1)


# ============================================================================
# Slow and idle clients, connection cap (limits shortened with serve flags)
# ============================================================================

SHORT_CLIENT_TIMEOUT = 0.5
SHORT_HEADER_TIMEOUT = 1.0
SHORT_MAX_CONNECTIONS = 4
DRIP_EVERY = 0.1        # a dripping client's gap between bytes: 5x under the per-read (client) timeout


@pytest.fixture(scope="module")
def patched_broker(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    """A broker with its client limits shortened through the real serve flags."""
    return broker_factory({"openai": upstreams["openai"].url}, providers=("openai",),
                          serve_args=("--client-timeout", f"{SHORT_CLIENT_TIMEOUT}s",
                                      "--header-timeout", f"{SHORT_HEADER_TIMEOUT}s",
                                      "--max-connections", str(SHORT_MAX_CONNECTIONS)))


def seconds_until_closed(sock: socket.socket, limit: float, drip: Optional[bytes] = None,
                         every: float = 0.3) -> Optional[float]:
    """Wait (dripping `drip` one byte at a time every `every` s) until the broker closes the
    connection; return the elapsed seconds, or None if it is still open after `limit`."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < limit:
        sock.settimeout(every)
        try:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - t0
            # an error answer (408/400) before closing is fine; keep reading until the close
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        if drip is not None:
            try:
                sock.sendall(drip[i % len(drip):i % len(drip) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0
            i += 1
    return None


def test_idle_connection_is_closed(patched_broker: Broker) -> None:
    with socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5) as sock:
        took = seconds_until_closed(sock, 8)
    assert took is not None and took < SHORT_CLIENT_TIMEOUT + 3, f"idle connection not closed ({took})"


def test_partial_request_line_then_silence_is_closed(patched_broker: Broker) -> None:
    with socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5) as sock:
        sock.sendall(b"GET /openai/v1/mod")
        took = seconds_until_closed(sock, 8)
    assert took is not None and took < SHORT_CLIENT_TIMEOUT + 3, f"stalled request line not closed ({took})"


def test_stalled_body_is_closed_and_nothing_forwarded(patched_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    with socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5) as sock:
        sock.sendall(request_bytes("POST", CHAT, auth(patched_broker) + [("Content-Length", "100")], b"0123456789"))
        took = seconds_until_closed(sock, 8)
    assert took is not None and took < SHORT_CLIENT_TIMEOUT + 3, f"stalled body not closed ({took})"
    assert_no_traffic(upstreams, None, "stalled body", settle=0.1)


def test_idle_keep_alive_connection_is_closed(patched_broker: Broker) -> None:
    with socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5) as sock:
        sock.sendall(request_bytes("GET", "/healthz"))
        rd = SocketReader(sock)
        resp = read_response(sock, close_wait=0.1, reader=rd)
        assert resp.status == 200
        took = seconds_until_closed(sock, 8)
    assert took is not None and took < SHORT_CLIENT_TIMEOUT + 3, f"idle keep-alive connection not closed ({took})"


def test_slowloris_head_dripped_under_the_read_timeout_is_cut(patched_broker: Broker) -> None:
    """One byte every DRIP_EVERY (0.1 s) never trips the 0.5 s per-read timeout; HEADER_TIMEOUT_S
    ('whole request head must arrive within this', here 1 s) must still end it."""
    head = request_bytes("GET", "/openai/v1/models", [("X-Pad", "p" * 200)])
    with socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5) as sock:
        took = seconds_until_closed(sock, SHORT_HEADER_TIMEOUT + 6, drip=head[:-4], every=DRIP_EVERY)
    assert took is not None, (f"a client dripping its head one byte per {DRIP_EVERY} s was still connected after "
                              f"{SHORT_HEADER_TIMEOUT + 6:.0f} s (HEADER_TIMEOUT_S={SHORT_HEADER_TIMEOUT})")
    assert took < SHORT_HEADER_TIMEOUT + 3, took


@pytest.mark.parametrize("size", [100, 300_000], ids=["inline", "streamed"])
def test_body_dripped_under_the_read_timeout_is_cut(patched_broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                    size: int) -> None:
    """One body byte every DRIP_EVERY (0.1 s) never trips the 0.5 s per-read timeout; the minimum
    body rate (1 KiB/s on average once the body has taken longer than the client timeout) cuts it
    with 408, so one slow agent cannot hold a connection slot for ever."""
    with socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5) as sock:
        sock.sendall(request_bytes("POST", CHAT, auth(patched_broker) + [("Content-Length", str(size))]))
        t0 = time.monotonic()
        got = b""
        while time.monotonic() - t0 < 8:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(DRIP_EVERY)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        took = time.monotonic() - t0
    assert took < SHORT_CLIENT_TIMEOUT + 3, f"a dripped body held the connection for {took:.1f} s"
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    if size == 100:
        assert_no_traffic(upstreams, None, "dripped body", settle=0.1)


@pytest.fixture(scope="module")
def capped_broker(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    """A broker with few connections and long client timeouts: the held connections below
    must stay held however slow the machine is (with the short timeouts they could be cut
    before the extra connection arrives, freeing a slot). Its admin port's /metrics tells
    how many connections it holds."""
    return broker_factory({"openai": upstreams["openai"].url}, providers=("openai",),
                          serve_args=("--client-timeout", "60s", "--header-timeout", "60s",
                                      "--max-connections", str(SHORT_MAX_CONNECTIONS), "--admin-port", "0"))


def open_connections(b: Broker) -> int:
    """seks_open_connections, from the broker's /metrics."""
    m = re.search(rb"^seks_open_connections (\d+)$", b.admin_get("/metrics").body, re.M)
    assert m, "no seks_open_connections in /metrics"
    return int(m.group(1))


def test_connection_cap_answers_503_and_recovers(capped_broker: Broker) -> None:
    patched_broker = capped_broker
    held: List[socket.socket] = []
    try:
        for _ in range(SHORT_MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", patched_broker.port), timeout=5)
            s.sendall(b"GET /heal")          # an unfinished request keeps the handler busy
            held.append(s)
        assert wait_until(lambda: open_connections(patched_broker) == SHORT_MAX_CONNECTIONS, 5), \
            f"the broker holds {open_connections(patched_broker)} connections, not {SHORT_MAX_CONNECTIONS}"
        resp = raw_exchange(patched_broker.port, request_bytes("GET", "/healthz"), close_wait=2.0)
        assert resp.status == 503, f"connection {SHORT_MAX_CONNECTIONS + 1} not refused: {resp!r}"
        assert resp.closed
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: raw_exchange(patched_broker.port, request_bytes("GET", "/healthz")).status == 200, 5), \
        "the broker did not recover after the held connections closed"


# ============================================================================
# Broken upstreams: refused -> 502, silent -> 504, stalled body -> cut; keys stay out of logs
# ============================================================================


@pytest.fixture(scope="module")
def stalling_upstream() -> Iterator[FakeUpstream]:
    """Answers 200 with headers and a first piece of body, then goes silent."""
    up = FakeUpstream("groq")

    def stall(h: UpstreamHandler, req: RecordedRequest) -> None:
        h.send_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        h.wfile.write(b"f\r\ndata: started\n\n\r\n")          # one 15-byte chunk
        h.wfile.flush()
        up.release.wait(30)
        h.close_connection = True

    up.set_responder(stall)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def blackhole_upstream() -> Iterator[str]:
    """A port whose accept queue is full: a connect to it hangs (SYNs are dropped)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect(("127.0.0.1", port))
            fillers.append(c)
        except OSError:
            c.close()
            break
    yield f"http://127.0.0.1:{port}"
    for c in fillers:
        c.close()
    srv.close()


@pytest.fixture(scope="module")
def broken_upstream_broker(broker_factory: Brokers, silent_upstream: FakeUpstream,
                           stalling_upstream: FakeUpstream, blackhole_upstream: str) -> Broker:
    dead = f"http://127.0.0.1:{free_port()}"
    return broker_factory({"openai": dead, "telegram": dead, "anthropic": silent_upstream.url,
                           "gemini": silent_upstream.url, "groq": stalling_upstream.url,
                           "brave": blackhole_upstream},
                          extra_env={"SEKS_UPSTREAM_TIMEOUT": "0.3"},
                          providers=("openai", "telegram", "anthropic", "gemini", "groq", "brave"),
                          serve_args=("--connect-timeout", "0.3s"))


@pytest.mark.parametrize("provider,status", [("openai", 502), ("telegram", 502), ("anthropic", 504), ("gemini", 504),
                                             ("brave", 504)])
def test_dead_or_silent_upstream(broken_upstream_broker: Broker, provider: str, status: int) -> None:
    b = broken_upstream_broker
    t = b.token(provider)
    path = f"/telegram/bot{t}/getMe" if provider == "telegram" else f"/{provider}/v1/x"
    hs = auth(b, provider) if provider != "telegram" else []
    t0 = time.monotonic()
    resp = raw_exchange(b.port, request_bytes("POST", path, hs + [("Content-Length", "2")], b"{}"), timeout=15)
    assert resp.status == status, resp
    assert time.monotonic() - t0 < 6
    text = resp.text()
    log = b.wait_for_log(lambda text: f"provider={provider} " in text)    # written after the answer
    key = REAL_KEYS[provider]
    for where, s in (("answer", text), ("broker log", log)):
        assert key not in s and key.replace(":", "%3A") not in s, f"{provider} key in {where}"
        assert t not in s, f"full {provider} token in {where}"
    assert raw_exchange(b.port, request_bytes("GET", "/healthz")).status == 200


def test_upstream_stalling_mid_body_is_cut(broken_upstream_broker: Broker) -> None:
    b = broken_upstream_broker
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", b.port), timeout=15) as sock:
        sock.sendall(request_bytes("POST", "/groq/openai/v1/chat/completions", auth(b, "groq") +
                                   [("Content-Length", "2")], b"{}"))
        rd = SocketReader(sock)
        sock.settimeout(10)
        try:
            rd.rest()
        except socket.timeout:
            raise AssertionError(f"the broker kept the client hanging on a silent upstream: {rd.raw!r}")
        got = rd.raw
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert b"data: started" in got
    assert not got.endswith(b"0\r\n\r\n"), "a cut stream must not look complete to the client"
    assert time.monotonic() - t0 < 8


# ============================================================================
# Seeded fuzz over framing headers and header lines
# ============================================================================

FUZZ_SEED = 1234
FUZZ_CASES = 250

ANY_FRAMING_REFUSING = ["obs-fold", "space-colon", "bare-lf", "ctl-value", "no-colon"]
REFUSING_MUTATIONS = {
    "cl": ["dup-cl", "conflict-cl", "bad-cl"] + ANY_FRAMING_REFUSING,
    "chunked": ["cl-te", "bad-te", "te-http10", "te-twice"] + ANY_FRAMING_REFUSING,
}
ANY_FRAMING_BENIGN = ["value-ws", "extra-headers", "expect", "conn-keep-alive"]
BENIGN_MUTATIONS = {
    "cl": ["cl-zeros"] + ANY_FRAMING_BENIGN,
    "chunked": ["te-case", "chunk-ext", "trailers", "tiny-chunks"] + ANY_FRAMING_BENIGN,
}


def fuzz_request(rng: random.Random, token_line: bytes) -> Tuple[bytes, bool, bytes, List[str]]:
    """(request bytes, must_refuse, intended body, mutations)."""
    body = rng.choice([b"hello", b"x" * rng.randint(1, 3000), SMUGGLED, b'{"model":"m"}', b""])
    framing = "chunked" if rng.random() < 0.5 else "cl"
    muts = rng.sample(REFUSING_MUTATIONS[framing], k=1) if rng.random() < 0.5 else []
    muts += rng.sample(BENIGN_MUTATIONS[framing], k=rng.randint(0, 3))
    version = b"HTTP/1.0" if "te-http10" in muts else b"HTTP/1.1"
    lines = [b"POST " + CHAT.encode() + b" " + version, b"Host: broker", token_line]
    te_word = b"chunked"
    if "te-case" in muts:
        te_word = rng.choice([b"Chunked", b"CHUNKED", b"cHuNkEd"])
    ws = (lambda v: b" \t " + v + b" \t") if "value-ws" in muts else (lambda v: v)
    if framing == "chunked":
        te_value = rng.choice([b"gzip, chunked", b"chunkedx", b"chunked, identity", b"identity", b"chunked;x=1"]) \
            if "bad-te" in muts else te_word
        lines.append(b"Transfer-Encoding: " + ws(te_value))
        if "te-twice" in muts:
            lines.append(b"Transfer-Encoding: " + te_word)
        if "cl-te" in muts:
            lines.insert(rng.randint(2, len(lines)), b"Content-Length: %d" % len(body))
        pieces = []
        step = 1 if "tiny-chunks" in muts else rng.randint(1, 4000)
        for i in range(0, len(body), step):
            chunk = body[i:i + step]
            ext = b";a=b" if "chunk-ext" in muts else b""
            pieces.append(b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk))
        trailer = b"X-T: 1\r\n" if "trailers" in muts else b""
        wire_body = b"".join(pieces) + b"0\r\n" + trailer + b"\r\n"
    else:
        cl = b"%d" % len(body)
        if "cl-zeros" in muts:
            cl = b"000" + cl
        if "bad-cl" in muts:
            cl = rng.choice([b"+" + cl, b"-1", cl + b".0", b"0x%x" % len(body), cl + b", " + cl, b""])
        lines.append(b"Content-Length: " + ws(cl))
        if "dup-cl" in muts:
            lines.append(b"Content-Length: " + cl)
        if "conflict-cl" in muts:
            lines.append(b"Content-Length: %d" % (len(body) + 1))
        wire_body = body
    if "obs-fold" in muts:
        lines.append(b"X-Fold: a")
        lines.append(rng.choice([b" folded", b"\tfolded"]))
    if "space-colon" in muts:
        lines.append(rng.choice([b"X-A : 1", b"Content-Length : 0", b"Transfer-Encoding : chunked"]))
    if "ctl-value" in muts:
        lines.append(b"X-C: a" + bytes([rng.choice([0, 1, 8, 11, 12, 27, 127])]) + b"b")
    if "no-colon" in muts:
        lines.append(b"X-NoColon value")
    if "extra-headers" in muts:
        lines.extend(b"X-Fuzz-%d: %d" % (i, rng.randint(0, 10 ** 6)) for i in range(rng.randint(1, 20)))
    if "expect" in muts:
        lines.append(b"Expect: 100-continue")
    if "conn-keep-alive" in muts:
        lines.append(b"Connection: keep-alive")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if "bare-lf" in muts:
        head = head.replace(b"\r\nHost: broker\r\n", b"\r\nHost: broker\n", 1)
    must_refuse = any(m in REFUSING_MUTATIONS[framing] for m in muts)
    return head + wire_body, must_refuse, body, muts


def exchange_then_sentinel(port: int, data: bytes, sentinel: str) -> Tuple[RawResponse, Optional[RawResponse]]:
    """Send `data` and read its answer; then, if the connection is still open, send a request for
    `sentinel` (a path the broker answers 404) on it and read the next answer. Answers come in
    order, so anything the broker made of `data` beyond one request (a smuggled second request
    in its body) would be answered before the sentinel: the next answer must be the sentinel's
    404 (or the close). This replaces waiting a fixed time for a second answer that may come."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker may answer and close before we are done sending
        method = data.split(b" ", 1)[0].decode("latin-1", "replace")
        first = read_response(sock, method, close_wait=None)
        if first.closed:
            return first, None
        try:
            sock.sendall(request_bytes("GET", sentinel))
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed meanwhile: the read below sees the close (status 0)
        return first, read_response(sock, "GET", close_wait=None)


def test_fuzz_framing_headers(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """The upstreams' logs are kept for the whole loop (as in the framing tests above): after every
    case they hold exactly one request per forwarded case so far, so a refused case forwarded late
    is caught at any later case, or 0.1 s after the last one (each refused case had that long)."""
    rng = random.Random(FUZZ_SEED)
    token_line = b"Authorization: Bearer " + broker.token("openai").encode()
    tally = {"forwarded": 0, "refused": 0}
    openai = upstreams["openai"]

    def assert_only_forwarded_cases_arrived(what: str) -> None:
        got = requests_to(upstreams)
        assert set(got) <= {"openai"} and len(got.get("openai", [])) == tally["forwarded"], \
            f"{what}: upstreams got {got} after {tally['forwarded']} forwarded cases"

    for i in range(FUZZ_CASES):
        data, must_refuse, body, muts = fuzz_request(rng, token_line)
        what = f"case {i} {muts}: {data[:300]!r}"
        if must_refuse:     # the close comes right after the answer: close_wait is not waited out
            resp, after = raw_exchange(broker.port, data, close_wait=0.05), None
        else:
            resp, after = exchange_then_sentinel(broker.port, data, f"/fuzz-sentinel-{i}")
        assert resp.extra == b"", f"{what}: second answer {resp.extra[:200]!r}"
        assert after is None or after.status in (0, 404) and after.extra == b"", \
            f"{what}: a second answer came before the sentinel's 404: {after!r}"
        if must_refuse:
            assert 400 <= resp.status < 500, f"{what} -> {resp!r}"
            assert resp.closed, f"{what}: left open after {resp.status}"
            tally["refused"] += 1
        else:
            assert resp.status == 200, f"{what} -> {resp!r}"
            tally["forwarded"] += 1
            with openai.lock:
                req = openai.requests[-1]
            assert req.body == body, f"{what}: upstream got {req.body[:100]!r}"
            assert key_check_failure("openai", REAL_KEYS["openai"], req) is None
        assert_only_forwarded_cases_arrived(what)
    time.sleep(0.1)
    assert_only_forwarded_cases_arrived("0.1 s after the last case")
    assert tally["forwarded"] >= 50 and tally["refused"] >= 50, tally
    assert raw_exchange(broker.port, request_bytes("GET", "/healthz")).status == 200
