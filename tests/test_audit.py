"""The audit log over real sockets (issue 3): one chained row per request, allowed or denied;
credentials never recorded (unknown tokens only as a keyed fingerprint, Telegram's key segment
and Gemini's key= masked); `audit` filters, JSON and table output, `--follow`; `audit verify`
against rows edited, deleted, reordered and forged with the sqlite3 CLI; `audit prune`; a
broker killed with SIGKILL mid-traffic; and no answer without its row (a lone surrogate in a
model name, alone and racing benign requests in one commit batch).

Layout: helpers → what a row records (security first) → output and filters → tamper detection →
pruning → crash safety → the shared broker's whole chain.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import queue
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from conftest import (
    Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, audit_json, broker_command, call,
    auth_headers, db_bytes, fresh_agent, fresh_token, http_request, key_checked, ok, parse_table,
    random_part, run_cli, unknown_token, wait_until,
)
from conftest import REAL_KEYS

FIELDS = {"id", "ts", "agent", "token_id", "provider", "secret", "method", "path", "status", "bytes_in",
          "bytes_out", "duration_ms", "client", "outcome", "reason", "model", "tokens_in", "tokens_out"}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
FP_RE = re.compile(r"\bfp:[0-9a-f]{8,}\b")
TABLE_HEADER = ["ID", "TIME", "AGENT", "TOKEN", "PROVIDER", "MODEL", "METHOD", "PATH", "STATUS", "IN", "OUT",
                "DURATION", "OUTCOME"]
FOLLOW_TIMEOUT_S = 15.0
# The sqlite3 command-line shell is the tool the issue names for editing rows. Where it is not
# installed, the same SQL runs through Python's sqlite3 module in a separate process instead.
SQLITE3_CLI = shutil.which("sqlite3")


# ============================================================================
# Helpers
# ============================================================================


def rows_with(broker: Broker, marker: str) -> List[Dict[str, Any]]:
    return [r for r in audit_json(broker) if marker in (r["path"] or "")]


def token_id_of(broker: Broker, agent: str) -> str:
    ids = [r["ID"] for r in parse_table(ok(broker.cli("token", "list"))) if r["AGENT"] == agent]
    assert len(ids) == 1, ids
    return ids[0]


def sized_body(n: int) -> bytes:
    """A JSON body of exactly n bytes."""
    base = b'{"pad": ""}'
    return base[:-2] + b"x" * (n - len(base)) + base[-2:]


def sql_edit(db: Path, sql: str) -> None:
    """Edit the DB from outside the broker, like an intruder would: the sqlite3 CLI (or, where it
    is not installed, Python's sqlite3 module in a separate process)."""
    if SQLITE3_CLI:
        cmd = [SQLITE3_CLI, str(db), sql]
    else:
        cmd = [sys.executable, "-c", "import sqlite3, sys\n"
               "db = sqlite3.connect(sys.argv[1]); db.executescript(sys.argv[2]); db.commit(); db.close()",
               str(db), sql]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, f"{cmd[0]} failed: {cp.stderr}"


def verify(broker: Broker, db: Optional[Path] = None) -> subprocess.CompletedProcess:
    return run_cli(db or broker.db, "audit", "verify", env=broker.env)


# ============================================================================
# What a row records: never a credential (security first)
# ============================================================================


def test_unknown_token_rows_carry_a_fingerprint_never_the_token(broker: Broker,
                                                               upstreams: Dict[str, FakeUpstream]) -> None:
    marker = secrets.token_hex(6)
    bad1, bad2 = unknown_token(), unknown_token()
    for bad in (bad1, bad1, bad2):
        assert call(broker, "openai", bad, path=f"/v1/models?probe={marker}").status == 401
    assert http_request(f"{broker.url}/openai/v1/models?probe={marker}-missing").status == 401
    rows = rows_with(broker, marker)
    assert len(rows) == 4, rows
    fps = []
    for row in rows[:3]:
        assert (row["status"], row["outcome"], row["agent"], row["token_id"]) == (401, "denied", None, None), row
        assert row["provider"] == "openai"
        found = FP_RE.findall(row["reason"] or "")
        assert len(found) == 1, row["reason"]
        fps.append(found[0])
    assert fps[0] == fps[1], "the same bad token must give the same fingerprint"
    assert fps[0] != fps[2], "different bad tokens must give different fingerprints"
    assert rows[3]["status"] == 401 and "missing" in (rows[3]["reason"] or "").lower()

    shown = (ok(broker.cli("audit", "--json", "--limit", "1000")) + ok(broker.cli("audit", "--limit", "1000"))
             + ok(broker.cli("audit", "verify")))
    for bad in (bad1, bad2):
        rand = random_part(bad)
        assert rand[:8] not in shown, "part of an unknown token is shown by `audit`"
        assert rand[:12].encode() not in db_bytes(broker.db), "part of an unknown token is stored in the DB"
    assert not upstreams["openai"].requests


def test_valid_token_never_recorded(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "openai", prefix="secretless")
    assert call(broker, "openai", token, path="/v1/models?limit=1").status == 200
    assert call(broker, "openai", token, "DELETE", "/v1/nothing").status == 200
    shown = ok(broker.cli("audit", "--json", "--agent", agent)) + ok(broker.cli("audit", "--agent", agent))
    assert random_part(token)[:8] not in shown
    assert REAL_KEYS["openai"] not in shown
    assert random_part(token)[:12].encode() not in db_bytes(broker.db)


def test_telegram_key_segment_masked(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "telegram", prefix="tg-mask")
    assert call(broker, "telegram", token, "POST", "/sendMessage?chat_id=42", b'{"text": "hi"}').status == 200
    resp = http_request(f"{broker.url}/telegram/file/bot{token}/photos/file_1.jpg")
    assert resp.status == 200
    bad = unknown_token("telegram")
    marker = secrets.token_hex(6)
    assert http_request(f"{broker.url}/telegram/bot{bad}/getMe?m={marker}").status == 401
    rows = audit_json(broker, "--agent", agent)
    assert [r["path"] for r in rows] == ["/telegram/bot***/sendMessage?chat_id=42",
                                        "/telegram/file/bot***/photos/file_1.jpg"]
    [denied] = rows_with(broker, marker)
    assert denied["path"] == f"/telegram/bot***/getMe?m={marker}"
    assert FP_RE.search(denied["reason"] or "")
    shown = ok(broker.cli("audit", "--json", "--limit", "1000")) + ok(broker.cli("audit", "--limit", "1000"))
    for secret in (random_part(token)[:8], random_part(bad)[:8], REAL_KEYS["telegram"].split(":")[1]):
        assert secret not in shown


def test_gemini_key_query_masked(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    agent, token = fresh_token(broker, "gemini", prefix="gem-mask")
    path = "/gemini/v1beta/models/gemini-2.0-flash:generateContent"
    resp = http_request(f"{broker.url}{path}?alt=json&key={token}", "POST", {"Content-Type": "application/json"},
                        b'{"contents": []}')
    assert resp.status == 200
    assert upstreams["gemini"].only_request().query["key"] == [REAL_KEYS["gemini"]]
    bad = unknown_token("gemini")
    marker = secrets.token_hex(6)
    assert http_request(f"{broker.url}{path}?key={bad}&m={marker}", "POST", None, b"{}").status == 401
    [row] = audit_json(broker, "--agent", agent)
    assert row["path"] == f"{path}?alt=json&key=***"
    [denied] = rows_with(broker, marker)
    assert denied["path"] == f"{path}?key=***&m={marker}"
    shown = ok(broker.cli("audit", "--json", "--limit", "1000")) + ok(broker.cli("audit", "--limit", "1000"))
    for secret in (random_part(token)[:8], random_part(bad)[:8], REAL_KEYS["gemini"]):
        assert secret not in shown


def test_one_row_per_request_allowed_and_denied(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        h.send_json(404 if "missing" in req.path else 200, {"path": req.path})
    upstreams["openai"].set_responder(key_checked("openai", respond))
    agent, token = fresh_token(broker, "openai", "--allow-method", "GET", prefix="rows")
    statuses = [call(broker, "openai", token).status for _ in range(3)]
    statuses += [call(broker, "openai", token, "POST", "/v1/chat/completions", b"{}").status for _ in range(2)]
    statuses.append(call(broker, "openai", token, path="/v1/missing").status)
    assert statuses == [200, 200, 200, 403, 403, 404]
    rows = audit_json(broker, "--agent", agent)
    assert [r["status"] for r in rows] == statuses
    assert [r["outcome"] for r in rows] == ["ok", "ok", "ok", "denied", "denied", "ok"]
    assert [r["method"] for r in rows] == ["GET"] * 3 + ["POST"] * 2 + ["GET"]
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 6
    tid = token_id_of(broker, agent)
    for r in rows:
        assert (r["agent"], r["token_id"], r["provider"], r["secret"], r["client"]) == (
            agent, tid, "openai", "openai-key", "127.0.0.1"), r
    for r in rows[3:5]:
        assert "method POST" in r["reason"], r["reason"]
    assert all(r["reason"] is None for r in rows[:3])


def test_audit_json_exact_fields(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """`audit --json`: one JSON object a line with exactly these fields and values."""
    answer = json.loads(sized_body(900))
    answer.update({"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o-mini",
                   "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}})
    answer_bytes = json.dumps(answer).encode()
    upstreams["openai"].set_responder(key_checked("openai", lambda h, req: h.send_bytes(
        200, answer_bytes, content_type="application/json")))
    agent, token = fresh_token(broker, "openai", prefix="exact")
    request_body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    before = time.time()
    resp = call(broker, "openai", token, "POST", "/v1/chat/completions?x=1", request_body)
    assert resp.status == 200 and resp.body == answer_bytes
    lines = ok(broker.cli("audit", "--json", "--agent", agent)).splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert set(row) == FIELDS
    assert TS_RE.match(row["ts"]), row["ts"]
    ts = dt.datetime.strptime(row["ts"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    assert before - 2 <= ts <= time.time() + 1
    assert isinstance(row["id"], int)
    assert isinstance(row["duration_ms"], (int, float)) and 0 < row["duration_ms"] < 30_000
    assert {k: v for k, v in row.items() if k not in ("id", "ts", "duration_ms")} == {
        "agent": agent, "token_id": token_id_of(broker, agent), "provider": "openai", "secret": "openai-key",
        "method": "POST", "path": "/openai/v1/chat/completions?x=1", "status": 200,
        "bytes_in": len(request_body), "bytes_out": len(answer_bytes), "client": "127.0.0.1",
        "outcome": "ok", "reason": None, "model": "gpt-4o-mini", "tokens_in": 11, "tokens_out": 4}


SURROGATE_BODY = b'{"model":"\\ud800","messages":[]}'     # JSON escape of a lone surrogate
BENIGN_BODY = b'{"model":"gpt-4o","messages":[]}'


def audit_count(b: Broker, where: str = "1=1", params: Tuple[Any, ...] = ()) -> int:
    conn = sqlite3.connect(f"file:{b.db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(f"SELECT count(*) FROM audit WHERE {where}", params).fetchone()[0]
    finally:
        conn.close()


def post_whole(b: Broker, path: str, headers: Dict[str, str], body: bytes,
               timeout: float = 15.0) -> Tuple[Optional[int], bytes, bool]:
    """-> (status or None, body, complete). `complete` is False when the connection was cut
    before the whole body arrived (how the broker withholds an answer it could not audit)."""
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=timeout)
    status: Optional[int] = None
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        status = resp.status
        data = resp.read()
        return status, data, True
    except (http.client.HTTPException, OSError):
        return status, b"", False
    finally:
        conn.close()


def test_lone_surrogate_model_is_answered_and_audited(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """A lone surrogate in the JSON `model` must not make the audit INSERT fail (the row is
    sanitised, the chain still verifies): no answer without its audit row."""
    agent, token = fresh_token(broker, "openai", prefix="surrogate")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, body, complete = post_whole(broker, "/openai/v1/chat/completions", headers, SURROGATE_BODY)
    assert status == 200 and complete, (status, body[:300], broker.stderr_text()[-1500:])
    assert len(upstreams["openai"].requests) == 1
    assert wait_until(lambda: audit_count(broker, "agent = ?", (agent,)) >= 1, 5), \
        "the surrogate request's audit row"
    conn = sqlite3.connect(f"file:{broker.db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT status, outcome, model, path FROM audit WHERE agent = ?", (agent,)).fetchall()
    finally:
        conn.close()
    assert len(rows) == 1, rows
    st, outcome, _model, path = rows[0]
    assert st == 200 and outcome == "ok" and path == "/openai/v1/chat/completions", rows
    # the chain still verifies with the sanitised row in it
    cp = broker.cli("audit", "verify")
    assert cp.returncode == 0, cp.stderr


def test_concurrent_answers_all_have_audit_rows(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """60 benign requests racing 20 surrogate ones, interleaved (they share group-commit
    batches): every request that got a complete 200 must have its audit row."""
    agent, token = fresh_token(broker, "openai", prefix="surrogate-batch")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bodies = [SURROGATE_BODY if i % 4 == 3 else BENIGN_BODY for i in range(80)]
    results: List[Tuple[bool, Optional[int], bool]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(bodies), timeout=20)

    def worker(body: bytes) -> None:
        try:
            start.wait()
        except threading.BrokenBarrierError:
            pass
        st, _, complete = post_whole(broker, "/openai/v1/chat/completions", headers, body)
        with lock:
            results.append((body == SURROGATE_BODY, st, complete))

    threads = [threading.Thread(target=worker, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert len(results) == len(bodies), "some requests never finished"
    ok_benign = sum(1 for sur, st, c in results if not sur and st == 200 and c)
    ok_all = sum(1 for _, st, c in results if st == 200 and c)
    assert ok_all >= 20, f"too few complete 200s to judge: {results}"
    # rows are committed before an answer's last bytes; allow a moment anyway
    wait_until(lambda: audit_count(broker, "agent = ?", (agent,)) >= ok_all, 3)
    rows = audit_count(broker, "agent = ?", (agent,))
    assert rows >= ok_all, (f"{ok_all} requests got a complete 200 but only {rows} audit rows exist "
                            f"(benign 200s: {ok_benign}); broker log: {broker.stderr_text()[-1500:]}")
    # and a surrogate in a batch must not cost the benign requests sharing it their answers
    assert ok_benign >= 55, f"only {ok_benign}/60 benign requests answered 200: {results}"


# ============================================================================
# Output: filters, readable table, --follow
# ============================================================================


def test_audit_filters(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    a, b = fresh_agent("filter-a"), fresh_agent("filter-b")
    ta = broker.mint("openai", a, "--allow-method", "GET")
    tb = broker.mint("anthropic", b)
    assert call(broker, "openai", ta).status == 200
    assert call(broker, "openai", ta, "POST", "/v1/chat/completions", b"{}").status == 403
    assert call(broker, "openai", ta).status == 200
    assert call(broker, "anthropic", tb, "POST", "/v1/messages", b"{}").status == 200

    rows_a = audit_json(broker, "--agent", a)   # commit order: a row follows its answer, so under
    # load the quick 403's row can be written before that of the 200 answered just before it
    assert sorted(r["status"] for r in rows_a) == [200, 200, 403] and {r["agent"] for r in rows_a} == {a}
    assert [r["status"] for r in audit_json(broker, "--agent", a, "--status", "4xx")] == [403]
    assert [r["status"] for r in audit_json(broker, "--agent", a, "--status", "403")] == [403]
    assert [r["status"] for r in audit_json(broker, "--agent", a, "--status", "2xx")] == [200, 200]
    assert audit_json(broker, "--agent", a, "--status", "5xx") == []
    assert [r["agent"] for r in audit_json(broker, "--agent", b, "--provider", "anthropic")] == [b]
    assert audit_json(broker, "--agent", b, "--provider", "openai") == []
    assert {r["provider"] for r in audit_json(broker, "--provider", "anthropic")} == {"anthropic"}
    assert all(r["status"] // 100 == 4 for r in audit_json(broker, "--status", "4xx"))

    assert audit_json(broker, "--agent", a, "--since", "1h") == rows_a
    assert audit_json(broker, "--agent", a, "--since", "2000-01-01") == rows_a
    minute_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    assert audit_json(broker, "--agent", a, "--since", minute_ago.strftime("%Y-%m-%dT%H:%M:%SZ")) == rows_a
    assert audit_json(broker, "--agent", a, "--since", "2999-01-01T00:00:00") == []

    assert audit_json(broker, "--agent", a, "--limit", "2") == rows_a[1:], "--limit keeps the newest rows"
    newest = audit_json(broker)[-1]
    assert json.loads(ok(broker.cli("audit", "--json", "--limit", "1")).strip()) == newest

    for bad in (("--status", "4x"), ("--status", "teapot"), ("--since", "yesterday")):
        cp = broker.cli("audit", *bad)
        assert cp.returncode == 2, (bad, cp.returncode, cp.stderr)


def test_audit_table_is_readable(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    answer = sized_body(1234)
    upstreams["openai"].set_responder(key_checked("openai", lambda h, req: h.send_bytes(
        200, answer, content_type="application/json")))
    agent, token = fresh_token(broker, "openai", "--allow-method", "GET", "--allow-method", "POST", prefix="table")
    assert call(broker, "openai", token, "POST", "/v1/files", sized_body(2500)).status == 200
    assert call(broker, "openai", token, "DELETE", "/v1/files/f1").status == 403
    out = ok(broker.cli("audit", "--agent", agent))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 3, out
    header = lines[0]
    cols = [(m.start(), m.group(0)) for m in re.finditer(r"\S+(?: \S+)*", header)]
    assert [name for _, name in cols] == TABLE_HEADER, header
    for line in lines[1:]:   # every value starts exactly under its column name
        for start, name in cols[1:]:
            assert line[start - 2:start] == "  " and line[start] != " ", (name, header, line)
    rows = parse_table(out)        # in the order recorded: the POST's row is written after its
    allowed, denied = sorted(rows, key=lambda r: r["STATUS"])     # answer, so it may come second
    assert (allowed["AGENT"], allowed["PROVIDER"], allowed["METHOD"], allowed["PATH"], allowed["STATUS"]) == (
        agent, "openai", "POST", "/openai/v1/files", "200")
    assert TS_RE.match(allowed["TIME"])
    assert allowed["IN"] == "2.4 KB" and allowed["OUT"] == "1.2 KB", allowed
    assert re.fullmatch(r"\d+\.\d ms|\d+\.\d\d s", allowed["DURATION"]), allowed["DURATION"]
    assert allowed["OUTCOME"] == "ok"
    assert denied["STATUS"] == "403" and denied["IN"] == "0 B"
    assert denied["OUTCOME"].startswith("denied: ") and "method DELETE" in denied["OUTCOME"], denied


TERMINAL_TRICKS = ["\x1b[2K\x1b[1A", "\r\n999  2026-01-01T00:00:00Z  forged-row", "\x9b2J", "\x7f",
                   "\u202etxt.exe", "\u2028", "\x00\x07"]


@pytest.mark.parametrize("view", ["usage", "audit", "audit-follow"])
def test_agent_and_upstream_text_cannot_forge_the_operators_views(broker: Broker,
                                                                  upstreams: Dict[str, FakeUpstream],
                                                                  view: str) -> None:
    """A model name chosen by the agent (request) and one chosen by the upstream (answer) hold
    escapes and line breaks: every human-readable view escapes them, so each row stays one
    line and nothing can move the cursor; --json keeps the exact text."""
    agent, token = fresh_token(broker, "openai", prefix="forge")
    asked = "gpt-" + "".join(TERMINAL_TRICKS)
    answered = "upstream-" + "".join(reversed(TERMINAL_TRICKS))
    upstreams["openai"].set_responder(key_checked("openai", lambda h, req: h.send_json(200, {
        "model": answered, "usage": {"prompt_tokens": 3, "completion_tokens": 4}})))
    follower = FollowProcess(broker, "--agent", agent) if view == "audit-follow" else None
    try:
        if follower is not None:
            follower.wait_for("DURATION")    # its first (empty) page is printed
        body = json.dumps({"model": asked, "messages": []}).encode()
        assert call(broker, "openai", token, "POST", "/v1/chat/completions", body).status == 200
        if follower is None:                   # (the follower prints the row once it is written)
            assert wait_until(lambda: audit_json(broker, "--agent", agent), 10), "the row follows the answer"
        if view == "usage":
            out = ok(broker.cli("usage", "--agent", agent))
            exact = [json.loads(ln)["model"] for ln in ok(broker.cli("usage", "--agent", agent, "--json")).splitlines()]
            assert exact in ([asked], [answered]), exact
        elif view == "audit":
            out = ok(broker.cli("audit", "--agent", agent))
            exact = [r["model"] for r in audit_json(broker, "--agent", agent)]
            assert exact in ([asked], [answered]), exact
        else:
            assert follower is not None
            follower.wait_for(agent)
            out = "\n".join(follower.seen) + "\n"
    finally:
        if follower is not None:
            follower.stop()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 2, out                 # the header and one row
    for bad in ("\x1b", "\x9b", "\x7f", "\r", "\x00", "\x07", "\u202e", "\u2028"):
        assert bad not in out, (bad, out)
    shown = 10 ** 6 if view == "usage" else 40        # the audit table cuts a model at 40
    assert asked[:shown].encode("unicode_escape").decode() in out or \
        answered[:shown].encode("unicode_escape").decode() in out, "shown escaped, not dropped"


class FollowProcess:
    """`audit --follow` as a subprocess; stdout lines are read by a thread into a queue."""

    def __init__(self, broker: Broker, *args: str) -> None:
        cmd, env = broker_command(broker.env)
        self.proc = subprocess.Popen(
            [*cmd, "--db", str(broker.db), "audit", "--follow", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=str(broker.workdir))
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = FOLLOW_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        seen = self.seen
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"`audit --follow` printed no line with {needle!r} within {timeout}s; "
                             f"alive={self.proc.poll() is None} saw={seen!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_audit_follow_prints_new_rows(broker: Broker, upstreams: Dict[str, FakeUpstream], as_json: bool) -> None:
    agent, token = fresh_token(broker, "openai", prefix="follow")
    follower = FollowProcess(broker, "--agent", agent, *(["--json"] if as_json else []))
    try:
        if not as_json:
            header = follower.wait_for("DURATION")
            assert header.split()[:3] == ["ID", "TIME", "AGENT"]
        time.sleep(0.3)   # let it reach its polling loop; a row written earlier is printed too
        for n in range(2):
            marker = f"m{n}{secrets.token_hex(4)}"
            assert call(broker, "openai", token, path=f"/v1/models?{marker}=1").status == 200
            line = follower.wait_for(marker)
            if as_json:
                row = json.loads(line)
                assert (row["agent"], row["status"], row["outcome"]) == (agent, 200, "ok")
                assert set(row) == FIELDS
            else:
                assert agent in line and " 200 " in line and line.rstrip().endswith("ok"), line
    finally:
        follower.stop()


def test_audit_follow_with_limit_0_prints_only_new_rows(broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """Like `tail -n 0 -f`: no history, then every new row."""
    assert call(broker, "openai", broker.token("openai")).status == 200
    newest = audit_json(broker)[-1]["id"]
    follower = FollowProcess(broker, "--json", "--limit", "0")
    try:
        time.sleep(1.2)   # two polling rounds with no new row
        marker = secrets.token_hex(6)
        assert call(broker, "openai", broker.token("openai"), path=f"/v1/models?{marker}=1").status == 200
        follower.wait_for(marker)
        old = [json.loads(line)["id"] for line in follower.seen if json.loads(line)["id"] <= newest]
        assert not old, f"`audit --follow --limit 0` printed {len(old)} old rows"
    finally:
        follower.stop()


# ============================================================================
# audit verify: tampering with the sqlite3 CLI is detected and the row named
# ============================================================================


@pytest.fixture(scope="module")
def chain_db(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Iterator[Broker]:
    """A broker of its own with a known mix of rows (allowed, unknown token, policy refusal),
    left idle once they are all written; each tamper test edits a private copy of its DB."""
    b = broker_factory({p: u.url for p, u in upstreams.items()}, providers=("openai",))
    limited = b.mint("openai", "limited-agent", "--allow-method", "GET")
    plan = ["ok", "ok", "post", "unknown", "ok", "ok", "forbidden", "ok", "ok", "ok"]
    for step in plan:
        if step == "ok":
            assert call(b, "openai", b.token("openai")).status == 200
        elif step == "post":
            assert call(b, "openai", b.token("openai"), "POST", "/v1/chat/completions", b"{}").status == 200
        elif step == "unknown":
            assert call(b, "openai", unknown_token()).status == 401
        else:
            assert call(b, "openai", limited, "POST", "/v1/chat/completions", b"{}").status == 403
    assert wait_until(lambda: len(audit_json(b)) >= len(plan), 10)      # a row follows its answer
    rows = audit_json(b)
    assert len(rows) == len(plan), rows
    b.chain_ids = [r["id"] for r in rows]  # type: ignore[attr-defined]
    yield b


def private_copy(b: Broker, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.db"
    src_db = sqlite3.connect(str(b.db))
    dst_db = sqlite3.connect(str(dst))
    try:
        src_db.backup(dst_db)
    finally:
        src_db.close()
        dst_db.close()
    return dst


def test_verify_intact_chain(chain_db: Broker, tmp_path: Path) -> None:
    copy = private_copy(chain_db, tmp_path)
    cp = verify(chain_db, copy)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    n = len(chain_db.chain_ids)  # type: ignore[attr-defined]
    assert cp.stdout.splitlines()[0].strip() == f"{n} rows, chain intact", cp.stdout


COLUMNS = ("ts, agent, token_id, provider, secret, method, path, status, bytes_in, bytes_out, duration_ms, "
           "client, outcome, reason, model, tokens_in, tokens_out")

# name: (SQL with {i} = the i-th row's id (1-based position), {last}, {next}; the row verify must name)
TAMPERING = {
    "edit-status-of-denied-row": ("UPDATE audit SET status = 200, outcome = 'ok', reason = NULL WHERE id = {4}",
                                  "{4}"),
    "edit-path": ("UPDATE audit SET path = '/openai/v1/other' WHERE id = {3}", "{3}"),
    "edit-bytes": ("UPDATE audit SET bytes_out = bytes_out + 1 WHERE id = {6}", "{6}"),
    "edit-timestamp": ("UPDATE audit SET ts = '2000-01-01T00:00:00Z' WHERE id = {2}", "{2}"),
    "edit-agent-of-last-row": ("UPDATE audit SET agent = 'someone-else' WHERE id = {last}", "{last}"),
    "delete-middle-row": ("DELETE FROM audit WHERE id = {5}", "{6}"),
    "delete-first-row": ("DELETE FROM audit WHERE id = {1}", "{2}"),
    "delete-row-and-renumber": ("DELETE FROM audit WHERE id = {5}; "
                                "UPDATE audit SET id = -id + 1 WHERE id > {5}; UPDATE audit SET id = -id WHERE id < 0",
                                "{5}"),
    "swap-two-rows": ("UPDATE audit SET id = -1 WHERE id = {3}; UPDATE audit SET id = {3} WHERE id = {4}; "
                      "UPDATE audit SET id = {4} WHERE id = -1", "{3}"),
    "swap-contents-keep-macs": (f"CREATE TEMP TABLE t AS SELECT * FROM audit WHERE id IN ({{3}}, {{4}}); "
                                f"UPDATE audit SET ({COLUMNS}) = (SELECT {COLUMNS} FROM t "
                                f"WHERE t.id = {{3}} + {{4}} - audit.id) WHERE id IN ({{3}}, {{4}})", "{3}"),
    "insert-forged-row-at-end": (f"INSERT INTO audit (id, {COLUMNS}, mac) SELECT {{next}}, {COLUMNS}, "
                                 f"randomblob(32) FROM audit WHERE id = {{2}}", "{next}"),
    "replay-row-at-end-with-its-mac": (f"INSERT INTO audit (id, {COLUMNS}, mac) SELECT {{next}}, {COLUMNS}, mac "
                                       f"FROM audit WHERE id = {{last}}", "{next}"),
    "insert-forged-row-in-middle": (f"UPDATE audit SET id = -id - 1 WHERE id > {{4}}; "
                                    f"UPDATE audit SET id = -id WHERE id < 0; "
                                    f"INSERT INTO audit (id, {COLUMNS}, mac) SELECT {{5}}, {COLUMNS}, mac "
                                    f"FROM audit WHERE id = {{4}}", "{5}"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_detects_tampering(chain_db: Broker, tmp_path: Path, case: str) -> None:
    ids: List[int] = chain_db.chain_ids  # type: ignore[attr-defined]
    names = {str(i + 1): ids[i] for i in range(len(ids))}
    names.update(last=ids[-1], next=ids[-1] + 1)
    sql, expect = (s.format(*([None] + ids), **{k: v for k, v in names.items() if not k.isdigit()})
                   for s in TAMPERING[case])
    copy = private_copy(chain_db, tmp_path)
    assert verify(chain_db, copy).returncode == 0
    sql_edit(copy, sql)
    cp = verify(chain_db, copy)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, f"{case}: verify did not fail: {out}"
    assert "chain intact" not in out
    assert re.search(rf"\brow {expect}\b", out), f"{case}: expected row {expect} to be named: {out}"


def test_audit_list_shows_a_tampered_log_it_cannot_verify(chain_db: Broker, tmp_path: Path) -> None:
    """`audit list` is how the operator looks at a log that fails verify: an intruder's edit of
    a column's type (a byte count made a fraction) is shown, not a traceback."""
    copy = private_copy(chain_db, tmp_path)
    sql_edit(copy, "UPDATE audit SET bytes_out = 1536.5")
    assert verify(chain_db, copy).returncode == 1
    cp = run_cli(copy, "audit", "list", env=chain_db.env)
    assert cp.returncode == 0 and "1.5 KB" in cp.stdout and "Traceback" not in cp.stderr, cp.stdout + cp.stderr


# ============================================================================
# Pruning keeps the chain verifiable and is itself on record
# ============================================================================


@pytest.fixture
def own_broker(broker_factory: Brokers, upstreams: Dict[str, FakeUpstream]) -> Broker:
    return broker_factory({p: u.url for p, u in upstreams.items()}, providers=("openai",))


def test_prune_before_a_future_date(own_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    b = own_broker
    for _ in range(5):
        assert call(b, "openai", b.token("openai")).status == 200
    assert call(b, "openai", unknown_token()).status == 401
    cp = b.cli("audit", "prune", "--before", "2999-01-01")
    assert cp.returncode == 0, cp.stderr
    assert "6" in cp.stdout, cp.stdout
    rows = audit_json(b)
    assert [r["outcome"] for r in rows] == ["prune"], rows
    record = json.loads(rows[0]["reason"])
    assert record["deleted"] == 6
    cp = verify(b)
    assert cp.returncode == 0, f"chain broken right after a prune: {cp.stdout}{cp.stderr}"
    assert cp.stdout.splitlines()[0] == "1 rows, chain intact"
    # traffic continues on the pruned chain
    assert call(b, "openai", b.token("openai")).status == 200
    cp = verify(b)
    assert cp.returncode == 0, f"chain broken after traffic following a prune: {cp.stdout}{cp.stderr}"
    assert cp.stdout.splitlines()[0] == "2 rows, chain intact"


def test_prune_older_rows_keeps_the_rest(own_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    b = own_broker
    for _ in range(3):
        assert call(b, "openai", b.token("openai"), path="/v1/models?old=1").status == 200
    old_done = int(time.time())    # audit timestamps have one-second resolution: the next second
    assert wait_until(lambda: int(time.time()) > old_done, 2.0, interval=0.01)
    cut = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for _ in range(3):
        assert call(b, "openai", b.token("openai"), path="/v1/models?new=1").status == 200
    before = audit_json(b)
    cp = b.cli("audit", "prune", "--before", cut)
    assert cp.returncode == 0, cp.stderr
    after = audit_json(b)
    assert after[:3] == before[3:], "rows newer than --before must be kept unchanged"
    assert [r["outcome"] for r in after] == ["ok"] * 3 + ["prune"]
    assert all("new=1" in r["path"] for r in after[:3])
    record = json.loads(after[3]["reason"])
    assert record["deleted"] == 3
    cp = verify(b)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.splitlines()[0] == "4 rows, chain intact"
    assert call(b, "openai", b.token("openai")).status == 200
    assert verify(b).returncode == 0
    # pruning again with nothing older deletes nothing and the chain still verifies
    assert b.cli("audit", "prune", "--before", "2000-01-01").returncode == 0
    assert verify(b).returncode == 0
    # the first kept row deleted behind the prune's back is still detected
    sql_edit(b.db, f"DELETE FROM audit WHERE id = {after[0]['id']}")
    cp = verify(b)
    assert cp.returncode == 1, cp.stdout


# ============================================================================
# Crash safety: SIGKILL mid-traffic
# ============================================================================


def test_sigkill_mid_traffic_leaves_a_verifiable_chain_missing_only_rows_in_flight(
        own_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    b = own_broker
    big = b"x" * (100 * 1024)   # sized, larger than one inline write: relayed in pieces

    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        if "/big" in req.path:
            h.send_bytes(200, big)
        elif "/sse" in req.path:
            h.send_sse([b'data: {"n": %d}\n\n' % i for i in range(3)], 0.01)
        else:
            h.send_json(200, {"ok": True})
    upstreams["openai"].set_responder(key_checked("openai", respond))

    stop = threading.Event()
    completed: Set[str] = set()
    lock = threading.Lock()
    token = b.token("openai")

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            kind = ("small", "big", "sse")[(n + i) % 3]
            rid = f"r{n}x{i}"
            i += 1
            conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
            try:
                conn.request("POST", f"/openai/v1/{kind}?id={rid}", body=b"{}", headers=auth_headers("openai", token))
                resp = conn.getresponse()
                data = resp.read()
                if resp.status == 200 and (kind != "big" or data == big):
                    with lock:
                        completed.add(rid)
            except (OSError, http.client.HTTPException):
                pass   # the broker died under this request
            finally:
                conn.close()
            # A row is committed right after its answer, but the client has the answer first:
            # a short pause before the next request (what the upstream's delayed ACK used to add
            # before the fake upstreams set TCP_NODELAY) leaves time for that commit, so "at
            # most one row in flight per client" below still holds when commits queue up.
            stop.wait(0.05)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(completed) >= 40, 15), f"too little traffic: {len(completed)} requests"
    os.kill(b.proc.pid, signal.SIGKILL)                     # the clients are still sending
    b.proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    assert b.proc.returncode == -signal.SIGKILL
    assert len(completed) >= 10, f"too little traffic before the kill: {len(completed)}"

    cp = verify(b)
    assert cp.returncode == 0, f"chain broken by SIGKILL: {cp.stdout}{cp.stderr}"
    rows = audit_json(b)
    assert cp.stdout.splitlines()[0] == f"{len(rows)} rows, chain intact"
    assert len(rows) >= len(completed) - len(threads)
    recorded = {m.group(1) for r in rows for m in [re.search(r"[?&]id=(r\d+x\d+)", r["path"] or "")] if m}
    missing = completed - recorded
    # a row is committed right after its answer's last byte: only a request still in flight at
    # the kill (at most one per client thread) may lack its row
    assert len(missing) <= len(threads), (
        f"{len(missing)} completed requests have no audit row, e.g. {sorted(missing)[:5]}")


def test_a_failed_audit_write_makes_the_broker_refuse_until_it_can_write_again(
        own_broker: Broker, upstreams: Dict[str, FakeUpstream]) -> None:
    """The row is committed right after the answer; if that commit fails, the broker logs it
    and refuses every following request (503, upstream never contacted) until a write works."""
    b = own_broker
    upstreams["openai"].set_responder(key_checked("openai", lambda h, req: h.send_json(200, {"ok": True})))
    token = b.token("openai")
    assert call(b, "openai", token).status == 200
    seen = len(upstreams["openai"].requests)
    db = sqlite3.connect(str(b.db), timeout=10)
    try:
        deadline = time.monotonic() + 10          # that answer's row is committed first
        while (db.execute("SELECT count(*) FROM audit WHERE status = 200").fetchone()[0] < 1
               and time.monotonic() < deadline):
            time.sleep(0.02)
        db.execute("CREATE TRIGGER test_audit_broken BEFORE INSERT ON audit "
                   "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        db.commit()
        first = call(b, "openai", token)          # answered; its own row cannot be written
        assert first.status == 200, first.body[:200]
        assert len(upstreams["openai"].requests) == seen + 1
        deadline = time.monotonic() + 10          # the audit writer commits in the background
        while "AUDIT WRITE FAILED" not in b.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(3):
            refused = call(b, "openai", token)
            assert refused.status == 503, refused.body[:200]
            assert b"audit log" in refused.body, refused.body[:200]
        assert len(upstreams["openai"].requests) == seen + 1, "a refused request reached the upstream"
        assert "AUDIT WRITE FAILED" in b.stderr_text()
        db.execute("DROP TRIGGER test_audit_broken")
        db.commit()
    finally:
        db.close()
    # The first row written after the drop reopens the broker. That may be the last refusal's
    # own row (it is committed right after its answer, so it can land after the drop), or the
    # row of a later refusal: either way every request before the reopening is refused.
    statuses = []
    for _ in range(20):
        statuses.append(call(b, "openai", token).status)
        if statuses[-1] == 200:
            break
        time.sleep(0.05)
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {503}, statuses
    assert len(upstreams["openai"].requests) == seen + 2
    cp = verify(b)
    assert cp.returncode == 0, cp.stdout + cp.stderr


# ============================================================================
# The shared broker's whole chain, after everything above
# ============================================================================


def test_shared_broker_chain_intact_after_all_traffic(broker: Broker) -> None:
    rows = audit_json(broker)
    assert rows, "the module made requests"
    assert [r["id"] for r in rows] == list(range(rows[0]["id"], rows[0]["id"] + len(rows)))
    cp = verify(broker)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.splitlines()[0] == f"{len(rows)} rows, chain intact"
