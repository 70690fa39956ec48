"""The command line through subprocess: secrets from stdin only, tokens shown once, listings without
values, refused values never echoed, --ttl bounds, revocation and expiry seen by a running
broker, key file and DB at rest. Every write here runs the real CLI."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import (
    MASTER_KEY, REAL_KEYS, Broker, Brokers, FakeUpstream, auth_headers, broker_env, db_bytes,
    call, error_type_and_message, ok, parse_table, random_part, run_cli, secret_name,
    wait_until,
)

TOKEN_RE = re.compile(r"^seks_openai_([A-Za-z0-9_-]+)$")
TELEGRAM_RE = re.compile(r"^\d+:[A-Za-z0-9_-]+$")
ID_RE = re.compile(r"\btok_[0-9a-f]{12}\b")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "seks.db"


def via_cli(db: Path, env: Optional[Dict[str, str]] = None) -> Broker:
    """The DB at `db` (no serve process) whose every write runs the real CLI."""
    return Broker(db, env if env is not None else broker_env(), via_cli=True)


def add_secret(db: Path, provider: str, env: Optional[Dict[str, str]] = None) -> None:
    via_cli(db, env).add_secret(secret_name(provider), provider, REAL_KEYS[provider])


def mint(db: Path, provider: str, agent: str = "agent-x", *extra: str) -> str:
    return via_cli(db).mint(provider, agent, *extra)


@pytest.fixture(scope="module")
def broker(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    """The module's broker, its secrets and tokens made (and later minted) with the real CLI."""
    return broker_factory({p: u.url for p, u in upstreams.items()}, via_cli=True)


# ============================================================================
# secrets
# ============================================================================


def test_secret_add_from_stdin_and_list_never_shows_value(db: Path) -> None:
    cp = run_cli(db, "secret", "add", "openai-key", "--provider", "openai", input=REAL_KEYS["openai"] + "\n")
    ok(cp)
    assert REAL_KEYS["openai"] not in cp.stdout + cp.stderr
    add_secret(db, "telegram")
    listing = run_cli(db, "secret", "list")
    out = ok(listing) + listing.stderr
    assert "openai-key" in out and "telegram-key" in out
    assert "openai" in out and "telegram" in out
    for k in (REAL_KEYS["openai"], REAL_KEYS["telegram"]):
        assert k not in out
        assert k[-10:] not in out and k[:12] not in out, "a piece of the secret value is listed"


def test_secret_rm(db: Path) -> None:
    add_secret(db, "openai")
    add_secret(db, "brave")
    ok(run_cli(db, "secret", "rm", "openai-key"))
    out = ok(run_cli(db, "secret", "list"))
    assert "openai-key" not in out and "brave-key" in out
    assert run_cli(db, "secret", "rm", "openai-key").returncode == 1, "removing a missing secret is an error"
    cp = run_cli(db, "token", "mint", "--secret", "openai-key", "--agent", "a")
    assert cp.returncode == 1 and "seks_" not in cp.stdout, "minting for a removed secret must fail"


def test_secret_on_argv_is_refused(db: Path) -> None:
    value = REAL_KEYS["openai"]
    cp = run_cli(db, "secret", "add", "openai-key", "--provider", "openai", value)
    assert cp.returncode == 2, f"rc={cp.returncode} {cp.stderr}"
    msg = (cp.stdout + cp.stderr).lower()
    assert "stdin" in msg, f"the message must say to use stdin: {msg!r}"
    assert value not in cp.stdout + cp.stderr, "the refused secret is echoed back (terminal scrollback, logs)"
    listing = run_cli(db, "secret", "list")
    assert "openai-key" not in listing.stdout, "a refused secret was stored"


def test_secret_add_unknown_provider_is_refused(db: Path) -> None:
    cp = run_cli(db, "secret", "add", "x-key", "--provider", "nosuchprovider", input="v\n")
    assert cp.returncode in (1, 2), cp.returncode
    assert "x-key" not in run_cli(db, "secret", "list").stdout


# ============================================================================
# tokens
# ============================================================================


def test_token_mint_prints_only_the_token_with_256_bits(db: Path) -> None:
    add_secret(db, "openai")
    cp = run_cli(db, "token", "mint", "--secret", "openai-key", "--agent", "agent-a")
    ok(cp)
    assert cp.stdout.count("\n") <= 1 and len(cp.stdout.strip().splitlines()) == 1, repr(cp.stdout)
    token = cp.stdout.strip()
    m = TOKEN_RE.match(token)
    assert m, token
    rand = m.group(1)
    assert len(rand) >= 43, f"random part has {len(rand) * 6} bits, need >= 256"
    assert len(base64.urlsafe_b64decode(rand + "=" * (-len(rand) % 4))) >= 32
    tokens = {token} | {mint(db, "openai", "agent-a") for _ in range(3)}
    assert len(tokens) == 4, "tokens repeat"
    assert REAL_KEYS["openai"] not in cp.stdout + cp.stderr


def test_telegram_token_shape(db: Path) -> None:
    add_secret(db, "telegram")
    token = mint(db, "telegram", "tg-bot")
    assert TELEGRAM_RE.match(token), token
    assert "seks_telegram_" in token
    assert re.match(r"^\d{10}:seks_telegram_[A-Za-z0-9_-]{43}$", token), token


def test_token_mint_for_unknown_secret_fails(db: Path) -> None:
    cp = run_cli(db, "token", "mint", "--secret", "nope", "--agent", "a")
    assert cp.returncode == 1, cp.returncode
    assert "seks_" not in cp.stdout


def test_token_list_never_shows_tokens(db: Path) -> None:
    add_secret(db, "openai")
    add_secret(db, "telegram")
    tokens = [mint(db, "openai", "lister-a"), mint(db, "telegram", "lister-b")]
    out = ok(run_cli(db, "token", "list"))
    assert "ID" in out.splitlines()[0].upper().split() or re.search(r"\bID\b", out), out
    assert len(set(ID_RE.findall(out))) >= 2, out
    assert "lister-a" in out and "lister-b" in out
    for t in tokens:
        rand = random_part(t)
        assert t not in out and rand not in out and rand[:12] not in out and rand[-12:] not in out, out
    for k in REAL_KEYS.values():
        assert k not in out


def test_ttl_units_accepted_and_nonsense_refused(db: Path) -> None:
    add_secret(db, "openai")
    for ttl in ("30m", "12h", "7d"):
        assert TOKEN_RE.match(mint(db, "openai", f"ttl-{ttl}", "--ttl", ttl))
    for bad in ("banana", "-5m", "10y"):
        cp = run_cli(db, "token", "mint", "--secret", "openai-key", "--agent", "a", "--ttl", bad)
        assert cp.returncode == 2, f"--ttl {bad}: rc={cp.returncode}"
        assert "seks_" not in cp.stdout


def test_ttl_past_100_years_is_refused(db: Path) -> None:
    """--ttl (and a time ago) is at most 36500d: a larger one once broke `token list` for good."""
    env = broker_env(master_key=None)
    add_secret(db, "openai", env=env)
    cp = run_cli(db, "token", "mint", "--secret", "openai-key", "--agent", "a", "--ttl", "3000000d", env=env)
    assert cp.returncode == 2 and "36500d" in cp.stderr, cp.stderr
    listing = run_cli(db, "token", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert run_cli(db, "audit", "--since", "99999999d", env=env).returncode == 2


@pytest.mark.parametrize("args", [["secret", "sk-test-pasted-value"], ["audit", "sk-test-pasted-value"],
                                  ["token", "list", "--format", "sk-test-pasted-value"]])
def test_refused_arguments_are_never_echoed(tmp_path: Path, args: List[str]) -> None:
    """argparse never echoes a value it refuses (it may be a pasted secret)."""
    cp = run_cli(tmp_path / "x.db", *args)
    assert cp.returncode == 2, cp
    assert "sk-test-pasted-value" not in cp.stderr + cp.stdout, cp.stderr


def test_token_mint_policy_flags_reach_the_broker(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Every policy flag given to `token mint` is stored with the token (token list shows it) and
    held by a running broker (the other suites mint in-process; this is the CLI's wiring)."""
    limited = broker.mint("openai", "cli-limits", "--allow-method", "GET", "--allow-path", "/v1/models",
                          "--rate", "100/m", "--max-requests", "5", "--ttl", "1h")
    metered = broker.mint("openai", "cli-metered", "--models", "gpt-4o-mini", "--budget-tokens", "1000")
    rows = {r["AGENT"]: r for r in parse_table(ok(broker.cli("token", "list")))}
    assert rows["cli-limits"]["POLICY"] == "methods=GET paths=/v1/models rate=100/m max-requests=5", rows
    assert rows["cli-metered"]["POLICY"] == "models=gpt-4o-mini budget=1000", rows
    assert call(broker, "openai", limited).status == 200
    assert call(broker, "openai", limited, "POST", "/v1/models", b"{}").status == 403
    assert call(broker, "openai", limited, path="/v1/files").status == 403
    chat = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    assert call(broker, "openai", metered, "POST", "/v1/chat/completions", chat).status == 403
    assert [r.method + " " + r.path for r in upstreams["openai"].requests] == ["GET /v1/models"]


# ============================================================================
# a running broker sees revocation and expiry on the next request
# ============================================================================


def call_openai(broker: Broker, token: str) -> int:
    return broker.request("GET", "/openai/v1/models", auth_headers("openai", token)).status


def row_for(listing: str, agent: str) -> str:
    rows = [line for line in listing.splitlines() if agent in line]
    assert len(rows) == 1, (agent, listing)
    return rows[0]


def test_revoke_by_token_then_401(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    token = broker.mint("openai", "revoke-by-token")
    assert call_openai(broker, token) == 200
    cp = broker.cli("token", "revoke", token)
    ok(cp)
    resp = broker.request("GET", "/openai/v1/models", auth_headers("openai", token))
    assert resp.status == 401, resp.status
    error_type_and_message(resp)
    assert call_openai(broker, broker.token("openai")) == 200, "revoking one token revoked another"
    assert len(upstreams["openai"].requests) == 2


def test_revoke_by_id_then_401(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    token = broker.mint("openai", "revoke-by-id")
    assert call_openai(broker, token) == 200
    listing = ok(broker.cli("token", "list"))
    ids = ID_RE.findall(row_for(listing, "revoke-by-id"))
    assert len(ids) == 1, row_for(listing, "revoke-by-id")
    ok(broker.cli("token", "revoke", ids[0]))
    assert call_openai(broker, token) == 401
    assert call_openai(broker, broker.token("openai")) == 200
    assert broker.cli("token", "revoke", "tok_000000000000").returncode == 1


def _timestamps(text: str) -> List[dt.datetime]:
    found = []
    for m in re.finditer(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})(?::(\d{2}))?", text):
        found.append(dt.datetime.strptime(f"{m.group(1)} {m.group(2)}:{m.group(3) or '00'}", "%Y-%m-%d %H:%M:%S"))
    return found


def test_token_expiry(broker: Broker) -> None:
    """With `--ttl 1s` (if seconds are supported) the token dies on time; otherwise the listing shows
    the expiry of a `--ttl 30m` token."""
    cp = broker.cli("token", "mint", "--secret", secret_name("openai"), "--agent", "short-lived", "--ttl", "1s")
    if cp.returncode == 0:
        minted_at = time.monotonic()
        token = cp.stdout.strip()
        assert call_openai(broker, token) == 200, "token dead before its ttl"
        wait_until(lambda: call_openai(broker, token) == 401, minted_at + 1.6 - time.monotonic(), interval=0.1)
        resp = broker.request("GET", "/openai/v1/models", auth_headers("openai", token))
        assert resp.status == 401, "token alive after its ttl"
        error_type_and_message(resp)
        return
    assert cp.returncode == 2, f"--ttl 1s: rc={cp.returncode} (expected 0 or usage error 2)"
    token = broker.mint("openai", "thirty-minutes", "--ttl", "30m")
    assert call_openai(broker, token) == 200
    listing = ok(broker.cli("token", "list"))
    assert re.search(r"expir", listing, re.I), f"token list has no expiry column:\n{listing}"
    row = row_for(listing, "thirty-minutes")
    now_utc = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    now_local = dt.datetime.now()
    stamps = _timestamps(row)
    assert any(abs((s - now - dt.timedelta(minutes=30)).total_seconds()) < 300
               for s in stamps for now in (now_utc, now_local)), f"no expiry ~30 min from now in: {row}"


# ============================================================================
# at rest: key file, DB contents
# ============================================================================


def test_key_file_created_0600_when_no_master_key(db: Path) -> None:
    env = broker_env(master_key=None)
    assert "SEKS_MASTER_KEY" not in env
    old = os.umask(0o022)  # an ordinary umask: the broker must not rely on the caller's
    try:
        add_secret(db, "openai", env=env)
    finally:
        os.umask(old)
    key_file = Path(str(db) + ".key")
    assert key_file.is_file(), "no <db>.key created"
    mode = stat.S_IMODE(key_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    content = key_file.read_bytes()
    ok(run_cli(db, "secret", "add", "second", "--provider", "brave", input="test-brave-second\n", env=env))
    assert key_file.read_bytes() == content, "key file rewritten on second use"
    assert content.strip() not in db_bytes(db), "master key stored in the DB"
    assert "openai-key" in ok(run_cli(db, "secret", "list", env=env))


def test_db_files_are_private(db: Path) -> None:
    old = os.umask(0o022)
    try:
        add_secret(db, "openai")
        mint(db, "openai")
    finally:
        os.umask(old)
    files = [f for f in db.parent.iterdir() if f.name.startswith(db.name)]
    assert db in files
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o077 == 0, f"{f.name} is mode {oct(mode)}"


def test_db_never_holds_real_keys_or_tokens(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    extra = broker.mint("telegram", "at-rest")
    # some traffic, so request-time writes (audit, last-used) are in the files too
    for p in ("openai", "anthropic", "brave"):
        assert broker.request("GET", f"/{p}/v1/x", auth_headers(p, broker.token(p))).status == 200
    assert broker.request("GET", f"/telegram/bot{extra}/getMe").status == 200
    data = db_bytes(broker.db)
    assert data, "no DB files found"
    for p, k in REAL_KEYS.items():
        assert k.encode() not in data, f"real {p} key in the DB in plain"
        assert k.encode("utf-16-le") not in data
    for t in [broker.token(p) for p in REAL_KEYS] + [extra]:
        assert t.encode() not in data, "a token is stored in plain"
        assert random_part(t).encode() not in data, "a token's random part is stored in plain"
    assert MASTER_KEY.encode() not in data and bytes(range(32)) not in data, "master key in the DB"


def test_help_works_and_shows_no_secrets(db: Path) -> None:
    cp = run_cli(db, "--help")
    assert cp.returncode == 0
    assert "serve" in cp.stdout and "secret" in cp.stdout and "token" in cp.stdout
    for k in REAL_KEYS.values():
        assert k not in cp.stdout + cp.stderr
    assert not db.exists(), "--help created a DB"


# ============================================================================
# the test harness: a forked command answers as one started by Python
# ============================================================================

FORK_CASES = [
    (["--version"], ""),
    (["agent", "list"], ""),                                               # no database yet: 1
    (["secret", "add", "openai-key", "--provider", "openai"], REAL_KEYS["openai"] + "\n"),
    (["secret", "add", "x", "--provider", "openai", "sk-test-on-the-command-line"], ""),
    (["secret", "list"], ""),
    (["tokn", "list"], ""),                                                # 2, did you mean
    (["token", "mint", "--secret", "openai-key", "--agent", "a", "--ttl", "99y"], ""),
    (["status"], ""),
]


def test_a_forked_command_answers_as_one_started_by_python(tmp_path: Path) -> None:
    """run_cli forks most commands from a server that imported the broker once (cli_fork.py). The
    same commands started by Python give the same exit codes, output and files."""
    import cli_fork
    from conftest import BROKER_PY, broker_command, run_command
    answers = {}
    for how in ("forked", "python"):
        work = tmp_path / how
        work.mkdir()
        env = broker_env(extra={"SEKS_DB": "team.db"}, master_key=None)   # read from env, in cwd
        cmd, run_env = broker_command(env)
        server_env = broker_command(broker_env(master_key=None))[1]
        got = []
        for argv, stdin in FORK_CASES:
            if how == "forked":
                cp = cli_fork.fork_run(BROKER_PY, cmd, argv, stdin, run_env, str(work), 30, server_env)
                assert cp is not None, "the command was not forked"
            else:
                cp = run_command(argv, input=stdin, env=env, cwd=work, fork=False)
            text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", cp.stdout + "|" + cp.stderr)
            got.append((cp.returncode, text.replace(str(work), "<dir>")))
        files = sorted((f.name, oct(stat.S_IMODE(f.stat().st_mode))) for f in work.iterdir())
        answers[how] = (got, files)
    assert [code for code, _ in answers["python"][0]] == [0, 1, 0, 2, 0, 2, 2, 0]
    assert answers["forked"] == answers["python"]


def test_a_forked_command_over_its_time_is_killed(broker: Broker) -> None:
    """The harness's timeout holds for forked commands too: TimeoutExpired, and the child is gone."""
    import subprocess

    import cli_fork
    from conftest import BROKER_PY, broker_command
    cmd, env = broker_command(broker.env)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):        # (whatever SEKS_TEST_NO_FORK says)
        cli_fork.fork_run(BROKER_PY, cmd, ["--db", str(broker.db), "audit", "--follow"], "", env,
                          str(broker.workdir), 0.2, broker_command(broker_env(master_key=None))[1])
    assert time.monotonic() - start < 5
    servers = {s.proc.pid for s in cli_fork._SERVERS}
    assert servers, "the command was not forked"

    def server_children() -> List[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat_line = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat_line.rsplit(")", 1)[1].split()[1]) in servers:
                found.append(pid)
        return found
    if os.path.isdir("/proc"):
        assert wait_until(lambda: not server_children(), 5), server_children()
