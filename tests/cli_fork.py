"""Short CLI commands without a Python start each: a fork server (cli_zygote.py) for run_cli.

Most of a short command's time (80-110 ms) is Python's start and the stdlib imports, and the
suite runs hundreds of them. `fork_run` sends the command to a server process that imported
seks_broker once and forks a child per command: still a separate process with its own exit
code, stdin/stdout/stderr, environment, working directory and argv, running the same
`sys.exit(main())` as `python -m seks_broker`, with Python's normal shutdown.

Commands run side by side (a test's thread pool) get a server each, up to SERVERS_MAX. It
answers None (the caller then starts Python as usual) where the two could differ or it cannot
help: no os.fork, another interpreter, an environment whose start-up variables (PYTHON*,
locale, TZ) differ from the servers', more commands at once than servers, or a server gone.
With SEKS_TEST_NO_FORK=1 set for the test run, conftest's run_command does not ask it at all
(every command then starts its own Python). Tests about the entry point itself
(`python3 seks_broker.py`, interpreters, signals) start their processes themselves, as must a
test reading a command's /proc/PID/environ (a forked child's is the server's start-up one).
"""

from __future__ import annotations

import json
import locale
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ZYGOTE_PY = Path(__file__).resolve().parent / "cli_zygote.py"
SERVERS_MAX = 6                 # commands run side by side (a test's thread pool) each get one
_LOCK = threading.Lock()        # guards _SERVERS and _STATE
_SERVERS: List["_Server"] = []
_STATE: Dict[str, Any] = {}


def _startup_vars(env: Dict[str, str]) -> Dict[str, str]:
    """The variables Python reads once at start (so a forked child keeps the server's)."""
    return {k: v for k, v in env.items()
            if (k.startswith("PYTHON") and k != "PYTHONPATH") or k.startswith("LC_")
            or k in ("LANG", "LANGUAGE", "TZ")}


class _Server:
    """One fork server process; `busy` is held while one of its children runs."""

    def __init__(self, broker_py: Path, env: Dict[str, str], workdir: str) -> None:
        self.busy = threading.Lock()
        with open(os.path.join(workdir, f"server-{len(_SERVERS)}.stderr"), "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(ZYGOTE_PY), str(broker_py)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         env=env, cwd=workdir)

    def stop(self) -> None:
        """End it (through its stdin closing; by its PID if it does not)."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc.stdout.close()


def _take(broker_py: Path, env: Dict[str, str]) -> Optional[_Server]:
    """An idle server (its `busy` lock taken), started if needed; None if all are busy or one
    failed."""
    with _LOCK:
        if _STATE.get("failed"):
            return None
        for server in _SERVERS:
            if server.busy.acquire(blocking=False):
                return server
        if len(_SERVERS) >= SERVERS_MAX:
            return None
        if not _SERVERS:
            _STATE.update(dir=tempfile.mkdtemp(prefix="seks-cli-fork-"), env=_startup_vars(env))
        server = _Server(broker_py, env, _STATE["dir"])
        server.busy.acquire()
        _SERVERS.append(server)
        return server


def stop() -> None:
    """End every fork server."""
    with _LOCK:
        for server in _SERVERS:
            server.stop()
        _SERVERS.clear()
        if "dir" in _STATE:
            shutil.rmtree(_STATE.pop("dir"), ignore_errors=True)


def _read_line(proc: subprocess.Popen, deadline: float) -> Optional[str]:
    fd = proc.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError("the CLI fork server ended")
        line += byte
    return line.decode().strip()


def _text(data: bytes) -> str:
    """Decoded as subprocess.run(text=True) decodes a child's output."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def fork_run(broker_py: Path, cmd: Sequence[str], argv: Sequence[str], input: str,
             env: Dict[str, str], cwd: str, timeout: float,
             server_env: Dict[str, str]) -> Optional[subprocess.CompletedProcess]:
    """`cmd + argv` run as a forked child of the server (started once, in server_env), or None:
    start Python instead."""
    if not hasattr(os, "fork"):
        return None
    server = _take(broker_py, server_env)
    if server is None:
        return None
    try:
        if _startup_vars(env) != _STATE["env"]:
            return None
        proc = server.proc
        files: List[str] = []
        for name in ("stdin", "stdout", "stderr"):
            fd, path = tempfile.mkstemp(prefix=name + "-", dir=_STATE["dir"])
            os.close(fd)
            files.append(path)
        Path(files[0]).write_bytes(input.encode(locale.getpreferredencoding(False)))
        request = {"argv": list(argv), "env": env, "cwd": cwd,
                   "stdin": files[0], "stdout": files[1], "stderr": files[2]}
        deadline = time.monotonic() + timeout
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            pid = int(_read_line(proc, time.monotonic() + 10) or 0)
            if pid <= 0:
                raise ValueError("no child PID from the CLI fork server")
            code = _read_line(proc, deadline)
            if code is None:                        # over time: kill it by PID, as run() does
                os.kill(pid, signal.SIGKILL)
                _read_line(proc, time.monotonic() + 10)
        except (OSError, EOFError, ValueError):
            _STATE["failed"] = True                 # a server is gone: Python starts from now on
            return None
        out, err = (_text(Path(p).read_bytes()) for p in files[1:])
        for path in files:
            os.unlink(path)
        if code is None:
            raise subprocess.TimeoutExpired([*cmd, *argv], timeout, out, err)
        return subprocess.CompletedProcess([*cmd, *argv], int(code), out, err)
    finally:
        server.busy.release()
