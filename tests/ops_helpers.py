"""Helpers for the operations suites (test_ops.py, test_pool.py, test_workers.py).

  * `ServeProc`: a `seks_broker.py serve` subprocess with any flags, env, config file and
    interpreter, on a DB prepared by the test (http or https, optional admin port, --workers);
    stopped by PID only.
  * `LoopUpstream`: a conftest `FakeUpstream` that also counts accepted TCP connections and can
    speak TLS with a certificate made by the test.
  * `make_ca_and_leaf`, `make_self_signed`: throwaway certificates made with the `openssl` binary.
  * `parse_exposition`: a small, strict parser of the Prometheus text format (0.0.4).
  * `OpsDB`: a DB with secrets and tokens made through the real CLI.

Nothing of the broker is mocked: every request crosses a real socket on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from conftest import (
    BROKER_PY, CLI_TIMEOUT_S, HTTP_TIMEOUT_S, REAL_KEYS, START_TIMEOUT_S, FakeUpstream, Response,
    UpstreamHandler, _UpstreamServer, broker_env, default_responder, file_text, run_cli, secret_name,
)

READY_RE = re.compile(r"seks-broker listening on (https?)://([0-9.]+):(\d+)"
                      r"(?: \(admin on http://([0-9.]+):(\d+)\))?")
OPENSSL = shutil.which("openssl")


# ============================================================================
# Broker subprocess with arbitrary arguments
# ============================================================================

class ServeProc:
    """`python seks_broker.py --db DB [--config F] serve --host 127.0.0.1 [--port 0] ARGS`."""

    def __init__(self, db: Path, args: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                 config: Optional[Path] = None, python: str = sys.executable,
                 port_flag: bool = True, name: str = "serve",
                 start_timeout: float = START_TIMEOUT_S) -> None:
        self.db = Path(db)
        self.workdir = self.db.parent
        self.env = env if env is not None else broker_env()
        self.stderr_path = self.workdir / f"{name}.{os.getpid()}.{time.monotonic_ns()}.stderr"
        self.stdout_path = self.stderr_path.with_suffix(".stdout")
        cmd = [python, str(BROKER_PY), "--db", str(self.db)]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += ["serve", "--host", "127.0.0.1"] + (["--port", "0"] if port_flag else []) + list(args)
        self.cmd = cmd
        err = open(self.stderr_path, "wb")
        out = open(self.stdout_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=self.env, cwd=str(self.workdir))
        finally:
            err.close()
            out.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while True:
            m = READY_RE.search(self.stderr_text())
            if m:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited rc={self.proc.returncode}: "
                                   f"{self.stderr_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"no listening line: {self.stderr_text()[-3000:]}")
            time.sleep(0.02)
        text = self.stderr_text()
        end = text.find("\n", m.start())
        self.ready_line = text[m.start(): end if end >= 0 else len(text)]
        self.scheme, host, self.port = m.group(1), m.group(2), int(m.group(3))
        assert host == "127.0.0.1", m.group(0)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.admin_port = int(m.group(5)) if m.group(5) else None

    # -- output ------------------------------------------------------------------------------
    def stderr_text(self) -> str:
        return file_text(self.stderr_path)

    def stdout_text(self) -> str:
        return file_text(self.stdout_path)

    def lines_after_ready(self) -> List[str]:
        text = self.stderr_text()
        idx = text.find(self.ready_line)
        assert idx >= 0
        rest = text[idx + len(self.ready_line):]
        return [line for line in rest.split("\n")[1:] if line != ""]

    def wait_for_lines(self, n: int, timeout: float = 5.0) -> List[str]:
        """Request log lines are written after the answer: wait until at least n are there."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines_after_ready()
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    # -- lifecycle ---------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self, timeout: float = 8.0) -> Optional[int]:
        """SIGTERM by PID, wait, SIGKILL if it does not go. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    # -- requests ----------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: Optional[Dict[str, str]] = None,
                body: Optional[bytes] = None, timeout: float = HTTP_TIMEOUT_S,
                context: Optional[ssl.SSLContext] = None, port: Optional[int] = None) -> Response:
        port = port or self.port
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def admin_get(self, path: str, port: Optional[int] = None) -> Response:
        p = port or self.admin_port
        assert p, "no admin port"
        conn = http.client.HTTPConnection("127.0.0.1", p, timeout=HTTP_TIMEOUT_S)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()


class ProcRegistry:
    """Stops every ServeProc a test started (by PID), even when the test fails."""

    def __init__(self) -> None:
        self.procs: List[ServeProc] = []

    def start(self, *args: Any, **kw: Any) -> ServeProc:
        p = ServeProc(*args, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            try:
                p.stop()
            except Exception:
                p.kill()


# ============================================================================
# A DB prepared through the CLI
# ============================================================================

class OpsDB:
    """A DB with one secret and one token per provider, made with the real CLI."""

    def __init__(self, workdir: Path, providers: Sequence[str], env: Optional[Dict[str, str]] = None,
                 keys: Optional[Dict[str, str]] = None, config: Optional[Path] = None) -> None:
        self.workdir = workdir
        self.db = workdir / "seks.db"
        self.env = env if env is not None else broker_env()
        self.config = config
        self.keys = dict(REAL_KEYS)
        self.keys.update(keys or {})
        self.tokens: Dict[str, str] = {}
        for p in providers:
            ok(self.cli("secret", "add", secret_name(p), "--provider", p, input=self.keys[p] + "\n"))
            self.tokens[p] = self.mint(p)

    def cli(self, *args: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            timeout: float = CLI_TIMEOUT_S, db: Optional[Path] = None) -> subprocess.CompletedProcess:
        pre = ("--config", str(self.config)) if self.config else ()
        return run_cli(db or self.db, *pre, *args, input=input,
                       env=env if env is not None else self.env, timeout=timeout)

    def mint(self, provider: str, agent: Optional[str] = None, *extra: str,
             secret: Optional[str] = None) -> str:
        out = ok(self.cli("token", "mint", "--secret", secret or secret_name(provider),
                          "--agent", agent or f"agent-{provider}", *extra))
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        return lines[0].strip()


def ok(cp: subprocess.CompletedProcess) -> str:
    assert cp.returncode == 0, f"rc={cp.returncode}\nstdout={cp.stdout}\nstderr={cp.stderr}"
    return cp.stdout


# ============================================================================
# Upstreams: connection counting, optional TLS
# ============================================================================

class _LoopServer(_UpstreamServer):
    ssl_context: Optional[ssl.SSLContext] = None
    owner: "LoopUpstream"

    def get_request(self) -> Tuple[Any, Any]:
        sock, addr = self.socket.accept()
        with self.owner.lock:
            self.owner.accepted += 1
            self.owner.peers.append(addr[1])
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(10)
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                with self.owner.lock:
                    self.owner.handshake_failures.append(f"{type(exc).__name__}: {exc}")
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a broker that hangs up mid-request is expected in these tests


class LoopUpstream(FakeUpstream):
    """FakeUpstream that counts accepted connections (.accepted, .peers) and may speak TLS."""

    def __init__(self, provider: str, key: Optional[str] = None,
                 tls: Optional[Tuple[Path, Path]] = None) -> None:  # noqa: D401
        self.provider = provider
        self.key = key if key is not None else REAL_KEYS[provider]
        self.lock = threading.Lock()
        self.requests = []
        self.sse_sent_at = []
        self.errors = []
        self.accepted = 0
        self.peers: List[int] = []
        self.handshake_failures: List[str] = []
        self.release = threading.Event()
        self.responder = default_responder(provider, self.key)
        server = _LoopServer(("127.0.0.1", 0), UpstreamHandler)
        server.upstream = self
        server.owner = self
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            server.ssl_context = ctx
            scheme = "https"
        self._server = server
        self.port = server.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"loop-upstream-{provider}", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.accepted = 0
            self.peers.clear()
            self.handshake_failures.clear()


# ============================================================================
# Certificates (openssl binary)
# ============================================================================

def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    cp = subprocess.run([OPENSSL, *args], cwd=str(cwd), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, f"openssl {' '.join(args)}: {cp.stderr}"


def make_self_signed(directory: Path, name: str = "agent") -> Tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (what the README tells operators to make)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", cwd=directory)
    os.chmod(key, 0o600)
    return cert, key


def make_ca_and_leaf(directory: Path, name: str = "upstream") -> Tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, leaf.pem, leaf.key)."""
    ca_cert, ca_key = directory / f"{name}-ca.pem", directory / f"{name}-ca.key"
    leaf_cert, leaf_key = directory / f"{name}.pem", directory / f"{name}.key"
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2",
             "-subj", f"/CN=seks test {name} CA", cwd=directory)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(leaf_key), "-out", str(csr), "-subj", "/CN=127.0.0.1", cwd=directory)
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-set_serial", "0x5e45", "-out", str(leaf_cert), "-days", "2", "-extfile", str(ext),
             cwd=directory)
    return ca_cert, leaf_cert, leaf_key


# ============================================================================
# Prometheus text exposition format (0.0.4): a small strict parser
# ============================================================================

METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)')
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?[ \t]+(\S+)(?:[ \t]+(-?\d+))?$")
METRIC_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_float(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    if not re.match(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$", text):
        raise AssertionError(f"not a float: {text!r}")
    return float(text)


def _parse_labels(text: str) -> Dict[str, str]:
    inner = text[1:-1]
    labels: Dict[str, str] = {}
    pos = 0
    while pos < len(inner):
        m = _LABEL_RE.match(inner, pos)
        assert m, f"bad label syntax at {inner[pos:]!r} in {text!r}"
        name, value = m.group(1), m.group(2)
        assert name not in labels, f"label {name} repeated in {text!r}"
        labels[name] = value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        pos = m.end()
        if m.group(3) == "" and pos < len(inner):
            raise AssertionError(f"junk after labels in {text!r}")
    return labels


Sample = Tuple[str, Dict[str, str], float]


def parse_exposition(text: str) -> Tuple[Dict[str, Dict[str, str]], List[Sample]]:
    """Parse and check the text format: returns ({family: {"type", "help"}}, samples).

    Checks: lines end with \\n; HELP/TYPE syntax; TYPE once per family, before its samples;
    metric and label names; label value escapes; float values; every sample belongs to a declared
    family (histogram: _bucket/_sum/_count); no duplicate series; counters end in _total and are
    >= 0; histograms: `le` on every bucket, buckets ascending by le, cumulative, ending with
    le="+Inf" equal to _count, and a _sum.
    """
    assert text.endswith("\n"), "exposition must end with a newline"
    families: Dict[str, Dict[str, str]] = {}
    samples: List[Sample] = []
    seen_series = set()
    sampled_families = set()
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 2 and parts[1] in ("HELP", "TYPE"):
                assert len(parts) >= 3, f"line {lineno}: {line!r}"
                name = parts[2]
                assert METRIC_NAME_RE.match(name), f"line {lineno}: bad metric name {name!r}"
                fam = families.setdefault(name, {})
                if parts[1] == "TYPE":
                    assert len(parts) == 4 and parts[3] in METRIC_TYPES, f"line {lineno}: {line!r}"
                    assert "type" not in fam, f"line {lineno}: second TYPE for {name}"
                    assert name not in sampled_families, f"line {lineno}: TYPE after samples of {name}"
                    fam["type"] = parts[3]
                else:
                    assert "help" not in fam, f"line {lineno}: second HELP for {name}"
                    fam["help"] = parts[3] if len(parts) == 4 else ""
            continue
        m = _SAMPLE_RE.match(line)
        assert m, f"line {lineno}: not a sample line: {line!r}"
        name, label_text, value_text = m.group(1), m.group(2), m.group(3)
        labels = _parse_labels(label_text) if label_text else {}
        value = parse_float(value_text)
        family = name
        if name not in families:
            for suffix in ("_bucket", "_sum", "_count"):
                base = name[: -len(suffix)]
                if name.endswith(suffix) and families.get(base, {}).get("type") == "histogram":
                    family = base
                    break
        assert family in families and "type" in families[family], \
            f"line {lineno}: sample {name} has no # TYPE"
        sampled_families.add(family)
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen_series, f"line {lineno}: duplicate series {key}"
        seen_series.add(key)
        kind = families[family]["type"]
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} should end in _total"
            assert value >= 0, f"counter {name} negative"
        if kind == "histogram" and name.endswith("_bucket"):
            assert "le" in labels, f"line {lineno}: bucket without le"
        samples.append((name, labels, value))
    for fam, info in families.items():
        if info.get("type") == "histogram":
            check_histogram(fam, samples)
    return families, samples


def check_histogram(family: str, samples: List[Sample]) -> None:
    series: Dict[Tuple[Tuple[str, str], ...], List[Tuple[float, float]]] = {}
    sums: Dict[Tuple[Tuple[str, str], ...], float] = {}
    counts: Dict[Tuple[Tuple[str, str], ...], float] = {}
    for name, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name == family + "_bucket":
            series.setdefault(rest, []).append((parse_float(labels["le"]), value))
        elif name == family + "_sum":
            sums[rest] = value
        elif name == family + "_count":
            counts[rest] = value
    assert set(series) == set(counts) == set(sums), f"{family}: buckets/_sum/_count label sets differ"
    for rest, buckets in series.items():
        les = [le for le, _ in buckets]
        assert les == sorted(les), f"{family}{rest}: buckets not in ascending le order"
        assert len(set(les)) == len(les), f"{family}{rest}: repeated le"
        assert les[-1] == math.inf, f"{family}{rest}: last bucket is not +Inf"
        values = [v for _, v in buckets]
        assert all(a <= b for a, b in zip(values, values[1:])), f"{family}{rest}: not cumulative {values}"
        assert values[-1] == counts[rest], f"{family}{rest}: +Inf {values[-1]} != _count {counts[rest]}"
        assert sums[rest] >= 0


def sample_value(samples: List[Sample], name: str, **labels: str) -> float:
    """The value of one series (0 if absent, as a counter that has not moved yet)."""
    for n, ls, v in samples:
        if n == name and all(ls.get(k) == val for k, val in labels.items()) and \
                set(ls) >= set(labels):
            if set(ls) == set(labels) or name.endswith("_bucket"):
                return v
    return 0.0


# ============================================================================
# Small utilities
# ============================================================================

def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_port_run(n: int) -> int:
    """A port p such that p .. p+n-1 are all free right now (for admin_port + worker index)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def connect_refused(port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connect to 127.0.0.1:port is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


def wait_until(pred: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


HeaderDict = Dict[str, str]
Body = Union[None, bytes]
