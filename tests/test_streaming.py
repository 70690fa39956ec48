"""Bodies through the broker: SSE timing, chunked and 50 MiB uploads, 50 MiB downloads, status
pass-through, upstream failures (502/504), compression consistency, every method."""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import http.client
import json
import threading
import time
import zlib
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, assert_token_absent,
    auth_headers, deterministic_chunks, error_type_and_message, free_port,
    key_check_failure, key_checked, send_request, sha256_of_chunks,
)

MiB = 1024 * 1024
BIG = 50 * MiB
# A streaming broker holds a few buffers, not the body: its peak RSS may not grow by this much.
MAX_RSS_GROWTH = 30 * MiB


# ============================================================================
# Server-sent events
# ============================================================================

SSE_EVENTS = 4
SSE_STEP_WAIT = 2.0     # the upstream sends the next event once the agent has the last one, or after this
SSE_MAX_LATENCY = 0.4   # each event reaches the agent this soon after the upstream sent it

SSE_ROUTES = {
    "openai": ("/openai/v1/chat/completions", b'{"model":"gpt-test","stream":true}'),
    "anthropic": ("/anthropic/v1/messages", b'{"model":"claude-test","stream":true}'),
    "gemini": ("/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", b'{"contents":[]}'),
    "groq": ("/groq/openai/v1/chat/completions", b'{"model":"llama-test","stream":true}'),
}


def sse_event(i: int) -> bytes:
    return b'event: delta\ndata: {"i": %d, "text": "token-%d"}\n\n' % (i, i)


def read_events(resp: http.client.HTTPResponse, deadline: float,
                delivered: List[threading.Event]) -> List[Tuple[bytes, float]]:
    """Read the stream as it comes; return (event, monotonic arrival time) pairs. Event i's
    arrival sets delivered[i]."""
    buf = b""
    events: List[Tuple[bytes, float]] = []
    while time.monotonic() < deadline:
        data = resp.read1(65536)
        if not data:
            break
        now = time.monotonic()
        buf += data
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            events.append((ev + b"\n\n", now))
            if len(events) <= len(delivered):
                delivered[len(events) - 1].set()
    assert not buf.strip(), f"trailing partial event: {buf!r}"
    return events


def sse_reaches_client_as_sent(broker: Broker, up: FakeUpstream, provider: str, framing: str) -> None:
    """The provider's stream (SSE_EVENTS events) reaches the agent event by event as the upstream
    sends it, not buffered, and without the fake token upstream. The upstream sends each event
    only once the agent has the one before (or SSE_STEP_WAIT later): a broker holding events back
    shows as an event arriving after the next one was sent, with no fixed delay to sit through."""
    delivered = [threading.Event() for _ in range(SSE_EVENTS)]

    def in_step() -> Iterator[bytes]:
        for i in range(SSE_EVENTS):
            if i:
                delivered[i - 1].wait(SSE_STEP_WAIT)
            yield sse_event(i)

    # send_sse writes (and times) each event as in_step yields it
    up.set_responder(key_checked(provider, lambda h, req: h.send_sse(in_step(), 0, framing)))  # type: ignore
    path, body = SSE_ROUTES[provider]
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=15)
    try:
        send_request(conn, "POST", path, {**auth_headers(provider, broker.token(provider)),
                                          "Content-Type": "application/json", "Accept": "text/event-stream"}, body)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = read_events(resp, time.monotonic() + 15, delivered)
    finally:
        conn.close()
    assert [e for e, _ in events] == [sse_event(i) for i in range(SSE_EVENTS)]
    sent = list(up.sse_sent_at)
    assert len(sent) == SSE_EVENTS
    for i, (_, arrived) in enumerate(events):
        if i + 1 < SSE_EVENTS:
            assert arrived < sent[i + 1], (
                f"event {i} arrived {arrived - sent[i]:.2f}s after it was sent, after event {i + 1} was sent "
                f"({sent[i + 1] - sent[i]:.2f}s after it): the stream is buffered")
        assert arrived - sent[i] < SSE_MAX_LATENCY, f"event {i} arrived {arrived - sent[i]:.2f}s after it was sent"
    assert_token_absent(up.only_request(), broker.token(provider))


def test_sse_events_reach_client_as_sent_chunked(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """openai, anthropic, gemini and groq streams (chunked), side by side: each provider has its
    own upstream, route and token, and each stream's checks are those of one stream alone."""
    with concurrent.futures.ThreadPoolExecutor(len(SSE_ROUTES)) as pool:
        streams = [pool.submit(sse_reaches_client_as_sent, broker, upstreams[p], p, "chunked") for p in SSE_ROUTES]
        for s in streams:
            s.result(timeout=60)


def test_sse_events_reach_client_as_sent_close_delimited(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """An openai stream whose end is the connection's close (no length, not chunked)."""
    sse_reaches_client_as_sent(broker, upstreams["openai"], "openai", "close")


def test_client_disconnect_mid_stream_leaves_broker_serving(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    up = upstreams["openai"]
    up.set_responder(key_checked("openai", lambda h, req: h.send_sse([sse_event(i) for i in range(6)], 0.2)))
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    send_request(conn, "POST", "/openai/v1/chat/completions",
                 {**auth_headers("openai", broker.token("openai")), "Content-Type": "application/json"}, b"{}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read1(65536)
    conn.close()
    up.reset()
    r = broker.request("GET", "/openai/v1/models", auth_headers("openai", broker.token("openai")))
    assert r.status == 200
    assert broker.alive()


# ============================================================================
# Request bodies: chunked, 50 MiB
# ============================================================================


def digest_responder(h: UpstreamHandler, req: RecordedRequest) -> None:
    h.send_json(200, {"sha256": req.body_sha256, "len": req.body_len, "chunked": req.chunked})


def test_chunked_request_body_is_forwarded_intact(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    up = upstreams["openai"]
    up.set_responder(key_checked("openai", digest_responder))
    pieces = [b"--boundary\r\n", b"Content-Disposition: form-data; name=\"file\"\r\n\r\n",
              b"x" * 70000, b"\r\n--boundary--\r\n", b"tail"]

    def slow() -> Iterator[bytes]:
        for p in pieces:
            yield p
            time.sleep(0.05)

    resp = broker.request("POST", "/openai/v1/files",
                          {**auth_headers("openai", broker.token("openai")),
                           "Content-Type": "multipart/form-data; boundary=boundary",
                           "Transfer-Encoding": "chunked"}, slow())
    assert resp.status == 200, resp.body[:300]
    req = up.only_request()
    assert req.body == b"".join(pieces)
    assert resp.json()["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert_token_absent(req, broker.token("openai"))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upload_50_mib(broker: Broker, upstreams: Dict[str, FakeUpstream], framing: str) -> None:
    up = upstreams["telegram"]
    up.set_responder(key_checked("telegram", digest_responder))
    expected = sha256_of_chunks(BIG, seed=7)
    broker.reset_peak_rss()
    hwm_before = broker.vm_hwm_bytes()
    hs = {"Content-Type": "application/octet-stream"}
    if framing == "content-length":
        hs["Content-Length"] = str(BIG)
    else:
        hs["Transfer-Encoding"] = "chunked"
    token = broker.token("telegram")
    resp = broker.request("POST", f"/telegram/bot{token}/sendDocument", hs,
                          deterministic_chunks(BIG, seed=7), timeout=60)
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["len"] == BIG
    assert resp.json()["sha256"] == expected
    req = up.only_request()
    assert req.body_sha256 == expected
    hwm_after = broker.vm_hwm_bytes()
    if hwm_before is not None and hwm_after is not None:
        assert hwm_after - hwm_before < MAX_RSS_GROWTH, (
            f"broker peak RSS grew by {(hwm_after - hwm_before) / MiB:.0f} MiB for a 50 MiB upload: not streamed")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_download_50_mib(broker: Broker, upstreams: Dict[str, FakeUpstream], framing: str) -> None:
    up = upstreams["telegram"]
    up.set_responder(key_checked("telegram", lambda h, req: h.send_stream(
        200, deterministic_chunks(BIG, seed=11), [("Content-Type", "application/pdf")],
        length=BIG if framing == "content-length" else None)))
    expected = sha256_of_chunks(BIG, seed=11)
    broker.reset_peak_rss()
    hwm_before = broker.vm_hwm_bytes()
    token = broker.token("telegram")
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=60)
    h = hashlib.sha256()
    total = 0
    try:
        send_request(conn, "GET", f"/telegram/file/bot{token}/documents/big.pdf")
        resp = conn.getresponse()
        assert resp.status == 200
        cl = resp.getheader("Content-Length")
        assert cl is None or int(cl) == BIG
        assert resp.getheader("Content-Type") == "application/pdf"
        while True:
            data = resp.read(MiB)
            if not data:
                break
            h.update(data)
            total += len(data)
    finally:
        conn.close()
    assert total == BIG
    assert h.hexdigest() == expected
    assert up.only_request().path == f"/file/bot{REAL_KEYS['telegram']}/documents/big.pdf"
    hwm_after = broker.vm_hwm_bytes()
    if hwm_before is not None and hwm_after is not None:
        assert hwm_after - hwm_before < MAX_RSS_GROWTH, (
            f"broker peak RSS grew by {(hwm_after - hwm_before) / MiB:.0f} MiB for a 50 MiB download: not streamed")


# ============================================================================
# Upstream answers: status pass-through, compression
# ============================================================================


@pytest.mark.parametrize("status", [201, 204, 400, 401, 403, 404, 409, 422, 429, 500, 502, 503, 529])
def test_upstream_status_headers_body_pass_through(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                                   status: int) -> None:
    body = b"" if status == 204 else json.dumps(
        {"error": {"type": "upstream_said", "message": f"status {status} from upstream"}}).encode()
    up = upstreams["anthropic"]
    up.set_responder(key_checked("anthropic", lambda h, req: h.send_bytes(
        status, body, [("Retry-After", "7"), ("X-Request-Id", f"req_{status}"), ("Content-Type", "application/json")])))
    resp = broker.request("POST", "/anthropic/v1/messages",
                          {**auth_headers("anthropic", broker.token("anthropic")),
                           "anthropic-version": "2023-06-01", "Content-Type": "application/json"}, b"{}")
    assert resp.status == status
    assert resp.body == body
    assert resp.headers.get("Retry-After") == "7"
    assert resp.headers.get("X-Request-Id") == f"req_{status}"
    if status != 204:
        assert resp.headers.get("Content-Type") == "application/json"
    assert len(up.requests) == 1


PAYLOAD = json.dumps({"data": [{"id": f"model-{i}", "object": "model", "owned_by": "test"} for i in range(200)]}).encode()


def honest_gzip(h: UpstreamHandler, req: RecordedRequest) -> None:
    """Compress only when the request says the client accepts gzip (what real servers do)."""
    if "gzip" in (req.header("Accept-Encoding") or "").lower():
        h.send_bytes(200, gzip.compress(PAYLOAD), [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")],
                     content_type="application/json")
    else:
        h.send_bytes(200, PAYLOAD, content_type="application/json")


def always_gzip(h: UpstreamHandler, req: RecordedRequest) -> None:
    """A server that compresses whatever the request asked for."""
    h.send_bytes(200, gzip.compress(PAYLOAD), [("Content-Encoding", "gzip")], content_type="application/json")


@pytest.mark.parametrize("responder", [honest_gzip, always_gzip], ids=["honours-accept-encoding", "always-gzip"])
@pytest.mark.parametrize("accept", ["gzip, deflate", "identity"])
def test_compressed_answer_stays_consistent(broker: Broker, upstreams: Dict[str, FakeUpstream],
                                            responder: Callable, accept: str) -> None:
    upstreams["openai"].set_responder(key_checked("openai", responder))
    resp = broker.request("GET", "/openai/v1/models",
                          {**auth_headers("openai", broker.token("openai")), "Accept-Encoding": accept})
    assert resp.status == 200
    enc = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
    if enc == "gzip":
        assert gzip.decompress(resp.body) == PAYLOAD
    elif enc == "deflate":
        assert zlib.decompress(resp.body) == PAYLOAD
    else:
        assert enc == "identity", enc
        assert resp.body == PAYLOAD, "body is not plain but no Content-Encoding says so"
    cl = resp.headers.get("Content-Length")
    assert cl is None or int(cl) == len(resp.body)


# ============================================================================
# Every method
# ============================================================================


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def test_every_method_is_forwarded(broker: Broker, upstreams: Dict[str, FakeUpstream], method: str) -> None:
    body = b'{"name":"x"}' if method in ("POST", "PUT", "PATCH") else None
    token = broker.token("github")
    resp = broker.request(method, "/github/repos/o/r/labels/x?a=1",
                          {**auth_headers("github", token), "Content-Type": "application/json"}, body)
    assert resp.status == 200, resp.body[:300]
    req = upstreams["github"].only_request()
    assert req.method == method
    assert req.target == "/repos/o/r/labels/x?a=1"
    assert req.body == (body or b"")
    assert key_check_failure("github", REAL_KEYS["github"], req) is None
    assert_token_absent(req, token)
    if method == "HEAD":
        assert resp.body == b""
    else:
        assert resp.json()["method"] == method


# ============================================================================
# Broken upstreams: 502 unreachable, 504 timeout
# ============================================================================


UPSTREAM_TIMEOUT = 0.3


@pytest.fixture(scope="module")
def broken_broker(broker_factory: Brokers, silent_upstream: FakeUpstream) -> Broker:
    return broker_factory({"openai": f"http://127.0.0.1:{free_port()}", "anthropic": silent_upstream.url},
                          extra_env={"SEKS_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT)}, providers=("openai", "anthropic"))


def test_upstream_unreachable_is_502(broken_broker: Broker) -> None:
    t0 = time.monotonic()
    resp = broken_broker.request("POST", "/openai/v1/chat/completions",
                                 {**auth_headers("openai", broken_broker.token("openai")),
                                  "Content-Type": "application/json"}, b"{}")
    assert resp.status == 502, resp.body[:300]
    error_type_and_message(resp)
    assert REAL_KEYS["openai"] not in resp.body.decode("latin-1")
    assert time.monotonic() - t0 < 10
    assert broken_broker.request("GET", "/healthz").status == 200


def test_upstream_timeout_is_504(broken_broker: Broker, silent_upstream: FakeUpstream) -> None:
    t0 = time.monotonic()
    resp = broken_broker.request("POST", "/anthropic/v1/messages",
                                 {**auth_headers("anthropic", broken_broker.token("anthropic")),
                                  "anthropic-version": "2023-06-01", "Content-Type": "application/json"},
                                 b"{}", timeout=20)
    elapsed = time.monotonic() - t0
    assert resp.status == 504, resp.body[:300]
    error_type_and_message(resp)
    assert REAL_KEYS["anthropic"] not in resp.body.decode("latin-1")
    assert elapsed < 8, f"504 took {elapsed:.1f}s with SEKS_UPSTREAM_TIMEOUT={UPSTREAM_TIMEOUT}"
    assert len(silent_upstream.requests) >= 1, "the request never reached the upstream"
    assert broken_broker.request("GET", "/healthz").status == 200
