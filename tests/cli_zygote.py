"""A CLI fork server for the tests: `python cli_zygote.py BROKER_PY`, driven by cli_fork.py.

It imports the broker (BROKER_PY's module, as `python -m` would) once, then for each request
line on stdin (JSON: argv, env, cwd and the paths of the stdin/stdout/stderr files) forks a
child, prints the child's PID, waits for it and prints its exit code. The child is what
`python -m seks_broker ARGV` is after Python's start and the module's import: its fds 0/1/2
are the request's files, its environment, working directory and sys.argv are the request's,
and it ends through `sys.exit(main())` with the interpreter's normal shutdown (atexit,
flushing). This process itself never runs a command, so every child starts from the same
freshly imported module.
"""

import importlib
import json
import os
import sys

BROKER_PY = os.path.abspath(sys.argv[1])
sys.path[0] = os.path.dirname(BROKER_PY)    # not this script's folder (tests/)
broker = importlib.import_module(os.path.splitext(os.path.basename(BROKER_PY))[0])


def serve() -> dict:
    """Answer requests until stdin closes; in a forked child, return that child's request."""
    control_in = os.fdopen(os.dup(0), "rb", buffering=0)
    control_out = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)                        # sys.stdin/stdout stay unread and unwritten here
    os.dup2(null, 1)
    os.close(null)
    line = b""
    while True:
        byte = control_in.read(1)           # unbuffered: nothing of a later request is held
        if not byte:
            sys.exit(0)
        if byte != b"\n":
            line += byte
            continue
        request, line = json.loads(line), b""
        pid = os.fork()
        if pid == 0:
            control_in.close()
            control_out.close()
            return request
        control_out.write(f"{pid}\n")
        control_out.flush()
        _, status = os.waitpid(pid, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        control_out.write(f"{code}\n")
        control_out.flush()


def become(request: dict) -> None:
    """Turn this forked child into the command's process."""
    for fd, (name, flags) in enumerate((("stdin", os.O_RDONLY), ("stdout", os.O_WRONLY),
                                        ("stderr", os.O_WRONLY))):
        opened = os.open(request[name], flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [BROKER_PY, *request["argv"]]


if __name__ == "__main__":
    become(serve())
    sys.exit(broker.main())
