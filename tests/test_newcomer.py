"""The first hour (issue 13), through real subprocesses and sockets: which database a command
uses (and that only storing commands create one), the states and filters of `token list`,
config errors line by line, argument mistakes named without echoing values, Ctrl-D at the
prompt, upstream failures by cause, token ids, labels, revocation and pruning, unmetered
streams, the hand-off formats, help texts, start-up errors, the master-key check in every
command and the key-file guard, and the broker's own 404s and hints."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import pty
import signal
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import (
    BROKER_PY, REAL_KEYS, Broker, Brokers, FakeUpstream, broker_env, call,
    error_type_and_message, free_port, fresh_agent, hanging_upstream, ok, parse_table, run_cli,
    run_command, wait_until,
)

FAKE_SECRET_ARG = "sk-test-stray-argument-0123456789"
OTHER_KEY = base64.urlsafe_b64encode(bytes(range(100, 132))).decode()


def cli(*args: str, env: Dict[str, str] = None, input: str = "", cwd: Path = None) -> subprocess.CompletedProcess:
    return run_command(args, input=input, env=env, cwd=cwd, timeout=30)


def side_by_side(fn, items):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def seeded(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    return broker_factory.seed(("openai", "anthropic"), upstream_urls={p: u.url for p, u in upstreams.items()})


@pytest.fixture(scope="module")
def served(broker_factory: Brokers, seeded: Broker) -> Broker:
    return broker_factory.serve(seeded)


# ============================================================================
# 1. which database
# ============================================================================


def test_only_storing_commands_create_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    reads = [["secret", "list"], ["token", "list"], ["agent", "list"], ["audit"], ["usage"], ["status"],
             ["token", "mint", "--secret", "s", "--agent", "a"], ["audit", "verify"], ["backup", str(tmp_path / "b.db")]]
    for args, cp in zip(reads, side_by_side(lambda a: cli("--db", str(missing), *a), reads)):
        assert cp.returncode == 1, (args, cp.stderr)
        assert f"no database at {missing}" in cp.stderr, (args, cp.stderr)
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
    junk = tmp_path / "notes.db"
    junk.write_text("not a database at all, just some text\n" * 100)
    cp = cli("--db", str(junk), "token", "list")
    assert cp.returncode == 1 and "is not a seks-broker database" in cp.stderr, cp.stderr
    other = tmp_path / "other.db"
    import sqlite3
    con = sqlite3.connect(str(other))
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    cp = cli("--db", str(other), "secret", "list")
    assert cp.returncode == 1 and "not seks-broker's" in cp.stderr, cp.stderr
    # agent add creates one
    ok(cli("--db", str(tmp_path / "new.db"), "agent", "add", "first", env=broker_env(master_key=None)))
    assert (tmp_path / "new.db").exists() and (tmp_path / "new.db.key").exists()


def test_serve_names_its_database_and_warns_when_empty(procs: Brokers, tmp_path: Path, seeded: Broker) -> None:
    empty = Broker(tmp_path / "empty.db", broker_env())
    b = procs.serve(empty)
    text = b.stderr_text()
    assert f"database {empty.db}: 0 secret(s), 0 live token(s), 0 agent(s)" in text, text
    assert "holds no secrets" in text and "secret add" in text
    full = procs.serve(seeded)
    line = next(line for line in full.stderr_text().splitlines() if line.startswith("database "))
    assert re.match(rf"database {re.escape(str(seeded.db))}: 2 secret\(s\), \d+ live token\(s\), \d+ agent\(s\)", line)
    assert "holds no secrets" not in full.stderr_text()
    assert f"upstream override: openai -> {seeded.env['SEKS_UPSTREAM_OPENAI']}" in full.stderr_text()


# ============================================================================
# 5, 10. token states, filters, ids, labels, revoke, prune, agent rm
# ============================================================================


def token_json(b: Broker, *args: str) -> List[Dict]:
    return [json.loads(x) for x in ok(run_cli(b.db, "token", "list", "--json", *args, env=b.env)).splitlines()]


def test_token_list_states_budget_and_filters(seeded: Broker, served: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    def spend(h, req):
        h.send_json(200, {"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 80}})
    upstreams["openai"].set_responder(spend)
    body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
    agent = fresh_agent("states")
    used_up = served.mint("openai", agent, "--max-requests", "1")
    budget = served.mint("openai", agent, "--budget-tokens", "400")
    spent = served.mint("openai", agent, "--budget-tokens", "105")     # fits one request; it reports 110
    served.mint("openai", agent, "--ttl", "1s")
    revoked = served.mint("openai", agent)
    assert call(served, "openai", used_up).status == 200
    assert call(served, "openai", budget, "POST", "/v1/chat/completions", body).status == 200
    assert call(served, "openai", spent, "POST", "/v1/chat/completions", body).status == 200
    refused = call(served, "openai", spent, "POST", "/v1/chat/completions", body)
    assert refused.status == 403 and refused.headers.get("x-should-retry") == "false"
    assert error_type_and_message(refused)[0] == "insufficient_quota"
    served.revoke(revoked)
    assert wait_until(lambda: all(t["requests"] for t in token_json(seeded, "--agent", agent)
                                  if t["policy"]), 5)
    assert wait_until(lambda: "expired" in {t["state"] for t in token_json(seeded, "--agent", agent)}, 5)
    states = sorted(t["state"] for t in token_json(seeded, "--agent", agent))
    assert states == ["active", "exhausted", "exhausted", "expired", "revoked"], states
    table = parse_table(ok(run_cli(seeded.db, "token", "list", "--agent", agent, env=seeded.env)))
    assert {r["BUDGET"] for r in table} >= {"110/400 (28%)", "110/105 (105%)", "-"}, table
    assert [t["state"] for t in token_json(seeded, "--agent", agent, "--status", "expired")] == ["expired"]
    assert token_json(seeded, "--agent", fresh_agent("nobody")) == []
    other = fresh_agent("disabled")
    served.mint("openai", other)
    ok(run_cli(seeded.db, "agent", "disable", other, env=seeded.env))
    assert [t["state"] for t in token_json(seeded, "--agent", other)] == ["agent-disabled"]


def test_mint_says_its_id_labels_revoke_prune_and_agent_rm(seeded: Broker, served: Broker) -> None:
    agent = fresh_agent("ids")
    cp = run_cli(seeded.db, "token", "mint", "--secret", "openai-key", "--agent", agent, "--label", "nightly job",
                 env=seeded.env)
    token = ok(cp).strip()
    assert re.fullmatch(r"seks_openai_[A-Za-z0-9_-]{43}", token)
    match = re.search(r"minted (tok_[0-9a-f]{12}) for agent " + re.escape(agent), cp.stderr)
    assert match and token not in cp.stderr, cp.stderr
    token_id = match.group(1)
    [row] = token_json(seeded, "--agent", agent)
    assert (row["id"], row["label"]) == (token_id, "nightly job")
    cp = run_cli(seeded.db, "token", "revoke", token_id[4:], env=seeded.env)          # without tok_
    assert cp.returncode == 0 and f"revoked {token_id}" in cp.stderr, cp.stderr
    cp = run_cli(seeded.db, "token", "revoke", token_id, env=seeded.env)
    assert cp.returncode == 0 and "already revoked at" in cp.stderr, cp.stderr
    assert call(served, "openai", token).status == 401
    keep = served.mint("openai", agent)
    ok(run_cli(seeded.db, "token", "prune", "--older-than", "1d", env=seeded.env))
    assert token_id in [t["id"] for t in token_json(seeded, "--agent", agent)]       # ended just now: kept
    ok(run_cli(seeded.db, "token", "prune", env=seeded.env))
    assert [t["id"] for t in token_json(seeded, "--agent", agent)] != [] and \
        token_id not in [t["id"] for t in token_json(seeded, "--agent", agent)]
    cp = run_cli(seeded.db, "agent", "rm", agent, env=seeded.env)
    assert cp.returncode == 1 and "live token" in cp.stderr and "--force" in cp.stderr
    assert call(served, "openai", keep).status == 200
    ok(run_cli(seeded.db, "agent", "rm", agent, "--force", env=seeded.env))
    assert call(served, "openai", keep).status == 401
    assert agent not in ok(run_cli(seeded.db, "agent", "list", env=seeded.env))


# ============================================================================
# 6, 7, 8, 13. config errors, arguments, the prompt, help
# ============================================================================


def test_config_errors_one_per_line(seeded: Broker, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nport = lots\nworkers = none\n[nonsense]\nx = 1\n")
    cp = run_cli(seeded.db, "--config", str(bad), "token", "list", env=seeded.env)
    assert cp.returncode == 1
    assert "\\n" not in cp.stderr, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert lines[0].startswith("error: invalid config file") and len(lines) >= 4, lines
    assert any("bad.ini:2" in x for x in lines) and any("bad.ini:3" in x for x in lines), lines


def test_argument_mistakes_are_named_without_echoing(seeded: Broker) -> None:
    db = str(seeded.db)
    cases = [
        (["secret", "list", "--db", db], 0, None),                                  # --db after the command
        (["secret", "list", "--agent", "x", "--db", db], 2, "--agent is not an option of 'secret list'; it belongs to:"),
        (["token", "list", FAKE_SECRET_ARG, "--db", db], 2, "unrecognized arguments (not shown"),
        (["--db", db, "tokn", "list"], 2, "did you mean 'token'?"),
        (["--db", db, "token", "lst"], 2, "did you mean 'list'?"),
        ([FAKE_SECRET_ARG], 2, "not shown"),
        ([], 2, "serve"),
    ]
    results = side_by_side(lambda c: cli(*c[0], env=seeded.env), cases)
    for (args, code, words), cp in zip(cases, results):
        assert cp.returncode == code, (args, cp.stderr)
        if words:
            assert words in cp.stderr, (args, cp.stderr)
        assert FAKE_SECRET_ARG not in cp.stdout + cp.stderr
        assert "tokn" not in cp.stderr.replace("'token'", "") or code == 0
    assert "usage:" in results[1].stderr and "secret list" in results[1].stderr
    assert "COMMAND" in results[-1].stderr and "token" in results[-1].stderr and "run" in results[-1].stderr


def test_ctrl_d_at_the_hidden_prompt_ends_cleanly(tmp_path: Path) -> None:
    """On a real terminal (a pty as the controlling terminal): the hidden prompt, then Ctrl-D."""
    import fcntl
    import select
    import termios
    db = tmp_path / "prompt.db"
    master, slave = pty.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, str(BROKER_PY), "--db", str(db), "secret", "add", "k", "--provider",
                             "openai"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=broker_env(), preexec_fn=own_terminal)
    os.close(slave)
    try:
        shown = b""
        deadline = time.monotonic() + 20
        while b"input hidden" not in shown and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                shown += os.read(master, 1024)
        assert b"input hidden" in shown, shown
        os.write(master, b"\x04")                                  # Ctrl-D
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    assert proc.returncode == 1, err
    assert b"Traceback" not in err and b"no value given; nothing was stored" in err, err
    assert ok(run_cli(db, "secret", "list")).count("\n") == 1      # header only


def test_help_texts(seeded: Broker) -> None:
    helps = [["secret", "add"], ["serve"], ["run"], ["token", "mint"], ["token", "list"], ["audit", "list"],
             ["status"], ["agent", "rm"], ["usage"], ["backup"]]
    results = side_by_side(lambda h: cli(*h, "--help", env=seeded.env), helps)
    for args, cp in zip(helps, results):
        assert cp.returncode == 0 and "examples:" in cp.stdout, (args, cp.stdout[-500:])
        assert "python3 " in cp.stdout
    secret_help, serve_help = results[0].stdout, results[1].stdout
    assert "stdin" in secret_help and "prompt" in secret_help
    for name in ("openai", "anthropic", "telegram", "brave"):
        assert name in secret_help
    port = " ".join(re.search(r"--port PORT\s+(.*?)(?=\n  --)", serve_help, re.S).group(1).split())
    assert "default: 8787" in port and "env SEKS_PORT" in port, port


# ============================================================================
# 9, 14. upstream failures, start-up errors
# ============================================================================


def test_upstream_failures_say_why_to_the_agent_and_where_to_the_operator(procs: Brokers, tmp_path: Path) -> None:
    closed = free_port()
    hang = hanging_upstream("anthropic")
    try:
        base = procs.seed(("openai", "anthropic", "groq"), upstream_urls={
            "openai": f"http://127.0.0.1:{closed}", "anthropic": hang.url, "groq": "http://no-such-host.invalid"})
        b = procs.serve(base, "--upstream-timeout", "0.2s")
        cases = [("openai", "refused the connection", f"127.0.0.1:{closed}"),
                 ("anthropic", "timed out", f"127.0.0.1:{hang.port}"),
                 ("groq", None, "no-such-host.invalid")]
        for provider, cause, where in cases:
            resp = call(b, provider, base.token(provider))
            kind, message = error_type_and_message(resp)
            assert resp.status in (502, 504), (provider, resp.status)
            if cause:
                assert cause in message, (provider, message)
            else:
                assert "DNS lookup failed" in message or "unreachable" in message or "timed out" in message, message
            assert where not in message and "127.0.0.1" not in message, message
            b.wait_for_log(lambda text: f"Target(http://{where})" in text)
    finally:
        hang.stop()


def test_providers_listing(seeded: Broker) -> None:
    rows = {json.loads(x)["name"]: json.loads(x) for x in ok(run_cli(seeded.db, "providers", "--json", env=seeded.env)).splitlines()}
    assert set(rows) >= {"openai", "anthropic", "gemini", "groq", "discord", "telegram", "github", "notion",
                         "cloudflare", "brave"}
    assert rows["anthropic"]["routes"] == ["/anthropic", "/claude"]
    assert rows["openai"]["upstream"] == seeded.env["SEKS_UPSTREAM_OPENAI"]           # overrides applied
    assert rows["openai"]["env"] == ["OPENAI_BASE_URL", "OPENAI_API_KEY"]
    assert rows["gemini"]["token_places"] == ["header x-goog-api-key", "query key"]
    table = parse_table(ok(run_cli(seeded.db, "providers", env=seeded.env)))
    assert {r["PROVIDER"] for r in table} == set(rows)


def test_start_up_errors_name_the_thing(procs: Brokers, seeded: Broker, tmp_path: Path) -> None:
    b = procs.serve(seeded)
    db = str(seeded.db)
    cases = [
        (["serve", "--port", str(b.port)], {}, [f"127.0.0.1:{b.port} is already in use", "--port"]),
        (["serve", "--port", "0", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "k.pem")], {},
         ["--tls-cert", "nope.pem", "no such file"]),
        (["serve", "--port", "99999"], {}, ["--port", "0-65535"]),
        (["serve"], {"SEKS_PORT": "abc"}, ["$SEKS_PORT", "whole number"]),
    ]
    results = side_by_side(lambda c: cli("--db", db, *c[0], env=dict(seeded.env, **c[1])), cases)
    for (args, _, words), cp in zip(cases, results):
        assert cp.returncode in (1, 2), (args, cp.stderr)
        for word in words:
            assert word in cp.stderr, (args, word, cp.stderr)
        assert "Traceback" not in cp.stderr
    proc = subprocess.Popen([sys.executable, str(BROKER_PY), "--db", db, "serve", "--host", "0.0.0.0", "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=seeded.env, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 15
        while "listening on" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(10)
    assert "plain HTTP on all interfaces" in seen, seen


# ============================================================================
# 11, 12. unmetered streams, hand-off formats
# ============================================================================


def test_unmetered_streams_are_shown(seeded: Broker, served: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    def stream_without_usage(h, req):
        h.send_sse([b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"], 0)
    upstreams["openai"].set_responder(stream_without_usage)
    agent = fresh_agent("unmetered")
    token = served.mint("openai", agent)
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode()
    assert call(served, "openai", token, "POST", "/v1/chat/completions", body).status == 200
    assert "include_usage" not in (upstreams["openai"].requests[-1].body or b"").decode()   # not added
    def usage_rows():
        return [json.loads(x) for x in ok(run_cli(seeded.db, "usage", "--json", "--agent", agent,
                                                  env=seeded.env)).splitlines()]
    assert wait_until(lambda: usage_rows(), 5)
    [row] = usage_rows()
    assert (row["requests"], row["tokens"], row["unmetered"]) == (1, 0, 1), row
    [line] = parse_table(ok(run_cli(seeded.db, "usage", "--agent", agent, env=seeded.env)))
    assert line["UNMETERED"] == "1"


def test_hand_off_formats(seeded: Broker, tmp_path: Path, served: Broker) -> None:
    out = tmp_path / "agent.env"
    cp = run_cli(seeded.db, "token", "mint", "--secret", "openai-key", "--agent", fresh_agent("fmt"),
                 "--format", "shell", "--out", str(out), env=seeded.env)
    assert cp.returncode == 0 and cp.stdout == "" and "mode 0600" in cp.stderr, cp
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert "# This file is a credential" in text
    assert re.search(r"^export OPENAI_BASE_URL='http://127\.0\.0\.1:\d+/openai/v1'$", text, re.M), text
    sourced = subprocess.run(["sh", "-c", f". '{out}' && env"], capture_output=True, text=True, timeout=10,
                             env={"PATH": os.environ["PATH"]})
    got = dict(line.split("=", 1) for line in sourced.stdout.splitlines() if "=" in line)
    assert got["OPENAI_API_KEY"].startswith("seks_openai_") and got["OPENAI_BASE_URL"].endswith("/openai/v1")
    assert call(served, "openai", got["OPENAI_API_KEY"]).status == 200
    formats = {f: ok(run_cli(seeded.db, "token", "mint", "--secret", "anthropic-key", "--agent", fresh_agent("fmt"),
                             "--format", f, env=seeded.env)) for f in ("dotenv", "env", "json")}
    assert re.search(r'^ANTHROPIC_API_KEY="seks_anthropic_[A-Za-z0-9_-]{43}"$', formats["dotenv"], re.M)
    assert re.fullmatch(r"ANTHROPIC_BASE_URL=\S+/anthropic\nANTHROPIC_API_KEY=seks_anthropic_\S+\n", formats["env"])
    data = json.loads(formats["json"])
    assert data["env"]["ANTHROPIC_API_KEY"] == data["token"] and re.fullmatch(r"tok_[0-9a-f]{12}", data["token_id"])


# ============================================================================
# 15. the master key in every command; the key-file guard
# ============================================================================


def test_a_wrong_master_key_is_refused_everywhere(seeded: Broker) -> None:
    wrong = dict(seeded.env, SEKS_MASTER_KEY=OTHER_KEY)
    commands = [["secret", "list"], ["token", "list"], ["agent", "list"], ["audit"], ["usage"], ["status"],
                ["token", "mint", "--secret", "openai-key", "--agent", "x"], ["token", "prune"]]
    for args, cp in zip(commands, side_by_side(lambda a: run_cli(seeded.db, *a, env=wrong), commands)):
        assert cp.returncode == 1 and "does not match this database" in cp.stderr, (args, cp.stderr)
        assert "seks_" not in cp.stdout


def test_a_deleted_key_file_is_written_again_from_memory(procs: Brokers, tmp_path: Path) -> None:
    env = broker_env({"openai": "http://127.0.0.1:9"}, master_key=None)
    b = Broker(tmp_path / "guard.db", env)
    b.add_secret("openai-key", "openai", REAL_KEYS["openai"])
    key_file = Path(str(b.db) + ".key")
    before = key_file.read_bytes()
    served = procs.serve(b)
    key_file.unlink()
    assert wait_until(key_file.exists, 10), "the key file was not written again"
    assert key_file.read_bytes() == before and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    served.wait_for_log(lambda text: "ERROR key-file" in text and "written again" in text)


# ============================================================================
# 16. the broker's own answers
# ============================================================================


def test_broker_404s_and_hints(served: Broker, seeded: Broker) -> None:
    root = served.request("GET", "/")
    kind, message = error_type_and_message(root)
    assert root.status == 404 and "/<provider>/" in message and "openai" in message, message
    typo = served.request("GET", "/opnai/v1/models", {"Authorization": f"Bearer {seeded.token('openai')}"})
    assert typo.status == 404 and "did you mean 'openai'" in error_type_and_message(typo)[1]
    real = "sk-proj-" + "Q" * 48
    resp = call(served, "openai", real)
    kind, message = error_type_and_message(resp)
    assert resp.status == 401 and "looks like an OpenAI API key" in message and real not in message, message
    intro = served.request("GET", "/seks/v1/token", {"Authorization": f"Bearer {seeded.token('openai')}"})
    assert intro.status == 200 and intro.json()["provider"] == "openai" and intro.json()["agent"] == "agent-openai"
    assert served.request("GET", "/seks/v1/token", {"Authorization": "Bearer seks_openai_" + "x" * 43}).status == 401


def test_localhost_answers_on_ipv6_loopback_too(served: Broker) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
        has_v6 = True
    except OSError:
        has_v6 = False
    if not has_v6:
        assert "[::1]" not in served.ready_line
        return
    assert f"http://[::1]:{served.port}" in served.ready_line, served.ready_line
    with socket.create_connection(("::1", served.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while True:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 200") and b'"ok"' in answer


def test_a_taken_ipv6_loopback_port_is_reported_not_ignored(seeded: Broker) -> None:
    """Review finding: when another process held [::1]:PORT the broker stayed on 127.0.0.1
    silently, and agents using 'localhost' could reach that process instead. Now it warns;
    where this machine has no IPv6 there is nothing to take and nothing is said."""
    holder = socket.socket(socket.AF_INET6)
    try:
        holder.bind(("::1", 0))
        holder.listen(1)
    except OSError:
        holder.close()
        holder = None
    port = holder.getsockname()[1] if holder is not None else free_port()
    try:
        b = seeded.serve("--port", str(port), port_flag=False)
        try:
            text = b.stderr_path.read_text()
            if holder is not None:
                assert f"[::1]:{port} is held by another process" in text, text
                assert "[::1]" not in b.ready_line, b.ready_line
            else:
                assert "held by another process" not in text, text
        finally:
            b.stop()
    finally:
        if holder is not None:
            holder.close()


def test_the_broker_paths_are_reserved(tmp_path: Path) -> None:
    """/seks/ is the broker's own (token introspection): no custom provider or alias may take it."""
    for section in ("[provider:seks]\nupstream = http://127.0.0.1:9\ntoken = header x-key\n",
                    "[provider:mine]\nupstream = http://127.0.0.1:9\ntoken = header x-key\naliases = seks\n"):
        path = tmp_path / "c.ini"
        path.write_text(section)
        cp = cli("config", "check", str(path))
        assert cp.returncode == 1 and "seks" in cp.stdout and ("reserved" in cp.stdout or "clash" in cp.stdout), cp.stdout


def test_the_readme_first_command_streams_an_answer_in_an_empty_folder(tmp_path: Path) -> None:
    """`demo` in an empty folder, followed literally: the printed curl commands (parsed as the
    shell would) get a plain and a streamed answer through the broker with no real key anywhere,
    the demo key echoed back arrives masked, the printed audit command shows both requests, and
    Ctrl-C ends it and deletes its folder (the working folder stays empty)."""
    import shlex
    import urllib.request
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in broker_env().items() if k != "SEKS_MASTER_KEY"}
    proc = subprocess.Popen([sys.executable, str(BROKER_PY), "demo", "--port", "0"], cwd=str(work), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = ""
        deadline = time.monotonic() + 20
        while "Ctrl-C stops the demo" not in printed and time.monotonic() < deadline and proc.poll() is None:
            printed += proc.stdout.readline()
        curls = [shlex.split(line.strip()) for line in printed.splitlines() if line.strip().startswith("curl ")]
        assert len(curls) == 2, printed
        answers = []
        for argv in curls:
            url = next(a for a in argv if a.startswith("http://"))
            headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
            data = argv[argv.index("-d") + 1].encode()
            with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=20) as r:
                answers.append((r.status, r.headers.get("Content-Type", ""), r.read().decode()))
        (s1, _, plain), (s2, ctype, streamed) = answers
        assert s1 == 200 and "Hello from the demo upstream" in json.loads(plain)["choices"][0]["message"]["content"]
        assert "Bearer [REDACTED-BY-SEKS]" in plain, plain                 # the real demo key, masked
        assert s2 == 200 and ctype.startswith("text/event-stream")
        events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 10, streamed[:300]
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if json.loads(e)["choices"])
        assert "Hello from the demo upstream" in text and "[REDACTED-BY-SEKS]" in text
        audit_line = next(line.strip() for line in printed.splitlines() if line.strip().endswith(" audit"))
        audit_argv = shlex.split(audit_line)
        assert audit_argv[0] == "python3"
        rows = subprocess.run([sys.executable] + audit_argv[1:] + ["--json"], capture_output=True, text=True,
                              timeout=30, env=env, cwd=str(work))
        assert [json.loads(x)["outcome"] for x in rows.stdout.splitlines()] == ["ok", "ok"], rows.stderr
        folder = re.search(r"deletes (\S+)\.", printed).group(1)
        assert Path(folder).is_dir()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not Path(folder).exists(), "the demo's folder was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert os.listdir(work) == [], os.listdir(work)


def test_the_ipv6_listener_shares_the_connection_cap(procs: Brokers, seeded: Broker) -> None:
    """--max-connections bounds the broker, not each listener: a connection held on 127.0.0.1
    fills a cap of 1, and [::1] then answers 503 too (when this machine has IPv6 loopback)."""
    b = procs.serve(seeded, "--max-connections", "1", "--client-timeout", "20s", "--header-timeout", "20s")
    if "[::1]" not in b.ready_line:
        with pytest.raises(OSError):
            socket.create_connection(("::1", b.port), timeout=2).close()
        return
    def answer(host: str) -> bytes:
        with socket.create_connection((host, b.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(4096)

    held = socket.create_connection(("127.0.0.1", b.port), timeout=5)
    try:
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")          # an unfinished head holds the slot
        # (127.0.0.1 accepts in order: a second connection's 503 says the held one has the slot)
        assert answer("127.0.0.1").startswith(b"HTTP/1.1 503")
        got = answer("::1")
        assert got.startswith(b"HTTP/1.1 503"), got[:100]
    finally:
        held.close()
