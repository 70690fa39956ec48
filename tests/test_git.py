"""git over HTTPS through the broker (issue 14, items 2b and 3): the agent's git holds only a fake
token inside Basic credentials (`x-access-token:T`, as GitHub documents); the broker finds it in
one half of `Authorization: Basic`, checks it, and re-encodes the same pair with the real token.
The real `git` binary clones, fetches and pushes a new branch through the broker against a
loopback smart-HTTP server (`git http-backend`) that demands exactly the real credential and
refuses any request carrying a seks token. A token limited to the fetch paths cannot push.
Basic decoding is attacked: bad base64, no colon, tokens in both halves, another provider's."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from conftest import Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler, load_broker_module

sb = load_broker_module()
GIT = shutil.which("git") or "git"
REAL = "ghp_test_git_0123456789abcdef0123"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def git(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "NO_PROXY": "127.0.0.1"}
    return subprocess.run([GIT, *args], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=60)


def http_backend(root: Path) -> Callable[[UpstreamHandler, RecordedRequest], None]:
    """A GitHub stand-in: 401 unless exactly Basic x-access-token:REAL, and no seks token at all;
    then `git http-backend` (CGI) answers."""
    def respond(h: UpstreamHandler, req: RecordedRequest) -> None:
        if req.header_all("authorization") != [basic("x-access-token", REAL)] or "seks_" in req.wire_text():
            h.send_bytes(401, b"bad credentials", [("WWW-Authenticate", 'Basic realm="GitHub"')])
            return
        path, _, query = req.target.partition("?")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(root),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query, "REMOTE_USER": "agent",
               "REQUEST_METHOD": req.method, "CONTENT_TYPE": req.header("content-type") or "",
               "CONTENT_LENGTH": str(len(req.body or b"")), "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(root)}
        if req.header("content-encoding"):
            env["HTTP_CONTENT_ENCODING"] = req.header("content-encoding") or ""
        out = subprocess.run([GIT, "http-backend"], input=req.body or b"", env=env, capture_output=True,
                             timeout=60).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        h.send_bytes(status, body, headers)
    return respond


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("git-server")
    home = tmp_path_factory.mktemp("git-home")
    (root / "o").mkdir()
    assert git("init", "--bare", "-q", "-b", "main", "r.git", cwd=root / "o", home=home).returncode == 0
    work = tmp_path_factory.mktemp("git-seed")
    git("init", "-q", "-b", "main", ".", cwd=work, home=home)
    (work / "README").write_text("hello\n")
    (work / "blob.bin").write_bytes(os.urandom(300_000))        # a pack worth streaming
    git("add", ".", cwd=work, home=home)
    assert git("commit", "-q", "-m", "first", cwd=work, home=home).returncode == 0
    assert git("push", "-q", str(root / "o" / "r.git"), "main", cwd=work, home=home).returncode == 0
    return root


@pytest.fixture(scope="module")
def gitup(repo_root: Path) -> Iterator[FakeUpstream]:
    up = FakeUpstream("github-git", key=REAL)
    up.set_responder(http_backend(repo_root))
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gitbroker(broker_factory: Brokers, gitup: FakeUpstream) -> Broker:
    base = broker_factory.seed(("github-git",), keys={"github-git": REAL},
                               extra_env={"SEKS_UPSTREAM_GITHUB_GIT": gitup.url})
    return broker_factory.serve(base)


def test_git_clone_fetch_and_push_through_the_broker(gitbroker: Broker, gitup: FakeUpstream,
                                                     repo_root: Path, tmp_path: Path) -> None:
    token = gitbroker.token("github-git")
    home = tmp_path / "home"
    home.mkdir()
    url = f"http://x-access-token:{token}@127.0.0.1:{gitbroker.port}/github-git/o/r.git"
    cp = git("clone", "-q", url, "clone", cwd=tmp_path, home=home)       # credentials after a 401 challenge
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "clone" / "README").read_text() == "hello\n"
    clone = tmp_path / "clone"
    header = f"http.extraHeader=Authorization: {basic('x-access-token', token)}"
    plain = f"http://127.0.0.1:{gitbroker.port}/github-git/o/r.git"
    assert git("-c", header, "fetch", "-q", plain, cwd=clone, home=home).returncode == 0
    (clone / "new.txt").write_text("from the agent\n")
    git("add", "new.txt", cwd=clone, home=home)
    git("commit", "-q", "-m", "agent change", cwd=clone, home=home)
    cp = git("-c", header, "push", "-q", plain, "HEAD:refs/heads/agent-branch", cwd=clone, home=home)
    assert cp.returncode == 0, cp.stderr
    refs = git("ls-remote", str(repo_root / "o" / "r.git"), cwd=tmp_path, home=home).stdout
    assert "refs/heads/agent-branch" in refs
    seen = [r.path for r in gitup.requests]
    assert "/o/r.git/git-upload-pack" in seen and "/o/r.git/git-receive-pack" in seen
    assert all(r.header_all("authorization") == [basic("x-access-token", REAL)] for r in gitup.requests)
    assert all("seks_" not in r.wire_text() for r in gitup.requests)


def test_a_fetch_only_token_cannot_push(gitbroker: Broker, gitup: FakeUpstream, tmp_path: Path) -> None:
    token = gitbroker.mint("github-git", "git-reader", "--allow-path", "/o/r.git/info/refs",
                           "--allow-path", "/o/r.git/git-upload-pack")
    home = tmp_path / "home"
    home.mkdir()
    header = f"http.extraHeader=Authorization: {basic('x-access-token', token)}"
    plain = f"http://127.0.0.1:{gitbroker.port}/github-git/o/r.git"
    assert git("-c", header, "clone", "-q", plain, "c", cwd=tmp_path, home=home).returncode == 0
    (tmp_path / "c" / "x.txt").write_text("x\n")
    git("add", "x.txt", cwd=tmp_path / "c", home=home)
    git("commit", "-q", "-m", "x", cwd=tmp_path / "c", home=home)
    gitup.requests.clear()
    cp = git("-c", header, "push", plain, "HEAD:refs/heads/reader-branch", cwd=tmp_path / "c", home=home)
    assert cp.returncode != 0 and "403" in cp.stderr, cp.stderr
    assert "/o/r.git/git-receive-pack" not in [r.path for r in gitup.requests]


def encoded(text: bytes) -> List[tuple]:
    return [("Authorization", "Basic " + base64.b64encode(text).decode())]


@pytest.mark.parametrize("case", ["no-colon", "both-halves", "neither", "bad-base64", "not-utf8", "other-provider"])
def test_bad_basic_credentials_are_401_and_reach_nobody(gitbroker: Broker, gitup: FakeUpstream, case: str) -> None:
    token = gitbroker.token("github-git")
    other = "seks_openai_" + "A" * 43
    headers: Dict[str, List[tuple]] = {
        "no-colon": encoded(token.encode()), "both-halves": encoded(f"{token}:{token}".encode()),
        "neither": encoded(b"x-access-token:ghp_not_a_seks_token"), "bad-base64": [("Authorization", "Basic !!!")],
        "not-utf8": encoded(b"\xff\xfe:" + token.encode()[:-1] + b"\xff"),
        "other-provider": encoded(f"x-access-token:{other}".encode())}
    gitup.requests.clear()
    resp = gitbroker.request("GET", "/github-git/o/r.git/info/refs?service=git-upload-pack", headers[case])
    assert resp.status == 401, (case, resp.status, resp.body[:200])
    assert resp.headers.get("WWW-Authenticate") in (None, 'Basic realm="seks-broker"')
    assert gitup.requests == []


@pytest.mark.parametrize("pair, half", [("x-access-token:{t}", "password"), ("__token__:{t}", "password"),
                                        ("{t}:", "user"), ("{t}:x:y", "user")])
def test_basic_token_finds_the_token_half_and_keeps_the_other(pair: str, half: str) -> None:
    token = "seks_github-git_" + "B" * 43
    place = sb.parse_place("basic")
    swap = sb.basic_token(base64.b64encode(pair.format(t=token).encode()).decode(), place)
    assert swap is not None and swap.token == token and swap.side == half
    provider = sb.builtin_providers()["github-git"]
    headers, _, _ = sb.swap_credentials(provider, swap, {"key": REAL}, [("Authorization", "Basic zzz"), ("X-A", "1")], "/o", "")
    value = dict((n.lower(), v) for n, v in headers)["authorization"]
    assert base64.b64decode(value.split()[1]).decode() == pair.format(t=REAL)
    assert [n.lower() for n, _ in headers].count("authorization") == 1


def test_an_upstream_echoing_the_basic_header_shows_neither_the_key_nor_its_base64(
        gitbroker: Broker, gitup: FakeUpstream, repo_root: Path) -> None:
    """The broker makes a new form of the key (base64 of the pair): an upstream echoing the
    Authorization header it got must not hand the agent that form either."""
    sent = basic("x-access-token", REAL)
    gitup.set_responder(lambda h, req: h.send_json(401, {"message": "Bad credentials",
                                                         "got": req.header("authorization")}))
    try:
        resp = gitbroker.request("GET", "/github-git/o/r.git/info/refs?service=git-upload-pack",
                                 encoded(f"x-access-token:{gitbroker.token('github-git')}".encode()))
        assert resp.status == 401
        assert sent.split()[1].encode() not in resp.body and REAL.encode() not in resp.body, resp.body
        assert b"[REDACTED-BY-SEKS]" in resp.body
    finally:
        gitup.set_responder(http_backend(repo_root))


def test_a_custom_provider_can_take_the_token_from_basic(broker_factory: Brokers, gitup: FakeUpstream,
                                                         tmp_path: Path) -> None:
    """Item 6: a [provider:NAME] in the config file uses the same shapes: here a self-hosted git
    server (`token = basic`) reached by the real git through /mygit/."""
    config = tmp_path / "seks.ini"
    config.write_text(f"[provider:mygit]\nupstream = {gitup.url}\ntoken = basic\ninject = same\n")
    base = broker_factory.seed(("github-git",), keys={"github-git": REAL}, config=config,
                               extra_env={"SEKS_UPSTREAM_GITHUB_GIT": gitup.url})
    base.add_secret("mygit-key", "mygit", REAL)
    served = broker_factory.serve(base)
    token = served.mint("mygit", "self-hosted", secret="mygit-key")
    home = tmp_path / "home"
    home.mkdir()
    cp = git("clone", "-q", f"http://x-access-token:{token}@127.0.0.1:{served.port}/mygit/o/r.git", "c",
             cwd=tmp_path, home=home)
    assert cp.returncode == 0 and (tmp_path / "c" / "README").exists(), cp.stderr
