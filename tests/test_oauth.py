"""Broker-held OAuth (issue 18), first part: RS256 for the JWT grants (Google service accounts,
GitHub Apps). RSASSA-PKCS1-v1_5 with SHA-256 is deterministic, so RFC 7515's published example
pins it exactly; the key is read from PKCS#1 and PKCS#8 PEM built here from that example's key."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import List

import pytest

from conftest import load_broker_module

sb = load_broker_module()
RFC = json.loads((Path(__file__).parent / "vectors" / "rfc7515_a2_rs256.json").read_text())


def num(field: str) -> int:
    text = RFC["jwk"][field]
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def der(tag: int, content: bytes) -> bytes:
    size = len(content)
    head = bytes([size]) if size < 128 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes(
        (size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + head + content


def der_int(value: int) -> bytes:
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def pem(label: str, body: bytes) -> str:
    text = base64.b64encode(body).decode()
    return f"-----BEGIN {label}-----\n" + "\n".join(text[i:i + 64] for i in range(0, len(text), 64)) + \
        f"\n-----END {label}-----\n"


PKCS1 = der(0x30, b"".join(der_int(v) for v in [0] + [num(f) for f in ("n", "e", "d", "p", "q", "dp", "dq", "qi")]))
RSA_OID = bytes.fromhex("06092a864886f70d0101010500")
PKCS8 = der(0x30, der_int(0) + der(0x30, RSA_OID) + der(0x04, PKCS1))


@pytest.mark.parametrize("text", [pem("RSA PRIVATE KEY", PKCS1), pem("PRIVATE KEY", PKCS8),
                                  pem("PRIVATE KEY", PKCS8).replace("\n", "\\n")])    # as in a JSON file
def test_rs256_matches_rfc_7515_a2(text: str) -> None:
    key = sb.rsa_private_key(text)
    assert key == (num("n"), num("e"), num("d"))
    signature = sb.rs256_sign(key, RFC["signing_input"].encode())
    assert sb.b64url(signature) == RFC["signature"]


def test_a_jwt_verifies_with_the_public_key() -> None:
    key = sb.rsa_private_key(pem("PRIVATE KEY", PKCS8))
    token = sb.jwt_rs256(key, {"iss": "app-1", "iat": 1, "exp": 2})
    head, claims, sig = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "RS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(claims + "==")) == {"iss": "app-1", "iat": 1, "exp": 2}
    s = int.from_bytes(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)), "big")
    em = pow(s, num("e"), num("n")).to_bytes(256, "big")
    import hashlib
    assert em.endswith(hashlib.sha256(f"{head}.{claims}".encode()).digest())
    assert em.startswith(b"\x00\x01\xff\xff") and b"\x00" + sb._SHA256_DIGEST_INFO in em


def small_key_pem() -> str:
    n = num("p") * 3                                  # a 1,026-bit modulus: too small
    return pem("RSA PRIVATE KEY", der(0x30, b"".join(der_int(v) for v in [0, n, 65537, 12345, 1, 1, 1, 1, 1])))


@pytest.mark.parametrize("text", [
    "", "not a key", "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----",
    pem("PRIVATE KEY", PKCS8[:-10]),                                   # truncated
    pem("PRIVATE KEY", der(0x30, der_int(0) + der(0x30, bytes.fromhex("06072a8648ce3d0201")) + der(0x04, PKCS1))),  # EC OID
    pem("RSA PRIVATE KEY", der(0x30, der_int(0) + der(0x04, b"x"))),
    small_key_pem(),
])
def test_a_bad_or_weak_key_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        sb.rsa_private_key(text)


def test_der_items_refuses_bad_lengths() -> None:
    bad: List[bytes] = [b"\x30", b"\x30\x05ab", b"\x30\x85\x00\x00\x00\x00\x01a", b"\x30\x82\xff"]
    for data in bad:
        with pytest.raises(ValueError):
            sb.der_items(data)


# ============================================================================
# Over sockets: a loopback token endpoint (rotating refresh tokens, expiring access tokens)
# and a loopback API that accepts only the current access token
# ============================================================================

import concurrent.futures      # noqa: E402
import threading               # noqa: E402
import time                    # noqa: E402
import urllib.parse            # noqa: E402
from typing import Dict, Iterator  # noqa: E402

from conftest import Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, audit_json, ok, wait_until  # noqa: E402


class Issuer:
    """The token endpoint's state: the one valid refresh token (rotated on every use), the
    valid access tokens, how long new ones live, and every call it got."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refresh = "test-refresh-0"
        self.access: Dict[str, float] = {}
        self.life = 3600
        self.calls = 0
        self.revoked = False
        self.delay = 0.0                                 # > 0: a slow endpoint (renewals overlap)
        self.held = threading.Event()                    # cleared: each renewal waits until it is set
        self.held.set()

    def token(self, h: UpstreamHandler, req: RecordedRequest) -> None:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((req.body or b"").decode()).items()}
        with self.lock:
            self.calls += 1
            if form.get("client_id") != "test-client" or form.get("client_secret") != "test-client-secret-0123456789":
                h.send_json(401, {"error": "invalid_client"})
                return
            if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != self.refresh or self.revoked:
                h.send_json(400, {"error": "invalid_grant", "error_description": f"bad {form.get('refresh_token')}"})
                return
            n = self.calls
            self.refresh = f"test-refresh-{n}"
            access = f"test-access-{n}-abcdefghijklmnopqrstuvwxyz"
            self.access[access] = time.time() + self.life
        time.sleep(self.delay)
        self.held.wait(30)
        h.send_json(200, {"access_token": access, "expires_in": self.life, "refresh_token": self.refresh,
                          "token_type": "Bearer"})

    def api(self, h: UpstreamHandler, req: RecordedRequest) -> None:
        auth = req.header("authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if self.access.get(token, 0) < time.time() or "seks_" in req.wire_text():
            h.send_json(401, {"error": {"code": 401, "message": "Request had invalid authentication credentials."}})
            return
        h.send_json(200, {"emailAddress": "me@example.invalid", "debug": f"you sent {token}",
                          "alive": sorted(t for t, e in self.access.items() if e > time.time())})  # older ones too


@pytest.fixture()
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture()
def oauth_up(issuer: Issuer) -> Iterator[FakeUpstream]:
    up = FakeUpstream("gmail", key="unused")
    up.set_responder(lambda h, req: issuer.token(h, req) if req.target.startswith("/token") else issuer.api(h, req))
    yield up
    up.stop()


def gmail_broker(broker_factory: Brokers, up: FakeUpstream) -> Broker:
    secret = {"client_id": "test-client", "client_secret": "test-client-secret-0123456789",
              "refresh_token": "test-refresh-0", "token_url": up.url + "/token"}
    return broker_factory.seed(("gmail",), keys={"gmail": json.dumps(secret)}, extra_env={"SEKS_UPSTREAM_GMAIL": up.url},
                               via_cli=True)


def profile(b: Broker, token: str) -> "object":
    return b.request("GET", "/gmail/gmail/v1/users/me/profile", {"Authorization": f"Bearer {token}"})


def test_the_broker_mints_caches_and_renews_access_tokens_the_agent_never_sees(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    served = broker_factory.serve(gmail_broker(broker_factory, oauth_up))
    token = served.token("gmail")
    for _ in range(3):
        resp = profile(served, token)
        assert resp.status == 200, resp.body
        assert b"test-access" not in resp.body and json.loads(resp.body)["emailAddress"] == "me@example.invalid"
    assert issuer.calls == 1                         # minted once, then from memory
    issuer.life = 200                                # shorter than the renewal margin
    issuer.access.clear()                            # ...and the current one revoked: 401, renewed, retried
    for _ in range(2):
        resp = profile(served, token)
        assert resp.status == 200 and b"test-access" not in resp.body, resp.body   # every live token masked
    assert len(json.loads(resp.body)["alive"]) == 2
    assert issuer.calls == 3                         # each use renews a token about to expire
    text = json.dumps(audit_json(served)) + served.stderr_text() + ok(served.cli("secret", "list"))
    assert "test-access" not in text and "test-refresh" not in text


def test_twenty_requests_at_expiry_across_two_workers_renew_once(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    import socket
    if not hasattr(socket, "SO_REUSEPORT"):
        pytest.fail("this test needs SO_REUSEPORT for --workers")
    base = gmail_broker(broker_factory, oauth_up)
    served = broker_factory.serve(base, "--workers", "2")
    issuer.delay = 0.2                               # a slow endpoint: the renewal overlaps the others
    issuer.life = 200                                # the first token is already "at expiry"
    assert profile(served, base.token("gmail")).status == 200
    issuer.life, calls = 3600, issuer.calls
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: profile(served, base.token("gmail")).status, range(20)))
    assert statuses == [200] * 20
    assert issuer.calls == calls + 1, f"{issuer.calls - calls} renewals for 20 requests"


def test_a_rotated_refresh_token_survives_a_sigkill_right_after_the_renewal(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    base = gmail_broker(broker_factory, oauth_up)
    served = broker_factory.serve(base)
    assert profile(served, base.token("gmail")).status == 200       # renewal 1 rotates the refresh token
    served.kill()                                                   # SIGKILL
    issuer.access.clear()                                           # the stored access token is now refused
    again = broker_factory.serve(base)
    assert profile(again, base.token("gmail")).status == 200        # renewed with the rotated refresh token
    assert issuer.calls == 2 and issuer.refresh == "test-refresh-2"


def test_a_revoked_refresh_token_is_a_clear_502_naming_the_secret_not_its_values(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    issuer.revoked = True
    base = gmail_broker(broker_factory, oauth_up)
    served = broker_factory.serve(base)
    resp = profile(served, base.token("gmail"))
    assert resp.status == 502, resp.body
    assert b"could not renew the access token of secret gmail-key" in resp.body and b"invalid_grant" in resp.body
    assert b"test-refresh" not in resp.body and b"test-client-secret" not in resp.body
    rows = audit_json(served)
    assert "renewal for secret gmail-key failed" in rows[-1]["reason"] and "test-refresh" not in json.dumps(rows)
    assert oauth_up.requests and all(not r.target.startswith("/gmail") for r in oauth_up.requests)


def jwt_ok(token: str, issuer_claim: str) -> bool:
    """The test endpoints' own RS256 check against RFC 7515 A.2's public key."""
    import hashlib
    try:
        head, claims, sig = token.split(".")
        s = int.from_bytes(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)), "big")
        em = pow(s, num("e"), num("n")).to_bytes(256, "big")
        body = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    except ValueError:
        return False
    digest = hashlib.sha256(f"{head}.{claims}".encode()).digest()
    return em == b"\x00\x01" + b"\xff" * (256 - 3 - 19 - 32) + b"\x00" + sb._SHA256_DIGEST_INFO + digest and \
        body.get("iss") == issuer_claim and body["exp"] > time.time()


def test_github_app_and_service_account_and_client_credentials_grants(broker_factory: Brokers) -> None:
    """A GitHub App's JWT buys an installation token; a Google service account's JWT (its JSON
    file as the secret) buys an access token for Vertex; Graph's client credentials grant; each
    API then accepts only the token its endpoint issued."""
    issued: Dict[str, str] = {}

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((req.body or b"").decode()).items()}
        auth = req.header("authorization") or ""
        if req.target == "/app/installations/42/access_tokens" and req.method == "POST":
            ok_ = jwt_ok(auth[len("Bearer "):], "12345")
            issued["github"] = "ghs_test_installation_token_0123456789"
            h.send_json(201 if ok_ else 401, {"token": issued["github"], "expires_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))})
        elif req.target == "/sa-token":
            good = form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer" and \
                jwt_ok(form.get("assertion", ""), "agent@project.iam.gserviceaccount.com")
            issued["vertex"] = "ya29.test-service-account-token"
            h.send_json(200 if good else 400, {"access_token": issued["vertex"], "expires_in": 3599} if good else {"error": "invalid_grant"})
        elif req.target == "/tenant/token":
            good = form == {"grant_type": "client_credentials", "client_id": "graph-app", "client_secret": "test-graph-secret-0123",
                            "scope": "https://graph.microsoft.com/.default"}
            issued["msgraph"] = "eyJ0-test-graph-app-token"
            h.send_json(200 if good else 400, {"access_token": issued["msgraph"], "expires_in": 3599} if good else {"error": "invalid_client"})
        else:
            h.send_json(200 if auth in (f"Bearer {t}" for t in issued.values()) else 401, {"path": req.target})

    up = FakeUpstream("oauth-apis", key="unused")
    up.set_responder(respond)
    try:
        key_pem = pem("PRIVATE KEY", PKCS8)
        keys = {"github-app": json.dumps({"app_id": "12345", "installation_id": "42", "private_key": key_pem, "api_url": up.url}),
                "vertex": json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": key_pem,
                                      "client_email": "agent@project.iam.gserviceaccount.com", "token_uri": up.url + "/sa-token"}),
                "msgraph": json.dumps({"client_id": "graph-app", "client_secret": "test-graph-secret-0123",
                                       "scope": "https://graph.microsoft.com/.default", "token_url": up.url + "/tenant/token"})}
        env = {f"SEKS_UPSTREAM_{p.upper().replace('-', '_')}": up.url for p in keys}
        served = broker_factory.serve(broker_factory.seed(tuple(keys), keys=keys, extra_env=env, via_cli=True))
        for provider, path in (("github-app", "/github-app/repos/o/r"), ("vertex", "/vertex/us-central1/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent"),
                               ("msgraph", "/msgraph/v1.0/me")):
            resp = served.request("GET", path, {"Authorization": f"Bearer {served.token(provider)}"})
            assert resp.status == 200, (provider, resp.body)
            assert issued[provider.split("-")[0] if provider != "github-app" else "github"] not in resp.body.decode()
        assert "BEGIN" not in ok(served.cli("secret", "list"))
    finally:
        up.stop()


def test_secret_add_oauth_runs_the_device_flow_and_stores_the_refresh_token(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    """RFC 8628 against a loopback device endpoint: the operator is told where to approve,
    the CLI polls (pending twice, then approved), stores the refresh token it never prints,
    and the broker then mints access tokens from it."""
    polls = {"n": 0}

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((req.body or b"").decode()).items()}
        if req.target == "/devicecode":
            if form.get("client_id") != "test-client":
                h.send_json(400, {"error": "invalid_client"})
                return
            h.send_json(200, {"device_code": "dev-code-1", "user_code": "WDJB-MJHT",
                              "verification_uri": "https://example.invalid/device", "expires_in": 60, "interval": 0})
        elif form.get("grant_type") == "urn:ietf:params:oauth:grant-type:device_code":
            polls["n"] += 1
            if polls["n"] < 3:
                h.send_json(400, {"error": "authorization_pending"})
            else:
                h.send_json(200, {"access_token": "test-access-from-device", "refresh_token": issuer.refresh, "expires_in": 10})
        else:
            issuer.token(h, req) if req.target.startswith("/token") else issuer.api(h, req)

    oauth_up.set_responder(respond)
    base = broker_factory.seed(("gmail",), keys={"gmail": json.dumps({
        "client_id": "test-client", "client_secret": "test-client-secret-0123456789", "refresh_token": "unused-0000",
        "token_url": oauth_up.url + "/token"})}, extra_env={"SEKS_UPSTREAM_GMAIL": oauth_up.url, "SEKS_UPSTREAM_MSGRAPH": oauth_up.url})
    client = {"client_id": "test-client", "client_secret": "test-client-secret-0123456789",
              "device_url": oauth_up.url + "/devicecode", "token_url": oauth_up.url + "/token"}
    cp = base.cli("secret", "add", "graph-me", "--oauth", "msgraph", input=json.dumps(client))
    assert cp.returncode == 0, cp.stderr
    assert "https://example.invalid/device" in cp.stderr and "WDJB-MJHT" in cp.stderr and polls["n"] == 3
    assert "test-refresh" not in cp.stderr + cp.stdout
    assert "refresh_token" in ok(base.cli("secret", "list"))
    token = base.mint("msgraph", "graph-agent", secret="graph-me", via_cli=True)
    served = broker_factory.serve(base)
    resp = served.request("GET", "/msgraph/v1.0/me", {"Authorization": f"Bearer {token}"})
    assert resp.status == 200, resp.body
    denied = base.cli("secret", "add", "graph-no", "--oauth", "msgraph", input=json.dumps(dict(client, client_id="other")))
    assert denied.returncode != 0 and "invalid_client" in denied.stderr and "graph-no" not in ok(base.cli("secret", "list"))


def test_vertex_routes_name_a_region_that_only_picks_among_googles_hosts() -> None:
    vertex = sb.builtin_providers()["vertex"]
    target = sb.upstream_target(vertex, "/europe-west4/v1/projects/p/locations/europe-west4/endpoints/e:predict", "", True)
    assert (target.host, target.path) == ("europe-west4-aiplatform.googleapis.com",
                                          "/v1/projects/p/locations/europe-west4/endpoints/e:predict")
    assert sb.upstream_target(vertex, "/global/v1/x", "", True).host == "aiplatform.googleapis.com"
    for rest in ("/us-central1.evil.example/v1", "/evil/v1", "/US-CENTRAL1/v1", "/us-central1@evil/v1", "/"):
        with pytest.raises(sb.NotFound):
            sb.upstream_target(vertex, rest, "", True)
    moved = vertex.with_upstream("http://127.0.0.1:9/base")          # an override: path-style, region dropped
    assert sb.upstream_target(moved, "/us-central1/v1/x", "", True).path == "/base/v1/x"


def test_secret_add_oauth_with_pkce_on_a_loopback_redirect(broker_factory: Brokers, oauth_up: FakeUpstream,
                                                           issuer: Issuer) -> None:
    """Authorization code with PKCE: the CLI prints the consent URL and listens on 127.0.0.1;
    the "browser" (this test) comes back with the code and the state; the token endpoint gets
    the verifier matching the printed challenge; the refresh token is stored, never printed.
    A redirect with another state is turned away."""
    import hashlib
    import subprocess
    import sys
    import urllib.request
    from conftest import BROKER_PY

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((req.body or b"").decode()).items()}
        if form.get("grant_type") == "authorization_code":
            seen["form"] = form
            challenge = sb.b64url(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
            good = form.get("code") == "code-from-google" and challenge == seen["challenge"] and \
                form.get("redirect_uri") == seen["redirect"] and form.get("client_secret") == "test-client-secret-0123456789"
            h.send_json(200 if good else 400, {"access_token": "test-access-x", "refresh_token": issuer.refresh,
                                               "expires_in": 3599} if good else {"error": "invalid_grant"})
        else:
            issuer.token(h, req) if req.target.startswith("/token") else issuer.api(h, req)

    seen: Dict[str, object] = {}
    oauth_up.set_responder(respond)
    base = broker_factory.seed(("openai",), extra_env={"SEKS_UPSTREAM_GMAIL": oauth_up.url})
    client = {"client_id": "test-client", "client_secret": "test-client-secret-0123456789", "scope": "https://www.googleapis.com/auth/gmail.readonly",
              "token_url": oauth_up.url + "/token"}
    proc = subprocess.Popen([sys.executable, str(BROKER_PY), "--db", str(base.db), "secret", "add", "gmail-me", "--oauth", "gmail"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base.env)
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(json.dumps(client))
        proc.stdin.close()
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        consent = lines[1].strip()
        assert consent.startswith("https://accounts.google.com/o/oauth2/v2/auth?"), lines
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(consent).query))
        assert query["code_challenge_method"] == "S256" and query["client_id"] == "test-client"
        seen["challenge"], seen["redirect"] = query["code_challenge"], query["redirect_uri"]
        assert query["redirect_uri"].startswith("http://127.0.0.1:")
        import urllib.error                                   # another state: turned away (400)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(query["redirect_uri"] + "?code=stolen&state=not-the-state", timeout=5)
        with urllib.request.urlopen(query["redirect_uri"] + "?" + urllib.parse.urlencode(
                {"code": "code-from-google", "state": query["state"]}), timeout=5) as page:
            assert b"close this tab" in page.read()
        assert proc.wait(timeout=20) is not None
        assert proc.stdout is not None
        out, err = proc.stdout.read(), "".join(lines) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "test-refresh" not in out + err + consent
    assert "gmail-me" in ok(base.cli("secret", "list"))
    token = base.mint("gmail", "pkce-agent", secret="gmail-me", via_cli=True)
    served = broker_factory.serve(base)
    assert profile(served, token).status == 200


def test_a_config_file_oauth_provider_names_its_grant(broker_factory: Brokers, oauth_up: FakeUpstream,
                                                      issuer: Issuer, tmp_path: Path) -> None:
    """Any other OAuth API (here a Dropbox-like one) from the config file: its grant, its token
    endpoint, {access_token} in its injection; `config check` explains a grant it does not know."""
    config = tmp_path / "seks.ini"
    config.write_text(f"""[provider:dropbox]
upstream = {oauth_up.url}
token = header Authorization Bearer
inject = header Authorization Bearer {{access_token}}
parts = client_id client_secret refresh_token
public = client_id
oauth = refresh_token
token_url = {oauth_up.url}/token
""")
    secret = {"client_id": "test-client", "client_secret": "test-client-secret-0123456789", "refresh_token": "test-refresh-0"}
    served = broker_factory.serve(broker_factory.seed(("dropbox",), keys={"dropbox": json.dumps(secret)}, config=config,
                                                      via_cli=True))
    resp = served.request("GET", "/dropbox/gmail/v1/users/me/profile", {"Authorization": f"Bearer {served.token('dropbox')}"})
    assert resp.status == 200 and b"test-access" not in resp.body, resp.body
    assert issuer.calls == 1
    bad = tmp_path / "bad.ini"
    bad.write_text(config.read_text().replace("oauth = refresh_token", "oauth = implicit"))
    from conftest import run_cli
    cp = run_cli(tmp_path / "unused.db", "config", "check", str(bad))
    assert cp.returncode == 1 and f"{bad}:7:" in cp.stdout and "oauth names grants" in cp.stdout, cp.stdout


def test_requests_keep_using_the_old_token_while_a_renewal_is_slow(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    """Renewal starts five minutes early; until the new token arrives the old one (still
    valid) serves the other requests, which do not wait for the slow token endpoint."""
    served = broker_factory.serve(gmail_broker(broker_factory, oauth_up))
    token = served.token("gmail")
    issuer.life = 200                                # within the renewal margin from the start
    assert profile(served, token).status == 200
    issuer.held.clear()                              # the token endpoint holds the renewal until set
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            renewing = pool.submit(profile, served, token)
            assert wait_until(lambda: issuer.calls == 2, 10), "the renewal never reached the endpoint"
            started = time.monotonic()
            assert profile(served, token).status == 200
            assert time.monotonic() - started < 1.0, "a request waited for the renewal"
            assert not renewing.done(), "the renewal was over before the other request"
        finally:
            issuer.held.set()
        assert renewing.result().status == 200
    assert issuer.calls == 2


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_brokers_own_http_calls_never_follow_a_redirect(status: int) -> None:
    """The OAuth sign-in's form POST (client secret, device code) and a probe of a broker are
    the operator's own calls: an endpoint that answers 3xx is an error, and the place it
    points to hears nothing (urllib would follow 301-303 as a GET by default)."""
    elsewhere, endpoint = FakeUpstream("openai"), FakeUpstream("openai")
    endpoint.set_responder(lambda h, req: h.send_json(status, "moved", [("Location", elsewhere.url + "/token")]))
    try:
        with pytest.raises(sb.ConfigError, match="did not answer with a JSON object"):
            sb.post_form(endpoint.url + "/token", {"client_secret": "test-client-secret-redirect"})
        assert sb.probe_broker(endpoint.url, "/seks/v1/token", timeout=5) == (status, b"")
        assert len(endpoint.requests) == 2 and elsewhere.requests == [], elsewhere.requests
    finally:
        elsewhere.stop()
        endpoint.stop()


def test_a_new_master_key_or_a_replaced_secret_gets_a_new_access_token(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    """The stored access token belongs to the key and the grant it came from: after
    rotate-master-key the broker renews it (not a 502 from a token it cannot decrypt), and a
    secret rotated or removed and added again under the same name never serves the old grant's
    access token."""
    base = gmail_broker(broker_factory, oauth_up)
    served = broker_factory.serve(base)
    assert profile(served, base.token("gmail")).status == 200       # access token 1, stored
    served.stop()
    new_key = base64.urlsafe_b64encode(bytes(range(100, 132))).decode()
    ok(base.cli("rotate-master-key", input=new_key + "\n"))
    base.env = dict(base.env, SEKS_MASTER_KEY=new_key)
    served = broker_factory.serve(base)
    resp = profile(served, base.token("gmail"))
    assert resp.status == 200 and issuer.calls == 2, (resp.status, resp.body, issuer.calls)
    served.stop()
    secret = {"client_id": "test-client", "client_secret": "test-client-secret-0123456789",
              "refresh_token": issuer.refresh, "token_url": oauth_up.url + "/token"}
    ok(base.cli("secret", "rotate", "gmail-key", input=json.dumps(secret)))
    served = broker_factory.serve(base)
    assert profile(served, base.token("gmail")).status == 200 and issuer.calls == 3, issuer.calls
    served.stop()
    ok(base.cli("secret", "rm", "gmail-key"))
    ok(base.cli("secret", "add", "gmail-key", "--provider", "gmail", input=json.dumps(dict(secret, refresh_token=issuer.refresh))))
    token = base.mint("gmail", "gmail-again", via_cli=True)
    served = broker_factory.serve(base)
    assert profile(served, token).status == 200 and issuer.calls == 4, issuer.calls


def stored_parts(b: Broker, name: str) -> Dict[str, str]:
    """A secret's parts as stored, decrypted in-process with the broker's own code."""
    store = sb.Store(str(b.db))
    try:
        provider, ciphertext = store.get_secret(name)
        master = sb.load_master_key(str(b.db), b.env, store)
        return sb.secret_parts(sb.SecretCipher(master).decrypt(ciphertext, sb.secret_ad(name, provider)))
    finally:
        store.close()


def test_a_secret_rotated_under_a_running_broker_and_mid_renewal_wins(
        broker_factory: Brokers, oauth_up: FakeUpstream, issuer: Issuer) -> None:
    """The operator rotates an OAuth secret while a renewal is at the token endpoint: the
    renewal's rotated refresh token does not overwrite the operator's, and the running broker
    stops using the old grant's access token at once (it renews from the new secret)."""
    base = gmail_broker(broker_factory, oauth_up)
    served = broker_factory.serve(base)
    issuer.held.clear()                              # the token endpoint holds the renewal until set
    new = {"client_id": "test-client", "client_secret": "test-client-secret-0123456789",
           "refresh_token": "operator-new-grant-refresh", "token_url": oauth_up.url + "/token"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(profile, served, base.token("gmail"))
            assert wait_until(lambda: issuer.calls == 1, 10), "the renewal never reached the endpoint"
            ok(base.cli("secret", "rotate", "gmail-key", input=json.dumps(new)))
            assert not pending.done(), "the renewal was over before the rotation"
        finally:
            issuer.held.set()
        assert pending.result(timeout=30).status == 200       # served by the token it renewed
    assert stored_parts(base, "gmail-key")["refresh_token"] == "operator-new-grant-refresh"
    issuer.refresh = "operator-new-grant-refresh"
    resp = profile(served, base.token("gmail"))
    assert resp.status == 200 and issuer.calls == 2, (resp.status, resp.body, issuer.calls)
    third = dict(new, refresh_token="operator-third-grant-refresh")   # no race: the token held
    ok(base.cli("secret", "rotate", "gmail-key", input=json.dumps(third)))   # in memory goes too
    issuer.refresh = "operator-third-grant-refresh"
    resp = profile(served, base.token("gmail"))
    assert resp.status == 200 and issuer.calls == 3, (resp.status, resp.body, issuer.calls)
