#!/usr/bin/env python3
"""seks-broker: a credential broker for AI agents, in one standard-library file.

An agent holds only a fake token (``seks_openai_…``) and points its normal SDK at this broker.
The broker checks the token, swaps in the real key, forwards the request to the provider's
configured upstream and streams the answer back. A leaked fake token is worthless anywhere
but here, and here it is narrow, revocable and audited.

Threat model in short (the full text is THREAT_MODEL.md in the project's shared notes):
  * the agent is untrusted (it may be prompt-injected); the operator, the DB key and the
    configured upstreams are trusted;
  * a real key only ever travels to its own provider's configured upstream: the agent picks the
    path, never the scheme, host or port;
  * the agent never receives a real key: echoes in answers are scrubbed, errors and logs are
    redacted, Telegram's key segment is masked wherever a URL could be printed;
  * a stolen DB reveals nothing usable: secrets are encrypted and authenticated, tokens are
    stored as SHA-256 digests, the master key lives outside the DB;
  * hostile input gets a clear 4xx/5xx and changes nothing;
  * every request, allowed or denied, leaves a row in an HMAC-chained audit log.

Sections, in dependency order (search for the banner to jump):
  1. CONSTANTS AND LIMITS      named limits, hop-by-hop headers, provider table (data)
  2. ERRORS                    one root exception, one subclass per status, one mapping
  3. CIPHER                    HKDF-SHA256, the HMAC keystream cipher (format spec inside), KeyRing
  4. STORE                     sqlite: schema, migrations, secrets, tokens, agents, audit chain
  5. POLICY                    the token check, token cache, per-token policy, usage metering
  6. FORWARDING                upstream URL builder, credential swap, scrubber, upstream pool
  6b. WEBSOCKETS               RFC 6455 relay, Discord gateway token swap
  7. HTTP HANDLER              strict request parsing, the proxy pipeline, streaming
  8. SERVER                    settings and config file, metrics, logging, server, workers
  9. CLI                       argparse sub-commands and main()

The security core, each a small unit without I/O: SecretCipher, check_token / check_policy,
build_upstream_url (with validate_path), and Scrubber.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import configparser
import contextlib
import datetime
import email.message
import email.utils
import functools
import getpass
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import secrets
import select
import signal
import socket
import sqlite3
import ssl
import stat
import sys
import threading
import time
import unicodedata
import urllib.parse
import urllib.request
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Tuple

__version__ = "0.1.0"

# ============================================================================================
# 1. CONSTANTS AND LIMITS
# ============================================================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_DB = "seks.db"

MAX_REQUEST_LINE = 8 * 1024          # longer request line -> 414
MAX_HEADER_BYTES = 32 * 1024         # all header lines together -> 431
MAX_HEADER_COUNT = 100               # more header fields -> 431
MAX_BODY_BYTES = 512 * 1024 * 1024   # request body -> 413 (OpenAI's file limit is 512 MB)
MAX_CHUNK_LINE = 1024                # a chunk-size line of a chunked body -> 400
MAX_CONNECTIONS = 2048               # concurrent agent connections; the next one gets 503
CLIENT_TIMEOUT_S = 60.0              # idle or stalled agent socket is closed
HEADER_TIMEOUT_S = 20.0              # whole request head must arrive within this
MIN_BODY_RATE = 1024                 # bytes/s a request body must average after client_timeout
UPSTREAM_CONNECT_TIMEOUT_S = 10.0    # TCP + TLS connect to an upstream -> 504
UPSTREAM_TIMEOUT_S = 300.0           # silence from an upstream while waiting for bytes -> 504
POOL_IDLE_PER_HOST = 64              # idle keep-alive connections kept per upstream
POOL_IDLE_SECONDS = 50.0             # an idle pooled connection older than this is retired
STREAM_CHUNK = 1024 * 1024           # largest single read while relaying a body
INLINE_BODY_MAX = 64 * 1024          # answers up to this size go out in one write
BULK_BUFFER = 1024 * 1024             # the one read buffer of a large file-like answer
THREAD_STACK_BYTES = 512 * 1024      # per-connection thread stack (1,000 streams stay small)
TOKEN_CACHE_SIZE = 10_000            # decrypted (token -> key) entries held in memory

TOKEN_RANDOM_BYTES = 32              # 256 bits of randomness in every fake token

# Headers that describe one hop, never forwarded in either direction (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Request headers the broker sets itself or must not pass upstream.
REQUEST_HEADERS_REPLACED = frozenset({"host", "content-length", "expect", "accept-encoding"})

# Built-in providers, written in the same INI format as custom providers in a config file.
#   upstream  scheme://host[:port][/base-path] that <rest> is appended to
#   token     where the agent's fake token may arrive, one place a line:
#               header NAME [PREFIX] | query PARAM | path-prefix PREFIX [PREFIX ...]
#   inject    where the real key goes: header NAME [PREFIX], query PARAM, or "same" (where it came)
#   usage     how usage is reported in answers (openai | anthropic | gemini), LLM providers only
#   token_shape  bot-id: fake tokens look like "<bot id>:seks_…" (clients check Telegram's shape)
#   errors    telegram: broker errors use Telegram's {"ok": false, "error_code", "description"}
#   env       what `token mint --format env` prints: BASE_VAR=<path after the route> KEY_VAR
#   gateway   discord: /discord/gateway is a WebSocket route to the configured Discord gateway,
#             with the token checked and swapped inside IDENTIFY/RESUME (section 6b)
BUILTIN_PROVIDERS_INI = """
[openai]
upstream = https://api.openai.com
token = header Authorization Bearer
inject = header Authorization Bearer
usage = openai
env = OPENAI_BASE_URL=/v1 OPENAI_API_KEY

[anthropic]
upstream = https://api.anthropic.com
aliases = claude
token = header x-api-key
    header Authorization Bearer
inject = header x-api-key
usage = anthropic
env = ANTHROPIC_BASE_URL= ANTHROPIC_API_KEY

[gemini]
upstream = https://generativelanguage.googleapis.com
token = header x-goog-api-key
    query key
inject = same
usage = gemini
env = GOOGLE_GEMINI_BASE_URL= GEMINI_API_KEY

[groq]
upstream = https://api.groq.com
token = header Authorization Bearer
inject = header Authorization Bearer
usage = openai
env = GROQ_BASE_URL= GROQ_API_KEY

[discord]
upstream = https://discord.com
token = header Authorization Bot
inject = header Authorization Bot
env = DISCORD_API_BASE=/api/v10 DISCORD_TOKEN
gateway = discord

[telegram]
upstream = https://api.telegram.org
token = path-prefix /bot /file/bot
inject = same
token_shape = bot-id
errors = telegram
env = TELEGRAM_API_BASE=/bot TELEGRAM_BOT_TOKEN

[github]
upstream = https://api.github.com
token = header Authorization Bearer
    header Authorization token
inject = header Authorization Bearer
env = GITHUB_API_URL= GITHUB_TOKEN

[notion]
upstream = https://api.notion.com
token = header Authorization Bearer
inject = header Authorization Bearer
env = NOTION_BASE_URL= NOTION_TOKEN

[cloudflare]
upstream = https://api.cloudflare.com
token = header Authorization Bearer
inject = header Authorization Bearer
env = CLOUDFLARE_BASE_URL=/client/v4 CLOUDFLARE_API_TOKEN

[brave]
upstream = https://api.search.brave.com
token = header X-Subscription-Token
inject = header X-Subscription-Token
env = BRAVE_BASE_URL=/res/v1 BRAVE_API_KEY
"""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PROVIDER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
TOKEN_CHARS = rb"!#$%&'*+.^_`|~0-9A-Za-z-"        # RFC 9110 tchar: header names, methods
HEADER_NAME_RE = re.compile(rb"^[" + TOKEN_CHARS + rb"]+\Z")
TTL_RE = re.compile(r"^(\d+)([smhd])\Z")
TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CredentialPlace:
    """One place a credential travels: a header (with an optional scheme prefix), a query
    parameter, or a path segment after one of some prefixes (Telegram's ``/bot<T>/``)."""

    __slots__ = ("kind", "name", "prefixes")

    def __init__(self, kind: str, name: str = "", prefixes: Tuple[str, ...] = ()) -> None:
        self.kind = kind          # "header" | "query" | "path"
        self.name = name          # header name (lower case) or query parameter
        self.prefixes = prefixes  # header scheme words ("Bearer") or path prefixes ("/bot")

    @classmethod
    def parse(cls, text: str) -> "CredentialPlace":
        words = text.split()
        if len(words) >= 2 and words[0] == "header" and len(words) <= 3:
            if not HEADER_NAME_RE.match(words[1].encode()):
                raise ConfigError(f"bad header name {words[1]!r}")
            return cls("header", words[1].lower(), tuple(words[2:]))
        if len(words) == 2 and words[0] == "query":
            return cls("query", words[1])
        if len(words) >= 2 and words[0] == "path-prefix":
            if not all(p.startswith("/") and "//" not in p for p in words[1:]):
                raise ConfigError("path-prefix values must start with '/'")
            # longest first, so /file/bot wins over /bot
            return cls("path", "", tuple(sorted(words[1:], key=len, reverse=True)))
        raise ConfigError(f"expected 'header NAME [PREFIX]', 'query PARAM' or "
                          f"'path-prefix PREFIX...', got {text!r}")

    def __repr__(self) -> str:
        return f"CredentialPlace({self.kind} {self.name} {' '.join(self.prefixes)})".strip()


class Provider:
    """A route: name, upstream base, where tokens arrive and where the real key goes."""

    __slots__ = ("name", "upstream", "scheme", "host", "port", "base_path", "token_places",
                 "inject", "usage", "aliases", "token_shape", "errors", "env", "gateway")

    def __init__(self, name: str, upstream: str, token_places: List[CredentialPlace],
                 inject: Optional[CredentialPlace], usage: str = "",
                 aliases: Tuple[str, ...] = (), token_shape: str = "",
                 errors: str = "", env: str = "", gateway: str = "") -> None:
        self.name = name
        self.upstream = upstream
        self.scheme, self.host, self.port, self.base_path = parse_upstream_base(upstream)
        self.token_places = token_places
        self.inject = inject      # None means "same place the token arrived"
        self.usage = usage
        self.aliases = aliases
        self.token_shape = token_shape
        self.errors = errors
        self.env = env
        self.gateway = gateway

    def with_upstream(self, upstream: str) -> "Provider":
        return Provider(self.name, upstream, self.token_places, self.inject, self.usage,
                        self.aliases, self.token_shape, self.errors, self.env, self.gateway)

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        netloc = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{self.scheme}://{netloc}" + ("" if self.port == default else f":{self.port}")

    @property
    def host_header(self) -> str:
        return self.origin.split("://", 1)[1]

    def __repr__(self) -> str:
        return f"Provider({self.name} -> {self.origin}{self.base_path})"


def parse_upstream_base(url: str) -> Tuple[str, str, int, str]:
    """Split an upstream base URL into scheme, host, port and base path; refuse anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        hostname = None
    if hostname is None or parts.scheme not in ("http", "https"):
        raise ConfigError(f"upstream must be http(s)://host[:port][/path], got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("upstream must not carry credentials, a query or a fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"bad port in upstream {url!r}") from None
    base_path = parts.path.rstrip("/")
    if base_path and (not base_path.startswith("/") or "//" in base_path):
        raise ConfigError(f"bad base path in upstream {url!r}")
    return parts.scheme, hostname, port, base_path


def provider_from_section(name: str, sec: "configparser.SectionProxy") -> Provider:
    """One provider from its INI section (built-in ``[name]`` or a config ``[provider:name]``)."""
    if not PROVIDER_NAME_RE.match(name):
        raise ConfigError("provider names are lower-case letters, digits and '-'")
    known = {"upstream", "token", "inject", "usage", "aliases", "token_shape", "errors", "env",
             "gateway"}
    unknown = set(sec.keys()) - known - set(sec.parser.defaults())
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} (known: "
                          f"{', '.join(sorted(known))})")
    if "upstream" not in sec or "token" not in sec:
        raise ConfigError("'upstream' and 'token' are required")
    try:
        places = [CredentialPlace.parse(line) for line in sec["token"].splitlines() if line.strip()]
    except ConfigError as exc:
        raise ConfigError(f"token: {exc}", key="token") from None
    inject_text = sec.get("inject", "same").strip()
    try:
        inject = None if inject_text == "same" else CredentialPlace.parse(inject_text)
    except ConfigError as exc:
        raise ConfigError(f"inject: {exc}", key="inject") from None
    if inject is not None and inject.kind == "path":
        raise ConfigError("path-prefix injection is written 'inject = same'", key="inject")
    try:
        parse_upstream_base(sec["upstream"].strip())
    except ConfigError as exc:
        raise ConfigError(str(exc), key="upstream") from None
    usage = sec.get("usage", "").strip()
    shape = sec.get("token_shape", "").strip()
    errors = sec.get("errors", "").strip()
    gateway = sec.get("gateway", "").strip()
    for key, value, allowed in (("usage", usage, ("", "openai", "anthropic", "gemini")),
                                ("token_shape", shape, ("", "bot-id")),
                                ("errors", errors, ("", "telegram")),
                                ("gateway", gateway, ("", "discord"))):
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(a for a in allowed if a)}",
                              key=key)
    env = sec.get("env", "").strip()
    if env and not re.match(r"^[A-Z_][A-Z0-9_]*=\S* [A-Z_][A-Z0-9_]*$", env):
        raise ConfigError("env must be 'BASE_VAR=/path KEY_VAR', e.g. 'OPENAI_BASE_URL=/v1 "
                          "OPENAI_API_KEY'", key="env")
    return Provider(name, sec["upstream"].strip(), places, inject, usage,
                    tuple(sec.get("aliases", "").split()), shape, errors, env, gateway)


def providers_from_ini(text: str) -> Dict[str, Provider]:
    """The built-in provider table (same format as ``[provider:NAME]`` in a config file)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text, source="<built-in>")
    return {name: provider_from_section(name, parser[name]) for name in parser.sections()}


# ============================================================================================
# 2. ERRORS
# ============================================================================================

class BrokerError(Exception):
    """Root of every error the broker answers with. ``message`` is safe to show an agent."""

    status = 500
    kind = "internal_error"

    def __init__(self, message: str = "internal error", headers: Optional[Dict[str, str]] = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.close = close


class BadRequest(BrokerError):
    status, kind = 400, "invalid_request"


class AuthError(BrokerError):
    status, kind = 401, "authentication_error"


class Forbidden(BrokerError):
    status, kind = 403, "permission_denied"


class NotFound(BrokerError):
    status, kind = 404, "not_found"


class RequestTimeout(BrokerError):
    status, kind = 408, "request_timeout"


class PayloadTooLarge(BrokerError):
    status, kind = 413, "payload_too_large"


class UriTooLong(BrokerError):
    status, kind = 414, "uri_too_long"


class RateLimited(BrokerError):
    status, kind = 429, "rate_limited"


class HeadersTooLarge(BrokerError):
    status, kind = 431, "headers_too_large"


class UpstreamError(BrokerError):
    status, kind = 502, "upstream_error"


class Unavailable(BrokerError):
    status, kind = 503, "unavailable"


class UpstreamTimeout(BrokerError):
    status, kind = 504, "upstream_timeout"


class ConfigError(Exception):
    """Bad configuration or CLI input: reported to the operator, never to an agent. ``key``
    names the config key at fault, so `config check` can point at its line."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class UsageError(ConfigError):
    """A command-line value is malformed (exit code 2, like argparse's own errors)."""


class KeyRotated(Exception):
    """The DB was re-keyed by rotate-master-key while this process held the old key."""


class DecryptError(Exception):
    """A ciphertext failed verification. Deliberately carries no detail."""


class ConnectionCut(Exception):
    """This exchange cannot go on: the agent left, the upstream cut its answer mid-way, or the
    audit row could not be written. The connection is closed without another response."""


HTTP_REASONS = {code: phrase for code, (phrase, _) in http.server.BaseHTTPRequestHandler.responses.items()}


def error_body(exc: BrokerError, style: str = "") -> bytes:
    """The JSON of every broker-made error answer; Telegram clients need Telegram's shape."""
    if style == "telegram":
        return json.dumps({"ok": False, "error_code": exc.status,
                           "description": exc.message}).encode()
    return json.dumps({"error": {"type": exc.kind, "message": exc.message}}).encode()


# ============================================================================================
# 3. CIPHER
# ============================================================================================

def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract then expand."""
    if length > 255 * 32:
        raise ValueError("HKDF output too long")
    prk = hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


_URLSAFE_B64_RE = re.compile(r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?\Z")


class SecretCipher:
    """Authenticated encryption for secrets at rest, built only from HMAC-SHA256.

    Keys (from the 32-byte master key, HKDF-SHA256, empty salt):
        enc_key = HKDF(master, info=b"seks-broker/v1/encrypt", L=32)
        mac_key = HKDF(master, info=b"seks-broker/v1/mac",     L=32)

    Format, version 1 (all integers big-endian); the stored text is the URL-safe base64
    (RFC 4648 section 5, with '=' padding) of:

        +---------+-----------+------------------+-----------+
        | version |  nonce    |   ciphertext     |   tag     |
        | 1 byte  | 16 bytes  |   len(plaintext) | 32 bytes  |
        |  0x01   |  random   |                  |           |
        +---------+-----------+------------------+-----------+

        keystream = HMAC(enc_key, nonce || uint64(0)) || HMAC(enc_key, nonce || uint64(1)) || ...
        ciphertext = plaintext XOR keystream[:len(plaintext)]
        tag = HMAC-SHA256(mac_key, version || nonce || uint32(len(ad)) || ad || ciphertext)

    ``ad`` (associated data) binds a ciphertext to its row: for a secret it is
    ``b"secret\\x00" + name + b"\\x00" + provider``, so a ciphertext moved to another row fails.

    Verification, in this order: (1) base64-decode strictly; (2) the length is at least 49;
    (3) the version byte is 0x01; (4) recompute the tag and compare it with
    ``hmac.compare_digest``; (5) only then decrypt. Every failure raises the same
    message-less ``DecryptError``.
    """

    VERSION = 1
    NONCE_BYTES = 16
    TAG_BYTES = 32

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._enc_key = hkdf_sha256(master_key, b"", b"seks-broker/v1/encrypt", 32)
        self._mac_key = hkdf_sha256(master_key, b"", b"seks-broker/v1/mac", 32)

    def __repr__(self) -> str:
        return "SecretCipher(<keys hidden>)"

    def _keystream_xor(self, nonce: bytes, data: bytes) -> bytes:
        blocks = []
        for counter in range(-(-len(data) // 32)):
            blocks.append(hmac.new(self._enc_key, nonce + counter.to_bytes(8, "big"),
                                   hashlib.sha256).digest())
        stream = b"".join(blocks)[:len(data)]
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")

    def _tag(self, version: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes:
        msg = version + nonce + len(ad).to_bytes(4, "big") + ad + ciphertext
        return hmac.new(self._mac_key, msg, hashlib.sha256).digest()

    def encrypt(self, plaintext: bytes, ad: bytes, nonce: Optional[bytes] = None) -> str:
        nonce = os.urandom(self.NONCE_BYTES) if nonce is None else nonce
        if len(nonce) != self.NONCE_BYTES:
            raise ValueError("nonce must be 16 bytes")
        version = bytes([self.VERSION])
        ciphertext = self._keystream_xor(nonce, plaintext)
        tag = self._tag(version, nonce, ad, ciphertext)
        return base64.urlsafe_b64encode(version + nonce + ciphertext + tag).decode("ascii")

    def decrypt(self, token: str, ad: bytes) -> bytes:
        if not _URLSAFE_B64_RE.match(token):
            raise DecryptError()
        try:
            _unverified = base64.urlsafe_b64decode(token)
        except (binascii.Error, ValueError):
            raise DecryptError() from None
        if len(_unverified) < 1 + self.NONCE_BYTES + self.TAG_BYTES:
            raise DecryptError()
        version = _unverified[:1]
        if version != bytes([self.VERSION]):
            raise DecryptError()
        nonce = _unverified[1:1 + self.NONCE_BYTES]
        _unverified_ciphertext = _unverified[1 + self.NONCE_BYTES:-self.TAG_BYTES]
        tag = _unverified[-self.TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(version, nonce, ad, _unverified_ciphertext)):
            raise DecryptError()
        return self._keystream_xor(nonce, _unverified_ciphertext)


def secret_ad(name: str, provider: str) -> bytes:
    """Associated data binding a secret's ciphertext to its name and provider."""
    return b"secret\x00" + name.encode() + b"\x00" + provider.encode()


def derive_key(master_key: bytes, purpose: str) -> bytes:
    """A separate 32-byte key per purpose (audit chain, fingerprints), never the master itself."""
    return hkdf_sha256(master_key, b"", b"seks-broker/v1/" + purpose.encode(), 32)


class KeyRing:
    """Everything derived once from a master key: the secret cipher, the audit-chain key, the
    fingerprint key, and the check value that tells the DB which master key this is."""

    __slots__ = ("cipher", "audit", "fingerprint", "check")

    def __init__(self, master_key: bytes) -> None:
        self.cipher = SecretCipher(master_key)
        self.audit = derive_key(master_key, "audit")
        self.fingerprint = derive_key(master_key, "fingerprint")
        self.check = derive_key(master_key, "key-check")

    def __repr__(self) -> str:
        return "KeyRing(<keys hidden>)"


# ============================================================================================
# 4. STORE
# ============================================================================================

_ISO_CACHE: Tuple[int, str] = (-1, "")


def utc_iso(epoch: Optional[float] = None) -> str:
    """UTC timestamp as ISO 8601 with a Z, to the second (what tables and audit rows show)."""
    global _ISO_CACHE
    second = int(time.time() if epoch is None else epoch)
    cached = _ISO_CACHE                  # one read: another thread may replace it meanwhile
    if cached[0] == second:
        return cached[1]
    text = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    _ISO_CACHE = (second, text)
    return text


def create_private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (atomic, no chmod after)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run ';'-separated statements inside the caller's transaction (sqlite3's executescript
    would commit it first). Scripts given here hold no ';' inside a statement."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _migration_1(db: sqlite3.Connection) -> None:
    _run_script(db, """
        CREATE TABLE state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL,          -- bumped by every change a token check reads
            audit_anchor BLOB,                    -- MAC of the last pruned audit row
            audit_anchor_id INTEGER NOT NULL DEFAULT 0,   -- and its id (new rows follow it)
            key_check BLOB                        -- tells a wrong master key from a right one
        );
        INSERT INTO state (id, generation, audit_anchor, key_check) VALUES (1, 0, NULL, NULL);
        CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            disabled_at TEXT
        );
        CREATE TABLE secrets (
            name TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            ciphertext TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            token_hash BLOB NOT NULL UNIQUE,      -- SHA-256 of the token, never the token
            secret_name TEXT NOT NULL,
            provider TEXT NOT NULL,
            agent TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at REAL,                      -- unix time, NULL = never
            revoked_at TEXT,
            policy TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE token_usage (               -- counters, written per request, no generation bump
            token_id TEXT PRIMARY KEY,
            requests INTEGER NOT NULL DEFAULT 0,
            tokens_used INTEGER NOT NULL DEFAULT 0,
            bucket REAL,
            bucket_at REAL
        );
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            agent TEXT, token_id TEXT, provider TEXT, secret TEXT,
            method TEXT, path TEXT, status INTEGER,
            bytes_in INTEGER, bytes_out INTEGER, duration_ms REAL,
            client TEXT, outcome TEXT NOT NULL, reason TEXT,
            model TEXT, tokens_in INTEGER, tokens_out INTEGER,
            mac BLOB NOT NULL
        );
        CREATE INDEX audit_ts ON audit (ts);
    """)
    for table in ("agents", "secrets", "tokens"):
        for event in ("INSERT", "UPDATE", "DELETE"):
            db.execute(f"CREATE TRIGGER {table}_{event.lower()}_gen AFTER {event} ON {table} "
                       f"BEGIN UPDATE state SET generation = generation + 1 WHERE id = 1; END")


MIGRATIONS: List[Callable[[sqlite3.Connection], None]] = [_migration_1]
DB_BUSY_SECONDS = 30.0        # how long a statement waits while another process holds a lock


def begin_immediate(db: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE on a connection whose busy timeout is 0, retried every 0.1-0.5 ms while
    another process holds the write lock, for up to DB_BUSY_SECONDS. sqlite's own busy handler
    sleeps 1, 2, 5, 10 ms... between tries, far longer than a commit here takes: with several
    broker processes on one DB it stalled each of them for milliseconds at a time (measured:
    ``--workers 3`` went from about 2,650 to 3,400 requests/s with this)."""
    deadline = time.monotonic() + DB_BUSY_SECONDS
    pause = 0.0001
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 1.5, 0.0005)
_GENERATION_SELECT = "SELECT generation, key_check FROM state WHERE id = 1"


class Store:
    """The sqlite database: secrets (encrypted), tokens (hashed), agents, counters, audit.

    Connections come from a small pool (sqlite connections are not shared between threads at
    the same time); every write runs inside ``transaction()`` (BEGIN IMMEDIATE). WAL mode lets a
    second broker process and the CLI read and write the same file concurrently.
    """

    POOL_SIZE = 16

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            create_private_file(path)
        self._pool: List[sqlite3.Connection] = []
        self.autocheckpoint = True
        self._lock = threading.Lock()
        self._audit_lock = threading.Lock()
        self._audit_db: Optional[sqlite3.Connection] = None
        self._audit_head: Optional[Tuple[int, int, bytes]] = None   # data_version, id, MAC
        self._generation_lock = threading.Lock()
        self._generation_db: Optional[sqlite3.Connection] = None
        self._generation_seen: Optional[Tuple[int, Tuple[int, bytes]]] = None
        with self.connection() as db:
            self._migrate(db)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=DB_BUSY_SECONDS, isolation_level=None,
                             check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(DB_BUSY_SECONDS * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")   # durable across a process crash
        if not self.autocheckpoint:
            db.execute("PRAGMA wal_autocheckpoint = 0")  # serve checkpoints in the background
        return db

    def checkpoint_in_background(self, interval: float = 1.0) -> None:
        """Move WAL checkpoints off the request path (they are a p99 spike when a commit
        triggers one): connections opened from now on leave it to this thread."""
        self.autocheckpoint = False
        self.close()

        def run() -> None:
            while True:
                time.sleep(interval)
                try:
                    with self.connection() as db:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass

        threading.Thread(target=run, name="seks-checkpoint", daemon=True).start()

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._pool.pop() if self._pool else None
        if db is None:
            db = self._open()
        try:
            yield db
        finally:
            if db.in_transaction:
                db.rollback()
            with self._lock:
                keep = len(self._pool) < self.POOL_SIZE
                if keep:
                    self._pool.append(db)
            if not keep:
                db.close()

    @contextlib.contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT. ``durable``: the commit is synced to disk before this
        returns (synchronous=FULL), also across a power cut; others survive a process crash."""
        with self.connection() as db:
            db.execute("PRAGMA busy_timeout = 0")
            if durable:
                db.execute("PRAGMA synchronous = FULL")
            try:
                begin_immediate(db)
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(DB_BUSY_SECONDS * 1000)}")
            try:
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                if durable:
                    db.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise ConfigError(f"database schema {version} is newer than this broker "
                              f"({len(MIGRATIONS)}); upgrade seks_broker.py")
        while version < len(MIGRATIONS):
            db.execute("BEGIN IMMEDIATE")
            try:
                current = db.execute("PRAGMA user_version").fetchone()[0]
                if current == version:
                    MIGRATIONS[version](db)
                    db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            version = db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        with self._audit_lock:
            if self._audit_db is not None:
                pool.append(self._audit_db)
            self._audit_db, self._audit_head, self._generation_seen = None, None, None
        with self._generation_lock:
            if self._generation_db is not None:
                pool.append(self._generation_db)
            self._generation_db = None
        for db in pool:
            db.close()

    def generation(self) -> Tuple[int, bytes]:
        """A counter that changes whenever a secret, token or agent changes (triggers), and the
        check value of the master key the DB is encrypted under (changes on rotation).

        Read on every request, so made cheap: on the audit connection (when no commit is
        running on it) ``PRAGMA data_version`` tells whether any other connection or process
        committed since the last read; if none did, the last answer still holds."""
        if self._audit_lock.acquire(blocking=False):
            try:
                db = self._audit_connection()
                version = db.execute("PRAGMA data_version").fetchone()[0]
                seen = self._generation_seen
                if seen is not None and seen[0] == version:
                    return seen[1]
                row = db.execute(_GENERATION_SELECT).fetchone()
                answer = (row[0], bytes(row[1] or b""))
                self._generation_seen = (version, answer)
                return answer
            except sqlite3.OperationalError:
                pass                         # busy (it does not wait): the other connection
            finally:
                self._audit_lock.release()
        with self._generation_lock:          # a commit is running: read on a second connection
            if self._generation_db is None:
                self._generation_db = self._open()
            row = self._generation_db.execute(_GENERATION_SELECT).fetchone()
        return row[0], bytes(row[1] or b"")

    def _audit_connection(self) -> sqlite3.Connection:
        """The audit writer's connection (held under _audit_lock). Its busy timeout is 0:
        ``begin_immediate`` waits for the write lock in finer steps than sqlite would."""
        if self._audit_db is None:
            self._audit_db = self._open()
            self._audit_db.execute("PRAGMA busy_timeout = 0")
        return self._audit_db

    def check_master_key(self, check: bytes) -> None:
        """Remember which master key this DB belongs to; refuse any other one."""
        with self.transaction() as db:
            stored = db.execute("SELECT key_check FROM state WHERE id = 1").fetchone()[0]
            if stored is None:
                db.execute("UPDATE state SET key_check = ? WHERE id = 1", (check,))
            elif not hmac.compare_digest(bytes(stored), check):
                raise ConfigError("the master key does not match this database (wrong "
                                  "SEKS_MASTER_KEY or key file?)")

    def rekey(self, old: "SecretCipher", new: "SecretCipher", old_audit: bytes,
              new_audit: bytes, new_check: bytes, force: bool = False) -> int:
        """Re-encrypt every secret and recompute every audit MAC under new keys, atomically;
        the old chain is verified inside the same transaction (no row slips in unchecked).
        The commit is synced before this returns: the caller renames the key file next."""
        with self.transaction(durable=True) as db:
            rows = db.execute("SELECT name, provider, ciphertext FROM secrets").fetchall()
            for name, provider, ciphertext in rows:
                ad = secret_ad(name, provider)
                try:
                    plaintext = old.decrypt(ciphertext, ad)
                except DecryptError:
                    raise ConfigError(f"secret {name!r} does not decrypt with the current key; "
                                      f"nothing was changed") from None
                db.execute("UPDATE secrets SET ciphertext = ? WHERE name = ?",
                           (new.encrypt(plaintext, ad), name))
            anchor = db.execute("SELECT audit_anchor FROM state WHERE id = 1").fetchone()[0]
            prev = old_prev = bytes(anchor or b"")
            cursor = db.execute(f"SELECT {', '.join(AuditRow.FIELDS)}, mac FROM audit ORDER BY id")
            updates = []
            for raw in cursor.fetchall():
                row = AuditRow.from_db(raw)
                if not force and not hmac.compare_digest(
                        audit_mac(old_audit, row.values(), old_prev), row.mac):
                    raise ConfigError(f"audit row {row.id} does not verify; nothing was changed "
                                      f"(investigate, or pass --force)")
                old_prev = row.mac
                mac = audit_mac(new_audit, row.values(), prev)
                updates.append((mac, row.id))
                prev = mac
            db.executemany("UPDATE audit SET mac = ? WHERE id = ?", updates)
            db.execute("UPDATE state SET key_check = ? WHERE id = 1", (new_check,))
        return len(rows)

    def has_secrets(self) -> bool:
        with self.connection() as db:
            return db.execute("SELECT 1 FROM secrets LIMIT 1").fetchone() is not None

    # --- secrets ---------------------------------------------------------------------------
    @staticmethod
    def _require_key(db: sqlite3.Connection, check: bytes) -> None:
        """Inside a write transaction: refuse if the DB moved to another master key since the
        caller loaded its own (a rotate-master-key committed meanwhile)."""
        stored = db.execute("SELECT key_check FROM state WHERE id = 1").fetchone()[0]
        if stored is not None and not hmac.compare_digest(bytes(stored), check):
            raise ConfigError("the master key was rotated while this command ran; nothing was "
                              "changed: run it again")

    def put_secret(self, name: str, provider: str, ciphertext: str, replace: bool,
                   check: bytes) -> None:
        """Store a secret encrypted under the key whose check value is ``check``."""
        now = utc_iso()
        with self.transaction() as db:
            self._require_key(db, check)
            exists = db.execute("SELECT 1 FROM secrets WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise ConfigError(f"secret {name!r} exists; use 'secret rotate' to change it")
            if not exists and replace:
                raise ConfigError(f"no secret named {name!r}")
            if exists:
                db.execute("UPDATE secrets SET ciphertext = ?, updated_at = ? WHERE name = ?",
                           (ciphertext, now, name))
            else:
                db.execute("INSERT INTO secrets VALUES (?, ?, ?, ?, ?)",
                           (name, provider, ciphertext, now, now))

    def get_secret(self, name: str) -> Optional[Tuple[str, str]]:
        with self.connection() as db:
            row = db.execute("SELECT provider, ciphertext FROM secrets WHERE name = ?",
                             (name,)).fetchone()
        return (row[0], row[1]) if row else None

    def list_secrets(self) -> List[Tuple[str, str, str, str]]:
        with self.connection() as db:
            return db.execute("SELECT name, provider, created_at, updated_at FROM secrets "
                              "ORDER BY name").fetchall()

    def remove_secret(self, name: str) -> int:
        """Delete a secret and revoke its tokens; returns how many tokens were revoked."""
        with self.transaction() as db:
            if db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 0:
                raise ConfigError(f"no secret named {name!r}")
            return db.execute("UPDATE tokens SET revoked_at = ? WHERE secret_name = ? "
                              "AND revoked_at IS NULL", (utc_iso(), name)).rowcount

    # --- agents ----------------------------------------------------------------------------
    def add_agent(self, name: str, exist_ok: bool = False) -> bool:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone():
                if exist_ok:
                    return False
                raise ConfigError(f"agent {name!r} exists")
            db.execute("INSERT INTO agents VALUES (?, ?, NULL)", (name, utc_iso()))
            return True

    def set_agent_disabled(self, name: str, disabled: bool) -> None:
        with self.transaction() as db:
            changed = db.execute("UPDATE agents SET disabled_at = ? WHERE name = ?",
                                 (utc_iso() if disabled else None, name)).rowcount
            if not changed:
                raise ConfigError(f"no agent named {name!r}")

    def list_agents(self) -> List[Tuple[str, str, Optional[str], int]]:
        with self.connection() as db:
            return db.execute(
                "SELECT a.name, a.created_at, a.disabled_at, "
                "(SELECT COUNT(*) FROM tokens t WHERE t.agent = a.name AND t.revoked_at IS NULL) "
                "FROM agents a ORDER BY a.name").fetchall()

    # --- tokens ----------------------------------------------------------------------------
    def add_token(self, token_id: str, token_hash: bytes, secret_name: str, provider: str,
                  agent: str, expires_at: Optional[float], policy: Dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens (id, token_hash, secret_name, provider, agent, "
                       "created_at, expires_at, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (token_id, token_hash, secret_name, provider, agent, utc_iso(),
                        expires_at, json.dumps(policy, sort_keys=True)))
            db.execute("INSERT INTO token_usage (token_id) VALUES (?)", (token_id,))

    def find_token(self, token_hash: bytes) -> Optional["TokenRecord"]:
        """The token row (with its agent's state and its secret) for a SHA-256 digest."""
        with self.connection() as db:
            row = db.execute(
                "SELECT t.id, t.token_hash, t.secret_name, t.provider, t.agent, t.expires_at, "
                "t.revoked_at, t.policy, a.disabled_at, s.provider, s.ciphertext "
                "FROM tokens t LEFT JOIN agents a ON a.name = t.agent "
                "LEFT JOIN secrets s ON s.name = t.secret_name "
                "WHERE t.token_hash = ?", (token_hash,)).fetchone()
        if row is None or not hmac.compare_digest(row[1], token_hash):
            return None
        return TokenRecord(*row)

    def list_tokens(self) -> List[Tuple[Any, ...]]:
        with self.connection() as db:
            return db.execute(
                "SELECT t.id, t.agent, t.provider, t.secret_name, t.created_at, t.expires_at, "
                "t.revoked_at, t.policy, u.requests, u.tokens_used "
                "FROM tokens t LEFT JOIN token_usage u ON u.token_id = t.id "
                "ORDER BY t.created_at, t.id").fetchall()

    def revoke_token(self, token_hash: Optional[bytes], token_id: Optional[str]) -> str:
        with self.transaction() as db:
            if token_hash is not None:
                row = db.execute("SELECT id, revoked_at FROM tokens WHERE token_hash = ?",
                                 (token_hash,)).fetchone()
            else:
                row = db.execute("SELECT id, revoked_at FROM tokens WHERE id = ?",
                                 (token_id,)).fetchone()
            if row is None:
                raise ConfigError("no such token")
            if row[1] is None:
                db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (utc_iso(), row[0]))
            return row[0]

    # --- policy counters -------------------------------------------------------------------
    def admit(self, token_id: str, policy: Dict[str, Any], now: float) -> None:
        """Count one request against the token's lifetime, rate and budget limits, atomically
        (BEGIN IMMEDIATE serialises every broker process on this DB)."""
        with self.transaction() as db:
            requests_, used, bucket, bucket_at = db.execute(
                "SELECT requests, tokens_used, bucket, bucket_at FROM token_usage "
                "WHERE token_id = ?", (token_id,)).fetchone()
            max_requests = policy.get("max_requests")
            if max_requests is not None and requests_ >= max_requests:
                raise RateLimited(f"token has used all {max_requests} requests it was minted for")
            budget = policy.get("budget_tokens")
            if budget is not None and used >= budget:
                raise RateLimited(f"token budget of {budget} tokens is spent ({used} used)")
            rate = policy.get("rate")
            if rate is not None:
                capacity, per_seconds = float(rate[0]), float(rate[1])
                refill = capacity / per_seconds
                level = capacity if bucket is None else min(
                    capacity, bucket + max(0.0, now - (bucket_at or now)) * refill)
                if level < 1.0:
                    wait = max(1, int(-(-(1.0 - level) // refill)))
                    raise RateLimited(f"rate limit of {rate[0]} requests per {rate[2]} reached",
                                      headers={"Retry-After": str(wait)})
                bucket, bucket_at = level - 1.0, now
            db.execute("UPDATE token_usage SET requests = requests + 1, bucket = ?, bucket_at = ? "
                       "WHERE token_id = ?", (bucket, bucket_at, token_id))

    # --- audit -----------------------------------------------------------------------------
    def append_audit(self, keys: "KeyRing", rows: List[Tuple["AuditRow", bool]],
                     write_rows: bool = True) -> None:
        """Append chained audit rows (and each request's usage) in one short transaction;
        refuses (KeyRotated) if the DB moved to another master key meanwhile. ``rows`` holds
        (row, counted): counted means the request was already counted at admission. With
        ``write_rows`` False (audit off) only the usage counters move.

        Runs on a connection of its own. The chain head (last id and MAC) and the key check are
        kept from its previous commit and re-read only when another connection (another
        process, the CLI, an admission) committed since (``PRAGMA data_version``)."""
        with self._audit_lock:
            db = self._audit_connection()
            begin_immediate(db)
            try:
                version = db.execute("PRAGMA data_version").fetchone()[0]
                head = self._audit_head
                if head is None or head[0] != version:
                    check = db.execute("SELECT key_check FROM state WHERE id = 1").fetchone()[0]
                    if check is not None and not hmac.compare_digest(bytes(check), keys.check):
                        raise KeyRotated()
                    head = (version,) + self._chain_head(db)
                _, last_id, prev = head
                usage: Dict[str, List[int]] = {}
                for row, counted in rows:
                    if write_rows:
                        last_id += 1
                        row.id = last_id
                        values = row.values()
                        prev = row.mac = audit_mac(keys.audit, values, prev)
                        db.execute(_AUDIT_INSERT, values + (prev,))
                    if row.token_id:
                        spent = (row.tokens_in or 0) + (row.tokens_out or 0)
                        if spent or not counted:
                            item = usage.setdefault(row.token_id, [0, 0])
                            item[0] += spent
                            item[1] += 0 if counted else 1
                for token_id, (spent, count) in usage.items():
                    db.execute("UPDATE token_usage SET tokens_used = tokens_used + ?, "
                               "requests = requests + ? WHERE token_id = ?",
                               (spent, count, token_id))
                db.execute("COMMIT")
            except BaseException:
                self._audit_head = None
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._audit_head = (version, last_id, prev)

    @staticmethod
    def _chain_head(db: sqlite3.Connection) -> Tuple[int, bytes]:
        """The last audit row's id and MAC, or the prune anchor's when the log is empty."""
        last = db.execute("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if last is not None:
            return last[0], bytes(last[1])
        anchor, anchor_id = db.execute("SELECT audit_anchor, audit_anchor_id FROM state "
                                       "WHERE id = 1").fetchone()
        return anchor_id, bytes(anchor or b"")

    @staticmethod
    def _append_audit(db: sqlite3.Connection, key: bytes, row: "AuditRow") -> None:
        last_id, prev = Store._chain_head(db)
        row.id = last_id + 1
        row.mac = audit_mac(key, row.values(), prev)
        db.execute(_AUDIT_INSERT, row.values() + (row.mac,))

    def audit_rows(self, where: str = "", params: Tuple[Any, ...] = (),
                   limit: Optional[int] = None, after_id: int = 0) -> List["AuditRow"]:
        sql = (f"SELECT {', '.join(AuditRow.FIELDS)}, mac FROM audit WHERE id > ?"
               + (f" AND {where}" if where else ""))
        if limit is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id"
        else:
            sql += " ORDER BY id"
        with self.connection() as db:
            return [AuditRow.from_db(r) for r in db.execute(sql, (after_id,) + params)]

    def last_audit_id(self) -> int:
        with self.connection() as db:
            return db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0]

    def audit_anchor(self) -> bytes:
        with self.connection() as db:
            anchor = db.execute("SELECT audit_anchor FROM state WHERE id = 1").fetchone()[0]
        return bytes(anchor or b"")

    def prune_audit(self, key: bytes, before_ts: str, check: bytes) -> int:
        """Delete rows older than ``before_ts`` and append a chained 'prune' row that records
        the anchor (last deleted row's id and MAC), so the rest still verifies."""
        with self.transaction() as db:
            self._require_key(db, check)
            last = db.execute("SELECT id, mac FROM audit WHERE ts < ? AND outcome != 'prune' "
                              "ORDER BY id DESC LIMIT 1", (before_ts,)).fetchone()
            if last is None:
                return 0
            anchor_id, anchor_mac = last[0], bytes(last[1])
            deleted = db.execute("DELETE FROM audit WHERE id <= ?", (anchor_id,)).rowcount
            db.execute("UPDATE state SET audit_anchor = ?, audit_anchor_id = ? WHERE id = 1",
                       (anchor_mac, anchor_id))
            row = AuditRow(ts=utc_iso(), outcome="prune", reason=json.dumps(
                {"before": before_ts, "deleted": deleted, "anchor_id": anchor_id,
                 "anchor_mac": anchor_mac.hex()}, sort_keys=True))
            self._append_audit(db, key, row)       # same transaction: no half-pruned log
        return deleted

    def usage_rows(self, where: str, params: Tuple[Any, ...]) -> List[Tuple[Any, ...]]:
        sql = ("SELECT agent, provider, COALESCE(model, ''), COUNT(*), "
               "COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0) FROM audit "
               "WHERE outcome = 'ok'" + (f" AND {where}" if where else "")
               + " GROUP BY agent, provider, COALESCE(model, '') ORDER BY agent, provider, 3")
        with self.connection() as db:
            return db.execute(sql, params).fetchall()


class AuditRow:
    """One audit record. The MAC covers every field below, in this order, and the previous
    row's MAC: editing, inserting, deleting or reordering rows breaks the chain."""

    FIELDS = ("id", "ts", "agent", "token_id", "provider", "secret", "method", "path", "status",
              "bytes_in", "bytes_out", "duration_ms", "client", "outcome", "reason", "model",
              "tokens_in", "tokens_out")
    __slots__ = FIELDS + ("mac",)

    def __init__(self, **values: Any) -> None:
        for name in self.FIELDS:
            setattr(self, name, values.get(name))
        self.mac = values.get("mac", b"")

    @classmethod
    def from_db(cls, row: Tuple[Any, ...]) -> "AuditRow":
        values = dict(zip(cls.FIELDS, row))
        values["mac"] = bytes(row[-1])
        return cls(**values)

    def values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def as_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


_AUDIT_INSERT = (f"INSERT INTO audit ({', '.join(AuditRow.FIELDS)}, mac) "
                 f"VALUES ({', '.join('?' * (len(AuditRow.FIELDS) + 1))})")


_AUDIT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)   # made once: hot path


def audit_mac(key: bytes, values: Tuple[Any, ...], prev_mac: bytes) -> bytes:
    """HMAC-SHA256 over the canonical JSON of a row's fields followed by the previous MAC."""
    canonical = _AUDIT_JSON.encode(list(values)).encode()
    return hmac.digest(key, canonical + b"\x00" + prev_mac, "sha256")


def verify_audit_chain(key: bytes, rows: List[AuditRow], anchor: bytes) -> Tuple[bool, str]:
    """Walk the chain; report the first row that was edited, inserted, deleted or moved.
    ``anchor`` is the MAC of the last pruned row (empty if the log was never pruned)."""
    prev, expected_id = anchor, None
    latest_prune: Optional[Dict[str, Any]] = None
    for row in rows:
        if expected_id is not None and row.id != expected_id:
            return False, (f"row {row.id}: rows {expected_id}..{row.id - 1} are missing "
                           f"(deleted) or ids were changed")
        if not hmac.compare_digest(audit_mac(key, row.values(), prev), row.mac):
            return False, (f"row {row.id}: MAC mismatch: this row was edited, inserted or moved, "
                           f"or the row before it was deleted")
        if row.outcome == "prune":
            latest_prune = json.loads(row.reason)
        prev, expected_id = row.mac, row.id + 1
    if anchor and (latest_prune is None or latest_prune.get("anchor_mac") != anchor.hex()):
        return False, "the start of the log does not match the last prune: rows were deleted"
    first_id = latest_prune["anchor_id"] + 1 if anchor and latest_prune else 1
    if rows and rows[0].id != first_id:
        return False, f"row {rows[0].id}: the log should start at row {first_id}"
    return True, f"{len(rows)} rows, chain intact"


# ============================================================================================
# 5. POLICY
# ============================================================================================

class TokenRecord:
    """A token row joined with its agent and secret. Holds no plaintext key."""

    __slots__ = ("id", "token_hash", "secret_name", "provider", "agent", "expires_at",
                 "revoked_at", "policy", "agent_disabled_at", "secret_provider",
                 "secret_ciphertext")

    def __init__(self, id: str, token_hash: bytes, secret_name: str, provider: str, agent: str,
                 expires_at: Optional[float], revoked_at: Optional[str], policy: str,
                 agent_disabled_at: Optional[str], secret_provider: Optional[str],
                 secret_ciphertext: Optional[str]) -> None:
        self.id = id
        self.token_hash = token_hash
        self.secret_name = secret_name
        self.provider = provider
        self.agent = agent
        self.expires_at = expires_at
        self.revoked_at = revoked_at
        self.policy: Dict[str, Any] = json.loads(policy or "{}")
        self.agent_disabled_at = agent_disabled_at
        self.secret_provider = secret_provider
        self.secret_ciphertext = secret_ciphertext

    def __repr__(self) -> str:
        return f"TokenRecord({self.id} agent={self.agent} provider={self.provider})"


def token_digest(token: str) -> bytes:
    """How a token is stored and looked up: SHA-256 (tokens carry 256 random bits)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def new_token(provider: Provider, real_key: str = "") -> str:
    """A fresh fake token: ``seks_<provider>_<43 chars>``; Telegram-shaped where clients check.

    Telegram clients insist on ``<digits>:<rest>`` and aiogram takes the digits as the bot's
    id, so the fake token reuses the real key's (public) bot id when it has one."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_RANDOM_BYTES)).rstrip(b"=").decode()
    token = f"seks_{provider.name}_{body}"
    if provider.token_shape == "bot-id":
        bot_id, sep, _ = real_key.partition(":")
        if not (sep and bot_id.isascii() and bot_id.isdigit() and len(bot_id) <= 20):
            bot_id = "".join(secrets.choice("0123456789") for _ in range(10))
        token = bot_id + ":" + token
    return token


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(6)


def check_token(record: Optional[TokenRecord], provider: str, now: float) -> TokenRecord:
    """The token check: deny unless the token is known, live, and bound to this provider."""
    if record is None:
        raise AuthError("unknown token")
    if record.revoked_at is not None:
        raise AuthError("token revoked")
    if record.expires_at is not None and now >= record.expires_at:
        raise AuthError("token expired")
    if record.agent_disabled_at is not None:
        raise AuthError(f"agent '{record.agent}' is disabled")
    if record.secret_ciphertext is None:
        raise AuthError("the token's secret was removed")
    if record.secret_provider != record.provider:      # an edited row must not borrow a key
        raise AuthError("the token does not match its secret")
    if record.provider != provider:
        raise Forbidden(f"token is for provider '{record.provider}', not '{provider}'")
    return record


class TokenCache:
    """token digest -> (record, real key), trusted only while the store's generation is unchanged.

    The generation counter is bumped by triggers on every change to secrets, tokens and agents
    (from any process), so a revocation bites on the very next request; reading it costs one
    indexed sqlite read instead of a join and a decryption.
    """

    def __init__(self, store: Store, keys: KeyRing, reload: Callable[[], KeyRing],
                 size: int = TOKEN_CACHE_SIZE) -> None:
        self._store = store
        self.keys = keys
        self._reload = reload
        self._size = size
        self._lock = threading.Lock()
        self._generation = -1
        # digest -> (record, real key, its scrub pairs): key and variants dropped together
        self._entries: Dict[bytes, Tuple[Optional[TokenRecord], Optional[bytes], Any]] = {}

    @staticmethod
    def _store_error() -> None:
        sys.stderr.write(f"{utc_iso()} ERROR a stored secret failed verification (wrong master "
                         f"key or edited database)\n")

    def reload_keys(self) -> None:
        """The master key was rotated under us: take the new one (or refuse to serve)."""
        with self._lock:
            self.keys = self._reload()
            self._entries.clear()

    def lookup(self, token: str) -> Tuple[Optional[TokenRecord], Optional[bytes], Any]:
        digest = token_digest(token)
        generation, check = self._store.generation()
        if check and not hmac.compare_digest(check, self.keys.check):
            self.reload_keys()
        with self._lock:
            if generation != self._generation:
                self._entries.clear()
                self._generation = generation
            hit = self._entries.get(digest)
        if hit is not None:
            return hit
        record = self._store.find_token(digest)
        key, pairs = None, ()
        if record is not None and record.secret_ciphertext is not None:
            try:
                key = self.keys.cipher.decrypt(record.secret_ciphertext, secret_ad(
                    record.secret_name, record.secret_provider or ""))
            except DecryptError:
                self._store_error()
                raise BrokerError("the broker could not use the stored secret") from None
            pairs = scrub_pairs(secret_variants(key.decode("utf-8", "surrogateescape")))
        entry = (record, key, pairs)
        with self._lock:
            if self._generation == generation:
                if len(self._entries) >= self._size:
                    self._entries.clear()
                self._entries[digest] = entry
        return entry


RATE_RE = re.compile(r"^(\d+)/(s|m|h|d)\Z")
RATE_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
MAX_INSPECT_BODY = 16 * 1024 * 1024   # largest request body read whole to check --models
MAX_USAGE_BODY = 8 * 1024 * 1024      # largest non-stream answer parsed whole for token usage
USAGE_TAIL_BYTES = 64 * 1024          # of a larger one, the tail searched for its usage


def parse_rate(text: str) -> List[Any]:
    """``60/m`` -> [60, 60.0, "minute"]: capacity, refill period in seconds, unit word."""
    match = RATE_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--rate takes COUNT/UNIT with unit s, m, h or d, like 60/m (got {text!r})")
    return [int(match.group(1)), float(TTL_UNITS[match.group(2)]), RATE_WORDS[match.group(2)]]


def make_policy(methods: Optional[List[str]], paths: Optional[List[str]], rate: Optional[str],
                max_requests: Optional[int], models: Optional[str],
                budget_tokens: Optional[int]) -> Dict[str, Any]:
    """The per-token policy stored with the token (only the limits that were asked for)."""
    policy: Dict[str, Any] = {}
    if methods:
        policy["methods"] = sorted({m.strip().upper() for m in methods if m.strip()})
    if paths:
        for path in paths:
            if not path.startswith("/"):
                raise UsageError(f"--allow-path must start with '/' (got {path!r})")
            validate_path(path)
        policy["paths"] = list(paths)
    if rate:
        policy["rate"] = parse_rate(rate)
    if max_requests is not None:
        if max_requests < 1:
            raise UsageError("--max-requests must be at least 1")
        policy["max_requests"] = max_requests
    if models:
        policy["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if budget_tokens is not None:
        if budget_tokens < 1:
            raise UsageError("--budget-tokens must be at least 1")
        policy["budget_tokens"] = budget_tokens
    return policy


def describe_policy(policy: Dict[str, Any]) -> str:
    parts = []
    if "methods" in policy:
        parts.append("methods=" + ",".join(policy["methods"]))
    if "paths" in policy:
        parts.append("paths=" + ",".join(policy["paths"]))
    if "rate" in policy:
        parts.append(f"rate={policy['rate'][0]}/{policy['rate'][2][0]}")
    if "max_requests" in policy:
        parts.append(f"max-requests={policy['max_requests']}")
    if "models" in policy:
        parts.append("models=" + ",".join(policy["models"]))
    if "budget_tokens" in policy:
        parts.append(f"budget={policy['budget_tokens']}")
    return " ".join(parts) or "-"


def path_within(path: str, prefix: str) -> bool:
    """Prefix match on segment boundaries: /v1/chat matches /v1/chat/x, not /v1/chatty."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + ":")


def check_policy(policy: Dict[str, Any], method: str, path: str, model: Optional[str]) -> None:
    """Deny what the token's policy does not allow (method, path prefix, model)."""
    methods = policy.get("methods")
    if methods and method.upper() not in methods:
        raise Forbidden(f"method {method} is not allowed for this token (allowed: "
                        f"{', '.join(methods)})")
    paths = policy.get("paths")
    if paths and not any(path_within(path, prefix) for prefix in paths):
        raise Forbidden("path is not allowed for this token (allowed prefixes: "
                        f"{', '.join(paths)})")
    models = policy.get("models")
    if models and model is not None and model not in models:
        raise Forbidden(f"model '{model[:100]}' is not allowed for this token (allowed: "
                        f"{', '.join(models)})")


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def check_websocket_policy(policy: Dict[str, Any], usage: bool) -> None:
    """A WebSocket session is one request that carries any number of messages, and each may do
    what a write request does: tokens whose limits count requests or forbid writes cannot be
    held on it, so their upgrade (and their gateway IDENTIFY/RESUME) is refused."""
    if "max_requests" in policy or "rate" in policy:
        raise Forbidden("this token has a request limit or rate, which the broker cannot hold "
                        "on the messages of a WebSocket session")
    methods = policy.get("methods")
    if methods and not WRITE_METHODS.intersection(methods):
        raise Forbidden("this token is limited to read methods; the messages of a WebSocket "
                        "session can act like writes")
    if usage and ("models" in policy or "budget_tokens" in policy):
        raise Forbidden("this token is limited to some models or a token budget, which the "
                        "broker cannot check on a WebSocket session")


def path_for_policy(rest: str, swap: "CredentialSwap") -> str:
    """The decoded path that --allow-path prefixes match, with a token path segment removed
    (Telegram's ``/bot<T>/sendMessage`` is matched as ``/bot/sendMessage``)."""
    if swap.place.kind == "path":
        _, slash, tail = rest[len(swap.prefix):].partition("/")
        rest = swap.prefix + slash + tail
    return urllib.parse.unquote(rest)


ASYNC_JOB_SEGMENTS = frozenset({
    "batches", "file_batches", "fine_tuning",                 # OpenAI, Groq, Anthropic
    "batchGenerateContent", "asyncBatchEmbedContent", "predictLongRunning",   # Gemini
})


def check_budget_endpoint(path: str, body: Optional[bytes]) -> None:
    """Batch and background jobs report their usage later, in files or job objects the meter
    never reads: a token with a token budget may not start (or manage) them."""
    segments = set(re.split(r"[/:]", path))
    background = False
    if body and "responses" in segments and b'"background"' in body:
        try:
            background = json.loads(body).get("background") is True
        except (ValueError, AttributeError):
            background = True                 # unreadable: assume the worst
    if background or not ASYNC_JOB_SEGMENTS.isdisjoint(segments):
        raise Forbidden("this token has a token budget; batch and background jobs report their "
                        "usage where the broker cannot meter it, so they are refused")


def needs_admission(policy: Dict[str, Any]) -> bool:
    return any(k in policy for k in ("rate", "max_requests", "budget_tokens"))


_GEMINI_MODEL_RE = re.compile(r"/models/([^/:?]+)")


def header_params(value: str, header: str = "content-type") -> List[Tuple[str, str]]:
    """A MIME header's parameters as a standard MIME parser reads them (quoted strings,
    RFC 2231): [(main value, ""), (name, value), ...], names in lower case."""
    message = email.message.Message()
    message[header] = value
    return [(k.lower(), email.utils.collapse_rfc2231_value(v))
            for k, v in (message.get_params(header=header) or [])]


def multipart_field(body: bytes, content_type: str, field: str) -> Optional[str]:
    """The value of a form field in a multipart/form-data body (RFC 7578), read from part
    headers only (a file's content cannot fake it). None, so the caller refuses, unless the
    boundary parameter appears exactly once, the body is well formed up to its close
    delimiter and the field appears exactly once."""
    boundaries = [v for k, v in header_params(content_type)[1:] if k == "boundary"]
    if len(boundaries) != 1 or not 1 <= len(boundaries[0]) <= 70:
        return None
    delimiter = b"\r\n--" + boundaries[0].encode("latin-1", "replace")
    pieces = (b"\r\n" + body).split(delimiter)       # [preamble, part, part, ..., close]
    values = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):                   # the close delimiter: the epilogue
            return values[0].decode("utf-8", "replace") if len(values) == 1 else None
        padding, sep, part = piece.partition(b"\r\n")
        if not sep or padding.strip(b" \t"):
            return None
        head, sep, content = (b"\r\n" + part).partition(b"\r\n\r\n")
        if not sep:
            return None
        fields = [line.partition(b":") for line in head.split(b"\r\n")]
        dispositions = [value.decode("latin-1") for name, _, value in fields
                        if name.strip().lower() == b"content-disposition"]
        if len(dispositions) != 1:
            return None
        params = header_params(dispositions[0], "content-disposition")
        names = [v for k, v in params[1:] if k == "name"]
        if len(names) != 1:
            return None
        if names[0] == field and not any(k.startswith("filename") for k, _ in params[1:]):
            values.append(content)
    return None                                       # no close delimiter: cut or malformed


def _reject_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def request_model(provider: Provider, rest: str, body: Optional[bytes],
                  content_type: str = "") -> Optional[str]:
    """The model a request names: Gemini's path, the JSON body's ``model`` field (None if
    that key may repeat: parsers disagree on which one wins), or a multipart form's ``model``.
    A body that spells ``"model"`` more than once, or has any ``\\u`` escape (the only way to
    spell it differently), is parsed with every object checked for repeated keys; any other
    body takes the C parser's fast path."""
    if provider.usage == "gemini":
        match = _GEMINI_MODEL_RE.search(urllib.parse.unquote(rest))
        return match.group(1) if match else None
    if not body:
        return None
    if content_type.lower().startswith("multipart/form-data"):
        return multipart_field(body, content_type, "model")
    try:
        text = body.decode("utf-8-sig")
        careful = "\\u" in text or text.count('"model"') > 1
        value = json.loads(text, object_pairs_hook=_reject_duplicate_keys if careful
                           else None).get("model")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def note_request_model(ex: "Exchange", provider: Provider, rest: str, body: Optional[bytes],
                       content_type: str) -> None:
    ex.model = request_model(provider, rest, body, content_type)


def ask_for_stream_usage(body: bytes) -> bytes:
    """OpenAI streams report usage only if asked: add stream_options.include_usage. A body with
    a repeated key is refused: the broker and the upstream might read different "stream"
    values, and the budget could go unmetered."""
    try:
        obj = json.loads(body, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:
        if str(exc) == "duplicate key":
            raise Forbidden("this token has a token budget, and the request body repeats a key, "
                            "so the broker cannot tell whether it streams") from None
        return body
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return body
    options = obj.get("stream_options")
    if options is None:
        obj["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict) and options.get("include_usage") is not True:
        options["include_usage"] = True          # a budget cannot be dodged by saying false
    else:
        return body
    return json.dumps(obj).encode()


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_usage(kind: str, obj: Any, state: Dict[str, Any]) -> None:
    """Update ``state`` (model, tokens_in, tokens_out) from one JSON answer or stream event."""
    if not isinstance(obj, dict):
        return
    if kind == "openai":
        usage = obj.get("usage") or (obj.get("x_groq") or {}).get("usage") \
            or (obj.get("response") or {}).get("usage")
        model = obj.get("model") or (obj.get("response") or {}).get("model")
        if isinstance(usage, dict):
            tin = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
            tout = _int(usage.get("completion_tokens", usage.get("output_tokens")))
            state["tokens_in"] = tin if tin is not None else state.get("tokens_in")
            state["tokens_out"] = tout if tout is not None else state.get("tokens_out")
    elif kind == "anthropic":
        message = obj.get("message") if isinstance(obj.get("message"), dict) else obj
        model = message.get("model")
        usage = message.get("usage") or obj.get("usage")
        if isinstance(usage, dict):
            parts = [_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                                   "cache_read_input_tokens")]
            if any(p is not None for p in parts):
                state["tokens_in"] = sum(p or 0 for p in parts)
            tout = _int(usage.get("output_tokens"))
            if tout is not None:
                state["tokens_out"] = tout
    elif kind == "gemini":
        model = obj.get("modelVersion")
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            tin = _int(usage.get("promptTokenCount"))
            outs = [_int(usage.get(k)) for k in ("candidatesTokenCount", "thoughtsTokenCount")]
            if tin is not None:
                state["tokens_in"] = tin
            if any(o is not None for o in outs):
                state["tokens_out"] = sum(o or 0 for o in outs)
    else:
        return
    if isinstance(model, str) and model:
        state.setdefault("model", model)


class UsageMeter:
    """Reads token usage from an answer as it streams past: the JSON body of a plain answer,
    or the ``data:`` lines of server-sent events (only lines that mention usage are parsed).
    Other content types (files, audio) are not looked at."""

    def __init__(self, kind: str, content_type: str) -> None:
        media = content_type.split(";")[0].strip().lower()
        self.kind = kind
        self.sse = media == "text/event-stream"
        self.active = self.sse or media in ("", "application/json") or media.endswith("+json")
        self.state: Dict[str, Any] = {}
        self._parts: List[bytes] = []
        self._size = 0
        self._line = b""
        self._overflow = False
        self._tail_only = False

    def feed(self, data: bytes) -> None:
        if self._overflow or not self.active:
            return
        if not self.sse:
            self._size += len(data)
            self._parts.append(data)
            if self._size > MAX_USAGE_BODY:         # keep only the tail, where usage sits
                tail = b"".join(self._parts)[-USAGE_TAIL_BYTES:]
                self._parts, self._size, self._tail_only = [tail], len(tail), True
            return
        if b"\n" not in data:
            self._line += data
            if len(self._line) > MAX_USAGE_BODY:
                self._overflow, self._line = True, b""
            return
        *lines, tail = (self._line + data).split(b"\n")
        self._line = tail
        for line in lines:
            if line.startswith(b"data:") and b"sage" in line:
                self._parse(line[5:])

    def _parse(self, text: bytes) -> None:
        try:
            answer = json.loads(text)
        except ValueError:
            return
        for item in answer if isinstance(answer, list) else [answer]:   # Gemini JSON streams
            read_usage(self.kind, item, self.state)

    def _parse_tail(self, tail: bytes) -> None:
        """A body too big to keep whole: read the last usage object in its tail."""
        decoder = json.JSONDecoder()
        text = tail.decode("utf-8", "replace")
        for name in ("usage", "usageMetadata"):
            at = text.rfind(f'"{name}"')
            start = text.find("{", at) if at != -1 else -1
            if start == -1:
                continue
            try:
                value, _ = decoder.raw_decode(text, start)
            except ValueError:
                continue
            read_usage(self.kind, {name: value}, self.state)

    def finish(self) -> Dict[str, Any]:
        if not self._overflow and self.active:
            if self.sse:
                if self._line.startswith(b"data:"):
                    self._parse(self._line[5:])
            elif self._tail_only:
                self._parse_tail(b"".join(self._parts))
            elif self._parts:
                self._parse(b"".join(self._parts))
        self._parts, self._line = [], b""
        return self.state


# ============================================================================================
# 6. FORWARDING
# ============================================================================================

_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


_FORBIDDEN_TARGET_RE = re.compile(r"[^\x21-\x7e]|[\\#]")
_FORBIDDEN_DECODED_RE = re.compile(r"[\x00-\x1f\x7f\\]")


def _check_chars(text: str, what: str) -> None:
    """Raw request-target text: printable ASCII only, no backslash, no fragment."""
    if _FORBIDDEN_TARGET_RE.search(text):
        raise BadRequest(f"{what} contains a forbidden character")


_VALID_PATHS: Dict[str, bool] = {}    # paths already accepted (never ones holding a token)


def validate_path(rest: str, remember: bool = True) -> str:
    """Accept a provider path only if no decoding of it can climb out or name another host.

    The raw path must be printable ASCII starting with one '/', with no '//', backslash,
    '#', malformed percent escape or '.'/'..' segment (also before a ';': Tomcat and Spring
    read '..;x' as '..'). Then it is percent-decoded again and again (double encoding, up to
    3 levels): no level may hold a dot segment, a backslash, a control character, invalid
    (e.g. overlong) UTF-8 or a leading '//'. Spaces, '%',
    '@', ':' and non-ASCII letters stay legal once decoded (file names, emoji reactions):
    the host never comes from this string.

    Accepted paths are remembered (a dict lookup next time), unless ``remember`` is False
    (a path that may carry the real key) or the path holds a token (``seks_``).
    """
    if rest in _VALID_PATHS:
        return rest
    _validate_path(rest)
    if remember and "seks_" not in rest and len(rest) <= 512:
        if len(_VALID_PATHS) >= 4096:
            _VALID_PATHS.clear()
        _VALID_PATHS[rest] = True
    return rest


def _validate_path(rest: str) -> None:
    if not rest.startswith("/"):
        raise BadRequest("path must start with '/'")
    _check_chars(rest, "path")
    if "//" in rest:
        raise BadRequest("empty path segment ('//') is not allowed")
    if re.search(r"%(?![0-9A-Fa-f]{2})", rest):
        raise BadRequest("malformed percent escape in path")
    layer = rest
    for depth in range(4):
        forms = [layer]
        if not layer.isascii():                  # servers that NFKC-fold see '．．' as '..'
            forms.append(unicodedata.normalize("NFKC", layer))
        for form in forms:
            if any(seg.split(";", 1)[0] in (".", "..") for seg in form.split("/")):
                raise BadRequest("dot segments are not allowed in paths")   # '..;x' too
            if depth and (form.startswith("//") or _FORBIDDEN_DECODED_RE.search(form)):
                raise BadRequest("path decodes to a forbidden character")
        if not _PCT_RE.search(layer):
            return
        try:
            layer = urllib.parse.unquote_to_bytes(layer).decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise BadRequest("path escapes are not valid UTF-8") from None
    raise BadRequest("path is encoded too many times")


def validate_query(query: str) -> str:
    if query:
        _check_chars(query, "query")      # printable ASCII only
    return query


def build_upstream_url(provider: Provider, rest: str, query: str,
                       key_in_path: bool = True) -> str:
    """The one place an upstream URL is made: configured origin + base path + validated path.

    Only ``rest`` and ``query`` come from the agent, both validated, and ``rest`` always starts
    with a single '/', so nothing in them can be read as an authority. A path that may hold
    the real key (``key_in_path``, Telegram's) is validated but never remembered.
    """
    validate_path(rest, remember=not key_in_path)
    validate_query(query)
    target = provider.base_path + rest + ("?" + query if query else "")
    return provider.origin + target


class CredentialSwap:
    """Where an agent's token was found in a request, and how to put the real key there."""

    __slots__ = ("token", "place", "prefix")

    def __init__(self, token: str, place: CredentialPlace, prefix: str) -> None:
        self.token = token
        self.place = place
        self.prefix = prefix      # the header scheme word or path prefix actually used


def find_token(provider: Provider, headers: List[Tuple[str, str]], rest: str,
               query: str) -> Optional[CredentialSwap]:
    """Look for the agent's token in the provider's token places, in their listed order."""
    for place in provider.token_places:
        if place.kind == "header":
            for name, value in headers:
                if name.lower() != place.name:
                    continue
                value = value.strip()
                if not place.prefixes:
                    return CredentialSwap(value, place, "")
                word, _, tail = value.partition(" ")
                for prefix in place.prefixes:
                    if word.lower() == prefix.lower() and tail.strip():
                        return CredentialSwap(tail.strip(), place, prefix)
        elif place.kind == "query":
            for part in query.split("&") if query else ():
                name, _, value = part.partition("=")
                if urllib.parse.unquote_plus(name) == place.name:
                    return CredentialSwap(urllib.parse.unquote_plus(value), place, "")
        else:
            for prefix in place.prefixes:
                if rest.startswith(prefix) and len(rest) > len(prefix):
                    segment = rest[len(prefix):].split("/", 1)[0]
                    if segment:
                        return CredentialSwap(urllib.parse.unquote(segment), place, prefix)
    return None


def swap_credentials(provider: Provider, swap: CredentialSwap, key: str,
                     headers: List[Tuple[str, str]], rest: str,
                     query: str) -> Tuple[List[Tuple[str, str]], str, str]:
    """Remove every credential place of the provider from the request and inject the key."""
    header_places = {p.name for p in provider.token_places if p.kind == "header"}
    query_places = {p.name for p in provider.token_places if p.kind == "query"}
    if provider.inject is not None and provider.inject.kind == "header":
        header_places.add(provider.inject.name)
    if provider.inject is not None and provider.inject.kind == "query":
        query_places.add(provider.inject.name)   # the agent's own value never rides along
    headers = [(n, v) for n, v in headers if n.lower() not in header_places]
    inject = provider.inject or swap.place
    kept: List[str] = []
    injected_query = False
    for part in query.split("&") if query else ():
        name = urllib.parse.unquote_plus(part.partition("=")[0])
        if name in query_places:
            if inject.kind == "query" and name == inject.name and not injected_query:
                kept.append(f"{inject.name}={urllib.parse.quote(key, safe='')}")
                injected_query = True
            continue
        kept.append(part)
    if inject.kind == "query" and not injected_query:
        kept.append(f"{inject.name}={urllib.parse.quote(key, safe='')}")
    if inject.kind == "header":
        prefix = swap.prefix if inject is swap.place and swap.prefix else (
            inject.prefixes[0] if inject.prefixes else "")
        headers.append((inject.name, f"{prefix} {key}" if prefix else key))
    elif inject.kind == "path":
        tail = rest[len(swap.prefix):].split("/", 1)
        rest = swap.prefix + urllib.parse.quote(key, safe=":") + ("/" + tail[1] if len(tail) > 1 else "")
    return headers, rest, "&".join(kept)


KNOWN_CODINGS = ("br", "zstd", "compress", "x-compress", "gzip", "x-gzip", "deflate", "exi",
                 "pack200-gzip", "aes128gcm")


def known_coding(codings: List[str]) -> str:
    """A content coding as a broker-made message may name it: a word from a fixed list, never
    the upstream's own text (which could carry a key, and is lower-cased past the scrubber)."""
    for coding in codings:
        if coding in KNOWN_CODINGS and coding not in ("gzip", "x-gzip", "deflate"):
            return coding
    return "of an unknown kind"


def mask_secret(secret: bytes) -> bytes:
    """A same-length stand-in for a real key, so Content-Length stays right when scrubbing."""
    label = b"[REDACTED-BY-SEKS]"
    return label[:len(secret)] + b"*" * max(0, len(secret) - len(label))


MAX_INFLATE = 16 * 1024 * 1024     # bytes one read of a compressed answer may inflate to


class Inflater:
    """A gzip or zlib body from an upstream that compressed though asked not to, inflated so it
    can be scrubbed: member after member, as the gzip module reads them. A corrupt or
    truncated stream raises UpstreamFraming (the answer is cut, never passed on half-read),
    and so does one read that would inflate past MAX_INFLATE (a decompression bomb)."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)   # gzip or zlib framing
        self._fed = False

    def decompress(self, data: bytes) -> bytes:
        self._fed = self._fed or bool(data)
        out = []
        room = MAX_INFLATE
        try:
            while True:
                out.append(self._inflate.decompress(data, room))
                room -= len(out[-1])
                if self._inflate.unconsumed_tail or room <= 0:
                    raise UpstreamFraming("upstream compressed body inflates too far")
                if not (self._inflate.eof and self._inflate.unused_data):
                    return b"".join(out)
                data = self._inflate.unused_data            # the next member
                self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)
        except zlib.error:
            raise UpstreamFraming("upstream sent a corrupt compressed body") from None

    def finish(self) -> bytes:
        try:
            tail = self._inflate.flush()
        except zlib.error:
            raise UpstreamFraming("upstream sent a corrupt compressed body") from None
        if self._fed and not self._inflate.eof:   # (an empty body labelled gzip is just empty)
            raise UpstreamFraming("upstream compressed body ended early")
        return tail


class Scrubber:
    """Replaces real keys in a byte stream, holding back at most len(key)-1 bytes.

    ``feed`` returns what is safe to send now; ``flush`` returns the held-back tail at the end.
    A key split across chunks is still caught, and nothing is buffered beyond a possible
    partial match, so server-sent events still flow one by one.
    """

    def __init__(self, secrets_: Iterable[bytes]) -> None:
        self._pairs = scrub_pairs(tuple(secrets_))
        self._held = b""

    @classmethod
    def for_key(cls, key: str) -> "Scrubber":
        return cls(secret_variants(key))

    @classmethod
    def from_pairs(cls, pairs: Tuple[Tuple[bytes, bytes], ...]) -> "Scrubber":
        scrubber = cls(())
        scrubber._pairs = pairs
        return scrubber

    def scrub(self, data: bytes) -> bytes:
        for secret, mask in self._pairs:
            if secret in data:
                data = data.replace(secret, mask)
        return data

    def feed(self, data: bytes) -> bytes:
        if not self._pairs:
            return data
        buf = self._held + data if self._held else data
        buf = self.scrub(buf)
        hold = 0
        for secret, _ in self._pairs:
            start = max(0, len(buf) - len(secret) + 1)
            first = secret[:1]
            i = buf.find(first, start)
            while i != -1:
                if secret.startswith(buf[i:]):
                    hold = max(hold, len(buf) - i)
                    break
                i = buf.find(first, i + 1)
        self._held = buf[len(buf) - hold:] if hold else b""
        return buf[:len(buf) - hold] if hold else buf

    def pass_through(self, buf: bytearray, n: int) -> Optional[Tuple[bytes, int]]:
        """``feed`` without copying, for bulk bytes read into ``buf[:n]``: (the bytes held from
        before, to send first; how many bytes of ``buf`` may follow them). None when a key, or
        one that may span the boundary, is there: then the caller takes ``feed``'s path."""
        pairs = self._pairs
        if not pairs:
            return b"", n
        held = self._held
        if held:
            longest = len(pairs[0][0])
            if n < longest:
                return None
            edge = held + bytes(buf[:longest - 1])
            if any(secret in edge for secret, _ in pairs):
                return None
        if any(buf.find(secret, 0, n) != -1 for secret, _ in pairs):
            return None
        hold = 0
        for secret, _ in pairs:
            first = secret[:1]
            i = buf.find(first, max(0, n - len(secret) + 1), n)
            while i != -1:
                if secret.startswith(bytes(buf[i:n])):
                    hold = max(hold, n - i)
                    break
                i = buf.find(first, i + 1, n)
        self._held = bytes(buf[n - hold:n]) if hold else b""
        return held, n - hold

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def scrub_pairs(secrets_: Tuple[bytes, ...]) -> Tuple[Tuple[bytes, bytes], ...]:
    """(secret, same-length mask) pairs, longest first (the token cache keeps them with the
    key they come from, and drops both together)."""
    return tuple((s, mask_secret(s)) for s in sorted(set(secrets_), key=len, reverse=True) if s)


def secret_variants(key: str) -> Tuple[bytes, ...]:
    """The forms in which an upstream might echo a key: raw, JSON with '/' escaped as '\\/'
    (PHP's default), and percent-encoded the ways URL libraries do it (every reserved
    character or only some, upper or lower-case hex, '+' for spaces)."""
    variants = {key.encode("utf-8"), key.replace("/", "\\/").encode("utf-8")}
    for safe in ("", "/", ":", "/:", "-._~"):
        quoted = urllib.parse.quote(key, safe=safe)
        variants.add(quoted.encode())
        variants.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quoted).encode())
    variants.add(urllib.parse.quote_plus(key).encode())
    return tuple(sorted(variants, key=len, reverse=True))


PoolKey = Tuple[str, str, int, bool]      # scheme, host, port, verify TLS
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # safe to resend


MAX_UPSTREAM_HEAD = 64 * 1024          # status line and headers of an upstream answer -> 502
_STATUS_LINE_RE = re.compile(rb"^HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?\Z")


class UpstreamFraming(http.client.HTTPException):
    """An upstream answer that is malformed or ends before its framing says it does."""


class UpstreamReply:
    """An upstream answer, read from the pooled connection's socket with a buffer of its own
    (the connections' ``response_class``; used in place of ``http.client.HTTPResponse``).

    The head is parsed strictly and without ``email.parser``; the reason phrase is dropped (it
    may quote a key; the broker sends the standard one); obsolete line folding is refused (as
    RFC 9112 allows a gateway: a folded line could smuggle a bare LF or split a key). The body
    is framed by RFC 9112 section 6.3: none for HEAD, 204 and 304; chunked when a
    Transfer-Encoding header is there and its coding is exactly chunked (any other, or an empty
    one, is refused: a body the scrubber could not read; a Content-Length beside it is ignored
    and the connection is not reused, nor after an HTTP/1.0 answer that used one); else
    Content-Length (several must agree); else until the upstream closes. Interim answers (100,
    102, 103) are skipped. Reads return what is available, never waiting to fill.
    """

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: Optional[str] = None,
                 url: Optional[str] = None) -> None:
        self._sock = sock
        self._ref: Any = None     # a socket file, held once http.client may close the socket
        self._buf = b""
        self._method = method
        self.status = 0
        self.headers: List[Tuple[str, str]] = []
        self.will_close = True
        self.chunked = False
        self._left = 0            # body bytes (Content-Length) or chunk bytes still to read
        self._until_close = False
        self._done = False

    # --- reading the socket ----------------------------------------------------------------
    def _more(self, size: int = 65536) -> None:
        data = self._sock.recv(size)
        if not data:
            raise UpstreamFraming("upstream closed the connection mid-answer")
        self._buf += data

    def _line(self, limit: int) -> bytes:
        """One CRLF-terminated line (without it) from the buffer, reading as needed."""
        while True:
            end = self._buf.find(b"\r\n")
            if end != -1:
                line, self._buf = self._buf[:end], self._buf[end + 2:]
                return line
            if len(self._buf) > limit:
                raise UpstreamFraming("upstream sent an over-long line")
            self._more()

    # --- the head --------------------------------------------------------------------------
    def begin(self) -> None:
        for _ in range(16):                         # interim answers, then the final one
            while True:
                end = self._buf.find(b"\r\n\r\n")
                if end != -1:
                    break
                if len(self._buf) > MAX_UPSTREAM_HEAD:
                    raise UpstreamFraming("upstream answer head too large")
                data = self._sock.recv(65536)
                if not data:
                    if not self._buf:
                        raise http.client.RemoteDisconnected("upstream closed the connection "
                                                             "without answering")
                    raise UpstreamFraming("upstream closed the connection mid-head")
                self._buf += data
            head, self._buf = self._buf[:end], self._buf[end + 4:]
            if end > MAX_UPSTREAM_HEAD:
                raise UpstreamFraming("upstream answer head too large")
            lines = head.split(b"\r\n")
            match = _STATUS_LINE_RE.match(lines[0])
            if match is None:
                raise UpstreamFraming("upstream sent a malformed status line")
            status = int(match.group(2))
            if status in (100, 102, 103):
                continue
            self.status = status
            self.headers = self._parse_headers(lines[1:])
            self._frame(match.group(1) == b"1")
            self._framed()
            return
        raise UpstreamFraming("upstream sent too many interim answers")

    @staticmethod
    def _parse_headers(lines: List[bytes]) -> List[Tuple[str, str]]:
        if len(lines) > MAX_HEADER_COUNT:
            raise UpstreamFraming("upstream sent too many header fields")
        headers: List[Tuple[str, str]] = []
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                raise UpstreamFraming("upstream sent an obsolete folded header line")
            name, sep, value = line.partition(b":")
            if not sep or not HEADER_NAME_RE.match(name):
                raise UpstreamFraming("upstream sent a malformed header line")
            value = value.strip(b" \t")
            if _BAD_VALUE_BYTES_RE.search(value):
                raise UpstreamFraming("upstream header value contains a control character")
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        return headers

    def _frame(self, http11: bool) -> None:
        codings: Optional[List[str]] = None
        lengths: List[str] = []
        for name, value in self.headers:
            lower = name.lower()
            if lower == "transfer-encoding":
                codings = (codings or []) + [c.strip().lower() for c in value.split(",")]
            elif lower == "content-length":
                lengths += [v.strip() for v in value.split(",")]
        connection = connection_tokens(self.headers)
        self.will_close = "close" in connection or (not http11 and "keep-alive" not in connection)
        if (self._method == "HEAD" or self.status in (204, 304)):
            self._done = True
            return
        if codings is not None:
            if codings != ["chunked"]:
                raise UpstreamFraming("upstream used a transfer coding other than chunked")
            self.chunked = True
            self._left = -1                         # no chunk started yet
            if lengths or not http11:
                self.will_close = True              # faulty or ambiguous framing: never reuse
            return
        if lengths:
            if len(set(lengths)) != 1 or not _CONTENT_LENGTH_RE.match(lengths[0]):
                raise UpstreamFraming("upstream sent an invalid Content-Length")
            self._left = int(lengths[0])
            self._done = self._left == 0
            return
        self._until_close = True
        self.will_close = True

    def _framed(self) -> None:
        if self.will_close:                         # http.client closes the socket now: keep
            self._ref = self._sock.makefile("rb", buffering=0)   # it open until we are done
        if self._done and self._buf:
            self.will_close = True                  # bytes beyond the answer: never reuse

    # --- the body --------------------------------------------------------------------------
    def read1(self, size: int = STREAM_CHUNK) -> bytes:
        """Up to ``size`` body bytes: what is buffered or arrives in one receive; b"" at end."""
        if self._done:
            return b""
        if self.chunked:
            return self._read1_chunked(size)
        if not self._until_close:
            size = min(size, self._left)
        if self._buf:
            data, self._buf = self._buf[:size], self._buf[size:]
        else:
            data = self._sock.recv(size)
            if not data:
                if self._until_close:
                    self._done = True
                    return b""
                raise UpstreamFraming("upstream answer shorter than its Content-Length")
        if not self._until_close:
            self._left -= len(data)
            if self._left == 0:
                self._finished()
        return data

    def readinto1(self, view: memoryview) -> int:
        """``read1`` into ``view`` (bulk bodies: no new buffer per read)."""
        if self.chunked or self._buf or self._done:
            data = self.read1(len(view))
            view[:len(data)] = data
            return len(data)
        size = len(view) if self._until_close else min(len(view), self._left)
        n = self._sock.recv_into(view, size)
        if not n:
            if self._until_close:
                self._done = True
                return 0
            raise UpstreamFraming("upstream answer shorter than its Content-Length")
        if not self._until_close:
            self._left -= n
            if self._left == 0:
                self._finished()
        return n

    def _read1_chunked(self, size: int) -> bytes:
        if self._left <= 0:
            if self._left == 0:                     # end of the previous chunk's data
                if self._line(2):
                    raise UpstreamFraming("upstream chunk data not followed by CRLF")
            line = self._line(MAX_CHUNK_LINE)
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE_RE.match(size_text):
                raise UpstreamFraming("upstream sent a malformed chunk size")
            self._left = int(size_text, 16)
            if self._left == 0:
                trailers = 0
                while self._line(MAX_HEADER_BYTES):
                    trailers += 1
                    if trailers > MAX_HEADER_COUNT:
                        raise UpstreamFraming("upstream sent too many trailer fields")
                self._finished()
                return b""
        if not self._buf:
            self._more(max(4096, min(size, self._left + 2)))
        data, self._buf = self._buf[:min(size, self._left)], self._buf[min(size, self._left):]
        self._left -= len(data)
        return data

    def read(self) -> bytes:
        parts = []
        while True:
            data = self.read1(STREAM_CHUNK)
            if not data:
                return b"".join(parts)
            parts.append(data)

    def _finished(self) -> None:
        self._done = True
        if self._buf:
            self.will_close = True                  # bytes beyond the answer: never reuse

    def isclosed(self) -> bool:
        return self._done

    def buffered(self) -> bool:
        """Whether the next ``read1`` can answer from the buffer, without waiting on the
        socket (then the broker sends the answer's head together with these first bytes)."""
        buf = self._buf
        if self._done or not buf:
            return False
        if not self.chunked or self._left > 0:
            return True
        pos = 0
        if self._left == 0:                          # CRLF after the previous chunk first
            if not buf.startswith(b"\r\n"):
                return False
            pos = 2
        end = buf.find(b"\r\n", pos)
        return end != -1 and end + 2 < len(buf)

    def take_buffered(self) -> bytes:
        """Bytes read past the head of a 101 answer: the first WebSocket frames."""
        data, self._buf = self._buf, b""
        return data

    def close(self) -> None:
        self._done = True
        ref, self._ref = self._ref, None
        if ref is not None:
            ref.close()


class UpstreamResponse:
    """An upstream answer being relayed; returns its connection to the pool only when the body
    was read to the end and the upstream did not ask to close."""

    def __init__(self, pool: Optional["UpstreamPool"], pool_key: Optional[PoolKey],
                 conn: Any, resp: UpstreamReply) -> None:
        self._pool = pool
        self._pool_key = pool_key
        self._conn: Optional[http.client.HTTPConnection] = conn
        self._resp = resp
        self.status = resp.status
        self.headers: List[Tuple[str, str]] = resp.headers

    def read1(self, size: int) -> bytes:
        return self._resp.read1(size)

    def buffered(self) -> bool:
        return self._resp.buffered()

    def readinto1(self, view: memoryview) -> int:
        return self._resp.readinto1(view)

    def isclosed(self) -> bool:
        return self._resp.isclosed()

    def read(self) -> bytes:
        return self._resp.read()

    def finish(self, complete: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if complete and not self._resp.will_close:
            try:
                self._resp.read()          # zero bytes left: marks the response closed
            except Exception:
                complete = False
        if (complete and self._resp.isclosed() and not self._resp.will_close
                and self._pool is not None):
            self._pool.put(self._pool_key, conn)
        else:
            self._resp.close()
            conn.close()


class _CoalescingSend:
    """Send a small request body in the same write as the request head: one packet, one
    wake-up of the upstream (http.client sends them separately). Uses http.client's
    ``_buffer``/``_send_output``, stable from Python 3.9 to 3.13."""

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if isinstance(message_body, bytes) and len(message_body) <= INLINE_BODY_MAX:
            self._buffer.extend((b"", b""))                       # type: ignore[attr-defined]
            data = b"\r\n".join(self._buffer) + message_body     # type: ignore[attr-defined]
            del self._buffer[:]                                    # type: ignore[attr-defined]
            self.send(data)                                        # type: ignore[attr-defined]
            return
        super()._send_output(message_body, encode_chunked)        # type: ignore[misc]


class UpstreamHTTPConnection(_CoalescingSend, http.client.HTTPConnection):
    response_class = UpstreamReply       # type: ignore[assignment]


class UpstreamHTTPSConnection(_CoalescingSend, http.client.HTTPSConnection):
    response_class = UpstreamReply       # type: ignore[assignment]


class UpstreamPool:
    """Keep-alive connections per (scheme, host, port), shared by all handler threads.

    A connection goes back only after a complete, cleanly framed answer; one that the upstream
    closed while idle is noticed (readable socket) and dropped before reuse.
    """

    def __init__(self, ssl_context: ssl.SSLContext, connect_timeout: float,
                 read_timeout: float, insecure_context: Optional[ssl.SSLContext] = None) -> None:
        self.ssl_context = ssl_context
        self.insecure_context = insecure_context
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: Dict[PoolKey, List[Tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()
        self.opened = 0

    def get(self, key: PoolKey) -> Tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                item = idle.pop() if idle else None
            if item is None:
                break
            since, conn = item
            sock = conn.sock
            if sock is None or now - since > POOL_IDLE_SECONDS or _peer_closed(sock):
                conn.close()
                continue
            return conn, True
        scheme, host, port, verify = key
        if scheme == "https":
            context = self.ssl_context if verify else self.insecure_context
            conn: http.client.HTTPConnection = UpstreamHTTPSConnection(
                host, port, timeout=self.connect_timeout, context=context)
        else:
            conn = UpstreamHTTPConnection(host, port, timeout=self.connect_timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.opened += 1
        return conn, False

    def put(self, key: PoolKey, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < POOL_IDLE_PER_HOST:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for _, conn in idle:
                conn.close()


def _peer_closed(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or spoken on) by the peer."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class PooledHTTPHandler(urllib.request.BaseHandler):
    """urllib handler that sends requests over the broker's pooled keep-alive connections.

    Installed in an opener without the redirect and error processors: a 3xx or 4xx/5xx is a
    normal answer to relay, and a redirect is never followed with the real key.
    """

    handler_order = 100

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def http_open(self, req: urllib.request.Request) -> UpstreamResponse:
        return self._open(req, "http")

    def https_open(self, req: urllib.request.Request) -> UpstreamResponse:
        return self._open(req, "https")

    def _open(self, req: urllib.request.Request, scheme: str) -> UpstreamResponse:
        key = (scheme, req.seks_host, req.seks_port, req.seks_verify)  # type: ignore[attr-defined]
        head = header_block(req.seks_headers)                           # type: ignore[attr-defined]
        body = req.data
        chunked = body is not None and not isinstance(body, bytes) and not any(
            n.lower() == "content-length" for n, _ in req.seks_headers)  # type: ignore[attr-defined]
        method = req.get_method()
        if chunked:
            head += b"\r\nTransfer-Encoding: chunked"
        elif body is None and method in ("POST", "PUT", "PATCH"):
            head += b"\r\nContent-Length: 0"     # as http.client does: some servers want it
        replayable = method in IDEMPOTENT_METHODS and (body is None or isinstance(body, bytes))
        for attempt in (0, 1):
            conn, reused = self.pool.get(key)
            try:
                conn.putrequest(method, req.selector, skip_host=True, skip_accept_encoding=True)
                conn._buffer.append(head)                       # type: ignore[attr-defined]
                conn.endheaders(body, encode_chunked=chunked)
                if attempt == 0 and req.seks_while_waiting is not None:  # type: ignore[attr-defined]
                    req.seks_while_waiting()                             # type: ignore[attr-defined]
                resp: Any = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if reused and replayable and attempt == 0:
                    continue             # the idle connection died under us: one fresh try
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self.pool, key, conn, resp)
        raise AssertionError("unreachable")  # pragma: no cover


_HEADER_NAMES_RE = re.compile(rb"^[%s]+(?::[%s]+)*\Z" % (TOKEN_CHARS, TOKEN_CHARS))


def header_block(headers: List[Tuple[str, str]],
                 refusal: str = "a request header cannot be sent upstream") -> bytes:
    """Header lines (CRLF-separated, no final CRLF), checked as a whole in one pass: token
    names, no control character or line break in any value (the same checks as on the agent's
    request), latin-1 only. Builds the upstream request's head (in place of http.client's
    per-header checks) and every answer head the agent gets (a last guard: nothing the
    upstream sent can split the agent's answer)."""
    if not headers:
        return b""
    try:
        names = ":".join(n for n, _ in headers).encode("latin-1")
        values = "\t".join(v for _, v in headers).encode("latin-1")
    except UnicodeEncodeError:
        raise UpstreamError(refusal) from None
    if not _HEADER_NAMES_RE.match(names) or _BAD_VALUE_BYTES_RE.search(values):
        raise UpstreamError(refusal)
    return "\r\n".join(f"{n}: {v}" for n, v in headers).encode("latin-1")


def answer_headers(headers: List[Tuple[str, str]], drop: Iterable[str], scrubber: "Scrubber",
                   location: Optional[Callable[[str], str]] = None) -> List[Tuple[str, str]]:
    """An upstream answer's headers as the agent may see them: hop-by-hop ones and ``drop``
    removed, ``location`` applied to a Location value, every value scrubbed. A header *name*
    that holds a key cannot be masked (the mask is not a legal name): that answer is a 502."""
    passed = response_headers(headers, drop)
    names = "\n".join(n for n, _ in passed).encode("latin-1", "replace")
    if scrubber.scrub(names) != names:
        raise UpstreamError("upstream answered with a header name that holds the key")
    out = []
    for name, value in passed:
        if location is not None and name.lower() == "location":
            value = location(value)
        out.append((name, scrubber.scrub(value.encode("latin-1", "replace")).decode("latin-1")))
    return out


def make_opener(pool: UpstreamPool) -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    opener.add_handler(PooledHTTPHandler(pool))
    return opener


def connection_tokens(headers: List[Tuple[str, str]]) -> set:
    """The lower-case tokens of every Connection header (``close``, ``upgrade``, header names
    that are hop-by-hop for this message)."""
    return {t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")}


def forward_request_headers(headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Client headers minus hop-by-hop ones (and those named in Connection) and the few the
    broker sets itself; duplicates are joined with ', ' (urllib keeps one value per name)."""
    named = connection_tokens(headers)
    merged: Dict[str, Tuple[str, str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower in REQUEST_HEADERS_REPLACED:
            continue
        if lower in merged:
            merged[lower] = (merged[lower][0], merged[lower][1] + ", " + value)
        else:
            merged[lower] = (name, value)
    return list(merged.values())


def rewrite_location(value: str, provider: Provider, route_prefix: str) -> str:
    """Point a redirect into the upstream back at the broker route; leave other targets alone."""
    if value.startswith("/") and not value.startswith("//"):
        path = value
    else:
        try:
            parts = urllib.parse.urlsplit(value)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return value
        if (parts.scheme, (parts.hostname or "").lower(), port) != (
                provider.scheme, provider.host.lower(), provider.port):
            return value
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
    base = provider.base_path
    if base:
        if not (path == base or path.startswith(base + "/") or path.startswith(base + "?")):
            return value
        path = path[len(base):] or "/"
    return route_prefix + path


def response_headers(headers: List[Tuple[str, str]], drop: Iterable[str]) -> List[Tuple[str, str]]:
    """Upstream answer headers minus hop-by-hop ones, those named in Connection, and ``drop``."""
    named = connection_tokens(headers)
    dropped = HOP_BY_HOP | named | set(drop)
    return [(n, v) for n, v in headers if n.lower() not in dropped]


_TOKEN_TEXT_RE = re.compile(r"(seks_[a-z0-9-]{1,32}_)([A-Za-z0-9_-]{4})[A-Za-z0-9_-]*")


def redact_path(path: str) -> str:
    """A request path as it may be logged before it is validated: redacted as it came, unless
    percent-decoding it (up to three levels, as validate_path reads them) shows a token
    ('%73eks_...'): then the decoded form, cut like a plain token, with any space or other
    invisible character escaped again (so a path cannot spell extra log fields)."""
    decoded = path
    for _ in range(3):
        if "%" not in decoded:
            break
        decoded = urllib.parse.unquote(decoded, errors="replace")
    if "seks_" not in decoded or decoded == path:
        return redact(path)
    return "".join(c if c.isprintable() and not c.isspace() else urllib.parse.quote(c)
                   for c in redact(decoded))


def redact(text: str) -> str:
    """Make any text safe to log: tokens cut to a short prefix, control characters escaped."""
    if "seks_" not in text and text.isascii() and text.isprintable():
        return text
    text = _TOKEN_TEXT_RE.sub(r"\1\2…", text)
    return text.encode("unicode_escape", "backslashreplace").decode("ascii").replace("\\u2026", "…")


def masked_request_path(provider: Optional[Provider], path: str, query: str) -> str:
    """The agent-side path as it may be logged: Telegram key segment and credential query
    parameters replaced by '***'."""
    if provider is not None:
        for place in provider.token_places:
            if place.kind == "path":
                for prefix in place.prefixes:
                    idx = path.find(prefix)
                    if idx != -1 and idx + len(prefix) < len(path):
                        head, seg_tail = path[:idx + len(prefix)], path[idx + len(prefix):]
                        seg, slash, tail = seg_tail.partition("/")
                        path = head + "***" + slash + tail
                        break
    if query:
        secret_params = {"key", "token", "api_key", "apikey", "access_token", "auth"}
        if provider is not None:
            secret_params |= {p.name for p in provider.token_places if p.kind == "query"}
        parts = []
        for part in query.split("&"):
            name, eq, _ = part.partition("=")
            parts.append(f"{name}=***" if eq and urllib.parse.unquote_plus(name).lower()
                         in secret_params else part)
        path += "?" + "&".join(parts)
    return redact(path)


# --------------------------------------------------------------------------------------------
# 6b. FORWARDING: WEBSOCKETS (RFC 6455 relay; Discord gateway token swap)
# --------------------------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_MAX_MESSAGE = 16 * 1024 * 1024     # largest message either way -> close 1009
WS_IDLE_TIMEOUT_S = 600.0             # no frame either way for this long -> close 1001
WS_POLL_S = 5.0                       # how often a quiet reader checks idle and shutdown
WS_IDENTIFY_TIMEOUT_S = 60.0          # a gateway client must IDENTIFY/RESUME within this
WS_MAX_HANDSHAKE = 64 * 1024          # upstream handshake answer head
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_DROP_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-accept", "sec-websocket-version",
                             "sec-websocket-extensions", "origin"})


class WsClose(Exception):
    """End the session: send this close code and reason to the side(s) still open."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()


def ws_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR a payload with a 4-byte mask (masking and unmasking are the same operation)."""
    if not payload:
        return payload
    n = len(payload)
    stream = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def ws_frame(opcode: int, payload: bytes, masked: bool, fin: bool = True) -> bytes:
    """Encode one frame; frames the broker sends upstream are masked, to agents unmasked."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if masked:
        mask = os.urandom(4)
        return head + mask + ws_mask(payload, mask)
    return head + payload


def ws_close_payload(code: int, reason: str) -> bytes:
    return code.to_bytes(2, "big") + reason.encode("utf-8")[:120]


class SockReader:
    """Exact reads from a raw socket with a poll timeout (a buffered file object cannot be
    read again after a timeout; this can)."""

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(pending)

    def read_exact(self, n: int, idle: Callable[[], None]) -> bytes:
        while len(self.buf) < n:
            try:
                data = self.sock.recv(max(65536, n - len(self.buf)))
            except socket.timeout:
                idle()
                continue
            if not data:
                raise ConnectionResetError("peer closed")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self, limit: int) -> bytes:
        """Bytes up to and including the blank line that ends an HTTP head."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > limit:
                raise UpstreamError("upstream handshake answer too large")
            data = self.sock.recv(65536)
            if not data:
                raise UpstreamError("upstream closed during the WebSocket handshake")
            self.buf += data
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end])
        del self.buf[:end]
        return head


def ws_read_frame(reader: SockReader, expect_masked: bool,
                  idle: Callable[[], None]) -> Tuple[bool, int, bytes]:
    """Read one frame -> (fin, opcode, unmasked payload), enforcing RFC 6455's rules."""
    b1, b2 = reader.read_exact(2, idle)
    fin, rsv, opcode = bool(b1 & 0x80), b1 & 0x70, b1 & 0x0F
    masked, length = bool(b2 & 0x80), b2 & 0x7F
    if rsv:
        raise WsClose(1002, "reserved bits set (no extension was negotiated)")
    if opcode not in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
        raise WsClose(1002, "unknown opcode")
    if masked != expect_masked:
        raise WsClose(1002, "client frames must be masked" if expect_masked
                      else "server frames must not be masked")
    if opcode >= OP_CLOSE and (length > 125 or not fin):
        raise WsClose(1002, "bad control frame")
    if length == 126:
        length = int.from_bytes(reader.read_exact(2, idle), "big")
    elif length == 127:
        length = int.from_bytes(reader.read_exact(8, idle), "big")
    if length > WS_MAX_MESSAGE:
        raise WsClose(1009, "message too big")
    mask = reader.read_exact(4, idle) if masked else b""
    payload = reader.read_exact(length, idle) if length else b""
    return fin, opcode, ws_mask(payload, mask) if masked else payload


class WsPeer:
    """One side of a relayed session: its socket, reader and a write lock."""

    def __init__(self, name: str, sock: socket.socket, reader: SockReader, masked_out: bool) -> None:
        self.name = name
        self.sock = sock
        self.reader = reader
        self.masked_out = masked_out         # the broker masks what it sends upstream
        self.lock = threading.Lock()
        self.closed_sent = False
        self.frames = 0
        self.bytes = 0

    def send(self, opcode: int, payload: bytes) -> None:
        data = memoryview(ws_frame(opcode, payload, self.masked_out))
        with self.lock:
            if self.closed_sent:
                return
            if opcode == OP_CLOSE:
                self.closed_sent = True
            stalled = time.monotonic()
            while data:
                try:
                    sent = self.sock.send(data)       # all or part; nothing if it times out
                except socket.timeout:
                    if time.monotonic() - stalled > WS_IDLE_TIMEOUT_S:
                        raise
                    continue
                data = data[sent:]
                stalled = time.monotonic()

    def close(self, code: int, reason: str) -> None:
        try:
            self.send(OP_CLOSE, ws_close_payload(code, reason))
        except OSError:
            pass

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class WsRelay:
    """Relays messages both ways between an agent and an upstream WebSocket.

    Data messages are reassembled (at most WS_MAX_MESSAGE) so that hooks see whole messages:
    ``on_client`` may rewrite or refuse what the agent sends (Discord IDENTIFY), ``on_server``
    rewrites what the upstream sends (scrubbing keys, Discord READY). Control frames pass at
    once. A close from either side is passed on with its code and reason; a side that dies
    gets the other closed with 1011/1001."""

    def __init__(self, client: WsPeer, upstream: WsPeer,
                 on_client: Callable[[int, bytes], Tuple[int, bytes]],
                 on_server: Callable[[int, bytes], Tuple[int, bytes]],
                 scrub: Callable[[bytes], bytes], tick: Callable[[], None]) -> None:
        self.client, self.upstream = client, upstream
        self.on_client, self.on_server = on_client, on_server
        self.scrub = scrub                   # for upstream ping/pong payloads
        self.tick = tick                     # every poll: revocation, IDENTIFY deadline
        self.last_activity = time.monotonic()
        self.done = threading.Event()
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.exchange: Any = None            # the request's Exchange (its audit row)

    def stop(self, code: int, reason: str) -> None:
        """Close both sides (broker shutdown); the pumps end when the answers arrive."""
        self.close_code = self.close_code or code
        for peer in (self.client, self.upstream):
            peer.close(code, reason)

    def _idle(self) -> None:
        if self.done.is_set():
            raise ConnectionAbortedError("session over")
        self.tick()
        if time.monotonic() - self.last_activity > WS_IDLE_TIMEOUT_S:
            raise WsClose(1001, "idle timeout")

    def run(self) -> None:
        for peer in (self.client, self.upstream):
            peer.sock.settimeout(WS_POLL_S)
        thread = threading.Thread(target=self._pump, args=(self.upstream, self.client, self.on_server),
                                  name="seks-ws-down", daemon=True)
        thread.start()
        self._pump(self.client, self.upstream, self.on_client)
        thread.join(WS_POLL_S * 2)

    def _pump(self, src: WsPeer, dst: WsPeer, hook: Callable[[int, bytes], Tuple[int, bytes]]) -> None:
        parts: List[bytes] = []
        size = 0
        opcode_first = 0
        try:
            while not self.done.is_set():
                fin, opcode, payload = ws_read_frame(src.reader, src is self.client, self._idle)
                self.last_activity = time.monotonic()
                src.frames += 1
                src.bytes += len(payload)
                if opcode == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    reason = payload[2:].decode("utf-8", "replace")
                    self.close_code = self.close_code or code
                    self.close_reason = self.close_reason or reason
                    _, payload = hook(OP_CLOSE, payload)
                    answered = src.closed_sent     # read before forwarding: the other pump may set it meanwhile
                    dst.send(OP_CLOSE, payload)
                    if answered:                   # this was the answer to a close we passed on
                        break
                    continue
                if opcode in (OP_PING, OP_PONG):
                    dst.send(opcode, self.scrub(payload) if src is self.upstream else payload)
                    continue
                if opcode == OP_CONT:
                    if not parts:
                        raise WsClose(1002, "continuation without a message")
                elif parts:
                    raise WsClose(1002, "new message inside a fragmented one")
                else:
                    opcode_first = opcode
                size += len(payload)
                if size > WS_MAX_MESSAGE:
                    raise WsClose(1009, "message too big")
                parts.append(payload)
                if fin:
                    message = b"".join(parts)
                    parts, size = [], 0
                    if opcode_first == OP_TEXT:
                        try:
                            message.decode("utf-8")
                        except UnicodeDecodeError:
                            raise WsClose(1007, "text message is not UTF-8") from None
                    out_opcode, out = hook(opcode_first, message)
                    dst.send(out_opcode, out)
        except WsClose as exc:
            self.close_code = self.close_code or exc.code
            self.close_reason = self.close_reason or exc.reason
            for peer in (self.client, self.upstream):      # the agent hears the reason first
                peer.close(exc.code, exc.reason)
        except (OSError, ConnectionAbortedError):
            if not self.done.is_set() and not dst.closed_sent:
                # this side died without a close: tell the other, then stop both
                code, reason = (1011, "upstream connection lost") if src is self.upstream \
                    else (1001, "client went away")
                self.close_code = self.close_code or 1006
                dst.close(code, reason)
        finally:
            self.done.set()
            for peer in (self.client, self.upstream):
                peer.shutdown()


def open_upstream_websocket(provider: Provider, target: str, headers: List[Tuple[str, str]],
                            context: Optional[ssl.SSLContext], connect_timeout: float,
                            host: Optional[str] = None, port: Optional[int] = None,
                            scheme: Optional[str] = None
                            ) -> Tuple[socket.socket, UpstreamReply]:
    """Connect and send the upstream handshake (asking for no compression); return the socket
    and its answer, parsed as strictly as any other answer. The caller relays a non-101 answer
    through the same pipeline as every HTTP answer (framing, inflating, scrubbing)."""
    host = host or provider.host
    port = port or provider.port
    scheme = scheme or provider.scheme
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        if scheme in ("https", "wss"):
            assert context is not None
            sock = context.wrap_socket(sock, server_hostname=host)
    except socket.timeout:
        raise UpstreamTimeout(f"upstream {provider.name} timed out") from None
    except ssl.SSLError:
        raise UpstreamError(f"TLS to upstream {provider.name} failed") from None
    except OSError:
        raise UpstreamError(f"upstream {provider.name} unreachable") from None
    key = base64.b64encode(os.urandom(16)).decode()
    default = 443 if scheme in ("https", "wss") else 80
    host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default else f":{port}")
    lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             "Accept-Encoding: identity"]
    lines += [f"{n}: {v}" for n, v in headers]
    reply = UpstreamReply(sock, method="GET")
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reply.begin()
    except socket.timeout:
        sock.close()
        raise UpstreamTimeout(f"upstream {provider.name} timed out") from None
    except UpstreamFraming:
        sock.close()
        raise UpstreamError(f"upstream {provider.name} sent a malformed handshake answer") from None
    except (OSError, http.client.HTTPException):
        sock.close()
        raise UpstreamError(f"upstream {provider.name} failed the WebSocket handshake") from None
    if reply.status == 101:
        accept = next((v for n, v in reply.headers if n.lower() == "sec-websocket-accept"), "")
        if not hmac.compare_digest(accept, ws_accept(key)):
            sock.close()
            raise UpstreamError(f"upstream {provider.name} answered the WebSocket handshake "
                                f"wrongly")
    return sock, reply


class DiscordGateway:
    """The hooks that make a Discord gateway session safe to relay.

    The agent's fake token travels in IDENTIFY (op 2) and RESUME (op 6) as ``d.token``: it is
    checked like a header token and swapped for the real one before anything reaches Discord;
    until then only heartbeats pass. READY's ``resume_gateway_url`` is pointed back at the
    broker. The upstream is asked for plain JSON (no compression) so every frame can be
    scrubbed; if the agent asked for ``compress=zlib-stream`` the broker compresses for it with
    one zlib context per connection, as Discord does."""

    def __init__(self, broker: "Broker", provider: Provider, ex: "Exchange", broker_ws_url: str,
                 compress: bool) -> None:
        self.broker, self.provider, self.ex = broker, provider, ex
        self.broker_ws_url = broker_ws_url
        self.authenticated = False
        self.token = ""
        self.scrubber: Optional[Scrubber] = None
        self.started = time.monotonic()
        self.compressor = zlib.compressobj() if compress else None

    def on_client(self, opcode: int, message: bytes) -> Tuple[int, bytes]:
        if opcode == OP_CLOSE:
            return opcode, message
        if opcode != OP_TEXT:
            raise WsClose(4002, "seks-broker relays the JSON gateway encoding only")
        try:
            payload = json.loads(message)
        except ValueError:
            raise WsClose(4002, "payload is not JSON") from None
        op = payload.get("op") if isinstance(payload, dict) else None
        if op in (2, 6):
            data = payload.get("d")
            presented = data.get("token") if isinstance(data, dict) else None
            if not isinstance(presented, str):
                raise WsClose(4004, "authentication failed")
            if presented.lower().startswith("bot "):
                presented = presented[4:]
            again = presented.strip().encode("utf-8", "surrogatepass")
            if self.authenticated and not hmac.compare_digest(
                    again, self.token.encode("utf-8", "surrogatepass")):
                raise WsClose(4005, "already authenticated with another token")  # as Discord
            try:
                record, key, pairs = self.broker.authenticate(presented.strip(), self.provider,
                                                              self.ex)
                check_policy(record.policy, "GET", "/gateway", None)
                check_websocket_policy(record.policy, bool(self.provider.usage))
                self.broker.admit(record, self.ex)
            except BrokerError as exc:
                self.ex.status, self.ex.outcome = exc.status, "denied"
                self.ex.reason = self.ex.reason or exc.message
                raise WsClose(4004, "authentication failed" if exc.status == 401
                              else exc.message[:120]) from None
            self.token = presented.strip()
            real = key.decode("utf-8", "surrogateescape")
            self.scrubber = Scrubber.from_pairs(pairs)
            data["token"] = real
            if op == 2:
                data["compress"] = False     # no transport compression upstream -> no payload compression either
            self.authenticated = True
            return OP_TEXT, json.dumps(payload).encode()
        if not self.authenticated and op != 1:
            raise WsClose(4003, "not authenticated: send IDENTIFY or RESUME first")
        self.tick()
        return OP_TEXT, message

    def tick(self) -> None:
        """Before IDENTIFY: enforce its deadline. After: the token must stay valid (revoked,
        expired or disabled ends the session with 4004, like a fresh IDENTIFY would)."""
        if not self.authenticated:
            if time.monotonic() - self.started > WS_IDENTIFY_TIMEOUT_S:
                raise WsClose(4003, "not authenticated: send IDENTIFY or RESUME first")
            return
        try:
            record = self.broker.tokens.lookup(self.token)[0]
            check_token(record, self.provider.name, time.time())
        except BrokerError:
            raise WsClose(4004, "authentication failed") from None

    def scrub(self, payload: bytes) -> bytes:
        return self.scrubber.scrub(payload) if self.scrubber is not None else payload

    def on_server(self, opcode: int, message: bytes) -> Tuple[int, bytes]:
        if opcode == OP_BINARY:
            inflate = zlib.decompressobj()
            try:
                message, opcode = inflate.decompress(message, MAX_INFLATE), OP_TEXT
            except zlib.error:
                raise WsClose(1011, "binary gateway payload the broker cannot inspect") from None
            if inflate.unconsumed_tail or not inflate.eof:
                raise WsClose(1009, "binary gateway payload inflates too far or is cut")
        if opcode == OP_CLOSE:
            return opcode, self.scrub(message)
        if opcode == OP_TEXT and b'"READY"' in message and b"resume_gateway_url" in message:
            try:
                payload = json.loads(message)
                data = payload.get("d") or {}
                url = data.get("resume_gateway_url")
                if isinstance(url, str):
                    host = urllib.parse.urlsplit(url).netloc
                    data["resume_gateway_url"] = f"{self.broker_ws_url}/resume/{host}"
                    message = json.dumps(payload).encode()
            except (ValueError, AttributeError):
                pass
        message = self.scrub(message)         # what is actually sent, after any re-encoding
        if self.compressor is not None:
            return OP_BINARY, self.compressor.compress(message) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        return opcode, message


def gateway_resume_host(rest: str, gateway_host: str) -> Optional[str]:
    """The host of a RESUME route (``/gateway/resume/<host[:port]>``) if the broker may connect
    there: the configured gateway's host or a discord.gg subdomain. None for the plain route."""
    parts = [p for p in rest.split("/") if p]
    if parts[:1] != ["gateway"] or len(parts) not in (1, 3):
        raise NotFound("unknown gateway route")
    if len(parts) == 1:
        return None
    if parts[1] != "resume":
        raise NotFound("unknown gateway route")
    host = urllib.parse.unquote(parts[2]).lower()
    match = re.match(r"^[a-z0-9.-]+(?::(\d{1,5}))?$", host)
    if not match or (match.group(1) and not 0 < int(match.group(1)) < 65536):
        raise BadRequest("bad resume host")
    name = host.rsplit(":", 1)[0] if ":" in host else host
    if host == gateway_host.lower():
        return host
    if name.endswith(".discord.gg") and host in (name, name + ":443"):
        return name                        # reached with wss on 443 (see _discord_gateway)
    raise Forbidden("resume host is not a Discord gateway")


# ============================================================================================
# 7. HTTP HANDLER
# ============================================================================================

_CONTENT_LENGTH_RE = re.compile(r"^[0-9]{1,18}\Z")
_BAD_TARGET_BYTES_RE = re.compile(rb"[^\x21-\x7e]")
_BAD_VALUE_BYTES_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE_RE = re.compile(rb"^[0-9A-Fa-f]{1,16}\Z")
_METHOD_RE = re.compile(rb"^[" + TOKEN_CHARS + rb"]{1,32}\Z")


class RequestHead:
    """A parsed request line and header block (header names keep their case, values latin-1)."""

    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: str, target: str, version: str,
                 headers: List[Tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers

    def get_all(self, name: str) -> List[str]:
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name: str) -> Optional[str]:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def request_framing(head: RequestHead, max_body: int) -> Tuple[str, int]:
    """How the request body is delimited: ("none"|"length"|"chunked", length). Strict: any
    ambiguity that could let two parsers disagree about where the body ends is a 400."""
    lengths = head.get_all("content-length")
    codings = head.get_all("transfer-encoding")
    if codings:
        if lengths:
            raise BadRequest("Content-Length together with Transfer-Encoding is refused", close=True)
        if head.version == "HTTP/1.0":
            raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0", close=True)
        words = [w.strip().lower() for v in codings for w in v.split(",")]
        if words != ["chunked"]:
            raise BadRequest("only 'Transfer-Encoding: chunked' is supported", close=True)
        return "chunked", -1
    if lengths:
        if len(lengths) > 1:
            raise BadRequest("more than one Content-Length header", close=True)
        if not _CONTENT_LENGTH_RE.match(lengths[0]):
            raise BadRequest("Content-Length is not a number", close=True)
        length = int(lengths[0])
        if length > max_body:
            raise PayloadTooLarge(f"request body larger than {max_body} bytes", close=True)
        return ("length", length) if length else ("none", 0)
    return "none", 0


class Exchange:
    """What one request did: the log line and the audit row are made from it."""

    __slots__ = ("started", "client", "method", "path", "provider", "agent", "token_id",
                 "secret", "status", "bytes_in", "bytes_out", "outcome", "reason", "model",
                 "tokens_in", "tokens_out", "counted", "recorded", "drain_usage")

    def __init__(self, client: str) -> None:
        self.started = time.monotonic()
        self.client = client
        self.method = self.path = self.provider = self.agent = self.token_id = self.secret = ""
        self.status = self.bytes_in = self.bytes_out = 0
        self.outcome = "error"
        self.reason = ""
        self.model: Optional[str] = None
        self.tokens_in: Optional[int] = None
        self.tokens_out: Optional[int] = None
        self.counted = False       # the request was already counted by policy admission
        self.recorded = False      # the audit row is written
        self.drain_usage = False   # a budget applies: count a stream even if the agent leaves


class BrokerHandler(http.server.BaseHTTPRequestHandler):
    """One agent connection. Overrides ``handle_one_request`` with a strict, bounded parser and
    the proxy pipeline: parse -> route -> authenticate -> swap credential -> forward -> relay.
    Every path ends in exactly one response (or a closed connection when one cannot be sent)."""

    protocol_version = "HTTP/1.1"
    server_version = "seks-broker"
    server: "BrokerServer"
    _answered = False          # some bytes of this request's answer went out

    def setup(self) -> None:
        self.timeout = self.server.broker.settings.client_timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- small writers ---------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self._answered = True                     # from here on, no second answer may follow
        try:
            self.wfile.write(data)
        except (OSError, ValueError) as exc:
            self.close_connection = True
            raise ConnectionCut() from exc

    def _head_bytes(self, status: int, reason: str, headers: List[Tuple[str, str]]) -> bytes:
        block = header_block(headers, "the upstream answer has a header the broker will not "
                                      "pass on")
        return b"HTTP/1.1 %d %s\r\n%s%s%s\r\n" % (
            status, reason.encode("latin-1", "replace"), block, b"\r\n" if block else b"",
            b"Connection: close\r\n" if self.close_connection else b"")

    def _send_simple(self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None,
                     content_type: str = "application/json") -> None:
        hdrs = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        hdrs.extend((headers or {}).items())
        self._write(self._head_bytes(status, HTTP_REASONS.get(status, ""), hdrs) + body)

    def _send_error(self, exc: BrokerError, ex: Exchange) -> None:
        if exc.close:
            self.close_connection = True
        ex.outcome = "denied" if exc.status in (401, 403, 429) else "error"
        ex.reason = ex.reason or exc.message
        if self._answered:                        # part of an answer is out: cut, never a
            self.close_connection = True          # second answer inside the first one's body
        else:
            ex.status = exc.status
            try:
                self._send_simple(exc.status, error_body(exc, self._error_style), exc.headers)
            except ConnectionCut:
                pass
        self.server.broker.record(ex)             # like every row: right after the answer

    # --- request parsing -------------------------------------------------------------------
    def _read_head(self) -> Optional[RequestHead]:
        """Read one request head. The deadline watch closes a connection that stays idle past
        client_timeout or takes longer than header_timeout to send a head once it started."""
        settings = self.server.broker.settings
        watch = self.server.watch
        self.close_connection = False             # keep-alive unless this request says not
        watch.arm(self.connection, settings.client_timeout)
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if line == b"\r\n":                       # one stray CRLF between requests is allowed
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            return None
        watch.arm(self.connection, settings.header_timeout)
        try:
            return self._parse_head(line)
        finally:
            watch.disarm(self.connection)

    def _parse_head(self, line: bytes) -> RequestHead:
        if len(line) > MAX_REQUEST_LINE:
            raise UriTooLong("request line too long", close=True)
        if not line.endswith(b"\r\n"):
            raise BadRequest("request line must end with CRLF", close=True)
        parts = line[:-2].split(b" ")
        if len(parts) != 3 or not _METHOD_RE.match(parts[0]):
            raise BadRequest("malformed request line", close=True)
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest("only HTTP/1.0 and HTTP/1.1 are supported", close=True)
        if _BAD_TARGET_BYTES_RE.search(target):
            raise BadRequest("request target contains a forbidden character", close=True)
        headers: List[Tuple[str, str]] = []
        total = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise HeadersTooLarge("request header fields too large", close=True)
            if not line:
                raise ConnectionCut()
            if line == b"\r\n":
                break
            if not line.endswith(b"\r\n"):
                raise BadRequest("header line must end with CRLF", close=True)
            if line[:1] in (b" ", b"\t"):
                raise BadRequest("obsolete header line folding is refused", close=True)
            name, sep, value = line[:-2].partition(b":")
            if not sep or not HEADER_NAME_RE.match(name):
                raise BadRequest("malformed header line", close=True)
            value = value.strip(b" \t")
            if _BAD_VALUE_BYTES_RE.search(value):
                raise BadRequest("header value contains a control character", close=True)
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
            if len(headers) > MAX_HEADER_COUNT:
                raise HeadersTooLarge("too many request header fields", close=True)
        head = RequestHead(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"),
                           headers)
        conn_tokens = connection_tokens(head.headers)
        if head.version == "HTTP/1.0" or "close" in conn_tokens or self.server.broker.draining:
            self.close_connection = True
        return head

    def _body_chunks(self, framing: str, length: int, ex: Exchange) -> Iterator[bytes]:
        """The request body as it arrives, checked against the framing and the size limit.
        A client-side timeout or reset surfaces as ConnectionCut, never as an upstream error."""
        self._body_started = time.monotonic()
        try:
            yield from self._read_body(framing, length, ex)
        except (socket.timeout, OSError) as exc:
            self.close_connection = True
            raise ConnectionCut() from exc

    def _read_exactly(self, size: int, ex: Exchange) -> Iterator[bytes]:
        """``size`` body bytes as they arrive (never more: the rest is the next request). A
        body dripped just under the per-read timeout is cut once it has taken longer than
        client_timeout while averaging less than min_body_rate."""
        settings = self.server.broker.settings
        remaining = size
        while remaining:
            data = self.rfile.read1(min(remaining, STREAM_CHUNK))
            if not data:
                raise ConnectionCut()
            remaining -= len(data)
            ex.bytes_in += len(data)
            elapsed = time.monotonic() - self._body_started
            if elapsed > settings.client_timeout and ex.bytes_in < settings.min_body_rate * elapsed:
                raise RequestTimeout("request body arrived too slowly", close=True)
            yield data

    def _read_body(self, framing: str, length: int, ex: Exchange) -> Iterator[bytes]:
        rfile = self.rfile
        if framing == "length":
            yield from self._read_exactly(length, ex)
            return
        max_body = self.server.broker.settings.max_body
        while True:
            line = rfile.readline(MAX_CHUNK_LINE + 1)
            if not line:
                raise ConnectionCut()
            if not line.endswith(b"\r\n"):
                raise BadRequest("malformed chunk size line", close=True)
            size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE_RE.match(size_text):
                raise BadRequest("malformed chunk size", close=True)
            size = int(size_text, 16)
            if size == 0:
                trailer_bytes = 0
                while True:
                    trailer = rfile.readline(MAX_HEADER_BYTES + 1)
                    trailer_bytes += len(trailer)
                    if not trailer:
                        raise ConnectionCut()
                    if trailer_bytes > MAX_HEADER_BYTES:
                        raise HeadersTooLarge("chunked trailers too large", close=True)
                    if trailer == b"\r\n":
                        return
            if ex.bytes_in + size > max_body:
                raise PayloadTooLarge(f"request body larger than {max_body} bytes", close=True)
            yield from self._read_exactly(size, ex)
            if rfile.read(2) != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF", close=True)

    # --- the pipeline ----------------------------------------------------------------------
    def handle_one_request(self) -> None:
        broker = self.server.broker
        ex = Exchange(self.client_address[0] if self.client_address else "")
        self._error_style = ""
        self._answered = False
        head: Optional[RequestHead] = None
        try:
            head = self._read_head()
            if head is None:
                self.close_connection = True
                return
            broker.begin(ex)
            ex.method = head.method
            self._proxy(head, ex, broker)
        except BrokerError as exc:
            if head is not None and request_has_body(head):
                self.close_connection = True     # unread body would be taken for a request
            self._send_error(exc, ex)
        except ConnectionCut:
            self.close_connection = True
            ex.reason = ex.reason or "client closed the connection"
            if head is None:
                return
        except (socket.timeout, ConnectionError):
            self.close_connection = True
            if head is None:
                return
            ex.reason = ex.reason or "client connection timed out or reset"
        except Exception as exc:                  # last resort: generic 502, redacted log
            self.close_connection = True
            broker.log_error(f"internal error: {type(exc).__name__}")
            self._send_error(UpstreamError("the broker could not complete the request"), ex)
        finally:
            if head is not None:
                broker.finish(ex)

    def _proxy(self, head: RequestHead, ex: Exchange, broker: "Broker") -> None:
        if head.method == "CONNECT":
            raise BadRequest("CONNECT is refused: the broker is not a forward proxy", close=True)
        if head.method == "TRACE":
            raise BadRequest("TRACE is refused", close=True)
        if not head.target.startswith("/"):
            raise BadRequest("only origin-form request targets (a path) are accepted", close=True)
        path, _, query = head.target.partition("?")
        ex.path = redact_path(path)
        framing, length = request_framing(head, broker.settings.max_body)  # before any answer
        if path == "/healthz" and head.method in ("GET", "HEAD"):
            ex.outcome, ex.status = "health", 200
            if request_has_body(head):
                self.close_connection = True      # never read a stray body as a request
            self._send_simple(200, b'{"status":"ok"}' if head.method == "GET" else b"")
            return
        if not broker.audit_ok:               # fail closed: no unaudited use while it is broken
            raise Unavailable("the broker cannot write its audit log; requests are refused "
                              "until it can")
        validate_path(path)
        provider, rest, route_prefix = broker.route(path)
        ex.provider = provider.name
        self._error_style = provider.errors
        ex.path = masked_request_path(provider, path, query)
        validate_query(query)
        upgrade = is_websocket_upgrade(head)
        if upgrade and request_has_body(head):
            raise BadRequest("a WebSocket upgrade request carries no body", close=True)
        if provider.gateway == "discord" and (rest == "/gateway" or rest.startswith("/gateway/")):
            if not upgrade:
                raise BadRequest("the gateway route takes WebSocket connections only")
            self._discord_gateway(head, provider, rest, query, route_prefix, ex)
            return
        swap = find_token(provider, head.headers, rest, query)
        if swap is None:
            raise AuthError(f"missing token: send your seks token where the {provider.name} "
                            f"client sends its API key")
        record, key, pairs = broker.authenticate(swap.token, provider, ex)
        policy = record.policy
        policy_path = path_for_policy(rest, swap)
        check_policy(policy, head.method, policy_path, None)
        if "methods" in policy and any(head.get(h) is not None for h in METHOD_OVERRIDE_HEADERS):
            raise Forbidden("this token is limited to some methods; a method-override header "
                            "would change the method the upstream acts on")
        real_key = key.decode("utf-8", "surrogateescape")
        headers, rest_up, query_up = swap_credentials(
            provider, swap, real_key, forward_request_headers(head.headers), rest, query)
        url = build_upstream_url(provider, rest_up, query_up, key_in_path=rest_up != rest)
        headers.append(("Host", provider.host_header))
        headers.append(("Accept-Encoding", "identity"))
        inspect = bool(provider.usage) and ("models" in policy or "budget_tokens" in policy)
        if upgrade:
            check_websocket_policy(policy, bool(provider.usage))
        body = self._request_body(head, framing, length, inspect, ex)
        note_model: Optional[Callable[[], None]] = None
        if provider.usage and not inspect and (body is None or isinstance(body, bytes)):
            note_model = functools.partial(     # for the audit row only: read it while the
                note_request_model, ex, provider, rest, body,    # upstream works
                head.get("content-type") or "")
        elif provider.usage and (body is None or isinstance(body, bytes)):
            ex.model = request_model(provider, rest, body, head.get("content-type") or "")
            check_policy(policy, head.method, policy_path, ex.model)
            if ("models" in policy and ex.model is None
                    and head.method not in ("GET", "HEAD", "OPTIONS")):
                raise Forbidden("this token is limited to some models and the broker cannot "
                                "read which model this request uses")
            if "budget_tokens" in policy:
                check_budget_endpoint(policy_path, body)
            if (body and "budget_tokens" in policy and provider.usage == "openai"
                    and policy_path.rstrip("/").endswith("completions")):
                body = ask_for_stream_usage(body)
        broker.admit(record, ex)
        ex.drain_usage = "budget_tokens" in policy
        if isinstance(body, bytes):
            headers.append(("Content-Length", str(len(body))))
        elif framing == "length":
            headers.append(("Content-Length", str(length)))
        scrubber = Scrubber.from_pairs(pairs)
        if upgrade:
            self._websocket(head, provider, route_prefix, url[len(provider.origin):], headers,
                            scrubber, swap.token, ex)
            return
        rewrite = None
        if provider.gateway == "discord" and _GATEWAY_REST_RE.match(rest):
            rewrite = functools.partial(rewrite_gateway_url, ws_base=self._agent_base_url(
                head, websocket=True) + route_prefix + "/gateway")
        resp = broker.open_upstream(provider, head.method, url, headers, body, note_model)
        try:
            self._relay(head, resp, provider, route_prefix, scrubber, ex, rewrite)
        finally:
            resp.finish(complete=ex.outcome == "ok")

    def _request_body(self, head: RequestHead, framing: str, length: int, inspect: bool,
                      ex: Exchange) -> Any:
        """None, the whole body as bytes (small, or needed to check a model or budget policy,
        at most MAX_INSPECT_BODY), or an iterator that streams it upstream as it arrives."""
        if framing == "none":
            return None
        self._expect_continue(head)
        if framing == "length" and (length <= INLINE_BODY_MAX or
                                    (inspect and length <= MAX_INSPECT_BODY)):
            return b"".join(self._body_chunks(framing, length, ex))
        if not inspect:
            return self._body_chunks(framing, length, ex)
        too_big = PayloadTooLarge("bodies over 16 MiB cannot be checked against this token's "
                                  "model or budget policy", close=True)
        if framing == "length":
            raise too_big
        parts, size = [], 0
        for chunk in self._body_chunks(framing, length, ex):
            size += len(chunk)
            if size > MAX_INSPECT_BODY:
                raise too_big
            parts.append(chunk)
        return b"".join(parts)

    def _agent_base_url(self, head: RequestHead, websocket: bool = False) -> str:
        """The broker's address as this agent reaches it (public_url, else its Host header),
        for URLs handed back to it (Discord gateway and resume URLs)."""
        settings = self.server.broker.settings
        if settings.public_url:
            base = settings.public_url.rstrip("/")
        else:
            host = head.get("host") or ""
            if not _HOST_RE.match(host):
                host = settings.agent_url().split("://", 1)[1]
            base = ("https" if self.server.tls else "http") + "://" + host
        return ("ws" + base[4:]) if websocket else base

    def _client_ws_handshake(self, head: RequestHead) -> str:
        key = head.get("sec-websocket-key") or ""
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid = False
        if not valid or (head.get("sec-websocket-version") or "").strip() != "13":
            raise BadRequest("bad WebSocket handshake (Sec-WebSocket-Key, Version 13)",
                             headers={"Sec-WebSocket-Version": "13"})
        return key

    def _accept_websocket(self, key: str, subprotocol: str) -> WsPeer:
        """Answer the agent's handshake with 101 and take over its socket."""
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Accept: {ws_accept(key)}"]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        self._write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.close_connection = True
        sock = self.connection
        pending = b""
        sock.setblocking(False)
        try:
            pending = self.rfile.read1(65536) or b""    # frames sent right behind the handshake
        except (BlockingIOError, ssl.SSLWantReadError, OSError):
            pending = b""
        finally:
            sock.setblocking(True)
        return WsPeer("client", sock, SockReader(sock, pending), masked_out=False)

    def _relay_handshake_refusal(self, head: RequestHead, sock: socket.socket,
                                 reply: UpstreamReply, provider: Provider, route_prefix: str,
                                 scrubber: Scrubber, ex: Exchange) -> None:
        """The upstream refused the upgrade: its answer is relayed like any HTTP answer."""
        self.close_connection = True
        resp = UpstreamResponse(None, None, sock, reply)
        try:
            self._relay(head, resp, provider, route_prefix, scrubber, ex)
        finally:
            resp.finish(complete=False)

    def _run_relay(self, client: WsPeer, upstream: WsPeer, on_client: Any, on_server: Any,
                   scrub: Callable[[bytes], bytes], tick: Callable[[], None],
                   ex: Exchange) -> None:
        ex.status, ex.outcome = 101, "ok"
        metrics = self.server.broker.metrics
        metrics.add_stream(1)
        relay = WsRelay(client, upstream, on_client, on_server, scrub, tick)
        relay.exchange = ex
        broker = self.server.broker
        broker.ws_relays.add(relay)
        try:
            relay.run()
        finally:
            broker.ws_relays.discard(relay)
            metrics.add_stream(-1)
            ex.bytes_in, ex.bytes_out = client.bytes, upstream.bytes
            summary = (f"websocket frames in={client.frames} out={upstream.frames} "
                       f"close={relay.close_code}")
            ex.reason = f"{ex.reason}; {summary}" if ex.reason else summary
            upstream.sock.close()

    def _websocket(self, head: RequestHead, provider: Provider, route_prefix: str, target: str,
                   headers: List[Tuple[str, str]], scrubber: Scrubber, token: str,
                   ex: Exchange) -> None:
        """A WebSocket on any provider route: authenticated like HTTP (done by the caller),
        real credential in the upstream handshake, frames relayed and scrubbed."""
        broker = self.server.broker
        key = self._client_ws_handshake(head)
        offered = [p.strip() for v in head.get_all("sec-websocket-protocol") for p in v.split(",")]
        headers = [(n, v) for n, v in headers if n.lower() not in WS_DROP_HEADERS
                   and n.lower() not in ("host", "accept-encoding", "content-length")]
        headers = [(n, ", ".join(p.strip() for p in v.split(",") if "seks_" not in p))
                   if n.lower() == "sec-websocket-protocol" else (n, v) for n, v in headers]
        headers = [(n, v) for n, v in headers if v]     # a seks token never goes upstream
        context = broker.upstream_tls(provider)
        sock, reply = open_upstream_websocket(
            provider, target, headers, context, broker.settings.connect_timeout)
        if reply.status != 101:
            self._relay_handshake_refusal(head, sock, reply, provider, route_prefix, scrubber, ex)
            return
        chosen = next((v for n, v in reply.headers if n.lower() == "sec-websocket-protocol"), "")
        if chosen and chosen not in offered:
            sock.close()
            raise UpstreamError("upstream chose a WebSocket subprotocol the client did not offer")
        client = self._accept_websocket(key, chosen)
        upstream = WsPeer("upstream", sock, SockReader(sock, reply.take_buffered()),
                          masked_out=True)
        def still_valid() -> None:
            """Revocation, expiry and agent disable end an open session too."""
            try:
                record = broker.tokens.lookup(token)[0]
                check_token(record, provider.name, time.time())
            except BrokerError:
                raise WsClose(1008, "token no longer valid") from None

        def on_client(opcode: int, message: bytes) -> Tuple[int, bytes]:
            still_valid()
            return opcode, message

        self._run_relay(client, upstream, on_client, lambda op, m: (op, scrubber.scrub(m)),
                        scrubber.scrub, still_valid, ex)

    def _discord_gateway(self, head: RequestHead, provider: Provider, rest: str, query: str,
                         route_prefix: str, ex: Exchange) -> None:
        """``/discord/gateway[/resume/<host>]``: relay to the configured Discord gateway (or a
        permitted resume host), checking and swapping the token inside IDENTIFY/RESUME."""
        broker = self.server.broker
        key = self._client_ws_handshake(head)
        params = urllib.parse.parse_qs(query)
        encoding = params.get("encoding", ["json"])[0]
        compress = params.get("compress", [""])[0]
        version = params.get("v", ["10"])[0]
        gateway = urllib.parse.urlsplit(broker.settings.discord_gateway)
        resume_host = gateway_resume_host(rest, gateway.netloc)
        if compress != "zlib-stream":
            compress = ""                    # e.g. zstd-stream: plain text frames, which discord.py reads too
        if encoding != "json" or not re.fullmatch(r"[0-9]{1,3}", version):
            client = self._accept_websocket(key, "")
            client.close(4002 if encoding != "json" else 1003,
                         "seks-broker relays encoding=json only (etf is not supported)"
                         if encoding != "json" else "unsupported compress or version")
            ex.status, ex.outcome, ex.reason = 101, "error", "unsupported gateway encoding"
            return
        netloc = resume_host or gateway.netloc
        scheme = gateway.scheme
        if resume_host and resume_host != gateway.netloc.lower():
            scheme = "wss"                        # a discord.gg resume host: TLS, port 443
        host, _, port_text = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
        port = int(port_text) if port_text else (443 if scheme == "wss" else 80)
        context = broker.upstream_tls(provider)
        sock, reply = open_upstream_websocket(
            provider, f"/?v={version}&encoding=json", [], context,
            broker.settings.connect_timeout, host=host, port=port, scheme=scheme)
        if reply.status != 101:
            self._relay_handshake_refusal(head, sock, reply, provider, route_prefix,
                                          Scrubber([]), ex)
            return
        ws_base = self._agent_base_url(head, websocket=True) + route_prefix + "/gateway"
        hooks = DiscordGateway(broker, provider, ex, ws_base, compress == "zlib-stream")
        client = self._accept_websocket(key, "")
        upstream = WsPeer("upstream", sock, SockReader(sock, reply.take_buffered()),
                          masked_out=True)
        self._run_relay(client, upstream, hooks.on_client, hooks.on_server, hooks.scrub,
                        hooks.tick, ex)

    def _expect_continue(self, head: RequestHead) -> None:
        expect = head.get("expect")
        if expect is not None and expect.lower() == "100-continue" and head.version == "HTTP/1.1":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._answered = False                # an interim answer: the final one is to come

    def _relay(self, head: RequestHead, resp: UpstreamResponse, provider: Provider,
               route_prefix: str, scrubber: Scrubber, ex: Exchange,
               rewrite: Optional[Callable[[bytes], bytes]] = None) -> None:
        """Send the upstream answer on: status and headers (scrubbed), then the body as it
        arrives, in the same framing where possible. The audit row is committed right after
        the last bytes went out (``Broker.finish``), before the connection's next request."""
        status = resp.status
        ex.status = status
        content_type = ""
        codings: List[str] = []
        length: Optional[int] = None
        chunked_upstream = False
        for name, value in resp.headers:
            lower = name.lower()
            if lower == "content-encoding":
                codings += [c.strip().lower() for c in value.split(",")
                            if c.strip().lower() not in ("", "identity")]
            elif lower == "content-type":
                content_type = value
            elif lower == "content-length" and _CONTENT_LENGTH_RE.match(value.strip()):
                length = int(value.strip())
            elif lower == "transfer-encoding":
                chunked_upstream = True
        if chunked_upstream:
            length = None                         # http.client read it chunked: ignore the CL
        decoder = None
        drop = {"content-length", "content-encoding"}
        if codings in (["gzip"], ["x-gzip"], ["deflate"]):
            decoder = Inflater()
            length = None
        elif codings:
            raise UpstreamError(f"upstream answered with content-encoding "
                                f"{known_coding(codings)}, which the broker cannot inspect "
                                f"for leaked keys")
        headers = answer_headers(resp.headers, drop, scrubber, functools.partial(
            rewrite_location, provider=provider, route_prefix=route_prefix))
        if 100 <= status < 200:
            raise UpstreamError(f"upstream sent an informational {status} answer as final")
        no_body = head.method == "HEAD" or status in (204, 304)
        reason = HTTP_REASONS.get(status, "Unknown")     # never the upstream's own text
        meter = UsageMeter(provider.usage, content_type) if provider.usage and not no_body else None
        ex.outcome = "ok"
        if no_body:
            resp.finish(complete=True)            # back in the pool before the agent can
            if length is not None and head.method == "HEAD":   # send its next request
                headers.append(("Content-Length", str(length)))
            self._usage_first(ex)
            self._write(self._head_bytes(status, reason, headers))
            return
        if length is not None and length <= INLINE_BODY_MAX:
            try:
                data = resp.read()
            except (http.client.HTTPException, OSError):
                ex.outcome = "error"
                raise UpstreamError("upstream answer ended early") from None
            resp.finish(complete=True)            # back in the pool before the agent has it
            if rewrite is not None and status == 200:
                data = rewrite(data)
            data = scrubber.scrub(data)
            headers.append(("Content-Length", str(len(data))))
            ex.bytes_out = len(data)
            if meter is not None:
                meter.feed(data)
                if ex.drain_usage:
                    self._take_usage(meter, ex)
            self._usage_first(ex)
            self._write(self._head_bytes(status, reason, headers) + data)
            if meter is not None and not ex.drain_usage:
                self._take_usage(meter, ex)       # for the audit row, once the agent has it
            return
        chunked = length is None and head.version == "HTTP/1.1"
        if length is not None:
            headers.append(("Content-Length", str(length)))
        elif chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True          # HTTP/1.0 client: end of body = close
        self._stream_body(resp, decoder, scrubber, chunked, length, meter, ex,
                          self._head_bytes(status, reason, headers))

    def _usage_first(self, ex: Exchange) -> None:
        """A token with a token budget gets its row (and usage) committed before the last bytes
        of its answer, so the agent's next request is admitted against the spend so far; if
        that write fails, the answer is not completed. Other rows follow the answer."""
        if ex.drain_usage and not self.server.broker.record(ex):
            ex.outcome, ex.reason = "error", "audit write failed; answer withheld"
            self.close_connection = True
            raise ConnectionCut()

    def _take_usage(self, meter: UsageMeter, ex: Exchange) -> None:
        state = meter.finish()
        ex.model = ex.model or state.get("model")
        ex.tokens_in, ex.tokens_out = state.get("tokens_in"), state.get("tokens_out")

    def _stream_body(self, resp: UpstreamResponse, decoder: Any, scrubber: Scrubber,
                     chunked: bool, length: Optional[int], meter: Optional[UsageMeter],
                     ex: Exchange, head: bytes) -> None:
        """Relay the body: each read returns what is available (an SSE event is sent at once).
        The answer's head goes out with the first bytes if they are already here, else alone
        before the broker waits for them."""
        write = self._write
        metrics = self.server.broker.metrics
        metrics.add_stream(1)
        try:
            self._relay_chunks(resp, decoder, scrubber, chunked, length, meter, ex, write, head)
        except BaseException as exc:
            if not ex.recorded:
                ex.outcome = "error"
                ex.reason = ex.reason or "client closed the connection mid-answer"
                if meter is not None:
                    if isinstance(exc, ConnectionCut) and ex.drain_usage:
                        drain_for_usage(resp, decoder, meter)
                    self._take_usage(meter, ex)   # an abandoned stream is charged what passed
            raise
        finally:
            metrics.add_stream(-1)

    def _relay_chunks(self, resp: UpstreamResponse, decoder: Any, scrubber: Scrubber,
                      chunked: bool, length: Optional[int], meter: Optional[UsageMeter],
                      ex: Exchange, write: Callable[[bytes], None], head: bytes) -> None:
        if (decoder is None and length is not None and length > INLINE_BODY_MAX
                and (meter is None or not meter.active) and not ex.drain_usage):
            write(head)
            self._relay_bulk(resp, scrubber, ex, write)
            head = b""
        while not resp.isclosed():
            if head and not resp.buffered():
                write(head)                       # nothing to add to it without waiting
                head = b""
            try:
                data = resp.read1(STREAM_CHUNK)
            except (http.client.HTTPException, OSError):
                self._upstream_cut(ex, head)
            if not data:
                break
            if decoder is not None:
                try:
                    data = decoder.decompress(data)
                except UpstreamFraming:
                    self._upstream_cut(ex, head, "upstream sent a corrupt compressed body")
            data = scrubber.feed(data)
            if not data:
                continue
            if meter is not None:
                meter.feed(data)
            ex.bytes_out += len(data)
            if length is not None and ex.bytes_out >= length and ex.drain_usage:
                if meter is not None:
                    self._take_usage(meter, ex)
                self._usage_first(ex)             # last bytes of a sized body: row first
            if head:
                write(head + (b"%x\r\n%s\r\n" % (len(data), data) if chunked else data))
                head = b""
                continue
            write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        resp.finish(complete=True)                # read to its end: back in the pool first
        tail = b""
        if decoder is not None:
            try:
                tail = scrubber.feed(decoder.finish())
            except UpstreamFraming:
                self._upstream_cut(ex, head, "upstream sent a corrupt or cut compressed body")
        tail += scrubber.flush()
        if tail:
            ex.bytes_out += len(tail)
            if meter is not None:
                meter.feed(tail)
        if length is not None and ex.bytes_out < length:
            self.close_connection = True
            ex.outcome, ex.reason = "error", "upstream answer shorter than its Content-Length"
            raise ConnectionCut()
        if meter is not None:
            self._take_usage(meter, ex)
        self._usage_first(ex)
        if chunked:
            write(head + (b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n")
        elif tail or head:
            write(head + tail)

    def _relay_bulk(self, resp: UpstreamResponse, scrubber: Scrubber, ex: Exchange,
                    write: Callable[[Any], None]) -> None:
        """A large sized body that nothing needs to read but the scrubber (files, audio): read
        into one buffer, scanned in place and sent from it, so memory stays flat and no new
        buffer is made per read. The caller's loop takes over the bytes that are left."""
        buf = bytearray(BULK_BUFFER)
        view = memoryview(buf)
        while True:
            try:
                n = resp.readinto1(view)
            except (http.client.HTTPException, OSError):
                self._upstream_cut(ex, b"")
            if not n:
                return
            passed = scrubber.pass_through(buf, n)
            if passed is None:                    # a key is there: the copying path masks it
                data = scrubber.feed(bytes(view[:n]))
                ex.bytes_out += len(data)
                if data:
                    write(data)
                continue
            held, size = passed
            ex.bytes_out += len(held) + size
            if held:
                write(held)
            if size:
                write(view[:size])

    def _upstream_cut(self, ex: Exchange, head: bytes,
                      reason: str = "upstream answer ended early") -> NoReturn:
        """The upstream answer broke off: a clean 502 if nothing was sent yet, else a cut."""
        ex.outcome = "error"
        if head:
            raise UpstreamError(reason) from None
        self.close_connection = True
        ex.reason = reason
        raise ConnectionCut() from None

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own messages go through the one redacting log path."""
        self.server.broker.log_error(format % args)


USAGE_DRAIN_SECONDS = 60.0        # reading on after the agent left, to learn a stream's usage
USAGE_DRAIN_BYTES = 16 * 1024 * 1024


def drain_for_usage(resp: "UpstreamResponse", decoder: Any, meter: UsageMeter) -> None:
    """The agent hung up on a stream of a budget-limited token: read the rest (bounded) so the
    tokens the provider bills are still counted (OpenAI reports usage only at the end)."""
    deadline = time.monotonic() + USAGE_DRAIN_SECONDS
    seen = 0
    try:
        while time.monotonic() < deadline and seen < USAGE_DRAIN_BYTES:
            data = resp.read1(STREAM_CHUNK)
            if not data:
                return
            seen += len(data)
            meter.feed(decoder.decompress(data) if decoder is not None else data)
    except (http.client.HTTPException, OSError):
        return


_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?\Z")
_GATEWAY_REST_RE = re.compile(r"^/api(/v\d+)?/gateway(/bot)?/?\Z")


def is_websocket_upgrade(head: RequestHead) -> bool:
    upgrade = (head.get("upgrade") or "").lower()
    return head.method == "GET" and "websocket" in upgrade and \
        "upgrade" in connection_tokens(head.headers)


def rewrite_gateway_url(data: bytes, ws_base: str) -> bytes:
    """Point the ``url`` of a Discord /gateway(/bot) answer at the broker's gateway route."""
    try:
        payload = json.loads(data)
    except ValueError:
        return data
    if isinstance(payload, dict) and isinstance(payload.get("url"), str):
        payload["url"] = ws_base
        return json.dumps(payload).encode()
    return data


def clean_text(value: Optional[str], limit: int) -> Optional[str]:
    """Text as it may be stored: valid UTF-8 (lone surrogates escaped), bounded, None if empty."""
    if not value:
        return None
    return value.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def clean_count(value: Optional[int]) -> Optional[int]:
    """A token count an upstream reported, kept within sqlite's integer range."""
    if value is None:
        return None
    return max(0, min(int(value), 2 ** 62))


METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")


def request_has_body(head: RequestHead) -> bool:
    """Whether bytes may follow the head (so a refusal must close the connection): any
    Transfer-Encoding, any Content-Length but a single 0, or several Content-Length fields."""
    if head.get("transfer-encoding") is not None:
        return True
    lengths = head.get_all("content-length")
    return len(lengths) > 1 or (len(lengths) == 1 and lengths[0].strip() != "0")


# ============================================================================================
# 8. SERVER
# ============================================================================================

class SettingSpec:
    """One setting: its config-file place, its env variable and flag, its type and default."""

    __slots__ = ("name", "section", "key", "kind", "default", "help")

    def __init__(self, name: str, section: str, key: str, kind: str, default: Any,
                 help: str) -> None:
        self.name, self.section, self.key, self.kind = name, section, key, kind
        self.default, self.help = default, help

    @property
    def env(self) -> str:
        return "SEKS_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# Every setting, in the order the README documents them. Flags beat env beat the file.
SETTINGS: List[SettingSpec] = [
    SettingSpec("db", "server", "db", "path", DEFAULT_DB, "database file (key file: <db>.key)"),
    SettingSpec("host", "server", "host", "str", DEFAULT_HOST, "listen address for agents"),
    SettingSpec("port", "server", "port", "port", DEFAULT_PORT, "listen port for agents (0: any)"),
    SettingSpec("tls_cert", "server", "tls_cert", "path", "", "TLS certificate chain (PEM) for "
                "the agent port; with tls_key, agents connect with https"),
    SettingSpec("tls_key", "server", "tls_key", "path", "", "TLS private key (PEM)"),
    SettingSpec("admin_host", "server", "admin_host", "str", "127.0.0.1",
                "listen address of the admin port"),
    SettingSpec("admin_port", "server", "admin_port", "port", -1,
                "admin port serving /metrics and /healthz (off unless set; with --workers N "
                "the workers use admin_port .. admin_port+N-1)"),
    SettingSpec("workers", "server", "workers", "int", 1,
                "processes sharing the agent port (SO_REUSEPORT) and the DB"),
    SettingSpec("grace", "server", "grace", "duration", 10.0,
                "on SIGTERM/SIGINT, how long in-flight requests and streams may finish"),
    SettingSpec("public_url", "server", "public_url", "str", "",
                "the broker's address as agents see it (token mint --format env)"),
    SettingSpec("audit", "server", "audit", "bool", True,
                "the audit log (on by default; --no-audit / audit = false only to measure "
                "its cost: it breaks the accountability promise)"),
    SettingSpec("max_body", "limits", "max_body", "size", MAX_BODY_BYTES,
                "largest request body (413 past it)"),
    SettingSpec("max_connections", "limits", "max_connections", "int", MAX_CONNECTIONS,
                "concurrent agent connections (503 past it)"),
    SettingSpec("client_timeout", "limits", "client_timeout", "duration", CLIENT_TIMEOUT_S,
                "an agent connection idle or stalled this long is closed"),
    SettingSpec("header_timeout", "limits", "header_timeout", "duration", HEADER_TIMEOUT_S,
                "a request head must arrive completely within this (slow-header defence)"),
    SettingSpec("min_body_rate", "limits", "min_body_rate", "size", MIN_BODY_RATE,
                "bytes per second a request body must average once it has taken longer than "
                "client_timeout (slow-body defence; 408 past it)"),
    SettingSpec("connect_timeout", "limits", "connect_timeout", "duration",
                UPSTREAM_CONNECT_TIMEOUT_S, "TCP and TLS connect to an upstream (504 past it)"),
    SettingSpec("upstream_timeout", "limits", "upstream_timeout", "duration",
                UPSTREAM_TIMEOUT_S, "silence from an upstream while waiting for bytes (504)"),
    SettingSpec("log_format", "log", "format", "choice:text,json", "text",
                "per-request log lines on stderr as text or JSON"),
    SettingSpec("log_level", "log", "level", "choice:debug,info,warning,error", "info",
                "info logs every request; warning and error only problems"),
    SettingSpec("quiet", "log", "quiet", "bool", False, "no per-request log lines"),
    SettingSpec("upstream_ca", "upstream", "ca_file", "path", "",
                "extra CA certificates (PEM) trusted for upstream TLS, e.g. a lab gateway's"),
    SettingSpec("insecure_upstream", "upstream", "insecure", "list", [],
                "providers whose upstream TLS certificate is NOT verified (loudly logged)"),
]
SETTINGS_BY_NAME = {spec.name: spec for spec in SETTINGS}
_SIZE_RE = re.compile(r"^(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2,
               "mb": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3,
               "gib": 1024 ** 3}
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_setting(spec: SettingSpec, text: Any) -> Any:
    """Convert a setting from its text form (config file, env or flag); ConfigError if bad."""
    if not isinstance(text, str):
        return text
    value = text.strip()
    kind = spec.kind
    if kind in ("str", "path"):
        return value
    if kind in ("int", "port"):
        if not re.match(r"^-?\d+$", value):
            raise ConfigError(f"{spec.name}: expected a whole number, got {value!r}")
        number = int(value)
        if kind == "port" and not 0 <= number <= 65535:
            raise ConfigError(f"{spec.name}: a port is 0-65535, got {number}")
        if kind == "int" and number < 1:
            raise ConfigError(f"{spec.name}: must be at least 1, got {number}")
        return number
    if kind == "size":
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{spec.name}: expected a size like 1048576, 512KiB or 100MiB, "
                              f"got {value!r}")
        return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if kind == "duration":
        match = _DURATION_RE.match(value)
        if not match or float(match.group(1)) <= 0:
            raise ConfigError(f"{spec.name}: expected a duration like 30s, 500ms or 5m, "
                              f"got {value!r}")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if kind == "bool":
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{spec.name}: expected true or false, got {value!r}")
    if kind == "list":
        return [v for v in re.split(r"[,\s]+", value) if v]
    if kind.startswith("choice:"):
        choices = kind[7:].split(",")
        if value not in choices:
            raise ConfigError(f"{spec.name}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    raise ConfigError(f"{spec.name}: unknown kind {kind}")


class Settings:
    """Everything the running broker is configured with: defaults < config file < env < flags."""

    def __init__(self, **overrides: Any) -> None:
        for spec in SETTINGS:
            setattr(self, spec.name, list(spec.default) if isinstance(spec.default, list)
                    else spec.default)
        self.upstreams: Dict[str, str] = {}          # provider -> base URL override
        self.discord_gateway = "wss://gateway.discord.gg"
        self.custom_providers: Dict[str, Provider] = {}
        for name, value in overrides.items():
            if not hasattr(self, name):
                raise ConfigError(f"unknown setting {name!r}")
            setattr(self, name, value)

    def agent_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_cert else "http"
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"


def ini_line_numbers(text: str) -> Dict[Tuple[str, str], int]:
    """(section, key) -> line number, and (section, "") -> the section header's line."""
    lines: Dict[Tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip()
            lines.setdefault((section, ""), number)
        elif stripped and not stripped.startswith(("#", ";")) and not line[:1].isspace():
            key = re.split(r"[=:]", stripped, 1)[0].strip().lower()
            lines.setdefault((section, key), number)
    return lines


def read_config(text: str, source: str, settings: Settings) -> List[str]:
    """Apply a config file to ``settings``; return every error as 'source:line: message'."""
    errors: List[str] = []
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        return [f"{source}: {' '.join(str(exc).split())}"]
    lines = ini_line_numbers(text)

    def where(section: str, key: str = "") -> str:
        return f"{source}:{lines.get((section, key), lines.get((section, ''), 0))}"

    by_place = {(spec.section, spec.key): spec for spec in SETTINGS}
    for section in parser.sections():
        if section.startswith("provider:"):
            name = section[len("provider:"):]
            try:
                settings.custom_providers[name] = provider_from_section(name, parser[section])
            except ConfigError as exc:
                errors.append(f"{where(section, exc.key)}: [{section}] {exc}")
            continue
        if section == "upstream":
            for key, value in parser.items(section):
                if (section, key) in by_place:
                    continue
                if key == "discord_gateway":
                    try:
                        check_gateway_url(value.strip())
                        settings.discord_gateway = value.strip().rstrip("/")
                    except ConfigError as exc:
                        errors.append(f"{where(section, key)}: {exc}")
                    continue
                try:
                    parse_upstream_base(value.strip())
                    settings.upstreams[key] = value.strip()
                except ConfigError as exc:
                    errors.append(f"{where(section, key)}: [upstream] {key}: {exc}")
        elif section not in ("server", "limits", "log"):
            errors.append(f"{where(section)}: unknown section [{section}] (known: server, "
                          f"limits, log, upstream, provider:NAME)")
            continue
        for key, value in parser.items(section):
            spec = by_place.get((section, key))
            if spec is None:
                if section != "upstream":
                    known = ", ".join(s.key for s in SETTINGS if s.section == section)
                    errors.append(f"{where(section, key)}: unknown key '{key}' in [{section}] "
                                  f"(known: {known})")
                continue
            try:
                setattr(settings, spec.name, parse_setting(spec, value))
            except ConfigError as exc:
                errors.append(f"{where(section, key)}: {exc}")
    known = set(settings.custom_providers) | set(builtin_providers())
    for name in settings.upstreams:
        if name not in known:
            errors.append(f"{where('upstream', name)}: [upstream] {name}: no such provider")
    for name in settings.insecure_upstream:
        if name not in known:
            errors.append(f"{where('upstream', 'insecure')}: [upstream] insecure: no such "
                          f"provider {name!r}")
    return errors


@functools.lru_cache(maxsize=1)
def builtin_providers() -> Dict[str, Provider]:
    """The built-in provider table, parsed once (callers copy before changing it)."""
    return providers_from_ini(BUILTIN_PROVIDERS_INI)


def resolve_settings(config_path: Optional[str], environ: Dict[str, str],
                     flags: Dict[str, Any]) -> Settings:
    """Defaults < config file (--config or $SEKS_CONFIG) < SEKS_* env < command-line flags."""
    settings = Settings()
    path = config_path or environ.get("SEKS_CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        errors = read_config(text, path, settings)
        if errors:
            raise ConfigError("invalid config file:\n  " + "\n  ".join(errors)
                              + f"\n(run: seks_broker.py config check {path})")
    for spec in SETTINGS:
        if spec.env in environ and environ[spec.env].strip() != "":
            setattr(settings, spec.name, parse_setting(spec, environ[spec.env]))
    for name, value in flags.items():
        if value is not None:
            setattr(settings, name, parse_setting(SETTINGS_BY_NAME[name], value))
    for name, value in environ.items():
        if name.startswith("SEKS_UPSTREAM_") and name not in ("SEKS_UPSTREAM_CA",
                                                               "SEKS_UPSTREAM_TIMEOUT") and value:
            key = name[len("SEKS_UPSTREAM_"):].lower()
            if key == "discord_gateway":
                settings.discord_gateway = value.strip().rstrip("/")
            else:
                settings.upstreams[key.replace("_", "-")] = value.strip()
    problem = settings_problem(settings)
    if problem:
        raise ConfigError(problem)
    return settings


def settings_problem(settings: Settings) -> str:
    """What is wrong with a combination of settings (each valid alone), or ""; checked by
    ``serve`` and ``config check`` alike."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return "TLS needs both tls_cert and tls_key"
    if settings.admin_port > 0 and settings.admin_port + max(settings.workers, 1) - 1 > 65535:
        return (f"admin_port {settings.admin_port} leaves no port for each of the "
                f"{settings.workers} workers (they use admin_port .. admin_port+N-1)")
    try:
        check_gateway_url(settings.discord_gateway)
    except ConfigError as exc:
        return str(exc)
    return ""


def check_gateway_url(url: str) -> None:
    """The Discord gateway must be ws(s)://host[:port]: checked at start, not on first use."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port                                    # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"discord gateway {url!r} has a bad port") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.username:
        raise ConfigError(f"discord gateway must be ws(s)://host[:port], got {url!r}")


def load_providers(settings: Settings, strict: bool = True) -> Dict[str, Provider]:
    """Built-in providers plus custom ones from the config file, with upstream overrides.
    ``strict`` (serve, config check) refuses an override naming an unknown provider: a typo
    there would send traffic to the real upstream while the operator thinks it does not."""
    providers = dict(builtin_providers())
    for name, provider in settings.custom_providers.items():
        providers[name] = provider
    routes = {alias for p in providers.values() for alias in p.aliases}
    for name, url in settings.upstreams.items():
        if name not in providers:
            if not strict:
                continue
            raise ConfigError(f"upstream override for unknown provider {name!r}")
        providers[name] = providers[name].with_upstream(url)
    for name in settings.insecure_upstream:
        if name not in providers:
            raise ConfigError(f"insecure_upstream names unknown provider {name!r}")
    clash = routes & set(providers)
    if clash:
        raise ConfigError(f"provider names clash with aliases: {', '.join(sorted(clash))}")
    return providers


def upstream_ssl_context(cafile: str = "", verify: bool = True) -> ssl.SSLContext:
    """Verified TLS 1.2+ to upstreams: system trust (which honours SSL_CERT_FILE) plus an
    optional extra CA file. ``verify=False`` only for providers named in insecure_upstream."""
    context = ssl.create_default_context()
    if cafile:
        context.load_verify_locations(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Counters for /metrics (Prometheus text format 0.0.4), updated once per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str], int] = {}
        self.upstream_errors: Dict[Tuple[str, str], int] = {}
        self.bytes_in: Dict[str, int] = {}
        self.bytes_out: Dict[str, int] = {}
        self.latency: Dict[str, List[float]] = {}       # provider -> bucket counts + [sum, count]
        self.open_streams = 0

    def observe(self, ex: "Exchange", seconds: float) -> None:
        provider = ex.provider or "-"
        with self._lock:
            key = (provider, str(ex.status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.bytes_in[provider] = self.bytes_in.get(provider, 0) + ex.bytes_in
            self.bytes_out[provider] = self.bytes_out.get(provider, 0) + ex.bytes_out
            hist = self.latency.get(provider)    # per-bucket counts, then sum and count
            if hist is None:
                hist = self.latency[provider] = [0.0] * (len(LATENCY_BUCKETS) + 3)
            hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            hist[-2] += seconds
            hist[-1] += 1
            if ex.status in (502, 504):
                kind = "timeout" if ex.status == 504 else "error"
                ukey = (provider, kind)
                self.upstream_errors[ukey] = self.upstream_errors.get(ukey, 0) + 1

    def add_stream(self, delta: int) -> None:
        with self._lock:
            self.open_streams += delta

    def render(self, connections: int) -> str:
        def labels(**pairs: str) -> str:
            inner = ",".join(f'{k}="{v}"' for k, v in pairs.items())
            return "{" + inner + "}"

        out = ["# HELP seks_build_info Broker version.", "# TYPE seks_build_info gauge",
               f"seks_build_info{labels(version=__version__)} 1"]
        with self._lock:
            out += ["# HELP seks_requests_total Requests answered, by provider and status.",
                    "# TYPE seks_requests_total counter"]
            out += [f"seks_requests_total{labels(provider=p, status=s)} {n}"
                    for (p, s), n in sorted(self.requests.items())]
            out += ["# HELP seks_request_duration_seconds Time from request head to last byte.",
                    "# TYPE seks_request_duration_seconds histogram"]
            for provider, hist in sorted(self.latency.items()):
                below = 0.0                           # Prometheus buckets are cumulative
                for i, bound in enumerate(LATENCY_BUCKETS):
                    below += hist[i]
                    out.append(f"seks_request_duration_seconds_bucket"
                               f"{labels(provider=provider, le=repr(bound))} {int(below)}")
                out.append(f"seks_request_duration_seconds_bucket"
                           f"{labels(provider=provider, le='+Inf')} {int(hist[-1])}")
                out.append(f"seks_request_duration_seconds_sum{labels(provider=provider)} "
                           f"{hist[-2]:.6f}")
                out.append(f"seks_request_duration_seconds_count{labels(provider=provider)} "
                           f"{int(hist[-1])}")
            out += ["# HELP seks_upstream_errors_total Upstream failures (502 error, 504 timeout).",
                    "# TYPE seks_upstream_errors_total counter"]
            out += [f"seks_upstream_errors_total{labels(provider=p, kind=k)} {n}"
                    for (p, k), n in sorted(self.upstream_errors.items())]
            for name, table, text in (("seks_request_bytes_total", self.bytes_in,
                                       "Request body bytes from agents."),
                                      ("seks_response_bytes_total", self.bytes_out,
                                       "Response body bytes to agents.")):
                out += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
                out += [f"{name}{labels(provider=p)} {n}" for p, n in sorted(table.items())]
            out += ["# HELP seks_open_streams Streamed answers being relayed now.",
                    "# TYPE seks_open_streams gauge", f"seks_open_streams {self.open_streams}",
                    "# HELP seks_open_connections Agent connections open now.",
                    "# TYPE seks_open_connections gauge", f"seks_open_connections {connections}"]
        return "\n".join(out) + "\n"


LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Broker:
    """The running broker: providers, token cache, upstream pool, audit, metrics, logging.
    One instance per process, shared by all handler threads."""

    def __init__(self, settings: Settings, store: Store, master_key: bytes,
                 providers: Dict[str, Provider]) -> None:
        self.settings = settings
        self.store = store
        self.tokens = TokenCache(store, KeyRing(master_key), self._reload_keys)
        insecure = upstream_ssl_context(settings.upstream_ca, verify=False) \
            if settings.insecure_upstream else None
        self.pool = UpstreamPool(upstream_ssl_context(settings.upstream_ca),
                                 settings.connect_timeout, settings.upstream_timeout, insecure)
        self.opener = make_opener(self.pool)
        self.providers = providers
        self.routes: Dict[str, Provider] = {}
        for provider in providers.values():
            self.routes[provider.name] = provider
            for alias in provider.aliases:
                self.routes[alias] = provider
        self._log_lock = threading.Lock()
        self._level = LOG_LEVELS[settings.log_level]
        self.metrics = Metrics()
        self.in_flight: set = set()             # exchanges begun and not yet finished
        self._in_flight_lock = threading.Lock()
        self._record_lock = threading.Lock()
        self._audit_cv = threading.Condition()
        self._audit_pending: List[List[Any]] = []
        self._audit_writing = False
        self.draining = False
        self.audit_ok = True          # the last audit write succeeded; if not, refuse (503)
        self.ws_relays: set = set()             # open WebSocket sessions, closed at shutdown

    def __repr__(self) -> str:
        return f"Broker({len(self.providers)} providers)"

    def route(self, path: str) -> Tuple[Provider, str, str]:
        """``/<provider>/<rest>`` or ``/api/<provider>/<rest>`` -> (provider, rest, prefix)."""
        alias = ""
        if path.startswith("/api/"):
            alias, path = "/api", path[4:]
        name, sep, rest = path[1:].partition("/")
        provider = self.routes.get(name)
        if provider is None:
            shown = name if PROVIDER_NAME_RE.match(name) else "?"
            raise NotFound(f"unknown provider '{shown}'")
        return provider, "/" + rest if sep else "/", f"{alias}/{name}"

    def authenticate(self, token: str, provider: Provider,
                     ex: "Exchange") -> Tuple[TokenRecord, bytes, Any]:
        """The token check shared by HTTP requests and gateway IDENTIFY/RESUME: look the token
        up (cached), note whose it is for the audit row, deny unless it is live and bound to
        this provider. Returns the record, the real key and its scrub pairs."""
        record, key, pairs = self.tokens.lookup(token)
        if record is None:
            ex.reason = "unknown token " + self.fingerprint(token)
        else:
            ex.agent, ex.token_id, ex.secret = record.agent, record.id, record.secret_name
        check_token(record, provider.name, time.time())
        assert record is not None and key is not None
        return record, key, pairs

    def admit(self, record: TokenRecord, ex: "Exchange") -> None:
        """Count the request against the token's rate, lifetime and budget limits (if any)."""
        if needs_admission(record.policy):
            self.store.admit(record.id, record.policy, time.time())
            ex.counted = True

    def fingerprint(self, presented: str) -> str:
        """A short, keyed, non-reversible tag of an unknown token, to correlate attempts."""
        return "fp:" + hmac.new(self.tokens.keys.fingerprint, presented.encode("utf-8", "replace"),
                                hashlib.sha256).hexdigest()[:12]

    def _reload_keys(self) -> KeyRing:
        try:
            key = load_master_key(self.store.path, dict(os.environ), self.store)
        except ConfigError as exc:
            self.log("error", "keys", message=f"master key no longer matches the DB: {exc}")
            raise Unavailable("the broker's master key was rotated; restart it with the new "
                              "key") from None
        self.log("warning", "keys", message="the master key was rotated; reloaded it")
        return KeyRing(key)

    def open_upstream(self, provider: Provider, method: str, url: str,
                      headers: List[Tuple[str, str]], body: Any,
                      while_waiting: Optional[Callable[[], None]] = None) -> UpstreamResponse:
        """Send the request with urllib over the pool; map network failures to 502/504.
        ``while_waiting`` runs once the request is sent, before the answer is read."""
        request = urllib.request.Request(url, data=body, method=method)
        request.seks_headers = headers                   # type: ignore[attr-defined]
        request.seks_while_waiting = while_waiting       # type: ignore[attr-defined]
        request.seks_host, request.seks_port = provider.host, provider.port  # type: ignore[attr-defined]
        request.seks_verify = provider.name not in self.settings.insecure_upstream  # type: ignore[attr-defined]
        try:
            return self.opener.open(request)
        except (BrokerError, ConnectionCut):
            raise
        except socket.timeout:
            raise UpstreamTimeout(f"upstream {provider.name} timed out") from None
        except ssl.SSLError:
            raise UpstreamError(f"TLS to upstream {provider.name} failed") from None
        except (OSError, http.client.HTTPException):
            raise UpstreamError(f"upstream {provider.name} unreachable or closed the "
                                f"connection") from None

    def upstream_tls(self, provider: Provider) -> Optional[ssl.SSLContext]:
        """Verified TLS, unless the operator named this provider in insecure_upstream."""
        if provider.name in self.settings.insecure_upstream:
            return self.pool.insecure_context
        return self.pool.ssl_context

    def begin(self, ex: "Exchange") -> None:
        with self._in_flight_lock:
            self.in_flight.add(ex)

    def cut_in_flight(self) -> int:
        """At the end of the grace period: every exchange still running gets its audit row now
        (outcome error, "cut at shutdown", bytes so far), since the process is about to exit
        and its upstream may already have used the real key. Returns how many were cut."""
        for relay in list(self.ws_relays):
            relay.exchange.bytes_in = relay.client.bytes
            relay.exchange.bytes_out = relay.upstream.bytes
        with self._in_flight_lock:
            running = list(self.in_flight)
        cut = 0
        for ex in running:
            if not ex.recorded:
                ex.outcome = "error"
                ex.reason = f"{ex.reason}; cut at shutdown" if ex.reason else "cut at shutdown"
                cut += self.record(ex)
        return cut

    def record(self, ex: "Exchange") -> bool:
        """Write the request's chained audit row (once); False if it could not be written. A
        failed write makes the broker refuse new requests (503) until a write succeeds again.
        Health checks are not audited."""
        with self._record_lock:                  # the shutdown path may race the handler
            if ex.recorded or ex.outcome == "health":
                return True
            ex.recorded = True
        row = AuditRow(ts=utc_iso(), agent=clean_text(ex.agent, 64), token_id=ex.token_id or None,
                       provider=ex.provider or None, secret=ex.secret or None,
                       method=clean_text(ex.method, 16), path=clean_text(ex.path, 1024),
                       status=ex.status, bytes_in=ex.bytes_in, bytes_out=ex.bytes_out,
                       duration_ms=round((time.monotonic() - ex.started) * 1000, 3),
                       client=ex.client, outcome=ex.outcome, reason=clean_text(ex.reason, 300),
                       model=clean_text(ex.model, 100), tokens_in=clean_count(ex.tokens_in),
                       tokens_out=clean_count(ex.tokens_out))
        error = self._group_commit(row, ex.counted or ex.outcome != "ok")
        self.audit_ok = not error
        if error:
            self.log("error", "audit", message=f"AUDIT WRITE FAILED: {error}")
        return not error

    def _group_commit(self, row: AuditRow, counted: bool) -> str:
        """Durable before the caller goes on. Rows that arrive while another thread commits
        wait and go together in the next transaction (leader-based group commit), so audit
        costs one sqlite transaction per batch, not per request."""
        item: List[Any] = [row, counted, False, ""]
        with self._audit_cv:
            self._audit_pending.append(item)
            while not item[2]:
                if self._audit_writing:
                    self._audit_cv.wait()
                    continue
                self._audit_writing = True
                batch, self._audit_pending = self._audit_pending, []
                self._audit_cv.release()
                error = ""
                try:
                    error = self._commit_batch([(it[0], it[1]) for it in batch])
                finally:
                    self._audit_cv.acquire()
                    self._audit_writing = False
                    for it in batch:
                        it[2], it[3] = True, error
                    self._audit_cv.notify_all()
        return item[3]

    def _commit_batch(self, rows: List[Tuple[AuditRow, bool]]) -> str:
        try:
            try:
                self.store.append_audit(self.tokens.keys, rows, self.settings.audit)
            except KeyRotated:
                self.tokens.reload_keys()
                self.store.append_audit(self.tokens.keys, rows, self.settings.audit)
        except (KeyRotated, Unavailable):
            return "master key rotated; restart the broker"
        except Exception as exc:                  # every row of the batch shares the outcome
            return f"{type(exc).__name__}"
        return ""

    def finish(self, ex: "Exchange") -> None:
        """After each request: the audit row if not yet written, metrics, one log line."""
        with self._in_flight_lock:
            self.in_flight.discard(ex)
        self.record(ex)
        seconds = time.monotonic() - ex.started
        self.metrics.observe(ex, seconds)
        if self.settings.quiet or ex.outcome == "health":
            return
        level = "info" if ex.status < 500 else "warning"
        self.log(level, "request", client=ex.client, method=ex.method, path=ex.path,
                 status=ex.status, provider=ex.provider or None, agent=ex.agent or None,
                 token=ex.token_id or None, bytes_in=ex.bytes_in, bytes_out=ex.bytes_out,
                 ms=round(seconds * 1000, 1), outcome=ex.outcome, reason=ex.reason or None,
                 model=ex.model, tokens_in=ex.tokens_in, tokens_out=ex.tokens_out)

    def log_error(self, message: str) -> None:
        self.log("error", "error", message=message)

    def log(self, level: str, event: str, **fields: Any) -> None:
        """The one logging path: redacted, control characters escaped, text or JSON lines."""
        if LOG_LEVELS[level] < self._level:
            return
        if self.settings.log_format == "json":
            record = {"ts": utc_iso(), "level": level, "event": event}
            record.update((k, redact(v) if isinstance(v, str) else v)
                          for k, v in fields.items() if v is not None)
            line = json.dumps(record)
        else:
            parts = [utc_iso(), level.upper(), event]
            for key, value in fields.items():
                if value is None:
                    continue
                text = str(value)
                parts.append(text if key in ("client", "method", "path") else
                             f"{key}={json.dumps(text) if ' ' in text or not text else text}")
            line = redact(" ".join(parts))
        with self._log_lock:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass


BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nRetry-After: 1\r\nContent-Length: 80\r\n\r\n"
                 + json.dumps({"error": {"type": "unavailable", "message":
                                         "broker at its connection limit, retry"}}
                              ).encode().ljust(80))


class DeadlineWatch:
    """Closes connections whose current read phase overran its deadline (slow headers, idle
    keep-alive): one thread for all connections instead of a timer per socket."""

    def __init__(self) -> None:
        self._deadlines: Dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        thread = threading.Thread(target=self._run, name="seks-deadlines", daemon=True)
        thread.start()

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._deadlines[sock] = time.monotonic() + seconds

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                expired = [s for s, d in self._deadlines.items() if d <= now]
                for sock in expired:
                    del self._deadlines[sock]
            for sock in expired:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class BrokerServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on concurrent connections (503 past it), optional TLS
    (handshake in the connection's own thread), and SO_REUSEPORT for --workers."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: Tuple[str, int], broker: Broker,
                 tls: Optional[ssl.SSLContext] = None, reuse_port: bool = False) -> None:
        self.broker = broker
        self.tls = tls
        self.reuse_port = reuse_port
        self.active = 0
        self._active_lock = threading.Lock()
        self.watch = DeadlineWatch()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, BrokerHandler)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> Tuple[Any, Any]:
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self.active >= self.broker.settings.max_connections
            if not full:
                self.active += 1
        if full:
            try:
                request.settimeout(1.0)
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._active_lock:
                self.active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                request.settimeout(self.broker.settings.header_timeout)
                request.do_handshake()
            super().process_request_thread(request, client_address)
        except (OSError, ssl.SSLError):
            self.shutdown_request(request)
        finally:
            self.watch.disarm(request)
            with self._active_lock:
                self.active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        kind = sys.exc_info()[0]
        self.broker.log_error(f"connection error: {kind.__name__ if kind else 'unknown'}")


class AdminHandler(http.server.BaseHTTPRequestHandler):
    """The admin listener: /metrics (Prometheus text) and /healthz; nothing else."""

    protocol_version = "HTTP/1.1"
    timeout = 10.0
    server_version = "seks-broker-admin"

    def do_GET(self) -> None:
        broker: Broker = self.server.broker  # type: ignore[attr-defined]
        agent_server: BrokerServer = self.server.agent_server  # type: ignore[attr-defined]
        if self.path == "/metrics":
            body = broker.metrics.render(agent_server.active).encode()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
            status = 200
        elif self.path == "/healthz":
            body, ctype, status = b'{"status":"ok"}', "application/json", 200
        else:
            body, ctype, status = b'{"error":{"type":"not_found","message":"not found"}}', \
                "application/json", 404
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def disable_core_dumps() -> None:
    """A core dump of the broker would hold every decrypted key: switch them off."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


def agent_tls_context(settings: Settings) -> Optional[ssl.SSLContext]:
    if not settings.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}") from None
    return context


def serve(settings: Settings, store: Store, master_key: bytes,
          providers: Dict[str, Provider], worker: int = 0) -> int:
    """Run one broker process until SIGTERM/SIGINT, then drain for up to ``grace`` seconds."""
    threading.stack_size(THREAD_STACK_BYTES)
    disable_core_dumps()
    store.checkpoint_in_background()
    broker = Broker(settings, store, master_key, providers)
    server = BrokerServer((settings.host, settings.port), broker, agent_tls_context(settings),
                          reuse_port=settings.workers > 1)
    admin = None
    if settings.admin_port >= 0:
        admin_port = settings.admin_port + max(worker - 1, 0) if settings.admin_port else 0
        admin = http.server.ThreadingHTTPServer((settings.admin_host, admin_port), AdminHandler)
        admin.daemon_threads = True
        admin.broker, admin.agent_server = broker, server  # type: ignore[attr-defined]
        threading.Thread(target=admin.serve_forever, daemon=True).start()
    for name in settings.insecure_upstream:
        broker.log("warning", "insecure-upstream", message=f"TLS certificate verification is "
                   f"OFF for provider {name}: anyone on the path can read its real key")
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if server.tls else "http"
    ready = f"seks-broker listening on {scheme}://{shown}:{port}"
    if admin is not None:
        ready += f" (admin on http://{settings.admin_host}:{admin.server_address[1]})"
    if worker:
        sys.stdout.write(f"ready {port} {admin.server_address[1] if admin else '-'}\n")
        sys.stdout.flush()
    else:
        sys.stderr.write(ready + "\n")
        sys.stderr.flush()

    stop_now = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if broker.draining:                   # a second Ctrl-C (or SIGTERM): stop at once
            stop_now.set()
            return
        broker.draining = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    # a worker's parent relays the operator's signals as SIGTERM; the terminal's own SIGINT to
    # the whole process group would otherwise count as a second one and skip the grace period
    signal.signal(signal.SIGINT, signal.SIG_IGN if worker else stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.socket.close()                 # stop accepting: new connections are refused
        drain(broker, settings.grace, stop_now)
        if admin is not None:
            admin.shutdown()
        broker.pool.close()
    return 0


def drain(broker: "Broker", grace: float, stop_now: threading.Event) -> None:
    """Let requests in flight finish for up to ``grace`` seconds (saying so on stderr), ask
    WebSocket sessions to close, then write the audit row of every exchange still running."""
    running = len(broker.in_flight)
    if running:
        broker.log("warning", "shutdown", message=f"waiting up to {grace:g}s for {running} "
                   f"request(s) in flight ({len(broker.ws_relays)} WebSocket session(s) asked to "
                   f"close); send the signal again (Ctrl-C) to stop now")
    for relay in list(broker.ws_relays):      # a client that stopped reading cannot hold us
        threading.Thread(target=relay.stop, args=(1001, "broker shutting down"),
                         daemon=True).start()
    deadline = time.monotonic() + grace
    while broker.in_flight and time.monotonic() < deadline and not stop_now.is_set():
        time.sleep(0.05)
    cut = broker.cut_in_flight()
    if cut:
        broker.log("warning", "shutdown", message=f"{cut} request(s) cut at shutdown; each has "
                   f"its audit row (outcome error, 'cut at shutdown')")


def serve_workers(settings: Settings, argv: List[str]) -> int:
    """``--workers N``: N broker processes bound to one port with SO_REUSEPORT; the kernel
    spreads connections. Each re-runs this file (no fork), so it works wherever Python does."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError("--workers needs SO_REUSEPORT, which this platform lacks; run one "
                         "process (and put several behind a load balancer if needed)")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    reserve = socket.socket(family, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind((settings.host, settings.port))    # holds the port (port 0 picks one)
    port = reserve.getsockname()[1]
    children: List[Any] = []
    import subprocess
    try:
        for index in range(settings.workers):
            env = dict(os.environ, SEKS_WORKER_INDEX=str(index + 1), SEKS_WORKER_PORT=str(port))
            children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv,
                                             env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
        admin_ports = []
        for child in children:
            line = child.stdout.readline()
            if not line.startswith(b"ready"):
                raise ConfigError("a worker failed to start (see its error above)")
            admin_ports.append(line.split()[2].decode())
    except BaseException:
        for child in children:
            child.terminate()
        raise
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    scheme = "https" if settings.tls_cert else "http"
    admin = "" if settings.admin_port < 0 else \
        f", admin ports {','.join(admin_ports)} on {settings.admin_host}"
    sys.stderr.write(f"seks-broker listening on {scheme}://{shown}:{port} "
                     f"({settings.workers} workers{admin})\n")
    sys.stderr.flush()
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping.is_set() and all(c.poll() is None for c in children):
        stopping.wait(0.5)
    stop(signal.SIGTERM, None)
    codes = []
    for child in children:
        try:
            codes.append(child.wait(timeout=settings.grace + 5))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(1)
    reserve.close()
    return 0 if all(code == 0 for code in codes) else 1


# ============================================================================================
# 9. CLI
# ============================================================================================

class CliParser(argparse.ArgumentParser):
    """argparse that never echoes an argument it refuses (unrecognised, or an invalid choice
    or value): it might be a pasted secret."""

    def error(self, message: str) -> "NoReturn":
        if "unrecognized arguments" in message:
            message = "unrecognized arguments (not shown, in case they hold a secret)"
        message = re.sub(r"invalid (\w+ )?(choice|value): '.*?'( \(choose from[^)]*\))?",
                         r"invalid \1\2 (not shown, in case it holds a secret)\3", message,
                         flags=re.S)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_ttl(text: str) -> int:
    match = TTL_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--ttl takes a number and a unit, like 30m, 12h or 7d (got {text!r})")
    seconds = int(match.group(1)) * TTL_UNITS[match.group(2)]
    if seconds > MAX_TTL_SECONDS:
        raise UsageError("--ttl (or a time ago) is at most 36500d (100 years); leave --ttl out "
                         "for a token that does not expire")
    return seconds


MAX_TTL_SECONDS = 36500 * 86400


def decode_master_key(text: str, source: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{source} must be URL-safe base64 of 32 bytes")
    return key


def load_master_key(db_path: str, environ: Dict[str, str], store: Store) -> bytes:
    """The master key from $SEKS_MASTER_KEY or ``<db>.key`` (created 0600 on first use; refused
    if group or others can read it). Finishes a key rotation that died after its commit."""
    text = environ.get("SEKS_MASTER_KEY", "").strip()
    if text:
        key = decode_master_key(text, "SEKS_MASTER_KEY")
        store.check_master_key(derive_key(key, "key-check"))
        return key
    path = db_path + ".key"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if store.has_secrets():
            raise ConfigError(f"this database holds secrets but its key file {path} is "
                              f"missing; restore it or set SEKS_MASTER_KEY") from None
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.urlsafe_b64encode(key).decode() + "\n")
        store.check_master_key(derive_key(key, "key-check"))
        return key
    if os.name == "posix" and info.st_mode & 0o077:
        raise ConfigError(f"key file {path} is readable by group or others (mode "
                          f"{stat.S_IMODE(info.st_mode):04o}); fix it with: chmod 600 {path}")
    pending = path + ".new"
    for _ in range(3):                       # a rotation may rename files under us: look again
        with open(path, encoding="ascii") as handle:
            key = decode_master_key(handle.read().strip(), path)
        try:
            store.check_master_key(derive_key(key, "key-check"))
            return key
        except ConfigError:
            try:
                with open(pending, encoding="ascii") as handle:
                    new_key = decode_master_key(handle.read().strip(), pending)
            except FileNotFoundError:
                continue                     # renamed over the key file meanwhile: read it
            store.check_master_key(derive_key(new_key, "key-check"))
            with contextlib.suppress(FileNotFoundError):   # another process may finish it
                os.replace(pending, path)    # the rotation committed; finish its last step
            return new_key
    raise ConfigError(f"the key file {path} does not match this database")


def terminal_text(value: Any) -> str:
    """A value as a human-readable view may print it: control characters (C0, DEL, C1, ESC),
    invisible format characters (bidi overrides) and line separators escaped, so text that an
    agent or upstream chose cannot forge or erase lines on the operator's terminal."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isprintable() and unicodedata.category(c) not in ("Cf", "Zl", "Zp")
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def print_table(headers: List[str], rows: List[List[Any]]) -> None:
    cells = [[terminal_text(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def read_secret_value(name: str) -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        value = getpass.getpass(f"Value for secret {name} (input hidden): ")
    else:
        value = sys.stdin.read() if sys.stdin is not None else ""
    return value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="seks_broker.py",
                       description="Credential broker for AI agents: agents hold fake tokens, "
                                   "the broker injects real keys.")
    parser.add_argument("--version", action="version", version=f"seks-broker {__version__}")
    parser.add_argument("--db", help="database path (default: $SEKS_DB, the config file's "
                                      "[server] db, or ./seks.db)")
    parser.add_argument("--config", help="config file (INI; default: $SEKS_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)
    sub.required = True

    p = sub.add_parser("serve", help="run the broker")
    for spec in SETTINGS:
        if spec.name == "db":
            continue
        if spec.kind == "bool" and spec.default is False:
            p.add_argument(spec.flag, dest=spec.name, action="store_const", const="true",
                           help=spec.help)
        elif spec.kind == "bool":
            p.add_argument("--no-" + spec.flag[2:], dest=spec.name, action="store_const",
                           const="false", help=spec.help)
        elif spec.kind == "list":
            p.add_argument(spec.flag, dest=spec.name, action="append", metavar="NAME",
                           help=spec.help + " (repeatable)")
        else:
            p.add_argument(spec.flag, dest=spec.name, metavar=spec.kind.split(":")[0].upper(),
                           help=spec.help)

    p = sub.add_parser("config", help="check a config file")
    csub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=CliParser)
    csub.required = True
    q = csub.add_parser("check", help="validate a config file, explaining each error with its line")
    q.add_argument("path")

    p = sub.add_parser("backup", help="online, consistent copy of the DB (0600; not the key)")
    p.add_argument("path")
    p = sub.add_parser("rotate-master-key",
                       help="re-encrypt every secret and re-key the audit chain under a new key")
    p.add_argument("--force", action="store_true",
                   help="rotate even if the audit chain does not verify (it is re-keyed as is)")

    p = sub.add_parser("secret", help="store, list and remove real keys")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=CliParser)
    ssub.required = True
    q = ssub.add_parser("add", help="store a real key (value from stdin or a hidden prompt)")
    q.add_argument("name")
    q.add_argument("--provider", required=True)
    q.add_argument("value", nargs="?", help=argparse.SUPPRESS)
    q = ssub.add_parser("rotate", help="replace a secret's value; its tokens keep working")
    q.add_argument("name")
    q.add_argument("value", nargs="?", help=argparse.SUPPRESS)
    ssub.add_parser("list", help="names, providers and dates (never values)")
    q = ssub.add_parser("rm", help="delete a secret and revoke its tokens")
    q.add_argument("name")

    p = sub.add_parser("token", help="mint, list and revoke fake tokens")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=CliParser)
    tsub.required = True
    q = tsub.add_parser("mint", help="print a new token for an agent")
    q.add_argument("--secret", required=True)
    q.add_argument("--agent", required=True)
    q.add_argument("--ttl", help="lifetime such as 30m, 12h, 7d (default: no expiry)")
    q.add_argument("--allow-method", action="append", metavar="METHOD",
                   help="allow only this HTTP method (repeatable)")
    q.add_argument("--allow-path", action="append", metavar="PREFIX",
                   help="allow only paths under this prefix (repeatable)")
    q.add_argument("--rate", metavar="N/UNIT", help="token bucket, e.g. 60/m (429 past it)")
    q.add_argument("--max-requests", type=int, metavar="N", help="lifetime request limit")
    q.add_argument("--models", metavar="M1,M2", help="LLM models this token may use")
    q.add_argument("--budget-tokens", type=int, metavar="N",
                   help="LLM tokens (input + output) this token may spend")
    q.add_argument("--format", choices=["token", "env"], default="token",
                   help="token: the token alone; env: the variables the provider's SDK reads")
    tsub.add_parser("list", help="tokens with agent, provider, dates, policy and status")
    q = tsub.add_parser("revoke", help="revoke a token (give the token or its id)")
    q.add_argument("token_or_id")

    p = sub.add_parser("agent", help="add, list, disable and enable agents")
    asub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=CliParser)
    asub.required = True
    for action, text in (("add", "register an agent"), ("disable", "stop all its tokens"),
                         ("enable", "let its tokens work again")):
        q = asub.add_parser(action, help=text)
        q.add_argument("name")
    asub.add_parser("list", help="agents and their state")

    p = sub.add_parser("audit", help="show, follow, verify or prune the audit log")
    p.add_argument("action", nargs="?", choices=["verify", "prune"],
                   help="verify the chain, or prune old rows (with --before)")
    p.add_argument("--agent")
    p.add_argument("--provider")
    p.add_argument("--since", help="1h, 30m, 7d or an ISO date/time (UTC)")
    p.add_argument("--status", help="exact status (404) or class (4xx)")
    p.add_argument("--limit", type=int, default=100, help="newest N rows (default 100)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--follow", action="store_true", help="keep printing new rows")
    p.add_argument("--before", help="with prune: delete rows older than this (ISO date/time, "
                                    "or 1h, 7d... ago)")

    p = sub.add_parser("usage", help="requests and LLM tokens per agent, provider and model")
    p.add_argument("--agent")
    p.add_argument("--since", help="1h, 30m, 7d or an ISO date/time (UTC)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return parser


def token_status(expires_at: Optional[float], revoked_at: Optional[str], now: float) -> str:
    if revoked_at:
        return "revoked"
    if expires_at is not None and now >= expires_at:
        return "expired"
    return "active"


def run_command(args: argparse.Namespace, environ: Dict[str, str], argv: List[str]) -> int:
    if args.command == "config":
        return cmd_config_check(args.path)
    flags: Dict[str, Any] = {"db": args.db}
    if args.command == "serve":
        for spec in SETTINGS:
            value = getattr(args, spec.name, None)
            if spec.name != "db" and value is not None:
                flags[spec.name] = ",".join(value) if isinstance(value, list) else value
    settings = resolve_settings(args.config, environ, flags)
    providers = load_providers(settings, strict=args.command == "serve")
    db_path = settings.db
    store = Store(db_path)
    try:
        if args.command == "serve":
            master_key = load_master_key(db_path, environ, store)
            worker = int(environ.get("SEKS_WORKER_INDEX", "0") or 0)
            if settings.workers > 1 and not worker:
                store.close()
                return serve_workers(settings, argv)
            if worker:
                settings.port = int(environ["SEKS_WORKER_PORT"])
            return serve(settings, store, master_key, providers, worker)
        if args.command == "secret":
            return cmd_secret(args, store, db_path, environ, providers)
        if args.command == "token":
            return cmd_token(args, store, providers, db_path, environ, settings)
        if args.command == "agent":
            return cmd_agent(args, store)
        if args.command == "audit":
            return cmd_audit(args, store, db_path, environ)
        if args.command == "usage":
            return cmd_usage(args, store)
        if args.command == "backup":
            return cmd_backup(args.path, store, db_path)
        if args.command == "rotate-master-key":
            return cmd_rotate_master_key(args, store, db_path, environ)
    finally:
        store.close()
    return 2


def cmd_config_check(path: str) -> int:
    """Validate a config file: every error with its file and line; exit 1 if any."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        sys.stderr.write(f"error: cannot read {path}: {exc.strerror}\n")
        return 1
    except UnicodeDecodeError:
        sys.stderr.write(f"error: {path} is not UTF-8 text\n")
        return 1
    settings = Settings()
    errors = read_config(text, path, settings)
    providers: Dict[str, Provider] = {}
    try:
        providers = load_providers(settings)
    except ConfigError as exc:
        if not errors:
            errors.append(f"{path}: {exc}")
    problem = "" if errors else settings_problem(settings)
    if problem:
        errors.append(f"{path}: {problem}")
    if errors:
        for error in errors:
            print(error)
        print(f"{len(errors)} error(s)")
        return 1
    custom = ", ".join(sorted(settings.custom_providers)) or "none"
    print(f"{path}: OK (custom providers: {custom}; {len(providers)} providers in all)")
    return 0


def cmd_secret(args: argparse.Namespace, store: Store, db_path: str, environ: Dict[str, str],
               providers: Dict[str, Provider]) -> int:
    if args.action in ("add", "rotate"):
        if args.value is not None:
            sys.stderr.write("error: refusing a secret on the command line (every local user can "
                             "read it with ps). Pipe it on stdin instead, e.g.\n"
                             f"  printf %s \"$KEY\" | seks_broker.py secret {args.action} "
                             f"{args.name} ...\nor run the command on a terminal to be prompted "
                             "with hidden input.\n")
            return 2
        if not NAME_RE.match(args.name):
            raise UsageError("secret names are 1-64 letters, digits, '.', '_' or '-'")
        if args.action == "add":
            provider = providers.get(args.provider) or next(
                (p for p in providers.values() if args.provider in p.aliases), None)
            if provider is None:
                raise UsageError(f"unknown provider {args.provider!r}; known: "
                                 + ", ".join(sorted(providers)))
            provider_name = provider.name
        else:
            found = store.get_secret(args.name)
            if found is None:
                raise ConfigError(f"no secret named {args.name!r}")
            provider_name = found[0]
        value = read_secret_value(args.name)      # first: the key is loaded after the prompt
        master = load_master_key(db_path, environ, store)
        cipher = SecretCipher(master)
        if not value:
            raise ConfigError("empty secret value")
        if "seks_" in value:
            raise ConfigError("that looks like a seks fake token, not a real key")
        ciphertext = cipher.encrypt(value.encode(), secret_ad(args.name, provider_name))
        store.put_secret(args.name, provider_name, ciphertext, replace=args.action == "rotate",
                         check=derive_key(master, "key-check"))
        verb = "stored" if args.action == "add" else "rotated"
        print(f"{verb} secret {args.name} for {provider_name}", file=sys.stderr)
        return 0
    if args.action == "list":
        rows = [[n, p, c, u] for n, p, c, u in store.list_secrets()]
        print_table(["NAME", "PROVIDER", "CREATED", "UPDATED"], rows)
        return 0
    if args.action == "rm":
        revoked = store.remove_secret(args.name)
        print(f"removed secret {args.name}; revoked {revoked} token(s)", file=sys.stderr)
        return 0
    return 2


def cmd_token(args: argparse.Namespace, store: Store, providers: Dict[str, Provider],
              db_path: str, environ: Dict[str, str], settings: Settings) -> int:
    if args.action == "mint":
        found = store.get_secret(args.secret)
        if found is None:
            raise ConfigError(f"no secret named {args.secret!r}")
        provider_name = found[0]
        provider = providers.get(provider_name)
        if provider is None:
            raise ConfigError(f"secret {args.secret!r} is for provider {provider_name!r}, "
                              f"which is not configured")
        if not NAME_RE.match(args.agent):
            raise UsageError("agent names are 1-64 letters, digits, '.', '_' or '-'")
        expires = time.time() + parse_ttl(args.ttl) if args.ttl else None
        policy = make_policy(args.allow_method, args.allow_path, args.rate, args.max_requests,
                             args.models, args.budget_tokens)
        if not provider.usage and ("models" in policy or "budget_tokens" in policy):
            raise UsageError(f"--models and --budget-tokens apply to LLM providers (those with "
                             f"'usage' set); {provider.name} has none")
        real_key = ""
        if provider.token_shape == "bot-id":
            cipher = SecretCipher(load_master_key(db_path, environ, store))
            real_key = cipher.decrypt(found[1], secret_ad(args.secret, provider_name)).decode()
        if store.add_agent(args.agent, exist_ok=True):
            print(f"created agent {args.agent}", file=sys.stderr)
        token = new_token(provider, real_key)
        store.add_token(new_token_id(), token_digest(token), args.secret, provider_name,
                        args.agent, expires, policy)
        if args.format == "env":
            print(env_handoff(provider, token, settings.agent_url()))
        else:
            print(token)
        return 0
    if args.action == "list":
        now = time.time()
        rows = []
        for (tid, agent, provider, secret, created, expires, revoked, policy, requests,
             used) in store.list_tokens():
            rows.append([tid, agent, provider, secret, created,
                         utc_iso(expires) if expires else "never",
                         token_status(expires, revoked, now), requests or 0, used or 0,
                         describe_policy(json.loads(policy or "{}"))])
        print_table(["ID", "AGENT", "PROVIDER", "SECRET", "CREATED", "EXPIRES", "STATUS",
                     "REQUESTS", "TOKENS", "POLICY"], rows)
        return 0
    if args.action == "revoke":
        value = args.token_or_id.strip()
        if value == "-":
            value = sys.stdin.read().strip()
        if re.match(r"^tok_[0-9a-f]{12}$", value):
            token_id = store.revoke_token(None, value)
        else:
            token_id = store.revoke_token(token_digest(value), None)
        print(f"revoked {token_id}", file=sys.stderr)
        return 0
    return 2


def env_handoff(provider: Provider, token: str, broker_url: str) -> str:
    """The variables the provider's SDK reads, pointing at the broker: KEY=value lines for
    ``eval``/``set -a`` or a .env file."""
    if provider.env:
        base_part, key_var = provider.env.split()
        base_var, _, suffix = base_part.partition("=")
    else:
        prefix = provider.name.upper().replace("-", "_")
        base_var, suffix, key_var = f"{prefix}_BASE_URL", "", f"{prefix}_API_KEY"
    return (f"{base_var}={broker_url}/{provider.name}{suffix}\n"
            f"{key_var}={token}")


def cmd_backup(path: str, store: Store, db_path: str) -> int:
    """Online, consistent copy through sqlite's backup API, created 0600; never overwrites."""
    try:                                          # O_EXCL: not even through a dangling link
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise ConfigError(f"{path} exists; choose a new file name") from None
    try:
        target = sqlite3.connect(path)
        with store.connection() as db:
            db.backup(target)
        target.close()
    except sqlite3.Error:
        os.unlink(path)
        raise
    print(f"backed up {db_path} to {path} (mode 0600). The master key is not in the backup: "
          f"keep {db_path}.key or SEKS_MASTER_KEY safe separately.", file=sys.stderr)
    return 0


def cmd_rotate_master_key(args: argparse.Namespace, store: Store, db_path: str,
                          environ: Dict[str, str]) -> int:
    """New master key: secrets re-encrypted and the audit chain re-keyed in one transaction.
    With a key file, the new key is written to ``<db>.key.new`` first and renamed over the old
    one only after the commit; a run that dies before the commit leaves the old state intact,
    and one that dies after it is finished by the next command (the DB tells which key it
    wants). One rotation at a time: a second one is refused while the first runs."""
    lock = rotation_lock(db_path)
    try:
        return _rotate_master_key(args, store, db_path, environ)
    finally:
        lock.close()


def rotation_lock(db_path: str) -> Any:
    """An exclusive lock on ``<db>.key.lock`` for the whole rotation (POSIX flock; where there
    is none, rotations must simply not overlap)."""
    path = db_path + ".key.lock"
    create_private_file(path)
    handle = open(path, "rb")
    try:
        import fcntl
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        handle.close()
        raise ConfigError("another rotate-master-key is running on this database") from None
    return handle


def fsync_directory(path: str) -> None:
    """Make a rename in ``path``'s directory durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rotate_master_key(args: argparse.Namespace, store: Store, db_path: str,
                       environ: Dict[str, str]) -> int:
    old_key = load_master_key(db_path, environ, store)
    from_env = bool(environ.get("SEKS_MASTER_KEY", "").strip())
    key_path = db_path + ".key"
    if from_env:
        if sys.stdin is not None and sys.stdin.isatty():
            text = getpass.getpass("New master key (urlsafe base64 of 32 bytes, hidden): ")
        else:
            text = sys.stdin.read() if sys.stdin is not None else ""
        new_key = decode_master_key(text.strip(), "the new key on stdin")
    else:
        new_key = secrets.token_bytes(32)
    if hmac.compare_digest(new_key, old_key):
        raise ConfigError("the new master key equals the old one")
    old_audit, new_audit = derive_key(old_key, "audit"), derive_key(new_key, "audit")
    ok, message = verify_audit_chain(old_audit, store.audit_rows(), store.audit_anchor())
    if not ok and not args.force:
        raise ConfigError(f"audit chain does not verify ({message}); re-keying would hide "
                          f"that. Investigate, or pass --force")
    pending = key_path + ".new"
    if not from_env:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pending)
        fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.urlsafe_b64encode(new_key).decode() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    count = store.rekey(SecretCipher(old_key), SecretCipher(new_key), old_audit, new_audit,
                        derive_key(new_key, "key-check"), force=args.force)
    if from_env:
        print(f"re-encrypted {count} secret(s); set SEKS_MASTER_KEY to the new key and restart "
              f"running brokers now (until then they answer 503)", file=sys.stderr)
    else:
        try:
            os.replace(pending, key_path)
        except FileNotFoundError:
            pass                                  # a running broker finished the rename first
        fsync_directory(key_path)
        print(f"re-encrypted {count} secret(s) under a new key in {key_path}; running brokers "
              f"load it on their next request", file=sys.stderr)
    return 0


def cmd_agent(args: argparse.Namespace, store: Store) -> int:
    if args.action == "add":
        if not NAME_RE.match(args.name):
            raise UsageError("agent names are 1-64 letters, digits, '.', '_' or '-'")
        store.add_agent(args.name)
        print(f"added agent {args.name}", file=sys.stderr)
    elif args.action in ("disable", "enable"):
        store.set_agent_disabled(args.name, args.action == "disable")
        print(f"{args.action}d agent {args.name}", file=sys.stderr)
    elif args.action == "list":
        rows = [[n, c, "disabled" if d else "enabled", t] for n, c, d, t in store.list_agents()]
        print_table(["NAME", "CREATED", "STATE", "ACTIVE TOKENS"], rows)
    return 0


def parse_since(text: str, now: Optional[float] = None) -> str:
    """``1h``/``30m``/``7d`` ago, or an ISO date or date-time (UTC), as an audit timestamp."""
    text = text.strip()
    if TTL_RE.match(text):
        return utc_iso((time.time() if now is None else now) - parse_ttl(text))
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"expected 1h, 30m, 7d or an ISO date/time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return utc_iso(moment.timestamp())


def human_size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def human_duration(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.1f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    return f"{int(ms // 60000)}m{int(ms % 60000 / 1000):02d}s"


def audit_filter(args: argparse.Namespace) -> Tuple[str, Tuple[Any, ...]]:
    clauses, params = [], []
    if getattr(args, "agent", None):
        clauses.append("agent = ?")
        params.append(args.agent)
    if getattr(args, "provider", None):
        clauses.append("provider = ?")
        params.append(args.provider)
    if getattr(args, "since", None):
        clauses.append("ts >= ?")
        params.append(parse_since(args.since))
    status = getattr(args, "status", None)
    if status:
        match = re.match(r"^([1-5])xx$", status.strip().lower())
        if match:
            clauses.append("status >= ? AND status < ?")
            params += [int(match.group(1)) * 100, int(match.group(1)) * 100 + 100]
        elif re.fullmatch(r"[0-9]{3}", status.strip()):
            clauses.append("status = ?")
            params.append(int(status))
        else:
            raise UsageError("--status takes a code (404) or a class (4xx)")
    return " AND ".join(clauses), tuple(params)


def print_audit(rows: List[AuditRow], as_json: bool, header: bool = True) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row.as_dict(), sort_keys=True))
        return
    table = [[r.id, r.ts, r.agent or "-", r.token_id or "-", r.provider or "-",
              (r.model or "-")[:40], r.method or "-", (r.path or "-")[:60], r.status or "-",
              human_size(r.bytes_in), human_size(r.bytes_out), human_duration(r.duration_ms),
              r.outcome + (f": {r.reason}" if r.reason and r.outcome != "ok" else "")]
             for r in rows]
    if header:
        print_table(["ID", "TIME", "AGENT", "TOKEN", "PROVIDER", "MODEL", "METHOD", "PATH",
                     "STATUS", "IN", "OUT", "DURATION", "OUTCOME"], table)
    else:
        for row in table:
            print("  ".join(terminal_text(c) for c in row))
    sys.stdout.flush()


def cmd_audit(args: argparse.Namespace, store: Store, db_path: str,
              environ: Dict[str, str]) -> int:
    master = load_master_key(db_path, environ, store)
    key, keys_check = derive_key(master, "audit"), derive_key(master, "key-check")
    if args.action == "verify":
        rows = store.audit_rows()
        ok, message = verify_audit_chain(key, rows, store.audit_anchor())
        print(message)
        if ok and rows:
            print(f"head: row {rows[-1].id} mac {rows[-1].mac.hex()[:32]} (keep it elsewhere to "
                  f"detect a truncated tail later)")
        return 0 if ok else 1
    if args.action == "prune":
        if not args.before:
            raise ConfigError("audit prune needs --before DATE")
        deleted = store.prune_audit(key, parse_since(args.before), keys_check)
        print(f"pruned {deleted} row(s); the chain still verifies from the prune record")
        return 0
    where, params = audit_filter(args)
    rows = store.audit_rows(where, params, limit=args.limit)
    print_audit(rows, args.json)
    if not args.follow:
        return 0
    last = rows[-1].id if rows else store.last_audit_id()
    try:
        while True:
            time.sleep(0.5)
            fresh = store.audit_rows(where, params, after_id=last)
            if fresh:
                print_audit(fresh, args.json, header=False)
                last = fresh[-1].id
    except KeyboardInterrupt:
        return 0


def cmd_usage(args: argparse.Namespace, store: Store) -> int:
    where, params = audit_filter(args)
    rows = store.usage_rows(where, params)
    if args.json:
        for agent, provider, model, count, tin, tout in rows:
            print(json.dumps({"agent": agent, "provider": provider, "model": model or None,
                              "requests": count, "tokens_in": tin, "tokens_out": tout,
                              "tokens": tin + tout}, sort_keys=True))
        return 0
    print_table(["AGENT", "PROVIDER", "MODEL", "REQUESTS", "TOKENS IN", "TOKENS OUT", "TOTAL"],
                [[a or "-", p or "-", m or "-", c, f"{i:,}", f"{o:,}", f"{i + o:,}"]
                 for a, p, m, c, i, o in rows])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    os.umask(0o077)             # DB, WAL, SHM and key files are created private
    disable_core_dumps()        # every command may hold a decrypted key (serve, token mint, ...)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "secret" and getattr(args, "action", "") in ("add", "rotate"):
            args.value = extra[0]            # refused below with a how-to, never echoed
        else:
            parser.error("unrecognized arguments")
    try:
        return run_command(args, dict(os.environ), list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        sys.stderr.write(f"error: {redact(str(exc))}\n")
        return 2 if isinstance(exc, UsageError) else 1
    except sqlite3.Error as exc:
        sys.stderr.write(f"error: database: {exc}\n")
        return 1
    except OSError as exc:                    # e.g. the port is taken, a file is unreadable
        sys.stderr.write(f"error: {redact(str(exc))}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
