"""`run` and `status` (issue 16) through real subprocesses and sockets: the command's whole
environment is scanned for real keys, inherited key variables are removed, the tokens `run` mints
work during the command and stop (401 at a running broker) however it ends: normally, non-zero,
killed by a signal, or after SIGTERM to `run`; `run` returns the command's code, uses a running
broker or its own, and two runs at once keep their tokens and summaries apart. `status` agrees
with `audit` and `usage`, escapes agent text, and progress lines appear only on a terminal."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import tempfile
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from conftest import (
    MASTER_KEY, REAL_KEYS, Broker, Brokers, FakeUpstream, audit_json, broker_command, broker_env,
    call, free_port, fresh_agent, fresh_token, load_broker_module, ok, run_cli, wait_until,
)
from raw_http import LoopbackServer

RUN_TIMEOUT_S = 60.0

# The agent: dumps its whole environment, calls each provider it has variables for through the
# broker (OpenAI-style and Anthropic-style, with the variables only), then ends as `mode` says.
CHILD = r'''
import json, os, signal, sys, time, urllib.request
mode, out, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = dict(os.environ)
statuses = []
for _ in range(calls):
    for base, key, header in (("OPENAI_BASE_URL", "OPENAI_API_KEY", "Authorization"),
                              ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "x-api-key")):
        if base in env:
            value = ("Bearer " if header == "Authorization" else "") + env[key]
            req = urllib.request.Request(env[base] + "/models", headers={header: value})
            try:
                statuses.append(urllib.request.urlopen(req, timeout=10).status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
with open(out + ".tmp", "w") as handle:
    json.dump({"env": env, "statuses": statuses}, handle)
os.replace(out + ".tmp", out)
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
if mode == "kill9":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "wait-term":
    def on_term(signum, frame):
        open(out + ".term", "w").close()
        sys.exit(42)
    signal.signal(signal.SIGTERM, on_term)
    open(out + ".ready", "w").close()
    for _ in range(600):
        time.sleep(0.05)
    sys.exit(99)
'''


@pytest.fixture(scope="module")
def base(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    """A DB with openai and anthropic secrets, every upstream overridden to its FakeUpstream."""
    return broker_factory.seed(("openai", "anthropic"), upstream_urls={p: u.url for p, u in upstreams.items()})


@pytest.fixture(scope="module")
def served(broker_factory: Brokers, base: Broker) -> Broker:
    """A serve process on the same DB: the external broker, and the judge of revoked tokens."""
    return broker_factory.serve(base)


@pytest.fixture(scope="module")
def child_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("child") / "agent.py"
    path.write_text(CHILD)
    return path


def run_args(b: Broker, agent: str, child: Path, mode: str, out: Path, calls: int = 1,
             secrets: Tuple[str, ...] = ("openai-key", "anthropic-key"), extra: Tuple[str, ...] = (),
             env: Dict[str, str] = None) -> Tuple[List[str], Dict[str, str]]:
    """(argv, env) of `seks_broker.py --db DB run ...` (started as conftest's broker_command says:
    a real process, its bytecode cached) for the CHILD agent."""
    cmd, run_env = broker_command(env if env is not None else b.env)
    argv = [*cmd, "--db", str(b.db), "run", "--agent", agent]
    for name in secrets:
        argv += ["--secret", name]
    return argv + list(extra) + ["--", sys.executable, str(child), mode, str(out), str(calls)], run_env


def run(b: Broker, agent: str, child: Path, mode: str, out: Path, calls: int = 1,
        env: Dict[str, str] = None, **kw: Any) -> subprocess.CompletedProcess:
    argv, run_env = run_args(b, agent, child, mode, out, calls, env=env, **kw)
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=run_env,
                          cwd=str(b.workdir))


def child_report(out: Path) -> Dict[str, Any]:
    return json.loads(out.read_text())


def assert_no_secret(text: str) -> None:
    for value in list(REAL_KEYS.values()) + [MASTER_KEY]:
        assert value not in text, "a real key or the master key reached the command or the output"


def assert_tokens_dead(served: Broker, report: Dict[str, Any]) -> None:
    env = report["env"]
    for provider, var in (("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")):
        if var in env:
            resp = call(served, provider, env[var])
            assert resp.status == 401, (provider, resp.status, resp.body[:200])


def tokens_of(b: Broker, agent: str) -> List[Dict[str, Any]]:
    lines = ok(run_cli(b.db, "token", "list", "--agent", agent, "--json", env=b.env)).splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ============================================================================
# run: environment, broker, revocation, exit codes
# ============================================================================


def test_run_with_its_own_broker_gives_the_command_tokens_and_no_key(
        base: Broker, served: Broker, child_py: Path, tmp_path: Path, upstreams: Dict[str, FakeUpstream]) -> None:
    """No --url and nothing at the configured address (SEKS_PORT points at a closed port): `run`
    starts a broker in-process. The command's environment holds the SDK variables and no real key:
    an inherited OPENAI_API_KEY, a variable holding a stored secret's value and SEKS_* are dropped
    with warnings. The command's calls reach the upstreams with the real keys (they check them)."""
    agent, out = fresh_agent("run-own"), tmp_path / "report.json"
    env = dict(base.env, OPENAI_API_KEY="sk-test-inherited-by-accident-0000", GITHUB_TOKEN="ghp_test_inherited_0000",
               SOME_CONFIG=f"prefix-{REAL_KEYS['anthropic']}-suffix", SEKS_PORT=str(free_port()), KEEP_ME="yes")
    cp = run(base, agent, child_py, "exit7", out, env=env)
    assert cp.returncode == 7, cp.stderr
    assert "started a broker for this command on http://127.0.0.1:" in cp.stderr
    report = child_report(out)
    child_env = report["env"]
    assert report["statuses"] == [200, 200], (report["statuses"], cp.stderr)
    assert child_env["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")
    assert child_env["OPENAI_BASE_URL"].endswith("/openai/v1")
    assert child_env["ANTHROPIC_BASE_URL"].endswith("/anthropic")
    assert child_env["OPENAI_API_KEY"].startswith("seks_openai_")
    assert child_env["ANTHROPIC_API_KEY"].startswith("seks_anthropic_")
    assert child_env["KEEP_ME"] == "yes"                       # the rest of the environment stays
    for dropped in ("GITHUB_TOKEN", "SOME_CONFIG", "SEKS_MASTER_KEY", "SEKS_PORT", "SEKS_UPSTREAM_OPENAI"):
        assert dropped not in child_env, dropped
    assert_no_secret(json.dumps(child_env))
    for name in ("OPENAI_API_KEY", "GITHUB_TOKEN", "SOME_CONFIG", "SEKS_MASTER_KEY"):
        assert re.search(rf"seks run: warning: removed {name}\b", cp.stderr), (name, cp.stderr)
    assert_no_secret(cp.stdout + cp.stderr)
    assert child_env["OPENAI_API_KEY"] not in cp.stdout + cp.stderr
    assert upstreams["openai"].requests[-1].header("authorization") == f"Bearer {REAL_KEYS['openai']}"
    assert upstreams["anthropic"].requests[-1].header("x-api-key") == REAL_KEYS["anthropic"]
    assert re.search(r"seks run: 2 request\(s\) \(anthropic: 1 request\(s\).*openai: 1 request\(s\).*2 token\(s\) "
                     r"revoked", cp.stderr), cp.stderr
    tokens = tokens_of(base, agent)
    assert len(tokens) == 2 and {t["state"] for t in tokens} == {"revoked"}, tokens
    assert {t["label"] for t in tokens} == {"seks run"}
    assert all(t["expires_at"] and t["expires_at"] - time.time() <= 86400 for t in tokens), tokens
    assert_tokens_dead(served, report)


@pytest.mark.parametrize("mode,code", [("exit0", 0), ("exit3", 3), ("kill9", 128 + 9)])
def test_run_with_a_running_broker_revokes_however_the_command_ends(
        base: Broker, served: Broker, child_py: Path, tmp_path: Path, mode: str, code: int) -> None:
    agent, out = fresh_agent(f"run-{mode}"), tmp_path / "report.json"
    cp = run(base, agent, child_py, mode, out, extra=("--url", served.url, "--ttl", "10m"))
    assert cp.returncode == code, cp.stderr
    assert f"seks run: using the broker at {served.url}" in cp.stderr
    report = child_report(out)
    assert report["statuses"] == [200, 200]
    assert_tokens_dead(served, report)
    tokens = tokens_of(base, agent)
    assert {t["state"] for t in tokens} == {"revoked"}
    assert all(t["expires_at"] - time.time() <= 600 for t in tokens)       # --ttl bounds them
    rows = [r for r in audit_json(base, "--agent", agent) if r["outcome"] == "ok"]
    assert len(rows) == 2, rows                                          # the external broker audited them


def test_sigterm_to_run_reaches_the_command_and_revokes(
        base: Broker, served: Broker, child_py: Path, tmp_path: Path) -> None:
    agent, out = fresh_agent("run-term"), tmp_path / "report.json"
    argv, env = run_args(base, agent, child_py, "wait-term", out, extra=("--url", served.url))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_until(lambda: Path(str(out) + ".ready").exists() or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.communicate()
        report = child_report(out)
        assert report["statuses"] == [200, 200]
        assert call(served, "openai", report["env"]["OPENAI_API_KEY"]).status == 200   # live meanwhile
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert Path(str(out) + ".term").exists(), "the command never got the SIGTERM"
    assert proc.returncode == 42, err
    assert "2 token(s) revoked" in err
    assert_tokens_dead(served, report)


def test_two_runs_at_once_keep_their_tokens_and_counts_apart(
        base: Broker, served: Broker, child_py: Path, tmp_path: Path) -> None:
    """Two runs on one DB at the same time, one through the running broker and one with its own:
    each summary counts its own requests; each token is revoked once its own run ends."""
    jobs = [(fresh_agent("twin-a"), tmp_path / "a.json", 3, ("--url", served.url)),
            (fresh_agent("twin-b"), tmp_path / "b.json", 1, ())]
    env = dict(base.env, SEKS_PORT=str(free_port()))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda j: run(base, j[0], child_py, "exit0", j[1], calls=j[2], env=env,
                                              secrets=("openai-key",), extra=j[3]), jobs))
    for (agent, out, calls, _), cp in zip(jobs, results):
        assert cp.returncode == 0, cp.stderr
        assert f"seks run: {calls} request(s) (openai: {calls} request(s)" in cp.stderr, cp.stderr
        report = child_report(out)
        assert report["statuses"] == [200] * calls
        assert_tokens_dead(served, report)
        assert len([r for r in audit_json(base, "--agent", agent) if r["outcome"] == "ok"]) == calls
    a, b = (child_report(j[1])["env"]["OPENAI_API_KEY"] for j in jobs)
    assert a != b


def test_run_refuses_a_url_without_a_broker_and_a_missing_command(base: Broker, child_py: Path, tmp_path: Path) -> None:
    agent = fresh_agent("run-nourl")
    cp = run(base, agent, child_py, "exit0", tmp_path / "never.json", extra=("--url", f"http://127.0.0.1:{free_port()}"))
    assert cp.returncode == 1 and "no broker serving" in cp.stderr, cp.stderr
    assert not (tmp_path / "never.json").exists()
    assert {t["state"] for t in tokens_of(base, agent)} == {"revoked"}   # minted, then revoked
    cmd, env = broker_command(base.env)
    cp = subprocess.run([*cmd, "--db", str(base.db), "run", "--agent", agent, "--secret", "openai-key"],
                        capture_output=True, text=True, timeout=30, env=env)
    assert cp.returncode == 2 and "needs a command after '--'" in cp.stderr, cp.stderr
    base.add_secret("openai-second", "openai", "sk-test-second-openai-key-0000")
    agent = fresh_agent("run-twice")        # two secrets for one provider: refused, both revoked
    cp = run(base, agent, child_py, "exit0", tmp_path / "never.json", secrets=("openai-key", "openai-second"))
    assert cp.returncode == 2 and "two secrets for openai" in cp.stderr, cp.stderr
    assert not (tmp_path / "never.json").exists()
    assert [t["state"] for t in tokens_of(base, agent)] == ["revoked", "revoked"]


SPY = r"""
import json, os, sys, urllib.request
out, key_file = sys.argv[1], sys.argv[2]
try:
    open(key_file, "rb").read()
    read = "yes"
except OSError as exc:
    read = type(exc).__name__
req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/models",
                             headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
status = urllib.request.urlopen(req, timeout=10).status
with open(out, "w") as handle:
    json.dump({"uid": os.getuid(), "groups": os.getgroups(), "env": dict(os.environ), "key_file": read,
               "status": status}, handle)
"""


def test_run_says_a_same_user_command_can_read_the_key_and_user_closes_it(
        base: Broker, tmp_path: Path, upstreams: Dict[str, FakeUpstream]) -> None:
    """Review finding: the command `run` starts runs as the operator, who can read the key file
    (and, with SEKS_MASTER_KEY, run's own environment in /proc), so code the agent runs can
    decrypt every key. `run` now says so each time, and `--user NAME` (run started as root)
    starts the command as that user, in its own group only, where it cannot read the key file
    and its tokens still work. Not root: --user is refused with the reason."""
    db = tmp_path / "keyfile.db"
    env = broker_env({"openai": upstreams["openai"].url}, {"SEKS_PORT": str(free_port())}, master_key=None)
    ok(run_cli(db, "secret", "add", "openai-key", "--provider", "openai", input=REAL_KEYS["openai"] + "\n", env=env))
    key_file = str(db) + ".key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    spy_dir = Path(tempfile.mkdtemp(prefix="seks-run-user-", dir="/tmp"))
    try:
        os.chmod(spy_dir, 0o1777)
        spy, out = spy_dir / "spy.py", spy_dir / "report.json"
        spy.write_text(SPY)
        spy.chmod(0o644)
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

        def run_spy(*extra: str, run_env: Dict[str, str] = env, database: Path = db) -> subprocess.CompletedProcess:
            cmd, cmd_env = broker_command(run_env)
            argv = [*cmd, "--db", str(database), "run", "--agent", fresh_agent("run-user"),
                    "--secret", "openai-key", *extra, "--", python, str(spy), str(out), key_file]
            return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=cmd_env,
                                  cwd=str(spy_dir))

        cp = run_spy()
        assert cp.returncode == 0, cp.stderr
        assert f"the command runs as you and can read the master key ({key_file})" in cp.stderr, cp.stderr
        report = json.loads(out.read_text())
        assert report["key_file"] == "yes" and report["status"] == 200, report     # what the warning says
        cp = run_spy(run_env=dict(base.env, SEKS_PORT=str(free_port())), database=base.db)
        assert cp.returncode == 0 and "SEKS_MASTER_KEY, in /proc" in cp.stderr, cp.stderr
        out.unlink()
        cp = run_spy("--user", "nobody")
        if os.geteuid() != 0:
            assert cp.returncode == 2 and "--user needs run to be started as root" in cp.stderr, cp.stderr
            assert not out.exists()
            return
        assert cp.returncode == 0, cp.stderr
        assert "can read the master key" not in cp.stderr, cp.stderr
        report = json.loads(out.read_text())
        import pwd
        nobody = pwd.getpwnam("nobody")
        assert report["uid"] == nobody.pw_uid and set(report["groups"]) <= {nobody.pw_gid}, report
        assert report["env"]["HOME"] == nobody.pw_dir and report["env"]["USER"] == "nobody"
        assert report["key_file"] == "PermissionError" and report["status"] == 200, report
        assert report["env"]["OPENAI_API_KEY"].startswith("seks_openai_")
        assert_no_secret(json.dumps(report))
        assert upstreams["openai"].requests[-1].header("authorization") == f"Bearer {REAL_KEYS['openai']}"
        cp = run_spy("--user", "root")
        assert cp.returncode == 2 and "is root" in cp.stderr, cp.stderr
    finally:
        shutil.rmtree(spy_dir, ignore_errors=True)


class Squatter(LoopbackServer):
    """Something else on the broker's port that answers 200 and a token id to any request,
    and records what it was sent."""

    def __init__(self) -> None:
        self.seen: List[bytes] = []
        super().__init__("squatter")

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(2.0)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    break
                data += more
            with self.lock:
                self.seen.append(data)
            body = json.dumps({"token_id": "tok_squatter", "agent": "x", "provider": "openai",
                               "expires_at": None}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            sock.close()


def test_run_never_trusts_or_feeds_a_squatter_on_the_broker_port(base: Broker, child_py: Path, tmp_path: Path) -> None:
    """Review finding: `run` took any 200 from GET /seks/v1/token as its broker, sending the
    minted token as a Bearer to whatever listened there and pointing the command at it. Now it
    asks by the token's SHA-256 and checks the id that comes back: a squatter gets neither the
    token nor the command's traffic, and with --url pointing at it `run` refuses."""
    squatter = Squatter()
    try:
        agent, out = fresh_agent("run-squat"), tmp_path / "report.json"
        cp = run(base, agent, child_py, "exit0", out, env=dict(base.env, SEKS_PORT=str(squatter.port)))
        assert cp.returncode == 0, cp.stderr
        assert "started a broker for this command" in cp.stderr and "is not a broker serving" in cp.stderr, cp.stderr
        report = child_report(out)
        assert report["statuses"] == [200, 200], cp.stderr
        assert f":{squatter.port}/" not in report["env"]["OPENAI_BASE_URL"]
        seen = b"".join(squatter.seen)
        assert seen.startswith(b"GET /seks/v1/token?digest="), seen[:200]
        for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            assert report["env"][var].encode() not in seen
            assert hashlib.sha256(report["env"][var].encode()).hexdigest().encode() in seen or var != "OPENAI_API_KEY"
        cp = run(base, fresh_agent("run-squat"), child_py, "exit0", tmp_path / "never.json",
                 extra=("--url", squatter.url))
        assert cp.returncode == 1 and "no broker serving" in cp.stderr, cp.stderr
        assert not (tmp_path / "never.json").exists()
    finally:
        squatter.stop()


def test_token_introspection_is_audited_and_answers_by_digest(served: Broker) -> None:
    """Review finding: GET /seks/v1/token was handled like a health check (no audit row). Now
    each answer is audited as "introspect" (not counted against the token's limits), also when
    asked by digest; a malformed digest is a 400 and an unknown one a 401."""
    agent, token = fresh_token(served, "openai", "--max-requests", "1")
    by_bearer = served.request("GET", "/seks/v1/token", {"Authorization": f"Bearer {token}"})
    assert by_bearer.status == 200 and by_bearer.json()["agent"] == agent, by_bearer
    token_id = by_bearer.json()["token_id"]
    digest = hashlib.sha256(token.encode()).hexdigest()
    by_digest = served.request("GET", "/seks/v1/token?digest=" + digest)
    for resp in (by_bearer, by_digest):
        assert resp.status == 200 and resp.json()["token_id"] == token_id, resp
    assert served.request("GET", "/seks/v1/token?digest=" + digest.upper()).status == 400
    assert served.request("GET", "/seks/v1/token?digest=" + digest + "&x=1").status == 400
    assert served.request("GET", "/seks/v1/token?digest=" + "0" * 64).status == 401
    rows = [r for r in audit_json(served) if r.get("token_id") == token_id]
    assert [r["outcome"] for r in rows] == ["introspect", "introspect"], rows
    assert token not in json.dumps(rows)
    assert call(served, "openai", token).status == 200          # the one allowed request is still there


# ============================================================================
# status
# ============================================================================


def status_json(b: Broker, *args: str) -> Dict[str, Any]:
    return json.loads(ok(run_cli(b.db, "status", "--json", *args, env=b.env)))


def test_status_agrees_with_audit_usage_and_token_list(base: Broker, served: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    def usage_answer(h: Any, req: Any) -> None:
        h.send_json(200, {"id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [],
                          "usage": {"prompt_tokens": 100, "completion_tokens": 90, "total_tokens": 190}})
    upstreams["openai"].set_responder(usage_answer)
    agent = fresh_agent("status-budget")
    token = served.mint("openai", agent, "--budget-tokens", "200")
    body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
    assert call(served, "openai", token, "POST", "/v1/chat/completions", body).status == 200
    assert call(served, "openai", "seks_openai_" + "x" * 43).status == 401          # a denial
    wait_until(lambda: any(r["agent"] == agent for r in audit_json(base)), 5)
    ok(run_cli(base.db, "audit", "verify", env=base.env))
    report = status_json(base, "--url", served.url)
    rows = [r for r in audit_json(base) if r["outcome"] != "prune"]
    usage = [json.loads(line) for line in ok(run_cli(base.db, "usage", "--json", env=base.env)).splitlines()]
    assert report["broker"] == {"url": served.url, "running": True}
    assert report["traffic"]["last_day"]["requests"] == sum(r["outcome"] != "introspect" for r in rows)
    assert report["traffic"]["last_hour"]["llm_tokens"] == sum(u["tokens"] for u in usage)
    assert report["audit"]["head_id"] == rows[-1]["id"]
    verify = report["audit"]["last_verify"]
    assert verify["ok"] is True and verify["head_id"] == report["audit"]["head_id"] and verify["rows"] == len(rows)
    [low] = [b for b in report["budgets_low"] if b["agent"] == agent]
    assert (low["used"], low["budget"]) == (190, 200)
    denied = sum(1 for r in rows if r["outcome"] == "denied")
    assert sum(d["count"] for d in report["denials_last_hour"]) == denied >= 1
    agents = {a["name"]: a for a in report["agents"]}
    live = [t for t in json.loads("[" + ",".join(ok(run_cli(base.db, "token", "list", "--json", env=base.env))
                                                 .splitlines()) + "]") if t["state"] == "active"]
    for name, entry in agents.items():
        assert entry["live_tokens"] == sum(1 for t in live if t["agent"] == name), name
    text = ok(run_cli(base.db, "status", "--url", served.url, env=base.env))
    assert f"head row {rows[-1]['id']}" in text and "last verify: passed" in text
    assert "running" in text and f"{low['used']}/{low['budget']}" in text
    stopped = status_json(base, "--url", f"http://127.0.0.1:{free_port()}")
    assert stopped["broker"]["running"] is False


def test_status_escapes_agent_text(base: Broker, served: Broker) -> None:
    """A denial reason quotes the model the agent asked for: the operator's screen gets it escaped."""
    agent = fresh_agent("status-esc")
    token = served.mint("openai", agent, "--models", "gpt-4o-mini")
    evil = "evil\x1b]0;owned\x07\x1b[2J\u202emodel"
    body = json.dumps({"model": evil, "messages": []}).encode()
    assert call(served, "openai", token, "POST", "/v1/chat/completions", body).status == 403
    assert wait_until(lambda: any(r["agent"] == agent for r in audit_json(base)), 5)
    cp = run_cli(base.db, "status", "--url", served.url, env=base.env)
    assert cp.returncode == 0, cp.stderr
    assert "model 'evil" in cp.stdout, cp.stdout
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in cp.stdout, repr(cp.stdout)
    assert any("\x1b" in d["reason"] for d in status_json(base, "--url", served.url)["denials_last_hour"])  # JSON exact


# ============================================================================
# progress only on a terminal
# ============================================================================


def run_on_pty(argv: List[str], env: Dict[str, str]) -> Tuple[int, str]:
    """Run with stderr on a pseudo-terminal; (exit code, what the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(30), shown.decode("utf-8", "replace")


def test_long_commands_show_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """5,000 audit rows: audit verify, backup, rotate-master-key and audit prune print rows done,
    rate and time left on a terminal, and nothing of the sort into a pipe."""
    sb = load_broker_module()
    db = tmp_path / "big.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKS_")}
    store = sb.Store(str(db))
    try:
        master = sb.load_master_key(str(db), env, store)
        keys = sb.KeyRing(master)
        for i in range(5000):
            store.append_audit(keys, sb.AuditRow(ts="2020-01-01T00:00:00Z", outcome="ok", method="GET",
                                                 path=f"/openai/v1/models?{i}", status=200), counted=True)
    finally:
        store.close()
    cmd, env = broker_command(env)
    broker = [*cmd, "--db", str(db)]
    piped = subprocess.run(broker + ["audit", "verify"], capture_output=True, text=True, timeout=60, env=env)
    assert piped.returncode == 0 and "5000 rows, chain intact" in piped.stdout
    assert "verifying" not in piped.stderr and "/s" not in piped.stderr and "\r" not in piped.stderr
    for command, label in ((["audit", "verify"], "verifying"), (["backup", str(tmp_path / "copy.db")], "backing up"),
                           (["rotate-master-key"], "re-keying"), (["audit", "prune", "--before", "2021-01-01"], "pruning")):
        code, shown = run_on_pty(broker + command, env)
        assert code == 0, (command, shown)
        assert re.search(rf"{label}: [\d,]+/[\d,]+ (rows|pages), [\d,]+/s, \d+s left", shown), (command, shown)
    assert "1 rows, chain intact" in ok(subprocess.run(broker + ["audit", "verify"], capture_output=True,
                                                       text=True, timeout=60, env=env))
