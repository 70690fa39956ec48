"""The security core, tested directly (no sockets): the token check, the policy check and the
scrubber are pure functions/classes, so their edge cases are cheapest to pin here."""
import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import seks_broker as sb


def record(**over):
    values = dict(id="tok_000000000001", token_hash=b"h" * 32, secret_name="main", provider="openai",
                  agent="a1", expires_at=None, revoked_at=None, policy="{}", agent_disabled_at=None,
                  secret_provider="openai", secret_ciphertext="ct")
    values.update(over)
    return sb.TokenRecord(**values)


@pytest.mark.parametrize("rec,provider,status,words", [
    (None, "openai", 401, "unknown"),
    (record(revoked_at="2026-01-01T00:00:00Z"), "openai", 401, "revoked"),
    (record(expires_at=1000.0), "openai", 401, "expired"),
    (record(agent_disabled_at="2026-01-01T00:00:00Z"), "openai", 401, "disabled"),
    (record(secret_ciphertext=None), "openai", 401, "removed"),
    (record(), "anthropic", 403, "for provider 'openai'"),
])
def test_check_token_denies(rec, provider, status, words):
    with pytest.raises(sb.BrokerError) as info:
        sb.check_token(rec, provider, now=2000.0)
    assert info.value.status == status and words in info.value.message


def test_check_token_allows_live_token_at_its_provider():
    rec = record(expires_at=3000.0)
    assert sb.check_token(rec, "openai", now=2000.0) is rec


def test_expiry_is_exclusive():
    with pytest.raises(sb.AuthError):
        sb.check_token(record(expires_at=2000.0), "openai", now=2000.0)


@pytest.mark.parametrize("policy,method,path,model,allowed", [
    ({"methods": ["POST"]}, "POST", "/v1/x", None, True),
    ({"methods": ["POST"]}, "GET", "/v1/x", None, False),
    ({"paths": ["/v1/chat"]}, "POST", "/v1/chat/completions", None, True),
    ({"paths": ["/v1/chat"]}, "POST", "/v1/chat", None, True),
    ({"paths": ["/v1/chat"]}, "POST", "/v1/chatty", None, False),
    ({"paths": ["/v1/models/"]}, "GET", "/v1/models/x", None, True),
    ({"paths": ["/v1beta/models/gemini-2.0-flash"]}, "POST",
     "/v1beta/models/gemini-2.0-flash:generateContent", None, True),
    ({"models": ["gpt-4o-mini"]}, "POST", "/v1/chat/completions", "gpt-4o-mini", True),
    ({"models": ["gpt-4o-mini"]}, "POST", "/v1/chat/completions", "gpt-4o", False),
])
def test_check_policy(policy, method, path, model, allowed):
    if allowed:
        sb.check_policy(policy, method, path, model)
    else:
        with pytest.raises(sb.Forbidden):
            sb.check_policy(policy, method, path, model)


def test_scrubber_masks_whole_and_split_keys_with_same_length():
    key = b"sk-test-openai-0123456789abcdef"
    text = b"before " + key + b" middle " + key + b" after"
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 6)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        scrubber = sb.Scrubber([key])
        out = b"".join(scrubber.feed(p) for p in pieces) + scrubber.flush()
        assert key not in out and len(out) == len(text)
        assert out.startswith(b"before ") and out.endswith(b" after")


def test_scrubber_holds_back_at_most_len_key_minus_one():
    key = b"sk-test-0123456789"
    scrubber = sb.Scrubber([key])
    out = scrubber.feed(b"data: event\n\n" + key[:-1])
    assert out == b"data: event\n\n"                  # the event itself is not held
    assert len(scrubber.flush()) == len(key) - 1


def test_scrubber_passes_unrelated_data_untouched():
    scrubber = sb.Scrubber([b"sk-test-abc"])
    assert scrubber.feed(b"data: {}\n\n") == b"data: {}\n\n"
    assert scrubber.flush() == b""


def _through_pass_through(scrubber: "sb.Scrubber", pieces: list) -> bytes:
    """What the bulk relay sends: pass_through on a reused buffer, feed() where it declines."""
    buf = bytearray(max(len(p) for p in pieces))
    out = []
    for piece in pieces:
        buf[:len(piece)] = piece
        passed = scrubber.pass_through(buf, len(piece))
        if passed is None:
            out.append(scrubber.feed(bytes(buf[:len(piece)])))
        else:
            held, size = passed
            out.append(held + bytes(buf[:size]))
    return b"".join(out) + scrubber.flush()


def test_scrubber_pass_through_sends_exactly_what_feed_sends():
    """The zero-copy bulk path against feed(), over seeded random bodies with whole keys, keys
    split over reads (also over three reads), near-misses and key prefixes at the very end."""
    keys = [b"sk-test-bulk-0123456789abcdef", b"sk-test-bulk%2F0123"]
    rng = random.Random(11)
    for case in range(400):
        parts = []
        for _ in range(rng.randint(1, 8)):
            choice = rng.random()
            key = rng.choice(keys)
            if choice < 0.3:
                parts.append(key)
            elif choice < 0.5:
                parts.append(key[:rng.randint(1, len(key) - 1)])        # a near-miss prefix
            else:
                parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))
        body = b"".join(parts)
        if not body:
            continue
        cuts = sorted(set(rng.randint(1, len(body)) for _ in range(rng.randint(0, 6))))
        pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)]) if body[a:b]]
        expected = sb.Scrubber(keys)
        want = b"".join(expected.feed(p) for p in pieces) + expected.flush()
        got = _through_pass_through(sb.Scrubber(keys), pieces)
        assert got == want, case
        assert all(k not in got for k in keys) and len(got) == len(body), case


def test_scrubber_pass_through_holds_a_key_prefix_at_the_end_of_a_read():
    key = b"sk-test-bulk-0123456789"
    scrubber = sb.Scrubber([key])
    buf = bytearray(b"x" * 100 + key[:10])
    held, size = scrubber.pass_through(buf, len(buf))
    assert held == b"" and size == 100                 # the prefix waits for the next read
    rest = bytearray(key[10:] + b"y" * 100)
    assert scrubber.pass_through(rest, len(rest)) is None   # the key spans the boundary
    out = scrubber.feed(bytes(rest)) + scrubber.flush()
    assert key not in out and len(out) == 10 + len(rest)


@pytest.mark.parametrize("body, model", [
    (b'{"model": "gpt-4o", "messages": []}', "gpt-4o"),
    (b'\xef\xbb\xbf{"model": "gpt-4o"}', "gpt-4o"),                       # UTF-8 BOM
    (b'{"model": "a", "model": "b"}', None),                                # which one wins?
    (b'{"model": "a", "mod\\u0065l": "b"}', None),                          # escaped twin
    (b'{"mod\\u0065l": "a"}', "a"),                                          # escaped, alone
    (b'{"model": "a", "messages": [{"model": "x"}, {"model": "y"}]}', "a"),  # nested, not top
    (b'{"model": "a", "tools": [{"k": 1, "k": 2}]}', "a"),                   # other key repeats
    (b'{"model": 5}', None),
    (b'["model"]', None),
    (b'{"model": "a"', None),                                               # not JSON
    (b'\xff{"model": "a"}', None),                                          # not UTF-8
])
def test_request_model_reads_one_unambiguous_top_level_model(body: bytes, model: object) -> None:
    """The model a --models policy checks: a `model` key that may repeat (literally or through
    a \\u escape) gives None, so a parser that takes the other copy cannot be played against
    the broker's; repeats elsewhere in the body do not matter."""
    openai = sb.builtin_providers()["openai"]
    assert sb.request_model(openai, "/v1/chat/completions", body, "application/json") == model


def test_secret_variants_cover_percent_encodings():
    variants = sb.secret_variants("123:AB/c+d")
    for form in (b"123:AB/c+d", b"123%3AAB%2Fc%2Bd", b"123%3aAB%2fc%2bd", b"123:AB%2Fc%2Bd"):
        assert form in variants


def test_usage_meter_reads_openai_stream_usage_split_across_chunks():
    events = [{"choices": [{"delta": {"content": "hi"}}], "model": "gpt-4o-mini"},
              {"choices": [], "model": "gpt-4o-mini",
               "usage": {"prompt_tokens": 12, "completion_tokens": 5}}]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    meter = sb.UsageMeter("openai", "text/event-stream")
    for i in range(0, len(raw), 7):
        meter.feed(raw[i:i + 7])
    state = meter.finish()
    assert state == {"model": "gpt-4o-mini", "tokens_in": 12, "tokens_out": 5}


def test_begin_immediate_waits_for_another_connections_write_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holding the write lock: a transaction waits in short steps and goes on
    as soon as the lock is free; past DB_BUSY_SECONDS it fails instead of hanging."""
    store = sb.Store(str(tmp_path / "lock.db"))
    other = sqlite3.connect(str(tmp_path / "lock.db"), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.15, lambda: other.execute("COMMIT")).start()
    start = time.monotonic()
    with store.transaction() as db:
        db.execute("UPDATE state SET generation = generation + 1 WHERE id = 1")
    waited = time.monotonic() - start
    assert 0.1 <= waited < 2.0, waited
    other.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(sb, "DB_BUSY_SECONDS", 0.2)
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError):
        with store.transaction():
            pass
    assert 0.15 <= time.monotonic() - start < 2.0
    other.execute("ROLLBACK")
    with store.transaction() as db:                    # the connection still works afterwards
        assert db.execute("SELECT generation FROM state WHERE id = 1").fetchone()[0] >= 1
    other.close()
    store.close()


def test_a_path_carrying_the_real_key_is_never_remembered() -> None:
    """Validated paths are cached; Telegram's upstream path holds the real key and must not be
    kept there (nor one holding a seks token)."""
    key = "123456:AAtest-real-telegram-key"
    telegram = sb.builtin_providers()["telegram"]
    url = sb.build_upstream_url(telegram, f"/bot{key}/getMe", "", key_in_path=True)
    assert key in url
    sb.validate_path(f"/bot123:seks_telegram_{'A' * 43}/getMe")
    sb.validate_path("/v1/chat/completions/remembered")
    kept = " ".join(sb._VALID_PATHS)
    assert key not in kept and "seks_" not in kept
    assert "/v1/chat/completions/remembered" in sb._VALID_PATHS


@pytest.mark.parametrize("headers", [
    [("Authorization", "Bearer sk-test-a\r\nX-Injected: 1")],   # a key with a line break
    [("Authorization", "Bearer sk-test-a\nX-Injected: 1")],
    [("X-Ok", "1"), ("Bad Name", "1")],
    [("X-Ok", "1"), ("", "1")],
    [("X-Nul", "a\x00b")],
    [("X-Wide", "€")],                                            # not latin-1
    [("X-Ok", "1"), ("X-Last\n", "1")],                          # '$' would match before '\n'
])
def test_header_block_refuses_what_could_split_or_break_the_upstream_request(headers: list) -> None:
    with pytest.raises(sb.UpstreamError):
        sb.header_block(headers)


def test_header_block_joins_lines_for_http_client() -> None:
    block = sb.header_block([("Authorization", "Bearer sk-test-a"), ("X-Tab", "a\tb"), ("X-L1", "café")])
    assert block == b"Authorization: Bearer sk-test-a\r\nX-Tab: a\tb\r\nX-L1: caf\xe9"


# ============================================================================
# UpstreamReply: the upstream answer parser, fed raw bytes over a socket pair
# ============================================================================


def reply_to(raw: bytes, method: str = "GET") -> "sb.UpstreamReply":
    """An UpstreamReply that has read the head of ``raw`` (the upstream side then closes)."""
    import socket
    ours, theirs = socket.socketpair()
    theirs.sendall(raw)
    theirs.close()
    reply = sb.UpstreamReply(ours, method=method)
    reply.begin()
    return reply


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\n{}",       # obs-fold
    b"HTTP/1.1 200 OK\r\nX-A: one\r\n\ttwo\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 2\r\n\r\n{}",          # empty TE
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, \r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\n\r\nContent-Length: 2\r\n\r\n{}",                              # bare LF
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\n\r\n{}",
])
def test_upstream_reply_refuses_faulty_heads(raw: bytes) -> None:
    with pytest.raises(sb.UpstreamFraming):
        reply_to(raw)


def test_upstream_reply_refuses_a_chunk_size_with_a_bare_lf() -> None:
    reply = reply_to(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\n\r\n{}\r\n0\r\n\r\n")
    with pytest.raises(sb.UpstreamFraming):
        reply.read()


@pytest.mark.parametrize("version, extra, reuse", [
    (b"1.1", b"", True),
    (b"1.1", b"Content-Length: 2\r\n", False),                  # CL beside TE: ambiguous
    (b"1.0", b"Connection: keep-alive\r\n", False),             # TE in HTTP/1.0: faulty framing
])
def test_upstream_reply_reuses_a_chunked_connection_only_when_framing_is_clean(
        version: bytes, extra: bytes, reuse: bool) -> None:
    reply = reply_to(b"HTTP/" + version + b" 200 OK\r\n" + extra +
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert reply.read() == b"{}"
    assert reply.will_close is not reuse


# ============================================================================
# Inflater: compressed answers from an upstream that was asked not to compress
# ============================================================================


def test_inflater_takes_an_empty_body_labelled_gzip_as_empty() -> None:
    inf = sb.Inflater()
    assert inf.decompress(b"") + inf.finish() == b""


def test_inflater_reads_every_gzip_member_and_zlib() -> None:
    import gzip
    import zlib
    data = gzip.compress(b"one ") + gzip.compress(b"two ") + gzip.compress(b"three")
    inf = sb.Inflater()
    out = b"".join(inf.decompress(data[i:i + 7]) for i in range(0, len(data), 7)) + inf.finish()
    assert out == b"one two three"
    inf = sb.Inflater()
    assert inf.decompress(zlib.compress(b"zlib framed")) + inf.finish() == b"zlib framed"


@pytest.mark.parametrize("cut", ["garbage", "truncated", "trailing-garbage", "bomb", "member-bombs"])
def test_inflater_refuses_corrupt_or_cut_streams(cut: str) -> None:
    import gzip
    data = gzip.compress(b"x" * 5000)
    inf = sb.Inflater()
    with pytest.raises(sb.UpstreamFraming):
        if cut == "bomb":                           # 64 KiB that would inflate to 64 MiB
            inf.decompress(gzip.compress(b"\0" * (4 * sb.MAX_INFLATE)))
        elif cut == "member-bombs":                 # members each under the bound, not together
            inf.decompress(gzip.compress(b"\0" * (sb.MAX_INFLATE // 2 + 1)) * 3)
        elif cut == "garbage":
            inf.decompress(b"\xff" * 40)
        elif cut == "truncated":
            inf.decompress(data[:len(data) // 2])
            inf.finish()
        else:
            inf.decompress(data + b"not a gzip member")


def test_scrubber_masks_a_key_with_json_escaped_slashes() -> None:
    key = "sk-test-abc/def+ghi/jk="
    body = b'{"echo": "sk-test-abc\\/def+ghi\\/jk="}'
    scrubbed = sb.Scrubber.for_key(key).scrub(body)
    assert b"abc\\/def" not in scrubbed and b"[REDACTED" in scrubbed


@pytest.mark.parametrize("path", ["/a/..;/b", "/a/.;x/b", "/a/..;jsessionid=1/b", "/a/%2e%2e;/b"])
def test_validate_path_refuses_dot_segments_with_parameters(path: str) -> None:
    """Tomcat and Spring read '..;x' as '..': such a segment could climb past --allow-path."""
    with pytest.raises(sb.BadRequest):
        sb._validate_path(path)


def test_validate_path_keeps_other_matrix_parameters() -> None:
    assert sb.validate_path("/a/b;c=1/d", remember=False) == "/a/b;c=1/d"


def test_key_variants_live_only_in_the_token_cache_and_go_with_a_revocation(tmp_path: Path) -> None:
    """The derived forms of a real key (percent-encoded, JSON-escaped) are kept only beside the
    key in the token cache: a revocation (or a rotation) drops both; no other cache holds them."""
    assert not hasattr(sb.secret_variants, "cache_info") and not hasattr(sb.scrub_pairs, "cache_info")
    store = sb.Store(str(tmp_path / "v.db"))
    keys = sb.KeyRing(bytes(range(32)))
    key = "sk-test-variants/0123456789"
    store.put_secret("s", "openai", keys.cipher.encrypt(key.encode(), sb.secret_ad("s", "openai")),
                     False, keys.check)
    store.add_agent("a")
    store.add_token("tok_000000000abc", sb.token_digest("seks_openai_v"), "s", "openai", "a", None, {})
    cache = sb.TokenCache(store, keys, lambda: keys)
    record, real, pairs = cache.lookup("seks_openai_v")
    assert real == key.encode() and (b"sk-test-variants\\/0123456789", ) == tuple(
        s for s, _ in pairs if b"\\/" in s)
    assert any(pairs is entry[2] for entry in cache._entries.values())
    store.revoke_token(None, "tok_000000000abc")
    record, real, pairs = cache.lookup("seks_openai_other")
    assert record is None and real is None and pairs == ()
    assert not any(entry[1] for entry in cache._entries.values()), "the revoked token's key is still cached"
    store.close()
