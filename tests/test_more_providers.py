"""Built-in providers with one credential in one header (issue 14, item 5, first part): OpenRouter,
Mistral, xAI, DeepSeek, Together, Fireworks, Perplexity, Cohere, Hugging Face, Slack, Linear,
Sentry, Stripe, SendGrid, Resend and Postmark. Over real sockets: each route reaches its own
loopback upstream with exactly the real credential in the provider's header (and no fake token
anywhere), a token of another provider or in the wrong place is refused before any upstream is
contacted, an upstream echoing the key is scrubbed, and `token mint --format env` prints the
variables the SDK reads."""

from __future__ import annotations

import json
from typing import Callable, Dict, Iterator, Tuple

import pytest

from conftest import (
    Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, error_type_and_message, ok,
)

# provider: (header, prefix, fake real key, base variable, its value after the route, key variable)
NEW: Dict[str, Tuple[str, str, str, str, str, str]] = {
    "openrouter": ("Authorization", "Bearer ", "sk-or-v1-test-openrouter-0123456789", "OPENROUTER_BASE_URL", "/v1", "OPENROUTER_API_KEY"),
    "mistral": ("Authorization", "Bearer ", "test-mistral-0123456789abcdef", "MISTRAL_SERVER_URL", "", "MISTRAL_API_KEY"),
    "xai": ("Authorization", "Bearer ", "xai-test-0123456789abcdef", "XAI_BASE_URL", "/v1", "XAI_API_KEY"),
    "deepseek": ("Authorization", "Bearer ", "sk-test-deepseek-0123456789", "DEEPSEEK_BASE_URL", "", "DEEPSEEK_API_KEY"),
    "together": ("Authorization", "Bearer ", "test-together-0123456789abcdef", "TOGETHER_BASE_URL", "/v1", "TOGETHER_API_KEY"),
    "fireworks": ("Authorization", "Bearer ", "fw_test_fireworks_0123456789", "FIREWORKS_BASE_URL", "/v1", "FIREWORKS_API_KEY"),
    "perplexity": ("Authorization", "Bearer ", "pplx-test-0123456789abcdef", "PERPLEXITY_BASE_URL", "", "PERPLEXITY_API_KEY"),
    "cohere": ("Authorization", "Bearer ", "test-cohere-0123456789abcdef", "CO_API_URL", "", "CO_API_KEY"),
    "huggingface": ("Authorization", "Bearer ", "hf_test_huggingface_0123456789", "HF_INFERENCE_ENDPOINT", "", "HF_TOKEN"),
    "slack": ("Authorization", "Bearer ", "xoxb-test-slack-0123456789", "SLACK_API_URL", "/api/", "SLACK_BOT_TOKEN"),
    "linear": ("Authorization", "", "lin_api_test_linear_0123456789", "LINEAR_API_URL", "/graphql", "LINEAR_API_KEY"),
    "sentry": ("Authorization", "Bearer ", "sntrys_test_sentry_0123456789", "SENTRY_URL", "", "SENTRY_AUTH_TOKEN"),
    "stripe": ("Authorization", "Bearer ", "sk_test_stripe_0123456789abcdef", "STRIPE_API_BASE", "", "STRIPE_API_KEY"),
    "sendgrid": ("Authorization", "Bearer ", "SG.test-sendgrid.0123456789", "SENDGRID_HOST", "", "SENDGRID_API_KEY"),
    "resend": ("Authorization", "Bearer ", "re_test_resend_0123456789", "RESEND_BASE_URL", "", "RESEND_API_KEY"),
    "postmark": ("X-Postmark-Server-Token", "", "test-postmark-0123456789abcdef", "POSTMARK_API_URL", "", "POSTMARK_SERVER_TOKEN"),
}
PATHS = {"openrouter": "/v1/chat/completions", "mistral": "/v1/chat/completions", "xai": "/v1/chat/completions",
         "deepseek": "/chat/completions", "together": "/v1/chat/completions", "fireworks": "/v1/chat/completions",
         "perplexity": "/chat/completions", "cohere": "/v2/chat", "huggingface": "/v1/chat/completions",
         "slack": "/api/chat.postMessage", "linear": "/graphql", "sentry": "/api/0/projects/",
         "stripe": "/v1/customers", "sendgrid": "/v3/mail/send", "resend": "/emails", "postmark": "/email"}


def strict(provider: str) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    """Like the real API: 401 unless exactly the real credential is in the provider's header (one
    copy) and no seks token is anywhere in the request; else echo the key, as a debug page might."""
    header, prefix, key = NEW[provider][:3]

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        if req.header_all(header) != [prefix + key] or "seks_" in req.wire_text():
            h.send_json(401, {"error": "invalid credential"})
            return
        h.send_json(200, {"ok": True, "provider": provider, "path": req.path, "debug": f"you sent {key}"})
    return respond


@pytest.fixture(scope="module")
def ups() -> Iterator[Dict[str, FakeUpstream]]:
    servers = {p: FakeUpstream(p, key=NEW[p][2]) for p in NEW}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def _strict(ups: Dict[str, FakeUpstream]) -> None:
    for provider, server in ups.items():
        server.reset()
        server.set_responder(strict(provider))


@pytest.fixture(scope="module")
def more(broker_factory: Brokers, ups: Dict[str, FakeUpstream]) -> Broker:
    base = broker_factory.seed(tuple(NEW), upstream_urls={p: u.url for p, u in ups.items()},
                               keys={p: v[2] for p, v in NEW.items()})
    return broker_factory.serve(base)


@pytest.mark.parametrize("provider", sorted(NEW))
def test_each_route_reaches_its_upstream_with_exactly_the_real_credential(
        more: Broker, ups: Dict[str, FakeUpstream], provider: str) -> None:
    header, prefix, key = NEW[provider][:3]
    token = more.token(provider)
    resp = more.request("POST", f"/{provider}{PATHS[provider]}", {header: prefix + token,
                                                                 "Content-Type": "application/json"}, b"{}")
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert resp.json()["path"] == PATHS[provider] and key.encode() not in resp.body
    assert [r.path for r in ups[provider].requests] == [PATHS[provider]]
    assert all(not u.requests for p, u in ups.items() if p != provider)


@pytest.mark.parametrize("provider", sorted(NEW))
def test_wrong_place_or_provider_never_reaches_an_upstream(
        more: Broker, ups: Dict[str, FakeUpstream], provider: str) -> None:
    header, prefix = NEW[provider][:2]
    other = "stripe" if provider != "stripe" else "slack"
    elsewhere = "X-Api-Key" if header == "Authorization" else "Authorization"
    for headers, status in (({elsewhere: more.token(provider)}, 401),
                            ({header: prefix + more.token(other)}, 403),
                            ({header: prefix + "seks_" + provider + "_" + "x" * 43}, 401)):
        resp = more.request("GET", f"/{provider}{PATHS[provider]}", headers)
        assert resp.status == status, (headers, resp.status, resp.body[:200])
        assert error_type_and_message(resp)[1]
    assert all(not u.requests for u in ups.values())


@pytest.mark.parametrize("provider", sorted(NEW))
def test_mint_prints_the_variables_the_sdk_reads(more: Broker, provider: str) -> None:
    base_var, suffix, key_var = NEW[provider][3:]
    out = ok(more.cli("token", "mint", "--secret", f"{provider}-key", "--agent", f"env-{provider}",
                      "--format", "json"))
    data = json.loads(out)
    env = data.get("env") or data
    assert env[base_var] == f"http://127.0.0.1:8787/{provider}{suffix}", env
    assert env[key_var].startswith(f"seks_{provider}_")


def test_postmark_takes_the_account_token_header_too(more: Broker, ups: Dict[str, FakeUpstream]) -> None:
    key = NEW["postmark"][2]
    ups["postmark"].set_responder(lambda h, req: h.send_json(
        200 if req.header_all("X-Postmark-Account-Token") == [key] and not req.header_all("X-Postmark-Server-Token")
        else 401, {}))
    resp = more.request("GET", "/postmark/servers", {"X-Postmark-Account-Token": more.token("postmark")})
    assert resp.status == 200, resp.body


# ============================================================================
# Basic-auth APIs (Twilio, Mailgun, PyPI, Stripe's curl -u) and per-site ones (Atlassian, Azure)
# ============================================================================

BASIC: Dict[str, Tuple[str, str, str]] = {      # provider: (the agent's user half, real key, path)
    "mailgun": ("api", "key-test-mailgun-0123456789", "/v3/example.com/messages"),
    "pypi": ("__token__", "pypi-test-0123456789abcdef", "/legacy/"),
}
# Basic built by the broker from the secret's two parts: provider: (parts, the pair upstream, path)
PAIRS: Dict[str, Tuple[Dict[str, str], str, str]] = {
    "twilio": ({"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": "test-twilio-auth-token-zyxwvuts"},
               "AC0123456789abcdef0123456789abcdef:test-twilio-auth-token-zyxwvuts",
               "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json"),
    "atlassian": ({"email": "me@example.invalid", "api_token": "ATATT-test-atlassian-0123456789"},
                  "me@example.invalid:ATATT-test-atlassian-0123456789", "/rest/api/3/myself"),
}


def b64pair(user: str, password: str) -> str:
    import base64
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def basic_ups() -> Iterator[Dict[str, FakeUpstream]]:
    servers = {p: FakeUpstream(p, key=v[1]) for p, v in BASIC.items()}
    servers.update({p: FakeUpstream(p, key=v[1]) for p, v in PAIRS.items()})
    servers["azure-openai"] = FakeUpstream("azure-openai", key="test-azure-0123456789abcdef")
    servers["stripe"] = FakeUpstream("stripe", key=NEW["stripe"][2])
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def basic_broker(broker_factory: Brokers, basic_ups: Dict[str, FakeUpstream]) -> Broker:
    keys = {p: v[1] for p, v in BASIC.items()}
    keys.update({p: json.dumps(v[0]) for p, v in PAIRS.items()})
    keys.update({"azure-openai": "test-azure-0123456789abcdef", "stripe": NEW["stripe"][2]})
    env = {"SEKS_UPSTREAM_" + p.upper().replace("-", "_"): u.url for p, u in basic_ups.items()}
    base = broker_factory.seed(tuple(keys), keys=keys, extra_env=env)
    return broker_factory.serve(base)


@pytest.mark.parametrize("provider", sorted(BASIC))
def test_basic_apis_get_the_agents_pair_with_the_real_key(
        basic_broker: Broker, basic_ups: Dict[str, FakeUpstream], provider: str) -> None:
    user, key, path = BASIC[provider]
    up = basic_ups[provider]
    up.reset()
    up.set_responder(lambda h, req: h.send_json(
        200 if req.header_all("authorization") == [b64pair(user, key)] and "seks_" not in req.wire_text() else 401,
        {"ok": True}))
    resp = basic_broker.request("POST", f"/{provider}{path}",
                                {"Authorization": b64pair(user, basic_broker.token(provider))}, b"x=1")
    assert resp.status == 200, (resp.status, resp.body[:200])
    assert len(up.requests) == 1


@pytest.mark.parametrize("provider", sorted(PAIRS))
@pytest.mark.parametrize("sent", ["Basic-other-user", "Basic-no-user", "Bearer"])
def test_basic_pairs_are_built_from_the_secrets_parts(
        basic_broker: Broker, basic_ups: Dict[str, FakeUpstream], provider: str, sent: str) -> None:
    """Twilio SID:auth_token and Atlassian email:api_token: whatever user the agent's client put
    beside its token (or a Bearer token), the upstream gets exactly the stored pair; the secret
    part is masked in the answer, the public one (an identifier every answer carries) is not."""
    parts, pair, path = PAIRS[provider]
    up = basic_ups[provider]
    up.reset()
    import base64
    up.set_responder(lambda h, req: h.send_json(
        200 if req.header_all("authorization") == ["Basic " + base64.b64encode(pair.encode()).decode()]
        and "seks_" not in req.wire_text() else 401, {"ok": True, "echo": pair, "uri": path}))
    token = basic_broker.token(provider)
    auth = {"Basic-other-user": b64pair("AC-someone-else", token), "Basic-no-user": b64pair("", token),
            "Bearer": f"Bearer {token}"}[sent]
    if provider == "twilio" and sent == "Bearer":
        auth = b64pair(token, "")
    resp = basic_broker.request("GET", f"/{provider}{path}", {"Authorization": auth})
    assert resp.status == 200, (resp.status, resp.body[:200])
    body = json.loads(resp.body)
    public, secret = {"twilio": ("account_sid", "auth_token"), "atlassian": ("email", "api_token")}[provider]
    assert parts[secret] not in resp.body.decode() and parts[public] in body["echo"], body
    assert body["uri"] == path
    assert len(up.requests) == 1


def test_stripe_takes_curl_u_as_well_and_sends_bearer(basic_broker: Broker, basic_ups: Dict[str, FakeUpstream]) -> None:
    up, key = basic_ups["stripe"], NEW["stripe"][2]
    up.reset()
    up.set_responder(lambda h, req: h.send_json(200 if req.header_all("authorization") == [f"Bearer {key}"] else 401, {}))
    resp = basic_broker.request("GET", "/stripe/v1/customers", {"Authorization": b64pair(basic_broker.token("stripe"), "")})
    assert resp.status == 200, resp.body


def test_a_per_site_api_is_closed_until_its_upstream_is_set(broker_factory: Brokers, basic_broker: Broker,
                                                            basic_ups: Dict[str, FakeUpstream]) -> None:
    """atlassian and azure-openai have no default upstream: without [upstream] the route is a
    503 that names the setting, before the token is counted; with it the key goes there."""
    closed = broker_factory.seed(("azure-openai",), keys={"azure-openai": "test-azure-0123456789abcdef"})
    served = broker_factory.serve(closed)
    token = served.mint("azure-openai", "azure-agent", "--max-requests", "1")
    for _ in range(2):
        resp = served.request("POST", "/azure-openai/openai/deployments/d/chat/completions?api-version=2024-10-21",
                              {"api-key": token}, b"{}")
        assert resp.status == 503 and "[upstream] azure-openai" in error_type_and_message(resp)[1], resp.body
    rows = [json.loads(line) for line in ok(served.cli("token", "list", "--json", "--agent", "azure-agent")).splitlines()]
    assert rows[0]["requests"] == 0 and rows[0]["state"] == "active"
    assert "none" in ok(served.cli("providers"))
    up = basic_ups["azure-openai"]
    up.reset()
    up.set_responder(lambda h, req: h.send_json(200 if req.header_all("api-key") == ["test-azure-0123456789abcdef"]
                                                and not req.header_all("authorization") else 401, {"ok": True}))
    resp = basic_broker.request("POST", "/azure-openai/openai/deployments/d/chat/completions?api-version=2024-10-21",
                                {"Authorization": "Bearer " + basic_broker.token("azure-openai")}, b"{}")
    assert resp.status == 200, resp.body
    assert up.requests[0].path == "/openai/deployments/d/chat/completions"


def test_supabase_gets_the_key_in_both_of_its_headers(broker_factory: Brokers) -> None:
    """One token, one secret, two places: supabase-py sends the key as `apikey` and as a Bearer;
    the agent may send its token in either or both, and the upstream gets the real key in both
    and the token in neither."""
    key = "test-supabase-service-0123456789abcdef"
    up = FakeUpstream("supabase", key=key)
    try:
        up.set_responder(lambda h, req: h.send_json(
            200 if req.header_all("apikey") == [key] and req.header_all("authorization") == [f"Bearer {key}"]
            and "seks_" not in req.wire_text() else 401, {"ok": True}))
        base = broker_factory.seed(("supabase",), keys={"supabase": key}, extra_env={"SEKS_UPSTREAM_SUPABASE": up.url})
        served = broker_factory.serve(base)
        token = served.token("supabase")
        for headers in ({"apikey": token, "Authorization": f"Bearer {token}"}, {"apikey": token},
                        {"Authorization": f"Bearer {token}"}):
            resp = served.request("GET", "/supabase/rest/v1/items?select=*", headers)
            assert resp.status == 200, (headers.keys(), resp.body)
        assert len(up.requests) == 3
    finally:
        up.stop()


@pytest.mark.parametrize("inject, ok_", [("header a\n    header b Bearer", True), ("same\n    header b", False),
                                        ("header a\n    query k", False), ("basic", False),
                                        ("header a\n    path-prefix /x", False)])
def test_several_injection_places_are_headers_after_a_first_place(inject: str, ok_: bool) -> None:
    from conftest import load_broker_module
    sb = load_broker_module()
    text = f"[p]\nupstream = https://example.invalid\ntoken = header a\ninject = {inject}\n"
    if ok_:
        provider = sb.providers_from_ini(text)["p"]
        assert [pl.name for pl in provider.also] == ["b"]
    else:
        with pytest.raises(sb.ConfigError):
            sb.providers_from_ini(text)


@pytest.mark.parametrize("route, other", [("twilio", "mailgun"), ("atlassian", "pypi"), ("mailgun", "twilio")])
def test_a_live_token_of_another_provider_inside_basic_reaches_nobody(
        basic_broker: Broker, basic_ups: Dict[str, FakeUpstream], route: str, other: str) -> None:
    """A valid token, but minted for another Basic provider: 403 before any upstream, and the
    other provider's upstream is not contacted either."""
    for up in basic_ups.values():
        up.reset()
    resp = basic_broker.request("GET", f"/{route}/x", {"Authorization": b64pair("someone", basic_broker.token(other))})
    assert resp.status == 403 and other in error_type_and_message(resp)[1], resp.body
    assert all(up.requests == [] for up in basic_ups.values())
