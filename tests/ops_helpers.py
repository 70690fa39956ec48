"""Helpers for the operations suites (test_ops.py, test_workers.py) and the TLS attacks in
test_security.py: throwaway certificates, a strict Prometheus text parser, runs of free ports.

  * `make_ca`, `make_leaf`, `make_ca_and_leaf`, `make_self_signed`: certificates made with the
    `openssl` binary (a private CA and server certificates for any name).
  * `parse_exposition`: a small, strict parser of the Prometheus text format (0.0.4).
  * `free_port_run`, `connect_refused`, `write_private`.

The broker process, its seeded DB and the fake upstreams are in conftest.py.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

from conftest import free_port

OPENSSL = shutil.which("openssl")


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


def make_ca(directory: Path, name: str) -> Tuple[Path, Path]:
    """A private CA: (name.pem, name.key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=seks test {name} CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return cert, key


def make_leaf(directory: Path, name: str, ca: Tuple[Path, Path],
              san: str = "IP:127.0.0.1,DNS:localhost") -> Tuple[Path, Path]:
    """A server certificate for `san` signed by `ca` (cert, key): (name.pem, name.key)."""
    leaf_cert, leaf_key = directory / f"{name}.pem", directory / f"{name}.key"
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(leaf_key), "-out", str(csr), "-subj", f"/CN={name}", cwd=directory)
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   f"subjectAltName={san}\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-set_serial", "0x%x" % int.from_bytes(os.urandom(8), "big"), "-out", str(leaf_cert),
             "-days", "2", "-extfile", str(ext), cwd=directory)
    return leaf_cert, leaf_key


def make_ca_and_leaf(directory: Path, name: str = "upstream") -> Tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, leaf.pem, leaf.key)."""
    ca = make_ca(directory, f"{name}-ca")
    leaf_cert, leaf_key = make_leaf(directory, name, ca)
    return ca[0], leaf_cert, leaf_key


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


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path

