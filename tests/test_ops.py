"""Running the broker for real (issue 4): TLS both ways, custom providers from a config file,
config precedence and `config check`, /metrics on the admin port, logs, graceful shutdown,
key management (secret rotate, rotate-master-key incl. a SIGKILL mid-rotation, commands and
loads racing a rotation, one rotation at a time, backup that follows no link), invalid
configurations as clear errors, the `token mint --format env` hand-off, --version, and other
CPython versions.

Every test talks to a real `seks_broker.py serve` subprocess over 127.0.0.1 sockets; the fake
upstreams check that the real key arrived exactly where the provider expects it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import configparser
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import (
    BROKER_PY, MASTER_KEY, REAL_KEYS, Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, broker_command,
    assert_token_absent, audit_json, auth_headers, broker_env, default_responder, free_port,
    key_check_failure, key_checked, load_broker_module, ok, run_cli, secret_name, seed_broker, wait_until,
)
from raw_http import SocketReader
from ops_helpers import (
    OPENSSL, connect_refused, make_ca_and_leaf, make_self_signed, parse_exposition, sample_value,
    write_private,
)

OPS_PROVIDERS = ("openai", "anthropic", "gemini", "groq", "telegram")
sb = load_broker_module()    # the file the subprocesses run (SEKS_TEST_BROKER)
VERSION = re.search(r'^__version__ = "([^"]+)"', BROKER_PY.read_text(), re.M).group(1)  # type: ignore[union-attr]


# ============================================================================
# Fixtures
# ============================================================================

@pytest.fixture(scope="module")
def ops_db(broker_factory: Brokers) -> Broker:
    """One DB for most tests here: a secret and a token per OPS_PROVIDERS (SEKS_MASTER_KEY); the
    tests start serve processes on it with the flags, env and config they are about."""
    return broker_factory.seed(OPS_PROVIDERS)


def env_for(upstreams: Dict[str, FakeUpstream], extra: Optional[Dict[str, str]] = None,
            master_key: Optional[str] = MASTER_KEY, **urls: str) -> Dict[str, str]:
    mapping = {p: u.url for p, u in upstreams.items()}
    mapping.update(urls)
    return broker_env(mapping, extra, master_key)


def get(b: Broker, provider: str, token: str, path: str = "/v1/models", **kw: Any):  # type: ignore[no-untyped-def]
    return b.request("GET", f"/{provider}{path}", headers=auth_headers(provider, token), **kw)


# ============================================================================
# 1. TLS to agents, TLS to upstreams
# ============================================================================

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    if OPENSSL is None:
        pytest.skip("the openssl binary is not installed: cannot make a throwaway certificate")
    d = tmp_path_factory.mktemp("certs")
    agent_cert, agent_key = make_self_signed(d, "agent")
    ca, leaf, leaf_key = make_ca_and_leaf(d, "upstream")
    return SimpleNamespace(agent_cert=agent_cert, agent_key=agent_key, ca=ca, leaf=leaf,
                           leaf_key=leaf_key, dir=d)


@pytest.fixture(scope="module")
def tls_broker(ops_db: Broker, upstreams: Dict[str, FakeUpstream], certs: SimpleNamespace,
               broker_factory: Brokers) -> Broker:
    return broker_factory.serve(ops_db, "--tls-cert", str(certs.agent_cert), "--tls-key", str(certs.agent_key),
                                env=env_for(upstreams), name="tls")


def trusting_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_tls_agent_gets_proxied_answer(tls_broker: Broker, ops_db: Broker,
                                       upstreams: Dict[str, FakeUpstream], certs: SimpleNamespace) -> None:
    assert tls_broker.scheme == "https", tls_broker.ready_line
    ctx = trusting_context(certs.agent_cert)
    conn = http.client.HTTPSConnection("127.0.0.1", tls_broker.port, context=ctx, timeout=15)
    try:
        conn.request("GET", "/openai/v1/models", headers=auth_headers("openai", ops_db.tokens["openai"]))
        resp = conn.getresponse()
        body = resp.read()
        assert conn.sock is not None
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        # keep-alive over TLS: a second request on the same connection
        conn.request("GET", "/openai/v1/models/x", headers=auth_headers("openai", ops_db.tokens["openai"]))
        resp2 = conn.getresponse()
        resp2.read()
    finally:
        conn.close()
    assert resp.status == 200, body[:300]
    assert json.loads(body)["provider"] == "openai"
    assert resp2.status == 200
    reqs = upstreams["openai"].requests
    assert len(reqs) == 2
    for req in reqs:
        assert key_check_failure("openai", REAL_KEYS["openai"], req) is None
        assert_token_absent(req, ops_db.tokens["openai"])


def test_tls_client_not_trusting_the_cert_fails_verification(tls_broker: Broker) -> None:
    """The broker really presents the operator's certificate (a default client rejects it)."""
    ctx = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_tls_1_1_and_below_refused(tls_broker: Broker, ops_db: Broker, certs: SimpleNamespace,
                                   upstreams: Dict[str, FakeUpstream]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.agent_cert))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")   # let this client really offer TLS 1.0/1.1
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as info:
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.close()
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value).upper(), \
        f"this client could not even offer TLS 1.1 ({info.value}); the test proves nothing"
    # TLS 1.2 exactly is accepted, and the broker is still serving
    ctx12 = trusting_context(certs.agent_cert)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    r = tls_broker.request("GET", "/openai/v1/models",
                           headers=auth_headers("openai", ops_db.tokens["openai"]), context=ctx12)
    assert r.status == 200


def test_plain_http_to_tls_port_is_not_proxied(tls_broker: Broker, ops_db: Broker,
                                               upstreams: Dict[str, FakeUpstream], certs: SimpleNamespace) -> None:
    req = (f"GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           f"Authorization: Bearer {ops_db.tokens['openai']}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as s:
        s.sendall(req)
        s.settimeout(5)
        rd = SocketReader(s)
        try:
            rd.rest()
        except socket.timeout:
            pass
    data = rd.raw
    assert not re.match(rb"HTTP/1\.[01] 2\d\d", data), data[:200]
    assert b"sk-test" not in data and b'"provider"' not in data
    assert upstreams["openai"].requests == []
    # and the TLS listener still works afterwards
    r = tls_broker.request("GET", "/openai/v1/models",
                           headers=auth_headers("openai", ops_db.tokens["openai"]),
                           context=trusting_context(certs.agent_cert))
    assert r.status == 200


@pytest.mark.parametrize("case", ["missing-cert-file", "cert-without-key"])
def test_tls_misconfiguration_refused_at_start(case: str, ops_db: Broker, certs: SimpleNamespace,
                                               tmp_path: Path) -> None:
    args = ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(certs.agent_key)] \
        if case == "missing-cert-file" else ["--tls-cert", str(certs.agent_cert)]
    cp = subprocess.run([sys.executable, str(BROKER_PY), "--db", str(ops_db.db), "serve",
                         "--host", "127.0.0.1", "--port", "0", *args], capture_output=True, text=True,
                        timeout=30, env=broker_env(), stdin=subprocess.DEVNULL)
    assert cp.returncode in (1, 2), cp.stderr
    assert "listening" not in cp.stderr
    assert re.search(r"tls|certificate", cp.stderr, re.I), cp.stderr
    assert "Traceback" not in cp.stderr, cp.stderr


@pytest.fixture(scope="module")
def tls_upstreams(certs: SimpleNamespace) -> Iterator[Dict[str, FakeUpstream]]:
    ups = {p: FakeUpstream(p, tls=(certs.leaf, certs.leaf_key)) for p in ("openai", "anthropic")}
    yield ups
    for u in ups.values():
        u.stop()


@pytest.mark.parametrize("mode", ["default-trust", "upstream-ca-flag", "ssl-cert-file-env",
                                  "upstream-ca-config", "insecure-upstream"])
def test_upstream_tls(mode: str, ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                      tls_upstreams: Dict[str, FakeUpstream], certs: SimpleNamespace,
                      procs: Brokers, tmp_path: Path) -> None:
    for u in tls_upstreams.values():
        u.reset()
    extra: Dict[str, str] = {}
    args: List[str] = []
    config = None
    if mode == "upstream-ca-flag":
        args = ["--upstream-ca", str(certs.ca)]
    elif mode == "ssl-cert-file-env":
        extra = {"SSL_CERT_FILE": str(certs.ca)}
    elif mode == "upstream-ca-config":
        config = tmp_path / "seks.ini"
        config.write_text(f"[upstream]\nca_file = {certs.ca}\n")
    elif mode == "insecure-upstream":
        args = ["--insecure-upstream", "openai"]
    env = env_for(upstreams, extra, openai=tls_upstreams["openai"].url,
                  anthropic=tls_upstreams["anthropic"].url)
    b = procs.serve(ops_db, *args, env=env, config=config, name=f"uptls-{mode}")
    r = get(b, "openai", ops_db.tokens["openai"])
    r_anth = b.request("POST", "/anthropic/v1/messages", body=b"{}",
                       headers=auth_headers("anthropic", ops_db.tokens["anthropic"]))
    if mode == "default-trust":
        assert r.status == 502, r.body[:300]
        assert tls_upstreams["openai"].requests == [], "request sent over an unverified connection"
        assert tls_upstreams["openai"].handshake_failures, "no TLS handshake was even tried"
        assert r_anth.status == 502
        return
    assert r.status == 200, r.body[:300]
    req = tls_upstreams["openai"].only_request()
    assert key_check_failure("openai", REAL_KEYS["openai"], req) is None
    assert_token_absent(req, ops_db.tokens["openai"])
    if mode == "insecure-upstream":
        # only the named provider is unverified: anthropic on the same private CA still fails
        assert r_anth.status == 502, r_anth.body[:300]
        assert tls_upstreams["anthropic"].requests == []
        warning = [ln for ln in b.stderr_text().splitlines() if "openai" in ln and
                   re.search(r"insecure|verif", ln, re.I)]
        assert warning, f"no loud warning naming openai on stderr:\n{b.stderr_text()[-2000:]}"
        assert any(re.search(r"warn", ln, re.I) for ln in warning), warning
        assert any(re.search(r"\bOFF\b|not verified|disabled", ln, re.I) for ln in warning), warning
    else:
        assert r_anth.status == 200, r_anth.body[:300]
        assert "insecure" not in b.stderr_text().lower()


# ============================================================================
# 2. Custom providers from a config file, every injection style
# ============================================================================

CUSTOM_KEYS = {
    "hdr-bearer": "sk-test-custom-bearer-0123456789",
    "xkey": "sk-test-custom-xkey-0123456789",
    "qparam": "sk-test-custom-query-0123456789",
    "pathkey": "sk-test-custom-path-0123456789",
    "pathglue": "sk-test-custom-glue-0123456789",
    "moved": "sk-test-custom-moved-0123456789",
}
CUSTOM_BASES = {"hdr-bearer": "/hb", "xkey": "/xk", "qparam": "/qp", "pathkey": "/pp",
                 "pathglue": "/pg", "moved": "/mv"}


def custom_config(url: str) -> str:
    return f"""\
# custom providers: one per injection style
[server]
host = 127.0.0.1

[provider:hdr-bearer]
upstream = {url}/hb
token = header Authorization Bearer
inject = same

[provider:xkey]
upstream = {url}/xk
token = header X-Api-Key
inject = same

[provider:qparam]
upstream = {url}/qp
token = query api_key
inject = same

[provider:pathkey]
upstream = {url}/pp
token = path-prefix /k/
inject = same

[provider:pathglue]
upstream = {url}/pg
token = path-prefix /tok /file/tok
inject = same

[provider:moved]
upstream = {url}/mv
token = header Authorization Bearer
inject = query key
"""


def custom_key_failure(req: RecordedRequest) -> Optional[str]:
    """The real key must be exactly in the provider's injection place, and nowhere else."""
    base = "/" + req.path.split("/")[1]
    name = next((n for n, b in CUSTOM_BASES.items() if b == base), None)
    if name is None:
        return f"unknown base {base}"
    key = CUSTOM_KEYS[name]
    auth, xkey = req.header_all("Authorization"), req.header_all("X-Api-Key")
    q = req.query
    in_target = key in urllib.parse.unquote(req.target)
    in_path = key in urllib.parse.unquote(req.path)
    if name == "hdr-bearer":
        good = auth == [f"Bearer {key}"] and not xkey and not in_target
    elif name == "xkey":
        good = xkey == [key] and not auth and not in_target
    elif name == "qparam":
        good = q.get("api_key") == [key] and not auth and not xkey and not in_path
    elif name == "pathkey":
        good = req.path.startswith(f"/pp/k/{key}/") and not auth and not xkey and \
            key not in urllib.parse.unquote(req.target.partition("?")[2])
    elif name == "pathglue":
        good = (req.path.startswith(f"/pg/tok{key}/") or req.path.startswith(f"/pg/file/tok{key}/")) \
            and not auth and not xkey and key not in urllib.parse.unquote(req.target.partition("?")[2])
    else:  # moved: token arrives as a Bearer header, key goes into ?key=
        good = q.get("key") == [key] and not auth and not xkey and not in_path
    return None if good else f"{name}: auth={auth} x-api-key={xkey} query={q} path={req.path}"


def custom_responder(h: UpstreamHandler, req: RecordedRequest) -> None:
    why = custom_key_failure(req)
    if why:
        h.send_json(401, {"error": why})
        return
    h.send_json(200, {"ok": True, "path": req.path, "target": req.target})


@pytest.fixture(scope="module")
def custom_upstream() -> Iterator[FakeUpstream]:
    u = FakeUpstream("openai")
    u.set_responder(custom_responder)
    yield u
    u.stop()


@pytest.fixture(scope="module")
def custom_setup(tmp_path_factory: pytest.TempPathFactory, custom_upstream: FakeUpstream,
                 broker_factory: Brokers) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("custom")
    config = d / "seks.ini"
    config.write_text(custom_config(custom_upstream.url))
    db = seed_broker(d, list(CUSTOM_KEYS), keys=CUSTOM_KEYS, config=config)
    b = broker_factory.serve(db, env=broker_env(), config=config, name="custom")
    return SimpleNamespace(db=db, broker=b, config=config)


CUSTOM_CASES = [
    # name, agent request target, headers(token) -> expected upstream target (with K = real key)
    ("hdr-bearer", "/hdr-bearer/v1/items?limit=2", lambda t: {"Authorization": f"Bearer {t}"},
     "/hb/v1/items?limit=2"),
    ("xkey", "/xkey/v2/search?q=cats", lambda t: {"X-Api-Key": t}, "/xk/v2/search?q=cats"),
    ("qparam", "/qparam/v1/search?q=dogs&api_key={T}&n=1", lambda t: {},
     "/qp/v1/search?q=dogs&api_key={K}&n=1"),
    ("pathkey", "/pathkey/k/{T}/v1/run?x=1", lambda t: {}, "/pp/k/{K}/v1/run?x=1"),
    ("pathglue", "/pathglue/tok{T}/v1/run", lambda t: {}, "/pg/tok{K}/v1/run"),
    ("pathglue-2nd-prefix", "/pathglue/file/tok{T}/doc.txt", lambda t: {}, "/pg/file/tok{K}/doc.txt"),
    ("moved", "/moved/v1/things?a=b", lambda t: {"Authorization": f"Bearer {t}"},
     "/mv/v1/things?a=b&key={K}"),
]


@pytest.mark.parametrize("name,target,headers,expected", CUSTOM_CASES, ids=[c[0] for c in CUSTOM_CASES])
def test_custom_provider_injection(name: str, target: str, headers: Callable[[str], Dict[str, str]],
                                   expected: str, custom_setup: SimpleNamespace,
                                   custom_upstream: FakeUpstream) -> None:
    custom_upstream.reset()
    custom_upstream.set_responder(custom_responder)
    name = name.split("-2nd")[0]
    token = custom_setup.db.tokens[name]
    assert token.startswith(f"seks_{name}_"), token
    r = custom_setup.broker.request("GET", target.replace("{T}", token), headers=headers(token))
    assert r.status == 200, r.body[:400]
    req = custom_upstream.only_request()
    assert custom_key_failure(req) is None
    key = CUSTOM_KEYS[name]
    assert req.target == expected.replace("{K}", key), req.target
    assert_token_absent(req, token)
    # the key is in exactly one place on the wire
    head = req.target + "\n" + "\n".join(f"{k}: {v}" for k, v in req.headers)
    assert head.count(key) == 1, head


def test_custom_provider_token_in_wrong_place_is_401(custom_setup: SimpleNamespace,
                                                     custom_upstream: FakeUpstream) -> None:
    custom_upstream.reset()
    token = custom_setup.db.tokens["xkey"]
    r = custom_setup.broker.request("GET", "/xkey/v1/x", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 401
    token = custom_setup.db.tokens["qparam"]
    r = custom_setup.broker.request("GET", "/qparam/v1/x", headers={"X-Api-Key": token})
    assert r.status == 401
    # a token of one custom provider does not open another
    r = custom_setup.broker.request("GET", "/hdr-bearer/v1/x",
                                    headers={"Authorization": f"Bearer {custom_setup.db.tokens['moved']}"})
    assert r.status == 403
    assert custom_upstream.requests == []


def test_custom_provider_logs_never_show_keys_or_tokens(custom_setup: SimpleNamespace,
                                                        custom_upstream: FakeUpstream) -> None:
    custom_upstream.reset()
    custom_upstream.set_responder(custom_responder)
    logged = len(custom_setup.broker.lines_after_ready())
    for name, target, headers, _ in CUSTOM_CASES:
        token = custom_setup.db.tokens[name.split("-2nd")[0]]
        custom_setup.broker.request("GET", target.replace("{T}", token), headers=headers(token))
    custom_setup.broker.wait_for_lines(logged + len(CUSTOM_CASES))    # each request's line, written after it
    text = custom_setup.broker.stderr_text()
    for name, token in custom_setup.db.tokens.items():
        assert token not in text, f"{name} token in the log"
        assert token.split("_", 2)[2] not in text
    for key in CUSTOM_KEYS.values():
        assert key not in text


def test_custom_provider_env_handoff(custom_setup: SimpleNamespace) -> None:
    env = dict(custom_setup.db.env, SEKS_PORT=str(custom_setup.broker.port))
    out = ok(custom_setup.db.cli("token", "mint", "--secret", "hdr-bearer-key", "--agent", "a1",
                                 "--format", "env", env=env))
    lines = out.strip().splitlines()
    assert lines[0] == f"HDR_BEARER_BASE_URL=http://127.0.0.1:{custom_setup.broker.port}/hdr-bearer", out
    assert re.match(r"^HDR_BEARER_API_KEY=seks_hdr-bearer_[A-Za-z0-9_-]{43}$", lines[1]), out


def test_inject_query_drops_the_agents_own_parameter() -> None:
    """A custom provider with `inject = query NAME` forwards the real key as NAME once: the
    agent's own NAME parameter (in any spelling) is a credential place and goes."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string("[provider:search]\nupstream = https://search.internal.example/api/v2\n"
                       "token = header X-Api-Key\ninject = query api_key\n")
    provider = sb.provider_from_section("search", parser["provider:search"])
    headers = [("X-Api-Key", "seks_search_abc")]
    swap = sb.find_token(provider, headers, "/find", "q=x&api_key=MINE&api%5Fkey=AGAIN")
    assert swap is not None
    _, _, query = sb.swap_credentials(provider, swap, {"key": "sk-test-real"}, headers, "/find",
                                      "q=x&api_key=MINE&api%5Fkey=AGAIN")
    assert query == "q=x&api_key=sk-test-real", query


# ============================================================================
# 3. Config precedence and `config check`
# ============================================================================

def post_size(b: Broker, token: str, n: int) -> int:
    return b.request("POST", "/openai/v1/files", body=b"x" * n,
                     headers=auth_headers("openai", token)).status


def test_config_precedence_file_env_flag(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                         procs: Brokers, tmp_path: Path) -> None:
    cfg = tmp_path / "limits.ini"
    cfg.write_text("[limits]\nmax_body = 1000\n")
    tok = ops_db.tokens["openai"]
    # four brokers on the one DB, each left running (the fixture stops them all at the end)
    # file only (found through $SEKS_CONFIG)
    b = procs.serve(ops_db, env=env_for(upstreams, {"SEKS_CONFIG": str(cfg)}), name="prec-file")
    assert post_size(b, tok, 900) == 200
    assert post_size(b, tok, 1500) == 413
    # env beats file
    b = procs.serve(ops_db, env=env_for(upstreams, {"SEKS_MAX_BODY": "2000"}), config=cfg,
                    name="prec-env")
    assert post_size(b, tok, 1500) == 200
    assert post_size(b, tok, 2500) == 413
    # flag beats env
    b = procs.serve(ops_db, "--max-body", "3000", env=env_for(upstreams, {"SEKS_MAX_BODY": "2000"}),
                    config=cfg, name="prec-flag")
    assert post_size(b, tok, 2500) == 200
    assert post_size(b, tok, 3500) == 413
    # --config beats $SEKS_CONFIG
    other = tmp_path / "other.ini"
    other.write_text("[limits]\nmax_body = 5000\n")
    b = procs.serve(ops_db, env=env_for(upstreams, {"SEKS_CONFIG": str(cfg)}), config=other,
                    name="prec-config-flag")
    assert post_size(b, tok, 4000) == 200
    assert post_size(b, tok, 6000) == 413


def test_serve_refuses_invalid_config_naming_the_line(ops_db: Broker, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.ini"
    cfg.write_text("[server]\nhost = 127.0.0.1\n\n[limits]\nmax_body = lots\n")
    cp = subprocess.run([sys.executable, str(BROKER_PY), "--db", str(ops_db.db), "--config", str(cfg),
                         "serve", "--port", "0"], capture_output=True, text=True, timeout=30,
                        env=broker_env(), stdin=subprocess.DEVNULL)
    assert cp.returncode == 1, cp.stderr
    assert f"{cfg}:5:" in cp.stderr and "max_body" in cp.stderr, cp.stderr
    assert "listening" not in cp.stderr


# (kind, file text, line the error is on, words the message must hold)
CHECK_CASES = [
    ("bad-int", "# limits\n[server]\nport = 8787\n\n[limits]\nmax_connections = lots\n", 6,
     ["max_connections"]),
    ("bad-port", "[server]\n\nport = 70000\n", 3, ["port"]),
    ("bad-size", "[limits]\n# bodies\n\nmax_body = 12 parsecs\n", 4, ["max_body", "size"]),
    ("bad-duration", "[limits]\nmax_body = 1MiB\nclient_timeout = soon\n", 3, ["client_timeout"]),
    ("bad-bool", "[log]\nformat = text\nlevel = info\nquiet = maybe\n", 4, ["quiet"]),
    ("bad-choice", "[log]\n\nformat = xml\n", 3, ["text", "json"]),
    ("unknown-key", "[server]\nhost = 127.0.0.1\nlisten = 0.0.0.0\n", 3, ["listen"]),
    ("unknown-section", "[server]\nhost = 127.0.0.1\n\n[serverz]\nhost = x\n", 4, ["serverz"]),
    ("bad-provider-name", "[server]\nport = 1\n\n[provider:Bad_Name]\nupstream = http://127.0.0.1:9\n"
     "token = header X-Api-Key\n", 4, ["Bad_Name"]),
    ("missing-upstream", "[server]\nport = 1\n[provider:nourl]\ntoken = header X-Api-Key\ninject = same\n",
     3, ["upstream"]),
    ("missing-token", "\n\n[provider:notoken]\nupstream = http://127.0.0.1:9\n", 3, ["token"]),
    ("bad-credential-place", "[provider:cookie]\nupstream = http://127.0.0.1:9\n\ntoken = cookie sid\n",
     4, ["cookie sid"]),
    ("bad-inject-place", "[provider:inj]\nupstream = http://127.0.0.1:9\ntoken = header X-Api-Key\n"
     "inject = path-prefix /k\n", 4, ["inject"]),
    ("part-not-listed", "[provider:ok]\nupstream = http://127.0.0.1:9\ntoken = header X-A\n\n[provider:bad]\n"
     "upstream = http://127.0.0.1:9\ntoken = header X-A\ninject = header X-A {a}\n    header X-B {b}\nparts = a\n",
     8, ["does not list"]),                                   # issue 14: parts
    ("bad-upstream-url", "[server]\nport = 1\n\n[upstream]\nopenai = ftp://127.0.0.1/x\n", 5,
     ["openai", "ftp://127.0.0.1/x"]),
    ("bad-provider-upstream-url", "[provider:ftpish]\ntoken = header X-Api-Key\n\n"
     "upstream = ftp://127.0.0.1/x\n", 4, ["ftp://127.0.0.1/x"]),
    ("override-unknown-provider", "[server]\nport = 1\n\n[upstream]\nnosuch = http://127.0.0.1:9\n", 5,
     ["nosuch"]),
    ("insecure-unknown-provider", "[server]\nport = 1\n[upstream]\ninsecure = nosuch\n", 4, ["nosuch"]),
    ("duplicate-key", "[server]\nport = 1\nport = 2\n", 3, ["port"]),
    ("basic-inject", "[provider:b]\nupstream = http://127.0.0.1:9\ntoken = basic\ninject = basic\n", 4,
     ["inject = same"]),
    ("extra-inject-not-a-header", "[provider:two]\nupstream = http://127.0.0.1:9\ntoken = header A\n"
     "inject = header A\n    query k\n", 4, ["inject", "headers"]),
    ("bad-price", "[prices]\ngpt-x = cheap\n", 2, ["[prices] gpt-x"]),
    ("empty-inject", "[provider:e]\nupstream = http://127.0.0.1:9\ntoken = header A\ninject =\n", 4,
     ["inject", "got ''"]),
]


@pytest.mark.parametrize("kind,text,line,words", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_config_check_error_names_its_line(kind: str, text: str, line: int, words: List[str],
                                           tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.ini"
    path.write_text(text)
    cp = run_cli(tmp_path / "unused.db", "config", "check", str(path))
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, out
    assert "OK" not in cp.stdout
    located = [ln for ln in out.splitlines() if ln.startswith(f"{path}:{line}:")
               or (f"{path}" in ln and re.search(rf"\[line\s+{line}\]", ln))]
    assert located, f"{kind}: no error names {path.name} line {line}:\n{out}"
    for word in words:
        assert any(word in ln for ln in located), f"{kind}: {word!r} not in {located}"
    assert not (tmp_path / "unused.db").exists(), "config check must not create a database"


def test_config_check_reports_every_error_at_once(tmp_path: Path) -> None:
    path = tmp_path / "many.ini"
    path.write_text("[server]\nport = x\nlisten = y\n\n[limits]\nmax_body = huge\n\n"
                    "[provider:ok-one]\nupstream = http://127.0.0.1:9\ntoken = header X-Api-Key\n\n"
                    "[log]\nformat = yaml\n")
    cp = run_cli(tmp_path / "unused.db", "config", "check", str(path))
    assert cp.returncode == 1
    for line in (2, 3, 6, 13):
        assert f"{path}:{line}:" in cp.stdout, cp.stdout
    assert "4 error(s)" in cp.stdout, cp.stdout


def test_config_check_good_file(tmp_path: Path) -> None:
    samples = {"path": "/tmp/seks-test-file", "str": "127.0.0.1", "port": "8788", "int": "2",
               "duration": "30s", "bool": "true", "size": "1MiB", "list": "openai"}
    sections: Dict[str, List[str]] = {}
    for spec in sb.SETTINGS:
        value = spec.kind.split(":", 1)[1].split(",")[0] if spec.kind.startswith("choice:") \
            else "http://127.0.0.1:9/hook" if spec.name == "alert_webhook" else samples[spec.kind]
        sections.setdefault(spec.section, []).append(f"{spec.key} = {value}")
    sections.setdefault("upstream", []).append("openai = http://127.0.0.1:9/v1")
    text = "# every setting the broker knows\n"
    for section, lines in sections.items():
        text += f"[{section}]\n" + "\n".join(lines) + "\n\n"
    text += ("[provider:internal-llm]\nupstream = http://127.0.0.1:9/api\ntoken = header Authorization Bearer\n"
             "    header X-Api-Key\ninject = header Authorization Bearer\nusage = openai\n"
             "env = INTERNAL_BASE_URL=/v1 INTERNAL_KEY\n")
    path = tmp_path / "good.ini"
    path.write_text(text)
    cp = run_cli(tmp_path / "unused.db", "config", "check", str(path))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "OK" in cp.stdout and "internal-llm" in cp.stdout, cp.stdout


@pytest.mark.parametrize("env_extra, args", [
    ({"SEKS_UPSTREAM_OPENAI": "http://[::1"}, ["secret", "list"]),
    ({}, ["--config", "{bad_ini}", "secret", "list"]),
    ({}, ["config", "check", "{bad_ini}"]),
])
def test_invalid_configuration_is_a_clear_error_not_a_traceback(tmp_path: Path, env_extra: Dict[str, str],
                                                                args: List[str]) -> None:
    """An invalid upstream URL or a config file that is not UTF-8 is a clear error, exit 1 or 2."""
    bad = tmp_path / "bad.ini"
    bad.write_bytes(b"# caf\xe9\n[upstream]\n")
    env = {**broker_env(), **env_extra}
    argv = [a.replace("{bad_ini}", str(bad)) for a in args]
    cp = subprocess.run([sys.executable, str(BROKER_PY), "--db", str(tmp_path / "x.db"), *argv],
                        capture_output=True, text=True, env=env, timeout=30)
    assert cp.returncode in (1, 2), cp
    assert "Traceback" not in cp.stderr and "error" in cp.stderr, cp.stderr


@pytest.mark.parametrize("ini, words", [
    ("[server]\ntls_cert = cert.pem\n", "tls_key"),
    ("[server]\nadmin_port = 65535\nworkers = 2\n", "admin_port"),
])
def test_config_check_refuses_what_serve_would_refuse(tmp_path: Path, ini: str, words: str) -> None:
    """`config check` runs serve's cross-checks (TLS pair, admin_port range for the workers)."""
    conf = tmp_path / "seks.ini"
    conf.write_text(ini)
    check = run_cli(tmp_path / "x.db", "config", "check", str(conf))
    assert check.returncode == 1 and words in check.stdout, check.stdout + check.stderr
    serve = run_cli(tmp_path / "x.db", "--config", str(conf), "serve", "--port", "0")
    assert serve.returncode == 1 and words in serve.stderr and "Traceback" not in serve.stderr, serve.stderr


# ============================================================================
# 4. /healthz and /metrics
# ============================================================================

@pytest.fixture(scope="module")
def metrics_broker(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                   broker_factory: Brokers) -> Broker:
    port = free_port()
    b = broker_factory.serve(ops_db, "--admin-port", str(port),
                           env=env_for(upstreams, groq=f"http://127.0.0.1:{free_port()}"),
                           name="metrics")
    assert b.admin_port == port, b.ready_line
    return b


def scrape(b: Broker) -> Tuple[Dict[str, Dict[str, str]], List[Any], http.client.HTTPMessage]:
    r = b.admin_get("/metrics")
    assert r.status == 200, r.body[:300]
    fams, samples = parse_exposition(r.body.decode("utf-8"))
    return fams, samples, r.headers


GOOD_EXPOSITION = """# HELP a_total A counter.
# TYPE a_total counter
a_total{provider="x",status="200"} 3
# HELP h Latency.
# TYPE h histogram
h_bucket{le="0.1"} 1
h_bucket{le="1.0"} 2
h_bucket{le="+Inf"} 2
h_sum 0.3
h_count 2
"""


@pytest.mark.parametrize("bad", [
    GOOD_EXPOSITION.replace('h_bucket{le="1.0"} 2', 'h_bucket{le="1.0"} 0'),        # not cumulative
    GOOD_EXPOSITION.replace('h_count 2', 'h_count 3'),                             # +Inf != _count
    GOOD_EXPOSITION.replace('h_bucket{le="+Inf"} 2\n', ''),                         # no +Inf bucket
    GOOD_EXPOSITION.replace('status="200"', 'status=200'),                         # unquoted label
    GOOD_EXPOSITION.replace("} 3", "} three"),                                     # not a float
    GOOD_EXPOSITION.replace("# TYPE a_total counter\n", ""),                       # no TYPE
    GOOD_EXPOSITION + "a_total{provider=\"x\",status=\"200\"} 4\n",                # duplicate series
    GOOD_EXPOSITION.rstrip("\n"),                                                  # no final newline
    GOOD_EXPOSITION.replace("a_total{", "9a_total{"),                              # bad name
], ids=["cumulative", "inf-count", "no-inf", "label-quote", "float", "type", "dup", "newline", "name"])
def test_exposition_parser_rejects_malformed_text(bad: str) -> None:
    """The parser used on /metrics is itself strict (a lax parser would prove nothing)."""
    parse_exposition(GOOD_EXPOSITION)
    with pytest.raises(AssertionError):
        parse_exposition(bad)


def test_metrics_only_on_admin_port(metrics_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    r = metrics_broker.request("GET", "/metrics")
    assert r.status == 404, r.body[:300]
    assert b"seks_requests_total" not in r.body
    fams, samples, headers = scrape(metrics_broker)
    assert headers["Content-Type"].startswith("text/plain")
    assert "version=0.0.4" in headers["Content-Type"]
    for family, kind in (("seks_requests_total", "counter"), ("seks_request_duration_seconds", "histogram"),
                         ("seks_upstream_errors_total", "counter"), ("seks_open_streams", "gauge"),
                         ("seks_request_bytes_total", "counter"), ("seks_response_bytes_total", "counter")):
        assert fams.get(family, {}).get("type") == kind, (family, fams.get(family))
        assert fams[family].get("help"), f"{family} has no HELP"
    # the admin port is not a second way into the proxy
    r = metrics_broker.admin_get("/openai/v1/models")
    assert r.status == 404
    assert metrics_broker.admin_get("/healthz").status == 200
    assert upstreams["openai"].requests == []


def test_admin_port_listens_on_loopback_only(metrics_broker: Broker) -> None:
    assert f"admin on http://127.0.0.1:{metrics_broker.admin_port}" in metrics_broker.ready_line


def test_metrics_counters_move_with_traffic(metrics_broker: Broker, ops_db: Broker,
                                            upstreams: Dict[str, FakeUpstream]) -> None:
    _, before, _ = scrape(metrics_broker)
    tok = ops_db.tokens["openai"]
    for _ in range(3):
        assert get(metrics_broker, "openai", tok).status == 200
    assert metrics_broker.request("POST", "/openai/v1/files", body=b"y" * 1234,
                                  headers=auth_headers("openai", tok)).status == 200
    assert get(metrics_broker, "openai", "seks_openai_" + "A" * 43).status == 401
    assert get(metrics_broker, "groq", ops_db.tokens["groq"]).status == 502
    after: List[Any] = []

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    def settled() -> bool:   # metrics are updated after the last byte is sent
        after[:] = scrape(metrics_broker)[1]
        return delta("seks_request_duration_seconds_count", provider="openai") >= 5 and \
            delta("seks_requests_total", provider="groq", status="502") >= 1
    assert wait_until(settled, 5)

    assert delta("seks_requests_total", provider="openai", status="200") == 4
    assert delta("seks_requests_total", provider="openai", status="401") == 1
    assert delta("seks_requests_total", provider="groq", status="502") == 1
    assert delta("seks_upstream_errors_total", provider="groq", kind="error") == 1
    assert delta("seks_request_bytes_total", provider="openai") >= 1234
    assert delta("seks_response_bytes_total", provider="openai") > 0
    assert delta("seks_request_duration_seconds_count", provider="openai") == 5
    assert delta("seks_request_duration_seconds_bucket", provider="openai", le="+Inf") == 5
    assert delta("seks_request_duration_seconds_sum", provider="openai") > 0
    # buckets are cumulative: never decreasing with `le`, and the last finite one holds all 5
    bounds = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
              "2.5", "5.0", "10.0", "30.0", "60.0", "300.0"]
    steps = [delta("seks_request_duration_seconds_bucket", provider="openai", le=le) for le in bounds]
    assert steps == sorted(steps) and steps[-1] == 5, steps


def test_metrics_open_streams_gauge(metrics_broker: Broker, ops_db: Broker,
                                    upstreams: Dict[str, FakeUpstream]) -> None:
    rest = threading.Event()                  # the stream stays open until the test sets it
    upstreams["openai"].set_responder(held_sse_responder(6, rest))
    started = threading.Event()
    result: Dict[str, Any] = {}

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", metrics_broker.port, timeout=15)
        conn.request("GET", "/openai/v1/stream", headers=auth_headers("openai", ops_db.tokens["openai"]))
        resp = conn.getresponse()
        resp.readline()
        started.set()
        result["body"] = resp.read()
        conn.close()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        assert started.wait(10)
        _, mid, _ = scrape(metrics_broker)
    finally:
        rest.set()
    t.join(15)
    assert result["body"].count(b"data: ") == 5, result         # (the first line was read before)
    assert sample_value(mid, "seks_open_streams") >= 1
    # the gauge drops once the last byte is sent
    assert wait_until(lambda: sample_value(scrape(metrics_broker)[1], "seks_open_streams") == 0, 5)


def test_no_admin_listener_unless_asked(env_broker: Broker) -> None:
    assert "admin" not in env_broker.ready_line, env_broker.ready_line


def test_healthz_on_agent_port_has_no_details(metrics_broker: Broker) -> None:
    r = metrics_broker.request("GET", "/healthz")
    assert r.status == 200
    assert r.json() == {"status": "ok"}
    for name in ("Server", "X-Powered-By", "X-Version"):
        value = r.headers.get(name) or ""
        assert VERSION not in value and "Python" not in value, (name, value)


# ============================================================================
# 5. Logs
# ============================================================================

def log_traffic(b: Broker, ops_db: Broker) -> int:
    """A mix of answers, including tokens in a query and in a path; returns the request count."""
    statuses = [
        get(b, "openai", ops_db.tokens["openai"]).status,
        get(b, "openai", "seks_openai_" + "Z" * 43).status,
        b.request("GET", f"/gemini/v1beta/models?key={ops_db.tokens['gemini']}&alt=json").status,
        b.request("GET", f"/telegram/bot{ops_db.tokens['telegram']}/getMe").status,
        b.request("GET", "/nosuchprovider/x").status,
        get(b, "groq", ops_db.tokens["groq"], "/openai/v1/models").status,
    ]
    assert statuses[:5] == [200, 401, 200, 200, 404], statuses
    return len(statuses)


def assert_no_secrets(text: str, ops_db: Broker) -> None:
    for p in OPS_PROVIDERS:
        assert REAL_KEYS[p] not in text, f"real {p} key in the log"
        tok = ops_db.tokens[p]
        assert tok not in text, f"full {p} token in the log"
        rand = re.search(r"seks_[a-z-]+_([A-Za-z0-9_-]+)$", tok).group(1)  # may contain '_'
        assert rand[-20:] not in text, f"{p} token's random part in the log"


def test_json_logs(ops_db: Broker, upstreams: Dict[str, FakeUpstream], procs: Brokers) -> None:
    b = procs.serve(ops_db, "--log-format", "json",
                    env=env_for(upstreams, groq=f"http://127.0.0.1:{free_port()}"), name="jsonlog")
    n = log_traffic(b, ops_db)
    lines = b.wait_for_lines(n)
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(rec, dict) and {"ts", "level", "event"} <= set(rec), line
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", rec["ts"]), rec
        records.append(rec)
    reqs = [r for r in records if r["event"] == "request"]
    assert len(reqs) == n, lines
    assert sorted(r.get("status") for r in reqs) == sorted([200, 401, 200, 200, 404, 502])
    assert {r["level"] for r in reqs if r.get("status") == 502} <= {"warning", "error"}
    assert_no_secrets(b.stderr_text(), ops_db)


def test_json_log_line_stays_json_with_quote_in_path(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                                     procs: Brokers) -> None:
    """A '"' or '\\' is legal in a request path; the JSON line must still parse and keep it."""
    b = procs.serve(ops_db, "--log-format", "json", env=env_for(upstreams), name="jsonquote")
    r = get(b, "openai", ops_db.tokens["openai"], '/v1/files/a"b')
    assert r.status == 200
    lines = b.wait_for_lines(1)
    assert lines
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert rec["path"] == '/openai/v1/files/a"b', rec


def test_text_logs_one_line_per_request(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                        procs: Brokers) -> None:
    b = procs.serve(ops_db, env=env_for(upstreams, groq=f"http://127.0.0.1:{free_port()}"),
                    name="textlog")
    n = log_traffic(b, ops_db)
    lines = b.wait_for_lines(n)
    time.sleep(0.2)
    lines = b.lines_after_ready()
    assert len(lines) == n, lines
    # one line per request; lines of requests on different connections may come in either
    # order (each is written after its answer), so the statuses are compared as a multiset
    statuses = sorted(m.group(1) for m in (re.search(r"\bstatus=(\d{3})\b", l) for l in lines) if m)
    assert statuses == sorted(["200", "401", "200", "200", "404", "502"]), lines
    for line in lines:
        assert re.search(r"\bGET\b", line), line
    assert_no_secrets(b.stderr_text(), ops_db)


def test_quiet_has_no_request_lines(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                    procs: Brokers) -> None:
    b = procs.serve(ops_db, "--quiet", env=env_for(upstreams, groq=f"http://127.0.0.1:{free_port()}"),
                    name="quiet")
    log_traffic(b, ops_db)
    time.sleep(0.3)
    assert b.lines_after_ready() == [], b.lines_after_ready()


def test_log_level_warning_logs_only_problems(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                              procs: Brokers) -> None:
    b = procs.serve(ops_db, "--log-level", "warning",
                    env=env_for(upstreams, groq=f"http://127.0.0.1:{free_port()}"), name="warnlog")
    log_traffic(b, ops_db)
    lines = b.wait_for_lines(1)
    time.sleep(0.2)
    lines = b.lines_after_ready()
    assert len(lines) == 1 and "502" in lines[0], lines


# ============================================================================
# 6. Graceful shutdown
# ============================================================================

def sse_responder(n: int, delay: float) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    return key_checked("openai", lambda h, req: h.send_sse([b'data: {"i": %d}\n\n' % i for i in range(n)], delay))


def held_sse_responder(n: int, gate: threading.Event,
                       delay: float = 0.05) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    """Like sse_responder, but only the first event comes at once: the rest (`delay` apart)
    wait until the test sets `gate` (at most 10 s), so the stream is surely still open until then."""
    def events() -> Iterator[bytes]:
        yield b'data: {"i": 0}\n\n'
        gate.wait(10)
        yield from (b'data: {"i": %d}\n\n' % i for i in range(1, n))

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        h.send_sse(events(), delay)  # type: ignore[arg-type]   # (an iterator: send_sse only iterates)
    return key_checked("openai", respond)


class StreamClient(threading.Thread):
    """Reads an SSE answer line by line; .first is set at the first event."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.port, self.token = port, token
        self.first = threading.Event()
        self.events: List[bytes] = []
        self.error: Optional[BaseException] = None
        self.status = 0
        self.done_at = 0.0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("POST", "/openai/v1/chat/completions", body=b'{"stream": true}',
                         headers={**auth_headers("openai", self.token), "Content-Type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            while True:
                line = resp.readline()
                if not line:
                    break
                if line.startswith(b"data:"):
                    self.events.append(line.strip())
                    self.first.set()
            resp.read()
        except BaseException as exc:   # noqa: BLE001 - recorded for the test to judge
            self.error = exc
        finally:
            self.done_at = time.monotonic()
            self.first.set()
            conn.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_lets_stream_finish(sig: int, ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                              procs: Brokers) -> None:
    n, delay, rest = 7, 0.05, threading.Event()
    upstreams["openai"].set_responder(held_sse_responder(n, rest, delay))
    b = procs.serve(ops_db, env=env_for(upstreams), name="drain")
    client = StreamClient(b.port, ops_db.tokens["openai"])
    client.start()
    assert client.first.wait(10) and client.error is None, client.error
    signalled = time.monotonic()
    b.signal(sig)
    # new connections are refused soon after the signal, while the stream is still running
    # (the upstream holds its other events until then)
    try:
        assert wait_until(lambda: not b.alive() or _refused(b.port), 1.5), "still accepting after the signal"
        refused_at = time.monotonic()
    finally:
        rest.set()
    rc = b.wait(15)
    client.join(10)
    assert client.error is None, repr(client.error)
    assert client.status == 200
    assert client.events == [b'data: {"i": %d}' % i for i in range(n)], client.events
    assert refused_at < client.done_at, "listener should close before the stream ends"
    assert rc == 0, b.stderr_text()[-2000:]
    assert time.monotonic() - signalled < n * delay + 5


def _refused(port: int) -> bool:
    return connect_refused(port, timeout=0.5)


def test_grace_period_cuts_long_stream(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                       procs: Brokers) -> None:
    upstreams["openai"].set_responder(sse_responder(17, 0.3))   # ~5 s
    b = procs.serve(ops_db, "--grace", "1", env=env_for(upstreams), name="grace")
    client = StreamClient(b.port, ops_db.tokens["openai"])
    client.start()
    assert client.first.wait(10)
    signalled = time.monotonic()
    b.signal(signal.SIGTERM)
    rc = b.wait(10)
    took = time.monotonic() - signalled
    assert rc is not None, "broker did not exit"
    assert 0.7 <= took <= 3.5, f"exited {took:.2f}s after SIGTERM with --grace 1"
    assert rc == 0, b.stderr_text()[-2000:]
    client.join(10)
    assert len(client.events) < 17, "stream should have been cut at the end of the grace period"


def test_exchange_cut_at_shutdown_keeps_its_audit_row(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                                      procs: Brokers) -> None:
    """The upstream already got the real key: an exchange cut at the end of the grace period
    still leaves its row (outcome error, "cut at shutdown", the bytes relayed so far), and the
    broker says on stderr what it waits for."""
    upstreams["openai"].set_responder(sse_responder(40, 0.3))   # ~12 s
    b = procs.serve(ops_db, "--grace", "0.3", env=env_for(upstreams), name="cut")
    before = {r["id"] for r in audit_json(ops_db)}
    client = StreamClient(b.port, ops_db.tokens["openai"])
    client.start()
    assert client.first.wait(10)
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0, b.stderr_text()[-2000:]
    client.join(10)
    rows = [r for r in audit_json(ops_db) if r["id"] not in before]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["outcome"] == "error" and "cut at shutdown" in row["reason"], row
    assert row["status"] == 200 and row["bytes_out"] >= len(client.events) * 5 > 0, (row, client.events)
    assert "chain intact" in ok(ops_db.cli("audit", "verify"))
    err = b.stderr_text()
    assert "waiting up to 0.3s for 1 request(s) in flight" in err, err[-2000:]
    assert "1 request(s) cut at shutdown" in err, err[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c-twice", "sigterm-twice"])
def test_second_signal_stops_at_once(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                     procs: Brokers, sig: int) -> None:
    upstreams["openai"].set_responder(sse_responder(40, 0.3))
    b = procs.serve(ops_db, "--grace", "30", env=env_for(upstreams), name="twice")
    before = {r["id"] for r in audit_json(ops_db)}
    client = StreamClient(b.port, ops_db.tokens["openai"])
    client.start()
    assert client.first.wait(10)
    b.signal(sig)
    assert wait_until(lambda: "waiting up to 30s" in b.stderr_text(), 5), b.stderr_text()[-1000:]
    t0 = time.monotonic()
    b.signal(sig)
    assert b.wait(5) == 0
    assert time.monotonic() - t0 < 2.0
    client.join(10)
    rows = [r for r in audit_json(ops_db) if r["id"] not in before]
    assert len(rows) == 1 and "cut at shutdown" in rows[0]["reason"], rows


def test_idle_broker_stops_at_once(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                   procs: Brokers) -> None:
    b = procs.serve(ops_db, env=env_for(upstreams), name="idle")
    assert get(b, "openai", ops_db.tokens["openai"]).status == 200
    t0 = time.monotonic()
    b.signal(signal.SIGTERM)
    assert b.wait(5) == 0
    assert time.monotonic() - t0 < 2.5


# ============================================================================
# 7. Key management
# ============================================================================

NEW_OPENAI_KEY = "sk-test-openai-rotated-9876543210"


def test_secret_rotate_same_token_new_key_on_running_broker(ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                                                            procs: Brokers) -> None:
    ok(ops_db.cli("secret", "add", "rot-key", "--provider", "openai", input=REAL_KEYS["openai"] + "\n"))
    token = ops_db.mint("openai", "agent-rot", secret="rot-key")
    b = procs.serve(ops_db, env=env_for(upstreams), name="rotate")
    assert get(b, "openai", token).status == 200
    ids_before = re.findall(r"tok_[0-9a-f]{12}", ops_db.cli("token", "list").stdout)
    ok(ops_db.cli("secret", "rotate", "rot-key", input=NEW_OPENAI_KEY + "\n"))
    upstreams["openai"].set_responder(default_responder("openai", NEW_OPENAI_KEY))
    upstreams["openai"].requests.clear()
    r = get(b, "openai", token)
    assert r.status == 200, r.body[:300]
    req = upstreams["openai"].only_request()
    assert req.header_all("Authorization") == [f"Bearer {NEW_OPENAI_KEY}"]
    assert ids_before == re.findall(r"tok_[0-9a-f]{12}", ops_db.cli("token", "list").stdout)
    # and a freshly started broker too
    b.stop()
    b2 = procs.serve(ops_db, env=env_for(upstreams), name="rotate2")
    assert get(b2, "openai", token).status == 200
    # the other secrets did not change
    upstreams["openai"].reset()
    assert get(b2, "openai", ops_db.tokens["openai"]).status == 200
    # rotating an unknown secret fails and changes nothing
    cp = ops_db.cli("secret", "rotate", "nope-key", input="sk-test-x\n")
    assert cp.returncode != 0
    # a new value on the command line is refused and never echoed
    cp = ops_db.cli("secret", "rotate", "rot-key", "sk-test-on-the-command-line-123")
    assert cp.returncode == 2
    assert "sk-test-on-the-command-line-123" not in cp.stdout + cp.stderr
    upstreams["openai"].set_responder(default_responder("openai", NEW_OPENAI_KEY))
    assert get(b2, "openai", token).status == 200


def key_file_env(upstreams: Optional[Dict[str, FakeUpstream]] = None) -> Dict[str, str]:
    return env_for(upstreams or {}, master_key=None)


def test_rotate_master_key_with_key_file(tmp_path: Path, upstreams: Dict[str, FakeUpstream],
                                         procs: Brokers) -> None:
    env = key_file_env(upstreams)
    db = seed_broker(tmp_path, ("openai", "anthropic"), env=env)
    key_path = Path(str(db.db) + ".key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    b = procs.serve(db, env=env, name="pre-rotation")
    for _ in range(3):
        assert get(b, "openai", db.tokens["openai"]).status == 200
    b.stop()
    old_key = key_path.read_text()
    ok(db.cli("audit", "verify"))
    cp = db.cli("rotate-master-key")
    assert cp.returncode == 0, cp.stderr
    new_key = key_path.read_text()
    assert new_key != old_key
    assert len(base64.urlsafe_b64decode(new_key.strip())) == 32
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not Path(str(key_path) + ".new").exists()
    out = ok(db.cli("audit", "verify"))
    assert "intact" in out
    upstreams["openai"].reset()
    b2 = procs.serve(db, env=env, name="post-rotation")
    assert get(b2, "openai", db.tokens["openai"]).status == 200
    r = b2.request("POST", "/anthropic/v1/messages", body=b"{}",
                   headers=auth_headers("anthropic", db.tokens["anthropic"]))
    assert r.status == 200
    assert key_check_failure("openai", REAL_KEYS["openai"], upstreams["openai"].only_request()) is None
    b2.wait_for_log(lambda err: err.count("status=200") == 2)    # each request's line follows its row
    ok(db.cli("audit", "verify"))
    # the old key no longer opens the DB
    cp = db.cli("audit", "verify", env=dict(env, SEKS_MASTER_KEY=old_key.strip()))
    assert cp.returncode == 1 and "does not match" in cp.stderr, cp.stderr


def test_rotate_master_key_from_env_reads_new_key_on_stdin(tmp_path: Path, upstreams: Dict[str, FakeUpstream],
                                                           procs: Brokers) -> None:
    old_env = env_for(upstreams)
    db = seed_broker(tmp_path, ("openai",), env=old_env)
    b = procs.serve(db, env=old_env, name="env-pre")
    assert get(b, "openai", db.tokens["openai"]).status == 200
    b.stop()
    # garbage on stdin: refused, nothing changed
    cp = db.cli("rotate-master-key", input="not-a-key\n")
    assert cp.returncode != 0
    ok(db.cli("audit", "verify"))
    # the same key again: refused
    cp = db.cli("rotate-master-key", input=MASTER_KEY + "\n")
    assert cp.returncode != 0
    new = base64.urlsafe_b64encode(os.urandom(32)).decode()
    cp = db.cli("rotate-master-key", input=new + "\n")
    assert cp.returncode == 0, cp.stderr
    assert new not in cp.stdout + cp.stderr, "the new key must not be echoed"
    assert not Path(str(db.db) + ".key").exists(), "no key file when the key comes from the env"
    new_env = env_for(upstreams, extra={"SEKS_MASTER_KEY": new})
    cp = db.cli("audit", "verify")
    assert cp.returncode == 1 and "does not match" in cp.stderr
    ok(db.cli("audit", "verify", env=new_env))
    upstreams["openai"].reset()
    b2 = procs.serve(db, env=new_env, name="env-post")
    assert get(b2, "openai", db.tokens["openai"]).status == 200
    assert key_check_failure("openai", REAL_KEYS["openai"], upstreams["openai"].only_request()) is None


def test_rotate_master_key_refuses_a_broken_audit_chain(tmp_path: Path, upstreams: Dict[str, FakeUpstream],
                                                         procs: Brokers) -> None:
    """Re-keying would launder a tampered log: refused (nothing changed) unless --force."""
    import sqlite3
    env = key_file_env(upstreams)
    db = seed_broker(tmp_path, ("openai",), env=env)
    b = procs.serve(db, env=env, name="chain")
    for _ in range(3):
        assert get(b, "openai", db.tokens["openai"]).status == 200
    b.stop()
    with sqlite3.connect(str(db.db)) as conn:
        conn.execute("UPDATE audit SET status = 299 WHERE id = 2")
    key_path = Path(str(db.db) + ".key")
    old_key = key_path.read_text()
    cp = db.cli("rotate-master-key")
    assert cp.returncode == 1 and "audit" in cp.stderr, cp.stderr
    assert key_path.read_text() == old_key
    assert not Path(str(key_path) + ".new").exists()
    cp = db.cli("rotate-master-key", "--force")
    assert cp.returncode == 0, cp.stderr
    assert key_path.read_text() != old_key
    upstreams["openai"].reset()
    b2 = procs.serve(db, env=env, name="chain2")
    assert get(b2, "openai", db.tokens["openai"]).status == 200


def test_rotate_master_key_under_a_running_broker(tmp_path: Path, upstreams: Dict[str, FakeUpstream],
                                                  procs: Brokers) -> None:
    """Key file: a running broker notices the rotation, keeps serving with the real key, and the
    audit rows it writes afterwards are chained under the new key (verify stays intact)."""
    env = key_file_env(upstreams)
    db = seed_broker(tmp_path, ("openai",), env=env)
    b = procs.serve(db, env=env, name="live-rot")
    assert get(b, "openai", db.tokens["openai"]).status == 200
    ok(db.cli("rotate-master-key"))
    upstreams["openai"].reset()
    for _ in range(3):
        r = get(b, "openai", db.tokens["openai"])
        assert r.status == 200, r.body[:300]
    for req in upstreams["openai"].requests:
        assert key_check_failure("openai", REAL_KEYS["openai"], req) is None
    b.wait_for_log(lambda err: err.count("status=200") == 4)    # each request's line follows its row
    assert "intact" in ok(db.cli("audit", "verify"))
    b.stop()
    assert "intact" in ok(db.cli("audit", "verify"))


def test_rotate_env_master_key_under_a_running_broker(tmp_path: Path, upstreams: Dict[str, FakeUpstream],
                                                      procs: Brokers) -> None:
    """SEKS_MASTER_KEY: a running broker cannot learn the new key; it must refuse (503), never
    send anything upstream, and never write audit rows under the old key."""
    env = env_for(upstreams)
    db = seed_broker(tmp_path, ("openai",), env=env)
    b = procs.serve(db, env=env, name="live-rot-env")
    assert get(b, "openai", db.tokens["openai"]).status == 200
    new = base64.urlsafe_b64encode(os.urandom(32)).decode()
    ok(db.cli("rotate-master-key", input=new + "\n"))
    upstreams["openai"].reset()
    r = get(b, "openai", db.tokens["openai"])
    assert r.status == 503, r.body[:300]
    assert upstreams["openai"].requests == []
    b.stop()
    new_env = env_for(upstreams, extra={"SEKS_MASTER_KEY": new})
    assert "intact" in ok(db.cli("audit", "verify", env=new_env))


def read_key(db: Path) -> bytes:
    return base64.urlsafe_b64decode(Path(str(db) + ".key").read_text().strip())


def key_file_db(tmp_path: Path) -> Path:
    """A DB whose master key is in <db>.key (no SEKS_MASTER_KEY), with the secret openai-key."""
    return seed_broker(tmp_path, ("openai",), env=key_file_env()).db


def test_secret_stored_under_a_key_the_db_no_longer_has_is_refused(tmp_path: Path) -> None:
    """`secret add` and `audit prune` racing a rotation: a write made with the old key is
    refused inside its transaction (the check is there), so nothing is stored under it."""
    db = key_file_db(tmp_path)
    old = read_key(db)
    assert run_cli(db, "rotate-master-key", env=key_file_env()).returncode == 0
    store = sb.Store(str(db))
    try:
        ciphertext = sb.SecretCipher(old).encrypt(b"sk-test-late", sb.secret_ad("late", "openai"))
        with pytest.raises(sb.ConfigError, match="rotated while this command ran"):
            store.put_secret("late", "openai", ciphertext, replace=False,
                             check=sb.derive_key(old, "key-check"))
        assert store.get_secret("late") is None
        with pytest.raises(sb.ConfigError, match="rotated while this command ran"):
            store.prune_audit(sb.derive_key(old, "audit"), "2999-01-01T00:00:00Z",
                              sb.derive_key(old, "key-check"))
    finally:
        store.close()
    cp = run_cli(db, "audit", "verify", env=key_file_env())
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_secret_add_reads_the_value_before_the_key(tmp_path: Path) -> None:
    """The prompt may take minutes; the key is loaded after it, so a rotation committed while
    the operator typed is the key the value gets encrypted under."""
    db = key_file_db(tmp_path)
    calls: List[str] = []
    real_read, real_load = sb.read_secret_value, sb.load_master_key
    umask = os.umask(0o077)
    try:
        sb.read_secret_value = lambda name: calls.append("read") or "sk-test-typed"
        sb.load_master_key = lambda *a, **k: calls.append("load") or real_load(*a, **k)
        os.environ.pop("SEKS_MASTER_KEY", None)
        assert sb.main(["--db", str(db), "secret", "add", "typed", "--provider", "openai"]) == 0
    finally:
        sb.read_secret_value, sb.load_master_key = real_read, real_load
        os.umask(umask)
    assert calls[:2] == ["read", "load"], calls


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_rotation_is_refused_while_one_runs(tmp_path: Path) -> None:
    """One rotate-master-key at a time (a lock on <db>.key.lock): two could leave a key file
    that does not open the DB."""
    import fcntl
    db = key_file_db(tmp_path)
    before = read_key(db)
    lock_path = str(db) + ".key.lock"
    Path(lock_path).touch(mode=0o600)
    with open(lock_path, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        cp = run_cli(db, "rotate-master-key", env=key_file_env())
        assert cp.returncode == 1 and "another rotate-master-key is running" in cp.stderr, cp.stderr
        assert read_key(db) == before and not Path(str(db) + ".key.new").exists()
    cp = run_cli(db, "rotate-master-key", env=key_file_env())
    assert cp.returncode == 0, cp.stderr
    assert read_key(db) != before
    assert run_cli(db, "secret", "list", env=key_file_env()).returncode == 0


def test_concurrent_loads_finish_a_committed_rotation_without_errors(tmp_path: Path) -> None:
    """Many processes reading the key files while a committed rotation is finished all get the
    new key (no error, so no 502 and no lost audit row in a running broker)."""
    db = key_file_db(tmp_path)
    key_path = Path(str(db) + ".key")
    old_text = key_path.read_text()
    assert run_cli(db, "rotate-master-key", env=key_file_env()).returncode == 0
    new = read_key(db)
    for _ in range(5):           # the state a rotation leaves if it dies right after its commit
        Path(str(key_path) + ".new").write_text(key_path.read_text())
        os.chmod(str(key_path) + ".new", 0o600)
        key_path.write_text(old_text)
        results: List[Any] = []
        stores = [sb.Store(str(db)) for _ in range(8)]

        def load(store: Any) -> None:
            try:
                results.append(sb.load_master_key(str(db), {}, store))
            except Exception as exc:          # noqa: BLE001 - any failure is the finding
                results.append(exc)
        threads = [threading.Thread(target=load, args=(st,)) for st in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for st in stores:
            st.close()
        assert results == [new] * 8, results
        assert read_key(db) == new and not Path(str(key_path) + ".new").exists()


def test_rekey_commits_with_synchronous_full(tmp_path: Path) -> None:
    """The rotation's commit is synced to disk (synchronous=FULL) before the key file is renamed."""
    db = key_file_db(tmp_path)
    store = sb.Store(str(db))
    seen: List[int] = []
    try:
        with store.transaction(durable=True) as conn:
            seen.append(conn.execute("PRAGMA synchronous").fetchone()[0])
        with store.connection() as conn:
            seen.append(conn.execute("PRAGMA synchronous").fetchone()[0])
    finally:
        store.close()
    assert seen == [2, 1], seen                   # FULL inside, NORMAL again after


# -- rotation interrupted by SIGKILL -------------------------------------------------------

BULK_SECRETS = 3000
BULK_AUDIT = 30000


def bulk_value(i: int) -> str:
    return f"sk-test-bulk-{i:05d}-0123456789abcdef"


@pytest.fixture(scope="module")
def bulk_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key-file DB with 3,000 secrets and a 30,000-row audit chain, made with the Store API."""
    d = tmp_path_factory.mktemp("bulk")
    path = str(d / "bulk.db")
    store = sb.Store(path)
    key = sb.load_master_key(path, {}, store)
    cipher = sb.SecretCipher(key)
    now = sb.utc_iso()
    rows = []
    for i in range(BULK_SECRETS):
        name = f"s{i:05d}"
        rows.append((name, "openai", cipher.encrypt(bulk_value(i).encode(), sb.secret_ad(name, "openai")),
                     now, now))
    with store.transaction() as db:
        db.executemany("INSERT INTO secrets VALUES (?, ?, ?, ?, ?)", rows)
    akey = sb.derive_key(key, "audit")
    prev, audit = b"", []
    for i in range(1, BULK_AUDIT + 1):
        row = sb.AuditRow(id=i, ts=now, agent="bulk", provider="openai", method="GET",
                          path=f"/openai/v1/models/{i}", status=200, bytes_in=0, bytes_out=10,
                          duration_ms=1.0, client="127.0.0.1", outcome="ok")
        row.mac = sb.audit_mac(akey, row.values(), prev)
        prev = row.mac
        audit.append(row.values() + (row.mac,))
    fields = ", ".join(sb.AuditRow.FIELDS)
    marks = ", ".join("?" * (len(sb.AuditRow.FIELDS) + 1))
    with store.transaction() as db:
        db.executemany(f"INSERT INTO audit ({fields}, mac) VALUES ({marks})", audit)
    store.close()
    assert not Path(path + "-wal").exists() or Path(path + "-wal").stat().st_size == 0
    return Path(path)


def copy_db(template: Path, dest_dir: Path) -> Path:
    dest = dest_dir / template.name
    for suffix in ("", "-wal", "-shm", ".key"):
        src = Path(str(template) + suffix)
        if src.exists():
            shutil.copyfile(src, str(dest) + suffix)
            os.chmod(str(dest) + suffix, 0o600)
    return dest


def check_bulk_db(db: Path) -> Tuple[str, bool]:
    """Open the DB as the next CLI command would, then decrypt every secret with the key file."""
    env = key_file_env()
    cp = run_cli(db, "audit", "verify", env=env, timeout=60)
    assert cp.returncode == 0, f"audit verify after the kill: {cp.stdout}{cp.stderr}"
    key_text = Path(str(db) + ".key").read_text().strip()
    assert stat.S_IMODE(Path(str(db) + ".key").stat().st_mode) == 0o600
    pending = Path(str(db) + ".key.new")
    if pending.exists():
        assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    store = sb.Store(str(db))
    try:
        with store.connection() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = conn.execute("SELECT name, provider, ciphertext FROM secrets ORDER BY name").fetchall()
        assert len(rows) == BULK_SECRETS
        cipher = sb.SecretCipher(base64.urlsafe_b64decode(key_text))
        for i, (name, provider, ciphertext) in enumerate(rows):
            assert cipher.decrypt(ciphertext, sb.secret_ad(name, provider)).decode() == bulk_value(i)
    finally:
        store.close()
    return key_text, pending.exists()


@pytest.mark.parametrize("plan", ["0.15s", "0.5s", "pending+0", "pending+0.1s", "pending+0.3s", "pending+0.6s"])
def test_rotation_killed_leaves_db_usable(plan: str, bulk_template: Path, tmp_path: Path) -> None:
    db = copy_db(bulk_template, tmp_path)
    old_key = Path(str(db) + ".key").read_text().strip()
    pending = Path(str(db) + ".key.new")
    cmd, env = broker_command(key_file_env())
    proc = subprocess.Popen([*cmd, "--db", str(db), "rotate-master-key"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=str(tmp_path))
    try:
        if plan.startswith("pending"):
            extra = float(plan.split("+")[1].rstrip("s"))
            deadline = time.monotonic() + 30
            while not pending.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(extra)
        else:
            time.sleep(float(plan.rstrip("s")))
        finished_before_kill = proc.poll() is not None
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    pending_at_kill = pending.exists()
    key_file_at_kill = Path(str(db) + ".key").read_text().strip()
    key_after, _ = check_bulk_db(db)
    print(f"\nplan={plan} finished={finished_before_kill} pending_at_kill={pending_at_kill} "
          f"renamed={key_file_at_kill != old_key} committed={key_after != old_key}")
    if finished_before_kill:
        assert proc.returncode == 0
        assert key_after != old_key
    # either the old key still opens everything (no commit) or the new one does (commit, finished
    # by the next command through <db>.key.new): check_bulk_db decrypted all 3,000 with key_after


def test_rotation_committed_but_not_renamed_is_finished_by_next_command(bulk_template: Path,
                                                                      tmp_path: Path) -> None:
    """The state a kill between the commit and the rename leaves: DB under the new key, old key
    in <db>.key, new key in <db>.key.new. The next command must finish the rotation."""
    db = copy_db(bulk_template, tmp_path)
    key_path = Path(str(db) + ".key")
    old_key = key_path.read_text()
    cp = run_cli(db, "rotate-master-key", env=key_file_env(), timeout=60)
    assert cp.returncode == 0, cp.stderr
    new_key = key_path.read_text()
    write_private(Path(str(key_path) + ".new"), new_key)
    write_private(key_path, old_key)
    key_after, pending_left = check_bulk_db(db)
    assert key_after == new_key.strip()
    assert not pending_left
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


# -- backup --------------------------------------------------------------------------------

def test_backup_restore_round_trip(tmp_path: Path, upstreams: Dict[str, FakeUpstream],
                                   procs: Brokers) -> None:
    env = key_file_env(upstreams)
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    db = seed_broker(live_dir, ("openai", "gemini"), env=env)
    live = procs.serve(db, env=env, name="live")
    assert get(live, "openai", db.tokens["openai"]).status == 200
    backup = tmp_path / "restore" / "copy.db"
    backup.parent.mkdir()
    cp = db.cli("backup", str(backup))              # online: the broker is running
    assert cp.returncode == 0, cp.stderr
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    content = backup.read_bytes()
    cp = db.cli("backup", str(backup))
    assert cp.returncode != 0 and "exists" in cp.stderr, cp.stderr
    assert backup.read_bytes() == content, "an existing file was overwritten"
    # a token minted after the backup is not in it
    later = db.mint("openai", "agent-later")
    live.stop()
    # without the key the backup does not start
    cp = subprocess.run([sys.executable, str(BROKER_PY), "--db", str(backup), "serve", "--port", "0"],
                        capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert cp.returncode == 1 and "key" in cp.stderr, cp.stderr
    shutil.copyfile(str(db.db) + ".key", str(backup) + ".key")
    os.chmod(str(backup) + ".key", 0o600)
    upstreams["openai"].reset()
    restored = procs.serve(Broker(backup, env), name="restored")
    assert get(restored, "openai", db.tokens["openai"]).status == 200
    assert key_check_failure("openai", REAL_KEYS["openai"], upstreams["openai"].only_request()) is None
    r = restored.request("GET", "/gemini/v1beta/models", headers=auth_headers("gemini", db.tokens["gemini"]))
    assert r.status == 200
    assert get(restored, "openai", later).status == 401
    ok(run_cli(backup, "audit", "verify", env=env))


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_backup_refuses_a_dangling_link(tmp_path: Path) -> None:
    """`backup` never follows a link at its destination (not even a dangling one)."""
    db = key_file_db(tmp_path)
    target = tmp_path / "elsewhere.db"
    link = tmp_path / "backup.db"
    link.symlink_to(target)
    cp = run_cli(db, "backup", str(link), env=key_file_env())
    assert cp.returncode == 1 and "exists" in cp.stderr, cp.stderr
    assert not target.exists(), "the backup followed the link"


# ============================================================================
# 8. token mint --format env, --version
# ============================================================================

ENV_EXPECT = {
    # provider: (base var, path after the broker URL, key var, a request path under the base)
    "openai": ("OPENAI_BASE_URL", "/openai/v1", "OPENAI_API_KEY", "/models"),
    "anthropic": ("ANTHROPIC_BASE_URL", "/anthropic", "ANTHROPIC_API_KEY", "/v1/messages"),
    "gemini": ("GOOGLE_GEMINI_BASE_URL", "/gemini", "GEMINI_API_KEY", "/v1beta/models"),
    "groq": ("GROQ_BASE_URL", "/groq", "GROQ_API_KEY", "/openai/v1/models"),
    "telegram": ("TELEGRAM_API_BASE", "/telegram/bot", "TELEGRAM_BOT_TOKEN", "/getMe"),
}


def parse_env_lines(out: str) -> Dict[str, str]:
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    pairs = {}
    for line in lines:
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(\S+)$", line)
        assert m, f"not NAME=value: {line!r}"
        pairs[m.group(1)] = m.group(2)
    return pairs


@pytest.mark.parametrize("provider", list(ENV_EXPECT))
def test_token_mint_format_env(provider: str, ops_db: Broker, upstreams: Dict[str, FakeUpstream],
                               broker_factory: Brokers, env_broker: Broker) -> None:
    base_var, suffix, key_var, req_path = ENV_EXPECT[provider]
    env = dict(ops_db.env, SEKS_PORT=str(env_broker.port))
    out = ok(ops_db.cli("token", "mint", "--secret", secret_name(provider), "--agent", "agent-env",
                        "--format", "env", env=env))
    pairs = parse_env_lines(out)
    base = f"http://127.0.0.1:{env_broker.port}{suffix}"
    assert pairs[base_var] == base, out
    token = pairs[key_var]
    if provider == "telegram":
        url = f"{base}{token}{req_path}"
        headers: Dict[str, str] = {}
    else:
        url = base + req_path
        headers = auth_headers(provider, token)
    path = url[len(f"http://127.0.0.1:{env_broker.port}"):]
    r = env_broker.request("POST" if provider == "anthropic" else "GET", path, headers=headers,
                           body=b"{}" if provider == "anthropic" else None)
    assert r.status == 200, (url, r.body[:300])
    req = upstreams[provider].only_request()
    assert key_check_failure(provider, REAL_KEYS[provider], req) is None
    assert_token_absent(req, token)


@pytest.fixture(scope="module")
def env_broker(ops_db: Broker, upstreams: Dict[str, FakeUpstream], broker_factory: Brokers) -> Broker:
    return broker_factory.serve(ops_db, env=env_for(upstreams), name="envhandoff")


def test_token_mint_env_follows_configured_address(ops_db: Broker, tmp_path: Path) -> None:
    cfg = tmp_path / "addr.ini"
    cfg.write_text("[server]\nhost = 127.0.0.1\nport = 9123\n")
    out = ok(ops_db.cli("--config", str(cfg), "token", "mint", "--secret", "openai-key", "--agent", "a",
                        "--format", "env"))
    assert parse_env_lines(out)["OPENAI_BASE_URL"] == "http://127.0.0.1:9123/openai/v1"
    env = dict(ops_db.env, SEKS_PUBLIC_URL="https://127.0.0.1:8443/")
    out = ok(ops_db.cli("token", "mint", "--secret", "openai-key", "--agent", "a", "--format", "env", env=env))
    assert parse_env_lines(out)["OPENAI_BASE_URL"] == "https://127.0.0.1:8443/openai/v1"
    env = dict(ops_db.env, SEKS_TLS_CERT="/nonexistent/c.pem", SEKS_TLS_KEY="/nonexistent/k.pem",
               SEKS_PORT="8443")
    out = ok(ops_db.cli("token", "mint", "--secret", "anthropic-key", "--agent", "a", "--format", "env",
                        env=env))
    pairs = parse_env_lines(out)
    assert pairs["ANTHROPIC_BASE_URL"] == "https://127.0.0.1:8443/anthropic"
    assert pairs["ANTHROPIC_API_KEY"].startswith("seks_anthropic_")


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell to eval the output in")
def test_token_mint_env_output_evals_in_sh(ops_db: Broker) -> None:
    out = ok(ops_db.cli("token", "mint", "--secret", "openai-key", "--agent", "a", "--format", "env"))
    cp = subprocess.run(["sh", "-c", 'eval "$1"; printf "%s|%s" "$OPENAI_BASE_URL" "$OPENAI_API_KEY"',
                         "sh", out], capture_output=True, text=True, timeout=10)
    pairs = parse_env_lines(out)
    assert cp.stdout == f"{pairs['OPENAI_BASE_URL']}|{pairs['OPENAI_API_KEY']}"


def test_version(tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, str(BROKER_PY), "--version"], capture_output=True, text=True,
                        timeout=30, cwd=str(tmp_path), env=broker_env())
    assert cp.returncode == 0
    assert cp.stdout.strip() == f"seks-broker {VERSION}", cp.stdout + cp.stderr
    assert re.match(r"^\d+\.\d+\.\d+", VERSION)
    assert list(tmp_path.iterdir()) == [], "--version must not create files"


# ============================================================================
# 11. Other CPython versions on this machine
# ============================================================================

def _other_pythons() -> List[Tuple[str, str]]:
    """(version, executable) for every CPython >= 3.9 found here other than the one running."""
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3")) + \
        sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for minor in range(9, 15):
        found = shutil.which(f"python3.{minor}")
        if found:
            candidates.append(found)
    me = os.path.realpath(sys.executable)

    def probe(exe: str) -> Optional[subprocess.CompletedProcess]:
        try:
            return subprocess.run([exe, "-c", "import sys, platform; print(platform.python_implementation(), "
                                   "'%d.%d.%d' % sys.version_info[:3], sys.executable)"],
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        probes = list(pool.map(probe, candidates))
    seen, out = set(), []
    for cp in probes:
        if cp is None:
            continue
        parts = cp.stdout.split()
        if cp.returncode != 0 or len(parts) != 3 or parts[0] != "CPython":
            continue
        version, real = parts[1], os.path.realpath(parts[2])
        if tuple(int(x) for x in version.split(".")[:2]) < (3, 9) or real == me or real in seen:
            continue
        seen.add(real)
        out.append((version, real))
    return sorted(out, key=lambda vr: tuple(int(x) for x in vr[0].split(".")))


@pytest.fixture(scope="module")
def other_pythons() -> List[Tuple[str, str]]:
    found = _other_pythons()
    if not found:
        pytest.skip("no other CPython >= 3.9 on this machine (looked in ~/.pyenv/versions and "
                    "python3.9 .. python3.14 on PATH)")
    return found


def test_other_pythons_cli_round_trip_and_serve(other_pythons: List[Tuple[str, str]], tmp_path: Path,
                                                upstreams: Dict[str, FakeUpstream]) -> None:
    print("\nother CPythons:", ", ".join(v for v, _ in other_pythons))

    def check(version: str, exe: str) -> Optional[str]:
        """The round trip on one interpreter: None, or what failed."""
        d = tmp_path / version
        d.mkdir()
        env = dict(env_for(upstreams), PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)

        def run(*args: str, input: str = "") -> subprocess.CompletedProcess:
            return subprocess.run([exe, str(BROKER_PY), "--db", str(d / "seks.db"), *args], input=input,
                                  capture_output=True, text=True, timeout=60, env=env, cwd=str(d))
        try:
            cp = subprocess.run([exe, str(BROKER_PY), "--version"], capture_output=True, text=True,
                                timeout=30, env=env, cwd=str(d))
            assert cp.returncode == 0 and cp.stdout.strip() == f"seks-broker {VERSION}", cp.stderr
            cp = subprocess.run([exe, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], "
                                 "cfile=sys.argv[2], doraise=True)", str(BROKER_PY), str(d / "x.pyc")],
                                capture_output=True, text=True, timeout=60, env=env)
            assert cp.returncode == 0, cp.stderr
            cp = run("secret", "add", "openai-key", "--provider", "openai", input=REAL_KEYS["openai"] + "\n")
            assert cp.returncode == 0, cp.stderr
            cp = run("token", "mint", "--secret", "openai-key", "--agent", "a")
            assert cp.returncode == 0, cp.stderr
            token = cp.stdout.strip()
            assert re.match(r"^seks_openai_[A-Za-z0-9_-]{43}$", token), cp.stdout
            cp = run("token", "list")
            assert cp.returncode == 0 and re.search(r"tok_[0-9a-f]{12}", cp.stdout), cp.stderr
            assert token not in cp.stdout
            b = Broker(d / "seks.db", env).serve(python=exe, name=f"py{version}")
            try:
                r = get(b, "openai", token)
                assert r.status == 200, r.body[:300]
            finally:
                assert b.stop() == 0, b.stderr_text()[-1500:]
        except AssertionError as exc:
            return f"Python {version} ({exe}): {exc}"
        return None

    with concurrent.futures.ThreadPoolExecutor(len(other_pythons)) as pool:   # one directory each
        failures = [f for f in pool.map(lambda vr: check(*vr), other_pythons) if f]
    assert not failures, "\n".join(failures)


def test_first_use_by_several_commands_at_once_makes_one_key_and_one_schema(tmp_path: Path) -> None:
    """Six commands started together on a database that does not exist yet (a script adding
    agents in parallel, `serve` and `secret add` in two terminals): each succeeds, all under the
    one key file that won (0600), and the schema is made once. Before, about one command in
    thirty failed: "File exists", a key file read while empty, a table list read half-made
    ("an sqlite database of something else"), or sqlite's "locked" while the file turned WAL."""
    env = {k: v for k, v in broker_env().items() if k != "SEKS_MASTER_KEY"}
    cmd, run_env = broker_command(env)
    for round_ in range(3):
        db = tmp_path / f"r{round_}" / "seks.db"
        db.parent.mkdir()
        procs = [subprocess.Popen([*cmd, "--db", str(db), "agent", "add", f"a{i}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=run_env) for i in range(6)]
        results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert [code for code, _ in results] == [0] * 6, [err for _, err in results]
        assert stat.S_IMODE(os.stat(str(db) + ".key").st_mode) == 0o600
        listed = ok(run_cli(db, "agent", "list", env=env))
        assert all(f"a{i}" in listed for i in range(6)), listed
