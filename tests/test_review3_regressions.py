"""Regression tests for the third independent review (CLI, master key, audit, configuration).

  1  `secret add` raced with `rotate-master-key`: the value was stored under the old key.
  2  Two rotations at once could leave a key file that does not open the DB.
  3  Brokers reading the key files during a rotation saw them change underneath.
  4  The rotation renamed the key file before its commit was synced to disk.
  5  A request path with %20 could spell extra fields in its log line and audit row.
  6  A custom provider with `inject = query NAME` forwarded the agent's own NAME too.
  7  `audit prune` during a rotation signed its row with the old key.
  8  Some invalid configurations ended in a traceback.
  9  `token mint --ttl 3000000d` broke `token list` for good.
  and: argparse echoed refused values, `backup` followed a dangling link.

Races are forced in-process (the CLI's functions, the same file the broker runs), where a
subprocess could not hit the window every time; the rest goes through the real CLI.
"""

from __future__ import annotations

import base64
import configparser
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import REAL_KEYS, Broker, broker_env, run_cli
from conftest import load_broker_module
from raw_http import raw_exchange, request_bytes

sb = load_broker_module()
KEY = REAL_KEYS["openai"]


def key_file_env() -> Dict[str, str]:
    """No SEKS_MASTER_KEY: the CLI uses <db>.key, created 0600 on first use."""
    return broker_env(master_key=None)


def fresh_db(tmp_path: Path) -> Path:
    db = tmp_path / "seks.db"
    cp = run_cli(db, "secret", "add", "first", "--provider", "openai", input=KEY + "\n", env=key_file_env())
    assert cp.returncode == 0, cp.stderr
    return db


def read_key(db: Path) -> bytes:
    return base64.urlsafe_b64decode(Path(str(db) + ".key").read_text().strip())


# ============================================================================
# 1 and 7: writes that use the key check it inside their transaction
# ============================================================================


def test_secret_stored_under_a_key_the_db_no_longer_has_is_refused(tmp_path: Path) -> None:
    db = fresh_db(tmp_path)
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
    db = fresh_db(tmp_path)
    calls: List[str] = []
    real_read, real_load = sb.read_secret_value, sb.load_master_key
    umask = os.umask(0o077)
    try:
        sb.read_secret_value = lambda name: calls.append("read") or "sk-test-typed"
        sb.load_master_key = lambda *a: calls.append("load") or real_load(*a)
        os.environ.pop("SEKS_MASTER_KEY", None)
        assert sb.main(["--db", str(db), "secret", "add", "typed", "--provider", "openai"]) == 0
    finally:
        sb.read_secret_value, sb.load_master_key = real_read, real_load
        os.umask(umask)
    assert calls[:2] == ["read", "load"], calls


# ============================================================================
# 2: one rotation at a time
# ============================================================================


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_rotation_is_refused_while_one_runs(tmp_path: Path) -> None:
    import fcntl
    db = fresh_db(tmp_path)
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


# ============================================================================
# 3: many processes finishing the same rotation at once all get the new key
# ============================================================================


def test_concurrent_loads_finish_a_committed_rotation_without_errors(tmp_path: Path) -> None:
    db = fresh_db(tmp_path)
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


# ============================================================================
# 4: the rotation's commit is synced before the key file is renamed
# ============================================================================


def test_rekey_commits_with_synchronous_full(tmp_path: Path) -> None:
    db = fresh_db(tmp_path)
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


# ============================================================================
# 5: a path cannot spell log fields
# ============================================================================


def test_escaped_spaces_in_a_path_do_not_forge_log_fields(broker: Broker) -> None:
    target = "/nosuch/x%20status=200%20provider=openai%20agent=victim%20outcome=ok"
    resp = raw_exchange(broker.port, request_bytes("GET", target))
    assert resp.status == 404, resp
    deadline = time.monotonic() + 10               # the line is written after the answer
    lines: List[str] = []
    while not lines and time.monotonic() < deadline:
        lines = [l for l in broker.stderr_text().splitlines() if "/nosuch/x" in l]
        time.sleep(0.05)
    assert lines, broker.stderr_text()[-500:]
    assert " agent=victim" not in lines[-1] and " status=200" not in lines[-1], lines[-1]
    assert sb.redact_path("/bot1:%73eks_telegram_AbCdEfGhIjKl%20x=1/getMe") == \
        "/bot1:seks_telegram_AbCd…%20x=1/getMe"


# ============================================================================
# 6: the injected query parameter is a credential place
# ============================================================================


def test_inject_query_drops_the_agents_own_parameter() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string("[provider:search]\nupstream = https://search.internal.example/api/v2\n"
                       "token = header X-Api-Key\ninject = query api_key\n")
    provider = sb.provider_from_section("search", parser["provider:search"])
    headers = [("X-Api-Key", "seks_search_abc")]
    swap = sb.find_token(provider, headers, "/find", "q=x&api_key=MINE&api%5Fkey=AGAIN")
    assert swap is not None
    _, _, query = sb.swap_credentials(provider, swap, "sk-test-real", headers, "/find",
                                      "q=x&api_key=MINE&api%5Fkey=AGAIN")
    assert query == "q=x&api_key=sk-test-real", query


# ============================================================================
# 8 and 9, and the CLI's error messages
# ============================================================================


@pytest.mark.parametrize("env_extra, args", [
    ({"SEKS_UPSTREAM_OPENAI": "http://[::1"}, ["secret", "list"]),
    ({}, ["--config", "{bad_ini}", "secret", "list"]),
    ({}, ["config", "check", "{bad_ini}"]),
])
def test_invalid_configuration_is_a_clear_error_not_a_traceback(tmp_path: Path, env_extra: Dict[str, str],
                                                                args: List[str]) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_bytes(b"# caf\xe9\n[upstream]\n")
    env = {**broker_env(), **env_extra}
    argv = [a.replace("{bad_ini}", str(bad)) for a in args]
    cp = subprocess.run([sys.executable, str(sb.__file__), "--db", str(tmp_path / "x.db"), *argv],
                        capture_output=True, text=True, env=env, timeout=30)
    assert cp.returncode in (1, 2), cp
    assert "Traceback" not in cp.stderr and "error" in cp.stderr, cp.stderr


def test_ttl_past_100_years_is_refused(tmp_path: Path) -> None:
    db = fresh_db(tmp_path)
    cp = run_cli(db, "token", "mint", "--secret", "first", "--agent", "a", "--ttl", "3000000d",
                 env=key_file_env())
    assert cp.returncode == 2 and "36500d" in cp.stderr, cp.stderr
    listing = run_cli(db, "token", "list", env=key_file_env())
    assert listing.returncode == 0, listing.stderr
    assert run_cli(db, "audit", "--since", "99999999d", env=key_file_env()).returncode == 2


@pytest.mark.parametrize("args", [["secret", "sk-test-pasted-value"], ["audit", "sk-test-pasted-value"],
                                  ["token", "list", "--format", "sk-test-pasted-value"]])
def test_refused_arguments_are_never_echoed(tmp_path: Path, args: List[str]) -> None:
    cp = run_cli(tmp_path / "x.db", *args)
    assert cp.returncode == 2, cp
    assert "sk-test-pasted-value" not in cp.stderr + cp.stdout, cp.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_backup_refuses_a_dangling_link(tmp_path: Path) -> None:
    db = fresh_db(tmp_path)
    target = tmp_path / "elsewhere.db"
    link = tmp_path / "backup.db"
    link.symlink_to(target)
    cp = run_cli(db, "backup", str(link), env=key_file_env())
    assert cp.returncode == 1 and "exists" in cp.stderr, cp.stderr
    assert not target.exists(), "the backup followed the link"


@pytest.mark.parametrize("ini, words", [
    ("[server]\ntls_cert = cert.pem\n", "tls_key"),
    ("[server]\nadmin_port = 65535\nworkers = 2\n", "admin_port"),
])
def test_config_check_refuses_what_serve_would_refuse(tmp_path: Path, ini: str, words: str) -> None:
    conf = tmp_path / "seks.ini"
    conf.write_text(ini)
    check = run_cli(tmp_path / "x.db", "config", "check", str(conf))
    assert check.returncode == 1 and words in check.stdout, check.stdout + check.stderr
    serve = run_cli(tmp_path / "x.db", "--config", str(conf), "serve", "--port", "0")
    assert serve.returncode == 1 and words in serve.stderr and "Traceback" not in serve.stderr, serve.stderr
