"""`serve --workers N` (issue 6): N processes share the agent port (SO_REUSEPORT) and the DB.

Which process served a request is read from the broker's own per-worker /metrics (each worker
has its own admin listener; the ready line lists their ports), cross-checked with /proc (each child holds a
listening socket on the shared port). A revocation made with the CLI must bite in every worker
on its next request.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, List, Set

import pytest

from conftest import (
    REAL_KEYS, Broker, Brokers, FakeUpstream, auth_headers, broker_env, key_check_failure, wait_until,
)
from ops_helpers import free_port_run, parse_exposition, sample_value

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"),
                                reason="--workers needs SO_REUSEPORT, which this platform lacks")

WORKERS = 2
FRESH_CONNECTIONS = 40


@pytest.fixture(scope="module")
def workers_db(broker_factory: Brokers) -> Broker:
    return broker_factory.seed(("openai",))


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    u = FakeUpstream("openai")
    yield u
    u.stop()


ADMIN_RE = re.compile(r"admin ports ([0-9,]+) on 127\.0\.0\.1")


def start_workers(db: Broker, upstream: FakeUpstream, name: str) -> Broker:
    """`serve --workers 2 --admin-port P`; each worker's admin port is read from the ready line."""
    last = ""
    for _ in range(5):
        base = free_port_run(WORKERS + 1)
        b = db.serve("--workers", str(WORKERS), "--admin-port", str(base),
                     env=broker_env({"openai": upstream.url}), name=name)
        m = ADMIN_RE.search(b.ready_line)
        assert m, f"the ready line does not list the workers' admin ports: {b.ready_line}"
        ports = [int(p) for p in m.group(1).split(",")]
        assert len(ports) == WORKERS and len(set(ports)) == WORKERS, b.ready_line
        assert all(base <= p <= base + WORKERS for p in ports), (base, b.ready_line)
        b.worker_admin_ports = ports  # type: ignore[attr-defined]
        if all(_admin_up(p) for p in ports):
            return b
        last = b.stderr_text()[-2000:]
        b.stop()
    raise RuntimeError(f"worker admin ports did not come up: {last}")


def _admin_up(port: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def workers(workers_db: Broker, upstream: FakeUpstream) -> Iterator[Broker]:
    b = start_workers(workers_db, upstream, "workers")
    yield b
    b.stop()


def worker_counts(b: Broker, status: str) -> List[float]:
    """seks_requests_total{provider="openai",status=...} of each worker, from its own /metrics."""
    out = []
    for port in b.worker_admin_ports:  # type: ignore[attr-defined]
        r = b.admin_get("/metrics", port=port)
        assert r.status == 200
        _, samples = parse_exposition(r.body.decode())
        out.append(sample_value(samples, "seks_requests_total", provider="openai", status=status))
    return out


def fresh_requests(b: Broker, token: str, n: int) -> List[int]:
    statuses = []
    for i in range(n):
        r = b.request("GET", f"/openai/v1/models/{i}", headers=auth_headers("openai", token))
        statuses.append(r.status)
    return statuses


def children_of(pid: int) -> List[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def listening_inodes(port: int) -> Set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> Set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def test_requests_are_served_by_more_than_one_process(workers: Broker, workers_db: Broker,
                                                      upstream: FakeUpstream) -> None:
    assert f"({WORKERS} workers" in workers.ready_line, workers.ready_line
    upstream.reset()
    before = worker_counts(workers, "200")
    statuses = fresh_requests(workers, workers_db.tokens["openai"], FRESH_CONNECTIONS)
    assert statuses == [200] * FRESH_CONNECTIONS
    # the counters move after each answer's last byte: wait until they account for all
    wait_until(lambda: sum(worker_counts(workers, "200")) - sum(before) >= FRESH_CONNECTIONS, 5, interval=0.05)
    served = [a - b for a, b in zip(worker_counts(workers, "200"), before)]
    assert sum(served) == FRESH_CONNECTIONS, served
    assert all(n > 0 for n in served), f"one worker served everything: {served}"
    for req in upstream.requests:
        assert key_check_failure("openai", REAL_KEYS["openai"], req) is None
    # each worker has its own pool: at least one upstream connection per worker that served
    assert upstream.accepted >= 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_each_worker_process_listens_on_the_shared_port(workers: Broker) -> None:
    kids = children_of(workers.pid)
    assert len(kids) == WORKERS, kids
    listeners = listening_inodes(workers.port)
    holders = [k for k in kids if socket_inodes(k) & listeners]
    assert sorted(holders) == sorted(kids), f"children {kids}, listening on {workers.port}: {holders}"
    assert not (socket_inodes(workers.pid) & listeners), "the parent should not accept connections itself"


def test_revocation_through_cli_is_seen_by_every_worker(workers: Broker, workers_db: Broker) -> None:
    token = workers_db.mint("openai", "agent-revoke")
    warm = fresh_requests(workers, token, FRESH_CONNECTIONS)
    assert warm == [200] * FRESH_CONNECTIONS       # both workers now hold it in their cache
    before = worker_counts(workers, "401")
    cp = workers_db.cli("token", "revoke", token)
    assert cp.returncode == 0, cp.stderr
    statuses = fresh_requests(workers, token, FRESH_CONNECTIONS)
    assert statuses == [401] * FRESH_CONNECTIONS, statuses
    wait_until(lambda: sum(worker_counts(workers, "401")) - sum(before) >= FRESH_CONNECTIONS, 5, interval=0.05)
    denied = [a - b for a, b in zip(worker_counts(workers, "401"), before)]
    assert sum(denied) == FRESH_CONNECTIONS
    assert all(n > 0 for n in denied), f"not every worker saw the revoked token: {denied}"
    # the other token still works everywhere
    assert fresh_requests(workers, workers_db.tokens["openai"], 10) == [200] * 10


def test_sigterm_stops_parent_and_every_worker(workers_db: Broker, upstream: FakeUpstream) -> None:
    b = start_workers(workers_db, upstream, "workers-stop")
    try:
        kids = children_of(b.pid)
        assert len(kids) == WORKERS
        assert fresh_requests(b, workers_db.tokens["openai"], 4) == [200] * 4
        b.signal(signal.SIGTERM)
        rc = b.wait(15)
        assert rc == 0, b.stderr_text()[-2000:]
        for k in kids:
            assert not os.path.exists(f"/proc/{k}") or _is_zombie(k), f"worker {k} outlived the parent"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", b.port), timeout=2).close()
    finally:
        b.stop()


def test_a_dead_worker_does_not_leave_a_half_service(workers_db: Broker, upstream: FakeUpstream) -> None:
    """If one worker dies, the parent must not leave orphans behind: it exits (or keeps N alive)."""
    b = start_workers(workers_db, upstream, "workers-kill")
    try:
        kids = children_of(b.pid)
        assert len(kids) == WORKERS
        os.kill(kids[0], signal.SIGKILL)
        rc = b.wait(15)
        if rc is None:
            # still running: it must have replaced the dead worker
            assert len(children_of(b.pid)) == WORKERS
        else:
            # gone (or zombies) within the 0.5 s this test always allowed; the parent waits for them before it exits
            wait_until(lambda: all(not os.path.exists(f"/proc/{k}") or _is_zombie(k) for k in kids), 0.5)
            for k in kids:
                assert not os.path.exists(f"/proc/{k}") or _is_zombie(k), f"orphaned worker {k}"
            assert rc != 0
    finally:
        b.stop()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
