"""Delegation (issue 17 item 5): a token minted with `--allow-delegation` mints narrower child
tokens for sub-agents with `POST /seks/v1/tokens` on the agent port. The decision is the pure
`delegated_policy` (fixed tables below); the rest runs over real sockets against a serve process
and loopback upstreams that check the real key: a child works inside its limits and nowhere
else, its budget and request count are carved out of the parent's, anything wider is a 403 that
mints nothing, and revoking the parent (from another process) ends every child on the next
request, in every broker on the database. Audit rows of a child name its parent."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from raw_http import raw_exchange, request_bytes
from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, audit_json, call, error_type_and_message, fresh_agent,
    load_broker_module, ok,
)

sb = load_broker_module()

PARENT = {"methods": ["GET", "POST"], "paths": ["/v1/chat", "/v1/models"], "models": ["gpt-4o", "gpt-4o-mini"],
          "rate": [60, 60.0, "minute"], "max_requests": 10, "budget_tokens": 1000, "delegation": True,
          "on_leak": "revoke"}
NOW = 1_000_000.0


def child_of(ask: Dict[str, Any], parent: Optional[Dict[str, Any]] = None, left: Tuple[Optional[int], Optional[int]] = (10, 1000),
             expires: Optional[float] = NOW + 3600) -> Tuple[Dict[str, Any], Optional[float], str]:
    return sb.delegated_policy(PARENT if parent is None else parent, expires, ask, left[0], left[1], NOW)


def test_a_child_inherits_what_it_does_not_narrow_and_cannot_delegate() -> None:
    policy, expires, label = child_of({"max_requests": 2, "budget_tokens": 100, "label": "summariser"})
    assert policy == {"methods": ["GET", "POST"], "paths": ["/v1/chat", "/v1/models"],
                      "models": ["gpt-4o", "gpt-4o-mini"], "rate": [60, 60.0, "minute"], "max_requests": 2,
                      "budget_tokens": 100, "on_leak": "revoke"}
    assert expires == NOW + 3600 and label == "summariser"            # the parent's end, not a day
    policy, expires, _ = child_of({}, parent={"delegation": True}, left=(None, None), expires=None)
    assert policy == {} and expires == NOW + 86400                   # an unbounded parent: a day


@pytest.mark.parametrize("ask, narrowed", [
    ({"allow_method": "get"}, {"methods": ["GET"]}),
    ({"allow_path": ["/v1/chat/completions"]}, {"paths": ["/v1/chat/completions"]}),
    ({"models": "gpt-4o-mini"}, {"models": ["gpt-4o-mini"]}),
    ({"rate": "1/s"}, {"rate": [1, 1.0, "second"]}),
    ({"rate": "10/h"}, {"rate": [10, 3600.0, "hour"]}),
    ({"ttl": "30m"}, {}),
])
def test_a_child_may_narrow_each_limit(ask: Dict[str, Any], narrowed: Dict[str, Any]) -> None:
    policy, expires, _ = child_of(dict(ask, max_requests=1, budget_tokens=1))
    for name, value in narrowed.items():
        assert policy[name] == value
    if "ttl" in ask:
        assert expires == NOW + 1800


@pytest.mark.parametrize("ask, words", [
    ({"allow_method": ["GET", "DELETE"]}, "method DELETE"),
    ({"allow_path": ["/v1/files"]}, "path /v1/files"),
    ({"allow_path": ["/v1/chatty"]}, "path /v1/chatty"),        # a segment prefix, not a string one
    ({"allow_path": ["/v1"]}, "path /v1"),
    ({"models": ["gpt-4o", "o1"]}, "model o1"),
    ({"rate": "61/m"}, "rate"),
    ({"rate": "2/s"}, "rate"),
    ({"rate": "100/h"}, "rate"),                                # slower, but a bigger burst
    ({"max_requests": 11}, "max_requests 11"),
    ({"budget_tokens": 1001}, "budget_tokens 1001"),
    ({"ttl": "2h"}, "outlives"),
])
def test_anything_wider_than_the_parent_is_forbidden(ask: Dict[str, Any], words: str) -> None:
    ask = dict({"max_requests": 1, "budget_tokens": 1}, **ask)
    with pytest.raises(sb.Forbidden) as info:
        child_of(ask)
    assert info.value.status == 403 and words in info.value.message, info.value.message


def test_limits_are_carved_from_what_the_parent_has_left() -> None:
    with pytest.raises(sb.Forbidden) as info:
        child_of({"max_requests": 1, "budget_tokens": 300}, left=(1, 250))
    assert "more than the parent token has left (250)" in info.value.message
    with pytest.raises(sb.BadRequest) as missing:
        child_of({"max_requests": 1})
    assert "ask for budget_tokens (at most 1000)" in missing.value.message
    with pytest.raises(sb.Forbidden):
        child_of({"max_requests": 1, "budget_tokens": 1}, left=(0, 1000))


@pytest.mark.parametrize("ask", [
    [], "x", {"allow_method": 5}, {"allow_path": "v1/chat"}, {"allow_path": []}, {"rate": "fast"},
    {"rate": 5}, {"ttl": "forever"}, {"ttl": 60}, {"max_requests": "3"}, {"max_requests": True},
    {"budget_tokens": -1}, {"label": "a\nb"}, {"agent": "other"}, {"allow_delegation": True},
])
def test_malformed_asks_are_400(ask: Any) -> None:
    with pytest.raises(sb.BadRequest):
        child_of(ask, parent={"delegation": True}, left=(None, None))


# ============================================================================
# Over real sockets
# ============================================================================


@pytest.fixture(scope="module")
def base(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    return broker_factory.seed(("openai",), upstream_urls={p: u.url for p, u in upstreams.items()})


@pytest.fixture(scope="module")
def served(broker_factory: Brokers, base: Broker) -> Broker:
    return broker_factory.serve(base)


@pytest.fixture(scope="module")
def second(broker_factory: Brokers, base: Broker) -> Broker:
    """Another broker process on the same database."""
    return broker_factory.serve(base)


def delegate(b: Broker, parent: str, ask: Any, raw: Optional[bytes] = None) -> Any:
    return b.request("POST", "/seks/v1/tokens", {"Authorization": f"Bearer {parent}",
                                                 "Content-Type": "application/json"},
                     raw if raw is not None else json.dumps(ask).encode())


def token_row(b: Broker, token_id: str) -> Dict[str, Any]:
    rows = [json.loads(line) for line in ok(b.cli("token", "list", "--json")).splitlines() if line.strip()]
    return next(r for r in rows if r["id"] == token_id)


def chat(b: Broker, token: str) -> Any:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 5}).encode()
    return call(b, "openai", token, "POST", "/v1/chat/completions", body)


def test_a_child_works_inside_its_limits_only_and_is_carved_out(
        served: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent = fresh_agent("deleg")
    parent = served.mint("openai", agent, "--allow-delegation", "--allow-path", "/v1/chat", "--allow-path",
                         "/v1/models", "--max-requests", "10", "--budget-tokens", "100000")
    parent_id = served.request("GET", "/seks/v1/token", {"Authorization": f"Bearer {parent}"}).json()["token_id"]
    resp = delegate(served, parent, {"allow_path": "/v1/chat/completions", "max_requests": 3,
                                     "budget_tokens": 40000, "ttl": "10m", "label": "sub-1"})
    assert resp.status == 201, resp.body
    child, child_id = resp.json()["token"], resp.json()["id"]
    assert child.startswith("seks_openai_") and child_id.startswith("tok_") and child != parent
    assert resp.json()["policy"]["paths"] == ["/v1/chat/completions"]
    assert resp.json()["expires_at"] <= time.time() + 600 + 1
    assert chat(served, child).status == 200
    assert upstreams["openai"].requests[-1].header("authorization") == f"Bearer {REAL_KEYS['openai']}"
    seen = len(upstreams["openai"].requests)
    denied = call(served, "openai", child, "GET", "/v1/models")            # the parent may, the child not
    assert denied.status == 403 and "path" in error_type_and_message(denied)[1]
    assert len(upstreams["openai"].requests) == seen
    assert call(served, "openai", parent, "GET", "/v1/models").status == 200
    row = token_row(served, parent_id)
    assert row["requests"] == 3 + 1 and row["tokens_used"] >= 40000, row   # carved, plus its own call
    assert token_row(served, child_id)["parent"] == parent_id
    assert "parent=" + parent_id in ok(served.cli("token", "list"))
    rows = audit_json(served, "--agent", agent)
    assert any(r["outcome"] == "delegate" and r["token_id"] == parent_id and child_id in r["reason"] for r in rows)
    child_rows = [r for r in rows if r["token_id"] == child_id]
    assert child_rows and all(f"parent {parent_id}" in (r["reason"] or "") for r in child_rows), child_rows
    assert child not in json.dumps(rows) and parent not in json.dumps(rows)
    # the child cannot delegate in turn
    again = delegate(served, child, {})
    assert again.status == 403 and "--allow-delegation" in error_type_and_message(again)[1]


def test_wider_asks_and_bad_parents_mint_nothing(served: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent = fresh_agent("deleg-wide")
    parent = served.mint("openai", agent, "--allow-delegation", "--allow-path", "/v1/chat", "--allow-method", "POST")
    plain = served.mint("openai", fresh_agent("deleg-plain"))
    before = len(ok(served.cli("token", "list", "--json")).splitlines())
    cases = [(parent, {"allow_path": "/v1/files"}, 403), (parent, {"allow_method": ["POST", "DELETE"]}, 403),
             (parent, {"ttl": "100000d"}, 400), (plain, {}, 403), ("seks_openai_" + "x" * 43, {}, 401)]
    for token, ask, status in cases:
        resp = delegate(served, token, ask)
        assert resp.status == status, (ask, resp.status, resp.body)
        assert "token" not in resp.json()
    assert delegate(served, parent, None, raw=b'{"ttl": "1m", "ttl": "9m"}').status == 400
    big = b"{" + b" " * (20 * 1024) + b"}"           # answered before the body is read: a raw exchange
    auth = ("Authorization", f"Bearer {parent}")
    over = raw_exchange(served.port, request_bytes("POST", "/seks/v1/tokens",
                                                   [auth, ("Content-Length", str(len(big)))], big))
    assert over.status == 413, over
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b"{", b" " * 10000, b" " * 10000, b"}")) + b"0\r\n\r\n"
    chunked = raw_exchange(served.port, request_bytes("POST", "/seks/v1/tokens",
                                                      [auth, ("Transfer-Encoding", "chunked")], chunks))
    assert chunked.status == 413, chunked
    assert served.request("GET", "/seks/v1/tokens", {"Authorization": f"Bearer {parent}"}).status == 404
    assert len(ok(served.cli("token", "list", "--json")).splitlines()) == before
    assert upstreams["openai"].requests == []
    decoy_agent = fresh_agent("deleg-decoy")
    decoy = served.mint("openai", decoy_agent, "--decoy")
    resp = delegate(served, decoy, {})
    assert resp.status == 401 and error_type_and_message(resp)[1] == "token revoked"
    assert [r["outcome"] for r in audit_json(served, "--agent", decoy_agent)] == ["tripwire"]


def test_revoking_the_parent_elsewhere_ends_every_child_in_every_broker(
        served: Broker, second: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent = fresh_agent("deleg-revoke")
    parent = served.mint("openai", agent, "--allow-delegation")
    children: List[str] = []
    for _ in range(3):
        resp = delegate(served, parent, {"allow_method": "POST"})
        assert resp.status == 201, resp.body
        children.append(resp.json()["token"])
    for b in (served, second):                     # both brokers cache the children as live
        for child in children:
            assert chat(b, child).status == 200
    served.revoke(parent)                          # the CLI: another process
    for b in (served, second):
        for child in children:
            resp = chat(b, child)
            assert resp.status == 401 and "delegated from has ended" in error_type_and_message(resp)[1], resp.body
        assert delegate(b, children[0], {}).status == 401
    states = {json.loads(line)["state"] for line in ok(served.cli("token", "list", "--json", "--agent", agent)).splitlines()}
    assert states == {"revoked"}


def test_a_money_budget_parent_carves_dollars() -> None:
    parent = {"delegation": True, "budget_nusd": 1_000_000_000}
    policy, _, _ = sb.delegated_policy(parent, None, {"budget_usd": 0.4}, None, 500_000_000, NOW)
    assert policy["budget_nusd"] == 400_000_000
    with pytest.raises(sb.Forbidden) as info:
        sb.delegated_policy(parent, None, {"budget_usd": 0.6}, None, 500_000_000, NOW)
    assert "budget_usd $0.6 is more than the parent token has left ($0.5)" in info.value.message
    for ask in ({}, {"budget_tokens": 10}):
        with pytest.raises(sb.BadRequest) as missing:
            sb.delegated_policy(parent, None, ask, None, 500_000_000, NOW)
        assert "ask for budget_usd" in missing.value.message


def test_children_share_their_parents_rate(served: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Review finding: each child got the parent's whole rate, so 100 children made 101 times
    the parent's rate. A child's request now takes from the parent's bucket too: the parent and
    all its children together keep to the parent's rate."""
    parent = served.mint("openai", fresh_agent("deleg-rate"), "--allow-delegation", "--rate", "3/h")
    kids = [delegate(served, parent, {}).json()["token"] for _ in range(4)]
    statuses = [call(served, "openai", t, "GET", "/v1/models").status for t in kids + [parent] + kids]
    assert statuses.count(200) == 3 and set(statuses) == {200, 429}, statuses
    assert len(upstreams["openai"].requests) == 3


def test_a_deeply_nested_body_is_a_400(served: Broker) -> None:
    parent = served.mint("openai", fresh_agent("deleg-deep"), "--allow-delegation")
    resp = delegate(served, parent, None, raw=b"[" * 8000 + b"]" * 8000)
    assert resp.status == 400, resp.body
