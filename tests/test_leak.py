"""Leaked-token detection (issue 17 item 4) over real sockets: a live seks token inside what the
broker would forward (a JSON body, a streamed body split across chunks, a percent-encoded query,
a header other than the credential place) refuses the request with 403 before any part of the
token reaches the upstream; the reason names the token's id, never the token; `--on-leak revoke`
revokes the leaked token. Token-shaped strings that are not live tokens pass untouched."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Dict

import pytest

from conftest import (
    Broker, Brokers, FakeUpstream, audit_json, call, error_type_and_message, fresh_agent,
    load_broker_module, ok, run_cli,
)

sb = load_broker_module()


@pytest.fixture(scope="module")
def leak(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    return broker_factory({p: u.url for p, u in upstreams.items()}, providers=("openai", "github"))


def seen_by_upstream(up: FakeUpstream, token: str) -> bool:
    return any(token[:20] in r.wire_text() for r in up.requests)


def test_token_shapes_and_the_scanner_hold_back_a_split_token() -> None:
    token = "seks_openai_" + "A" * 43
    assert sb.token_shapes(b"x " + token.encode() + b" y") == [token]
    assert sb.token_shapes(urllib.parse.quote(urllib.parse.quote(token, safe=""), safe="").encode()) == [token]
    assert sb.token_shapes(b"seks_openai_" + b"A" * 44) == []            # longer: not a token
    data = b"before " + token.encode() + b" after"
    for cut in range(1, len(data)):
        scanner = sb.LeakScanner()
        out1, found1 = scanner.feed(data[:cut])
        assert token.encode()[:20] not in out1 or found1               # nothing of it leaves unchecked
        out2, found2 = scanner.feed(data[cut:])
        assert set(found1 + found2) == {token}, cut
        assert out1 + out2 + scanner.flush() == data


def test_a_live_token_in_a_prompt_is_refused_and_named_by_id(leak: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent = fresh_agent("leaker")
    sender = leak.mint("openai", agent)
    other = leak.mint("github", fresh_agent("victim"))
    for secret in (sender, other):
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"key: {secret}"}]})
        resp = call(leak, "openai", sender, "POST", "/v1/chat/completions", body.encode())
        kind, message = error_type_and_message(resp)
        assert resp.status == 403 and "carries a seks token" in message and secret not in message
    assert upstreams["openai"].requests == []
    rows = [r for r in audit_json(leak, "--agent", agent) if r["outcome"] == "denied"]
    assert len(rows) == 2 and all("a live seks token (tok_" in r["reason"] for r in rows)
    assert sender not in json.dumps(rows) and other not in json.dumps(rows)
    assert call(leak, "github", other).status == 200                     # not revoked without --on-leak


def test_query_and_header_leaks_and_on_leak_revoke(leak: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    sender = leak.mint("openai", fresh_agent("q"))
    careful = leak.mint("github", fresh_agent("c"), "--on-leak", "revoke")
    quoted = urllib.parse.quote(urllib.parse.quote(careful, safe=""), safe="")
    assert call(leak, "openai", sender, path=f"/v1/models?note={quoted}").status == 403
    bystander = leak.mint("github", fresh_agent("h"))
    resp = leak.request("GET", "/openai/v1/models", {"Authorization": f"Bearer {sender}", "X-Note": bystander})
    assert resp.status == 403
    assert upstreams["openai"].requests == []
    assert call(leak, "github", careful).status == 401                  # revoked at the first leak
    assert "on-leak=revoke" in ok(run_cli(leak.db, "token", "list", env=leak.env))


def test_a_token_split_across_chunks_of_a_streamed_upload_never_reaches_the_upstream(
        leak: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    sender = leak.mint("openai", fresh_agent("stream"))
    victim = leak.mint("openai", fresh_agent("split"))
    head = b'{"model": "gpt-4o-mini", "input": "' + b"x" * 70000
    for cut in (5, 40):                                   # the token split in two chunks
        conn = http.client.HTTPConnection("127.0.0.1", leak.port, timeout=15)
        try:
            conn.putrequest("POST", "/openai/v1/embeddings")
            conn.putheader("Authorization", f"Bearer {sender}")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for part in (head + victim.encode()[:cut], victim.encode()[cut:] + b'"}'):
                conn.send(b"%x\r\n%s\r\n" % (len(part), part))
            conn.send(b"0\r\n\r\n")
            resp = conn.getresponse()
            assert resp.status == 403, resp.status
        finally:
            conn.close()
        assert not seen_by_upstream(upstreams["openai"], victim), "part of the token reached the upstream"
    assert call(leak, "openai", victim).status == 200


def test_token_shaped_strings_that_are_not_live_tokens_pass(leak: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    sender = leak.mint("openai", fresh_agent("innocent"))
    revoked = leak.mint("openai", fresh_agent("old"))
    leak.revoke(revoked)
    for text in ("seks_openai_" + "Z" * 43, revoked):
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}).encode()
        assert call(leak, "openai", sender, "POST", "/v1/chat/completions", body).status == 200
