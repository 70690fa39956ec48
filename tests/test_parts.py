"""Secrets with named parts (issue 14, items 1, 2a, 4 and 6): a secret may hold several parts
(`{"api_key": ..., "app_key": ...}` on stdin), each encrypted and bound to its row like a single
value, listed by name only, replaced one by one on rotation, and scrubbed from answers (but the
parts a provider calls public: identifiers every answer carries). Injection places name the parts
they take: Datadog's two headers, a Basic pair built from two parts, a custom provider's own.

Over real sockets the loopback upstreams check the exact credentials they receive; attacks: a
token of another provider, a part name that does not exist, a secret that lacks a part its
provider needs (refused at `token mint`, not a 502 later), a malformed JSON object."""

from __future__ import annotations

import base64
import configparser
import json
from pathlib import Path
from typing import Dict, Iterator

import pytest

from conftest import (
    Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, error_type_and_message, ok,
)
from conftest import load_broker_module

sb = load_broker_module()

DD = {"api_key": "test-dd-api-0123456789abcdef", "app_key": "test-dd-app-fedcba9876543210"}


def provider(text: str, name: str = "p") -> "sb.Provider":
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(f"[provider:{name}]\nupstream = http://127.0.0.1:9\n" + text)
    return sb.provider_from_section(name, parser[f"provider:{name}"])


# ============================================================================
# The pure units: packing, the parts a provider needs, filling places
# ============================================================================

def test_a_single_value_keeps_the_format_every_secret_had() -> None:
    assert sb.pack_parts({"key": "sk-test-abc"}) == b"sk-test-abc"
    assert sb.secret_parts(b"sk-test-abc") == {"key": "sk-test-abc"}


def test_parts_round_trip_and_are_bound_to_their_row() -> None:
    plain = sb.pack_parts(DD)
    assert plain.startswith(sb.PARTS_MAGIC) and sb.secret_parts(plain) == DD
    cipher = sb.SecretCipher(b"k" * 32)
    blob = cipher.encrypt(plain, sb.secret_ad("dd", "datadog"))
    assert sb.secret_parts(cipher.decrypt(blob, sb.secret_ad("dd", "datadog"))) == DD
    with pytest.raises(sb.DecryptError):                 # moved to another row: refused
        cipher.decrypt(blob, sb.secret_ad("other", "datadog"))
    with pytest.raises(sb.DecryptError):
        sb.secret_parts(sb.PARTS_MAGIC + b'{"a": 1}')


def test_part_problem_names_what_is_missing_unknown_or_unsafe() -> None:
    dd = sb.builtin_providers()["datadog"]
    assert sb.part_problem(DD, dd) == ""
    assert sb.part_problem({"api_key": "x" * 20}, dd) == ""            # app_key is optional
    assert "needs the part(s) api_key" in sb.part_problem({"app_key": "x" * 20}, dd)
    assert "no part(s) apikey" in sb.part_problem(dict(DD, apikey="x"), dd)
    assert "printable" in sb.part_problem(dict(DD, api_key="a\r\nX-Evil: 1"), dd)
    assert "printable" in sb.part_problem(dict(DD, app_key=""), dd)
    twilio = sb.builtin_providers()["twilio"]
    assert "account_sid" in sb.part_problem({"key": "test-auth"}, twilio)


def test_fill_puts_parts_in_and_never_reads_braces_in_values() -> None:
    assert sb.fill("{user}:{password}", {"user": "u{password}", "password": "p"}) == "u{password}:p"
    with pytest.raises(KeyError):
        sb.fill("{user}:{password}", {"user": "u"})


@pytest.mark.parametrize("text, error", [
    ("token = basic\ninject = basic\n", "inject = same"),
    ("token = basic\ninject = basic {user}{password}\n", "user:password"),
    ("token = header X-A\ninject = header X-A {Bad}\n", "bad value"),
    ("token = header X-A\ninject = header X-A {a}}\n", "bad value"),
    ("token = header X-A\ninject = header X-A {a}\n    header X-B {b}\nparts = a\n", "does not list"),
    ("token = header X-A\ninject = header X-A {a}\nparts = a b?\npublic = c\n", "public"),
    ("token = header X-A\ninject = header X-A\npublic = key\n", "public"),
    ("token = header X-A\ninject = header X-A {a}\nparts = a? \n", "optional"),
    ("token = header X-A\ninject = header X-A {a}\nparts = A\n", "parts are names"),
    ("token = header X-A\ninject = header X-A {a}\nenv = B= K S={a}\n", "env must be"),
    ("token = header X-A\ninject = header X-A\nenv = K B=/v1\n", "env must be"),
    ("token = header X-A\ninject = header X-A\nenv = B=/v1 C=/v2\n", "env must be"),
])
def test_bad_part_definitions_are_refused(text: str, error: str) -> None:
    with pytest.raises(sb.ConfigError) as exc:
        provider(text)
    assert error in str(exc.value), str(exc.value)


def test_a_provider_knows_its_parts() -> None:
    p = provider("token = header X-A\n    header X-B\ninject = header X-A {a}\n    header X-B Bearer {b}\n"
                 "parts = a b? c?\npublic = c\nenv = P_URL= P_KEY P_ID={c}\n")
    assert (p.parts, p.optional, p.public) == (("a", "b", "c"), ("b", "c"), ("c",))
    assert sb.builtin_providers()["openai"].parts == ("key",)
    assert sb.env_vars(p, "T", "http://b", {"c": "ID-1"}) == [("P_URL", "http://b/p"), ("P_KEY", "T"),
                                                             ("P_ID", "ID-1")]
    assert sb.env_vars(p, "T", "http://b") == [("P_URL", "http://b/p"), ("P_KEY", "T")]
    resend = sb.builtin_providers()["resend"]              # Python's and Node's SDKs read different names
    assert sb.env_vars(resend, "T", "http://b") == [("RESEND_API_URL", "http://b/resend"),
                                                    ("RESEND_BASE_URL", "http://b/resend"), ("RESEND_API_KEY", "T")]


def test_several_places_get_their_own_parts_and_an_absent_optional_one_is_left_out() -> None:
    dd = sb.builtin_providers()["datadog"]
    token = "seks_datadog_" + "A" * 43
    headers = [("DD-API-KEY", token), ("DD-APPLICATION-KEY", token), ("X-Other", "1")]
    swap = sb.find_token(dd, headers, "/api/v1/validate", "")
    out, _, _ = sb.swap_credentials(dd, swap, DD, headers, "/api/v1/validate", "")
    assert sorted((n.lower(), v) for n, v in out) == [("dd-api-key", DD["api_key"]),
                                                      ("dd-application-key", DD["app_key"]), ("x-other", "1")]
    out, _, _ = sb.swap_credentials(dd, swap, {"api_key": DD["api_key"]}, headers, "/api/v1/validate", "")
    assert sorted((n.lower(), v) for n, v in out) == [("dd-api-key", DD["api_key"]), ("x-other", "1")]


def test_parts_pairs_cover_every_part_but_the_public_ones() -> None:
    pairs = sb.parts_pairs({"account_sid": "AC" + "0" * 32, "auth_token": "test-auth-0123456789"}, ("account_sid",))
    assert any(v == b"test-auth-0123456789" for v, _ in pairs)
    assert not any(b"AC000" in v for v, _ in pairs)
    scrubbed = sb.Scrubber(sb.parts_pairs(DD)).scrub(json.dumps(DD).encode())
    assert DD["api_key"].encode() not in scrubbed and DD["app_key"].encode() not in scrubbed


# ============================================================================
# Over sockets: Datadog's two headers, a custom provider with a Basic pair and a query part
# ============================================================================

CONFIG = """
[provider:vault-like]
upstream = http://127.0.0.1:9
token = header X-Seks-Token
    header Authorization Bearer
inject = basic {user}:{password}
    header X-Tenant {tenant}
parts = user password tenant
public = user
env = VAULT_LIKE_URL= VAULT_LIKE_TOKEN VAULT_LIKE_USER={user}

[provider:querykey]
upstream = http://127.0.0.1:9
token = header X-Api-Key
inject = query app_key {app}
    header X-Api-Key {key}
parts = key app
"""
VAULT = {"user": "svc-reader@example.invalid", "password": "test-vault-password-0123456789", "tenant": "tenant-test-9876543210"}
QK = {"key": "test-querykey-key-0123456789", "app": "test-querykey-app-0123456789"}


def dd_strict(h: UpstreamHandler, req: RecordedRequest) -> None:
    """Datadog-like: both keys exactly once, no seks token anywhere; echo them like a debug page."""
    if req.header_all("DD-API-KEY") != [DD["api_key"]] or "seks_" in req.wire_text():
        h.send_json(403, {"errors": ["Forbidden"]})
        return
    app = req.header_all("DD-APPLICATION-KEY")
    h.send_json(200, {"valid": True, "app": "real" if app == [DD["app_key"]] else "absent" if not app else "wrong",
                      "debug": f"{DD['api_key']} {DD['app_key']}"})


@pytest.fixture(scope="module")
def ups() -> Iterator[Dict[str, FakeUpstream]]:
    servers = {name: FakeUpstream(name, key="unused") for name in ("datadog", "vault-like", "querykey", "openai")}
    servers["datadog"].set_responder(dd_strict)
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def parts_broker(broker_factory: Brokers, ups: Dict[str, FakeUpstream], tmp_path_factory: pytest.TempPathFactory) -> Broker:
    config = tmp_path_factory.mktemp("parts") / "seks.ini"
    config.write_text(CONFIG + "\n[upstream]\n" + "".join(f"{p} = {u.url}\n" for p, u in ups.items()))
    keys = {"datadog": json.dumps(DD), "vault-like": json.dumps(VAULT), "querykey": json.dumps(QK)}
    base = broker_factory.seed(("datadog", "vault-like", "querykey", "openai"), keys=keys, config=config,
                               via_cli=True)
    return broker_factory.serve(base)


@pytest.mark.parametrize("places", [("DD-API-KEY",), ("DD-APPLICATION-KEY",), ("DD-API-KEY", "DD-APPLICATION-KEY")])
def test_datadog_gets_both_keys_wherever_the_agent_put_its_token(
        parts_broker: Broker, ups: Dict[str, FakeUpstream], places: tuple) -> None:
    up = ups["datadog"]
    up.reset()
    up.set_responder(dd_strict)
    resp = parts_broker.request("GET", "/datadog/api/v1/validate",
                                {name: parts_broker.token("datadog") for name in places})
    assert resp.status == 200, resp.body
    body = json.loads(resp.body)
    assert body["app"] == "real"                  # the upstream got it; the agent never sees it
    assert DD["api_key"] not in resp.body.decode() and DD["app_key"] not in resp.body.decode()
    assert len(up.requests) == 1


def test_datadog_without_its_optional_app_key_sends_only_the_api_key(
        parts_broker: Broker, ups: Dict[str, FakeUpstream]) -> None:
    ok(parts_broker.cli("secret", "add", "dd-intake", "--provider", "datadog",
                        input=json.dumps({"api_key": DD["api_key"]})))
    token = parts_broker.mint("datadog", "dd-intake-agent", secret="dd-intake", via_cli=True)
    up = ups["datadog"]
    up.reset()
    up.set_responder(dd_strict)
    resp = parts_broker.request("POST", "/datadog/api/v2/series", {"DD-API-KEY": token, "DD-APPLICATION-KEY": token}, b"{}")
    assert resp.status == 200 and json.loads(resp.body)["app"] == "absent", resp.body


def test_a_token_of_another_provider_in_a_datadog_header_reaches_nobody(
        parts_broker: Broker, ups: Dict[str, FakeUpstream]) -> None:
    up = ups["datadog"]
    up.reset()
    for headers in ({"DD-API-KEY": parts_broker.token("openai")},
                    {"DD-APPLICATION-KEY": parts_broker.token("querykey")},
                    {"DD-API-KEY": "seks_datadog_" + "Z" * 43}):
        resp = parts_broker.request("GET", "/datadog/api/v1/validate", headers)
        assert resp.status in (401, 403), (headers, resp.body)
    assert up.requests == []


@pytest.mark.parametrize("auth", ["header", "bearer"])
def test_a_custom_provider_builds_basic_and_a_header_from_parts(
        parts_broker: Broker, ups: Dict[str, FakeUpstream], auth: str) -> None:
    up = ups["vault-like"]
    up.reset()
    pair = "Basic " + base64.b64encode(f"{VAULT['user']}:{VAULT['password']}".encode()).decode()
    up.set_responder(lambda h, req: h.send_json(
        200 if req.header_all("authorization") == [pair] and req.header_all("x-tenant") == [VAULT["tenant"]]
        and "seks_" not in req.wire_text() else 401,
        {"who": VAULT["user"], "debug": [VAULT["password"], VAULT["tenant"], pair]}))
    token = parts_broker.token("vault-like")
    resp = parts_broker.request("GET", "/vault-like/v1/secret/data/x",
                                {"X-Seks-Token": token} if auth == "header" else {"Authorization": f"Bearer {token}",
                                                                                  "X-Tenant": "tenant-chosen-by-agent"})
    assert resp.status == 200, resp.body
    text = resp.body.decode()
    assert VAULT["password"] not in text and VAULT["tenant"] not in text and pair.split()[1] not in text
    assert json.loads(resp.body)["who"] == VAULT["user"]        # public: an identifier, not masked


def test_a_custom_provider_puts_one_part_in_the_query_and_another_in_a_header(
        parts_broker: Broker, ups: Dict[str, FakeUpstream]) -> None:
    up = ups["querykey"]
    up.reset()
    up.set_responder(lambda h, req: h.send_json(
        200 if req.target.endswith(f"?x=1&app_key={QK['app']}") and req.header_all("x-api-key") == [QK["key"]]
        else 401, {"path": req.path}))
    resp = parts_broker.request("GET", "/querykey/find?x=1&app_key=agent-chosen",
                                {"X-Api-Key": parts_broker.token("querykey")})
    assert resp.status == 200, resp.body
    assert QK["app"] not in resp.body.decode()


def test_mint_env_hands_the_agent_public_parts_and_never_a_secret_one(parts_broker: Broker) -> None:
    out = ok(parts_broker.cli("token", "mint", "--secret", "vault-like-key", "--agent", "env-agent",
                              "--format", "env"))
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env["VAULT_LIKE_USER"] == VAULT["user"] and env["VAULT_LIKE_TOKEN"].startswith("seks_vault-like_")
    assert VAULT["password"] not in out and VAULT["tenant"] not in out


# ============================================================================
# The CLI: add, list, rotate; mistakes store nothing; a secret lacking a part gets no token
# ============================================================================

def test_secret_list_names_parts_and_never_values(parts_broker: Broker) -> None:
    out = ok(parts_broker.cli("secret", "list"))
    line = next(ln for ln in out.splitlines() if ln.startswith("datadog-key"))
    assert "api_key,app_key" in line
    for value in list(DD.values()) + list(VAULT.values()) + list(QK.values()):
        assert value not in out


@pytest.mark.parametrize("stdin, error", [
    (DD["api_key"], "pipe a JSON object"),
    ('{"api_key": "test-dd-0123456789", "api_key": "twice-0123456789"}', "pipe a JSON object"),
    ('{"api_key": 12345678901}', "pipe a JSON object"),
    ('["test-dd-0123456789"]', "pipe a JSON object"),
    ('{"app_key": "test-dd-app-0123456789"}', "needs the part(s) api_key"),
    ('{"api_key": "test-dd-0123456789", "apikey": "typo-0123456789"}', "no part(s) apikey"),
    ('{"api_key": "test-dd-0123456789\\r\\nX-Evil: 1"}', "printable"),
    ('{"api_key": "seks_datadog_' + "A" * 43 + '"}', "fake token"),
])
def test_a_bad_parts_object_stores_nothing(parts_broker: Broker, stdin: str, error: str) -> None:
    cp = parts_broker.cli("secret", "add", "dd-bad", "--provider", "datadog", input=stdin)
    assert cp.returncode != 0 and error in cp.stderr, cp.stderr
    assert "dd-bad" not in ok(parts_broker.cli("secret", "list"))
    assert "test-dd" not in cp.stderr + cp.stdout


def test_rotate_replaces_some_parts_and_keeps_the_others(
        parts_broker: Broker, ups: Dict[str, FakeUpstream]) -> None:
    ok(parts_broker.cli("secret", "add", "dd-rot", "--provider", "datadog",
                        input=json.dumps({"api_key": "test-dd-old-api-0123456789", "app_key": DD["app_key"]})))
    token = parts_broker.mint("datadog", "dd-rot-agent", secret="dd-rot", via_cli=True)
    up = ups["datadog"]
    up.reset()
    up.set_responder(dd_strict)
    assert parts_broker.request("GET", "/datadog/api/v1/validate", {"DD-API-KEY": token}).status == 403
    ok(parts_broker.cli("secret", "rotate", "dd-rot", input=json.dumps({"api_key": DD["api_key"]})))
    resp = parts_broker.request("GET", "/datadog/api/v1/validate", {"DD-API-KEY": token})
    assert resp.status == 200 and json.loads(resp.body)["app"] == "real", resp.body
    ok(parts_broker.cli("secret", "rotate", "dd-rot", input='{"app_key": null}'))     # optional: removable
    resp = parts_broker.request("GET", "/datadog/api/v1/validate", {"DD-API-KEY": token})
    assert resp.status == 200 and json.loads(resp.body)["app"] == "absent", resp.body
    cp = parts_broker.cli("secret", "rotate", "dd-rot", input='{"api_key": null}')
    assert cp.returncode != 0 and "only an optional part" in cp.stderr


def test_a_secret_lacking_a_part_its_provider_needs_gets_no_token(
        broker_factory: Brokers, ups: Dict[str, FakeUpstream], tmp_path: Path) -> None:
    """The provider's definition gained a part after the secret was stored: `token mint` says
    which part and how to add it; a token minted before answers 502 naming no value."""
    config = tmp_path / "seks.ini"
    config.write_text("[provider:grow]\nupstream = %s\ntoken = header X-Api-Key\n"
                      "inject = header X-Api-Key {key}\n" % ups["querykey"].url)
    base = broker_factory.seed(("grow",), keys={"grow": QK["key"]}, config=config,
                               via_cli=True)
    config.write_text(config.read_text() + "    header X-App {app}\n")
    cp = base.cli("token", "mint", "--secret", "grow-key", "--agent", "late")
    assert cp.returncode != 0 and "needs the part(s) app" in cp.stderr and "secret rotate grow-key" in cp.stderr
    served = broker_factory.serve(base)
    up = ups["querykey"]
    up.reset()
    resp = served.request("GET", "/grow/x", {"X-Api-Key": base.token("grow")})
    assert resp.status == 502 and "lacks a part" in error_type_and_message(resp)[1], resp.body
    assert up.requests == [] and QK["key"] not in resp.body.decode()
    ok(base.cli("secret", "rotate", "grow-key", input=json.dumps({"app": QK["app"]})))
    up.set_responder(lambda h, req: h.send_json(200 if req.header_all("x-app") == [QK["app"]] else 401, {}))
    assert served.request("GET", "/grow/x", {"X-Api-Key": base.token("grow")}).status == 200



def test_run_gives_the_command_public_parts_and_drops_every_secret_part(parts_broker: Broker, tmp_path: Path) -> None:
    """`run`: the command gets the token in each key variable and the public part; a variable of
    the operator's that holds any secret part (here Datadog's app key, the vault's tenant) is
    removed; one that holds only a public part (the vault's user name) stays."""
    import sys
    out = tmp_path / "env.json"
    child = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"
    env = dict(parts_broker.env, MY_DD=f"x{DD['app_key']}x", MY_TENANT=VAULT["tenant"], MY_USER=VAULT["user"])
    cp = parts_broker.cli("run", "--agent", "run-parts", "--secret", "datadog-key", "--secret", "vault-like-key",
                          "--", sys.executable, "-c", child, str(out), env=env)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(out.read_text())
    assert got["DD_API_KEY"].startswith("seks_datadog_") and got["DD_APP_KEY"] == got["DD_API_KEY"]
    assert got["VAULT_LIKE_USER"] == VAULT["user"] and got["MY_USER"] == VAULT["user"]
    assert "MY_DD" not in got and "MY_TENANT" not in got
    assert "removed MY_DD" in cp.stderr and "removed MY_TENANT" in cp.stderr
    text = out.read_text() + cp.stdout + cp.stderr
    assert not any(v in text for v in (DD["api_key"], DD["app_key"], VAULT["password"], VAULT["tenant"]))


def test_only_a_pem_key_may_span_lines() -> None:
    aws = sb.builtin_providers()["aws"]
    good = {"access_key_id": "TEST-AWS-KEY-ID-0000", "secret_access_key": "test-secret-0123456789"}
    assert sb.part_problem(good, aws) == ""
    assert "one line" in sb.part_problem(dict(good, access_key_id="TEST-AWS\r\nX-Evil: 1"), aws)
    github = sb.builtin_providers()["github-app"]
    pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"
    assert sb.part_problem({"app_id": "1", "installation_id": "2", "private_key": pem}, github) == ""
    assert "one line" in sb.part_problem({"app_id": "1\n2", "installation_id": "2", "private_key": pem}, github)


def test_a_short_secret_part_is_masked_too() -> None:
    """Review 4, F3: a 7-character password part came back verbatim (parts under 8 were skipped)."""
    pairs = sb.parts_pairs({"user": "svc-reader", "password": "hunt3r2"}, ("user",))
    assert b"hunt3r2" not in sb.Scrubber(pairs).scrub(b"login svc-reader:hunt3r2 failed")
    assert b"svc-reader" in sb.Scrubber(pairs).scrub(b"login svc-reader:hunt3r2 failed")
