"""Money budgets (issue 17 item 2): `token mint --budget-usd AMOUNT`, priced from the config's
`[prices]` table (US dollars per million tokens: input, output, cached input). The pure parts
(price parsing, the cost of an answer, the reservation with prices, cached-token reading) are
pinned by tables; the rest runs over real sockets: a serve process with a [prices] table in front
of a loopback OpenAI that checks the real key, honours the output cap and reports usage (with a
cached share). The budget is never passed, the output cap is lowered to what money is left, an
unpriced model is refused before anything is forwarded, and `usage` shows the cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest

from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, call, error_type_and_message,
    fresh_agent, load_broker_module, ok, parse_table,
)

sb = load_broker_module()

PRICES = "[prices]\ngpt-4o-mini = 0.15 0.60 0.075\nGPT-Big = 30 60\nfree-model = 0 0\n"


@pytest.mark.parametrize("text, nano", [
    ("0.15 0.60 0.075", (150, 600, 75)),
    ("2.50 10.00", (2500, 10000, 2500)),          # no cached price: input price
    ("0 0", (0, 0, 0)),
    ("0.0001 1", (1, 1000, 1)),                    # rounded up, never down
    ("3 15 0.30", (3000, 15000, 300)),
])
def test_prices_are_dollars_per_million_tokens_kept_as_nano_dollars_per_token(text: str, nano: tuple) -> None:
    assert sb.parse_price(text) == nano


@pytest.mark.parametrize("text", ["", "1", "1 2 3 4", "a b", "-1 2", "1 1e7", "1,5 2"])
def test_malformed_prices_are_refused(text: str) -> None:
    with pytest.raises(sb.ConfigError):
        sb.parse_price(text)


def test_cost_counts_cached_input_at_its_own_price() -> None:
    price = (150, 600, 75)
    assert sb.usage_cost(price, 1000, 100) == 1000 * 150 + 100 * 600
    assert sb.usage_cost(price, 1000, 100, cached=400) == 600 * 150 + 400 * 75 + 100 * 600
    assert sb.usage_cost(price, 10, 0, cached=50) == 10 * 75          # never more cached than input
    assert sb.usage_cost(price, None, None) == 0


def test_reservation_with_prices_lowers_the_cap_to_what_money_is_left() -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "max_tokens": 5000}).encode()
    bound = len(body) + sb.BUDGET_INPUT_MARGIN
    left = bound * 150 + 1000 * 600 + 599                          # room for 1000 output tokens
    amount, new = sb.budget_reservation("openai", "/v1/chat/completions", body, left, price=(150, 600, 75))
    assert json.loads(new)["max_tokens"] == 1000
    assert amount == bound * 150 + 1000 * 600 <= left
    with pytest.raises(sb.Exhausted) as info:
        sb.budget_reservation("openai", "/v1/chat/completions", body, bound * 150 + 599, price=(150, 600, 75))
    assert "$" in info.value.message
    same = sb.budget_reservation("openai", "/v1/chat/completions", body, 10 ** 6)
    assert same == (bound + 5000, None)                             # a token budget: unchanged


@pytest.mark.parametrize("kind, answer, cached", [
    ("openai", {"usage": {"prompt_tokens": 100, "completion_tokens": 5,
                          "prompt_tokens_details": {"cached_tokens": 64}}}, 64),
    ("openai", {"usage": {"input_tokens": 100, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 32}}}, 32),
    ("anthropic", {"usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 5}}, 90),
    ("gemini", {"usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 40,
                                  "candidatesTokenCount": 5}}, 40),
])
def test_usage_reads_the_cached_share_of_the_input(kind: str, answer: Dict[str, Any], cached: int) -> None:
    state: Dict[str, Any] = {}
    sb.read_usage(kind, answer, state)
    assert state["tokens_cached"] == cached and state["tokens_cached"] <= state["tokens_in"]


def test_a_token_has_one_budget_and_a_money_budget_is_exact() -> None:
    assert sb.make_policy(None, None, None, None, None, None, 0.1) == {"budget_nusd": 100_000_000}
    assert sb.describe_policy({"budget_nusd": 2_500_000_000}) == "budget=$2.5"
    for tokens, usd in ((100, 1.0), (None, 0.0), (None, -1.0)):
        with pytest.raises(sb.UsageError):
            sb.make_policy(None, None, None, None, None, tokens, usd)


# ============================================================================
# Over real sockets
# ============================================================================


def priced_answer(tin: int, cached: int, tout: int) -> Any:
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        if req.header("authorization") != f"Bearer {REAL_KEYS['openai']}":
            h.send_json(401, {"error": {"message": "wrong key"}})
            return
        body = json.loads(req.body or b"{}")
        caps = [body[k] for k in ("max_completion_tokens", "max_tokens") if isinstance(body.get(k), int)]
        out = min([tout] + caps)
        h.send_json(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": tin, "completion_tokens": out, "total_tokens": tin + out,
                                    "prompt_tokens_details": {"cached_tokens": cached}}})
    return respond


@pytest.fixture(scope="module")
def priced(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream], tmp_path_factory: pytest.TempPathFactory) -> Broker:
    config = tmp_path_factory.mktemp("prices") / "seks.ini"
    config.write_text(PRICES)
    base = broker_factory.seed(("openai",), upstream_urls={p: u.url for p, u in upstreams.items()}, config=config)
    return broker_factory.serve(base)


def chat(b: Broker, token: str, model: str = "gpt-4o-mini") -> Any:
    """A prompt of 1,100 bytes: the broker bounds its input at bytes + margin, and the fake
    reports 1,000 input tokens, as a real API would (never more tokens than bytes)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * 1100}]}).encode()
    return call(b, "openai", token, "POST", "/v1/chat/completions", body)


def test_a_money_budget_is_never_passed_and_the_cap_follows_the_money(
        priced: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """$0.0012 = 1,200,000 n$. Each answer: 1,000 input tokens (400 cached) and up to 500
    output: 600*150 + 400*75 + 500*600 = 420,000 n$. Two fit whole; the third gets its output
    cap lowered to what is left; then the budget refuses with 403 and nothing more goes up."""
    upstreams["openai"].set_responder(priced_answer(1000, 400, 500))
    agent = fresh_agent("money")
    token = priced.mint("openai", agent, "--budget-usd", "0.0012")
    statuses = [chat(priced, token).status for _ in range(6)]
    forwarded = upstreams["openai"].requests
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) == {403}, statuses
    caps = [json.loads(r.body)["max_completion_tokens"] for r in forwarded]
    assert len(forwarded) == 3 and caps[2] < 500 <= caps[0], caps
    rows = [json.loads(line) for line in ok(priced.cli("token", "list", "--json", "--agent", agent)).splitlines()]
    spent = rows[0]["cost_used"]
    expected = 2 * 420_000 + (600 * 150 + 400 * 75 + caps[2] * 600)
    assert spent == expected <= 1_200_000, (spent, expected)
    refused = chat(priced, token)
    assert refused.status == 403 and "$" in error_type_and_message(refused)[1]
    table = {r["AGENT"]: r for r in parse_table(ok(priced.cli("token", "list")))}
    assert table[agent]["BUDGET"].startswith(f"${spent / 1e9:,.4f}/$0.00")
    assert "budget=$0.0012" in table[agent]["POLICY"]
    status = json.loads(ok(priced.cli("status", "--json", "--url", priced.url)))
    [low] = [b for b in status["budgets_low"] if b["agent"] == agent]
    assert (low["used"], low["budget"], low["unit"]) == (spent, 1_200_000, "nano-usd")
    assert f"${spent / 1e9:,.4f}/$0.00 used" in ok(priced.cli("status", "--url", priced.url))


def test_an_unpriced_model_is_refused_before_anything_is_forwarded(
        priced: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    upstreams["openai"].set_responder(priced_answer(10, 0, 5))
    token = priced.mint("openai", fresh_agent("money-unpriced"), "--budget-usd", "1")
    resp = chat(priced, token, model="gpt-unpriced")
    assert resp.status == 403 and "no price" in error_type_and_message(resp)[1], resp.body
    assert upstreams["openai"].requests == []
    assert chat(priced, token, model="gpt-big").status == 200       # names match case-insensitively
    assert call(priced, "openai", token, "GET", "/v1/models").status == 200   # no body: nothing to price


def test_usage_shows_cost_where_the_model_is_priced(priced: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    upstreams["openai"].set_responder(priced_answer(1000, 0, 100))
    agent = fresh_agent("money-usage")
    token = priced.mint("openai", agent)
    assert chat(priced, token).status == 200
    assert chat(priced, token, model="unknown-model").status == 200
    rows = {r["model"]: r for r in (json.loads(line) for line in
                                    ok(priced.cli("usage", "--json", "--agent", agent)).splitlines())}
    assert rows["gpt-4o-mini"]["cost_usd"] == pytest.approx((1000 * 150 + 100 * 600) / 1e9)
    assert rows["unknown-model"]["cost_usd"] is None
    table = {r["MODEL"]: r for r in parse_table(ok(priced.cli("usage", "--agent", agent)))}
    assert table["gpt-4o-mini"]["COST (USD)"] == "0.0002" and table["unknown-model"]["COST (USD)"] == "-"


def test_bad_prices_in_the_config_are_named_with_their_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.ini"
    config.write_text("[prices]\ngpt-4o = 2.5 ten\n")
    settings = sb.Settings()
    errors = sb.read_config(config.read_text(), str(config), settings)
    assert errors and f"{config}:2:" in errors[0] and "[prices] gpt-4o" in errors[0], errors


@pytest.mark.parametrize("kind, path, obj, outputs", [
    ("openai", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 100, "best_of": 5}, 500),
    ("openai", "/v1/completions", {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 100, "n": 2}, 600),
    ("openai", "/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 100}, 100),   # one tokenised prompt
    ("openai", "/v1/chat/completions", {"model": "m", "messages": [], "max_tokens": 10, "n": 3}, 30),
    ("openai", "/v1/embeddings", {"model": "e", "input": "cat"}, 0),
    ("gemini", "/v1beta/models/e:embedContent", {"content": {}}, 0),
    ("anthropic", "/v1/messages/count_tokens", {"model": "c", "messages": []}, 0),
])
def test_reservations_bound_every_output_the_request_can_bill(kind: str, path: str, obj: Dict[str, Any],
                                                                outputs: int) -> None:
    """Review findings: legacy completions bill best_of outputs per prompt, and a list of prompts
    one set per prompt; the reservation now counts them all."""
    body = json.dumps(obj).encode()
    amount, _ = sb.budget_reservation(kind, path, body, 10 ** 7)
    assert amount == len(body) + sb.BUDGET_INPUT_MARGIN + outputs


@pytest.mark.parametrize("kind, path, obj, words", [
    ("openai", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}, "cannot bound"),
    ("openai", "/v1/audio/speech", {"model": "tts", "input": "hi"}, "cannot bound"),
    ("gemini", "/v1beta/models/veo:predict", {"instances": []}, "cannot bound"),
    ("openai", "/v1/responses", {"model": "m", "input": "go on", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("openai", "/v1/responses", {"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
    ("openai", "/v1/responses", {"model": "m", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ("gemini", "/v1beta/models/g:generateContent", {"contents": [], "cachedContent": "cachedContents/1"}, "cachedContent"),
])
def test_a_budget_refuses_what_it_cannot_bound(kind: str, path: str, obj: Dict[str, Any], words: str) -> None:
    """Review findings: image and audio generation bill output the request does not cap, and a
    stored conversation or cache bills input the body does not show. A budget token (tokens or
    dollars) refuses them with 403 instead of being overspent."""
    with pytest.raises(sb.Forbidden) as info:
        sb.budget_reservation(kind, path, json.dumps(obj).encode(), 10 ** 7, price=(150, 600, 75))
    assert words in info.value.message


@pytest.mark.parametrize("provider, rest, body, model", [
    ("azure-openai", "/openai/deployments/gpt45-prod/chat/completions", b'{"model": "gpt-4o-mini"}', "gpt45-prod"),
    ("azure-openai", "/openai/deployments/my%2Ddep/embeddings", b'{"input": "x"}', "my-dep"),
    ("openrouter", "/v1/chat/completions", b'{"model": "cheap", "models": ["expensive"]}', None),
    ("openrouter", "/v1/chat/completions", b'{"model": "cheap", "models": []}', "cheap"),
    ("openai", "/v1/chat/completions", b'{"model": "gpt-4o-mini"}', "gpt-4o-mini"),
])
def test_the_model_priced_and_checked_is_the_one_billed(provider: str, rest: str, body: bytes,
                                                        model: Any) -> None:
    """Review findings: Azure bills the deployment's model whatever the body says, and
    OpenRouter may answer with any model of a `models` fallback list. The model a --models
    policy and [prices] look at is now the deployment, or unknown (refused) with a fallback list."""
    p = sb.builtin_providers()[provider]
    headers = [("Authorization", "Bearer t"), ("api-key", "t"), ("Content-Type", "application/json")]
    swap = sb.find_token(p, headers, rest, "")
    assert sb.request_facts(p, "POST", headers, rest, swap, body, True, False).model == model


def test_an_empty_post_is_priced_too(priced: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    token = priced.mint("openai", fresh_agent("money-empty"), "--budget-usd", "1")
    resp = call(priced, "openai", token, "POST", "/v1/embeddings", b"")
    assert resp.status == 403 and "cannot read which model" in error_type_and_message(resp)[1], resp.body
    assert upstreams["openai"].requests == []


@pytest.mark.parametrize("obj", [
    {"contents": [], "generationConfig": {"maxOutputTokens": 10, "candidate_count": 8}},
    {"contents": [], "generationConfig": {"max_output_tokens": 100000}},
    {"contents": [], "generation_config": {"candidateCount": 8}},
])
def test_gemini_snake_case_bounds_are_refused_under_a_budget(obj: Dict[str, Any]) -> None:
    """Review finding: Google's JSON parser also reads proto field names (candidate_count), so
    a request could bill eight candidates while the reservation counted one."""
    with pytest.raises(sb.Forbidden) as info:
        sb.budget_reservation("gemini", "/v1beta/models/g:generateContent", json.dumps(obj).encode(), 10 ** 7)
    assert "camelCase" in info.value.message


@pytest.mark.parametrize("kind, path, obj, words", [
    ("gemini", "/v1beta/models/g:generateContent", {"contents": [], "cached_content": "cachedContents/1"}, "cached_content"),
    ("gemini", "/v1beta/models/g:generateContent", {"contents": [], "tools": [{"url_context": {}}]}, "tool"),
    ("gemini", "/v1beta/models/g:generateContent", {"contents": [], "tools": [{"google_search": {}}]}, "tool"),
    ("openai", "/v1/responses", {"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ("openai", "/v1/responses", {"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, "tool"),
    ("openai", "/v1/responses", {"model": "m", "input": "x", "tools": [{"type": "mcp", "server_url": "u"}]}, "tool"),
    ("openai", "/v1/responses", {"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tool"),
    ("anthropic", "/v1/messages", {"model": "c", "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tool"),
    ("anthropic", "/v1/messages", {"model": "c", "messages": [], "mcp_servers": [{"url": "u"}]}, "mcp_servers"),
])
def test_a_budget_refuses_provider_run_tools_and_stored_items(kind: str, path: str, obj: Dict[str, Any], words: str) -> None:
    """Review findings: server-side tools (search, URL context, file search, MCP) and stored
    items bring in input or fees the body does not show; a budget token refuses them."""
    with pytest.raises(sb.Forbidden) as info:
        sb.budget_reservation(kind, path, json.dumps(obj).encode(), 10 ** 7)
    assert words in info.value.message


@pytest.mark.parametrize("kind, path, obj", [
    ("openai", "/v1/chat/completions", {"model": "m", "messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("anthropic", "/v1/messages", {"model": "c", "messages": [], "tools": [{"name": "f", "input_schema": {}}]}),
    ("gemini", "/v1beta/models/g:generateContent", {"contents": [], "tools": [{"functionDeclarations": []}]}),
])
def test_a_budget_allows_the_agents_own_function_tools(kind: str, path: str, obj: Dict[str, Any]) -> None:
    amount, _ = sb.budget_reservation(kind, path, json.dumps(obj).encode(), 10 ** 7)
    assert amount > 0


def test_azure_deployments_are_read_whatever_the_case() -> None:
    p = sb.builtin_providers()["azure-openai"]
    headers = [("api-key", "t"), ("Content-Type", "application/json")]
    rest = "/OpenAI/Deployments/gpt45-prod/chat/completions"
    swap = sb.find_token(p, headers, rest, "")
    assert sb.request_facts(p, "POST", headers, rest, swap, b'{"model": "gpt-4o-mini"}', True, False).model == "gpt45-prod"
