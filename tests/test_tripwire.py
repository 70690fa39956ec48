"""Tripwire tokens (issue 17 item 3) over real sockets: `token mint --decoy` makes a token that
looks like any other and never forwards anything. Its use, over HTTP, a WebSocket upgrade or the
token-introspection route, is answered exactly like a revoked token, audited as `tripwire`, logged
at error level, counted in /metrics and POSTed to the [alerts] webhook (which never holds up the
answer); `--on-tripwire disable-agent` stops every token of the agent at once."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List

import pytest

from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, audit_json, broker_env, call, error_type_and_message,
    free_port, fresh_agent, load_broker_module, ok, run_cli, wait_until,
)
from ws_helpers import ws_connect


class Hook:
    """The operator's alert webhook: a loopback server recording the JSON it is POSTed."""

    def __init__(self) -> None:
        self.events: List[Dict] = []
        self.raw: List[bytes] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.raw.append(body)
                hook.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        # shutdown() waits for serve_forever's next poll: 0.05 s apart instead of the default 0.5 s
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def trip(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream], hook: Hook) -> Broker:
    base = broker_factory.seed(("openai",), upstream_urls={p: u.url for p, u in upstreams.items()},
                               extra_env={"SEKS_ALERT_WEBHOOK": hook.url})
    return broker_factory.serve(base, "--admin-port", str(free_port()))


def test_check_token_trips_on_a_decoy_before_anything_else() -> None:
    sb = load_broker_module()
    rec = sb.TokenRecord("tok_000000000001", b"h" * 32, "main", "openai", "a1", 1.0, "2026-01-01T00:00:00Z",
                         '{"decoy": true}', "2026-01-01T00:00:00Z", "openai", "ct")
    with pytest.raises(sb.Tripwire) as info:             # revoked, expired, disabled: still a tripwire
        sb.check_token(rec, "anthropic", now=2000.0)
    assert (info.value.status, info.value.message) == (401, "token revoked")


def test_a_decoy_answers_like_a_revoked_token_and_raises_every_alarm(
        trip: Broker, upstreams: Dict[str, FakeUpstream], hook: Hook) -> None:
    agent = fresh_agent("bait")
    decoy = trip.mint("openai", agent, "--decoy")
    revoked = trip.mint("openai", fresh_agent("gone"))
    trip.revoke(revoked)
    before = len(hook.events)
    started = time.monotonic()
    got = call(trip, "openai", decoy, "POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini"}')
    took = time.monotonic() - started
    other = call(trip, "openai", revoked, "POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini"}')
    assert (got.status, error_type_and_message(got)) == (other.status, error_type_and_message(other))
    assert got.status == 401 and took < 2.0
    assert upstreams["openai"].requests == [], "a decoy reached the upstream"
    assert wait_until(lambda: len(hook.events) > before, 10), "the webhook was not told"
    event = hook.events[-1]
    assert {k: event[k] for k in ("event", "agent", "provider", "path")} == {
        "event": "tripwire", "agent": agent, "provider": "openai", "path": "/openai/v1/chat/completions"}
    assert event["client"] == "127.0.0.1" and event["token_id"].startswith("tok_")
    for raw in hook.raw:
        assert decoy.encode() not in raw and REAL_KEYS["openai"].encode() not in raw
    [row] = [r for r in audit_json(trip, "--agent", agent)]
    assert (row["outcome"], row["status"], row["token_id"]) == ("tripwire", 401, event["token_id"])
    trip.wait_for_log(lambda text: "ERROR tripwire" in text and agent in text)
    metrics = trip.admin_get("/metrics").body.decode()
    assert 'seks_tripwires_total{provider="openai"} 1' in metrics, metrics[-800:]
    assert "decoy" in ok(run_cli(trip.db, "token", "list", "--agent", agent, env=trip.env))


def test_on_tripwire_disable_agent_stops_its_other_tokens(trip: Broker) -> None:
    agent = fresh_agent("steered")
    decoy = trip.mint("openai", agent, "--decoy", "--on-tripwire", "disable-agent")
    working = trip.mint("openai", agent)
    assert call(trip, "openai", working).status == 200
    assert call(trip, "openai", decoy).status == 401
    assert call(trip, "openai", working).status == 401
    assert "disabled" in ok(run_cli(trip.db, "agent", "list", env=trip.env))
    [row] = [r for r in audit_json(trip, "--agent", agent) if r["outcome"] == "tripwire"]
    assert "agent disabled" in row["reason"]


def test_a_decoy_over_websocket_and_introspection_trips_too(trip: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent = fresh_agent("ws-bait")
    decoy = trip.mint("openai", agent, "--decoy")
    hs = ws_connect(trip.port, "/openai/v1/realtime?model=gpt-4o-realtime-preview",
                    [("Authorization", f"Bearer {decoy}")])
    assert hs.status == 401, hs
    intro = trip.request("GET", "/seks/v1/token", {"Authorization": f"Bearer {decoy}"})
    assert intro.status == 401 and error_type_and_message(intro)[1] == "token revoked"
    assert wait_until(lambda: len([r for r in audit_json(trip, "--agent", agent) if r["outcome"] == "tripwire"]) == 2, 5)
    assert upstreams["openai"].requests == [] and upstreams["openai"].accepted == 0


def test_a_dead_webhook_never_holds_up_the_answer(procs: Brokers, upstreams: Dict[str, FakeUpstream]) -> None:
    base = procs.seed(("openai",), upstream_urls={"openai": upstreams["openai"].url},
                      extra_env={"SEKS_ALERT_WEBHOOK": f"http://127.0.0.1:{free_port()}/down"})
    b = procs.serve(base)
    decoy = b.mint("openai", fresh_agent("nohook"), "--decoy")
    for _ in range(3):
        started = time.monotonic()
        assert call(b, "openai", decoy).status == 401
        assert time.monotonic() - started < 1.0
    b.wait_for_log(lambda text: "alert-failed" in text, timeout=15)


def test_on_tripwire_needs_decoy_and_a_bad_webhook_is_refused(trip: Broker, tmp_path) -> None:
    cp = run_cli(trip.db, "token", "mint", "--secret", "openai-key", "--agent", "x", "--on-tripwire",
                 "disable-agent", env=trip.env)
    assert cp.returncode == 2 and "--on-tripwire goes with --decoy" in cp.stderr
    bad = tmp_path / "c.ini"
    bad.write_text("[alerts]\nwebhook = ftp://example.invalid/x\n")
    cp = run_cli(trip.db, "--config", str(bad), "serve", "--port", "0", env=broker_env())
    assert cp.returncode != 0 and "alert webhook must be an http(s) URL" in cp.stderr, cp.stderr
    cp = run_cli(trip.db, "config", "check", str(bad), env=broker_env())
    assert cp.returncode == 1 and "alert webhook must be an http(s) URL" in cp.stdout, cp.stdout
