#!/usr/bin/env python3
"""seks-broker: a credential broker for AI agents, in one standard-library file.

An agent holds only a fake token (``seks_openai_…``) and points its normal SDK at this broker.
The broker checks the token, swaps in the real key, forwards the request to the provider's
configured upstream and streams the answer back. A leaked fake token is worthless anywhere but
here, and here it is narrow, revocable and audited.

THREAT MODEL (the full text is THREAT_MODEL.md beside this file)
  Trusted: the operator, the master key, the configured upstreams (each with its own key only).
  Untrusted: the agent (it may be prompt-injected), a thief of a fake token, a thief of a DB copy
  without the key file, other local users. Out of scope: root on this host, a compromised
  upstream, an agent misusing the capability it was granted (limits narrow it, nothing removes it).

WHERE EACH PROMISE IS HELD, in reading order (sections 3 and 4 are the reviewer's path)
  1 The real key travels only to its provider's configured upstream: upstream_target
      (validate_path, validate_query) makes every Target the agent steers (config_target: OAuth
      endpoints from config); UpstreamPool.connect opens sockets from a Target and nothing else;
      redirects are relayed, never followed.
  2 The agent never receives the real key: AgentWriter is the one exit to the agent and owns
      the Scrubber (every key variant, also cut off: any run holding its first or last third;
      parts_pairs covers every part of a secret); swap_credentials strips every credential
      place and fills the injection places from the secret's parts; redact and
      masked_request_path make logs and audit rows safe. An agent running as the operator's OS
      user can read the master key: `run` warns, and `run --user` starts it as another user.
  3 A fake token is narrow and revocable: token_digest, check_token, then decide (methods, paths,
      models, WebSocket and budget rules, what an AWS secret allows) and check_limits (rate,
      request count, budget; one DB transaction in Store.admit, budget_reservation's bound held
      until the answer's usage settles it). TokenCache trusts an entry only while the DB's
      change counter is unchanged, so a revocation bites on the next request in every process;
      a delegated token (delegated_policy: never wider than its parent) dies with its parent.
  4 A stolen DB reveals nothing usable: SecretCipher (its docstring is the format spec).
      Section 6 computes credentials beyond one key (aws_sign, jwt_rs256, oauth_request): pure,
      pinned by published vectors; what they make goes out only through swap and target.
  5 Nothing on the command line: read_secret_value; CliParser never echoes a refused value.
  6 Hostile input gets a clear error and changes nothing: read_head, body_framing and
      BodyReader are the one parser of heads, framing and chunked bodies in both directions;
      named limits below, each checked in one place; terminal_text guards the operator's screen.
  7 Every use is accountable: audit_mac / verify_audit_chain; Broker.record writes one chained
      row per request, allowed or denied; drain writes the rows of exchanges cut at shutdown.

SECTIONS: 1 constants 2 errors 3 security core 4 the one exit to the agent 5 wire 6 provider
mechanics 7 store 8 policy state 9 upstream 10 relay 11 HTTP handler 12 server 13 CLI (banners).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import collections
import configparser
import contextlib
import copy
import datetime
import difflib
import errno
import email.message
import email.utils
import getpass
import hashlib
import hmac
import html
import http.client
import http.server
import json
import os
import queue
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
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Tuple

__version__ = "0.2.0"

# ============================================================================================
# 1. CONSTANTS AND LIMITS
# ============================================================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_DB = "seks.db"

MAX_REQUEST_LINE = 8 * 1024          # longer request line -> 414
MAX_HEADER_BYTES = 32 * 1024         # all header lines of a request together -> 431
MAX_HEADER_COUNT = 100               # more header fields -> 431 (an upstream's: 502)
MAX_UPSTREAM_HEAD = 64 * 1024        # status line and headers of an upstream answer -> 502
MAX_BODY_BYTES = 512 * 1024 * 1024   # request body -> 413 (OpenAI's file limit is 512 MB)
MAX_CHUNK_LINE = 1024                # a chunk-size line -> 400 (an upstream's: 502)
MAX_INSPECT_BODY = 16 * 1024 * 1024  # largest body read whole to check --models / a budget
MAX_INFLATE = 16 * 1024 * 1024       # bytes one read of a compressed answer may inflate to
MAX_CONNECTIONS = 2048               # concurrent agent connections; the next one gets 503
CLIENT_TIMEOUT_S = 60.0              # idle or stalled agent socket is closed
HEADER_TIMEOUT_S = 20.0              # a whole request head must arrive within this
MIN_BODY_RATE = 1024                 # bytes/s a request body must average after client_timeout
UPSTREAM_CONNECT_TIMEOUT_S = 10.0    # TCP + TLS connect to an upstream -> 504
UPSTREAM_TIMEOUT_S = 300.0           # silence from an upstream while waiting for bytes -> 504
STREAM_CHUNK = 1024 * 1024           # largest single read while relaying a body
INLINE_BODY_MAX = 64 * 1024          # bodies up to this size are sent with their head at once
THREAD_STACK_BYTES = 512 * 1024      # per-connection thread stack (1,000 streams stay small)
TOKEN_RANDOM_BYTES = 32              # 256 bits of randomness in every fake token
MAX_TTL_SECONDS = 36500 * 86400      # --ttl and "ago" values are at most 100 years

# Headers that describe one hop, never forwarded in either direction (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Request headers the broker sets itself or must not pass upstream.
REQUEST_HEADERS_REPLACED = frozenset({"host", "content-length", "expect", "accept-encoding"})
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Path segments of batch and background jobs, whose usage arrives where the meter never looks.
ASYNC_JOB_SEGMENTS = frozenset({"batches", "file_batches", "fine_tuning", "batchGenerateContent",
                                "asyncBatchEmbedContent", "predictLongRunning"})

# Built-in providers, written in the same INI format as custom providers in a config file.
#   upstream  scheme://host[:port][/base-path] that <rest> is appended to; "none": each operator
#             has their own (a site, a resource), so the route answers 503 until one is set
#   token     where the agent's fake token may arrive, one place a line:
#               header NAME [PREFIX] | query PARAM | path-prefix PREFIX [PREFIX ...] |
#               basic (one half of Authorization: Basic user:password; re-encoded, inject=same)
#   inject    where the real key goes: header NAME [PREFIX], query PARAM, or "same" (where it came);
#             more header lines put it in several headers (Supabase: apikey and Authorization)
#             (token and inject are "header Authorization Bearer" where a section leaves them out)
#   usage     how usage is reported in answers (openai | anthropic | gemini), LLM providers only
#   token_shape  bot-id: fake tokens look like "<bot id>:seks_…" (clients check Telegram's shape)
#   errors    telegram: broker errors use Telegram's {"ok": false, "error_code", "description"}
#   env       what `token mint --format env` prints: BASE_VAR=<path after the route> KEY_VAR
#   gateway   discord: /discord/gateway is a WebSocket route to the configured Discord gateway,
#             with the token checked and swapped inside IDENTIFY/RESUME (section 10)
BUILTIN_PROVIDERS_INI = """
[openai]
upstream = https://api.openai.com
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
env = GITHUB_API_URL= GITHUB_TOKEN

[notion]
upstream = https://api.notion.com
env = NOTION_BASE_URL= NOTION_TOKEN

[cloudflare]
upstream = https://api.cloudflare.com
env = CLOUDFLARE_BASE_URL=/client/v4 CLOUDFLARE_API_TOKEN

[brave]
upstream = https://api.search.brave.com
token = header X-Subscription-Token
inject = header X-Subscription-Token
env = BRAVE_BASE_URL=/res/v1 BRAVE_API_KEY

[github-git]
upstream = https://github.com
token = basic
inject = same
env = GITHUB_GIT_URL= GITHUB_GIT_TOKEN

[openrouter]
upstream = https://openrouter.ai/api
usage = openai
env = OPENROUTER_BASE_URL=/v1 OPENROUTER_API_KEY

[mistral]
upstream = https://api.mistral.ai
usage = openai
env = MISTRAL_SERVER_URL= MISTRAL_API_KEY

[xai]
upstream = https://api.x.ai
usage = openai
env = XAI_BASE_URL=/v1 XAI_API_KEY

[deepseek]
upstream = https://api.deepseek.com
usage = openai
env = DEEPSEEK_BASE_URL= DEEPSEEK_API_KEY

[together]
upstream = https://api.together.xyz
usage = openai
env = TOGETHER_BASE_URL=/v1 TOGETHER_API_KEY

[fireworks]
upstream = https://api.fireworks.ai/inference
usage = openai
env = FIREWORKS_BASE_URL=/v1 FIREWORKS_API_KEY

[perplexity]
upstream = https://api.perplexity.ai
usage = openai
env = PERPLEXITY_BASE_URL= PERPLEXITY_API_KEY

[cohere]
upstream = https://api.cohere.com
env = CO_API_URL= CO_API_KEY

[huggingface]
upstream = https://router.huggingface.co
env = HF_INFERENCE_ENDPOINT= HF_TOKEN

[slack]
upstream = https://slack.com
env = SLACK_API_URL=/api/ SLACK_BOT_TOKEN

[linear]
upstream = https://api.linear.app
token = header Authorization
inject = header Authorization
env = LINEAR_API_URL=/graphql LINEAR_API_KEY

[sentry]
upstream = https://sentry.io
env = SENTRY_URL= SENTRY_AUTH_TOKEN

[stripe]
upstream = https://api.stripe.com
token = header Authorization Bearer
    basic
env = STRIPE_API_BASE= STRIPE_API_KEY

[sendgrid]
upstream = https://api.sendgrid.com
env = SENDGRID_HOST= SENDGRID_API_KEY

[resend]
upstream = https://api.resend.com
env = RESEND_API_URL= RESEND_BASE_URL= RESEND_API_KEY

[twilio]
upstream = https://api.twilio.com
token = basic
inject = basic {account_sid}:{auth_token}
public = account_sid
env = TWILIO_API_BASE= TWILIO_AUTH_TOKEN TWILIO_ACCOUNT_SID={account_sid}

[mailgun]
upstream = https://api.mailgun.net
token = basic
inject = basic api:{key}
env = MAILGUN_API_BASE= MAILGUN_API_KEY

[pypi]
upstream = https://upload.pypi.org
token = basic
inject = same
env = TWINE_REPOSITORY_URL=/legacy/ TWINE_PASSWORD

[atlassian]
upstream = none
token = basic
    header Authorization Bearer
inject = basic {email}:{api_token}
public = email
env = ATLASSIAN_URL= ATLASSIAN_API_TOKEN ATLASSIAN_EMAIL={email}

[azure-openai]
upstream = none
token = header api-key
    header Authorization Bearer
inject = header api-key
usage = openai
env = AZURE_OPENAI_ENDPOINT= AZURE_OPENAI_API_KEY

[supabase]
upstream = none
token = header apikey
    header Authorization Bearer
inject = header apikey
    header Authorization Bearer
env = SUPABASE_URL= SUPABASE_KEY

[datadog]
upstream = https://api.datadoghq.com
token = header DD-API-KEY
    header DD-APPLICATION-KEY
inject = header DD-API-KEY {api_key}
    header DD-APPLICATION-KEY {app_key}
parts = api_key app_key?
env = DATADOG_HOST= DD_API_KEY DD_APP_KEY

[aws]
upstream = https://amazonaws.com
token = aws
inject = same
parts = access_key_id secret_access_key session_token? role_arn? services? regions?
public = services regions
usage = bedrock
errors = aws

[gmail]
upstream = https://gmail.googleapis.com
inject = header Authorization Bearer {access_token}
parts = client_id client_secret refresh_token token_url? auth_url? scope?
oauth = refresh_token
public = client_id token_url auth_url scope
token_url = https://oauth2.googleapis.com/token
auth_url = https://accounts.google.com/o/oauth2/v2/auth
env = GMAIL_API_URL= GOOGLE_ACCESS_TOKEN

[google-calendar]
like = gmail
upstream = https://www.googleapis.com
env = GOOGLE_CALENDAR_API_URL=/calendar/v3 GOOGLE_ACCESS_TOKEN

[google-drive]
like = google-calendar
env = GOOGLE_DRIVE_API_URL=/drive/v3 GOOGLE_ACCESS_TOKEN

[vertex]
upstream = https://aiplatform.googleapis.com
region = gcp
inject = header Authorization Bearer {access_token}
parts = private_key client_email token_uri? token_url? scope? type? project_id? private_key_id?
    client_id? auth_uri? auth_provider_x509_cert_url? client_x509_cert_url? universe_domain?
oauth = jwt_bearer
public = client_email token_uri token_url scope type project_id private_key_id client_id auth_uri
    auth_provider_x509_cert_url client_x509_cert_url universe_domain
token_url = https://oauth2.googleapis.com/token
env = VERTEX_BASE_URL=/us-central1 GOOGLE_ACCESS_TOKEN

[msgraph]
upstream = https://graph.microsoft.com
inject = header Authorization Bearer {access_token}
parts = client_id client_secret? refresh_token? token_url? device_url? scope?
oauth = refresh_token client_credentials
public = client_id token_url device_url scope
token_url = https://login.microsoftonline.com/common/oauth2/v2.0/token
device_url = https://login.microsoftonline.com/common/oauth2/v2.0/devicecode
env = MSGRAPH_API_URL=/v1.0 MSGRAPH_ACCESS_TOKEN

[slack-oauth]
upstream = https://slack.com
inject = header Authorization Bearer {access_token}
parts = client_id client_secret refresh_token token_url?
oauth = refresh_token
public = client_id token_url
token_url = https://slack.com/api/oauth.v2.access
env = SLACK_API_URL=/api/ SLACK_BOT_TOKEN

[github-app]
upstream = https://api.github.com
token = header Authorization Bearer
    header Authorization token
inject = header Authorization Bearer {access_token}
parts = app_id private_key installation_id api_url?
oauth = github_app
public = app_id installation_id api_url
env = GITHUB_API_URL= GITHUB_TOKEN

[postmark]
upstream = https://api.postmarkapp.com
token = header X-Postmark-Server-Token
    header X-Postmark-Account-Token
inject = same
env = POSTMARK_API_URL= POSTMARK_SERVER_TOKEN
"""

# Binary media: streamed uploads of these types are not scanned for leaked tokens (scanning
# costs about 0.5 ms per MiB: a 256 MiB upload went from 1,361 to 888 MiB/s on the bench;
# prompts, messages and forms are text; whole bodies up to 64 KiB always are), and answers of
# these types are scrubbed for whole keys only, not cut-off ones (Scrubber.binary).
BINARY_MEDIA = ("application/octet-stream", "binary/octet-stream", "audio/", "video/", "image/")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PROVIDER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
TOKEN_CHARS = rb"!#$%&'*+.^_`|~0-9A-Za-z-"        # RFC 9110 tchar: header names, methods
HEADER_NAME_RE = re.compile(rb"^[" + TOKEN_CHARS + rb"]+\Z")
HEADER_NAMES_RE = re.compile(rb"^[%s]+(?::[%s]+)*\Z" % (TOKEN_CHARS, TOKEN_CHARS))
BAD_VALUE_BYTES_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # in a header value
CONTENT_LENGTH_RE = re.compile(r"^[0-9]{1,18}\Z")
TTL_RE = re.compile(r"^(\d+)([smhd])\Z")
TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HTTP_REASONS = {code: phrase for code, (phrase, _) in
                http.server.BaseHTTPRequestHandler.responses.items()}


class CredentialPlace:
    """One place a credential travels: a header (with an optional scheme prefix), a query
    parameter, a path segment after one of some prefixes (Telegram's ``/bot<T>/``), or one
    half of ``Authorization: Basic base64(user:password)`` (git, pip, Stripe's curl -u). An
    injection place has a value: which parts of the secret go there (``{key}``, a single
    value; ``{account_sid}:{auth_token}`` for a Basic pair built from two parts)."""

    __slots__ = ("kind", "name", "prefixes", "value")

    def __init__(self, kind: str, name: str = "", prefixes: Tuple[str, ...] = (),
                 value: str = "{key}") -> None:
        self.kind = kind          # "header" | "query" | "path" | "basic"
        self.name = name          # header name (lower case) or query parameter
        self.prefixes = prefixes  # header scheme words ("Bearer") or path prefixes ("/bot")
        self.value = value        # the value template ({part} names the secret's parts)

    def __repr__(self) -> str:
        return f"CredentialPlace({self.kind} {self.name} {' '.join(self.prefixes)})".strip()


PART_RE = re.compile(r"\{([a-z][a-z0-9_]{0,31})\}")


class Provider:
    """A route: name, upstream base, where tokens arrive and where the real key goes, and
    the parts its secrets hold (``key`` alone unless its injection names others)."""

    __slots__ = ("name", "upstream", "scheme", "host", "port", "base_path", "token_places",
                 "inject", "usage", "aliases", "token_shape", "errors", "env", "gateway", "also",
                 "parts", "optional", "public", "oauth", "token_url", "device_url", "region",
                 "auth_url", "aws")

    def __init__(self, name: str, upstream: str, token_places: List[CredentialPlace],
                 inject: Optional[CredentialPlace], usage: str = "",
                 aliases: Tuple[str, ...] = (), token_shape: str = "",
                 errors: str = "", env: str = "", gateway: str = "",
                 also: Tuple[CredentialPlace, ...] = (), parts: Tuple[str, ...] = (),
                 optional: Tuple[str, ...] = (), public: Tuple[str, ...] = (),
                 oauth: Tuple[str, ...] = (), token_url: str = "", device_url: str = "",
                 region: str = "", auth_url: str = "") -> None:
        self.name = name
        self.upstream = upstream          # "none": a per-site API, closed until configured
        self.scheme, self.host, self.port, self.base_path = parse_upstream_base(upstream) \
            if upstream != "none" else ("", "", 0, "")
        self.token_places = token_places
        self.aws = any(p.kind == "aws" for p in token_places)   # AWS: signed, /<service>/<region>
        self.inject = inject      # None means "same place the token arrived"
        self.usage = usage
        self.aliases = aliases
        self.token_shape = token_shape
        self.errors = errors
        self.env = env
        self.gateway = gateway
        self.also = also          # more headers that get the key too (Supabase: two)
        named = [n for p in (inject,) + also if p is not None for n in PART_RE.findall(p.value)]
        self.parts = parts or tuple(dict.fromkeys(named or ["key"]))   # every part, in order
        self.optional = optional  # parts a secret may lack ("also" places using one are left
        self.public = public      # out); identifiers, not secrets: never masked in answers
        self.oauth = oauth        # grants the broker runs to mint access tokens ({access_token})
        self.token_url, self.device_url = token_url, device_url    # their default endpoints
        self.region = region      # "gcp": routes are /NAME/<region>/..., the host regional
        self.auth_url = auth_url  # the consent page of the authorization code flow (PKCE)

    def with_upstream(self, upstream: str) -> "Provider":
        return Provider(self.name, upstream, self.token_places, self.inject, self.usage,
                        self.aliases, self.token_shape, self.errors, self.env, self.gateway,
                        self.also, self.parts, self.optional, self.public, self.oauth,
                        self.token_url, self.device_url, self.region, self.auth_url)

    def __repr__(self) -> str:
        return f"Provider({self.name} -> {self.upstream})"


# ============================================================================================
# 2. ERRORS
# ============================================================================================

class SeksError(Exception):
    """The root of every error the broker raises on purpose."""


class BrokerError(SeksError):
    """An error answered to an agent: ``message`` is safe to show it (never a key, never text
    an upstream chose). One subclass per status; ``error_answer`` maps them to a body."""

    status = 500
    kind = "internal_error"
    detail = ""               # for the operator's log and audit row only (e.g. which upstream)

    def __init__(self, message: str = "internal error", headers: Optional[Dict[str, str]] = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.close = close


class BadRequest(BrokerError):      status, kind = 400, "invalid_request"
class AuthError(BrokerError):       status, kind = 401, "authentication_error"
class Forbidden(BrokerError):       status, kind = 403, "permission_denied"
class NotFound(BrokerError):        status, kind = 404, "not_found"
class RequestTimeout(BrokerError):  status, kind = 408, "request_timeout"
class PayloadTooLarge(BrokerError): status, kind = 413, "payload_too_large"
class UriTooLong(BrokerError):      status, kind = 414, "uri_too_long"
class RateLimited(BrokerError):     status, kind = 429, "rate_limited"
class HeadersTooLarge(BrokerError): status, kind = 431, "headers_too_large"
class UpstreamError(BrokerError):   status, kind = 502, "upstream_error"
class Unavailable(BrokerError):     status, kind = 503, "unavailable"
class UpstreamTimeout(BrokerError): status, kind = 504, "upstream_timeout"


class Tripwire(AuthError):
    """A decoy token was used: answered exactly like a revoked token, recorded as a tripwire."""


class Exhausted(BrokerError):
    """A limit that will not come back (requests or budget spent): 403 and the header the
    official SDKs read as "do not retry" (a 429 would be retried)."""

    status, kind = 403, "insufficient_quota"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})


class UpstreamFraming(SeksError):
    """An upstream answer that is malformed or ends before its framing says it does (502)."""


class ConnectionCut(SeksError):
    """This exchange cannot go on (the agent left, the upstream cut its answer mid-way, the
    audit row could not be written): the connection is closed without another answer."""


class WsClose(SeksError):
    """End a WebSocket session: send this close code and reason to the side(s) still open."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class DecryptError(SeksError):
    """A ciphertext failed verification. Deliberately carries no detail."""


class KeyRotated(SeksError):
    """The DB was re-keyed by rotate-master-key while this process held the old key."""


class ConfigError(SeksError):
    """Bad configuration or CLI input: reported to the operator, never to an agent. ``key``
    names the config key at fault, so `config check` can point at its line."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class UsageError(ConfigError):
    """A command-line value is malformed (exit code 2, like argparse's own errors)."""


def error_answer(exc: BrokerError, style: str = "") -> Tuple[int, Dict[str, str], bytes]:
    """The one mapping from an error to what the agent gets: status, headers, JSON body
    (Telegram clients need Telegram's shape)."""
    body: Dict[str, Any] = {"error": {"type": exc.kind, "message": exc.message}}
    if style == "telegram":
        body = {"ok": False, "error_code": exc.status, "description": exc.message}
    if style.startswith("aws"):             # the shapes AWS SDKs parse into their exceptions
        code = AWS_ERROR_CODES.get(exc.status, ("InternalError", "InternalServerException"))
        headers = dict(exc.headers)
        if style in ("aws-s3", "aws-query"):          # S3's XML; STS/IAM's ErrorResponse
            xml = (f"<Error><Type>Sender</Type><Code>{code[0]}</Code><Message>"
                   f"{html.escape(exc.message)}</Message></Error>")
            headers["Content-Type"] = "text/xml" if style == "aws-query" else "application/xml"
            return exc.status, headers, ('<?xml version="1.0" encoding="UTF-8"?>\n' + (
                xml.replace("<Type>Sender</Type>", "") if style == "aws-s3" else
                f"<ErrorResponse>{xml}<RequestId>seks-broker</RequestId></ErrorResponse>")).encode()
        headers.update({"Content-Type": "application/json", "x-amzn-ErrorType": code[1]})
        return exc.status, headers, json.dumps({"__type": code[1], "message": exc.message}).encode()
    return exc.status, exc.headers, json.dumps(body).encode()


AWS_ERROR_CODES = {400: ("InvalidRequest", "ValidationException"),          # (S3, JSON APIs)
                   401: ("InvalidAccessKeyId", "UnrecognizedClientException"),
                   403: ("AccessDenied", "AccessDeniedException"),
                   404: ("NoSuchKey", "ResourceNotFoundException"),
                   413: ("EntityTooLarge", "ValidationException"),
                   429: ("SlowDown", "ThrottlingException"),
                   503: ("ServiceUnavailable", "ServiceUnavailableException"),
                   504: ("RequestTimeout", "ModelTimeoutException")}


# ============================================================================================
# 3. SECURITY CORE: pure units, no I/O, no caches, each tested directly (tests/test_core.py)
# ============================================================================================

# --- 3.1 Cipher -----------------------------------------------------------------------------

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
    message-less ``DecryptError``. The nonce is injectable for the test vectors.
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
        blocks = [hmac.new(self._enc_key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
                  for counter in range(-(-len(data) // 32))]
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
        if not _URLSAFE_B64_RE.match(token):        # canonical base64 only: decoding cannot fail
            raise DecryptError()
        _unverified = base64.urlsafe_b64decode(token)
        version, nonce = _unverified[:1], _unverified[1:1 + self.NONCE_BYTES]
        if len(_unverified) < 1 + self.NONCE_BYTES + self.TAG_BYTES or version != bytes([1]):
            raise DecryptError()
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


# --- 3.2 Tokens -----------------------------------------------------------------------------

def token_digest(token: str) -> bytes:
    """How a token is stored and looked up: SHA-256 (tokens carry 256 random bits)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def check_token(record: Optional[TokenRecord], provider: str, now: float) -> TokenRecord:
    """The token check: deny unless the token is known, live, and bound to this provider."""
    if record is None:
        raise AuthError("unknown token")
    if record.policy.get("decoy"):                     # planted bait: never forwards anything
        raise Tripwire("token revoked")
    if record.revoked_at is not None:
        raise AuthError("token revoked")
    if record.parent_ended or (record.parent_expires_at is not None and
                               now >= record.parent_expires_at):
        raise AuthError("token revoked: the token it was delegated from has ended")
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


# --- 3.3 The authorisation decision ---------------------------------------------------------

class RequestFacts:
    """What decide() looks at, gathered before it. ``model``, ``background``, ``repeated_keys``:
    known when ``body_read`` (a models or budget policy on an LLM route). AWS: ``aws`` (service,
    region, what the secret allows), ``action`` (the STS action) and ``reads`` (copy source)."""

    def __init__(self, method: str, path: str, override: bool = False, upgrade: bool = False,
                 llm: bool = False, body_read: bool = False, model: Optional[str] = None,
                 background: bool = False, repeated_keys: bool = False) -> None:
        self.method, self.path, self.override, self.upgrade = method, path, override, upgrade
        self.llm, self.body_read, self.model = llm, body_read, model
        self.background, self.repeated_keys = background, repeated_keys
        self.aws: Tuple[str, str, Tuple[str, ...], Tuple[str, ...]] = ("", "", (), ())
        self.action, self.reads = "", ()


def path_within(path: str, prefix: str) -> bool:
    """Prefix match on segment boundaries: /v1/chat matches /v1/chat/x, not /v1/chatty."""
    return path.startswith(prefix) if prefix.endswith("/") else (
        path == prefix or path.startswith((prefix + "/", prefix + ":")))


def decide(policy: Dict[str, Any], facts: RequestFacts) -> Optional[BrokerError]:
    """The one authorisation decision, after check_token: None (allowed) or the refusal; once
    per request and per gateway IDENTIFY/RESUME. check_limits then counts, in the DB."""
    service, region, services, regions = facts.aws
    if service and service not in services:          # what the secret allows
        return Forbidden(f"this secret does not allow the AWS service {service!r}")
    if service and "*" not in regions and region not in regions:
        return Forbidden(f"this secret does not allow the AWS region {region!r}")
    if service == "sts" and facts.action != "GetCallerIdentity":    # the rest mint AWS keys
        return Forbidden("STS through the broker is GetCallerIdentity only: other actions "
                         "(GetSessionToken, AssumeRole...) would hand out AWS credentials")
    methods = policy.get("methods")
    if methods and facts.method not in methods:      # exact: methods are case-sensitive
        return Forbidden(f"method {facts.method} is not allowed for this token (allowed: "
                         f"{', '.join(methods)})")
    paths = policy.get("paths")
    if paths and not any(path_within(facts.path, prefix) for prefix in paths):
        return Forbidden(f"path is not allowed for this token (allowed prefixes: {', '.join(paths)})")
    if paths and any(".." in read.split("/") or not any(path_within(read, p) for p in paths)
                     for read in facts.reads):
        return Forbidden("x-amz-copy-source (or rename-source) is outside this token's paths")
    if methods and facts.override:
        return Forbidden("this token is limited to some methods; a method-override header would "
                         "change the method the upstream acts on")
    metered = facts.llm and ("models" in policy or budget_key(policy) != "")
    if facts.upgrade:       # a session is one request carrying any number of paid messages
        if "max_requests" in policy or "rate" in policy:
            return Forbidden("this token has a request limit or rate, which the broker cannot "
                             "hold on the messages of a WebSocket session")
        if methods and not WRITE_METHODS.intersection(methods):
            return Forbidden("this token is limited to read methods; the messages of a "
                             "WebSocket session can act like writes")
        if metered:
            return Forbidden("this token is limited to some models or a token budget, which "
                             "the broker cannot check on a WebSocket session")
    models = policy.get("models") if facts.llm else None
    if models and facts.model is not None and facts.model not in models:
        return Forbidden(f"model '{facts.model[:100]}' is not allowed for this token (allowed: "
                         f"{', '.join(models)})")
    if models and facts.model is None and facts.method not in ("GET", "HEAD", "OPTIONS"):
        return Forbidden("this token is limited to some models and the broker cannot read which "
                         "model this request uses")
    if facts.llm and budget_key(policy):
        segments = set(re.split(r"[/:]", facts.path))
        if facts.background or not ASYNC_JOB_SEGMENTS.isdisjoint(segments):
            return Forbidden("this token has a token budget; batch and background jobs report "
                             "their usage where the broker cannot meter it, so they are refused")
        if facts.repeated_keys:
            return Forbidden("this token has a token budget, and the request body repeats a key, "
                             "so the broker cannot tell whether it streams")
    return None


def budget_key(policy: Dict[str, Any]) -> str:
    """A token's one budget: "budget_tokens", "budget_nusd" (billionths of a dollar) or ""."""
    return next((k for k in ("budget_tokens", "budget_nusd") if k in policy), "")


def check_limits(policy: Dict[str, Any], requests_: int, used: int, bucket: Optional[float],
                 bucket_at: Optional[float], now: float) -> Tuple[Optional[float], Optional[float]]:
    """The counting limits of one request, given the token's counters (``used``: tokens or
    nano-dollars): raise Exhausted (for good) or RateLimited (for now), or return the new
    token-bucket state. Store.admit runs it in one write transaction, in any process."""
    max_requests = policy.get("max_requests")
    if max_requests is not None and requests_ >= max_requests:
        raise Exhausted(f"token has used all {max_requests} requests it was minted for")
    key = budget_key(policy)
    if key and used >= policy[key]:
        raise Exhausted(f"token budget of {budget_words(key, policy[key])} is spent "
                        f"({budget_words(key, used)} used)")
    rate = policy.get("rate")
    if rate is None:
        return bucket, bucket_at
    capacity, per_seconds = float(rate[0]), float(rate[1])
    refill = capacity / per_seconds
    level = capacity if bucket is None else min(
        capacity, bucket + max(0.0, now - (bucket_at or now)) * refill)
    if level < 1.0:
        wait = max(1, int(-(-(1.0 - level) // refill)))
        raise RateLimited(f"rate limit of {rate[0]} requests per {rate[2]} reached",
                          headers={"Retry-After": str(wait)})
    return level - 1.0, now


# --- 3.4 The one upstream target ------------------------------------------------------------

_FORBIDDEN_TARGET_RE = re.compile(r"[^\x21-\x7e]|[\\#]")
_FORBIDDEN_DECODED_RE = re.compile(r"[\x00-\x1f\x7f\\]")
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def validate_path(rest: str) -> str:
    """Accept a provider path only if no decoding of it can climb out or name another host:
    printable ASCII after one '/', no '//', backslash, '#', bad escape or dot segment (also
    '..;x', which Tomcat reads as '..'), at each of up to 3 decoding levels (NFKC-folded too),
    no control character or invalid UTF-8 once decoded. The host never comes from this string."""
    if not rest.startswith("/"):
        raise BadRequest("path must start with '/'")
    if _FORBIDDEN_TARGET_RE.search(rest):
        raise BadRequest("path contains a forbidden character")
    if "//" in rest:
        raise BadRequest("empty path segment ('//') is not allowed")
    if re.search(r"%(?![0-9A-Fa-f]{2})", rest):
        raise BadRequest("malformed percent escape in path")
    layer = rest
    for depth in range(4):
        forms = [layer] if layer.isascii() else [layer, unicodedata.normalize("NFKC", layer)]
        for form in forms:
            if any(seg.split(";", 1)[0] in (".", "..") for seg in form.split("/")):
                raise BadRequest("dot segments are not allowed in paths")
            if depth and (form.startswith("//") or _FORBIDDEN_DECODED_RE.search(form)):
                raise BadRequest("path decodes to a forbidden character")
        if not _PCT_RE.search(layer):
            return rest
        try:
            layer = urllib.parse.unquote_to_bytes(layer).decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise BadRequest("path escapes are not valid UTF-8") from None
    raise BadRequest("path is encoded too many times")


def validate_query(query: str) -> str:
    if query and _FORBIDDEN_TARGET_RE.search(query):
        raise BadRequest("query contains a forbidden character")
    return query


class Target:
    """Where one upstream request goes: decided by upstream_target alone, and the only thing
    UpstreamPool.connect opens a socket from."""

    __slots__ = ("scheme", "host", "port", "verify", "path")

    def __init__(self, scheme: str, host: str, port: int, verify: bool, path: str) -> None:
        self.scheme, self.host, self.port, self.verify, self.path = scheme, host, port, verify, path

    @property
    def host_header(self) -> str:
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        return netloc + ("" if self.port == (443 if self.scheme == "https" else 80) else f":{self.port}")

    def __repr__(self) -> str:
        return f"Target({self.scheme}://{self.host_header})"      # never the path: Telegram's key


_GATEWAY_ROUTE_RE = re.compile(r"^/gateway(?:/resume/([^/]+))?/?\Z")
_RESUME_HOST_RE = re.compile(r"^[a-z0-9.-]+(?::(\d{1,5}))?\Z")


def upstream_target(provider: Provider, rest: str, query: str, verify: bool,
                    gateway_url: str = "") -> Target:
    """The one place an upstream target is decided, for HTTP and WebSocket alike: scheme, host
    and port come from configuration only; the agent's ``rest`` (validated, one leading '/') and
    ``query`` cannot name an authority. ``verify`` is False only for upstreams listed insecure.
    Discord's ``/gateway[/resume/<host[:port]>]`` goes to ``gateway_url``, or to a resume host
    that is that gateway's host or a discord.gg subdomain (TLS, 443), as READY names it."""
    if provider.gateway == "discord" and (rest == "/gateway" or rest.startswith("/gateway/")):
        match = _GATEWAY_ROUTE_RE.match(rest)
        if match is None:
            raise NotFound("unknown gateway route")
        gateway = urllib.parse.urlsplit(gateway_url)
        scheme = "https" if gateway.scheme == "wss" else "http"
        host, port = gateway.hostname or "", gateway.port or (443 if scheme == "https" else 80)
        if match.group(1):
            resume = urllib.parse.unquote(match.group(1)).lower()
            found = _RESUME_HOST_RE.match(resume)
            if not found or (found.group(1) and not 0 < int(found.group(1)) < 65536):
                raise BadRequest("bad resume host")
            name = resume.rsplit(":", 1)[0]
            if resume != gateway.netloc.lower():
                if not (name.endswith(".discord.gg") and resume in (name, name + ":443")):
                    raise Forbidden("resume host is not a Discord gateway")
                scheme, host, port = "https", name, 443
        version = (urllib.parse.parse_qs(query).get("v") or ["10"])[0]
        if not re.fullmatch(r"[0-9]{1,3}", version):
            version = "10"         # (the handler closes such a session before connecting)
        return Target(scheme, host, port, verify, f"/?v={version}&encoding=json")
    validate_path(rest)
    validate_query(query)
    if not provider.host:
        raise Unavailable(f"the {provider.name} route has no upstream until the operator sets "
                          f"one ([upstream] {provider.name} = https://...)")
    scheme, host, port, base = provider.scheme, provider.host, provider.port, provider.base_path
    if provider.region == "gcp":                      # /<region>/<rest>: Google's regional host
        region, rest = gcp_route(rest)
        if host.endswith(".googleapis.com"):
            host, base = host if region == "global" else f"{region}-{host}", ""
    elif provider.aws:                                # /<service>/<region>/<rest>:
        service, region, rest = aws_route(rest)            # AWS's own host, or the one base
        rest = aws_quote(urllib.parse.unquote(rest), "/")   # configured (path-style); path
        query = sigv4_query(query)                          # and query in canonical form
        if host == "amazonaws.com":
            scheme, host, port, base = "https", f"{service}.{region}.amazonaws.com", 443, ""
    return Target(scheme, host, port, verify, base + rest + ("?" + query if query else ""))


# --- 3.5 The credential swap ----------------------------------------------------------------

class CredentialSwap:
    """Where an agent's token was found: the place, the header scheme word or path prefix
    used (Basic: the other half, kept) and, for Basic, which half the token was in."""

    def __init__(self, token: str, place: CredentialPlace, prefix: str, side: str = "") -> None:
        self.token, self.place, self.prefix, self.side = token, place, prefix, side


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
        elif place.kind == "basic":
            for name, value in headers:
                word, _, encoded = value.strip().partition(" ")
                if name.lower() == "authorization" and word.lower() == "basic":
                    return basic_token(encoded.strip(), place)
        elif place.kind == "aws":             # the access key id the agent signed with
            key_id = aws_key_id(headers, query)
            if key_id is not None:
                return CredentialSwap(key_id, place, "") if key_id else None
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


_TOKEN_WHOLE_RE = re.compile(r"seks_[a-z0-9-]{1,32}_[A-Za-z0-9_-]{43}\Z")


def basic_token(encoded: str, place: CredentialPlace) -> Optional[CredentialSwap]:
    """The token in ``base64(user:password)``: exactly one half must be a whole seks token
    (git's ``x-access-token:T``, pip's ``__token__:T``, ``T:`` for Stripe); the other half
    is kept. Bad base64, no colon, or a token in both halves or neither: None (401)."""
    try:
        user, colon, password = base64.b64decode(encoded, validate=True).decode(
            "utf-8").partition(":")
    except (binascii.Error, ValueError):
        return None
    halves = [bool(_TOKEN_WHOLE_RE.match(half)) for half in (user, password)]
    if not colon or halves.count(True) != 1:
        return None
    return CredentialSwap(password, place, user, "password") if halves[1] else \
        CredentialSwap(user, place, password, "user")


def swap_credentials(provider: Provider, swap: CredentialSwap, parts: Dict[str, str],
                     headers: List[Tuple[str, str]], rest: str,
                     query: str) -> Tuple[List[Tuple[str, str]], str, str]:
    """Remove every credential place of the provider from the request and inject the
    secret's parts (the agent's own value in an injection place never rides along). A part
    the secret lacks: KeyError (token mint refuses such secrets; the caller answers 502)."""
    if swap.place.kind == "aws":          # the agent's signature goes; aws_sign signs anew
        return aws_unsigned(headers, query, rest)
    header_places = {p.name for p in provider.token_places if p.kind in ("header", "basic")}
    query_places = {p.name for p in provider.token_places if p.kind == "query"}
    if provider.inject is not None and provider.inject.kind in ("header", "basic"):
        header_places.add(provider.inject.name)
    if provider.inject is not None and provider.inject.kind == "query":
        query_places.add(provider.inject.name)
    header_places.update(p.name for p in provider.also)
    headers = [(n, v) for n, v in headers if n.lower() not in header_places]
    inject = provider.inject or swap.place
    key = fill(inject.value, parts)
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
    if inject.kind == "basic":           # a pair built from parts, or the agent's other half
        pair = key if inject is provider.inject else (
            f"{swap.prefix}:{key}" if swap.side == "password" else f"{key}:{swap.prefix}")
        headers.append(("Authorization", "Basic " + base64.b64encode(
            pair.encode("utf-8", "surrogateescape")).decode("ascii")))
    elif inject.kind == "header":
        prefix = swap.prefix if inject is swap.place and swap.prefix else (
            inject.prefixes[0] if inject.prefixes else "")
        headers.append((inject.name, f"{prefix} {key}" if prefix else key))
    for place in provider.also:           # left out when it takes an optional part not given
        if all(n in parts or n not in provider.optional for n in PART_RE.findall(place.value)):
            value = fill(place.value, parts)
            headers.append((place.name, f"{place.prefixes[0]} {value}" if place.prefixes
                            else value))
    if inject.kind == "path":
        tail = rest[len(swap.prefix):].split("/", 1)
        rest = swap.prefix + urllib.parse.quote(key, safe=":") + ("/" + tail[1] if len(tail) > 1 else "")
    return headers, rest, "&".join(kept)


# --- 3.6 The scrubber -----------------------------------------------------------------------

def mask_secret(secret: bytes) -> bytes:
    """A same-length stand-in for a real key, so Content-Length stays right when scrubbing."""
    return b"[REDACTED-BY-SEKS]"[:len(secret)] + b"*" * max(0, len(secret) - 18)


def secret_variants(key: str) -> Tuple[bytes, ...]:
    """The forms in which an upstream might echo a key: raw, JSON-escaped ('\\/', \\uXXXX for
    some or all characters), percent-encoded as URL libraries do (all or some reserved
    characters, either hex case, '+'), HTML-escaped; each subset of up to four kinds of its
    punctuation escaped on its own."""
    variants = {key.encode("utf-8", "surrogateescape"),
                key.replace("/", "\\/").encode("utf-8", "surrogateescape")}
    for safe in ("", "/", ":", "/:", "-._~"):
        quoted = urllib.parse.quote(key, safe=safe)
        variants.add(quoted.encode())
        variants.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quoted).encode())
    variants.add(urllib.parse.quote_plus(key).encode())
    specials = sorted({c for c in key if not c.isalnum() and c in "+/=:&<>'\"\\@!$,;?#[]%*()"})
    if len(specials) <= 4:        # each subset escaped, the ways encoders differ (.NET \u002B,
        for mask in range(1, 1 << len(specials)):     # Go PathEscape's %2F with '+' kept)
            chosen = {c for i, c in enumerate(specials) if mask >> i & 1}
            for form in ("%%%02X", "%%%02x", "\\u%04X", "\\u%04x"):
                variants.add("".join(form % ord(c) if c in chosen else c for c in key)
                             .encode("utf-8", "surrogateescape"))
    for quote in (True, False):                         # HTML/XML error pages (&amp; &#x27;)
        variants.add(html.escape(key, quote=quote).encode("utf-8", "surrogateescape"))
        variants.add(html.escape(key, quote=quote).replace("&#x27;", "&#39;").encode(
            "utf-8", "surrogateescape"))
    if key.isascii():                                   # every character \u-escaped
        for form in ("\\u%04X", "\\u%04x"):
            variants.add("".join(form % ord(c) for c in key).encode())
    return tuple(sorted(variants, key=len, reverse=True))


def scrub_pairs(key: str) -> Tuple[Tuple[bytes, bytes], ...]:
    """(variant, same-length mask) pairs of a key, longest first."""
    return tuple((v, mask_secret(v)) for v in secret_variants(key) if v)


def parts_pairs(parts: Dict[str, str], public: Tuple[str, ...] = ()) -> Tuple[Tuple[bytes, bytes], ...]:
    """The scrub pairs of every part of a secret but its public ones, longest first (a named
    part shorter than 4 characters is not masked: a flag or a digit would mask every copy)."""
    pairs = {pair for name, value in parts.items() if name not in public and (
        name == "key" or len(value) >= 4) for pair in scrub_pairs(value)}
    return tuple(sorted(pairs, key=lambda pair: len(pair[0]), reverse=True))


def fragment_floor(length: int) -> int:
    """The shortest cut-off piece of a key the scrubber masks: a third of it, 8 to 32 characters
    (a shorter key: whole), so cut-off echoes show less than a third at either end."""
    return length if length < 8 else min(32, max(8, length // 3))


class Scrubber:
    """Masks a real key in a byte stream, also cut off (an upstream may echo a request cut
    short, and the agent can pad it so the key straddles the cut): every run of a variant that
    holds its first or last fragment_floor characters becomes a same-length mask. ``feed``
    holds back only the longest tail that could still grow into such a run, so events still
    flow one by one; ``flush`` masks it at the end. ``binary()``: whole variants only, for
    media answers (they quote no requests; the shorter searches halve download speed)."""

    def __init__(self, pairs: Tuple[Tuple[bytes, bytes], ...] = ()) -> None:
        self.pairs = pairs
        self._held = b""
        anchors = set()      # (fragment, its offset in the variant, the variant)
        for secret, _ in pairs:
            floor = fragment_floor(len(secret))
            anchors.add((secret[:floor], 0, secret))
            anchors.add((secret[-floor:], len(secret) - floor, secret))
        self._anchors = sorted(anchors)
        self._whole = False

    def binary(self) -> None:
        self._anchors = [(secret, 0, secret) for secret, _ in self.pairs]
        self._whole = True

    def scrub(self, data: bytes) -> bytes:
        """Mask every run in a whole piece of data."""
        spans = []
        for fragment, at, secret in self._anchors:
            i = data.find(fragment)
            while i != -1:
                start, left = i, at              # grow the run both ways along the variant
                while left and start and data[start - 1] == secret[left - 1]:
                    start, left = start - 1, left - 1
                end, right = i + len(fragment), at + len(fragment)
                while right < len(secret) and end < len(data) and data[end] == secret[right]:
                    end, right = end + 1, right + 1
                spans.append((start, end))
                i = data.find(fragment, max(i + 1, end - len(fragment) + 1))
        if not spans:
            return data
        out, done = [], 0
        for start, end in sorted(spans):
            if end <= done:
                continue
            start = max(start, done)
            out += [data[done:start], mask_secret(data[start:end])]
            done = end
        return b"".join(out) + data[done:]

    def _tail(self, data: bytes) -> int:
        """The length of the longest tail of data that is part of a variant (whole keys only:
        that is the start of a variant)."""
        hold = 0
        for secret, _ in self.pairs:
            if self._whole:
                at = data.find(secret[:1], max(0, len(data) - len(secret) + 1))
                while at != -1 and not secret.startswith(data[at:]):
                    at = data.find(secret[:1], at + 1)
                hold = max(hold, len(data) - at if at != -1 else 0)
                continue
            low, high = 0, min(len(data), len(secret))   # "the tail of length n is in it"
            while low < high:                            # holds for every n up to a bound
                mid = (low + high + 1) // 2
                if data[len(data) - mid:] in secret:
                    low = mid
                else:
                    high = mid - 1
            hold = max(hold, low)
        return hold

    def feed(self, data: bytes) -> bytes:
        if not self.pairs:
            return data
        buf = self._held + data if self._held else data
        hold = self._tail(buf)
        self._held = buf[len(buf) - hold:] if hold else b""
        out = self.scrub(buf)              # the whole buffer: a run the hold would cut is seen
        return out[:len(out) - hold] if hold else out     # whole (masks keep the length)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return self.scrub(held)


# --- 3.7 The audit chain --------------------------------------------------------------------

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


_CANONICAL_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def audit_mac(key: bytes, values: Tuple[Any, ...], prev_mac: bytes) -> bytes:
    """HMAC-SHA256 over the canonical JSON of a row's fields followed by the previous MAC."""
    canonical = _CANONICAL_JSON.encode(list(values)).encode()
    return hmac.digest(key, canonical + b"\x00" + prev_mac, "sha256")


def verify_audit_chain(key: bytes, rows: List[AuditRow], anchor: bytes,
                       progress: Optional[Callable[[int], None]] = None) -> Tuple[bool, str]:
    """Walk the chain; report the first row that was edited, inserted, deleted or moved.
    ``anchor`` is the MAC of the last pruned row (empty if the log was never pruned);
    ``progress`` (for a terminal) is told every 1000 rows."""
    prev, expected_id = anchor, None
    latest_prune: Optional[Dict[str, Any]] = None
    for number, row in enumerate(rows, 1):
        if progress is not None and number % 1000 == 0:
            progress(1000)
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


# --- 3.8 Redaction --------------------------------------------------------------------------

_TOKEN_TEXT_RE = re.compile(r"(seks_[a-z0-9-]{1,32}_)([A-Za-z0-9_-]{4})[A-Za-z0-9_-]*")
SECRET_QUERY_PARAMS = frozenset({"key", "token", "api_key", "apikey", "access_token", "auth",
                                 "x-amz-credential", "x-amz-signature", "x-amz-security-token"})


def redact(text: str) -> str:
    """Make any text safe to log: tokens cut to a short prefix, control characters escaped."""
    if "seks_" not in text and text.isascii() and text.isprintable():
        return text
    text = _TOKEN_TEXT_RE.sub(r"\1\2…", text)
    return text.encode("unicode_escape", "backslashreplace").decode("ascii").replace("\\u2026", "…")


def redact_path(path: str) -> str:
    """A path as it may be logged before validation: as it came, or decoded if that shows a
    token ('%73eks_...'); either way redacted and unable to spell extra log fields."""
    decoded = path
    for _ in range(3):
        if "%" not in decoded:
            break
        decoded = urllib.parse.unquote(decoded, errors="replace")
    if "seks_" not in decoded or decoded == path:
        return redact(path)
    return "".join(c if c.isprintable() and not c.isspace() else urllib.parse.quote(c)
                   for c in redact(decoded))


def masked_request_path(provider: Optional[Provider], path: str, query: str) -> str:
    """The agent-side path as it may be logged: a path key segment (Telegram) and credential
    query parameters replaced by '***'."""
    for place in provider.token_places if provider is not None else ():
        for prefix in place.prefixes if place.kind == "path" else ():
            idx = path.find(prefix)
            if idx != -1 and idx + len(prefix) < len(path):
                _, slash, tail = path[idx + len(prefix):].partition("/")
                path = path[:idx + len(prefix)] + "***" + slash + tail
                break
    if query:                                   # (names compared lower-cased)
        secret = SECRET_QUERY_PARAMS.union(p.name.lower() for p in provider.token_places
                                           if p.kind == "query") if provider else SECRET_QUERY_PARAMS
        path += "?" + "&".join(f"{name}=***" if eq and urllib.parse.unquote_plus(name).lower()
                               in secret else name + eq + value for name, eq, value in (
                                   part.partition("=") for part in query.split("&")))
    return redact(path)


# ============================================================================================
# 4. THE ONE EXIT TO THE AGENT
# ============================================================================================

class AgentWriter:
    """Every byte to an agent goes through here: status lines, headers, bodies, chunk framing,
    WebSocket frames, close reasons, errors (a test checks the source for other socket writes).
    It owns the scrubber (a header *name* holding the key refuses the answer), the framing
    (Content-Length, chunked, close-delimited for HTTP/1.0, RFC 6455 frames, compressed for
    Discord only after scrubbing) and one answer per request: once a byte went out, an error
    can only cut the connection."""

    def __init__(self, sock: socket.socket, stall_limit: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()        # two WebSocket pumps may write at once
        self.stall_limit = stall_limit       # a write that makes no progress this long: cut
        self.reset()

    def reset(self) -> None:
        """A new request on this connection: no key known, nothing sent."""
        self.scrubber = Scrubber()
        self.started = False                 # bytes of this answer went out
        self.close = False                   # Connection: close after this answer
        self.ws_closed = False               # a WebSocket close frame went out
        self.compressor: Any = None          # Discord zlib-stream (one context per session)
        self._framing = ""

    def _send(self, data: bytes) -> None:
        """The one write to the agent's socket."""
        try:
            send_fully(self._sock.send, data, self.stall_limit)
        except (OSError, ValueError) as exc:         # socket.timeout is an OSError
            raise ConnectionCut() from exc

    def use_key(self, pairs: Tuple[Tuple[bytes, bytes], ...]) -> None:
        self.scrubber = Scrubber(pairs)

    def interim_continue(self) -> None:
        """``100 Continue``: an interim answer; the final one is still to come."""
        self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def head(self, status: int, headers: List[Tuple[str, str]], framing: str,
             length: int = 0) -> None:
        """Send an answer's head. ``framing``: "length" (Content-Length: length), "chunked",
        "close" (HTTP/1.0 client: the end of the body is the end of the connection) or "none"
        (HEAD, 204, 304: headers as given)."""
        self._out(self._head(status, headers, framing, length))

    def _head(self, status: int, headers: List[Tuple[str, str]], framing: str,
              length: int) -> bytes:
        names = "\n".join(n for n, _ in headers).encode("latin-1", "replace")
        if self.scrubber.scrub(names) != names:        # a name cannot be masked: refuse it all
            raise UpstreamError("upstream answered with a header name that holds the key")
        headers = [(n, self.scrubber.scrub(v.encode("latin-1", "replace")).decode("latin-1"))
                   for n, v in headers]
        media = next((v for n, v in headers if n.lower() == "content-type"), "")
        if media.split(";")[0].strip().lower().startswith(BINARY_MEDIA):
            self.scrubber.binary()               # whole keys only (Scrubber.binary)
        if framing == "length":
            headers.append(("Content-Length", str(length)))
        elif framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        elif framing == "close":
            self.close = True
        if self.close and status != 101:          # (a 101 head says Upgrade)
            headers.append(("Connection", "close"))
        block = header_block(headers)
        self._framing = framing
        return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
            status, HTTP_REASONS.get(status, "Unknown").encode(), block, b"\r\n" if block else b"")

    def _out(self, data: bytes) -> None:
        if data:
            self.started = True
            self._send(data)

    def body(self, data: bytes) -> int:
        """Body bytes, scrubbed (a possible key prefix is held back) and framed; returns how
        many went."""
        data = self.scrubber.feed(data)
        self._out(b"%x\r\n%s\r\n" % (len(data), data) if data and self._framing == "chunked"
                  else data)
        return len(data)

    def end(self) -> int:
        """The last body bytes held back by the scrubber, then the end of the chunking."""
        tail = self.scrubber.flush()
        if self._framing == "chunked":
            self._out((b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n")
        else:
            self._out(tail)
        return len(tail)

    def answer(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        """A whole sized answer in one write (masks keep the length)."""
        self._out(self._head(status, headers, "length", len(body)) + self.scrubber.scrub(body))

    def error(self, exc: BrokerError, style: str = "") -> bool:
        """The broker's own error answer; False (cut instead) once an answer has started."""
        if self.started:
            self.close = True
            return False
        if exc.close:
            self.close = True
        status, headers, body = error_answer(exc, style)
        self.answer(status, [("Content-Type", "application/json")] * ("Content-Type" not in headers)
                    + list(headers.items()), body)
        return True

    # --- WebSocket ---------------------------------------------------------------------------
    def ws_accept(self, key: str, subprotocol: str) -> None:
        head = self._head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"), (
            "Sec-WebSocket-Accept", ws_accept(key))] + [("Sec-WebSocket-Protocol", subprotocol)]
            * bool(subprotocol), "none", 0)
        self.close = self.started = True
        self._send(head)

    def ws_send(self, opcode: int, payload: bytes) -> None:
        """One whole message or control frame, scrubbed, then compressed if the session asked
        for Discord's zlib-stream; nothing is sent after a close."""
        payload = self.scrubber.scrub(payload)
        if self.compressor is not None and opcode == OP_TEXT:
            payload = self.compressor.compress(payload) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
            opcode = OP_BINARY
        with self._lock:
            if self.ws_closed:
                return
            self.ws_closed = opcode == OP_CLOSE
            self._send(ws_frame(opcode, payload, masked=False))

    def ws_close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionCut):
            self.ws_send(OP_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8")[:120])


# ============================================================================================
# 5. WIRE: the one parser of HTTP/1.1 heads, CL/TE framing and chunked bodies (agent requests
#    and upstream answers alike), RFC 6455 frames, and content codings
# ============================================================================================

_CHUNK_SIZE_RE = re.compile(rb"^[0-9A-Fa-f]{1,16}\Z")
_STATUS_LINE_RE = re.compile(rb"^HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?\Z")
_METHOD_RE = re.compile(rb"^[" + TOKEN_CHARS + rb"]{1,32}\Z")
_BAD_TARGET_BYTES_RE = re.compile(rb"[^\x21-\x7e]")


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + WS_GUID).digest()).decode()


def ws_frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    """One final RFC 6455 frame; masked (with a random key) when the broker is the client."""
    n = len(payload)
    code, size = (n, 0) if n < 126 else (126, 2) if n < 65536 else (127, 8)   # 7, 16 or 64 bits
    head = bytes([0x80 | opcode, (0x80 if masked else 0) | code])
    mask = os.urandom(4) if masked else b""
    return head + (n.to_bytes(size, "big") if size else b"") + mask + (
        ws_mask(payload, mask) if masked else payload)


def ws_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, as one big integer operation (fast for large frames)."""
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def send_fully(send: Callable[[memoryview], int], data: bytes, stall_limit: float) -> None:
    """Write all of ``data`` with ``send`` (a socket's), retrying socket timeouts (WebSocket
    sessions poll with one) until no byte moved for ``stall_limit`` seconds."""
    view = memoryview(data)
    stalled = time.monotonic()
    while view:
        try:
            sent = send(view)
        except socket.timeout:
            if time.monotonic() - stalled > stall_limit:
                raise
            continue
        view = view[sent:]
        stalled = time.monotonic()


class WireReader:
    """Buffered reads from one socket: lines, exact counts and "what is there" reads. Bytes read
    past a head stay here for the body, the next request, or the first WebSocket frames."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(pending)

    def fill(self, size: int = 65536) -> bool:
        data = self.sock.recv(size)
        self.buf += data
        return bool(data)

    def line(self, limit: int) -> bytes:
        """One line with its ending (b"" at EOF); a longer one comes back as limit+1 bytes."""
        end = self.buf.find(b"\n")
        while end == -1 and len(self.buf) <= limit and self.fill():
            end = self.buf.find(b"\n")
        size = min(end + 1 if end != -1 else len(self.buf), limit + 1)
        line = bytes(self.buf[:size])
        del self.buf[:size]
        return line

    def some(self, size: int) -> bytes:
        """Up to ``size`` bytes: what is buffered, or what one receive brings (b"" at EOF)."""
        if self.buf:
            data = bytes(self.buf[:size])
            del self.buf[:size]
            return data
        return self.sock.recv(size)

    def exact(self, n: int, idle: Callable[[], None]) -> bytes:
        """Exactly ``n`` bytes; ``idle`` runs at each socket timeout (WebSocket polling)."""
        while len(self.buf) < n:
            try:
                if not self.fill(max(65536, n - len(self.buf))):
                    raise ConnectionResetError("peer closed")
            except socket.timeout:
                idle()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


class ChunkSource:
    """A socket-like ``recv`` over an iterator of byte strings: a body inside a body."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks, self._rest = iter(chunks), memoryview(b"")

    def recv(self, size: int) -> bytes:
        while not self._rest:                               # (an empty piece is not the end)
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._rest = memoryview(chunk)
        data, self._rest = self._rest[:size], self._rest[size:]
        return bytes(data)


def header_block(headers: List[Tuple[str, str]]) -> bytes:
    """Header lines (CRLF-separated, no final CRLF) of every head the broker writes, upstream or
    to an agent (AgentWriter), checked whole: token names, latin-1 values without control
    characters or line breaks, so nothing an upstream sent can split the agent's answer."""
    if not headers:
        return b""
    try:
        names = ":".join(n for n, _ in headers).encode("latin-1")
        values = "\t".join(v for _, v in headers).encode("latin-1")
    except UnicodeEncodeError:
        raise UpstreamError("a header the broker will not pass on") from None
    if not HEADER_NAMES_RE.match(names) or BAD_VALUE_BYTES_RE.search(values):
        raise UpstreamError("a header the broker will not pass on")
    return "\r\n".join(f"{n}: {v}" for n, v in headers).encode("latin-1")


def wire_error(side: str, status: int, message: str) -> SeksError:
    """A malformed message: the agent's request gets its 4xx (and the connection closes); an
    upstream answer is a framing error, answered 502 or cut."""
    if side == "answer":
        return UpstreamFraming("upstream answer: " + message)
    return {414: UriTooLong, 431: HeadersTooLarge}.get(status, BadRequest)(message, close=True)


def read_head(reader: WireReader, side: str) -> Optional[Tuple[bytes, List[Tuple[str, str]]]]:
    """One message head (``side``: "request" or "answer"): its first line and its fields, or
    None at a clean EOF before it. Lines must end in CRLF; obsolete folding, bad names, control
    characters in values, and heads over their limits are refused."""
    first_limit = MAX_REQUEST_LINE if side == "request" else MAX_UPSTREAM_HEAD
    total_limit = MAX_HEADER_BYTES if side == "request" else MAX_UPSTREAM_HEAD
    line = reader.line(first_limit)
    if line == b"\r\n" and side == "request":       # one stray CRLF between requests is allowed
        line = reader.line(first_limit)
    if not line:
        return None
    if len(line) > first_limit:
        raise wire_error(side, 414, "request line too long" if side == "request" else
                         "head too large")
    if not line.endswith(b"\r\n"):
        raise wire_error(side, 400, "request line must end with CRLF")
    fields: List[Tuple[str, str]] = []
    total = 0
    while True:
        field = reader.line(total_limit)
        total += len(field)
        if total > total_limit:
            raise wire_error(side, 431, "request header fields too large")
        if not field:
            if side == "request":
                raise ConnectionCut()
            raise wire_error(side, 400, "connection closed mid-head")
        if field == b"\r\n":
            return line[:-2], fields
        if not field.endswith(b"\r\n"):
            raise wire_error(side, 400, "header line must end with CRLF")
        fields.append(parse_field(field[:-2], side))
        if len(fields) > MAX_HEADER_COUNT:
            raise wire_error(side, 431, "too many request header fields")


def parse_field(line: bytes, side: str) -> Tuple[str, str]:
    """``name: value`` (a header or trailer line without its CRLF), strictly."""
    if line[:1] in (b" ", b"\t"):
        raise wire_error(side, 400, "obsolete header line folding is refused")
    name, sep, value = line.partition(b":")
    if not sep or not HEADER_NAME_RE.match(name):
        raise wire_error(side, 400, "malformed header line")
    value = value.strip(b" \t")
    if BAD_VALUE_BYTES_RE.search(value):
        raise wire_error(side, 400, "header value contains a control character")
    return name.decode("latin-1"), value.decode("latin-1")


def body_framing(fields: List[Tuple[str, str]], side: str, http11: bool, method: str = "",
                 status: int = 0, max_body: int = MAX_BODY_BYTES) -> Tuple[str, int, bool]:
    """How a body is delimited (RFC 9112 section 6.3), one reading for both directions:
    (kind, length, reusable) with kind "none", "length", "chunked" or "close". A request is
    held strictly: anything two parsers could read differently is a 400 (Content-Length with
    Transfer-Encoding, repeated Content-Length, a coding other than chunked). An answer may
    carry a Content-Length list of equal values; chunked wins over a Content-Length beside it,
    and such an answer's connection is never reused."""
    if side == "answer" and (method == "HEAD" or status in (204, 304)):
        return "none", 0, True
    lengths = [v.strip() for n, v in fields if n.lower() == "content-length"]
    codings = [c.strip().lower() for n, v in fields if n.lower() == "transfer-encoding"
               for c in v.split(",")]
    if codings:
        if side == "request" and lengths:
            raise wire_error(side, 400, "Content-Length together with Transfer-Encoding is refused")
        if side == "request" and not http11:
            raise wire_error(side, 400, "Transfer-Encoding is not allowed in HTTP/1.0")
        if codings != ["chunked"]:
            raise wire_error(side, 400, "only 'Transfer-Encoding: chunked' is supported")
        return "chunked", -1, http11 and not lengths
    if lengths:
        if side == "request" and len(lengths) > 1:
            raise wire_error(side, 400, "more than one Content-Length header")
        values = {x.strip() for v in lengths for x in v.split(",")}
        value = values.pop() if len(values) == 1 else ""
        if not CONTENT_LENGTH_RE.match(value) or (side == "request" and "," in lengths[0]):
            raise wire_error(side, 400, "Content-Length is not a number")
        length = int(value)
        if side == "request" and length > max_body:
            raise PayloadTooLarge(f"request body larger than {max_body} bytes", close=True)
        return ("length", length, True) if length else ("none", 0, True)
    return ("none", 0, True) if side == "request" else ("close", -1, False)


class BodyReader:
    """A message body read off a WireReader by its framing: ``read`` returns what is there (at
    most ``size``, b"" at the end) and never reads past the body's end. Chunked bodies are
    decoded here, for agents, upstreams and aws-chunked uploads alike (extensions ignored,
    trailers bounded and passed on to no one, only collected into ``trailers`` if given)."""

    def __init__(self, reader: WireReader, kind: str, length: int, side: str,
                 max_body: int = 0, trailers: Optional[Dict[str, str]] = None) -> None:
        self.reader, self.kind, self.side, self.max_body = reader, kind, side, max_body
        self.trailers = trailers                            # collected here if given
        self.left = length if kind == "length" else -1     # bytes left (of the current chunk)
        self.done = kind == "none"
        self.received = 0

    def _short(self) -> SeksError:
        return ConnectionCut() if self.side == "request" else wire_error(
            self.side, 502, "ended before its framing said it would")

    def read(self, size: int = STREAM_CHUNK) -> bytes:
        if self.done or (self.kind == "chunked" and self.left <= 0 and not self._next_chunk()):
            return b""
        data = self.reader.some(size if self.kind == "close" else min(size, self.left))
        if not data:
            if self.kind != "close":
                raise self._short()
            self.done = True
            return b""
        self.received += len(data)
        if self.kind != "close":
            self.left -= len(data)
            self.done = self.kind == "length" and self.left == 0
        return data

    def _next_chunk(self) -> bool:
        if self.left == 0 and self.reader.line(2) != b"\r\n":
            raise wire_error(self.side, 400, "chunk data not followed by CRLF")
        line = self.reader.line(MAX_CHUNK_LINE)
        if not line:
            raise self._short()
        size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not line.endswith(b"\r\n") or not _CHUNK_SIZE_RE.match(size_text):
            raise wire_error(self.side, 400, "malformed chunk size")
        self.left = int(size_text, 16)
        if self.max_body and self.received + self.left > self.max_body:
            raise PayloadTooLarge(f"request body larger than {self.max_body} bytes", close=True)
        if self.left:
            return True
        total = 0
        while True:                               # trailers: read, bounded, never passed on
            trailer = self.reader.line(MAX_HEADER_BYTES)
            total += len(trailer)
            if not trailer:
                raise self._short()
            if total > MAX_HEADER_BYTES:
                raise wire_error(self.side, 431, "chunked trailers too large")
            if trailer == b"\r\n":
                self.done = True
                return False
            if self.trailers is not None:
                name, value = parse_field(trailer.rstrip(b"\r\n"), self.side)
                self.trailers[name.lower()] = value
                if len(self.trailers) > 8:          # each may become a header sent upstream
                    raise wire_error(self.side, 400, "too many chunked trailers")


def request_has_body(fields: List[Tuple[str, str]]) -> bool:
    """Whether bytes may follow a request head (so a refusal must close the connection): any
    Transfer-Encoding, any Content-Length but a single 0, or several Content-Length fields."""
    lengths = [v for n, v in fields if n.lower() == "content-length"]
    return any(n.lower() == "transfer-encoding" for n, _ in fields) or len(lengths) > 1 or (
        len(lengths) == 1 and lengths[0].strip() != "0")


def ws_read_frame(reader: WireReader, expect_masked: bool,
                  idle: Callable[[], None], limit: int) -> Tuple[bool, int, bytes]:
    """Read one frame -> (fin, opcode, unmasked payload), enforcing RFC 6455's rules."""
    b1, b2 = reader.exact(2, idle)
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
    if length >= 126:                            # 126: 16 bits of length follow, 127: 64 bits
        length = int.from_bytes(reader.exact(2 if length == 126 else 8, idle), "big")
    if length > limit:
        raise WsClose(1009, "message too big")
    mask = reader.exact(4, idle) if masked else b""
    payload = reader.exact(length, idle) if length else b""
    return fin, opcode, ws_mask(payload, mask) if masked else payload


# The content codings a broker-made message may name: a word from this list, never the
# upstream's own text (which could carry a key, lower-cased past the scrubber).
KNOWN_CODINGS = ("br", "zstd", "compress", "x-compress", "exi", "pack200-gzip", "aes128gcm")


class Inflater:
    """A gzip or zlib body from an upstream that compressed though asked not to, inflated so it
    can be scrubbed: member after member, as the gzip module reads them. A corrupt or truncated
    stream raises UpstreamFraming (the answer is cut, never passed on half-read), and so does
    one read that would inflate past MAX_INFLATE (a decompression bomb)."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)   # gzip or zlib framing
        self._fed = False

    def decompress(self, data: bytes) -> bytes:
        self._fed = self._fed or bool(data)
        out: List[bytes] = []
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


def connection_tokens(headers: List[Tuple[str, str]]) -> set:
    """The lower-case tokens of every Connection header (``close``, ``upgrade``, header names
    that are hop-by-hop for this message)."""
    return {t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")}


def forward_request_headers(headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Agent headers minus hop-by-hop ones (and those named in Connection) and the few the
    broker sets itself; repeated fields are joined with ', '."""
    named = connection_tokens(headers)
    merged: Dict[str, Tuple[str, str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower in REQUEST_HEADERS_REPLACED:
            continue
        first = merged.get(lower)
        merged[lower] = (first[0], first[1] + ", " + value) if first else (name, value)
    return list(merged.values())


# ============================================================================================
# 6. PROVIDER MECHANICS: pure units the core calls for credential shapes beyond one key
#    (they compute what is sent; the core decides where it goes and scrubs what comes back)
# ============================================================================================

# --- 6.1 Secrets with named parts: storage format and the check at add and mint time --------

PARTS_MAGIC = b"\x00parts\x00"     # a secret with named parts: this, then a JSON object


def secret_parts(plain: bytes) -> Dict[str, str]:
    """The named parts of a decrypted secret (a bare value is the part ``key``)."""
    if plain.startswith(PARTS_MAGIC):
        parts = json.loads(plain[len(PARTS_MAGIC):])
        if isinstance(parts, dict) and all(isinstance(v, str) for v in parts.values()):
            return parts
        raise DecryptError("malformed parts")
    return {"key": plain.decode("utf-8", "surrogateescape")}


def fill(template: str, parts: Dict[str, str]) -> str:
    """A credential place's value with the secret's parts put in (KeyError: one is missing)."""
    return PART_RE.sub(lambda m: parts[m.group(1)], template)


def pack_parts(parts: Dict[str, str]) -> bytes:
    """The plaintext a secret is encrypted from: a lone ``key`` part is the bare value (the
    format every secret had before parts), several are a JSON object after PARTS_MAGIC."""
    if list(parts) == ["key"]:
        return parts["key"].encode("utf-8", "surrogateescape")
    return PARTS_MAGIC + json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()


def part_problem(parts: Dict[str, str], provider: Provider) -> str:
    """Why these parts cannot serve the provider ("" if they can): a part it needs is
    missing, a part it does not know is there, or a value cannot travel in a header."""
    for verb, names in (("needs the", [n for n in provider.parts if n not in parts and
                                      n not in provider.optional]),
                        ("has no", [n for n in parts if n not in provider.parts])):
        if names:
            return (f"{provider.name} {verb} part(s) {', '.join(names)} (its parts: "
                    f"{', '.join(provider.parts)})")
    sent = {n for p in (provider.inject,) + provider.also + tuple(provider.token_places)
            if p is not None for n in PART_RE.findall(p.value)}     # these travel in headers
    bad = [n for n, v in parts.items() if not v or v != v.strip() or not (   # a PEM key (and
        v.isprintable() or n not in sent and v.startswith("-----BEGIN ") and    # only that)
        v.replace("\n", "").replace("\r", "").isprintable())]                   # spans lines
    return (f"the part(s) {', '.join(bad)} must be non-empty, unpadded, printable and one "
            f"line (a PEM key excepted)" if bad else "")


# --- 6.2 AWS: routes, the facts decide() checks, Signature Version 4, aws-chunked bodies ----
# AWS has no bearer key to swap: the agent's SDK signs with its seks token as the access key
# id, the broker checks that token, drops the signature and signs again with the real parts.

AWS_SERVICE_RE = re.compile(r"^[a-z][a-z0-9]{1,30}(?:-[a-z0-9]{1,30}){0,3}\Z")
AWS_REGION_RE = re.compile(r"^[a-z]{2}(?:-[a-z]{2,12}){1,2}-[0-9]{1,2}\Z")
AWS_SERVICES = ("bedrock-runtime", "bedrock", "s3", "sts")     # unless the secret lists others
AWS_SIGNING_NAMES = {"bedrock-runtime": "bedrock", "bedrock-agent-runtime": "bedrock",
                     "bedrock-agent": "bedrock"}
AWS_HOLD_MAX = 8 * 1024 * 1024   # an aws-chunked upload up to this is decoded whole: its hash is
                                 # signed and its trailing checksum kept (larger: streamed, unsigned)
AWS_QUERY_SERVICES = ("sts", "iam", "sns", "ses", "cloudformation")    # XML ErrorResponse errors
ROLE_RENEW_S = 300                # assumed-role credentials are renewed this long before expiry
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
AWS_PLACEHOLDER_SECRET = "seks-signs-for-you-this-is-not-a-secret"   # the agent's SDK needs one
AWS_QUERY_SIGNATURE = ("x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires",
                       "x-amz-signedheaders", "x-amz-signature", "x-amz-security-token")


def aws_route(rest: str) -> Tuple[str, str, str]:
    """``/<service>/<region>/<rest>`` -> (service, region, /rest), both checked against strict
    patterns, so the host the broker builds (``<service>.<region>.amazonaws.com``) is always
    one of AWS's own."""
    bits = rest.split("/", 3) + ["", "", ""]
    service, region = bits[1], bits[2]
    if not AWS_SERVICE_RE.match(service) or not AWS_REGION_RE.match(region):
        raise NotFound("AWS routes are /aws/<service>/<region>/..., e.g. "
                       "/aws/bedrock-runtime/us-east-1/model/<id>/converse")
    return service, region, "/" + (bits[3] if rest.count("/") >= 3 else "")


GCP_REGION_RE = re.compile(r"^(?:global|[a-z]{2,15}-[a-z]{2,15}[0-9]{1,2})\Z")


def gcp_route(rest: str) -> Tuple[str, str]:
    """``/<region>/<rest>`` of a regional Google route (Vertex AI) -> (region, /rest); the
    region is a strict pattern, so ``<region>-aiplatform.googleapis.com`` stays Google's."""
    region, _, tail = rest[1:].partition("/")
    if not GCP_REGION_RE.match(region):
        raise NotFound("regional routes are /<provider>/<region>/..., e.g. "
                       "/vertex/us-central1/v1/projects/...")
    return region, "/" + tail


def aws_key_id(headers: List[Tuple[str, str]], query: str) -> Optional[str]:
    """The access key id of a SigV4 signature (``Credential=`` of the Authorization header, or
    ``X-Amz-Credential``): the agent's seks token. None: no signature; "": a malformed one."""
    for name, value in headers:
        word, _, rest = value.strip().partition(" ")
        if name.lower() == "authorization" and word == "AWS4-HMAC-SHA256":
            field = re.search(r"(?:^|[\s,])Credential=([^/,\s]+)/", rest)
            return field.group(1) if field else ""
    for part in query.split("&") if query else ():
        name, _, value = part.partition("=")
        if urllib.parse.unquote(name).lower() == "x-amz-credential":
            return urllib.parse.unquote(value).split("/", 1)[0]
    return None


def aws_unsigned(headers: List[Tuple[str, str]], query: str,
                 rest: str) -> Tuple[List[Tuple[str, str]], str, str]:
    """The request without the agent's signature, date, session token and payload hash."""
    strip = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
    return [(n, v) for n, v in headers if n.lower() not in strip], rest, "&".join(
        part for part in (query.split("&") if query else ()) if urllib.parse.unquote(
            part.partition("=")[0]).lower() not in AWS_QUERY_SIGNATURE)


def aws_facts(rest: str, parts: Dict[str, str], query: str, body: Any,
              fields: List[Tuple[str, str]]) -> Tuple[Any, str, Tuple[str, ...]]:
    """The RequestFacts of an AWS route that decide() checks: ``aws`` (service, region, the
    services and regions the secret allows: its ``services`` and ``regions`` parts, comma- or
    space-separated; default the four built-in services, every region); ``action``: the STS
    action if exactly one is named, in the query or a held plain form body (STS answers
    GetSessionToken, AssumeRole... with working AWS keys: only GetCallerIdentity passes; an
    encoded body, aws-chunked or gzip, is sent decoded, so it names nothing that counts);
    ``reads``: the objects an S3 copy or rename reads (``/bucket/key``)."""
    service, region, _ = aws_route(rest)
    services = (parts.get("services") or " ".join(AWS_SERVICES)).replace(",", " ").split()
    regions = (parts.get("regions") or "*").replace(",", " ").split()
    actions = [urllib.parse.unquote_plus(v) for n, _, v in (p.partition("=") for p in query.split(
        "&") if p) if urllib.parse.unquote_plus(n).lower() == "action"]   # %41ction is Action
    if isinstance(body, bytes):
        actions += [v for n, v in urllib.parse.parse_qsl(body.decode("latin-1"))
                    if n.lower() == "action"]
    targets = [v for n, v in fields if n.lower() == "x-amz-target"]
    encoded = any(n.lower() == "content-encoding" or n.lower() == "x-amz-content-sha256" and
                  v.upper().startswith("STREAMING") for n, v in fields)
    one = len(actions) == 1 and len(targets) <= 1 and (body is None or isinstance(body, bytes) and (
        not body or not encoded)) and all(t.endswith("." + actions[0]) for t in targets)
    return (service, region, tuple(services), tuple(regions)), actions[0] if one else "", tuple(
        "/" + urllib.parse.unquote(v.split("?", 1)[0]).lstrip("/") for n, v in fields
        if n.lower() in ("x-amz-copy-source", "x-amz-rename-source"))


def aws_quote(text: str, safe: str = "") -> str:
    """URI-encode as SigV4 does: everything but A-Z a-z 0-9 - _ . ~ (and ``safe``)."""
    return urllib.parse.quote(text, safe=safe + "~")


def sigv4_query(query: str) -> str:
    """The canonical query: each name and value decoded and re-encoded, sorted."""
    pairs = []
    for part in query.split("&") if query else ():
        name, _, value = part.partition("=")
        pairs.append((aws_quote(urllib.parse.unquote(name)), aws_quote(urllib.parse.unquote(value))))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def sigv4_request(method: str, uri: str, query: str, headers: List[Tuple[str, str]],
                  payload_hash: str) -> Tuple[str, str]:
    """(the canonical request, the signed header names) over all of ``headers``: names lower-
    cased and sorted, values trimmed with inner whitespace collapsed, repeats joined by ','."""
    merged: Dict[str, List[str]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    lines = "".join(f"{n}:{','.join(merged[n])}\n" for n in names)
    signed = ";".join(names)
    return "\n".join([method, uri, sigv4_query(query), lines, signed, payload_hash]), signed


def sigv4_authorization(key_id: str, secret: str, region: str, service: str, amz_date: str,
                        canonical: str, signed: str) -> str:
    """The Authorization header: the string to sign over the canonical request's hash, the
    key derived from the secret by date, region, service, and its HMAC-SHA256."""
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = ("AWS4" + secret).encode("utf-8")
    for step in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, step.encode("utf-8"), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return (f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={signed}, "
            f"Signature={signature}")


def aws_sign(method: str, target: "Target", headers: List[Tuple[str, str]], payload_hash: str,
             parts: Dict[str, str], region: str, service: str,
             now: float) -> List[Tuple[str, str]]:
    """Sign a request for the host it is sent to with the real parts: X-Amz-Date,
    X-Amz-Content-Sha256 and (with a session token) X-Amz-Security-Token are set, and the Host,
    every x-amz-* header, Content-Type and Content-MD5 are signed with them. Non-S3 paths are
    encoded twice in the canonical request, as AWS wants."""
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    headers = headers + [("X-Amz-Date", amz_date), ("X-Amz-Content-Sha256", payload_hash)]
    if parts.get("session_token"):
        headers.append(("X-Amz-Security-Token", parts["session_token"]))
    path, _, query = target.path.partition("?")       # (the Host header is the forwarder's)
    signed = [("Host", target.host_header)] + [(n, v) for n, v in headers if n.lower() in (
        "content-type", "content-md5") or n.lower().startswith("x-amz-")]
    if not all(v.isascii() for _, v in signed):    # the bytes sent must be the bytes signed
        raise BadRequest("header values signed for AWS must be ASCII (encode x-amz-meta-* "
                         "values, as the AWS SDKs do)")
    canonical, names = sigv4_request(method, path if service == "s3" else aws_quote(path, "/"),
                                     query, signed, payload_hash)
    return headers + [("Authorization", sigv4_authorization(
        parts["access_key_id"], parts["secret_access_key"], region,
        AWS_SIGNING_NAMES.get(service, service), amz_date, canonical, names))]


def assumed_role(xml: bytes) -> Tuple[Dict[str, str], float]:
    """The temporary credentials and their expiry (unix time) from an STS AssumeRole answer
    (read by pattern, not by an XML parser: the answer comes from the network)."""
    fields = {}
    for name in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"):
        found = re.search(rb"<%s>([^<]{1,4096})</%s>" % (name.encode(), name.encode()), xml)
        if found is None:
            raise ValueError(f"no {name}")
        fields[name] = found.group(1).decode("ascii").strip()
    expires = datetime.datetime.strptime(fields["Expiration"][:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    return {"access_key_id": fields["AccessKeyId"], "secret_access_key": fields["SecretAccessKey"],
            "session_token": fields["SessionToken"]}, expires


def aws_unchunk(chunks: Iterable[bytes], trailers: Dict[str, str],
                expect: Optional[int] = None) -> Iterator[bytes]:
    """The payload inside an aws-chunked body: chunked coding read by the wire parser
    (BodyReader), the agent's chunk signatures (chunk extensions) dropped and the trailers
    (``x-amz-checksum-crc32: ...``) collected into ``trailers``. A malformed body, or one
    whose payload is not ``expect`` bytes, is a 400."""
    body = BodyReader(WireReader(ChunkSource(chunks)), "chunked", -1, "aws-chunked",
                      trailers=trailers)
    total = 0
    while True:
        piece = body.read()
        total += len(piece)
        if expect is not None and (total > expect or not piece and total != expect):
            raise BadRequest("aws-chunked body: not its x-amz-decoded-content-length", close=True)
        if not piece:
            return
        yield piece


# --- 6.3 RS256 for OAuth JWT grants ---------------------------------------------------------
# Google service accounts and GitHub Apps sign a JWT with an RSA key to get an access token.
# RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 section 8.2) over a key read from PEM by a small DER
# reader; the exponentiation is blinded, and each signature is checked before it is used.

_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def der_items(data: bytes) -> List[Tuple[int, bytes]]:
    """The (tag, content) items of a DER sequence's content (definite lengths only)."""
    items, at = [], 0
    while at < len(data):
        if at + 2 > len(data):
            raise ValueError("truncated DER")
        tag, size, at = data[at], data[at + 1], at + 2
        if size & 0x80:
            count = size & 0x7F
            if not 1 <= count <= 4 or at + count > len(data):
                raise ValueError("bad DER length")
            size, at = int.from_bytes(data[at:at + count], "big"), at + count
        if at + size > len(data):
            raise ValueError("truncated DER")
        items.append((tag, data[at:at + size]))
        at += size
    return items


def rsa_private_key(pem: str) -> Tuple[int, int, int]:
    """(n, e, d) from a PEM private key: PKCS#8 ("BEGIN PRIVATE KEY", as Google and GitHub
    hand them out) or PKCS#1 ("BEGIN RSA PRIVATE KEY"). ValueError for anything else."""
    found = re.search(r"-----BEGIN (RSA )?PRIVATE KEY-----([A-Za-z0-9+/=\s\\n]+)-----END", pem)
    if found is None:
        raise ValueError("not a PEM RSA private key")
    der = base64.b64decode(re.sub(r"\s|\\n", "", found.group(2)), validate=True)
    (tag, body), = der_items(der)
    items = der_items(body)
    if not found.group(1):                      # PKCS#8: version, algorithm, key
        if tag != 0x30 or len(items) < 3 or items[2][0] != 0x04 or \
                b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01" not in items[1][1]:
            raise ValueError("not an RSA PKCS#8 key")
        (tag, body), = der_items(items[2][1])
        items = der_items(body)
    if tag != 0x30 or len(items) < 4 or any(t != 0x02 for t, _ in items[:4]):
        raise ValueError("not an RSA private key")
    n, e, d = (int.from_bytes(v, "big") for _, v in items[1:4])
    if n < 1 << 2047 or not 1 < e < n or not 1 < d < n:
        raise ValueError("RSA keys of 2048 bits or more only")
    return n, e, d


def rs256_sign(key: Tuple[int, int, int], message: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 signature of SHA-256(message)."""
    n, e, d = key
    size = (n.bit_length() + 7) // 8
    encoded = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    m = int.from_bytes(b"\x00\x01" + b"\xff" * (size - 3 - len(encoded)) + b"\x00" + encoded, "big")
    r_inv = 0
    while not r_inv:                             # blinding: the exponent never meets m itself
        r = secrets.randbelow(n - 2) + 2
        with contextlib.suppress(ValueError):    # (no inverse: r shares a factor with n)
            r_inv = pow(r, -1, n)
    s = pow(m * pow(r, e, n) % n, d, n) * r_inv % n
    if pow(s, e, n) != m:
        raise ValueError("RSA signature check failed")
    return s.to_bytes(size, "big")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt_rs256(key: Tuple[int, int, int], claims: Dict[str, Any]) -> str:
    """A compact JWT with header {"alg":"RS256","typ":"JWT"}."""
    signing_input = b64url(b'{"alg":"RS256","typ":"JWT"}') + "." + b64url(
        json.dumps(claims, separators=(",", ":")).encode())
    return signing_input + "." + b64url(rs256_sign(key, signing_input.encode("ascii")))


# --- 6.4 OAuth grants the broker runs -------------------------------------------------------
# For services without static keys the secret holds the long-lived material (a refresh token,
# a client secret, a service account's or a GitHub App's private key) and the broker mints the
# short-lived access token that goes upstream as the part {access_token}. These two units are
# pure: what to send to the token endpoint, and what its answer means.

OAUTH_GRANTS = ("refresh_token", "client_credentials", "jwt_bearer", "github_app")
OAUTH_NEEDS = {"refresh_token": ("client_id", "refresh_token"),
               "client_credentials": ("client_id", "client_secret"),
               "jwt_bearer": ("client_email", "private_key"),
               "github_app": ("app_id", "private_key", "installation_id")}
OAUTH_FORM = {"refresh_token": ("refresh_token", "client_id", "client_secret"),  # sent if set
              "client_credentials": ("client_id", "scope", "client_secret")}
OAUTH_RENEW_S = 300          # an access token is renewed this long before it expires
OAUTH_HOLD_S = 30            # how long one renewal may take before another process takes over


def oauth_request(provider: Provider, parts: Dict[str, str],
                  now: float) -> Tuple[str, str, List[Tuple[str, str]], bytes]:
    """(grant, token endpoint URL, headers, body) for renewing this secret's access token: the
    first of the provider's grants whose parts the secret holds."""
    grant = next((g for g in provider.oauth if all(parts.get(n) for n in OAUTH_NEEDS[g])), "")
    if not grant:
        raise ValueError(f"the secret holds the parts of none of {provider.name}'s grants")
    url = parts.get("token_url") or parts.get("token_uri") or provider.token_url
    headers = [("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json")]
    if grant == "github_app":            # a GitHub App: its JWT buys an installation token
        if not (parts["app_id"].isdigit() and parts["installation_id"].isdigit()):
            raise ValueError("app_id and installation_id are numbers")
        url = (parts.get("api_url") or provider.token_url or "https://api.github.com").rstrip(
            "/") + f"/app/installations/{parts['installation_id']}/access_tokens"
        jwt = jwt_rs256(rsa_private_key(parts["private_key"]), {
            "iss": parts["app_id"], "iat": int(now) - 60, "exp": int(now) + 540})
        return grant, url, [("Authorization", "Bearer " + jwt),
                            ("Accept", "application/vnd.github+json")], b""
    if grant == "jwt_bearer":            # a Google service account
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": jwt_rs256(rsa_private_key(parts["private_key"]), {
                    "iss": parts["client_email"], "aud": url, "iat": int(now),
                    "exp": int(now) + 3600, "scope": parts.get("scope") or
                    "https://www.googleapis.com/auth/cloud-platform"})}
    else:
        form = {"grant_type": grant, **{n: parts.get(n) or "" for n in OAUTH_FORM[grant]}}
    return grant, url, headers, urllib.parse.urlencode(
        {k: v for k, v in form.items() if v}).encode()


def config_target(url: str, verify: bool) -> Target:
    """A URL from configuration (an OAuth token endpoint, never from the agent) as a Target."""
    scheme, host, port, path = parse_upstream_base(url)
    return Target(scheme, host, port, verify, path or "/")


def oauth_answer(grant: str, status: int, body: bytes,
                 now: float) -> Tuple[str, float, Optional[str]]:
    """(access token, expiry as unix time, a rotated refresh token or None) from a token
    endpoint's answer; ValueError (naming the status and the error code, never a value) for
    anything else."""
    obj = json_value(body)
    if not isinstance(obj, dict) or status not in (200, 201) or obj.get("ok") is False:
        code = obj.get("error") if isinstance(obj, dict) else None
        raise ValueError(f"the token endpoint answered {status}" + (
            f" ({code})" if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,40}", code) else ""))
    token = obj.get("token" if grant == "github_app" else "access_token")
    if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]{1,8192}", token):
        raise ValueError("the token endpoint's answer holds no usable access token")
    if grant == "github_app":
        expires = datetime.datetime.strptime(str(obj.get("expires_at"))[:19], "%Y-%m-%dT%H:%M:%S"
                                             ).replace(tzinfo=datetime.timezone.utc).timestamp()
    else:
        life = obj.get("expires_in", 3600)
        expires = now + (int(life) if isinstance(life, (int, str)) and str(life).isdigit()
                         else 3600)
    refresh = obj.get("refresh_token") if grant == "refresh_token" else None
    if refresh is not None and not (isinstance(refresh, str) and
                                    re.fullmatch(r"[\x21-\x7e]{1,8192}", refresh)):
        raise ValueError("the token endpoint's answer holds a malformed refresh token")
    return token, expires, refresh


# ============================================================================================
# 7. STORE (sqlite): schema and numbered migrations, secrets, tokens, agents, counters, audit
# ============================================================================================

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


class TokenRecord:
    """A token row joined with its agent and secret. Holds no plaintext key."""

    __slots__ = ("id", "token_hash", "secret_name", "provider", "agent", "expires_at",
                 "revoked_at", "policy", "agent_disabled_at", "secret_provider",
                 "secret_ciphertext", "parent", "parent_ended", "parent_expires_at", "parent_rate")

    def __init__(self, id: str, token_hash: bytes, secret_name: str, provider: str, agent: str,
                 expires_at: Optional[float], revoked_at: Optional[str], policy: str,
                 agent_disabled_at: Optional[str], secret_provider: Optional[str],
                 secret_ciphertext: Optional[str], parent: Optional[str] = None,
                 parent_revoked_at: Optional[str] = None,
                 parent_expires_at: Optional[float] = None, parent_found: int = 0,
                 parent_policy: Optional[str] = None) -> None:
        self.id, self.token_hash, self.secret_name = id, token_hash, secret_name
        self.provider, self.agent, self.expires_at = provider, agent, expires_at
        self.revoked_at, self.agent_disabled_at = revoked_at, agent_disabled_at
        self.policy: Dict[str, Any] = json.loads(policy or "{}")
        self.secret_provider, self.secret_ciphertext = secret_provider, secret_ciphertext
        self.parent = parent                 # a delegated token: the token that minted it
        self.parent_ended = bool(parent) and (not parent_found or parent_revoked_at is not None)
        self.parent_expires_at = parent_expires_at
        self.parent_rate = json.loads(parent_policy or "{}").get("rate")   # shared with children

    def __repr__(self) -> str:
        return f"TokenRecord({self.id} agent={self.agent} provider={self.provider})"


def new_token(provider: Provider, real_key: str = "") -> str:
    """A fresh fake token: ``seks_<provider>_<43 chars>``; Telegram-shaped where clients check.

    Telegram clients insist on ``<digits>:<rest>`` and aiogram takes the digits as the bot's
    id, so the fake token reuses the real key's (public) bot id when it has one."""
    token = f"seks_{provider.name}_{secrets.token_urlsafe(TOKEN_RANDOM_BYTES)}"
    if provider.token_shape == "bot-id":
        bot_id, sep, _ = real_key.partition(":")
        if not (sep and bot_id.isascii() and bot_id.isdigit() and len(bot_id) <= 20):
            bot_id = "".join(secrets.choice("0123456789") for _ in range(10))
        token = bot_id + ":" + token
    return token


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(6)


def utc_iso(epoch: Optional[float] = None) -> str:
    """UTC timestamp as ISO 8601 with a Z, to the second (what tables and audit rows show)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch is None else epoch))


def create_private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (atomic, no chmod after)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


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


def _migration_2(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE tokens ADD COLUMN label TEXT")     # the operator's note (--label)


def _migration_3(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE state ADD COLUMN verified TEXT")   # last `audit verify`, as JSON


def _migration_4(db: sqlite3.Connection) -> None:
    _run_script(db, """
        CREATE TABLE reservations (              -- what budget requests in flight may still cost
            id INTEGER PRIMARY KEY,
            token_id TEXT NOT NULL,
            amount INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            owner TEXT NOT NULL                  -- host:pid of the broker process holding it
        );
        CREATE INDEX reservations_token ON reservations (token_id)
    """)


def _migration_5(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE tokens ADD COLUMN parent TEXT")    # delegated: the minting token


def _migration_6(db: sqlite3.Connection) -> None:     # what a money budget has spent
    db.execute("ALTER TABLE token_usage ADD COLUMN cost_used INTEGER NOT NULL DEFAULT 0")


def _migration_7(db: sqlite3.Connection) -> None:     # OAuth access tokens the broker minted
    db.execute("""CREATE TABLE oauth_tokens (
        secret TEXT PRIMARY KEY,
        ciphertext TEXT,                      -- the access token, encrypted, bound to the secret
        expires_at REAL NOT NULL DEFAULT 0,
        renewing_until REAL NOT NULL DEFAULT 0,   -- one renewal at a time, across processes
        renewed_by TEXT)""")


MIGRATIONS: List[Callable[[sqlite3.Connection], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6,
    _migration_7]
DB_BUSY_SECONDS = 30.0        # how long a statement waits while another process holds a lock
PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}"
AUDIT_INSERT = (f"INSERT INTO audit ({', '.join(AuditRow.FIELDS)}, mac) "
                f"VALUES ({', '.join('?' * (len(AuditRow.FIELDS) + 1))})")


def owner_gone(owner: str) -> bool:
    """Whether the broker process that holds a reservation (``host:pid``) has died. Only a
    process on this host can be checked; one elsewhere is taken to be alive."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or owner == PROCESS_OWNER:
        return False
    try:
        os.kill(int(pid), 0)
    except OSError as exc:                     # PermissionError: alive, owned by another user
        return isinstance(exc, ProcessLookupError)
    return False


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


class Store:
    """The sqlite database: secrets (encrypted), tokens (hashed), agents, counters, audit.

    Connections come from a small pool (sqlite connections are not shared between threads at
    the same time); every write runs inside ``transaction()`` (BEGIN IMMEDIATE). WAL mode lets a
    second broker process and the CLI read and write the same file concurrently.
    """

    POOL_SIZE = 16
    LIVE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"   # a live token row

    def __init__(self, path: str, create: bool = True) -> None:
        """Open the database at ``path``; only ``create`` (commands that store something, and
        serve) may make a new one: a typo in --db must not look like an empty broker."""
        self.path = path
        if path != ":memory:":
            if not create and not os.path.exists(path):
                raise ConfigError(f"no database at {os.path.abspath(path)} (give --db or "
                                  f"$SEKS_DB; 'secret add' creates one)")
            if os.path.isdir(path):
                raise ConfigError(f"--db {path} is a folder, not a database file")
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise ConfigError(f"cannot create the database {path}: the folder {folder} "
                                  f"does not exist")
            create_private_file(path)
        self._pool: List[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()       # this process's writers queue here, not in sqlite
        self._generation_lock = threading.Lock()
        self._generation_db: Optional[sqlite3.Connection] = None
        self._generation_seen: Optional[Tuple[int, Tuple[int, bytes]]] = None
        try:
            self._migrate()
        except (sqlite3.DatabaseError, ConfigError) as exc:
            self.close()
            if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in str(exc) or
                                                           "malformed" in str(exc)):
                raise ConfigError(f"{path} is not a seks-broker database (not sqlite, or "
                                  f"damaged)") from None
            raise

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=DB_BUSY_SECONDS, isolation_level=None,
                             check_same_thread=False)      # (timeout: sqlite's busy_timeout)
        for attempt in range(100):        # a new file: another process may be making it WAL,
            try:                          # which sqlite answers "locked" without waiting
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if attempt == 99 or "locked" not in str(exc):
                    db.close()
                    raise
                time.sleep(0.01)
        db.execute("PRAGMA synchronous = NORMAL")   # durable across a process crash
        return db

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._pool.pop() if self._pool else None
        db = db or self._open()
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
        with self._write_lock, self.connection() as db:
            db.execute("PRAGMA busy_timeout = 0")
            if durable:
                db.execute("PRAGMA synchronous = FULL")
            try:
                begin_immediate(db)
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(DB_BUSY_SECONDS * 1000)}")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
            finally:
                if durable:
                    db.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> None:
        """Bring a new empty file, or one with our schema, up to date: never add tables to
        another program's database."""
        with self.connection() as db:           # one snapshot: another process may be making it
            db.execute("BEGIN")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                               "'table'")}
        ours = not tables if version == 0 else {"state", "secrets", "tokens", "audit"} <= tables
        if not ours:
            raise ConfigError(f"{self.path} is an sqlite database of something else, not "
                              f"seks-broker's")
        if version > len(MIGRATIONS):
            raise ConfigError(f"database schema {version} is newer than this broker "
                              f"({len(MIGRATIONS)}); upgrade seks_broker.py")
        for step in range(version, len(MIGRATIONS)):
            with self.transaction() as tx:          # (another process may be migrating too)
                if tx.execute("PRAGMA user_version").fetchone()[0] == step:
                    MIGRATIONS[step](tx)
                    tx.execute(f"PRAGMA user_version = {step + 1}")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        with self._generation_lock:
            if self._generation_db is not None:
                pool.append(self._generation_db)
            self._generation_db, self._generation_seen = None, None
        for db in pool:
            db.close()

    def generation(self) -> Tuple[int, bytes]:
        """A counter that changes whenever a secret, token or agent changes (triggers), and the
        check value of the master key the DB is encrypted under (changes on rotation).

        Read on every request, so made cheap (measured: 13-15% more requests/s): on a
        connection of its own that never writes, ``PRAGMA data_version`` tells whether any
        other connection or process committed since the last read; if none did, the last
        answer still holds."""
        with self._generation_lock:
            db = self._generation_db = self._generation_db or self._open()
            version = db.execute("PRAGMA data_version").fetchone()[0]
            seen = self._generation_seen
            if seen is None or seen[0] != version:
                row = db.execute("SELECT generation, key_check FROM state WHERE id = 1").fetchone()
                seen = self._generation_seen = (version, (row[0], bytes(row[1] or b"")))
            return seen[1]

    def check_master_key(self, check: bytes) -> None:
        """Remember which master key this DB belongs to; refuse any other one."""
        with self.transaction() as db:
            self._require_key(db, check, ConfigError("the master key does not match this "
                                                     "database (wrong SEKS_MASTER_KEY or key "
                                                     "file?)"))
            db.execute("UPDATE state SET key_check = ? WHERE id = 1 AND key_check IS NULL",
                       (check,))

    def rekey(self, old: "SecretCipher", new: "SecretCipher", old_audit: bytes,
              new_audit: bytes, new_check: bytes, force: bool = False,
              progress: Callable[[int], None] = lambda done: None) -> int:
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
                progress(1)
            db.execute("UPDATE oauth_tokens SET ciphertext = NULL")   # renewed under the new key
            anchor = db.execute("SELECT audit_anchor FROM state WHERE id = 1").fetchone()[0]
            prev = old_prev = bytes(anchor or b"")
            raws = db.execute(f"SELECT {', '.join(AuditRow.FIELDS)}, mac FROM audit ORDER BY id")
            updates = []
            for row in map(AuditRow.from_db, raws.fetchall()):
                if not force and not hmac.compare_digest(
                        audit_mac(old_audit, row.values(), old_prev), row.mac):
                    raise ConfigError(f"audit row {row.id} does not verify; nothing was changed "
                                      f"(investigate, or pass --force)")
                old_prev, prev = row.mac, audit_mac(new_audit, row.values(), prev)
                updates.append((prev, row.id))
                if len(updates) % 1000 == 0:
                    progress(1000)
            db.executemany("UPDATE audit SET mac = ? WHERE id = ?", updates)
            db.execute("UPDATE state SET key_check = ? WHERE id = 1", (new_check,))
        return len(rows)

    def has_secrets(self) -> bool:
        return bool(self.query("SELECT 1 FROM secrets LIMIT 1"))

    def has_key_check(self) -> bool:
        return self.query("SELECT key_check FROM state WHERE id = 1")[0][0] is not None

    def counts(self, now: float) -> Dict[str, int]:
        """What the database holds, for serve's start-up lines and `status`."""
        return dict(zip(("secrets", "agents", "live_tokens", "audit_rows"), self.query(
            f"SELECT (SELECT COUNT(*) FROM secrets), (SELECT COUNT(*) FROM agents), "
            f"(SELECT COUNT(*) FROM tokens WHERE {self.LIVE}), (SELECT COUNT(*) FROM audit)",
            (now,))[0]))

    # --- secrets ---------------------------------------------------------------------------
    @staticmethod
    def _require_key(db: sqlite3.Connection, check: bytes,
                     error: Optional[SeksError] = None) -> None:
        """Inside a write transaction: refuse (with ``error``, if given) if the DB moved to
        another master key since the caller loaded its own (a rotate-master-key committed
        meanwhile)."""
        stored = db.execute("SELECT key_check FROM state WHERE id = 1").fetchone()[0]
        if stored is not None and not hmac.compare_digest(bytes(stored), check):
            raise error or ConfigError("the master key was rotated while this command ran; "
                                       "nothing was changed: run it again")

    def put_secret(self, name: str, provider: str, ciphertext: str, replace: bool,
                   check: bytes) -> None:
        """Store a secret encrypted under the key whose check value is ``check``."""
        now = utc_iso()
        with self.transaction() as db:
            self._require_key(db, check)
            if replace:
                written = db.execute("UPDATE secrets SET ciphertext = ?, updated_at = ? WHERE "
                                     "name = ?", (ciphertext, now, name))
            else:
                written = db.execute("INSERT INTO secrets VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                                     "(name) DO NOTHING", (name, provider, ciphertext, now, now))
            if not written.rowcount:
                raise ConfigError(f"no secret named {name!r}" if replace else
                                  f"secret {name!r} exists; use 'secret rotate' to change it")
            db.execute("DELETE FROM oauth_tokens WHERE secret = ?", (name,))   # old grant

    def oauth_claim(self, secret: str, margin: float, hold: float
                    ) -> Tuple[str, Optional[str], float, Optional[str]]:
        """In one transaction: ("token", its ciphertext, expiry, None) while the stored access
        token has more than ``margin`` seconds left; ("wait", the old token's ciphertext, its
        expiry, None) while another process or thread renews it; else ("renew", None, 0, the
        secret's ciphertext), after marking the renewal as this caller's for ``hold`` s."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT ciphertext, expires_at, renewing_until FROM oauth_tokens "
                             "WHERE secret = ?", (secret,)).fetchone()
            if row and row[0] and row[1] - now > margin:
                return "token", row[0], row[1], None
            if row and row[2] > now:          # renewing elsewhere: the old token, if any
                return "wait", row[0], row[1], None
            db.execute("INSERT INTO oauth_tokens (secret, renewing_until, renewed_by) VALUES "
                       "(?, ?, ?) ON CONFLICT(secret) DO UPDATE SET renewing_until = excluded."
                       "renewing_until, renewed_by = excluded.renewed_by",
                       (secret, now + hold, PROCESS_OWNER))
            found = db.execute("SELECT ciphertext FROM secrets WHERE name = ?",
                               (secret,)).fetchone()
            return "renew", None, 0.0, found[0] if found else None

    def oauth_save(self, secret: str, ciphertext: Optional[str], expires_at: float,
                   secret_ciphertext: Optional[str] = None, was: Optional[str] = None) -> bool:
        """The renewal's outcome, in one transaction: the new access token (None: the
        renewal failed; the claim is released) and, when the provider rotated the refresh
        token, the secret's new ciphertext, so a crash never leaves only the old one. Unless
        the secret is no longer ``was`` (the one renewed from): the operator rotated it or the
        master key meanwhile, and this renewal must not undo that (False: nothing stored)."""
        with self.transaction(durable=True) as db:
            kept = was is None or db.execute("SELECT 1 FROM secrets WHERE name = ? AND "
                                             "ciphertext = ?", (secret, was)).fetchone()
            if kept and secret_ciphertext is not None:
                db.execute("UPDATE secrets SET ciphertext = ?, updated_at = ? WHERE name = ?",
                           (secret_ciphertext, utc_iso(), secret))
            db.execute("UPDATE oauth_tokens SET ciphertext = ?, expires_at = ?, renewing_until = "
                       "0 WHERE secret = ?", (ciphertext if kept else None,
                                               expires_at if ciphertext and kept else 0.0, secret))
            return bool(kept)

    def get_secret(self, name: str) -> Optional[Tuple[str, str]]:
        rows = self.query("SELECT provider, ciphertext FROM secrets WHERE name = ?", (name,))
        return rows[0] if rows else None

    def list_secrets(self) -> List[Tuple[str, str, str, str]]:
        return self.query("SELECT name, provider, created_at, updated_at FROM secrets "
                          "ORDER BY name")

    def remove_secret(self, name: str) -> int:
        """Delete a secret and revoke its tokens; returns how many tokens were revoked."""
        with self.transaction() as db:
            if db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 0:
                raise ConfigError(f"no secret named {name!r}")
            db.execute("DELETE FROM oauth_tokens WHERE secret = ?", (name,))
            return db.execute("UPDATE tokens SET revoked_at = ? WHERE secret_name = ? "
                              "AND revoked_at IS NULL", (utc_iso(), name)).rowcount

    # --- agents ----------------------------------------------------------------------------
    def add_agent(self, name: str, exist_ok: bool = False) -> bool:
        with self.transaction() as db:
            added = db.execute("INSERT INTO agents VALUES (?, ?, NULL) ON CONFLICT(name) "
                               "DO NOTHING", (name, utc_iso())).rowcount
            if not added and not exist_ok:
                raise ConfigError(f"agent {name!r} exists")
            return bool(added)

    def set_agent_disabled(self, name: str, disabled: bool) -> None:
        with self.transaction() as db:
            changed = db.execute("UPDATE agents SET disabled_at = ? WHERE name = ?",
                                 (utc_iso() if disabled else None, name)).rowcount
            if not changed:
                raise ConfigError(f"no agent named {name!r}")

    def remove_agent(self, name: str, force: bool) -> int:
        """Delete an agent and its tokens (they stop working with it); without ``force``
        refused while it has live tokens. Returns how many token rows went."""
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"no agent named {name!r}")
            live = db.execute(f"SELECT COUNT(*) FROM tokens WHERE agent = ? AND {self.LIVE}",
                              (name, time.time())).fetchone()[0]
            if live and not force:
                raise ConfigError(f"agent {name!r} has {live} live token(s); revoke them, or "
                                  f"pass --force to remove the agent and its tokens")
            db.execute("DELETE FROM token_usage WHERE token_id IN (SELECT id FROM tokens "
                       "WHERE agent = ?)", (name,))
            gone = db.execute("DELETE FROM tokens WHERE agent = ?", (name,)).rowcount
            db.execute("DELETE FROM agents WHERE name = ?", (name,))
            return gone

    def list_agents(self) -> List[Tuple[str, str, Optional[str], int]]:
        return self.query(
            "SELECT a.name, a.created_at, a.disabled_at, "
            f"(SELECT COUNT(*) FROM tokens t WHERE t.agent = a.name AND {self.LIVE}) "
            "FROM agents a ORDER BY a.name", (time.time(),))

    # --- tokens ----------------------------------------------------------------------------
    def add_token(self, token_id: str, token_hash: bytes, secret_name: str, provider: str,
                  agent: str, expires_at: Optional[float], policy: Dict[str, Any],
                  label: Optional[str] = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens (id, token_hash, secret_name, provider, agent, "
                       "created_at, expires_at, policy, label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (token_id, token_hash, secret_name, provider, agent, utc_iso(),
                        expires_at, json.dumps(policy, sort_keys=True), label))
            db.execute("INSERT INTO token_usage (token_id) VALUES (?)", (token_id,))

    def delegate(self, parent: "TokenRecord", token_id: str, token_hash: bytes,
                 child: Callable[[Optional[int], Optional[int]], Tuple[Dict[str, Any],
                                                                      Optional[float], str]]
                 ) -> Dict[str, Any]:
        """Mint a child of ``parent`` in one transaction: ``child`` is told what the parent
        has left (requests, budget tokens after what is spent and held) and returns the
        child's policy, expiry and label or raises; the child's request count and budget are
        then carved out of the parent's."""
        with self.transaction() as db:
            live = db.execute(f"SELECT COUNT(*) FROM tokens WHERE parent = ? AND {self.LIVE}",
                              (parent.id, time.time())).fetchone()[0]
            if live >= MAX_CHILDREN:
                raise Forbidden(f"this token already has {MAX_CHILDREN} live child tokens")
            limits = parent.policy
            key, counter = budget_key(limits), budget_counter(limits)
            requests_, used = db.execute(f"SELECT requests, {counter} FROM token_usage WHERE "
                                         f"token_id = ?", (parent.id,)).fetchone()
            held = db.execute("SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE "
                              "token_id = ?", (parent.id,)).fetchone()[0]
            policy, expires, label = child(
                limits["max_requests"] - requests_ if "max_requests" in limits else None,
                limits[key] - used - held if key else None)
            db.execute("INSERT INTO tokens (id, token_hash, secret_name, provider, agent, "
                       "created_at, expires_at, policy, label, parent) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (token_id, token_hash, parent.secret_name, parent.provider, parent.agent,
                        utc_iso(), expires, json.dumps(policy, sort_keys=True), label or None,
                        parent.id))
            db.execute("INSERT INTO token_usage (token_id) VALUES (?)", (token_id,))
            carved = policy.get("max_requests", 0) if "max_requests" in limits else 0
            db.execute(f"UPDATE token_usage SET requests = requests + ?, {counter} = {counter} "
                       f"+ ? WHERE token_id = ?", (carved, policy.get(key, 0), parent.id))
            return policy

    # a token (t) with its agent (a), its secret (s) and the token it was delegated from (p)
    TOKEN_JOINS = ("FROM tokens t LEFT JOIN agents a ON a.name = t.agent LEFT JOIN secrets s ON "
                   "s.name = t.secret_name LEFT JOIN tokens p ON p.id = t.parent")

    def find_token(self, token_hash: bytes) -> Optional["TokenRecord"]:
        """The token row (with its agent's state and its secret) for a SHA-256 digest."""
        rows = self.query(
            "SELECT t.id, t.token_hash, t.secret_name, t.provider, t.agent, t.expires_at, "
            "t.revoked_at, t.policy, a.disabled_at, s.provider, s.ciphertext, t.parent, "
            f"p.revoked_at, p.expires_at, p.id IS NOT NULL, p.policy {self.TOKEN_JOINS} "
            "WHERE t.token_hash = ?", (token_hash,))
        if not rows or not hmac.compare_digest(rows[0][1], token_hash):
            return None
        return TokenRecord(*rows[0])

    TOKEN_FIELDS = ("id", "agent", "provider", "secret", "label", "created_at", "expires_at",
                    "revoked_at", "policy", "requests", "tokens_used", "agent_disabled_at",
                    "secret_exists", "parent", "parent_ended", "parent_expires_at", "cost_used")

    def list_tokens(self) -> List[Dict[str, Any]]:
        rows = self.query(
            "SELECT t.id, t.agent, t.provider, t.secret_name, t.label, t.created_at, "
            "t.expires_at, t.revoked_at, t.policy, COALESCE(u.requests, 0), "
            "COALESCE(u.tokens_used, 0), a.disabled_at, s.name IS NOT NULL, t.parent, "
            "t.parent IS NOT NULL AND (p.id IS NULL OR p.revoked_at IS NOT NULL), "
            f"p.expires_at, COALESCE(u.cost_used, 0) {self.TOKEN_JOINS} "
            "LEFT JOIN token_usage u ON u.token_id = t.id ORDER BY t.created_at, t.id")
        tokens = [dict(zip(self.TOKEN_FIELDS, row)) for row in rows]
        for token in tokens:
            token["policy"] = json.loads(token["policy"] or "{}")
            token["secret_exists"] = bool(token["secret_exists"])
            token["parent_ended"] = bool(token["parent_ended"])
        return tokens

    def prune_tokens(self, before: float) -> int:
        """Delete revoked and expired tokens whose end is older than ``before`` (unix time);
        their audit rows stay. Returns how many went."""
        cutoff = utc_iso(before)
        with self.transaction() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM tokens WHERE (revoked_at IS NOT NULL AND revoked_at <= ?) OR "
                "(revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= ?)",
                (cutoff, before))]
            db.executemany("DELETE FROM token_usage WHERE token_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM tokens WHERE id = ?", [(i,) for i in ids])
            return len(ids)

    def revoke_token(self, token_hash: Optional[bytes],
                     token_id: Optional[str]) -> Tuple[str, Optional[str]]:
        """Revoke a token by digest or id: its id, and when it was revoked before (or None)."""
        with self.transaction() as db:
            column, value = ("token_hash", token_hash) if token_hash is not None else ("id", token_id)
            row = db.execute(f"SELECT id, revoked_at FROM tokens WHERE {column} = ?",
                             (value,)).fetchone()
            if row is None:
                raise ConfigError("no such token")
            if row[1] is None:
                db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (utc_iso(), row[0]))
            return row[0], row[1]

    # --- policy counters -------------------------------------------------------------------
    def admit(self, token_id: str, policy: Dict[str, Any], now: float,
              plan: Optional[Callable[[int, bool], int]] = None,
              parent: Optional[Tuple[str, List[Any]]] = None) -> Optional[int]:
        """Count one request against the token's limits (check_limits), atomically: BEGIN
        IMMEDIATE serialises every thread and broker process on this DB. With a budget,
        ``plan`` is told what is left (the budget minus what was spent and what requests in
        flight hold) and returns what this request may cost; that is held as a reservation
        (its id is returned) until append_audit settles it. A crashed process's reservations
        stay held: they are settled at their bound. ``parent``: a delegated token's parent id
        and rate: the request takes from the parent's bucket too, so the parent and all its
        children together keep to the parent's rate."""
        key, counter = budget_key(policy), budget_counter(policy)
        if plan is not None and key:
            self._settle_orphans(token_id, counter)
        with self.transaction() as db:
            requests_, used, bucket, bucket_at = db.execute(
                f"SELECT requests, {counter}, bucket, bucket_at FROM token_usage WHERE "
                f"token_id = ?", (token_id,)).fetchone()
            bucket, bucket_at = check_limits(policy, requests_, used, bucket, bucket_at, now)
            if parent is not None:
                shared, shared_at = db.execute("SELECT bucket, bucket_at FROM token_usage WHERE "
                                               "token_id = ?", (parent[0],)).fetchone() or \
                    (None, None)
                shared, shared_at = check_limits({"rate": parent[1]}, 0, 0, shared, shared_at, now)
                db.execute("UPDATE token_usage SET bucket = ?, bucket_at = ? WHERE token_id = ?",
                           (shared, shared_at, parent[0]))
            reservation = None
            if plan is not None and key:
                held = db.execute("SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE "
                                  "token_id = ?", (token_id,)).fetchone()[0]
                amount = plan(policy[key] - used - held, held > 0)
                reservation = db.execute(
                    "INSERT INTO reservations (token_id, amount, created_at, owner) VALUES "
                    "(?, ?, ?, ?)", (token_id, amount, utc_iso(now), PROCESS_OWNER)).lastrowid
            db.execute("UPDATE token_usage SET requests = requests + 1, bucket = ?, bucket_at = ? "
                       "WHERE token_id = ?", (bucket, bucket_at, token_id))
            return reservation

    def _settle_orphans(self, token_id: str, counter: str) -> None:
        """Reservations whose broker process died are settled at their bound (the upstream may
        have billed the request), in a transaction of their own."""
        rows = self.query("SELECT id, owner FROM reservations WHERE token_id = ?", (token_id,))
        gone = [row_id for row_id, owner in rows if owner_gone(owner)]
        if not gone:
            return
        with self.transaction() as db:
            for row_id in gone:          # (one settled by another process meanwhile adds 0)
                db.execute(f"UPDATE token_usage SET {counter} = {counter} + COALESCE((SELECT "
                           f"amount FROM reservations WHERE id = ?), 0) WHERE token_id = ?",
                           (row_id, token_id))
                db.execute("DELETE FROM reservations WHERE id = ?", (row_id,))

    # --- audit -----------------------------------------------------------------------------
    def append_audit(self, keys: "KeyRing", row: "AuditRow", counted: bool,
                     reservation: Optional[int] = None,
                     price: Optional[Tuple[int, int, int]] = None, cached: int = 0) -> None:
        """Append one chained audit row, and the request's usage, in one short transaction;
        refuses (KeyRotated) if the DB moved to another master key meanwhile. ``counted``: the
        request was already counted at admission. ``reservation`` is settled here: to the
        usage the answer reported, or, if it reported none, to its whole bound. ``price``: a
        money budget's (input, output, cached input) nano-dollars per token; its cost counter
        is settled too (``cached``: input tokens the answer reported as read from cache)."""
        with self.transaction() as db:
            self._require_key(db, keys.check, KeyRotated())
            self._append_audit(db, keys.audit, row)
            spent = (row.tokens_in or 0) + (row.tokens_out or 0)
            cost = usage_cost(price, row.tokens_in, row.tokens_out, cached) if price else 0
            if reservation is not None:
                held = db.execute("SELECT amount FROM reservations WHERE id = ?",
                                  (reservation,)).fetchone()
                db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
                if held is not None and row.tokens_in is None and row.tokens_out is None:
                    spent, cost = (0, held[0]) if price else (held[0], 0)
            if row.token_id and (spent or cost or not counted):
                db.execute("UPDATE token_usage SET tokens_used = tokens_used + ?, cost_used = "
                           "cost_used + ?, requests = requests + ? WHERE token_id = ?",
                           (spent, cost, 0 if counted else 1, row.token_id))

    @staticmethod
    def _append_audit(db: sqlite3.Connection, key: bytes, row: "AuditRow") -> None:
        """Chained to the last row's MAC, or to the prune anchor's when the log is empty."""
        last = db.execute("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1").fetchone() or \
            db.execute("SELECT audit_anchor_id, audit_anchor FROM state WHERE id = 1").fetchone()
        row.id, prev = last[0] + 1, bytes(last[1] or b"")
        row.mac = audit_mac(key, row.values(), prev)
        db.execute(AUDIT_INSERT, row.values() + (row.mac,))

    def audit_rows(self, where: str = "", params: Tuple[Any, ...] = (),
                   limit: Optional[int] = None, after_id: int = 0) -> List["AuditRow"]:
        sql = (f"SELECT {', '.join(AuditRow.FIELDS)}, mac FROM audit WHERE id > ?"
               + (f" AND {where}" if where else ""))
        sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id" \
            if limit is not None else sql + " ORDER BY id"
        return [AuditRow.from_db(r) for r in self.query(sql, (after_id,) + params)]

    def last_audit_id(self) -> int:
        return self.query("SELECT COALESCE(MAX(id), 0) FROM audit")[0][0]

    def record_verify(self, outcome: Dict[str, Any]) -> None:
        """Remember the last `audit verify` (for `status`): when, whether it passed, the head."""
        with self.transaction() as db:
            db.execute("UPDATE state SET verified = ? WHERE id = 1",
                       (json.dumps(outcome, sort_keys=True),))

    def last_verify(self) -> Optional[Dict[str, Any]]:
        text = self.query("SELECT verified FROM state WHERE id = 1")[0][0]
        return json.loads(text) if text else None

    def query(self, sql: str, params: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
        """The rows of a read-only SELECT (also the CLI's summaries: `status`)."""
        with self.connection() as db:
            return db.execute(sql, params).fetchall()

    def audit_anchor(self) -> bytes:
        return bytes(self.query("SELECT audit_anchor FROM state WHERE id = 1")[0][0] or b"")

    def prune_audit(self, key: bytes, before_ts: str, check: bytes,
                    progress: Callable[[int, int], None] = lambda done, total: None) -> int:
        """Delete rows older than ``before_ts`` and append a chained 'prune' row that records
        the anchor (last deleted row's id and MAC), so the rest still verifies."""
        with self.transaction() as db:
            self._require_key(db, check)
            last = db.execute("SELECT id, mac FROM audit WHERE ts < ? AND outcome != 'prune' "
                              "ORDER BY id DESC LIMIT 1", (before_ts,)).fetchone()
            if last is None:
                return 0
            anchor_id, anchor_mac = last[0], bytes(last[1])
            first = db.execute("SELECT COALESCE(MIN(id), 0) FROM audit").fetchone()[0]
            deleted = 0
            for done in range(first - 1, anchor_id, 10000):   # batches (progress), one transaction
                upto = min(done + 10000, anchor_id)
                deleted += db.execute("DELETE FROM audit WHERE id > ? AND id <= ?",
                                      (done, upto)).rowcount
                progress(upto - done, anchor_id - first + 1)
            db.execute("UPDATE state SET audit_anchor = ?, audit_anchor_id = ? WHERE id = 1",
                       (anchor_mac, anchor_id))
            row = AuditRow(ts=utc_iso(), outcome="prune", reason=json.dumps(
                {"before": before_ts, "deleted": deleted, "anchor_id": anchor_id,
                 "anchor_mac": anchor_mac.hex()}, sort_keys=True))
            self._append_audit(db, key, row)       # same transaction: no half-pruned log
        return deleted

    def usage_rows(self, where: str, params: Tuple[Any, ...]) -> List[Tuple[Any, ...]]:
        sql = ("SELECT agent, provider, COALESCE(model, ''), COUNT(*), "
               "COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), "
               "SUM(CASE WHEN model IS NOT NULL AND tokens_in IS NULL AND tokens_out IS NULL "
               "THEN 1 ELSE 0 END) FROM audit WHERE outcome = 'ok'" + (f" AND {where}" if where else "")
               + " GROUP BY agent, provider, COALESCE(model, '') ORDER BY agent, provider, 3")
        return self.query(sql, params)


# ============================================================================================
# 8. POLICY STATE: the token cache, policies as stored, request facts, the usage meter
# ============================================================================================

def budget_words(key: str, amount: int) -> str:
    return f"${amount / 1e9:,.6f}".rstrip("0").rstrip(".") if key == "budget_nusd" else \
        f"{amount} tokens"


class TokenCache:
    """token digest -> (record, the secret's parts, their scrub pairs).

    Invariant: an entry is trusted only while the store's generation is the one it was read
    under. Triggers bump the generation on every change to secrets, tokens and agents (from any
    process), and every lookup reads it first, so a revocation, rotation or removal bites on the
    very next request, and the key and its variants are dropped together. The cache saves a
    join and a decryption per request; it never decides anything."""

    def __init__(self, store: Store, keys: KeyRing, reload: Callable[[], KeyRing],
                 size: int = 10_000,
                 public: Callable[[str], Tuple[str, ...]] = lambda provider: ()) -> None:
        self._store, self.keys, self._reload, self._size = store, keys, reload, size
        self._public = public     # a provider's public part names (never scrubbed)
        self._lock = threading.Lock()
        self._generation = -1
        self._entries: Dict[bytes, Tuple[Optional[TokenRecord], Optional[Dict[str, str]],
                                         Any]] = {}

    def reload_keys(self) -> None:
        """The master key was rotated under us: take the new one (or refuse to serve)."""
        with self._lock:
            self.keys = self._reload()
            self._entries.clear()

    def lookup(self, token: str) -> Tuple[Optional[TokenRecord], Optional[Dict[str, str]], Any]:
        return self.lookup_digest(token_digest(token))

    def lookup_digest(self, digest: bytes
                      ) -> Tuple[Optional[TokenRecord], Optional[Dict[str, str]], Any]:
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
        parts, pairs = None, ()
        if record is not None and record.secret_ciphertext is not None:
            try:
                parts = secret_parts(self.keys.cipher.decrypt(
                    record.secret_ciphertext, secret_ad(record.secret_name,
                                                        record.secret_provider or "")))
            except (DecryptError, ValueError):
                sys.stderr.write(f"{utc_iso()} ERROR a stored secret failed verification "
                                 f"(wrong master key or edited database)\n")
                raise BrokerError("the broker could not use the stored secret") from None
            pairs = parts_pairs(parts, self._public(record.secret_provider or ""))
        entry = (record, parts, pairs)
        with self._lock:
            if self._generation == generation:
                if len(self._entries) >= self._size:
                    self._entries.clear()
                self._entries[digest] = entry
        return entry


RATE_RE = re.compile(r"^(\d+)/(s|m|h|d)\Z")
RATE_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
MAX_USAGE_BODY = 8 * 1024 * 1024      # largest non-stream answer parsed whole for token usage
USAGE_TAIL_BYTES = 64 * 1024          # of a larger one, the tail searched for its usage


def make_policy(methods: Optional[List[str]], paths: Optional[List[str]], rate: Optional[str],
                max_requests: Optional[int], models: Optional[str],
                budget_tokens: Optional[int], budget_usd: Optional[float] = None) -> Dict[str, Any]:
    """The per-token policy stored with the token (only the limits that were asked for). A
    money budget is kept in nano-dollars (budget_nusd), so counting it stays exact."""
    policy: Dict[str, Any] = {}
    if methods:
        policy["methods"] = sorted({m.strip().upper() for m in methods if m.strip()})
    if paths:
        for path in paths:
            if not path.startswith("/"):
                raise UsageError(f"--allow-path must start with '/' (got {path!r})")
            validate_path(path)
        policy["paths"] = list(paths)
    if rate:             # 60/m -> [60, 60.0, "minute"]: capacity, refill seconds, unit word
        match = RATE_RE.match(rate.strip())
        if not match or int(match.group(1)) == 0:
            raise UsageError(f"--rate takes COUNT/UNIT with unit s, m, h or d, like 60/m "
                             f"(got {rate!r})")
        unit = match.group(2)
        policy["rate"] = [int(match.group(1)), float(TTL_UNITS[unit]), RATE_WORDS[unit]]
    if models:
        policy["models"] = [m.strip() for m in models.split(",") if m.strip()]
    for flag, count in (("max-requests", max_requests), ("budget-tokens", budget_tokens)):
        if count is not None:
            if count < 1:
                raise UsageError(f"--{flag} must be at least 1")
            policy[flag.replace("-", "_")] = count
    if budget_usd is not None:
        if budget_tokens is not None:
            raise UsageError("a token has one budget: --budget-tokens or --budget-usd")
        if not 0 < budget_usd < 1e9:
            raise UsageError("--budget-usd is an amount of US dollars above 0, like 5 or 0.25")
        policy["budget_nusd"] = round(budget_usd * 1e9)
    return policy


def describe_policy(policy: Dict[str, Any]) -> str:
    budget = budget_key(policy)
    parts = ["methods=" + ",".join(policy["methods"]) if "methods" in policy else "",
             "paths=" + ",".join(policy["paths"]) if "paths" in policy else "",
             f"rate={policy['rate'][0]}/{policy['rate'][2][0]}" if "rate" in policy else "",
             f"max-requests={policy['max_requests']}" if "max_requests" in policy else "",
             "models=" + ",".join(policy["models"]) if "models" in policy else "",
             f"budget={budget_words(budget, policy[budget])}".replace(" tokens", "")
             if budget else "",
             "decoy" + (f" on-tripwire={policy['on_tripwire']}" if policy.get("on_tripwire")
                        else "") if policy.get("decoy") else "",
             f"on-leak={policy['on_leak']}" if policy.get("on_leak") else "",
             "delegation" if policy.get("delegation") else ""]
    return " ".join(part for part in parts if part) or "-"


def path_for_policy(rest: str, swap: "CredentialSwap") -> str:
    """The decoded path that --allow-path prefixes match, with a token path segment removed
    (Telegram's ``/bot<T>/sendMessage`` is matched as ``/bot/sendMessage``)."""
    if swap.place.kind == "path":
        _, slash, tail = rest[len(swap.prefix):].partition("/")
        rest = swap.prefix + slash + tail
    return urllib.parse.unquote(rest)


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


_GEMINI_MODEL_RE = re.compile(r"/models/([^/:?]+)")
_DEPLOYMENT_RE = re.compile(r"/openai/deployments/([^/]+)/", re.IGNORECASE)


def _reject_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def json_value(data: Any, hook: Optional[Callable[..., Any]] = None) -> Any:
    """``data`` parsed as JSON, or None where it is not JSON (or nests too deep)."""
    try:
        return json.loads(data, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return None


def request_model(provider: Provider, rest: str, body: Optional[bytes],
                  content_type: str = "") -> Optional[str]:
    """The model a request names (for the audit row): Gemini's path, the JSON body's
    ``model`` field, or a multipart form's ``model`` field."""
    if provider.usage == "gemini":
        match = _GEMINI_MODEL_RE.search(urllib.parse.unquote(rest))
        return match.group(1) if match else None
    if provider.usage == "bedrock":
        match = re.search(r"/model/([^/]+)/", rest)
        return urllib.parse.unquote(match.group(1)) if match else None
    if not body:
        return None
    if content_type.lower().startswith("multipart/form-data"):
        return multipart_field(body, content_type, "model")
    try:
        value = json.loads(body.decode("utf-8-sig")).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def request_facts(provider: Provider, method: str, fields: List[Tuple[str, str]], rest: str,
                  swap: "CredentialSwap", body: Optional[bytes], body_read: bool,
                  upgrade: bool) -> RequestFacts:
    """Everything decide() looks at. With ``body_read`` (the token's policy needs it), the body
    is parsed strictly: a JSON object that repeats a key anywhere is unreadable (parsers
    disagree on which value wins), and so is its model."""
    content_type = next((v for n, v in fields if n.lower() == "content-type"), "")
    facts = RequestFacts(method, path_for_policy(rest, swap), upgrade=upgrade,
                         llm=bool(provider.usage), body_read=body_read,
                         override=any(n.lower() in METHOD_OVERRIDE_HEADERS for n, _ in fields))
    if provider.usage == "bedrock":               # Bedrock: the model id is in the path
        facts.model = request_model(provider, rest, None)
    if not body_read:
        return facts
    deployment = _DEPLOYMENT_RE.match(facts.path)    # Azure: the deployment picks the model
    if provider.usage == "gemini" or not body or content_type.lower().startswith("multipart/"):
        facts.model = urllib.parse.unquote(deployment.group(1)) if deployment else \
            request_model(provider, rest, body, content_type)
        return facts
    try:
        text = body.decode("utf-8-sig")
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        facts.background = b'"background"' in body            # unreadable: assume the worst
        if str(exc) != "duplicate key":
            return facts
        facts.repeated_keys = True
        if "\\u" in text or text.count('"model"') > 1:     # the model itself may repeat
            return facts
        obj = json.loads(text)
    if isinstance(obj, dict):
        model = obj.get("model")        # with "models", OpenRouter may fall back to any of them
        facts.model = model if isinstance(model, str) and not obj.get("models") else None
        facts.background = obj.get("background") is True
        if deployment:
            facts.model = urllib.parse.unquote(deployment.group(1))
    if provider.usage == "bedrock":
        facts.model = request_model(provider, rest, None)
    return facts


BUDGET_INPUT_MARGIN = 64     # tokens a provider may add around a request's text (roles, turns)
_GENERATING_RE = re.compile(r"(/chat/completions|/completions|/responses|/messages|"
                            r":generateContent|:streamGenerateContent|"
                            r"^/model/[^/]+/(converse|converse-stream|invoke|"
                            r"invoke-with-response-stream))/?\Z")         # (the last: Bedrock)
# What a budget token may also POST: costs bounded by the input alone.
_INPUT_ONLY_RE = re.compile(r"(/embeddings|:embedContent|:batchEmbedContents|:countTokens|"
                            r"/count_tokens|/moderations)/?\Z")


MAX_CHILDREN = 100                     # live child tokens one delegating token may have
DELEGATION_FIELDS = ("allow_method", "allow_path", "models", "rate", "max_requests",
                     "budget_tokens", "budget_usd", "ttl", "label")
CHILD_DEFAULT_TTL = 86400
DELEGATION_BODY_MAX = 16 * 1024


def delegated_policy(parent: Dict[str, Any], parent_expires: Optional[float],
                     ask: Any, left_requests: Optional[int], left_budget: Optional[int],
                     now: float) -> Tuple[Dict[str, Any], Optional[float], str]:
    """A child token's policy, expiry and label from its parent's policy and what the
    sub-agent asks (the JSON of POST /seks/v1/tokens). Each limit is the parent's or
    narrower: methods, paths and models subsets, a rate no faster and no burstier, a life no
    longer (default: the parent's, at most a day). A parent with a request limit or a token
    budget makes the child name its own, at most what the parent has left (it is carved out).
    The child cannot delegate; it keeps the parent's leak setting. BadRequest: malformed;
    Forbidden: wider than the parent."""
    if not isinstance(ask, dict) or set(ask) - set(DELEGATION_FIELDS):
        raise BadRequest(f"the body is a JSON object with some of: {', '.join(DELEGATION_FIELDS)}")

    def strings(name: str) -> Optional[List[str]]:
        value = ask.get(name)
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()] if name == "models" \
                else [value]
        if value is not None and not (isinstance(value, list) and value and
                                      all(isinstance(v, str) and v.strip() for v in value)):
            raise BadRequest(f"{name} is a string or a list of strings")
        return value

    for name in ("max_requests", "budget_tokens"):
        if name in ask and (type(ask[name]) is not int or ask[name] < 0):
            raise BadRequest(f"{name} is a whole number")
    if "budget_usd" in ask and type(ask["budget_usd"]) not in (int, float):
        raise BadRequest("budget_usd is a number of US dollars")
    models = strings("models")
    try:
        child = make_policy(strings("allow_method"), strings("allow_path"),
                            ask.get("rate") if isinstance(ask.get("rate"), str) else None,
                            ask.get("max_requests"), ",".join(models) if models else None,
                            ask.get("budget_tokens"), ask.get("budget_usd"))
        ttl = parse_ttl(ask["ttl"]) if isinstance(ask.get("ttl"), str) else None
    except UsageError as exc:
        raise BadRequest(str(exc).replace("--", "")) from None
    if ask.get("rate") is not None and "rate" not in child or \
            ask.get("ttl") is not None and ttl is None:
        raise BadRequest("rate is like '60/m' and ttl like '30m'")
    label = ask.get("label", "")
    if not isinstance(label, str) or len(label) > 200 or not label.isprintable():
        raise BadRequest("label is at most 200 printable characters")
    for name, word in (("methods", "method"), ("models", "model")):
        if name in parent:
            child.setdefault(name, parent[name])
            wider = sorted(set(child[name]) - set(parent[name]))
            if wider:
                raise Forbidden(f"{word} {wider[0]} is not allowed for the parent token")
    if "paths" in parent:
        child.setdefault("paths", parent["paths"])
        for path in child["paths"]:
            if not any(path_within(path, prefix) for prefix in parent["paths"]):
                raise Forbidden(f"path {path} is not under the parent token's paths")
    if "rate" in parent:
        child.setdefault("rate", parent["rate"])
        (count, period, _), (most, most_period, _) = child["rate"], parent["rate"]
        if count > most or count / period > most / most_period:
            raise Forbidden("the rate is faster than the parent token's")
    key = budget_key(parent)
    for name, left in (("max_requests", left_requests), (key, left_budget)):
        if left is None or not name:
            continue
        asked, shown = ("budget_usd", budget_words) if name == "budget_nusd" else \
            (name, lambda _, n: str(n))
        if name not in child:
            raise BadRequest(f"the parent token has a {asked} limit: ask for {asked} (at most "
                             f"{shown(name, max(left, 0))}); it is carved out of the parent's")
        if child[name] > left or child[name] < 1:
            raise Forbidden(f"{asked} {shown(name, child[name])} is more than the parent token "
                            f"has left ({shown(name, max(left, 0))})")
    end = now + (ttl if ttl else CHILD_DEFAULT_TTL)
    if parent_expires is not None:
        if ttl and end > parent_expires:
            raise Forbidden("the ttl outlives the parent token")
        end = min(end, parent_expires)
    if "on_leak" in parent:
        child["on_leak"] = parent["on_leak"]
    return child, end, label


def budget_counter(policy: Dict[str, Any]) -> str:
    """The token_usage column a token's budget counts against."""
    return "cost_used" if budget_key(policy) == "budget_nusd" else "tokens_used"


def usage_cost(price: Tuple[int, int, int], tokens_in: Optional[int], tokens_out: Optional[int],
               cached: int = 0) -> int:
    """What an answer's usage costs in nano-dollars: input (the ``cached`` part of it at the
    cached-input price) plus output."""
    tin, tout = tokens_in or 0, tokens_out or 0
    cached = min(max(cached, 0), tin)
    return (tin - cached) * price[0] + cached * price[2] + tout * price[1]


def model_price(prices: Dict[str, Tuple[int, int, int]],
                model: Optional[str]) -> Tuple[int, int, int]:
    """A money-budget request's prices (nano-dollars per token: input, output, cached input)
    from the [prices] table, by the model the request names; Forbidden without one."""
    price = prices.get((model or "").lower())
    if price is None:
        raise Forbidden(f"this token has a money budget and model '{(model or '?')[:100]}' has "
                        f"no price in the [prices] table" if model else
                        "this token has a money budget and the broker cannot read which model "
                        "this request uses")
    return price


def parse_price(text: str) -> Tuple[int, int, int]:
    """``IN OUT [CACHED_IN]`` in US dollars per million tokens -> nano-dollars per token,
    rounded up (what a budget counts never undercounts)."""
    try:
        values = [float(p) for p in text.split()]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or any(not (0 <= v < 1e6) for v in values):
        raise ConfigError(f"a price is 'INPUT OUTPUT [CACHED_INPUT]' in US dollars per million "
                          f"tokens, like '2.50 10.00 1.25' (got {text!r})")
    nano = [int(-(-round(v * 1e6) // 1000)) for v in values]    # $/M -> n$/token, rounded up
    return nano[0], nano[1], nano[2] if len(nano) == 3 else nano[0]


def budget_reservation(kind: str, path: str, body: bytes, left: int, in_flight: bool = False,
                       price: Tuple[int, int, int] = (1, 1, 1)) -> Tuple[int, Optional[bytes]]:
    """The most a budget token's request can cost, and its body with the output cap set so the
    request fits in what is ``left`` (None: unchanged). ``price``: what an input and an output
    token cost in the budget's unit (1 and 1 for a token budget; nano-dollars for money).
    Input: a request's text cannot become more tokens than it has bytes, plus
    BUDGET_INPUT_MARGIN. Output: the request's own cap (max_completion_tokens / max_tokens /
    max_output_tokens / generationConfig.maxOutputTokens, times n or candidateCount), lowered
    to what is left, or set to it when absent. A request that cannot fit is refused: 429 while
    requests ``in_flight`` hold part of the budget (it may fit once they settle), else 403
    Exhausted (it never will). Forbidden for a generation request whose JSON the broker cannot
    bound. Media the provider fetches by URL is not bounded (the docs say so)."""
    input_bound = len(body) + BUDGET_INPUT_MARGIN
    room = (left - input_bound * price[0]) // max(price[1], 1)    # output tokens that fit
    money = price != (1, 1, 1)

    def cannot_fit(cost: str) -> BrokerError:
        message = (f"this request may cost up to {cost} tokens and the token's budget has "
                   f"{budget_words('budget_nusd', max(left, 0)) if money else max(left, 0)} "
                   f"left")
        if in_flight:
            return RateLimited(message + " while requests in flight hold the rest",
                               headers={"Retry-After": "1"})
        return Exhausted(message)
    if room < 1:
        raise cannot_fit(f"{input_bound} input")
    if not _GENERATING_RE.search(path):
        if not _INPUT_ONLY_RE.search(path):     # images, audio, video...: output without a cap
            raise Forbidden("this token has a budget, and the broker cannot bound what this "
                            "request costs (only text generation, embeddings and token counts)")
        return input_bound * price[0], None
    obj = json_value(body)
    if not isinstance(obj, dict):
        raise Forbidden("a budget-limited token needs a JSON body to bound a generation request")
    stored = [k for k in ("previous_response_id", "conversation", "prompt", "cachedContent",
                          "cached_content", "mcp_servers")
              if obj.get(k) not in (None, "", []) and (k != "prompt" or isinstance(obj[k], dict))]
    items = obj.get("input") if isinstance(obj.get("input"), list) else []
    if any(isinstance(i, dict) and i.get("type") == "item_reference" for i in items):
        stored.append("item_reference")
    if kind == "bedrock":                        # Converse, or Anthropic's body for invoke
        converse = "/converse" in path
        model = urllib.parse.unquote(path.split("/")[2]) if path.count("/") >= 3 else ""
        if not converse and ("anthropic_version" not in obj or "anthropic." not in model):
            raise Forbidden("this token has a budget: on Bedrock use Converse, or InvokeModel "
                            "with an Anthropic body (other bodies' caps are not read)")
        stored += [k for k in ("additionalModelRequestFields", "promptVariables")
                   if converse and k in obj] + ["s3Location"] * (b'"s3Location"' in body) + [
            "a prompt ARN"] * (":prompt/" in urllib.parse.unquote(path))
        config = obj.setdefault("inferenceConfig", {}) if converse else obj
        tool_config = obj.get("toolConfig") or {}
        if not isinstance(config, dict) or not isinstance(tool_config, dict) or any(
                not isinstance(t, dict) or not set(t) <= {"toolSpec", "cachePoint"}
                for t in tool_config.get("tools") or []):
            raise Forbidden("this token has a budget: inferenceConfig must be an object and "
                            "only the agent's own tools (toolSpec) are allowed")
        kind = "bedrock-converse" if converse else "anthropic"
    if stored:                                   # input the body does not show
        raise Forbidden(f"this token has a budget, and '{stored[0]}' brings in input the broker "
                        f"cannot bound; send the whole conversation instead")
    tools = obj.get("tools")
    for tool in tools if isinstance(tools, list) else [] if tools is None else [tools]:
        if not (isinstance(tool, dict) and (          # the agent's own functions only: tools
                tool.get("type") in ("function", "custom") or    # the provider runs (search,
                (kind == "anthropic" and "type" not in tool) or  # fetch, files, MCP) bill
                (kind == "gemini" and set(tool) <= {"functionDeclarations",  # what no cap bounds
                                                    "function_declarations"}))):
            raise Forbidden("this token has a budget, and a tool the provider runs itself "
                            "(search, fetch, files, MCP, code) costs what the broker cannot "
                            "bound; only function tools are allowed")
    holder: Dict[str, Any] = obj
    if kind == "gemini":
        if "generation_config" in obj or any(
                k in (obj.get("generationConfig") or {}) for k in ("candidate_count",
                                                                   "max_output_tokens")):
            raise Forbidden("this token has a budget: spell generationConfig, maxOutputTokens "
                            "and candidateCount in camelCase (Gemini also reads the snake_case "
                            "names, which the broker would not bound)")
        holder = obj.setdefault("generationConfig", {})
        if not isinstance(holder, dict):
            raise Forbidden("generationConfig must be an object for a budget-limited token")
        names, default, count_name = ("maxOutputTokens",), "maxOutputTokens", "candidateCount"
    elif kind == "anthropic":
        names, default, count_name = ("max_tokens",), "max_tokens", ""
    elif kind == "bedrock-converse":
        holder = obj["inferenceConfig"]
        names, default, count_name = ("maxTokens",), "maxTokens", ""
    elif path.rstrip("/").endswith("/responses"):
        names, default, count_name = ("max_output_tokens",), "max_output_tokens", ""
    else:
        names, default, count_name = ("max_completion_tokens", "max_tokens"), \
            "max_completion_tokens" if path.rstrip("/").endswith("/chat/completions") \
            else "max_tokens", "n"
    count = holder.get(count_name, 1) if count_name else 1
    best = _int(holder.get("best_of")) if count_name == "n" else None   # legacy completions
    if best is not None and isinstance(count, int) and best > count:   # bill best_of outputs
        count = best
    prompts = holder.get("prompt") if default == "max_tokens" else None
    if isinstance(prompts, list) and prompts and not all(isinstance(p, int) for p in prompts) \
            and isinstance(count, int):              # several prompts: outputs for each
        count *= len(prompts)
    count = 1 if count is None else count
    if (_int(count) or 0) < 1:
        raise Forbidden(f"{count_name} must be a positive whole number for a budget-limited token")
    present = [name for name in names if name in holder]
    caps = [holder[name] for name in present]
    if any((_int(c) or 0) < 1 for c in caps):
        raise Forbidden(f"{'/'.join(present)} must be a positive whole number for a "
                        f"budget-limited token")
    cap = min(caps + [room // count])
    if cap < 1:
        raise cannot_fit(f"{input_bound} input and {count} outputs of at least 1")
    changed = not present or any(c != cap for c in caps)
    for name in present or [default]:
        holder[name] = cap
    return input_bound * price[0] + cap * count * price[1], \
        json.dumps(obj).encode() if changed else None


_TOKEN_SHAPE_RE = re.compile(rb"seks_[a-z0-9-]{1,32}_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
TOKEN_SHAPE_MAX = len("seks_") + 32 + 1 + 43


def token_shapes(data: bytes, decode: bool = True) -> List[str]:
    """Every seks-token-shaped string in ``data``; with ``decode`` also percent-encoded (once
    or twice), as in a query or a form."""
    found = set(_TOKEN_SHAPE_RE.findall(data))
    for _ in range(2 if decode else 0):
        if b"%" not in data:
            break
        data = urllib.parse.unquote_to_bytes(data)
        found.update(_TOKEN_SHAPE_RE.findall(data))
    return sorted(t.decode("ascii") for t in found)


class LeakScanner:
    """Finds token shapes in a streamed body across chunk boundaries: ``feed`` returns what is
    safe to forward now and the shapes seen. It holds back a chunk's end only when it could be
    the beginning of a token (``seks_…`` or a prefix of it), until the next chunk or ``flush``,
    so no part of a token leaves before the whole of it has been checked; other bytes pass
    without a copy."""

    _HOLD_RE = re.compile(rb"s(e(k(s(_[A-Za-z0-9_-]*)?)?)?)?\Z")    # seks_..., or a prefix of it

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> Tuple[bytes, List[str]]:
        data = self.tail + chunk if self.tail else chunk
        found = token_shapes(data, decode=False) if b"seks_" in data else []   # raw only
        held = self._HOLD_RE.search(data, max(0, len(data) - (TOKEN_SHAPE_MAX - 1)))
        cut = held.start() if held else len(data)
        self.tail = data[cut:]
        return (data if cut == len(data) else data[:cut]), found

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail


def ask_for_stream_usage(body: bytes) -> bytes:
    """OpenAI streams report usage only if asked: add stream_options.include_usage (an explicit
    false is overridden too, so a budget cannot be dodged). decide() refused bodies that repeat
    a key, so this reads the same "stream" value as the upstream will."""
    obj = json_value(body)
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return body
    options = obj.get("stream_options")
    if options is None:
        options = obj["stream_options"] = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body
    options["include_usage"] = True
    return json.dumps(obj).encode()


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage_sum(usage: Dict[str, Any], keys: Iterable[str]) -> Optional[int]:
    """The sum of the whole numbers ``usage`` holds under ``keys``; None if it holds none."""
    counts = [_int(usage.get(key)) for key in keys]
    return None if all(n is None for n in counts) else sum(n or 0 for n in counts)


def read_usage(kind: str, obj: Any, state: Dict[str, Any]) -> None:
    """Update ``state`` (model, tokens_in, tokens_out, tokens_cached) from one JSON answer or
    stream event; a count the answer does not report keeps its value."""
    if not isinstance(obj, dict) or kind not in ("openai", "anthropic", "bedrock", "gemini"):
        return
    model, usage, counts = None, obj.get("usage"), {}
    if kind == "openai":
        response, groq = (v if isinstance(v, dict) else {} for v in (obj.get("response"),
                                                                       obj.get("x_groq")))
        usage = usage or groq.get("usage") or response.get("usage")
        model = obj.get("model") or response.get("model")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
            counts = {"tokens_in": _int(usage.get("prompt_tokens", usage.get("input_tokens"))),
                      "tokens_out": _int(usage.get("completion_tokens",
                                                   usage.get("output_tokens"))),
                      "tokens_cached": _int(details.get("cached_tokens"))
                      if isinstance(details, dict) else None}
    elif kind == "gemini":
        model, usage = obj.get("modelVersion"), obj.get("usageMetadata")
        if isinstance(usage, dict):
            counts = {"tokens_in": _int(usage.get("promptTokenCount")),
                      "tokens_out": _usage_sum(usage, ("candidatesTokenCount",
                                                       "thoughtsTokenCount")),
                      "tokens_cached": _int(usage.get("cachedContentTokenCount"))}
    else:                 # Anthropic, and Bedrock: Converse (also its stream's metadata event)
        if kind == "anthropic":                  # or a model's own body from InvokeModel
            message = obj.get("message") if isinstance(obj.get("message"), dict) else obj
            model, usage = message.get("model"), message.get("usage") or usage
        if isinstance(usage, dict):                 # input: new, read from cache, cache writes
            camel = kind == "bedrock" and ("inputTokens" in usage or "outputTokens" in usage)
            names = ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens",
                     "outputTokens") if camel else ("input_tokens", "cache_read_input_tokens",
                                                    "cache_creation_input_tokens", "output_tokens")
            tin = _usage_sum(usage, names[:3])
            counts = {"tokens_in": tin, "tokens_out": _int(usage.get(names[3])),
                      "tokens_cached": None if tin is None else _int(usage.get(names[1])) or 0}
    state.update((name, n) for name, n in counts.items() if n is not None)
    if isinstance(model, str) and model:
        state.setdefault("model", model)


class UsageMeter:
    """Reads token usage from an answer as it streams past: the JSON body of a plain answer,
    the ``data:`` lines of server-sent events, or the payloads of AWS event-stream messages
    (only those that mention usage are parsed). Other content types (files, audio) are not
    looked at."""

    def __init__(self, kind: str, content_type: str) -> None:
        media = content_type.split(";")[0].strip().lower()
        self.kind = kind
        self.sse = media == "text/event-stream"
        self.events = media == "application/vnd.amazon.eventstream"     # Bedrock's streams
        self.active = self.sse or self.events or media in ("", "application/json") or \
            media.endswith("+json")
        self.state: Dict[str, Any] = {}
        self._parts: List[bytes] = []
        self._size, self._line, self._overflow, self._tail_only = 0, b"", False, False

    def feed(self, data: bytes) -> None:
        if self._overflow or not self.active:
            return
        if self.events:             # length-prefixed messages: prelude (total, headers) + CRC
            self._line += data
            while len(self._line) >= 12:
                total = int.from_bytes(self._line[:4], "big")
                if not 16 <= total <= MAX_USAGE_BODY:
                    self._overflow, self._line = True, b""
                    return
                if len(self._line) < total:
                    return
                message, self._line = self._line[:total], self._line[total:]
                payload = message[12 + int.from_bytes(message[4:8], "big"):-4]
                if b"sage" in payload:
                    self._parse(payload)
            return
        if not self.sse:
            self._size += len(data)
            self._parts.append(data)
            if self._size > MAX_USAGE_BODY:         # keep only the tail, where usage sits
                tail = b"".join(self._parts)[-USAGE_TAIL_BYTES:]
                self._parts, self._size, self._tail_only = [tail], len(tail), True
            return
        *lines, self._line = (self._line + data).split(b"\n")
        if not lines and len(self._line) > MAX_USAGE_BODY:     # a line this long: stop reading
            self._overflow, self._line = True, b""
        for line in lines:
            if line.startswith(b"data:") and b"sage" in line:
                self._parse(line[5:])

    def _parse(self, text: bytes) -> None:
        answer = json_value(text)
        for item in answer if isinstance(answer, list) else [answer]:   # Gemini JSON streams
            read_usage(self.kind, item, self.state)

    def _parse_tail(self, tail: bytes) -> None:
        """A body too big to keep whole: read the last usage object in its tail."""
        text = tail.decode("utf-8", "replace")
        for name in ("usage", "usageMetadata"):
            at = text.rfind(f'"{name}"')
            start = text.find("{", at) if at != -1 else -1
            if start != -1:
                with contextlib.suppress(ValueError):
                    value, _ = json.JSONDecoder().raw_decode(text, start)
                    read_usage(self.kind, {name: value}, self.state)

    def finish(self) -> Dict[str, Any]:
        if not self._overflow and self.active and not self.events:
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
# 9. UPSTREAM: the keep-alive pool and the urllib opener (the only code that opens sockets)
# ============================================================================================

POOL_IDLE_PER_HOST = 64              # idle keep-alive connections kept per upstream
POOL_IDLE_SECONDS = 50.0             # an idle pooled connection older than this is retired


class UpstreamConn:
    """One connection to an upstream: its socket, its reader, and since when it is idle."""

    __slots__ = ("sock", "reader", "key", "idle_since")

    def __init__(self, sock: socket.socket, key: Tuple[str, str, int, bool]) -> None:
        self.sock, self.key, self.reader, self.idle_since = sock, key, WireReader(sock), 0.0

    def write(self, data: bytes, stall_limit: float) -> None:
        """The one write to an upstream socket (requests, bodies, WebSocket frames)."""
        send_fully(self.sock.send, data, stall_limit)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class UpstreamPool(urllib.request.BaseHandler):
    """Keep-alive connections per (scheme, host, port, verify), shared by all handler threads:
    a TLS handshake to a real provider costs tens of milliseconds. The pool is the one handler
    of the broker's urllib opener, which has no redirect or error processors: a 3xx or 4xx/5xx
    is an answer to relay, and a redirect is never followed with the real key.

    Invariant: a connection goes back only after a complete, cleanly framed answer with nothing
    read past it; one the upstream closed (or spoke on) while idle is dropped before reuse."""

    handler_order = 100

    def __init__(self, verified: ssl.SSLContext, unverified: ssl.SSLContext,
                 connect_timeout: float, read_timeout: float) -> None:
        self.contexts = {True: verified, False: unverified}
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: Dict[Tuple[str, str, int, bool], List[UpstreamConn]] = {}
        self._lock = threading.Lock()
        self.opened = 0

    def connect(self, target: Target) -> Tuple[UpstreamConn, bool]:
        """A connection to ``target`` (and to nothing else): a live idle one, or a new one."""
        key = (target.scheme, target.host, target.port, target.verify)
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if now - conn.idle_since <= POOL_IDLE_SECONDS and not _readable(conn.sock):
                return conn, True
            conn.close()
        sock = socket.create_connection((target.host, target.port), timeout=self.connect_timeout)
        try:
            if target.scheme == "https":
                sock = self.contexts[target.verify].wrap_socket(sock, server_hostname=target.host)
            sock.settimeout(self.read_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self.opened += 1
        return UpstreamConn(sock, key), False

    def http_open(self, req: urllib.request.Request) -> "UpstreamAnswer":
        if not isinstance(req, UpstreamRequest):
            raise UpstreamError("the broker sends only its own requests upstream")
        return exchange_upstream(self, req)

    https_open = http_open

    def put(self, conn: UpstreamConn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < POOL_IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for conn in idle:
                conn.close()


def _readable(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable was closed (or spoken on) by the peer."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class UpstreamRequest(urllib.request.Request):
    """A request to a Target as urllib's opener carries it to the pool; the header list
    keeps the agent's case and order, ``body`` is None, bytes or an iterator of chunks."""

    def __init__(self, target: Target, method: str, headers: List[Tuple[str, str]],
                 body: Any) -> None:
        super().__init__(f"{target.scheme}://{target.host_header}{target.path}", method=method)
        self.target, self.header_list, self.body = target, headers, body


class UpstreamAnswer:
    """An upstream answer being relayed. Its connection goes back to the pool only when the
    body was read to its end, the framing allows reuse, and nothing was read past it."""

    def __init__(self, pool: Optional[UpstreamPool], conn: UpstreamConn, status: int,
                 fields: List[Tuple[str, str]], body: BodyReader, reusable: bool) -> None:
        self.pool, self.conn, self.status, self.fields = pool, conn, status, fields
        self.body, self.reusable = body, reusable
        self._open = True

    def finish(self, complete: bool) -> None:
        if not self._open:
            return
        self._open = False
        if (complete and self.reusable and self.body.done and not self.conn.reader.buf
                and self.pool is not None):
            self.pool.put(self.conn)
        else:
            self.conn.close()


def exchange_upstream(pool: UpstreamPool, req: UpstreamRequest) -> UpstreamAnswer:
    """Send one request to its Target and read the answer's head. A request that can be sent
    again (idempotent, body not streamed) gets one fresh try if a reused connection died."""
    method, body = req.get_method(), req.body
    headers = list(req.header_list) + [("Host", req.target.host_header)]
    streamed = body is not None and not isinstance(body, bytes)
    chunked = streamed and not any(n.lower() == "content-length" for n, _ in headers)
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    elif body is None and method in ("POST", "PUT", "PATCH"):
        headers.append(("Content-Length", "0"))        # as http.client does: some servers want it
    head = b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method.encode("ascii"), req.target.path.encode(
        "ascii"), header_block(headers))
    replayable = method in IDEMPOTENT_METHODS and not streamed
    for attempt in (0, 1):
        conn, reused = pool.connect(req.target)
        retry = reused and replayable and attempt == 0   # a died idle connection: one fresh try
        try:
            conn.write(head + (body if isinstance(body, bytes) else b""), pool.read_timeout)
            for chunk in body if streamed else ():
                if chunk:
                    conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk,
                              pool.read_timeout)
            if chunked:
                conn.write(b"0\r\n\r\n", pool.read_timeout)
            answer = read_answer(pool, conn, method)
        except BaseException as exc:
            conn.close()
            if retry and isinstance(exc, (BrokenPipeError, ConnectionResetError,
                                          ConnectionAbortedError)):
                continue
            raise
        if answer is not None:
            return answer
        conn.close()
        if not retry:
            break
    raise UpstreamFraming("upstream closed the connection without answering")


def read_answer(pool: Optional[UpstreamPool], conn: UpstreamConn,
                method: str) -> Optional[UpstreamAnswer]:
    """The final answer's head (interim 100/102/103 skipped; 101 is final: a WebSocket
    handshake), or None if the upstream closed without a byte."""
    for _ in range(16):
        parsed = read_head(conn.reader, "answer")
        if parsed is None:
            return None
        line, fields = parsed
        match = _STATUS_LINE_RE.match(line)
        if match is None:
            raise UpstreamFraming("upstream answer: malformed status line")
        status, http11 = int(match.group(2)), match.group(1) == b"1"
        if status in (100, 102, 103):
            continue
        kind, length, reusable = ("none", 0, False) if status == 101 else body_framing(
            fields, "answer", http11, method, status)
        tokens = connection_tokens(fields)
        if "close" in tokens or (not http11 and "keep-alive" not in tokens):
            reusable = False
        return UpstreamAnswer(pool, conn, status, fields,
                              BodyReader(conn.reader, kind, length, "answer"), reusable)
    raise UpstreamFraming("upstream sent too many interim answers")


# ============================================================================================
# 10. RELAY: upstream answers to the agent, WebSocket sessions, the Discord gateway
# ============================================================================================

USAGE_DRAIN_SECONDS = 60.0        # reading on after the agent left, to learn a stream's usage
USAGE_DRAIN_BYTES = 16 * 1024 * 1024
WS_MAX_MESSAGE = 16 * 1024 * 1024     # largest message either way -> close 1009
WS_IDLE_TIMEOUT_S = 600.0             # no frame either way for this long -> close 1001
WS_IDENTIFY_TIMEOUT_S = 60.0          # a gateway client must IDENTIFY/RESUME within this
WS_DROP_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-accept", "sec-websocket-version",
                             "sec-websocket-extensions", "origin", "content-length"})


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
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    base = provider.base_path
    if base and not (path == base or path.startswith((base + "/", base + "?"))):
        return value
    return route_prefix + (path[len(base):] or "/")


class Relay:
    """Relays one upstream answer to the agent through the writer: status (the standard reason,
    never the upstream's), headers, then the body as it arrives (an SSE event goes at once),
    inflated first if the upstream compressed it. Usage is metered on the way; for a budget
    token the audit row (with its usage) is committed before the answer's last bytes, so the
    agent's next request is admitted against the spend so far."""

    def __init__(self, writer: AgentWriter, ex: "Exchange", meter: Optional["UsageMeter"],
                 settle: Callable[[], None]) -> None:
        self.writer, self.ex, self.meter, self.settle = writer, ex, meter, settle

    def run(self, answer: UpstreamAnswer, method: str, http11: bool,
            location: Callable[[str], str], gateway_ws: str = "") -> None:
        """``gateway_ws``: a Discord /gateway answer's URL is pointed there."""
        ex, writer = self.ex, self.writer
        status = ex.status = answer.status
        codings = [c.strip().lower() for n, v in answer.fields if n.lower() == "content-encoding"
                   for c in v.split(",") if c.strip().lower() not in ("", "identity")]
        inflater = Inflater() if codings in (["gzip"], ["x-gzip"], ["deflate"]) else None
        if codings and inflater is None:
            known = next((c for c in codings if c in KNOWN_CODINGS), "of an unknown kind")
            raise UpstreamError(f"upstream answered with content-encoding {known}, which the "
                                f"broker cannot inspect for leaked keys")
        if 100 <= status < 200:
            raise UpstreamError(f"upstream sent an informational {status} answer as final")
        # hop-by-hop headers go, and the length and coding (the writer frames a decoded body)
        dropped = HOP_BY_HOP | connection_tokens(answer.fields) | {"content-length",
                                                                    "content-encoding"}
        headers = [(n, location(v) if n.lower() == "location" else v) for n, v in answer.fields
                   if n.lower() not in dropped]
        body = answer.body
        ex.outcome = "ok"
        if method == "HEAD" or status in (204, 304):
            answer.finish(complete=True)          # back in the pool before the agent can reuse
            sized = [v for n, v in answer.fields if n.lower() == "content-length"]
            if method == "HEAD" and sized and not codings:
                headers.append(("Content-Length", sized[0]))
            self.settle()
            writer.head(status, headers, "none")
            return
        if gateway_ws and status == 200 and body.kind == "length" and body.left <= INLINE_BODY_MAX:
            data = rewrite_gateway_url(b"".join(iter(lambda: self._read(body), b"")), gateway_ws)
            answer.finish(complete=True)
            self._meter(data)
            self.settle()
            writer.answer(status, headers, data)
            ex.bytes_out = len(data)
            return
        sized = body.kind == "length" and inflater is None
        framing = "length" if sized else "chunked" if http11 else "close"
        writer.head(status, headers, framing, body.left if sized else 0)
        try:
            self._stream(answer, inflater)
        except ConnectionCut:
            if not ex.recorded:
                ex.outcome = "error"
                ex.reason = ex.reason or "client closed the connection mid-answer"
                if self.meter is not None and ex.drain_usage:
                    drain_for_usage(body, inflater, self.meter)
                self._take_usage()               # an abandoned stream is charged what passed
            raise

    def _read(self, body: BodyReader) -> bytes:
        try:
            return body.read(STREAM_CHUNK)
        except (UpstreamFraming, OSError):
            self._cut("upstream answer ended early")

    def _stream(self, answer: UpstreamAnswer, inflater: Optional[Inflater]) -> None:
        body, writer, ex = answer.body, self.writer, self.ex
        for data in iter(lambda: self._read(body), b""):
            if inflater is not None:
                try:
                    data = inflater.decompress(data)
                except UpstreamFraming:
                    self._cut("upstream sent a corrupt compressed body")
            self._meter(data)
            if body.done:                        # read to its end: back in the pool before the
                answer.finish(complete=True)     # agent has the last byte and asks again
                if body.kind == "length" and ex.drain_usage:
                    self._take_usage()
                    self.settle()                # a sized body's last bytes: the row first
            ex.bytes_out += writer.body(data)
        answer.finish(complete=True)
        if inflater is not None:
            try:
                tail = inflater.finish()
            except UpstreamFraming:
                self._cut("upstream sent a corrupt or cut compressed body")
            self._meter(tail)
            ex.bytes_out += writer.body(tail)
        self._take_usage()
        self.settle()
        ex.bytes_out += writer.end()

    def _meter(self, data: bytes) -> None:
        if self.meter is not None:
            self.meter.feed(data)

    def _take_usage(self) -> None:
        if self.meter is not None:
            state = self.meter.finish()
            self.ex.model = self.ex.model or state.get("model")
            self.ex.tokens_in, self.ex.tokens_out = state.get("tokens_in"), state.get("tokens_out")
            self.ex.tokens_cached = state.get("tokens_cached") or 0

    def _cut(self, reason: str) -> NoReturn:
        """The upstream answer broke off: a clean 502 if nothing was sent yet, else a cut."""
        self.ex.outcome = "error"
        if not self.writer.started:
            raise UpstreamError(reason)
        self.writer.close = True
        self.ex.reason = reason
        raise ConnectionCut()


def drain_for_usage(body: BodyReader, inflater: Optional[Inflater], meter: "UsageMeter") -> None:
    """The agent hung up on a stream of a budget-limited token: read the rest (bounded) so the
    tokens the provider bills are still counted (OpenAI reports usage only at the end)."""
    deadline, seen = time.monotonic() + USAGE_DRAIN_SECONDS, 0
    with contextlib.suppress(UpstreamFraming, OSError):
        for data in iter(body.read, b""):
            seen += len(data)
            meter.feed(inflater.decompress(data) if inflater is not None else data)
            if time.monotonic() >= deadline or seen >= USAGE_DRAIN_BYTES:
                return


class WsSession:
    """Relays one WebSocket session: frames from the agent are read off its socket and sent
    upstream (masked); frames from the upstream go to the agent through the AgentWriter (which
    scrubs them). Data messages are reassembled (at most WS_MAX_MESSAGE) so the hooks see whole
    messages: ``on_agent`` may rewrite or refuse what the agent sends (Discord IDENTIFY),
    ``on_upstream`` rewrites what the upstream sends (Discord READY). Control frames pass at
    once. A close from either side is passed on with its code and reason; a side that dies gets
    the other closed (1011 / 1001); ``tick`` runs on every poll (revocation, IDENTIFY deadline).
    """

    Hook = Callable[[int, bytes], Tuple[int, bytes]]

    def __init__(self, writer: AgentWriter, agent: WireReader, upstream: UpstreamConn,
                 on_agent: "WsSession.Hook", on_upstream: "WsSession.Hook",
                 tick: Callable[[], None], exchange: "Exchange") -> None:
        self.writer, self.agent, self.upstream = writer, agent, upstream
        self.on_agent, self.on_upstream, self.tick = on_agent, on_upstream, tick
        self.exchange = exchange
        self.last_activity = time.monotonic()
        self.done = threading.Event()
        self.close_code: Optional[int] = None
        self.upstream_closed = False          # a close frame went upstream
        self._up_lock = threading.Lock()
        self.frames = {"agent": 0, "upstream": 0}

    def _send(self, to_agent: bool, opcode: int, payload: bytes) -> None:
        if to_agent:
            self.writer.ws_send(opcode, payload)
            return
        with self._up_lock:                  # (the writer locks the agent's side)
            if not self.upstream_closed:
                self.upstream_closed = opcode == OP_CLOSE
                self.upstream.write(ws_frame(opcode, payload, masked=True), WS_IDLE_TIMEOUT_S)

    def _closed_sent(self, to_agent: bool) -> bool:
        return self.writer.ws_closed if to_agent else self.upstream_closed

    def close_both(self, code: int, reason: str) -> None:
        """Close both sides (the agent hears the reason first)."""
        self.close_code = self.close_code or code
        self.writer.ws_close(code, reason)
        with contextlib.suppress(OSError):
            self._send(False, OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])

    def _idle(self) -> None:
        if self.done.is_set():
            raise ConnectionAbortedError("session over")
        self.tick()
        if time.monotonic() - self.last_activity > WS_IDLE_TIMEOUT_S:
            raise WsClose(1001, "idle timeout")

    def run(self, poll: float) -> None:
        """Relay until either side ends; a quiet reader wakes every ``poll`` seconds for tick."""
        for sock in (self.agent.sock, self.upstream.sock):
            sock.settimeout(poll)
        down = threading.Thread(target=self._pump, args=(False,), name="seks-ws-down", daemon=True)
        down.start()
        self._pump(True)
        down.join(poll * 2)

    def _pump(self, from_agent: bool) -> None:
        reader = self.agent if from_agent else self.upstream.reader
        hook = self.on_agent if from_agent else self.on_upstream
        to_agent = not from_agent
        parts: List[bytes] = []
        size, first_opcode = 0, 0
        try:
            while not self.done.is_set():
                fin, opcode, payload = ws_read_frame(reader, from_agent, self._idle, WS_MAX_MESSAGE)
                self.last_activity = time.monotonic()
                self.frames["agent" if from_agent else "upstream"] += 1
                if from_agent:
                    self.exchange.bytes_in += len(payload)
                else:
                    self.exchange.bytes_out += len(payload)
                if opcode == OP_CLOSE:
                    self.close_code = self.close_code or (
                        int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005)
                    answered = self._closed_sent(from_agent)   # read first: the other pump may set it
                    self._send(to_agent, OP_CLOSE, hook(OP_CLOSE, payload)[1])
                    if answered:                   # the answer to a close we passed on
                        break
                    continue
                if opcode in (OP_PING, OP_PONG):
                    self._send(to_agent, opcode, payload)
                    continue
                if (opcode == OP_CONT) != bool(parts):     # a continuation continues a message
                    raise WsClose(1002, "new message inside a fragmented one" if parts
                                  else "continuation without a message")
                first_opcode = first_opcode if parts else opcode
                size += len(payload)
                if size > WS_MAX_MESSAGE:
                    raise WsClose(1009, "message too big")
                parts.append(payload)
                if fin:
                    message, parts, size = b"".join(parts), [], 0
                    if first_opcode == OP_TEXT:
                        try:
                            message.decode("utf-8")
                        except UnicodeDecodeError:
                            raise WsClose(1007, "text message is not UTF-8") from None
                    self._send(to_agent, *hook(first_opcode, message))
        except WsClose as exc:
            self.close_both(exc.code, exc.reason)
        except (OSError, ConnectionCut, ConnectionAbortedError):
            if not self.done.is_set() and not self._closed_sent(to_agent):
                # this side died without a close: tell the other, then stop both
                self.close_code = self.close_code or 1006
                code, reason = (1001, "client went away") if from_agent else \
                    (1011, "upstream connection lost")
                with contextlib.suppress(OSError, ConnectionCut):
                    self._send(to_agent, OP_CLOSE, code.to_bytes(2, "big") + reason.encode())
        finally:
            self.done.set()
            for sock in (self.agent.sock, self.upstream.sock):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class DiscordGateway:
    """The hooks that make a Discord gateway session safe to relay.

    The agent's fake token travels in IDENTIFY (op 2) and RESUME (op 6) as ``d.token``: it is
    checked like a header token (check_token, then decide as a WebSocket session, then the
    counting limits) and swapped for the real one before anything reaches Discord; until then
    only heartbeats pass. READY's ``resume_gateway_url`` is pointed back at the broker. The
    upstream is asked for plain JSON (no compression) so every frame can be scrubbed; if the
    agent asked for ``compress=zlib-stream`` the writer compresses for it, after scrubbing."""

    def __init__(self, broker: "Broker", provider: Provider, ex: "Exchange",
                 writer: AgentWriter, broker_ws_url: str) -> None:
        self.broker, self.provider, self.ex, self.writer = broker, provider, ex, writer
        self.broker_ws_url = broker_ws_url
        self.token = ""
        self.started = time.monotonic()

    def on_agent(self, opcode: int, message: bytes) -> Tuple[int, bytes]:
        if opcode == OP_CLOSE:
            return opcode, message
        if opcode != OP_TEXT:
            raise WsClose(4002, "seks-broker relays the JSON gateway encoding only")
        try:
            payload = json.loads(message)
        except (ValueError, RecursionError):
            raise WsClose(4002, "payload is not JSON") from None
        op = payload.get("op") if isinstance(payload, dict) else None
        if op in (2, 6):
            return OP_TEXT, self._authenticate(payload, op)
        if not self.token and op != 1:
            raise WsClose(4003, "not authenticated: send IDENTIFY or RESUME first")
        self.tick()
        return OP_TEXT, message

    def _authenticate(self, payload: Dict[str, Any], op: int) -> bytes:
        data = payload.get("d")
        presented = data.get("token") if isinstance(data, dict) else None
        if not isinstance(presented, str):
            raise WsClose(4004, "authentication failed")
        presented = (presented[4:] if presented.lower().startswith("bot ") else presented).strip()
        if self.token and not hmac.compare_digest(presented.encode("utf-8", "surrogatepass"),
                                                  self.token.encode("utf-8", "surrogatepass")):
            raise WsClose(4005, "already authenticated with another token")     # as Discord
        try:
            record, parts, pairs = self.broker.authenticate(presented, self.provider, self.ex)
            refusal = decide(record.policy, RequestFacts("GET", "/gateway", upgrade=True,
                                                         llm=bool(self.provider.usage)))
            if refusal is not None:
                raise refusal
            self.broker.admit(record, self.ex)
        except BrokerError as exc:
            self.ex.status = exc.status
            self.ex.outcome = "tripwire" if isinstance(exc, Tripwire) else "denied"
            self.ex.reason = self.ex.reason or exc.message
            raise WsClose(4004, "authentication failed" if exc.status == 401
                          else exc.message[:120]) from None
        self.token = presented
        self.writer.use_key(pairs)
        assert isinstance(data, dict)
        data["token"] = parts.get("key", "")
        if op == 2:
            data["compress"] = False      # no compression upstream: every frame can be scrubbed
        return json.dumps(payload).encode()

    def tick(self) -> None:
        """Before IDENTIFY: enforce its deadline. After: the token must stay valid (revoked,
        expired or disabled ends the session with 4004, like a fresh IDENTIFY would)."""
        if not self.token:
            if time.monotonic() - self.started > WS_IDENTIFY_TIMEOUT_S:
                raise WsClose(4003, "not authenticated: send IDENTIFY or RESUME first")
            return
        try:
            check_token(self.broker.tokens.lookup(self.token)[0], self.provider.name, time.time())
        except BrokerError:
            raise WsClose(4004, "authentication failed") from None

    def on_upstream(self, opcode: int, message: bytes) -> Tuple[int, bytes]:
        if opcode == OP_BINARY:
            inflate = zlib.decompressobj()
            try:
                message, opcode = inflate.decompress(message, MAX_INFLATE), OP_TEXT
            except zlib.error:
                raise WsClose(1011, "binary gateway payload the broker cannot inspect") from None
            if inflate.unconsumed_tail or not inflate.eof:
                raise WsClose(1009, "binary gateway payload inflates too far or is cut")
        if opcode == OP_TEXT and b'"READY"' in message and b"resume_gateway_url" in message:
            with contextlib.suppress(ValueError, AttributeError, RecursionError):
                payload = json.loads(message)
                data = payload.get("d") or {}
                url = data.get("resume_gateway_url")
                if isinstance(url, str):
                    host = urllib.parse.urlsplit(url).netloc
                    data["resume_gateway_url"] = f"{self.broker_ws_url}/resume/{host}"
                    message = json.dumps(payload).encode()
        return opcode, message


def rewrite_gateway_url(data: bytes, ws_base: str) -> bytes:
    """Point the ``url`` of a Discord /gateway(/bot) answer at the broker's gateway route."""
    payload = json_value(data)
    if isinstance(payload, dict) and isinstance(payload.get("url"), str):
        payload["url"] = ws_base
        return json.dumps(payload).encode()
    return data


# ============================================================================================
# 11. HTTP HANDLER: one agent connection, one short pipeline per request
# ============================================================================================

_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?\Z")
_GATEWAY_REST_RE = re.compile(r"^/api(/v\d+)?/gateway(/bot)?/?\Z")


class RequestHead:
    """A parsed request line and header block (header names keep their case, values latin-1)."""

    __slots__ = ("method", "target", "version", "fields")

    def __init__(self, method: str, target: str, version: str,
                 fields: List[Tuple[str, str]]) -> None:
        self.method, self.target, self.version, self.fields = method, target, version, fields

    def get(self, name: str) -> Optional[str]:
        return next((v for n, v in self.fields if n.lower() == name), None)


class Exchange:
    """What one request did: its log line and its audit row are made from it."""

    __slots__ = ("started", "client", "method", "path", "provider", "agent", "token_id",
                 "secret", "status", "bytes_in", "bytes_out", "outcome", "reason", "model",
                 "tokens_in", "tokens_out", "counted", "recorded", "drain_usage", "reservation",
                 "parent", "price", "tokens_cached")

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
        self.reservation: Optional[int] = None   # what a budget request holds until settled
        self.parent = ""           # a delegated token's parent: the audit row names it
        self.price: Optional[Tuple[int, int, int]] = None   # a money budget's, per token
        self.tokens_cached = 0     # input tokens the answer reported as read from cache


class Call:
    """One proxied request as the pipeline's stages fill it in: the route (provider, the path
    after its prefix, the query; for AWS the service and region), then the token's swap,
    record and secret parts, the scrub pairs, and the body (bytes, a stream, or None)."""

    def __init__(self, head: RequestHead, provider: Provider, rest: str, prefix: str,
                 query: str, framing: str, length: int) -> None:
        self.head, self.provider, self.rest, self.prefix, self.query = head, provider, rest, \
            prefix, query
        self.framing, self.length = framing, length
        self.policy_rest = self.service = self.region = ""
        self.upgrade = self.verify = self.read_whole = False
        self.swap: Any = None
        self.record: Any = None
        self.parts: Dict[str, str] = {}
        self.pairs: Tuple[Tuple[bytes, bytes], ...] = ()
        self.body: Any = None


def read_capped(chunks: Iterable[bytes], limit: int, too_big: BrokerError) -> bytes:
    """A body held whole: ``too_big`` as soon as it passes ``limit`` bytes."""
    held, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_big
        held.append(chunk)
    return b"".join(held)


class BrokerHandler(http.server.BaseHTTPRequestHandler):
    """One agent connection. Requests are read with the wire parser (section 5) and answered
    through the AgentWriter, the only way out: this handler has no rfile or wfile. Each request
    runs ``pipeline``: route -> find_token -> authenticate -> read_facts -> decide -> admit ->
    outgoing (swap, target) -> forward -> relay, and ends in exactly one answer (or a cut
    connection)."""

    protocol_version = "HTTP/1.1"
    server: "BrokerServer"

    def setup(self) -> None:
        settings = self.server.broker.settings
        self.connection = self.request
        self.connection.settimeout(settings.client_timeout)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = WireReader(self.connection)
        self.writer = AgentWriter(self.connection, settings.client_timeout)

    def finish(self) -> None:
        """Nothing to flush: every answer went out through the writer."""

    def handle_one_request(self) -> None:
        broker = self.server.broker
        ex = Exchange(self.client_address[0] if self.client_address else "")
        self.writer.reset()                      # keep-alive unless this request says not
        self.error_style = ""
        head: Optional[RequestHead] = None
        try:
            head = self.read_request()
            if head is None:
                self.writer.close = True
                return
            broker.begin(ex)
            ex.method = head.method
            self.pipeline(head, ex)
        except BrokerError as exc:
            if head is not None and request_has_body(head.fields):
                self.writer.close = True         # an unread body would be taken for a request
            self.answer_error(exc, ex)
        except ConnectionCut:
            self.writer.close = True
            ex.reason = ex.reason or "client closed the connection"
        except (socket.timeout, ConnectionError):
            self.writer.close = True
            ex.reason = ex.reason or "client connection timed out or reset"
        except Exception as exc:                 # last resort: generic 502, redacted log
            self.writer.close = True
            broker.log("error", "error", message=f"internal error: {type(exc).__name__}")
            self.answer_error(UpstreamError("the broker could not complete the request"), ex)
        finally:
            self.close_connection = self.writer.close
            if head is not None:
                broker.finish(ex)

    def answer_error(self, exc: BrokerError, ex: Exchange) -> None:
        if ex.outcome != "tripwire":
            ex.outcome = "denied" if exc.status in (401, 403, 429) else "error"
        ex.reason = ex.reason or " ".join(filter(None, (exc.message, exc.detail)))
        with contextlib.suppress(ConnectionCut):
            if self.writer.error(exc, self.error_style):
                ex.status = exc.status
        self.server.broker.record(ex)            # like every row: right after the answer

    def read_request(self) -> Optional[RequestHead]:
        """One request head. The deadline watch closes a connection idle past client_timeout,
        or one whose head takes longer than header_timeout once its first byte came."""
        settings = self.server.broker.settings
        watch = self.server.watch
        watch.arm(self.connection, settings.client_timeout)
        try:
            if not self.reader.buf and not self.reader.fill():
                return None
            watch.arm(self.connection, settings.header_timeout)
            parsed = read_head(self.reader, "request")
        finally:
            watch.disarm(self.connection)
        if parsed is None:
            return None
        line, fields = parsed
        parts = line.split(b" ")
        if len(parts) != 3 or not _METHOD_RE.match(parts[0]):
            raise BadRequest("malformed request line", close=True)
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest("only HTTP/1.0 and HTTP/1.1 are supported", close=True)
        if _BAD_TARGET_BYTES_RE.search(target):
            raise BadRequest("request target contains a forbidden character", close=True)
        if version == b"HTTP/1.0" or "close" in connection_tokens(fields) or \
                self.server.broker.draining:
            self.writer.close = True
        return RequestHead(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"),
                           fields)

    # --- the pipeline ----------------------------------------------------------------------
    def pipeline(self, head: RequestHead, ex: Exchange) -> None:
        """One request, top to bottom: the broker's own routes; the provider route; the token
        found and authenticated; the decision on what the request is; the counting limits;
        the credentials swapped for the one target; forwarded; the answer relayed."""
        call = self.route(head, ex)
        if call is None:                      # the broker's own route, answered
            return
        provider = call.provider
        call.swap = find_token(provider, head.fields, call.rest, call.query)
        if call.swap is None:                 # git sends Basic credentials only when challenged
            raise AuthError(f"missing token: send your seks token where the {provider.name} "
                            f"client sends its API key", headers={
                                "WWW-Authenticate": 'Basic realm="seks-broker"'} if any(
                                p.kind == "basic" for p in provider.token_places) else None)
        call.record, call.parts, call.pairs = self.server.broker.authenticate(
            call.swap.token, provider, ex)
        facts = self.read_facts(call, ex)
        refusal = decide(call.record.policy, facts)
        if refusal is not None:
            raise refusal
        self.admit(call, facts, ex)
        target, headers = self.outgoing(call, ex)
        self.writer.use_key(call.pairs)
        if call.upgrade:
            self.websocket(head, provider, call.prefix, target, headers, call.swap.token, ex)
        else:
            self.forward(call, target, headers, ex)

    def route(self, head: RequestHead, ex: Exchange) -> Optional[Call]:
        """The broker's own routes are answered here (None); a provider route is checked as far
        as it can be without a token: the path, the query, the framing, a gateway session."""
        broker, settings = self.server.broker, self.server.broker.settings
        if head.method in ("CONNECT", "TRACE"):
            raise BadRequest(f"{head.method} is refused: the broker is not a forward proxy",
                             close=True)
        if not head.target.startswith("/"):
            raise BadRequest("only origin-form request targets (a path) are accepted", close=True)
        path, _, query = head.target.partition("?")
        ex.path = redact_path(path)
        framing, length, _ = body_framing(head.fields, "request", head.version == "HTTP/1.1",
                                          max_body=settings.max_body)   # before any answer
        if path == "/healthz" and head.method in ("GET", "HEAD"):
            ex.outcome, ex.status = "health", 200
            self.writer.close = self.writer.close or request_has_body(head.fields)
            self.writer.answer(200, [("Content-Type", "application/json")],
                               b'{"status":"ok"}' if head.method == "GET" else b"")
            return None
        if not broker.audit_ok:               # fail closed: no unaudited use while it is broken
            raise Unavailable("the broker cannot write its audit log; requests are refused "
                              "until it can")
        if path == "/seks/v1/token" and head.method == "GET":
            self.introspect(head, query, ex)
            return None
        if path == "/seks/v1/tokens" and head.method == "POST" and not query:
            self.delegate(head, framing, length, ex)
            return None
        call = Call(head, *broker.route(path), query, framing, length)
        provider, rest = call.provider, call.rest
        ex.provider, self.error_style = provider.name, provider.errors
        if provider.region:                   # /vertex/<region>/...: policies see what follows
            call.policy_rest = gcp_route(rest)[1]
        if call.provider.aws:                          # /aws/<service>/<region>/...: AWS-shaped errors
            call.service, call.region, call.policy_rest = aws_route(rest)
            self.error_style = "aws-s3" if call.service == "s3" else (
                "aws-query" if call.service in AWS_QUERY_SERVICES else "aws-json")
        if not provider.host:                 # before any token is counted
            upstream_target(provider, "/", "", False)
        ex.path = masked_request_path(provider, path, query)
        validate_query(query)
        call.upgrade = head.method == "GET" and "websocket" in (head.get("upgrade") or "").lower() \
            and "upgrade" in connection_tokens(head.fields)
        if call.upgrade and request_has_body(head.fields):
            raise BadRequest("a WebSocket upgrade request carries no body", close=True)
        call.verify = provider.name not in settings.insecure_upstream
        if provider.gateway == "discord" and (rest == "/gateway" or rest.startswith("/gateway/")):
            if not call.upgrade:
                raise BadRequest("the gateway route takes WebSocket connections only")
            self.discord_gateway(head, provider, rest, query, call.prefix, call.verify, ex)
            return None
        return call

    def read_facts(self, call: Call, ex: Exchange) -> RequestFacts:
        """What decide() needs, the body read whole first if the token's policy needs it."""
        policy, provider, head = call.record.policy, call.provider, call.head
        call.read_whole = bool(provider.usage) and not call.upgrade and (
            budget_key(policy) != "" or ("models" in policy and provider.usage != "bedrock"))
        call.body = self.request_body(head, call.framing, call.length, call.read_whole, ex)
        if call.body is None and call.read_whole and budget_key(policy) and \
                head.method in WRITE_METHODS:
            call.body = b""                   # a budget bounds (or refuses) body-less POSTs too
        facts = request_facts(provider, head.method, head.fields, call.policy_rest or call.rest,
                              call.swap, call.body if call.read_whole else None,
                              call.read_whole, call.upgrade)
        if call.provider.aws:
            facts.aws, facts.action, facts.reads = aws_facts(call.rest, call.parts, call.query,
                                                             call.body, head.fields)
        return facts

    def admit(self, call: Call, facts: RequestFacts, ex: Exchange) -> None:
        """The model and price for the meter, then the counting limits (Broker.admit)."""
        policy, provider, body = call.record.policy, call.provider, call.body
        if provider.usage == "bedrock" or call.read_whole:
            ex.model = facts.model
        if call.read_whole and body and budget_key(policy) and provider.usage == "openai" and \
                facts.path.rstrip("/").endswith("completions"):
            body = ask_for_stream_usage(body)
        elif not call.read_whole and provider.usage and isinstance(body, bytes):
            ex.model = request_model(provider, call.rest, body,
                                     call.head.get("content-type") or "")
        if "budget_nusd" in policy and isinstance(body, bytes):
            ex.price = model_price(self.server.broker.settings.prices, facts.model)
        call.body = self.server.broker.admit(call.record, ex, provider.usage, facts.path, body)
        ex.drain_usage = budget_key(policy) != ""

    def outgoing(self, call: Call, ex: Exchange) -> Tuple[Target, List[Tuple[str, str]]]:
        """The credentials swapped (an OAuth access token, an AWS signature), the one target,
        and the request checked for live seks tokens before it leaves."""
        broker, provider, record, head = self.server.broker, call.provider, call.record, call.head
        if provider.oauth:                   # the access token the broker holds for this secret
            call.parts = dict(call.parts, access_token=broker.oauth_token(
                record, provider, call.verify, ex))
            call.pairs += broker.oauth_pairs(record.secret_name)   # every live one it minted
        try:
            headers, rest, query = swap_credentials(
                provider, call.swap, call.parts, forward_request_headers(head.fields),
                call.rest, call.query)
        except KeyError:                  # the provider's definition changed since minting
            ex.reason = f"secret {record.secret_name} lacks a part {provider.name} needs"
            raise UpstreamError(f"the broker's secret for this token lacks a part "
                                f"{provider.name} needs; the operator must rotate it") from None
        if (provider.inject or call.swap.place).kind == "basic":   # base64(user:key) is a
            sent = next(v for n, v in headers                       # form of the key too
                        if n == "Authorization" and v.startswith("Basic "))
            call.pairs += scrub_pairs(sent.partition(" ")[2])
        target = upstream_target(provider, rest, query, call.verify)
        if call.provider.aws:                          # sign anew, for the host it goes to
            headers = self.aws_payload(call, headers)
            payload = hashlib.sha256(call.body or b"").hexdigest() if call.body is None or \
                isinstance(call.body, bytes) else "UNSIGNED-PAYLOAD"
            if call.parts.get("role_arn"):    # sign as the role (its credentials masked too)
                call.parts, role_pairs = broker.assume_role(record, call.parts, provider,
                                                            call.region, call.verify, ex)
                call.pairs += role_pairs
            headers = aws_sign(head.method, target, headers, payload, call.parts, call.region,
                               call.service, time.time())
        body = call.body
        leaks = token_shapes("\n".join([rest, query] + [v for _, v in headers]).encode(
            "utf-8", "surrogateescape")) + (token_shapes(body) if isinstance(body, bytes) else [])
        broker.check_leaks(leaks, ex, "request")
        media = (head.get("content-type") or "").split(";")[0].strip().lower()
        if body is not None and not isinstance(body, bytes) and not media.startswith(
                BINARY_MEDIA):                   # a streamed media upload is not scanned
            call.body = self.scanned(body, ex)
        return target, headers

    def forward(self, call: Call, target: Target, headers: List[Tuple[str, str]],
                ex: Exchange) -> None:
        """Send the request upstream and relay the answer (an OAuth 401 renews and retries)."""
        broker, provider, head, body = self.server.broker, call.provider, call.head, call.body
        headers.append(("Accept-Encoding", "identity"))
        if isinstance(body, bytes):
            headers.append(("Content-Length", str(len(body))))
        elif call.framing == "length":
            headers.append(("Content-Length", str(call.length)))
        gateway_ws = self.gateway_url(head, call.prefix) if provider.gateway == "discord" and \
            _GATEWAY_REST_RE.match(call.rest) else ""
        answer = broker.forward(target, head.method, headers, body)
        if provider.oauth and answer.status == 401 and head.method in IDEMPOTENT_METHODS and (
                body is None or isinstance(body, bytes)):    # revoked early: renew, retry once
            answer.finish(False)
            stale = call.parts["access_token"]
            fresh = broker.oauth_token(call.record, provider, call.verify, ex, stale=stale)
            self.writer.use_key(call.pairs + broker.oauth_pairs(call.record.secret_name))
            headers = [(n, v.replace(stale, fresh)) for n, v in headers]
            answer = broker.forward(target, head.method, headers, body)
        self.relay(head, answer, provider, call.prefix, ex, gateway_ws)

    def aws_payload(self, call: Call, headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """An aws-chunked upload (the agent's SDK signed each chunk with its fake key) becomes
        its plain payload (``call.body``): decoded whole when held (its trailing checksums
        become headers), or as it streams, with the length it declared. Others pass unchanged."""
        head, body = call.head, call.body
        codings = [c.strip() for c in (head.get("content-encoding") or "").split(",") if c.strip()]
        if "aws-chunked" not in [c.lower() for c in codings] and not (
                head.get("x-amz-content-sha256") or "").startswith("STREAMING-"):
            return headers
        drop = ("content-encoding", "x-amz-decoded-content-length", "x-amz-trailer")
        headers = [(n, v) for n, v in headers if n.lower() not in drop]
        others = [c for c in codings if c.lower() != "aws-chunked"]
        if others:
            headers.append(("Content-Encoding", ", ".join(others)))
        trailers: Dict[str, str] = {}
        declared = head.get("x-amz-decoded-content-length") or ""
        expect = int(declared) if CONTENT_LENGTH_RE.match(declared) else None
        if body is not None and not isinstance(body, bytes):
            if expect is None:
                raise BadRequest("a streamed aws-chunked upload needs "
                                 "x-amz-decoded-content-length", close=True)
            if expect <= AWS_HOLD_MAX:        # held: signed, checksummed
                # framing adds little: a body far larger than it declared is refused, not held
                body = read_capped(body, 2 * expect + 65536, BadRequest(
                    "an aws-chunked body much larger than its x-amz-decoded-content-length",
                    close=True))
        if isinstance(body, bytes) or body is None:
            call.body = b"".join(aws_unchunk([body or b""], trailers, expect))
            headers += [(n, v) for n, v in trailers.items() if n.startswith("x-amz-checksum-")]
        else:
            call.body = aws_unchunk(body, trailers, expect)
            call.framing, call.length = "length", expect
        if not any(n.lower().startswith("x-amz-checksum-") for n, _ in headers):
            headers = [(n, v) for n, v in headers if n.lower() != "x-amz-sdk-checksum-algorithm"]
        return headers

    def introspect(self, head: RequestHead, query: str, ex: Exchange) -> None:
        """GET /seks/v1/token: the id, agent, provider and expiry of the token sent as a
        Bearer, or of the token whose SHA-256 is ``?digest=<hex>``: `run` asks that way, so
        whatever else listens on the port learns nothing it could use, and `run` checks the id
        that comes back. Audited ("introspect"), not counted against the token's limits."""
        digest = query[len("digest="):] if query.startswith("digest=") else ""
        if query and not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BadRequest("the only query is ?digest=<64 lowercase hex digits>")
        record, _ = self.endpoint_token(head, ex, bytes.fromhex(digest) if query else None)
        ex.outcome, ex.status = "introspect", 200
        self.writer.answer(200, [("Content-Type", "application/json")], json.dumps({
            "token_id": record.id, "agent": record.agent, "provider": record.provider,
            "expires_at": record.expires_at}).encode())

    def endpoint_token(self, head: RequestHead, ex: Exchange, digest: Optional[bytes] = None,
                       delegating: bool = False) -> Tuple[TokenRecord, Optional[Dict[str, str]]]:
        """The live token a /seks/v1/ request sends as a Bearer (or names by its SHA-256),
        noted for the audit row, and the secret's parts; a decoy trips the tripwire."""
        if digest is None:
            scheme, _, token = (head.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(f"send the {'parent ' if delegating else ''}token as "
                                f"'Authorization: Bearer <token>'")
            digest = token_digest(token.strip())
        record, parts, _ = self.server.broker.tokens.lookup_digest(digest)
        if record is None:
            raise AuthError("unknown token")
        ex.agent, ex.token_id, ex.provider = record.agent, record.id, record.provider
        if delegating:
            ex.secret, ex.parent = record.secret_name, record.parent or ""
        try:
            check_token(record, record.provider, time.time())
        except Tripwire:
            self.server.broker.tripwire(record, ex)
            raise
        return record, parts

    def delegate(self, head: RequestHead, framing: str, length: int, ex: Exchange) -> None:
        """POST /seks/v1/tokens: a token minted with --allow-delegation mints a narrower child
        for a sub-agent (delegated_policy decides; Store.delegate carves it out atomically).
        Audited ("delegate", the child's id in the reason)."""
        broker = self.server.broker
        record, parts = self.endpoint_token(head, ex, delegating=True)
        if not record.policy.get("delegation"):
            raise Forbidden("this token was not minted with --allow-delegation")
        if framing == "length" and length > DELEGATION_BODY_MAX:    # (a chunked one: BodyReader)
            raise PayloadTooLarge(f"the body is at most {DELEGATION_BODY_MAX} bytes", close=True)
        body = b"" if framing == "none" else b"".join(self.body_chunks(head, BodyReader(
            self.reader, framing, length, "request", DELEGATION_BODY_MAX), ex))
        try:
            ask = json.loads(body or b"{}", object_pairs_hook=_reject_duplicate_keys)
        except (ValueError, RecursionError):
            raise BadRequest("the body is not JSON, or it repeats a key") from None
        provider = broker.providers.get(record.provider)
        if provider is None:
            raise Forbidden(f"provider '{record.provider}' is not configured on this broker")
        child = new_token(provider, (parts or {}).get("key", ""))
        child_id, answer = new_token_id(), {}

        def decide_child(left_requests: Optional[int],
                         left_budget: Optional[int]) -> Tuple[Dict[str, Any], Optional[float], str]:
            policy, expires, label = delegated_policy(record.policy, record.expires_at, ask,
                                                      left_requests, left_budget, time.time())
            answer.update(expires_at=expires, policy=policy)
            return policy, expires, label
        broker.store.delegate(record, child_id, token_digest(child), decide_child)
        ex.outcome, ex.status, ex.reason = "delegate", 201, f"minted {child_id}"
        self.writer.answer(201, [("Content-Type", "application/json")], json.dumps(
            dict(token=child, id=child_id, **answer), sort_keys=True).encode())

    def relay(self, head: RequestHead, answer: UpstreamAnswer, provider: Provider,
              route_prefix: str, ex: Exchange, gateway_ws: str = "") -> None:
        content_type = next((v for n, v in answer.fields if n.lower() == "content-type"), "")
        meter = UsageMeter(provider.usage, content_type) if provider.usage else None
        metrics = self.server.broker.metrics
        metrics.add_stream(1)
        try:
            Relay(self.writer, ex, meter, lambda: self.settle(ex)).run(
                answer, head.method, head.version == "HTTP/1.1",
                lambda value: rewrite_location(value, provider, route_prefix), gateway_ws)
        finally:
            metrics.add_stream(-1)
            answer.finish(complete=ex.outcome == "ok")

    def settle(self, ex: Exchange) -> None:
        """A token with a token budget gets its row (and usage) committed before the last bytes
        of its answer, so its next request is admitted against the spend so far; if that write
        fails, the answer is not completed. Other rows follow the answer."""
        if ex.drain_usage and not self.server.broker.record(ex):
            ex.outcome, ex.reason = "error", "audit write failed; answer withheld"
            self.writer.close = True
            raise ConnectionCut()

    def request_body(self, head: RequestHead, framing: str, length: int, read_whole: bool,
                     ex: Exchange) -> Any:
        """None, the whole body as bytes (small, or needed by the decision: at most
        MAX_INSPECT_BODY), or an iterator that streams it upstream as it arrives."""
        if framing == "none":
            return None
        chunks = self.body_chunks(head, BodyReader(
            self.reader, framing, length, "request", self.server.broker.settings.max_body), ex)
        if framing == "length" and (length <= INLINE_BODY_MAX or
                                    (read_whole and length <= MAX_INSPECT_BODY)):
            return b"".join(chunks)
        if not read_whole:
            return chunks
        too_big = PayloadTooLarge("bodies over 16 MiB cannot be checked against this token's "
                                  "model or budget policy", close=True)
        if framing == "length":
            raise too_big
        return read_capped(chunks, MAX_INSPECT_BODY, too_big)

    def scanned(self, chunks: Iterator[bytes], ex: Exchange) -> Iterator[bytes]:
        """A streamed body, checked for live seks tokens as it passes (LeakScanner): one found
        cuts the upload before any byte of it goes upstream."""
        scanner, broker = LeakScanner(), self.server.broker
        for chunk in chunks:
            safe, found = scanner.feed(chunk)
            if found:                            # the upload is cut, the upstream connection
                try:                             # closed, the agent answered 403
                    broker.check_leaks(found, ex, "streamed body")
                except Forbidden as exc:
                    exc.close = self.writer.close = True
                    raise
            if safe:
                yield safe
        tail = scanner.flush()
        if tail:
            yield tail

    def body_chunks(self, head: RequestHead, body: BodyReader, ex: Exchange) -> Iterator[bytes]:
        """The request body as it arrives, after a ``100 Continue`` if the agent asked for one.
        A body that has taken longer than client_timeout must average min_body_rate (else 408);
        a client-side timeout or reset ends the exchange, never as an upstream error."""
        settings = self.server.broker.settings
        expect = (head.get("expect") or "").lower()
        if expect == "100-continue" and head.version == "HTTP/1.1":
            self.writer.interim_continue()
        started = time.monotonic()
        try:
            for data in iter(body.read, b""):
                ex.bytes_in += len(data)
                elapsed = time.monotonic() - started
                if elapsed > settings.client_timeout and \
                        ex.bytes_in < settings.min_body_rate * elapsed:
                    raise RequestTimeout("request body arrived too slowly", close=True)
                yield data
        except (socket.timeout, OSError) as exc:
            self.writer.close = True
            raise ConnectionCut() from exc

    # --- WebSockets ------------------------------------------------------------------------
    def gateway_url(self, head: RequestHead, route_prefix: str) -> str:
        """The gateway route's ws(s):// URL as this agent reaches the broker (public_url, else
        its Host header), for URLs handed back to it (Discord gateway and resume URLs)."""
        settings = self.server.broker.settings
        if settings.public_url:
            base = settings.public_url.rstrip("/")
        else:
            host = head.get("host") or ""
            if not _HOST_RE.match(host):
                host = settings.agent_url().split("://", 1)[1]
            base = ("https" if self.server.tls else "http") + "://" + host
        return "ws" + base[4:] + route_prefix + "/gateway"

    def client_ws_key(self, head: RequestHead) -> str:
        key = head.get("sec-websocket-key") or ""
        with contextlib.suppress(ValueError):             # (binascii.Error is a ValueError)
            if len(base64.b64decode(key, validate=True)) == 16 and \
                    (head.get("sec-websocket-version") or "").strip() == "13":
                return key
        raise BadRequest("bad WebSocket handshake (Sec-WebSocket-Key, Version 13)",
                         headers={"Sec-WebSocket-Version": "13"})

    def open_websocket(self, head: RequestHead, provider: Provider, route_prefix: str,
                       target: Target, headers: List[Tuple[str, str]],
                       ex: Exchange) -> Optional[UpstreamAnswer]:
        """The upstream handshake, through the same opener and target rule as every request
        (no compression asked). A refusal is relayed like any answer; None then."""
        key = base64.b64encode(os.urandom(16)).decode()
        headers = headers + [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                             ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13"),
                             ("Accept-Encoding", "identity")]
        answer = self.server.broker.forward(target, "GET", headers, None)
        if answer.status != 101:
            self.writer.close = True
            self.relay(head, answer, provider, route_prefix, ex)
            return None
        accept = next((v for n, v in answer.fields if n.lower() == "sec-websocket-accept"), "")
        if not hmac.compare_digest(accept, ws_accept(key)):
            answer.finish(complete=False)
            raise UpstreamError(f"upstream {provider.name} answered the WebSocket handshake wrongly")
        return answer

    def websocket(self, head: RequestHead, provider: Provider, route_prefix: str, target: Target,
                  headers: List[Tuple[str, str]], token: str, ex: Exchange) -> None:
        """A WebSocket on any provider route: authenticated and decided like HTTP (done by the
        pipeline), the real credential in the upstream handshake, frames relayed and scrubbed."""
        broker = self.server.broker
        key = self.client_ws_key(head)
        offered = [p.strip() for n, v in head.fields if n.lower() == "sec-websocket-protocol"
                   for p in v.split(",")]
        headers = [(n, ", ".join(p.strip() for p in v.split(",") if "seks_" not in p))
                   if n.lower() == "sec-websocket-protocol" else (n, v) for n, v in headers
                   if n.lower() not in WS_DROP_HEADERS]
        headers = [(n, v) for n, v in headers if v]     # a seks token never goes upstream
        answer = self.open_websocket(head, provider, route_prefix, target, headers, ex)
        if answer is None:
            return
        chosen = next((v for n, v in answer.fields if n.lower() == "sec-websocket-protocol"), "")
        if chosen and chosen not in offered:
            answer.finish(complete=False)
            raise UpstreamError("upstream chose a WebSocket subprotocol the client did not offer")

        def still_valid() -> None:
            """Revocation, expiry and agent disable end an open session too."""
            try:
                check_token(broker.tokens.lookup(token)[0], provider.name, time.time())
            except BrokerError:
                raise WsClose(1008, "token no longer valid") from None

        def on_agent(opcode: int, message: bytes) -> Tuple[int, bytes]:
            still_valid()
            return opcode, message

        self.writer.ws_accept(key, chosen)
        self.run_session(WsSession(self.writer, self.reader, answer.conn, on_agent,
                                   lambda op, m: (op, m), still_valid, ex), ex)

    def discord_gateway(self, head: RequestHead, provider: Provider, rest: str, query: str,
                        route_prefix: str, verify: bool, ex: Exchange) -> None:
        """``/discord/gateway[/resume/<host>]``: relay to the configured Discord gateway (or a
        permitted resume host), the token checked and swapped inside IDENTIFY/RESUME."""
        broker = self.server.broker
        key = self.client_ws_key(head)
        target = upstream_target(provider, rest, query, verify, broker.settings.discord_gateway)
        params = urllib.parse.parse_qs(query)
        encoding = params.get("encoding", ["json"])[0]
        version = params.get("v", ["10"])[0]
        if encoding != "json" or not re.fullmatch(r"[0-9]{1,3}", version):
            self.writer.ws_accept(key, "")
            self.writer.ws_close(4002 if encoding != "json" else 1003,
                                 "seks-broker relays encoding=json only (etf is not supported)"
                                 if encoding != "json" else "unsupported compress or version")
            ex.status, ex.outcome, ex.reason = 101, "error", "unsupported gateway encoding"
            return
        answer = self.open_websocket(head, provider, route_prefix, target, [], ex)
        if answer is None:
            return
        ws_base = self.gateway_url(head, route_prefix)
        hooks = DiscordGateway(broker, provider, ex, self.writer, ws_base)
        self.writer.ws_accept(key, "")
        if params.get("compress", [""])[0] == "zlib-stream":
            self.writer.compressor = zlib.compressobj()   # zstd-stream: plain text frames
        self.run_session(WsSession(self.writer, self.reader, answer.conn, hooks.on_agent,
                                   hooks.on_upstream, hooks.tick, ex), ex)

    def run_session(self, session: WsSession, ex: Exchange) -> None:
        broker = self.server.broker
        ex.status, ex.outcome = 101, "ok"
        broker.metrics.add_stream(1)
        broker.ws_sessions.add(session)
        try:
            session.run(broker.settings.ws_poll)
        finally:
            broker.ws_sessions.discard(session)
            broker.metrics.add_stream(-1)
            summary = (f"websocket frames in={session.frames['agent']} "
                       f"out={session.frames['upstream']} close={session.close_code}")
            ex.reason = f"{ex.reason}; {summary}" if ex.reason else summary
            session.upstream.close()

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own messages go through the one redacting log path."""
        self.server.broker.log("error", "error", message=format % args)


# ============================================================================================
# 12. SERVER: settings and config file, metrics, logging, audit writes, the server
# ============================================================================================

def parse_place(text: str, inject: bool = False) -> CredentialPlace:
    """``header NAME [PREFIX]``, ``query PARAM``, ``basic`` or ``path-prefix PREFIX...``
    (config syntax). An injection place may end with its value: ``{part}`` names, e.g.
    ``header DD-APPLICATION-KEY {app_key}`` or ``basic {account_sid}:{auth_token}``."""
    words = text.split()
    value = "{key}"
    if inject and len(words) >= 2 and "{" in words[-1]:
        value = words.pop()
        if not PART_RE.search(value) or "{" in PART_RE.sub("", value) or "}" in PART_RE.sub(
                "", value) or not value.isprintable():
            raise ConfigError(f"bad value {value!r}: write the secret's parts as {{name}} "
                              f"(lower-case letters, digits, '_'), e.g. {{api_key}}")
    if len(words) >= 2 and words[0] == "header" and len(words) <= 3:
        if not HEADER_NAME_RE.match(words[1].encode()):
            raise ConfigError(f"bad header name {words[1]!r}")
        return CredentialPlace("header", words[1].lower(), tuple(words[2:]), value)
    if len(words) == 2 and words[0] == "query":
        return CredentialPlace("query", words[1], (), value)
    if words == ["aws"]:
        return CredentialPlace("aws", "authorization", ("AWS4-HMAC-SHA256",))
    if words == ["basic"]:
        if value != "{key}" and ":" not in PART_RE.sub("", value):
            raise ConfigError(f"a Basic value is 'user:password', e.g. "
                              f"{{account_sid}}:{{auth_token}} or api:{{key}}; got {value!r}")
        return CredentialPlace("basic", "authorization", ("Basic",), value)
    if len(words) >= 2 and words[0] == "path-prefix":
        if not all(p.startswith("/") and "//" not in p for p in words[1:]):
            raise ConfigError("path-prefix values must start with '/'")
        # longest first, so /file/bot wins over /bot
        return CredentialPlace("path", "", tuple(sorted(words[1:], key=len, reverse=True)))
    raise ConfigError(f"expected 'header NAME [PREFIX]', 'query PARAM', 'basic', 'aws' or "
                      f"'path-prefix PREFIX...', got {text!r}")


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
    if name in ("seks", "api"):
        raise ConfigError(f"the provider name {name!r} is reserved (/{name}/ is the broker's own)")
    known = set("upstream token inject usage aliases token_shape errors env gateway parts public "
                "oauth token_url device_url region auth_url".split())
    unknown = set(sec.keys()) - known - set(sec.parser.defaults())
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} (known: "
                          f"{', '.join(sorted(known))})")
    if "upstream" not in sec or "token" not in sec:
        raise ConfigError("'upstream' and 'token' are required")
    try:
        places = [parse_place(line) for line in sec["token"].splitlines() if line.strip()]
    except ConfigError as exc:
        raise ConfigError(f"token: {exc}", key="token") from None
    inject_lines = [line.strip() for line in sec.get("inject", "same").splitlines()
                    if line.strip()] or [""]                  # an empty one is a mistake
    try:
        inject = None if inject_lines[0] == "same" else parse_place(inject_lines[0], True)
        also = tuple(parse_place(line, True) for line in inject_lines[1:])
    except ConfigError as exc:
        raise ConfigError(f"inject: {exc}", key="inject") from None
    if any(p.kind != "header" for p in also) or (also and inject is None):
        raise ConfigError("inject: the lines after the first are headers, and the first is "
                          "not 'same'", key="inject")
    if inject is not None and (inject.kind == "path" or inject.kind == "basic" and
                               inject.value == "{key}"):
        raise ConfigError(f"{inject.kind} injection of the key alone is written 'inject = same'"
                          + (" (or give the pair: basic {user}:{password})"
                             if inject.kind == "basic" else ""), key="inject")
    named = [n for p in (inject,) + also if p is not None for n in PART_RE.findall(p.value)]
    declared = sec.get("parts", "").split()
    if any(not re.fullmatch(r"[a-z][a-z0-9_]{0,31}\??", n) for n in declared):
        raise ConfigError("parts are names of lower-case letters, digits and '_', an optional "
                          "one ending in '?': e.g. 'parts = api_key app_key?'", key="parts")
    if sec.get("oauth", "").strip() and declared:    # the token the broker mints is a part too
        declared.append("access_token")
    parts = tuple(n.rstrip("?") for n in declared) or tuple(dict.fromkeys(named or ["key"]))
    optional = tuple(n.rstrip("?") for n in declared if n.endswith("?"))
    if set(named) - set(parts):
        raise ConfigError(f"inject names part(s) {', '.join(sorted(set(named) - set(parts)))} "
                          f"that 'parts' does not list", key="inject")
    if inject is not None and set(PART_RE.findall(inject.value)) & set(optional):
        raise ConfigError("the first inject line cannot use an optional part", key="inject")
    public = tuple(sec.get("public", "").split())
    if set(public) - set(parts) or public and parts == ("key",):
        raise ConfigError("public names parts (identifiers such as an account id that answers "
                          "carry) from 'parts', never the key itself", key="public")
    for key, unset in (("upstream", "none"), ("token_url", ""), ("device_url", ""),
                       ("auth_url", "")):
        try:
            if sec.get(key, "").strip() != unset:
                parse_upstream_base(sec[key].strip())
        except ConfigError as exc:
            raise ConfigError(str(exc), key=key) from None
    choices = {"usage": ("openai", "anthropic", "gemini", "bedrock"), "token_shape": ("bot-id",),
               "errors": ("telegram", "aws"), "region": ("gcp",), "gateway": ("discord",)}
    usage, shape, errors, region, gateway = (sec.get(key, "").strip() for key in choices)
    for key, value in zip(choices, (usage, shape, errors, region, gateway)):
        if value not in ("",) + choices[key]:
            raise ConfigError(f"{key} must be one of {', '.join(choices[key])}", key=key)
    env = sec.get("env", "").strip()
    words = [re.fullmatch(r"([A-Z_][A-Z0-9_]*)(?:(=/\S*|=)|=\{([a-z][a-z0-9_]*)\})?", w)
             for w in env.split()]
    if env and (not all(words) or not words[0].group(2) or not any(
            m and not m.group(2) and not m.group(3) for m in words) or not {
                m.group(3) for m in words if m and m.group(3)} <= set(public)):
        raise ConfigError("env must be 'BASE_VAR=/path [BASE_VAR=/path...] KEY_VAR [KEY_VAR...] "
                          "[VAR={public_part}...]', e.g. 'OPENAI_BASE_URL=/v1 OPENAI_API_KEY'",
                          key="env")
    oauth = tuple(sec.get("oauth", "").split())
    if set(oauth) - set(OAUTH_GRANTS) or oauth and "access_token" not in parts:
        raise ConfigError(f"oauth names grants ({', '.join(OAUTH_GRANTS)}) and inject then uses "
                          f"{{access_token}}, e.g. 'inject = header Authorization Bearer "
                          f"{{access_token}}'", key="oauth")
    if oauth and "access_token" not in optional:
        optional += ("access_token",)             # the broker mints it; the secret never holds it
    return Provider(name, sec["upstream"].strip(), places, inject, usage,
                    tuple(sec.get("aliases", "").split()), shape, errors, env, gateway, also,
                    parts, optional, public, oauth, sec.get("token_url", "").strip(),
                    sec.get("device_url", "").strip(), region, sec.get("auth_url", "").strip())


def providers_from_ini(text: str) -> Dict[str, Provider]:
    """The built-in provider table (same format as ``[provider:NAME]`` in a config file)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text, source="<built-in>")
    for name in parser.sections():        # "like = other": other's keys, where not given here
        like = parser[name].pop("like", None)
        if like is not None:
            for key, value in parser[like].items():
                parser[name].setdefault(key, value)
        for key in ("token", "inject"):     # the table's default; a config section says both
            parser[name].setdefault(key, "header Authorization Bearer")
    return {name: provider_from_section(name, parser[name]) for name in parser.sections()}


BUILTIN_PROVIDERS = providers_from_ini(BUILTIN_PROVIDERS_INI)


class SettingSpec:
    """One setting: its config-file ``[section] key`` (the key is its name unless given), its
    env variable and flag, its type and default."""

    __slots__ = ("name", "section", "key", "kind", "default", "help", "env", "flag")

    def __init__(self, name: str, section: str, kind: str, default: Any, help: str,
                 key: str = "") -> None:
        self.name, self.section, self.key, self.kind = name, section, key or name, kind
        self.default, self.help = default, help
        self.env, self.flag = "SEKS_" + name.upper(), "--" + name.replace("_", "-")


# Every setting, in the order the README documents them. Flags beat env beat the file.
SETTINGS: List[SettingSpec] = [
    SettingSpec("db", "server", "path", DEFAULT_DB, "database file (key file: <db>.key)"),
    SettingSpec("host", "server", "str", DEFAULT_HOST, "listen address for agents"),
    SettingSpec("port", "server", "port", DEFAULT_PORT, "listen port for agents (0: any)"),
    SettingSpec("tls_cert", "server", "path", "", "TLS certificate chain (PEM) for the agent "
                "port; with tls_key, agents connect with https"),
    SettingSpec("tls_key", "server", "path", "", "TLS private key (PEM)"),
    SettingSpec("admin_host", "server", "str", "127.0.0.1", "listen address of the admin port"),
    SettingSpec("admin_port", "server", "port", -1, "admin port serving /metrics and /healthz "
                "(off unless set; with --workers N the workers use admin_port .. admin_port+N-1)"),
    SettingSpec("workers", "server", "int", 1, "processes sharing the agent port (SO_REUSEPORT) "
                "and the DB"),
    SettingSpec("grace", "server", "duration", 10.0, "on SIGTERM/SIGINT, how long in-flight "
                "requests and streams may finish"),
    SettingSpec("public_url", "server", "str", "", "the broker's address as agents see it (token "
                "mint --format env)"),
    SettingSpec("max_body", "limits", "size", MAX_BODY_BYTES,
                "largest request body (413 past it)"),
    SettingSpec("max_connections", "limits", "int", MAX_CONNECTIONS, "concurrent agent "
                "connections (503 past it)"),
    SettingSpec("client_timeout", "limits", "duration", CLIENT_TIMEOUT_S, "an agent connection "
                "idle or stalled this long is closed"),
    SettingSpec("header_timeout", "limits", "duration", HEADER_TIMEOUT_S, "a request head must "
                "arrive completely within this (slow-header defence)"),
    SettingSpec("min_body_rate", "limits", "size", MIN_BODY_RATE, "bytes per second a request "
                "body must average once it has taken longer than client_timeout (slow-body "
                "defence; 408 past it)"),
    SettingSpec("connect_timeout", "limits", "duration", UPSTREAM_CONNECT_TIMEOUT_S, "TCP and TLS "
                "connect to an upstream (504 past it)"),
    SettingSpec("upstream_timeout", "limits", "duration", UPSTREAM_TIMEOUT_S, "silence from an "
                "upstream while waiting for bytes (504)"),
    SettingSpec("ws_poll", "limits", "duration", 5.0, "a quiet WebSocket session re-checks its "
                "token, idle time and shutdown this often"),
    SettingSpec("log_format", "log", "choice:text,json", "text", "per-request log lines on stderr "
                "as text or JSON", key="format"),
    SettingSpec("log_level", "log", "choice:debug,info,warning,error", "info", "info logs every "
                "request; warning and error only problems", key="level"),
    SettingSpec("quiet", "log", "bool", False, "no per-request log lines"),
    SettingSpec("alert_webhook", "alerts", "str", "", "URL told (JSON POST, a few tries, never "
                "blocking a request) when a decoy token is used", key="webhook"),
    SettingSpec("upstream_ca", "upstream", "path", "", "extra CA certificates (PEM) trusted for "
                "upstream TLS, e.g. a lab gateway's", key="ca_file"),
    SettingSpec("insecure_upstream", "upstream", "list", [], "providers whose upstream TLS "
                "certificate is NOT verified (loudly logged)", key="insecure"),
]
SETTINGS_BY_NAME = {spec.name: spec for spec in SETTINGS}
_SIZE_RE = re.compile(r"^(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\Z", re.IGNORECASE)
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_setting(spec: SettingSpec, text: Any, source: str = "") -> Any:
    """Convert a setting from its text form (config file, env or flag); ConfigError if bad,
    naming ``source`` (--port, $SEKS_PORT) or else the setting."""
    if not isinstance(text, str):
        return text
    value, kind, name = text.strip(), spec.kind, source or spec.name
    if kind in ("str", "path"):
        return value
    if kind in ("int", "port"):
        if not re.match(r"^-?\d+$", value):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}")
        number = int(value)
        if kind == "port" and not 0 <= number <= 65535:
            raise ConfigError(f"{name}: a port is 0-65535, got {number}")
        if kind == "int" and number < 1:
            raise ConfigError(f"{name}: must be at least 1, got {number}")
        return number
    if kind == "size":
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{name}: expected a size like 1048576, 512KiB or 100MiB, got "
                              f"{value!r}")
        unit = (match.group(2) or "b")[0].lower()         # b, k, m or g: a power of 1024
        return int(match.group(1)) * 1024 ** "bkmg".index(unit)
    if kind == "duration":
        match = _DURATION_RE.match(value)
        if not match or float(match.group(1)) <= 0:
            raise ConfigError(f"{name}: expected a duration like 30s, 500ms or 5m, got {value!r}")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if kind == "bool":
        if value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind == "list":
        return [v for v in re.split(r"[,\s]+", value) if v]
    if kind.startswith("choice:"):
        choices = kind[7:].split(",")
        if value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    raise ConfigError(f"{name}: unknown kind {kind}")


class Settings:
    """Everything the running broker is configured with: defaults < config file < env < flags."""

    def __init__(self, **overrides: Any) -> None:
        for spec in SETTINGS:
            setattr(self, spec.name, copy.copy(spec.default))     # a list default: its own
        self.upstreams: Dict[str, str] = {}          # provider -> base URL override
        self.discord_gateway = "wss://gateway.discord.gg"
        self.custom_providers: Dict[str, Provider] = {}
        self.prices: Dict[str, Tuple[int, int, int]] = {}   # model -> n$ per token ([prices])
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
        if section not in ("server", "limits", "log", "alerts", "prices", "upstream"):
            errors.append(f"{where(section)}: unknown section [{section}] (known: server, "
                          f"limits, log, alerts, prices, upstream, provider:NAME)")
            continue
        for key, value in parser.items(section):
            spec = by_place.get((section, key))
            gateway = (section, key) == ("upstream", "discord_gateway")
            try:
                if spec is not None:
                    setattr(settings, spec.name, parse_setting(spec, value))
                elif section == "prices":
                    settings.prices[key.strip().lower()] = parse_price(value)
                elif gateway:
                    check_gateway_url(value.strip())
                    settings.discord_gateway = value.strip().rstrip("/")
                elif section == "upstream":             # a provider's upstream override
                    parse_upstream_base(value.strip())
                    settings.upstreams[key] = value.strip()
                else:
                    known = ", ".join(s.key for s in SETTINGS if s.section == section)
                    errors.append(f"{where(section, key)}: unknown key '{key}' in [{section}] "
                                  f"(known: {known})")
            except ConfigError as exc:
                named = "" if spec is not None or gateway else f"[{section}] {key}: "
                errors.append(f"{where(section, key)}: {named}{exc}")
    known = set(settings.custom_providers) | set(builtin_providers())
    errors += [f"{where('upstream', name)}: [upstream] {name}: no such provider"
               for name in settings.upstreams if name not in known]
    errors += [f"{where('upstream', 'insecure')}: [upstream] insecure: no such provider {name!r}"
               for name in settings.insecure_upstream if name not in known]
    return errors


def builtin_providers() -> Dict[str, Provider]:
    """The built-in provider table (parsed once at import; callers copy before changing it)."""
    return BUILTIN_PROVIDERS


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
        if environ.get(spec.env, "").strip():
            setattr(settings, spec.name, parse_setting(spec, environ[spec.env], "$" + spec.env))
    for name, value in flags.items():
        if value is not None:
            spec = SETTINGS_BY_NAME[name]
            setattr(settings, name, parse_setting(spec, value, spec.flag))
    for name, value in environ.items():
        if name.startswith("SEKS_UPSTREAM_") and name not in {s.env for s in SETTINGS} and value:
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
    hook = urllib.parse.urlsplit(settings.alert_webhook) if settings.alert_webhook else None
    if hook is not None and (hook.scheme not in ("http", "https") or not hook.hostname):
        return f"alert webhook must be an http(s) URL, got {settings.alert_webhook!r}"
    if not 0.1 <= settings.ws_poll <= 60:
        return "ws_poll is 100ms to 60s (a revoked token's silent session ends within it)"
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
    providers = {**builtin_providers(), **settings.custom_providers}
    routes = {alias for p in providers.values() for alias in p.aliases}
    for name, url in settings.upstreams.items():
        if name in providers:
            providers[name] = providers[name].with_upstream(url)
        elif strict:
            raise ConfigError(f"upstream override for unknown provider {name!r}")
    for name in settings.insecure_upstream:
        if name not in providers:
            raise ConfigError(f"insecure_upstream names unknown provider {name!r}")
    clash = routes & (set(providers) | {"seks", "api"})
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
        self.requests, self.upstream_errors = collections.Counter(), collections.Counter()
        self.bytes_in, self.bytes_out = collections.Counter(), collections.Counter()
        self.latency: Dict[str, List[float]] = {}       # provider -> bucket counts + [sum]
        self.open_streams = 0
        self.tripwires = collections.Counter()          # provider -> decoy tokens used

    def observe(self, ex: "Exchange", seconds: float) -> None:
        provider = ex.provider or "-"
        with self._lock:
            self.requests[provider, str(ex.status)] += 1
            self.bytes_in[provider] += ex.bytes_in
            self.bytes_out[provider] += ex.bytes_out
            hist = self.latency.setdefault(provider, [0.0] * (len(LATENCY_BUCKETS) + 2))
            hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            hist[-1] += seconds
            if ex.outcome == "tripwire":
                self.tripwires[provider] += 1
            if ex.status in (502, 504):
                self.upstream_errors[provider, "timeout" if ex.status == 504 else "error"] += 1

    def add_stream(self, delta: int) -> None:
        with self._lock:
            self.open_streams += delta

    def render(self, connections: int) -> str:
        def labels(**pairs: str) -> str:
            return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"

        def counter(name: str, text: str, table: Dict[Any, int], *keys: str) -> List[str]:
            """One counter family; its table's keys are label values (a tuple for several)."""
            return [f"# HELP {name} {text}", f"# TYPE {name} counter"] + [
                f"{name}{labels(**dict(zip(keys, k if isinstance(k, tuple) else (k,))))} {n}"
                for k, n in sorted(table.items())]

        out = ["# HELP seks_build_info Broker version.", "# TYPE seks_build_info gauge",
               f"seks_build_info{labels(version=__version__)} 1"]
        with self._lock:
            out += counter("seks_requests_total", "Requests answered, by provider and status.",
                           self.requests, "provider", "status")
            name = "seks_request_duration_seconds"
            out += [f"# HELP {name} Time from request head to last byte.",
                    f"# TYPE {name} histogram"]
            for provider, hist in sorted(self.latency.items()):
                below = 0.0                           # Prometheus buckets are cumulative
                for i, bound in enumerate([repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]):
                    below += hist[i]                  # (the last: every request, the count)
                    out.append(f"{name}_bucket{labels(provider=provider, le=bound)} {int(below)}")
                out.append(f"{name}_sum{labels(provider=provider)} {hist[-1]:.6f}")
                out.append(f"{name}_count{labels(provider=provider)} {int(below)}")
            out += counter("seks_upstream_errors_total",
                           "Upstream failures (502 error, 504 timeout).", self.upstream_errors,
                           "provider", "kind")
            out += counter("seks_request_bytes_total", "Request body bytes from agents.",
                           self.bytes_in, "provider")
            out += counter("seks_response_bytes_total", "Response body bytes to agents.",
                           self.bytes_out, "provider")
            out += counter("seks_tripwires_total", "Decoy tokens used (token mint --decoy).",
                           self.tripwires, "provider")
            out += ["# HELP seks_open_streams Streamed answers being relayed now.",
                    "# TYPE seks_open_streams gauge", f"seks_open_streams {self.open_streams}",
                    "# HELP seks_open_connections Agent connections open now.",
                    "# TYPE seks_open_connections gauge", f"seks_open_connections {connections}"]
        return "\n".join(out) + "\n"


LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def clean_text(value: Optional[str], limit: int) -> Optional[str]:
    """Text as it may be stored: valid UTF-8 (lone surrogates escaped), bounded, None if empty."""
    if not value:
        return None
    return value.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def clean_count(value: Optional[int]) -> Optional[int]:
    """A token count an upstream reported, kept within sqlite's integer range."""
    return None if value is None else max(0, min(int(value), 2 ** 62))


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is an error, never followed (STYLE rule 5)."""

    def redirect_request(self, *args: Any) -> None:
        return None


def plain_opener() -> urllib.request.OpenerDirector:
    """urllib for the broker's own calls (the alert webhook, OAuth sign-in, probes of a
    broker): no proxy taken from the environment, no redirect followed."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirects)


class AlertHook:
    """Tells the operator's webhook about events (a decoy token used) from a thread of its own:
    a bounded queue, a JSON POST with a 5 s timeout, three tries 1 and 2 s apart. It never
    blocks a request; when the queue is full the event is only logged. The webhook is the
    operator's configured URL (an http(s) one: settings_problem) and gets no key and no
    token, only the token's id."""

    def __init__(self, url: str, log: Callable[..., None]) -> None:
        self.url, self.log = url, log
        self.queue: "queue.Queue[Dict[str, Any]]" = queue.Queue(maxsize=100)
        self.opener = plain_opener()
        threading.Thread(target=self._run, name="seks-alerts", daemon=True).start()

    def notify(self, event: Dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.log("error", "alert-dropped", message="alert queue full; event only logged")

    def _run(self) -> None:
        while True:
            event = self.queue.get()
            request = urllib.request.Request(self.url, json.dumps(event, sort_keys=True).encode(),
                                             {"Content-Type": "application/json",
                                              "User-Agent": f"seks-broker/{__version__}"})
            for pause in (1.0, 2.0, 0.0):
                try:
                    with self.opener.open(request, timeout=5) as answer:
                        answer.read(4096)
                    break
                except (OSError, ValueError, http.client.HTTPException):
                    time.sleep(pause)
            else:
                self.log("error", "alert-failed", message="the alert webhook did not take the "
                         "event after 3 tries")


def upstream_failure(exc: BaseException) -> Tuple[type, str]:
    """Why an upstream could not be reached, in a few fixed words (never its text); the first
    match wins (a certificate failure is an SSLError too)."""
    if isinstance(exc, socket.timeout):
        return UpstreamTimeout, "timed out"
    return UpstreamError, next((text for kinds, text in (
        (ssl.SSLCertVerificationError, "TLS certificate verification failed"),
        (ssl.SSLError, "TLS handshake failed"),
        (socket.gaierror, "DNS lookup failed (unknown host)"),
        (ConnectionRefusedError, "refused the connection"),
        ((ConnectionResetError, BrokenPipeError, ConnectionAbortedError), "reset the connection"),
        (UpstreamFraming, "sent a malformed answer or closed the connection"),
    ) if isinstance(exc, kinds)), "unreachable (network error)")


REAL_KEY_SHAPES = (     # (pattern, what it looks like): a real key sent as a token (never seks_)
    (re.compile(r"^sk-ant-"), "an Anthropic API key"),
    (re.compile(r"^sk-(proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), "an OpenAI API key"),
    (re.compile(r"^gsk_[A-Za-z0-9]{20,}"), "a Groq API key"),
    (re.compile(r"^AIza[0-9A-Za-z_-]{30,}"), "a Google API key"),
    (re.compile(r"^(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|^github_pat_"), "a GitHub token"),
    (re.compile(r"^(secret_|ntn_)[A-Za-z0-9]{30,}"), "a Notion token"),
    (re.compile(r"^[0-9]{5,12}:[A-Za-z0-9_-]{30,}"), "a Telegram bot token"),
    (re.compile(r"^BSA[A-Za-z0-9_-]{20,}"), "a Brave Search key"),
)


class Broker:
    """The running broker: providers, token cache, upstream pool, audit, metrics, logging.
    One instance per process, shared by all handler threads."""

    def __init__(self, settings: Settings, store: Store, master_key: bytes,
                 providers: Dict[str, Provider]) -> None:
        self.settings, self.store, self.providers = settings, store, providers
        self._lock, self._locks = threading.Lock(), {}   # per secret: one OAuth or STS renewal
        self._oauth: Dict[str, Tuple[str, float, str]] = {}   # OAuth access tokens (memory)
        self._oauth_seen: Dict[str, Dict[str, float]] = {}    # and those still alive
        self._oauth_pairs: Dict[str, Tuple[Tuple[str, ...], Any]] = {}   # and their scrub pairs
        self._roles: Dict[Tuple[str, str, str], Tuple[Dict[str, str], float, Any]] = {}  # AWS
        self.tokens = TokenCache(store, KeyRing(master_key), self._reload_keys, public=lambda
                                 name: providers[name].public if name in providers else ())
        self.pool = UpstreamPool(upstream_ssl_context(settings.upstream_ca),
                                 upstream_ssl_context(settings.upstream_ca, verify=False),
                                 settings.connect_timeout, settings.upstream_timeout)
        self.opener = urllib.request.OpenerDirector()      # no redirect or error processors
        self.opener.add_handler(self.pool)
        self.routes = {name: p for p in providers.values() for name in (p.name, *p.aliases)}
        self._log_lock, self._level = threading.Lock(), LOG_LEVELS[settings.log_level]
        self.metrics = Metrics()
        self.in_flight: set = set()             # exchanges begun and not yet finished
        self._in_flight_lock = threading.Lock()      # in_flight, and each exchange's recorded
        self.draining = False
        self.audit_ok = True          # the last audit write succeeded; if not, refuse (503)
        self.ws_sessions: set = set()           # open WebSocket sessions, closed at shutdown
        self.connections = ConnectionCount(settings.max_connections)
        self.alerts = AlertHook(settings.alert_webhook, self.log) if settings.alert_webhook \
            else None

    def __repr__(self) -> str:
        return f"Broker({len(self.providers)} providers)"

    def route(self, path: str) -> Tuple[Provider, str, str]:
        """``/<provider>/<rest>`` or ``/api/<provider>/<rest>`` -> (provider, rest, prefix), for
        a path that validate_path accepts."""
        validate_path(path)
        alias = "/api" if path.startswith("/api/") else ""
        name, sep, rest = path[len(alias) + 1:].partition("/")
        provider = self.routes.get(name)
        if provider is None:
            example = "/openai/v1/chat/completions"
            if not name:
                raise NotFound(f"this is seks-broker: send requests to /<provider>/<API path>, "
                               f"e.g. {example}; providers: {', '.join(sorted(self.providers))}")
            if not PROVIDER_NAME_RE.match(name):
                raise NotFound(f"unknown provider (paths start with /<provider>/, e.g. "
                               f"{example})")
            close = difflib.get_close_matches(name, list(self.routes), n=1, cutoff=0.6)
            raise NotFound(f"unknown provider '{name}'" + (
                f"; did you mean '{close[0]}' (/{close[0]}/...)?" if close else
                f"; providers: {', '.join(sorted(self.providers))}"))
        return provider, "/" + rest if sep else "/", f"{alias}/{name}"

    def authenticate(self, token: str, provider: Provider,
                     ex: "Exchange") -> Tuple[TokenRecord, Dict[str, str], Any]:
        """The token check shared by HTTP requests and gateway IDENTIFY/RESUME: look the token
        up (cached), note whose it is for the audit row, deny unless it is live and bound to
        this provider. Returns the record, the secret's parts and their scrub pairs."""
        record, parts, pairs = self.tokens.lookup(token)
        if record is None:
            ex.reason = "unknown token " + self.fingerprint(token)
            kind = next((what for shape, what in REAL_KEY_SHAPES if shape.match(token)), "")
            if kind:
                raise AuthError(f"unknown token: this looks like {kind}, not a seks token. "
                                f"Real keys stay with the broker ('secret add'); give the agent "
                                f"a token from 'token mint' or start it with 'run'")
        else:
            ex.agent, ex.token_id, ex.secret = record.agent, record.id, record.secret_name
            ex.parent = record.parent or ""
        try:
            check_token(record, provider.name, time.time())
        except Tripwire:
            assert record is not None
            self.tripwire(record, ex)
            raise
        assert record is not None and parts is not None
        return record, parts, pairs

    def tripwire(self, record: TokenRecord, ex: "Exchange") -> None:
        """A decoy was used: the audit row says so, the log says so at error level, the alert
        hook is told (in the background), and with on_tripwire=disable-agent every token of the
        agent the decoy was handed to stops now."""
        ex.outcome, ex.reason = "tripwire", "decoy token used"
        self.log("error", "tripwire", agent=record.agent, token=record.id,
                 provider=record.provider, client=ex.client, path=ex.path)
        if record.policy.get("on_tripwire") == "disable-agent":
            with contextlib.suppress(ConfigError, sqlite3.Error):
                self.store.set_agent_disabled(record.agent, True)
                ex.reason += "; agent disabled"
        if self.alerts is not None:
            self.alerts.notify({"event": "tripwire", "agent": record.agent, "token_id": record.id,
                              "provider": record.provider, "path": ex.path,
                              "client": ex.client, "ts": utc_iso()})

    def check_leaks(self, shapes: List[str], ex: "Exchange", where: str) -> None:
        """Refuse (403) a request that would carry a live seks token upstream: an agent sending
        a credential into a prompt, a message or an issue. The reason names the token's id,
        never the token; a token minted with --on-leak revoke is revoked at once."""
        for shape in shapes:
            record, _, _ = self.tokens.lookup(shape)
            if record is None or record.revoked_at is not None or (
                    record.expires_at is not None and time.time() >= record.expires_at):
                continue
            ex.reason = f"a live seks token ({record.id}) in the {where}"
            if record.policy.get("on_leak") == "revoke":
                with contextlib.suppress(ConfigError, sqlite3.Error):
                    self.store.revoke_token(None, record.id)
                    ex.reason += "; it was revoked"
            self.log("error", "token-leak", token=record.id, agent=ex.agent or None,
                     path=ex.path, client=ex.client)
            raise Forbidden("the request carries a seks token; the broker does not send "
                            "credentials upstream")

    def admit(self, record: TokenRecord, ex: "Exchange", kind: str = "", path: str = "",
              body: Any = None) -> Any:
        """Count the request against the token's rate, lifetime and budget limits (if any).
        A budget request also reserves what it may cost (budget_reservation), which may lower
        its output cap: the body to forward is returned."""
        if not any(k in record.policy for k in ("rate", "max_requests", "budget_tokens",
                                                "budget_nusd")):
            return body
        rewritten: List[Optional[bytes]] = []

        def plan(left: int, in_flight: bool) -> int:
            amount, new_body = budget_reservation(kind, path, body, left, in_flight,
                                                  ex.price or (1, 1, 1))
            rewritten.append(new_body)
            return amount
        budget = budget_key(record.policy) != "" and isinstance(body, bytes)
        ex.reservation = self.store.admit(
            record.id, record.policy, time.time(), plan if budget else None,
            (record.parent, record.parent_rate) if record.parent and record.parent_rate else None)
        ex.counted = True
        return rewritten[0] if rewritten and rewritten[0] is not None else body

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

    def post_small(self, target: Target, headers: List[Tuple[str, str]],
                   body: bytes) -> Tuple[int, bytes]:
        """The broker's own POST to a credential endpoint (OAuth, STS): status and at most
        64 KiB of the answer, which never goes to an agent."""
        answer = self.forward(target, "POST", headers + [("Content-Length", str(len(body))),
                                                        ("Accept-Encoding", "identity")], body)
        data = b""
        try:
            for chunk in iter(answer.body.read, b""):
                data += chunk
                if len(data) > 65536:
                    break
        finally:
            answer.finish(complete=True)          # pooled again only if read to its end
        return answer.status, data

    def oauth_pairs(self, secret: str) -> Tuple[Tuple[bytes, bytes], ...]:
        """The scrub pairs of every access token of the secret that is still alive (a renewed
        one may still be honoured upstream until it expires)."""
        now = time.time()
        with self._lock:
            alive = [(t, e) for t, e in self._oauth_seen.get(secret, {}).items() if e > now][-8:]
            self._oauth_seen[secret] = dict(alive)
            live = tuple(t for t, _ in alive)
            cached = self._oauth_pairs.get(secret)
        if cached is not None and cached[0] == live:       # variants made once per token set
            return cached[1]
        pairs = parts_pairs({f"t{i}": t for i, t in enumerate(live)})
        self._oauth_pairs[secret] = (live, pairs)
        return pairs

    def _oauth_keep(self, secret: str, token: str, expires: float, grant: str) -> None:
        self._oauth[secret] = (token, expires, grant)
        with self._lock:
            self._oauth_seen.setdefault(secret, {})[token] = expires

    def oauth_token(self, record: TokenRecord, provider: Provider, verify: bool,
                    ex: "Exchange", stale: str = "") -> str:
        """The secret's current access token. Kept in memory; shared with the other processes
        on the database through oauth_tokens (encrypted); renewed OAUTH_RENEW_S before it
        expires, or now when ``stale`` (a token the upstream refused) is the current one. One
        renewal at a time per secret, across threads and processes (Store.oauth_claim); a
        rotated refresh token is stored with the new access token in one durable commit."""
        name, grant = record.secret_name, record.secret_ciphertext or ""
        cipher, ad = self.tokens.keys.cipher, secret_ad(name, "oauth-access-token")

        def held(margin: float) -> str:       # from this secret as it is now (not rotated)
            cached = self._oauth.get(name)
            return cached[0] if cached is not None and cached[0] != stale and cached[2] == \
                grant and cached[1] - time.time() > margin else ""

        token = held(OAUTH_RENEW_S)
        if token:
            return token                      # the common case: no lock, no database
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        serving = held(30)
        if not lock.acquire(blocking=not serving):
            return serving                    # being renewed by another thread: still good
        try:
            token = held(OAUTH_RENEW_S)
            if token:
                return token
            if stale:
                self.store.oauth_save(name, None, 0.0, None)
            deadline = time.monotonic() + OAUTH_HOLD_S + 5
            while True:
                state, blob, expires, secret_blob = self.store.oauth_claim(
                    name, OAUTH_RENEW_S, OAUTH_HOLD_S)
                if state == "renew":
                    break
                if blob is not None and (state == "token" or expires - time.time() > 30):
                    token = cipher.decrypt(blob, ad).decode("ascii")
                    if state == "token":
                        self._oauth_keep(name, token, expires, grant)
                    if state == "token" or token != stale:    # while another process renews
                        return token                         # it, the old one serves
                if time.monotonic() > deadline:
                    raise Unavailable(f"the access token of secret {name} is being renewed "
                                      f"elsewhere and it is taking too long")
                time.sleep(0.05)
            parts_ad = secret_ad(name, record.secret_provider or "")      # the secret's own
            try:
                if secret_blob is None:
                    raise ValueError("the secret is gone")
                parts = secret_parts(cipher.decrypt(secret_blob, parts_ad))
                grant, url, headers, body = oauth_request(provider, parts, time.time())
                status, data = self.post_small(config_target(url, verify), headers, body)
                token, expires, refresh = oauth_answer(grant, status, data, time.time())
            except (ValueError, KeyError, DecryptError, BrokerError) as exc:
                self.store.oauth_save(name, None, 0.0, None)
                why = exc.message if isinstance(exc, BrokerError) else str(exc)
                ex.reason = f"access token renewal for secret {name} failed: {why}"
                self.log("error", "oauth", secret=name, provider=provider.name, reason=why)
                raise UpstreamError(f"the broker could not renew the access token of secret "
                                    f"{name}: {why}") from None
            rotated = cipher.encrypt(pack_parts(dict(parts, refresh_token=refresh)), parts_ad) \
                if refresh and refresh != parts.get("refresh_token") else None
            if self.store.oauth_save(name, cipher.encrypt(token.encode("ascii"), ad), expires,
                                     rotated, secret_blob):
                self._oauth_keep(name, token, expires, rotated or secret_blob)
            return token                      # (else valid, but of a grant replaced meanwhile)
        finally:
            lock.release()

    def assume_role(self, record: TokenRecord, parts: Dict[str, str], provider: Provider,
                    region: str, verify: bool,
                    ex: "Exchange") -> Tuple[Dict[str, str], Tuple[Tuple[bytes, bytes], ...]]:
        """The temporary credentials of the secret's ``role_arn`` and their scrub pairs (made
        once per credential set): asked of STS (AssumeRole, signed with the secret's own keys)
        on first use and again when fewer than five minutes are left, one request at a time
        per secret; kept in memory only."""
        key = (record.secret_name, parts["role_arn"], parts["access_key_id"])
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            cached = self._roles.get(key)
            if cached is not None and cached[1] - time.time() > ROLE_RENEW_S:
                return cached[0], cached[2]
            body = urllib.parse.urlencode({"Action": "AssumeRole", "Version": "2011-06-15",
                                           "RoleArn": parts["role_arn"], "DurationSeconds": "3600",
                                           "RoleSessionName": "seks-" + record.agent[:50]}).encode()
            target = upstream_target(provider, f"/sts/{region}/", "", verify)
            headers = aws_sign("POST", target, [("Content-Type", "application/x-www-form-"
                                                 "urlencoded; charset=utf-8")],
                               hashlib.sha256(body).hexdigest(), parts, region, "sts", time.time())
            status, data = self.post_small(target, headers, body)
            try:
                creds, expires = assumed_role(data) if status == 200 else ({}, 0.0)
            except ValueError:
                creds = {}
            if not creds:
                ex.reason = f"STS AssumeRole for secret {record.secret_name} answered {status}"
                raise UpstreamError(f"the broker could not assume the role of secret "
                                    f"{record.secret_name} (STS answered {status})")
            self._roles[key] = (creds, expires, parts_pairs(creds))
            return creds, self._roles[key][2]

    def forward(self, target: Target, method: str, headers: List[Tuple[str, str]],
                body: Any) -> UpstreamAnswer:
        """Send the request through urllib's opener over the pool; network failures become 502
        and 504 answers that name neither the host nor the key."""
        try:
            answer = self.opener.open(UpstreamRequest(target, method, headers, body))
        except (OSError, UpstreamFraming) as exc:     # (a BrokerError passes as it is)
            kind, cause = upstream_failure(exc)
            error = kind(f"upstream {cause}")     # the agent: the cause, not the host
            error.detail = f"({target!r})"
            raise error from None
        assert isinstance(answer, UpstreamAnswer)
        return answer

    def begin(self, ex: "Exchange") -> None:
        with self._in_flight_lock:
            self.in_flight.add(ex)

    def close(self, servers: List["BrokerServer"], admin: Optional["AdminServer"], grace: float,
              stop_now: threading.Event) -> None:
        """Stop accepting; let requests in flight finish for up to ``grace`` seconds (saying so
        on stderr) and ask WebSocket sessions to close; give every exchange still running its
        audit row (outcome error, "cut at shutdown", bytes so far), as its upstream may already
        have used the real key; then close the admin port and the pool."""
        for server in servers:
            server.shutdown()
            server.socket.close()             # stop accepting: new connections are refused
        if self.in_flight:
            self.log("warning", "shutdown", message=f"waiting up to {grace:g}s for "
                     f"{len(self.in_flight)} request(s) in flight ({len(self.ws_sessions)} "
                     f"WebSocket session(s) asked to close); send the signal again (Ctrl-C) "
                     f"to stop now")
        for session in list(self.ws_sessions):  # a client that stopped reading cannot hold us
            threading.Thread(target=session.close_both, args=(1001, "broker shutting down"),
                             daemon=True).start()
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline and not stop_now.is_set():
            time.sleep(0.05)
        with self._in_flight_lock:
            running = list(self.in_flight)
        cut = 0
        for ex in running:
            if not ex.recorded:
                ex.outcome = "error"
                ex.reason = f"{ex.reason}; cut at shutdown" if ex.reason else "cut at shutdown"
                cut += self.record(ex)
        if cut:
            self.log("warning", "shutdown", message=f"{cut} request(s) cut at shutdown; each "
                     f"has its audit row (outcome error, 'cut at shutdown')")
        if admin is not None:
            admin.shutdown()
        self.pool.close()

    def record(self, ex: "Exchange") -> bool:
        """Write the request's chained audit row (once); False if it could not be written. A
        failed write makes the broker refuse new requests (503) until a write succeeds again.
        Health checks are not audited."""
        with self._in_flight_lock:               # the shutdown path may race the handler
            if ex.recorded or ex.outcome == "health":
                return True
            ex.recorded = True
        row = AuditRow(ts=utc_iso(), agent=clean_text(ex.agent, 64), token_id=ex.token_id or None,
                       provider=ex.provider or None, secret=ex.secret or None,
                       method=clean_text(ex.method, 16), path=clean_text(ex.path, 1024),
                       status=ex.status, bytes_in=ex.bytes_in, bytes_out=ex.bytes_out,
                       duration_ms=round((time.monotonic() - ex.started) * 1000, 3),
                       client=ex.client, outcome=ex.outcome, reason=clean_text(
                           "; ".join(filter(None, [ex.parent and f"parent {ex.parent}",
                                                   ex.reason])), 300),
                       model=clean_text(ex.model, 100), tokens_in=clean_count(ex.tokens_in),
                       tokens_out=clean_count(ex.tokens_out))
        settle = (row, ex.counted or ex.outcome != "ok", ex.reservation, ex.price,
                  ex.tokens_cached)
        error = ""
        try:                                     # committed, durable, before the caller goes on
            try:
                self.store.append_audit(self.tokens.keys, *settle)
            except KeyRotated:
                self.tokens.reload_keys()
                self.store.append_audit(self.tokens.keys, *settle)
        except (KeyRotated, Unavailable):
            error = "master key rotated; restart the broker"
        except Exception as exc:
            error = type(exc).__name__
        self.audit_ok = not error
        if error:
            self.log("error", "audit", message=f"AUDIT WRITE FAILED: {error}")
        return not error

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

    def log(self, level: str, event: str, **fields: Any) -> None:
        """The one logging path: redacted, control characters escaped, text or JSON lines."""
        if LOG_LEVELS[level] < self._level:
            return
        fields = {k: v for k, v in fields.items() if v is not None}
        if self.settings.log_format == "json":
            line = json.dumps({"ts": utc_iso(), "level": level, "event": event, **{
                k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}})
        else:
            parts = [utc_iso(), level.upper(), event]
            for key, value in fields.items():
                text = str(value)
                parts.append(text if key in ("client", "method", "path") else
                             f"{key}={json.dumps(text) if ' ' in text or not text else text}")
            line = redact(" ".join(parts))
        with self._log_lock, contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line + "\n")


class DeadlineWatch:
    """Closes connections whose current read phase overran its deadline (slow headers, idle
    keep-alive): one thread for all connections instead of a timer per socket."""

    def __init__(self) -> None:
        self._deadlines: Dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="seks-deadlines", daemon=True).start()

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
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class ConnectionCount:
    """Agent connections open now, bounded by max_connections (503 past it), for every
    listener of one broker together."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open, self._lock = limit, 0, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.open -= 1


class BrokerServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on concurrent connections (503 past it), optional TLS
    (handshake in the connection's own thread), and SO_REUSEPORT for --workers."""

    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: Tuple[str, int], broker: Broker,
                 tls: Optional[ssl.SSLContext] = None, reuse_port: bool = False) -> None:
        self.broker, self.tls, self.reuse_port = broker, tls, reuse_port
        self.watch = DeadlineWatch()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
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
        if not self.broker.connections.take():
            with contextlib.suppress(OSError, ConnectionCut):
                request.settimeout(1.0)
                AgentWriter(request, 1.0).error(Unavailable(
                    "broker at its connection limit, retry", {"Retry-After": "1"}, close=True))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.broker.connections.give()
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
            self.broker.connections.give()

    def handle_error(self, request: Any, client_address: Any) -> None:
        kind = getattr(sys.exc_info()[0], "__name__", "unknown")
        self.broker.log("error", "error", message=f"connection error: {kind}")


class AdminServer(http.server.ThreadingHTTPServer):
    """The admin listener (operators and monitoring only, never agents)."""

    def __init__(self, address: Tuple[str, int], broker: Broker) -> None:
        self.broker = broker
        super().__init__(address, AdminHandler)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """The broker's own small servers (the admin port, the sign-in redirect, demo's upstream):
    no access log on the operator's terminal, and ``reply`` sends one whole answer."""

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class AdminHandler(QuietHandler):
    """/metrics (Prometheus text) and /healthz; nothing else. It writes to the admin socket
    only, through http.server's own writer."""

    protocol_version = "HTTP/1.1"
    timeout = 10.0
    server_version = "seks-broker-admin"
    server: AdminServer

    def do_GET(self) -> None:
        broker = self.server.broker
        status, ctype, body = 404, "application/json", \
            b'{"error":{"type":"not_found","message":"not found"}}'
        if self.path == "/metrics":
            status, ctype = 200, "text/plain; version=0.0.4; charset=utf-8"
            body = broker.metrics.render(broker.connections.open).encode()
        elif self.path == "/healthz":
            status, body = 200, b'{"status":"ok"}'
        self.reply(status, body, ctype)


def disable_core_dumps() -> None:
    """A core dump of the broker would hold every decrypted key: switch them off."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def agent_tls_context(settings: Settings) -> Optional[ssl.SSLContext]:
    if not settings.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        for flag, path in (("--tls-cert", settings.tls_cert), ("--tls-key", settings.tls_key)):
            if not os.path.isfile(path):
                raise ConfigError(f"{flag} {path}: no such file") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            getattr(exc, "reason", None) or "not a PEM certificate and matching key"
        raise ConfigError(f"cannot load --tls-cert {settings.tls_cert} with --tls-key "
                          f"{settings.tls_key}: {reason}") from None
    return context


def listen(address: Tuple[str, int], broker: Broker, tls: Optional[ssl.SSLContext],
           reuse_port: bool = False) -> BrokerServer:
    """Bind the agent port; a failure names the address and the flag that changes it."""
    host, port = address
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return BrokerServer(address, broker, tls, reuse_port)
    except socket.gaierror:
        raise ConfigError(f"--host {host}: no such host name or address") from None
    except OSError as exc:
        why = {errno.EADDRINUSE: f"{shown} is already in use (another broker?); choose another "
                                 f"port with --port (or stop what listens there)",
               errno.EADDRNOTAVAIL: f"cannot listen on {host}: not an address of this machine "
                                    f"(--host)",
               errno.EACCES: f"no permission to listen on {shown} (ports below 1024 need "
                             f"privileges); choose another with --port"}
        raise ConfigError(why.get(exc.errno, f"cannot listen on {shown}: "
                                             f"{exc.strerror or exc}")) from None


def startup_report(settings: Settings, store: Store, providers: Dict[str, Provider]) -> None:
    """What the operator should know before the first request: which database (and what it
    holds), upstream overrides, and settings that expose keys or tokens."""
    counts = store.counts(time.time())
    lines = [f"database {os.path.abspath(settings.db)}: {counts['secrets']} secret(s), "
             f"{counts['live_tokens']} live token(s), {counts['agents']} agent(s)"]
    if not counts["secrets"]:
        lines.append(f"warning: this database holds no secrets, so every agent gets 'unknown "
                     f"token'. Wrong folder or --db? Otherwise store a key: {prog()} --db "
                     f"{settings.db} secret add NAME --provider openai")
    lines += [f"upstream override: {name} -> {url}"
              for name, url in sorted(settings.upstreams.items()) if name in providers]
    if settings.discord_gateway != Settings().discord_gateway:
        lines.append(f"upstream override: discord gateway -> {settings.discord_gateway}")
    if settings.host in ("0.0.0.0", "::", "") and not settings.tls_cert:
        lines.append("warning: plain HTTP on all interfaces: tokens cross the network "
                     "unencrypted; use --tls-cert/--tls-key, or --host 127.0.0.1")
    print("\n".join(lines), file=sys.stderr)


def guard_key_file(broker: Broker, key_path: str, master_key: bytes,
                   stopping: threading.Event) -> None:
    """While serving: if the key file disappears, say so loudly and write it again from
    memory (0600), unless the database moved to another key meanwhile (a rotation)."""
    check = derive_key(master_key, "key-check")
    while not stopping.wait(2.0):
        if os.path.exists(key_path):
            continue
        try:
            broker.store.check_master_key(check)
            write_key_file(key_path, master_key)
            broker.log("error", "key-file", message=f"the master key file {key_path} was "
                       f"deleted; it was written again from this broker's memory. Without it "
                       f"the secrets cannot be decrypted: keep a copy somewhere safe")
        except (ConfigError, OSError, sqlite3.Error):
            broker.log("error", "key-file", message=f"the master key file {key_path} is "
                       f"missing and could not be restored; do not stop this broker before "
                       f"the key is restored or SEKS_MASTER_KEY is set")
            return


def open_broker(settings: Settings, store: Store, master_key: bytes,
                providers: Dict[str, Provider],
                worker: int = 0) -> Tuple[Broker, List[BrokerServer], Optional[AdminServer]]:
    """The broker and its listeners: the agent port (and [::1] beside 127.0.0.1, so
    'localhost' works either way), plus the admin port if set."""
    broker = Broker(settings, store, master_key, providers)
    tls = agent_tls_context(settings)
    servers = [listen((settings.host, settings.port), broker, tls, settings.workers > 1)]
    if settings.host in ("127.0.0.1", "localhost") and settings.workers <= 1 and socket.has_ipv6:
        port = servers[0].server_address[1]
        try:
            servers.append(BrokerServer(("::1", port), broker, tls))
        except OSError as exc:                      # no IPv6 here: IPv4 only, nothing to say
            if exc.errno == errno.EADDRINUSE:       # but another process there gets agents
                broker.log("warning", "ipv6-taken", message=f"[::1]:{port} is held by another "
                           f"process: a client that resolves 'localhost' to ::1 reaches it, "
                           f"not this broker; point agents at 127.0.0.1 or stop it")
    admin = None
    if settings.admin_port >= 0:
        admin_port = settings.admin_port + max(worker - 1, 0) if settings.admin_port else 0
        admin = AdminServer((settings.admin_host, admin_port), broker)
        threading.Thread(target=admin.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    for extra in servers[1:]:
        threading.Thread(target=extra.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    return broker, servers, admin


def serve(settings: Settings, store: Store, master_key: bytes,
          providers: Dict[str, Provider], worker: int = 0,
          on_ready: Optional[Callable[[int], None]] = None, key_path: str = "") -> int:
    """Run one broker process until SIGTERM/SIGINT, then drain for up to ``grace`` seconds."""
    threading.stack_size(THREAD_STACK_BYTES)          # (main has disabled core dumps)
    broker, servers, admin = open_broker(settings, store, master_key, providers, worker)
    server = servers[0]
    if not worker and on_ready is None:           # demo prints its own
        startup_report(settings, store, providers)
    for name in settings.insecure_upstream:
        broker.log("warning", "insecure-upstream", message=f"TLS certificate verification is "
                   f"OFF for provider {name}: anyone on the path can read its real key")
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if server.tls else "http"
    ready = f"seks-broker listening on {scheme}://{shown}:{port}"
    if len(servers) > 1:
        ready += f" and {scheme}://[::1]:{port}"
    if admin is not None:
        ready += f" (admin on http://{settings.admin_host}:{admin.server_address[1]})"
    if worker:
        print(f"ready {port} {admin.server_address[1] if admin else '-'}", flush=True)
    else:
        sys.stderr.write(ready + "\n")
    if on_ready is not None:
        on_ready(port)

    stop_now, stopping = threading.Event(), threading.Event()
    if key_path and worker <= 1:
        threading.Thread(target=guard_key_file, args=(broker, key_path, master_key, stopping),
                         daemon=True).start()

    def stop(signum: int, frame: Any) -> None:
        if broker.draining:                   # a second Ctrl-C (or SIGTERM): stop at once
            stop_now.set()
            return
        broker.draining = True
        for listener in servers:                # side by side: each waits out its own poll
            threading.Thread(target=listener.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    # a worker's parent relays the operator's signals as SIGTERM; the terminal's own SIGINT to
    # the whole process group would otherwise count as a second one and skip the grace period
    signal.signal(signal.SIGINT, signal.SIG_IGN if worker else stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stopping.set()
        broker.close(servers, admin, settings.grace, stop_now)
    return 0


def serve_workers(settings: Settings, argv: List[str]) -> int:
    """``--workers N``: N broker processes bound to one port with SO_REUSEPORT; the kernel
    spreads connections. Each re-runs this file (no fork), so it works wherever Python does."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError("--workers needs SO_REUSEPORT, which this platform lacks; run one "
                         "process (and put several behind a load balancer if needed)")
    reserve = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
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
# 13. CLI: argparse sub-commands and main()
# ============================================================================================

def terminal_text(value: Any) -> str:
    """A value as a terminal may show it: control, bidi-format and line-separator characters
    escaped, so text an agent or upstream chose cannot forge or erase the operator's lines."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isprintable() and unicodedata.category(c) not in ("Cf", "Zl", "Zp")
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def did_you_mean(word: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_ttl(text: str) -> int:
    match = TTL_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--ttl takes a number and a unit, like 30m, 12h or 7d (got {text!r})")
    seconds = int(match.group(1)) * TTL_UNITS[match.group(2)]
    if seconds > MAX_TTL_SECONDS:
        raise UsageError("--ttl (or a time ago) is at most 36500d (100 years); leave --ttl out "
                         "for a token that does not expire")
    return seconds


def decode_master_key(text: str, source: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{source} must be URL-safe base64 of 32 bytes")
    return key


def write_key_file(path: str, key: bytes) -> None:
    """A new key file holding ``key``: 0600 from the start, on disk before anything relies on
    it, and only where none is (O_EXCL: never over a key another process just wrote)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.urlsafe_b64encode(key) + b"\n")     # one write: a reader sees all
        os.fsync(fd)                                            # of it or an empty file
    finally:
        os.close(fd)


def load_master_key(db_path: str, environ: Dict[str, str], store: Store,
                    create: bool = True) -> bytes:
    """The master key from $SEKS_MASTER_KEY or ``<db>.key`` (created 0600 on first use, by
    commands that may ``create``; refused if group or others can read it), checked against
    the database. Finishes a key rotation that died after its commit."""
    text = environ.get("SEKS_MASTER_KEY", "").strip()
    if text:
        key = decode_master_key(text, "SEKS_MASTER_KEY")
        store.check_master_key(derive_key(key, "key-check"))
        return key
    path = db_path + ".key"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        try:
            if store.has_secrets() or store.has_key_check():
                raise ConfigError(f"the key file {path} of this database is missing; restore "
                                  f"it from your backup or set SEKS_MASTER_KEY")
            if not create:                    # nothing encrypted yet: nothing to check
                return key
            write_key_file(path, key)
        except (ConfigError, FileExistsError):   # unless another command's first use made
            if not os.path.exists(path):           # the file meanwhile: then it is the key
                raise
            return load_master_key(db_path, environ, store, create)
        store.check_master_key(derive_key(key, "key-check"))
        return key
    if os.name == "posix" and info.st_mode & 0o077:
        raise ConfigError(f"key file {path} is readable by group or others (mode "
                          f"{stat.S_IMODE(info.st_mode):04o}); fix it with: chmod 600 {path}")
    pending = path + ".new"
    for attempt in range(3):                 # a rotation may rename files under us: look again
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
        if not text and attempt < 2:         # another command's first use is writing it
            time.sleep(0.05)
            continue
        key = decode_master_key(text, path)
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


def print_table(headers: List[str], rows: List[List[Any]]) -> None:
    cells = [headers] + [[terminal_text(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def prog() -> str:
    """How the operator ran this program, for hints: ``seks-broker`` after ``pip install .``,
    else ``python3 seks_broker.py`` (the path as typed)."""
    name = os.path.basename(sys.argv[0] or "")
    if name and not name.endswith(".py") and name != "__main__.py" and "python" not in name:
        return name
    return "python3 " + (sys.argv[0] if (sys.argv[0] or "").endswith(".py") else "seks_broker.py")


class CliParser(argparse.ArgumentParser):
    """argparse that never echoes an argument it refuses (unrecognised, or an invalid choice
    or value): it might be a pasted secret. A mistyped command gets the closest real one."""

    def error(self, message: str) -> "NoReturn":
        if "unrecognized arguments" in message:
            message = "unrecognized arguments (not shown, in case they hold a secret)"
        match = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)", message, re.S)
        hint = ""
        if match:
            hint = did_you_mean(match.group(1), (c.strip(" '") for c in match.group(2).split(",")))
        message = re.sub(r"invalid (\w+ )?(choice|value): '?.*?'?( \(choose from.*\))?\Z",
                         r"invalid \1\2 (not shown, in case it holds a secret)\3", message,
                         flags=re.S) + hint
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


CliFormatter = argparse.RawDescriptionHelpFormatter    # help with the examples kept as written


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line.replace("PROG", prog()) for line in lines)


def setting_help(spec: SettingSpec) -> str:
    shown = ("none" if spec.default in ("", [], None, -1) else
             "off" if spec.default is False else str(spec.default))
    return (f"{spec.help} (default: {shown}; env {spec.env}; config [{spec.section}] "
            f"{spec.key})").replace("%", "%%")


def add_token_flags(q: argparse.ArgumentParser, ttl_help: str) -> None:
    """The policy flags of `token mint`, shared with `run`."""
    q.add_argument("--ttl", help=ttl_help)
    q.add_argument("--allow-method", action="append", metavar="METHOD",
                   help="allow only this HTTP method (repeatable)")
    q.add_argument("--allow-path", action="append", metavar="PREFIX",
                   help="allow only paths under this prefix (repeatable)")
    q.add_argument("--rate", metavar="N/UNIT", help="token bucket, e.g. 60/m (429 past it)")
    q.add_argument("--max-requests", type=int, metavar="N",
                   help="lifetime request limit (403, not retried, past it)")
    q.add_argument("--models", metavar="M1,M2", help="LLM models this token may use")
    q.add_argument("--budget-tokens", type=int, metavar="N",
                   help="LLM tokens (input + output) this token may spend (403 once spent)")
    q.add_argument("--budget-usd", type=float, metavar="AMOUNT",
                   help="US dollars this token may spend, priced from the config's [prices] "
                        "table (a model without a price is refused)")
    q.add_argument("--label", help="a note shown in token list (e.g. what the token is for)")
    q.add_argument("--allow-delegation", action="store_true",
                   help="the token may mint narrower child tokens for sub-agents "
                        "(POST /seks/v1/tokens on the agent port)")


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The parser, and each sub-command's parser by name ("token mint"), for usage hints."""
    parser = CliParser(prog=prog(), formatter_class=CliFormatter,
                       description="Credential broker for AI agents: agents hold fake tokens, "
                                   "the broker injects real keys.",
                       epilog=examples("PROG demo                      # try it, no real key needed",
                                       "PROG secret add openai-main --provider openai",
                                       "PROG run --agent bot --secret openai-main -- python3 agent.py",
                                       "PROG serve                     # the broker, for agents "
                                       "started elsewhere"))
    parser.add_argument("--version", action="version", version=f"seks-broker {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    for parent_level, default in ((parser, None), (common, argparse.SUPPRESS)):
        parent_level.add_argument("--db", default=default, help=(
            "database path (default: $SEKS_DB, the config file's [server] db, or ./seks.db)"))
        parent_level.add_argument("--config", default=default,
                                  help="config file (INI; default: $SEKS_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)
    sub.required = True
    leaves: Dict[str, argparse.ArgumentParser] = {}

    def command(name: str, text: str, *example_lines: str,
                under: Any = sub, path: str = "") -> argparse.ArgumentParser:
        leaf = under.add_parser(name, help=text, description=text, parents=[common],
                                formatter_class=CliFormatter, epilog=examples(*example_lines))
        leaves[(path + " " + name).strip()] = leaf
        return leaf

    def group(name: str, text: str, required: bool = True) -> Callable[..., Any]:
        """The group's parser, and a ``command`` that adds an action to it."""
        p = sub.add_parser(name, help=text, description=text, formatter_class=CliFormatter)
        leaves[name] = p
        actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=CliParser)
        actions.required = required
        return lambda *words: command(*words, under=actions, path=name)

    p = command("serve", "run the broker for agents (creates the database on first use)",
                "PROG serve", "PROG serve --port 9000 --admin-port 9100",
                "PROG --db /srv/seks/seks.db serve --host 0.0.0.0 --tls-cert c.pem --tls-key k.pem")
    for spec in (s for s in SETTINGS if s.name != "db"):
        flag, text = spec.flag, setting_help(spec)
        if spec.kind == "bool":                   # the flag turns the default around
            off = spec.default is not False
            flag = "--no-" + flag[2:] if off else flag
            kwargs = {"action": "store_const", "const": "false" if off else "true"}
        elif spec.kind == "list":
            kwargs, text = {"action": "append", "metavar": "NAME"}, text + " (repeatable)"
        else:
            kwargs = {"metavar": spec.kind.split(":")[0].upper()}
        p.add_argument(flag, dest=spec.name, help=text, **kwargs)

    p = command("demo", "try it without a real key: the broker in front of a built-in fake "
                "OpenAI upstream, in a throwaway database", "PROG demo", "PROG demo --port 0")
    p.add_argument("--host", default=DEFAULT_HOST, help="listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="listen port (default %(default)s; 0: any free one)")

    p = command("run", "run a command with short-lived tokens in its environment and no real "
                "key; the tokens are revoked when it ends",
                "PROG run --agent bot --secret openai-main -- python3 agent.py",
                "PROG run --agent bot --secret openai-main --secret claude --budget-tokens "
                "200000 -- ./agent.sh",
                "PROG run --agent ci --secret gh --allow-method GET --ttl 30m -- make check")
    p.add_argument("--agent", required=True, help="the agent the tokens belong to (created "
                                                  "if new)")
    p.add_argument("--secret", action="append", required=True, metavar="NAME",
                   help="a stored secret to mint a token for (repeatable, one per provider)")
    p.add_argument("--url", help="a running broker to use (default: the configured address if "
                                 "a broker serving this database answers there, else one "
                                 "started in this process on a free loopback port)")
    p.add_argument("--user", metavar="NAME",
                   help="run the command as this user, in its own group only (run must be "
                        "started as root): a command running as you can read the database "
                        "and its key file, and so every real key")
    add_token_flags(p, "bound the tokens' lifetime, e.g. 30m (default: 24h, and revoked as "
                       "soon as the command ends)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")

    p = command("status", "one screen for the operator: broker, agents, traffic, budgets, "
                "denials, audit chain", "PROG status",
                "PROG status --json --url http://127.0.0.1:9000")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--url", help="where the broker listens (default: the configured address)")
    command("providers", "each route, its upstream and where its credentials go",
            "PROG providers", "PROG --config seks.ini providers --json"
            ).add_argument("--json", action="store_true", help="JSON lines")

    group("config", "check a config file")(
        "check", "validate a config file, explaining each error with its line",
        "PROG config check seks.ini").add_argument("path")

    command("backup", "online, consistent copy of the DB (0600; not the key)",
            "PROG backup /safe/place/seks-2026-12-03.db").add_argument("path")
    command("rotate-master-key", "re-encrypt every secret and re-key the audit chain under a "
            "new key", "PROG rotate-master-key").add_argument(
        "--force", action="store_true",
        help="rotate even if the audit chain does not verify (it is re-keyed as is)")

    action = group("secret", "store, list and remove real keys")
    q = action("add", "store a real key; the value is read from a hidden prompt on a "
                "terminal, else from stdin (never from the command line, where ps shows it)",
                "PROG secret add openai-main --provider openai      # prompts, input hidden",
                "printf %s \"$OPENAI_KEY\" | PROG secret add openai-main --provider openai",
                "providers: " + ", ".join(sorted(builtin_providers())) + " (and custom ones "
                "from the config file)")
    q.add_argument("name", help="a name for it (letters, digits, '.', '_', '-')")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--provider", help="which API it is for (see 'providers')")
    which.add_argument("--oauth", metavar="PROVIDER", help="an OAuth provider: read its client "
                       "parts (JSON on stdin), run its device authorization flow (you approve "
                       "in a browser) and store the refresh token it gives")
    action("rotate", "replace a secret's value (hidden prompt or stdin); its tokens keep working",
           "printf %s \"$NEW_KEY\" | PROG secret rotate openai-main").add_argument("name")
    action("list", "names, providers and dates (never values)", "PROG secret list")
    action("rm", "delete a secret and revoke its tokens", "PROG secret rm openai-old"
           ).add_argument("name")

    action = group("token", "mint, list, revoke and prune fake tokens")
    q = action("mint", "make a token for an agent and print it (or the variables its SDK "
               "reads)", "PROG token mint --secret openai-main --agent bot --ttl 12h",
               "PROG token mint --secret openai-main --agent bot --format shell --out agent.env",
               ". ./agent.env     # then start the agent from this shell")
    q.add_argument("--secret", required=True, help="the stored secret the token stands for")
    q.add_argument("--agent", required=True, help="the agent it is for (created if new)")
    add_token_flags(q, "lifetime such as 30m, 12h, 7d (default: no expiry)")
    q.add_argument("--format", choices=("token", "shell", "dotenv", "env", "json"),
                   default="token", help="token: the token alone (default); shell: export "
                   "lines for '. FILE'; dotenv: KEY=\"value\" lines for .env loaders; env: "
                   "KEY=value lines; json: one object")
    q.add_argument("--out", metavar="FILE", help="write to FILE (mode 0600: it is a credential) "
                                                 "instead of stdout")
    q.add_argument("--decoy", action="store_true",
                   help="a tripwire: looks like any token, never forwards anything; its use is "
                        "answered like a revoked token, audited as 'tripwire', logged at error "
                        "level, counted in /metrics and sent to [alerts] webhook")
    q.add_argument("--on-tripwire", choices=["disable-agent"],
                   help="with --decoy: also disable every token of its agent when it is used")
    q.add_argument("--on-leak", choices=["revoke"],
                   help="revoke this token when the broker finds it inside a request it would "
                        "forward (a prompt, a message, a query)")
    q = action("list", "tokens with agent, provider, label, state, use and policy",
               "PROG token list", "PROG token list --agent bot --status active")
    q.add_argument("--agent", help="only this agent's tokens")
    q.add_argument("--status", help="only tokens in this state", choices=(
        "active", "exhausted", "expired", "revoked", "agent-disabled", "secret-removed"))
    q.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    action("revoke", "revoke a token (its id, with or without tok_, or the token itself; '-' "
           "reads it from stdin)", "PROG token revoke tok_0123456789ab",
           "printf %s \"$TOKEN\" | PROG token revoke -").add_argument("token_or_id")
    q = action("prune", "delete revoked and expired tokens (their audit rows stay)",
               "PROG token prune", "PROG token prune --older-than 30d")
    q.add_argument("--older-than", metavar="AGE", help="only those that ended this long ago "
                                                       "(30m, 12h, 7d; default: all)")

    action = group("agent", "add, list, disable, enable and remove agents")
    for verb, text, example in (
            ("add", "register an agent", "PROG agent add research-bot"),
            ("disable", "stop all its tokens at once (reversible)", "PROG agent disable bot"),
            ("enable", "let its tokens work again", "PROG agent enable bot"),
            ("rm", "remove an agent and its tokens", "PROG agent rm old-bot --force")):
        q = action(verb, text, example)
        q.add_argument("name")
        if verb == "rm":
            q.add_argument("--force", action="store_true",
                           help="also when it has live tokens (they stop working)")
    action("list", "agents, their state and live tokens", "PROG agent list")

    action = group("audit", "list, follow, verify or prune the audit log ('audit' alone lists)",
                   required=False)
    add_audit_filters(leaves["audit"], shown=False)   # `audit --json` still lists
    q = action("list", "audit rows, newest last", "PROG audit list --since 1h --status 4xx",
               "PROG audit list --agent bot --follow", "PROG audit list --json --limit 1000")
    add_audit_filters(q)
    action("verify", "check the MAC chain of every row (the outcome shows in 'status')",
           "PROG audit verify")
    action("prune", "delete rows older than a date; the chain still verifies",
           "PROG audit prune --before 90d").add_argument(
        "--before", required=True, help="ISO date/time (UTC), or an age: 1h, 7d, 90d")

    q = command("usage", "requests and LLM tokens per agent, provider and model",
                "PROG usage --since 1d", "PROG usage --agent bot --json")
    q.add_argument("--agent")
    q.add_argument("--since", help="1h, 30m, 7d or an ISO date/time (UTC)")
    q.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return parser, leaves


def add_audit_filters(q: argparse.ArgumentParser, shown: bool = True) -> None:
    """The row filters and output flags of `audit list`. Plain `audit` takes them too,
    hidden, and defaults them for its sub-commands."""
    hide = {} if shown else {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
    for flag, text, kwargs in (
            ("--agent", "only this agent", {}), ("--provider", "only this provider", {}),
            ("--since", "1h, 30m, 7d or an ISO date/time (UTC)", {}),
            ("--status", "exact status (404) or class (4xx)", {}),
            ("--limit", "newest N rows (default 100)", {"type": int, "default": 100}),
            ("--json", "JSON lines instead of a table", {"action": "store_true"}),
            ("--follow", "keep printing new rows (Ctrl-C ends)", {"action": "store_true"})):
        q.add_argument(flag, **{"help": text, **kwargs, **hide})


def misplaced_flags(extra: List[str], leaves: Dict[str, argparse.ArgumentParser],
                    here: str) -> str:
    """The error for arguments the sub-command did not take: which are known flags of other
    commands (named, with where they belong). Anything else is not echoed: it might be a secret."""
    hints = []
    for option in (arg.split("=", 1)[0] for arg in extra if arg.startswith("--")):
        owners = [name for name, leaf in leaves.items() if option in leaf._option_string_actions]
        places = [name for name in owners if name != here]
        if owners:
            hints.append(f"{option} is not an option of '{here}'"
                         + (f"; it belongs to: {', '.join(places)}" if places else ""))
    return "; ".join(hints) or "unrecognized arguments (not shown, in case they hold a secret)"


class Progress:
    """Work done, rate and time left, on stderr when it is a terminal; silent otherwise (so
    scripts and logs get no carriage returns). ``add`` can bring a total known only later."""

    def __init__(self, label: str, total: int = 0, unit: str = "rows") -> None:
        try:
            self.active = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.active = False
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.start, self.shown = time.monotonic(), 0.0

    def add(self, count: int = 1, total: Optional[int] = None) -> None:
        self.done += count
        if total is not None:
            self.total = total
        now = time.monotonic()
        due = now - self.shown >= 0.2 or self.done >= self.total     # at most 5 a second
        if not (self.active and self.total > 0 and due):
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-6)
        left = max(self.total - self.done, 0) / rate if rate else 0.0
        sys.stderr.write(f"\r{self.label}: {self.done:,}/{self.total:,} {self.unit}, "
                         f"{rate:,.0f}/s, {left:.0f}s left ")
        sys.stderr.flush()

    def end(self) -> None:
        if self.active and self.shown:
            sys.stderr.write("\n")


def read_secret_value(name: str, prompt: str = "") -> str:
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            value = getpass.getpass(prompt or f"Value for secret {name} (input hidden): ")
        else:
            value = sys.stdin.read() if sys.stdin is not None else ""
    except (EOFError, KeyboardInterrupt):
        sys.stderr.write("\n")
        raise ConfigError("no value given; nothing was stored") from None
    return value.strip()


def read_secret_parts(name: str, provider: Provider, rotating: bool) -> Dict[str, Any]:
    """A secret's parts from the operator, never from argv: a lone key as a bare value; the
    parts of a several-part secret as a JSON object on stdin, or each at a hidden prompt on a
    terminal (Enter skips an optional part, or on rotation one that stays as it is)."""
    if provider.parts == ("key",):
        return {"key": read_secret_value(name)}
    if sys.stdin is not None and sys.stdin.isatty():
        given = {}
        for part in provider.parts:
            keep = " (Enter: keep)" if rotating else (
                " (optional, Enter: none)" if part in provider.optional else "")
            value = read_secret_value(name, f"{part} for secret {name}{keep} (input hidden): ")
            if value:
                given[part] = value
        return given
    given = json_value(read_secret_value(name), _reject_duplicate_keys)
    if not isinstance(given, dict) or not all(isinstance(v, (str, type(None)))
                                              for v in given.values()):
        example = json.dumps({n: "..." for n in provider.parts})
        raise ConfigError(f"{provider.name} secrets have several parts: pipe a JSON object of "
                          f"part names to values, e.g. {example}; nothing was stored")
    return given


def post_form(url: str, form: Dict[str, str]) -> Dict[str, Any]:
    """POST a form to an OAuth endpoint from configuration; its JSON answer (also of a 4xx)."""
    parse_upstream_base(url)
    request = urllib.request.Request(url, urllib.parse.urlencode(form).encode(), {
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
    try:
        with plain_opener().open(request, timeout=30) as answer:
            data = answer.read(65536)
    except urllib.error.HTTPError as exc:
        data = exc.read(65536)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach {url}: {type(exc).__name__}") from None
    obj = json_value(data)
    if not isinstance(obj, dict):
        raise ConfigError(f"{url} did not answer with a JSON object")
    return obj


class SignInRedirectHandler(QuietHandler):
    """The loopback redirect of `secret add --oauth` (PKCE): takes the code the operator's
    browser brings back when its state is the one sent, and answers a fixed line."""

    def do_GET(self) -> None:                     # noqa: N802 (http.server's name)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        got: Dict[str, str] = self.server.got     # type: ignore[attr-defined]
        if hmac.compare_digest(query.get("state", ""), self.server.expected_state) and not got:
            got.update(query)
        self.reply(200 if got else 400, b"seks-broker: you can close this tab.\n", "text/plain")


def oauth_pkce_flow(provider: Provider, parts: Dict[str, Any], cap: float = 300) -> str:
    """Authorization code with PKCE (RFC 7636) on a loopback redirect (RFC 8252): print the
    provider's consent URL, take the code the browser brings back to 127.0.0.1 (the state
    checked), trade it with the code verifier for a refresh token (never printed)."""
    auth_url = parts.get("auth_url") or provider.auth_url
    token_url = parts.get("token_url") or provider.token_url
    if not parts.get("client_id") or not token_url:
        raise ConfigError(f"{provider.name}'s sign-in needs client_id (and its token_url)")
    parse_upstream_base(auth_url)
    verifier, state = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    got: Dict[str, str] = {}
    with http.server.HTTPServer(("127.0.0.1", 0), SignInRedirectHandler) as server:
        server.timeout = 1.0
        server.expected_state, server.got = state, got       # type: ignore[attr-defined]
        redirect = f"http://127.0.0.1:{server.server_address[1]}/"
        consent = auth_url + ("&" if "?" in auth_url else "?") + urllib.parse.urlencode({
            "response_type": "code", "client_id": parts["client_id"], "redirect_uri": redirect,
            "scope": parts.get("scope") or "", "state": state, "code_challenge_method": "S256",
            "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
            "access_type": "offline", "prompt": "consent"})
        sys.stderr.write(f"Open this URL in a browser on this machine and sign in "
                         f"({provider.name}); waiting for the redirect to {redirect}\n{consent}\n")
        deadline = time.monotonic() + cap
        while not got and time.monotonic() < deadline:
            server.handle_request()
    if not got.get("code"):
        raise ConfigError(f"no sign-in came back{': ' + terminal_text(got.get('error')) if got else ''}"
                          f"; nothing was stored")
    client = {k: parts[k] for k in ("client_id", "client_secret") if parts.get(k)}
    answer = post_form(token_url, dict(client, grant_type="authorization_code", code=got["code"],
                                       redirect_uri=redirect, code_verifier=verifier))
    if not isinstance(answer.get("refresh_token"), str) or not answer["refresh_token"]:
        raise ConfigError(f"the provider gave no refresh token ({terminal_text(answer.get('error'))}"
                          f"); nothing was stored")
    return answer["refresh_token"]


def oauth_device_flow(provider: Provider, parts: Dict[str, Any], cap: float = 900) -> str:
    """RFC 8628: ask the device endpoint for a code, tell the operator where to approve it, poll
    the token endpoint until approved, denied or expired; the refresh token (never printed)."""
    device_url = parts.get("device_url") or provider.device_url
    token_url = parts.get("token_url") or provider.token_url
    if not device_url or not token_url or not parts.get("client_id"):
        raise ConfigError(f"{provider.name}'s device flow needs client_id (and its device_url "
                          f"and token_url); or give the refresh token yourself with --provider")
    client = {k: parts[k] for k in ("client_id", "client_secret") if parts.get(k)}
    started = post_form(device_url, {k: parts[k] for k in ("client_id", "scope") if parts.get(k)})
    where = started.get("verification_uri_complete") or started.get("verification_uri") or \
        started.get("verification_url")
    if not isinstance(started.get("device_code"), str) or not isinstance(where, str):
        raise ConfigError(f"{device_url} gave no device code: {terminal_text(started.get('error'))}")
    sys.stderr.write(f"Open {terminal_text(where)} and enter the code "
                     f"{terminal_text(started.get('user_code'))} to let the broker act for "
                     f"you ({provider.name}). Waiting...\n")
    interval = float(started.get("interval", 5)) if str(started.get("interval", 5)).isdigit() else 5
    deadline = time.monotonic() + min(cap, float(started.get("expires_in", 900)) if str(
        started.get("expires_in", 900)).isdigit() else 900)
    while time.monotonic() < deadline:
        time.sleep(max(interval, 0.05))
        answer = post_form(token_url, dict(client, device_code=started["device_code"],
                                           grant_type="urn:ietf:params:oauth:grant-type:device_code"))
        if isinstance(answer.get("refresh_token"), str) and answer["refresh_token"]:
            return answer["refresh_token"]
        error = answer.get("error")
        if error == "slow_down":
            interval += 5
        elif error != "authorization_pending":
            raise ConfigError(f"the device flow ended: {terminal_text(error) or 'no refresh token'}"
                              f"; nothing was stored")
    raise ConfigError("the code was not approved in time; nothing was stored")


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start (a new file renamed over the
    target, so a reader never sees it half-written or with wider permissions)."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def token_state(token: Dict[str, Any], now: float) -> str:
    """active, or why a token does not work (in the order the broker checks them)."""
    if token["revoked_at"] or token.get("parent_ended") or (
            token.get("parent_expires_at") is not None and now >= token["parent_expires_at"]):
        return "revoked"
    if token["expires_at"] is not None and now >= token["expires_at"]:
        return "expired"
    if token["agent_disabled_at"]:
        return "agent-disabled"
    if not token["secret_exists"]:
        return "secret-removed"
    policy = token["policy"]
    key = budget_key(policy)
    if ("max_requests" in policy and token["requests"] >= policy["max_requests"]) or \
            (key and token[budget_counter(policy)] >= policy[key]):
        return "exhausted"
    return "active"


def budget_text(token: Dict[str, Any]) -> str:
    key = budget_key(token["policy"])
    if not key:
        return "-"
    budget, used = token["policy"][key], token[budget_counter(token["policy"])]
    share = 100.0 * used / budget if budget else 100.0
    if key == "budget_nusd":
        return f"${used / 1e9:,.4f}/${budget / 1e9:,.2f} ({share:.0f}%)"
    return f"{used:,}/{budget:,} ({share:.0f}%)"


def find_provider(providers: Dict[str, Provider], name: str) -> Provider:
    provider = providers.get(name) or next(
        (p for p in providers.values() if name in p.aliases), None)
    if provider is None:
        raise UsageError(f"unknown provider {name!r}{did_you_mean(name, providers)} (known: "
                         f"{', '.join(sorted(providers))}; see '{prog()} providers')")
    return provider


def run_command(args: argparse.Namespace, environ: Dict[str, str], argv: List[str]) -> int:
    if args.command == "config":
        return cmd_config_check(args.path)
    if args.command == "demo":
        return cmd_demo(args.host, args.port)
    # serve's setting flags (other commands take only --db); resolve_settings skips a None
    flags = {name: ",".join(value) if isinstance(value, list) else value
             for name, value in vars(args).items() if name in SETTINGS_BY_NAME}
    settings = resolve_settings(args.config, environ, flags)
    providers = load_providers(settings, strict=args.command == "serve")
    if args.command == "providers":
        return cmd_providers(args, providers)
    action = getattr(args, "action", None)
    # Only the commands that store something create a new database or key file; every other
    # command but these two gets the master key checked against the database.
    creates = args.command == "serve" or action == "add"          # agent add, secret add
    with contextlib.closing(Store(settings.db, create=creates)) as store:
        if args.command == "backup":              # a copy needs no key (it holds none)
            return cmd_backup(args.path, store, settings.db)
        if args.command == "secret" and action in ("add", "rotate"):  # key loaded after the prompt
            return cmd_secret_write(args, store, settings, providers, environ)
        master = load_master_key(settings.db, environ, store, create=creates)
        if args.command == "serve":
            worker = int(environ.get("SEKS_WORKER_INDEX", "0") or 0)
            if settings.workers > 1 and not worker:
                startup_report(settings, store, providers)
                store.close()
                return serve_workers(settings, argv)
            if worker:
                settings.port = int(environ["SEKS_WORKER_PORT"])
            key_path = "" if environ.get("SEKS_MASTER_KEY", "").strip() else settings.db + ".key"
            return serve(settings, store, master, providers, worker, key_path=key_path)
        handler = {"secret": cmd_secret, "token": cmd_token, "agent": cmd_agent,
                   "audit": cmd_audit, "usage": cmd_usage, "status": cmd_status,
                   "run": cmd_run, "rotate-master-key": cmd_rotate_master_key}[args.command]
        return handler(args, store, master, settings, providers, environ)


class DemoUpstreamHandler(QuietHandler):
    """`demo`'s stand-in for api.openai.com on 127.0.0.1 (never an agent connection): it
    accepts only its server's random demo ``key`` (401 otherwise, like the real API), answers
    chat completions plain or streamed, and echoes the Authorization header it got, so the
    demo shows the broker masking it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.authorized():
            self.reply(200, json.dumps({"object": "list", "data": [
                {"id": "demo-model", "object": "model", "owned_by": "seks-demo"}]}).encode())

    def do_POST(self) -> None:
        size = self.headers.get("Content-Length", "")
        body = self.rfile.read(int(size)) if size.isdigit() else b""
        if not self.authorized():
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = {}
        if not self.path.endswith("/chat/completions") or not isinstance(request, dict):
            self.reply(404, b'{"error": {"message": "the demo upstream answers '
                            b'/v1/chat/completions and /v1/models only"}}')
            return
        auth = self.headers.get("Authorization", "")
        words = (f"Hello from the demo upstream! The broker sent me the header 'Authorization: "
                 f"{auth}', and I echo it back: the broker masks the real key before your agent "
                 f"sees it.").split(" ")
        usage = {"prompt_tokens": 9, "completion_tokens": len(words),
                 "total_tokens": 9 + len(words)}
        model = str(request.get("model") or "demo-model")
        if request.get("stream") is not True:
            self.reply(200, json.dumps({
                "id": "chatcmpl-demo", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": " ".join(words)}}], "usage": usage}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"choices": [{"index": 0, "delta": {"content": w + " "}}]} for w in words]
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({"choices": [], "usage": usage})
        for event in events:
            event.update(id="chatcmpl-demo", object="chat.completion.chunk", model=model)
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))   # unbuffered: sent now
            time.sleep(0.05)
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    def authorized(self) -> bool:
        key = self.server.key                   # type: ignore[attr-defined]
        if hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
            return True
        self.reply(401, b'{"error": {"message": "Incorrect API key provided (demo upstream)", '
                        b'"code": "invalid_api_key"}}')
        return False


def cmd_demo(host: str, port: int) -> int:
    """The broker in front of DemoUpstreamHandler, in a database in a new temporary folder
    (deleted at the end): a secret holding the demo key, one token, and what to type to try it."""
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix="seks-demo-")
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DemoUpstreamHandler)
    upstream.key = demo_key = "sk-demo-" + secrets.token_urlsafe(24)   # type: ignore[attr-defined]
    upstream_url = f"http://127.0.0.1:{upstream.server_address[1]}"
    threading.Thread(target=upstream.serve_forever, name="seks-demo-upstream", daemon=True).start()
    try:
        settings = Settings(db=os.path.join(folder, "seks.db"), host=host, port=port)
        settings.upstreams["openai"] = upstream_url
        providers = load_providers(settings)
        with contextlib.closing(Store(settings.db)) as store:
            master = load_master_key(settings.db, {}, store)
            keys = KeyRing(master)
            store.put_secret("demo-openai", "openai", keys.cipher.encrypt(
                demo_key.encode(), secret_ad("demo-openai", "openai")), False, keys.check)
            store.add_agent("demo-agent", exist_ok=True)
            token = new_token(providers["openai"])
            store.add_token(new_token_id(), token_digest(token), "demo-openai", "openai",
                            "demo-agent", None, {})

            def ready(bound: int) -> None:
                base = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/openai/v1"
                chat = '{"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]%s}'
                curl = (f"curl -s{{}} {base}/chat/completions -H 'Authorization: Bearer {token}' "
                        f"-H 'Content-Type: application/json' -d '{{}}'")
                print(f"seks-broker demo: a throwaway database in {folder}, a fake OpenAI "
                      f"upstream on {upstream_url} that accepts only its own demo key, and the "
                      f"broker in front of it.\n\nAn agent's whole configuration (no real key "
                      f"in it):\n  export OPENAI_BASE_URL={base}\n  export OPENAI_API_KEY="
                      f"{token}\n\nTry it (plain, then streamed):\n  "
                      + curl.format("", chat % "") + "\n  "
                      + curl.format("N", chat % ', "stream": true') + "\n\nEvery request is "
                      f"in the audit log:\n  python3 {sys.argv[0] or 'seks_broker.py'} --db "
                      f"{settings.db} audit\n\nCtrl-C stops the demo and deletes {folder}.",
                      flush=True)
            return serve(settings, store, master, providers, on_ready=ready)
    finally:
        upstream.shutdown()
        upstream.server_close()
        shutil.rmtree(folder, ignore_errors=True)


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
    try:
        providers = load_providers(settings)
    except ConfigError as exc:
        providers, errors = {}, errors or [f"{path}: {exc}"]
    problem = "" if errors else settings_problem(settings)
    if problem:
        errors.append(f"{path}: {problem}")
    if errors:
        print("\n".join(errors + [f"{len(errors)} error(s)"]))
        return 1
    custom = ", ".join(sorted(settings.custom_providers)) or "none"
    print(f"{path}: OK (custom providers: {custom}; {len(providers)} providers in all)")
    return 0


def cmd_secret_write(args: argparse.Namespace, store: Store, settings: Settings,
                     providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    """`secret add` and `secret rotate`: the value from a hidden prompt or stdin, checked,
    encrypted under the database's master key (loaded after the prompt)."""
    if getattr(args, "value", None) is not None:    # set by main from what argparse left
        raise UsageError("refusing a secret on the command line (every local user can read it "
                         "with ps). Pipe it on stdin instead, e.g.\n"
                         f"  printf %s \"$KEY\" | {prog()} secret {args.action} {args.name} "
                         "...\nor run the command on a terminal to be prompted with hidden input.")
    if not NAME_RE.match(args.name):
        raise UsageError("secret names are 1-64 letters, digits, '.', '_' or '-'")
    if args.action == "add":
        provider_name = find_provider(providers, args.oauth or args.provider).name
        if store.get_secret(args.name) is not None:
            raise ConfigError(f"a secret named {args.name!r} exists; use 'secret rotate' "
                              f"to change its value")
    else:
        found = store.get_secret(args.name)
        if found is None:
            raise ConfigError(f"no secret named {args.name!r}")
        provider_name = found[0]
    provider = providers.get(provider_name)
    if provider is None:
        raise ConfigError(f"secret {args.name!r} is for provider {provider_name!r}, which is "
                          f"not configured")
    given = read_secret_parts(args.name, provider, args.action == "rotate" or bool(
        getattr(args, "oauth", None)))
    if getattr(args, "oauth", None):      # the device flow or PKCE gives the refresh token
        if not provider.oauth:
            raise ConfigError(f"{provider.name} is not an OAuth provider")
        given["refresh_token"] = (oauth_pkce_flow if given.get("auth_url") or provider.auth_url
                                  else oauth_device_flow)(provider, given)
    keys = KeyRing(load_master_key(settings.db, environ, store))
    parts: Dict[str, str] = {}
    old = store.get_secret(args.name)               # read again: a rotation may have run since
    if args.action == "rotate" and provider.parts != ("key",) and old is not None:
        parts = secret_parts(keys.cipher.decrypt(old[1], secret_ad(args.name, provider_name)))
    for part, value in given.items():
        if value is None:
            if part not in provider.optional:
                raise ConfigError(f"only an optional part can be removed; {part!r} is not")
            parts.pop(part, None)
        else:
            parts[part] = value.strip()
    if not any(parts.values()):
        raise ConfigError("empty secret value; nothing was stored")
    if any("seks_" in value for value in parts.values()):
        raise ConfigError("that looks like a seks fake token, not a real key")
    problem = part_problem(parts, provider)
    if problem:
        raise ConfigError(f"{problem}; nothing was stored")
    ciphertext = keys.cipher.encrypt(pack_parts(parts), secret_ad(args.name, provider_name))
    store.put_secret(args.name, provider_name, ciphertext, replace=args.action == "rotate",
                     check=keys.check)
    verb = "stored" if args.action == "add" else "rotated"
    print(f"{verb} secret {args.name} for {provider_name} in {settings.db}", file=sys.stderr)
    return 0


def cmd_secret(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
               providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    if args.action == "list":                   # part names, never their values
        cipher, rows = SecretCipher(master), []
        for n, p, ciphertext, c, u in store.query(
                "SELECT name, provider, ciphertext, created_at, updated_at FROM secrets "
                "ORDER BY name"):
            try:
                names = ",".join(sorted(secret_parts(cipher.decrypt(ciphertext, secret_ad(n, p)))))
            except (DecryptError, ValueError):
                names = "? (fails verification)"
            rows.append([n, p, names, c, u])
        print_table(["NAME", "PROVIDER", "PARTS", "CREATED", "UPDATED"], rows)
        if not rows:
            print(f"(no secrets in {settings.db})", file=sys.stderr)
        return 0
    revoked = store.remove_secret(args.name)
    print(f"removed secret {args.name}; revoked {revoked} token(s)", file=sys.stderr)
    return 0


def env_vars(provider: Provider, token: str, broker_url: str,
             parts: Optional[Dict[str, str]] = None) -> List[Tuple[str, str]]:
    """The variables the provider's SDKs read (base URLs, key, and identifiers such as
    Twilio's account SID, from the secret's public parts), pointing at the broker."""
    prefix, parts = re.sub(r"[^A-Z0-9]", "_", provider.name.upper()), parts or {}
    if provider.aws:                                             # what boto3 and the CLI read
        regions = [r for r in parts.get("regions", "").replace(",", " ").split() if r != "*"]
        region = regions[0] if regions else "us-east-1"
        services = (parts.get("services") or " ".join(AWS_SERVICES)).replace(",", " ").split()
        return [("AWS_ACCESS_KEY_ID", token), ("AWS_SECRET_ACCESS_KEY", AWS_PLACEHOLDER_SECRET),
                ("AWS_REGION", region), ("AWS_DEFAULT_REGION", region)] + [
            ("AWS_ENDPOINT_URL_" + service.upper().replace("-", "_"),
             f"{broker_url}/{provider.name}/{service}/{region}") for service in services]
    out = []
    for word in (provider.env or f"{prefix}_BASE_URL= {prefix}_API_KEY").split():
        var, eq, value = word.partition("=")
        if not eq:
            out.append((var, token))
        elif not value.startswith("{"):
            out.append((var, f"{broker_url}/{provider.name}{value}"))
        elif value[1:-1] in parts and value[1:-1] in provider.public:
            out.append((var, parts[value[1:-1]]))
    return out


def handoff_text(fmt: str, variables: List[Tuple[str, str]], token: str,
                 meta: Dict[str, Any]) -> str:
    """A minted token in the form asked for: the token, shell exports (for '. FILE'), a
    dotenv file, plain KEY=value lines, or JSON."""
    if fmt == "token":
        return token + "\n"
    if fmt == "json":
        return json.dumps(dict(meta, token=token, env=dict(variables)), sort_keys=True) + "\n"
    expires = utc_iso(meta["expires_at"]) if meta["expires_at"] else "never"
    header = (f"# seks-broker token for agent {meta['agent']} ({meta['provider']}, "
              f"{meta['token_id']}, expires {expires}).\n# This file is a credential: keep it "
              f"private (mode 0600), never commit it.\n")
    if fmt == "shell":
        return header + "".join("export %s='%s'\n" % (k, v.replace("'", "'\"'\"'"))
                                for k, v in variables)             # ' inside '...' as '"'"'
    if fmt == "dotenv":
        return header + "".join(f"{k}=\"{v}\"\n" for k, v in variables)
    return "".join(f"{k}={v}\n" for k, v in variables)


def mint_token(store: Store, master: bytes, providers: Dict[str, Provider], secret: str,
               agent: str, args: argparse.Namespace, default_ttl: Optional[int] = None,
               default_label: Optional[str] = None
               ) -> Tuple[str, str, Provider, Optional[float], Dict[str, str]]:
    """One token for ``agent`` and ``secret`` with the policy flags in ``args``: (token, its
    id, the provider, its expiry, the secret's public parts). Shared by `token mint` and
    `run`. A secret that lacks a part its provider needs gets no token."""
    found = store.get_secret(secret)
    if found is None:
        raise ConfigError(f"no secret named {secret!r} in {os.path.abspath(store.path)}"
                          + did_you_mean(secret, (n for n, *_ in store.list_secrets())))
    provider_name = found[0]
    provider = providers.get(provider_name)
    if provider is None:
        raise ConfigError(f"secret {secret!r} is for provider {provider_name!r}, which is not "
                          f"configured")
    if not NAME_RE.match(agent):
        raise UsageError("agent names are 1-64 letters, digits, '.', '_' or '-'")
    label = args.label if args.label is not None else default_label
    if label is not None and (len(label) > 200 or not label.isprintable()):
        raise UsageError("--label is at most 200 printable characters")
    ttl = parse_ttl(args.ttl) if args.ttl else default_ttl
    expires = time.time() + ttl if ttl else None
    policy = make_policy(args.allow_method, args.allow_path, args.rate, args.max_requests,
                         args.models, args.budget_tokens, getattr(args, "budget_usd", None))
    flags = {name: getattr(args, flag, None) for name, flag in (       # `run` has no decoys
        ("decoy", "decoy"), ("on_tripwire", "on_tripwire"), ("on_leak", "on_leak"),
        ("delegation", "allow_delegation"))}
    if flags["on_tripwire"] and not flags["decoy"]:
        raise UsageError("--on-tripwire goes with --decoy")
    if flags["delegation"] and flags["decoy"]:
        raise UsageError("a --decoy token cannot delegate")
    policy.update((name, value) for name, value in flags.items() if value)
    if provider.usage == "bedrock" and "budget_nusd" in policy:
        raise UsageError("--budget-usd does not apply to aws yet ([prices] keys cannot hold "
                         "the ':' of Bedrock model ids); --budget-tokens and --models do")
    if not provider.usage and ("models" in policy or budget_key(policy)):
        raise UsageError(f"--models, --budget-tokens and --budget-usd apply to LLM providers "
                         f"(those with 'usage' set); {provider.name} has none")
    parts = secret_parts(SecretCipher(master).decrypt(found[1], secret_ad(secret,
                                                                          provider_name)))
    problem = part_problem(parts, provider)
    if problem:
        raise ConfigError(f"secret {secret!r} cannot be used: {problem}. Give it the parts "
                          f"with: printf '%s' '{{\"part\": \"value\", ...}}' | {prog()} secret "
                          f"rotate {secret}")
    if store.add_agent(agent, exist_ok=True):
        print(f"created agent {agent}", file=sys.stderr)
    token = new_token(provider, parts.get("key", "") if provider.token_shape else "")
    token_id = new_token_id()
    store.add_token(token_id, token_digest(token), secret, provider_name, agent, expires,
                    policy, label)
    return token, token_id, provider, expires, {n: parts[n] for n in provider.public
                                                if n in parts}


def print_records(as_json: bool, records: List[Dict[str, Any]], headers: Optional[List[str]],
                  row: Callable[[Dict[str, Any]], List[Any]]) -> None:
    """A list command's output: its records as JSON lines with --json, else a table with one
    ``row(record)`` under ``headers`` per record (without headers, more rows of a table
    already shown: `audit --follow`)."""
    if as_json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
    elif headers:
        print_table(headers, [row(r) for r in records])
    else:
        for record in records:
            print("  ".join(terminal_text(c) for c in row(record)))


def cmd_token(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
              providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    now = time.time()
    if args.action == "mint":
        token, token_id, provider, expires, public = mint_token(
            store, master, providers, args.secret, args.agent, args)
        meta = {"token_id": token_id, "agent": args.agent, "provider": provider.name,
                "expires_at": expires}
        text = handoff_text(args.format, env_vars(provider, token, settings.agent_url(),
                                                  public), token, meta)
        print(f"minted {token_id} for agent {args.agent} ({provider.name}, secret "
              f"{args.secret}, expires {utc_iso(expires) if expires else 'never'})",
              file=sys.stderr)
        if args.out:
            write_private(args.out, text)
            print(f"wrote {args.out} (mode 0600: it is a credential"
                  + (f"; load it with: . {args.out}" if args.format == "shell" else "") + ")",
                  file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if args.action == "list":
        tokens = [dict(t, state=token_state(t, now)) for t in store.list_tokens()
                  if not args.agent or t["agent"] == args.agent]
        tokens = [t for t in tokens if not args.status or t["state"] == args.status]
        print_records(args.json, tokens, ["ID", "AGENT", "PROVIDER", "SECRET", "LABEL", "CREATED",
                                          "EXPIRES", "STATUS", "REQUESTS", "TOKENS", "BUDGET",
                                          "POLICY"], lambda t: [
            t["id"], t["agent"], t["provider"], t["secret"], t["label"] or "-", t["created_at"],
            utc_iso(t["expires_at"]) if t["expires_at"] else "never", t["state"], t["requests"],
            t["tokens_used"], budget_text(t),
            describe_policy(t["policy"]) + (f" parent={t['parent']}" if t["parent"] else "")])
        return 0
    if args.action == "revoke":
        value = args.token_or_id.strip()
        if value == "-":
            value = sys.stdin.read().strip()
        if re.match(r"^(tok_)?[0-9a-f]{12}\Z", value):
            token_id, earlier = store.revoke_token(None, "tok_" + value[-12:])
        else:
            token_id, earlier = store.revoke_token(token_digest(value), None)
        print(f"{token_id} was already revoked at {earlier}" if earlier else
              f"revoked {token_id}", file=sys.stderr)
        return 0
    before = now - (parse_ttl(args.older_than) if args.older_than else 0)
    count = store.prune_tokens(before)
    print(f"deleted {count} revoked or expired token(s)"
          + (f" that ended before {utc_iso(before)}" if args.older_than else "")
          + "; their audit rows stay", file=sys.stderr)
    return 0


def cmd_providers(args: argparse.Namespace, providers: Dict[str, Provider]) -> int:
    def place(p: CredentialPlace) -> str:
        value = "" if p.value == "{key}" else p.value
        return f"{p.kind} {p.name} {' '.join(p.prefixes)} {value}".replace("  ", " ").strip()
    rows = [{"name": provider.name, "routes": ["/" + provider.name] + [
        "/" + a for a in provider.aliases], "upstream": provider.upstream,
        "token_places": [place(p) for p in provider.token_places],
        "inject": "; ".join(place(p) for p in (provider.inject,) + provider.also)
        if provider.inject else "same place", "llm_usage": provider.usage or None,
        "env": [name for name, _ in env_vars(provider, "", "")],
        "parts": [n + "?" * (n in provider.optional) for n in provider.parts]}
        for provider in sorted(providers.values(), key=lambda p: p.name)]
    print_records(args.json, rows, ["PROVIDER", "ROUTES", "UPSTREAM", "TOKEN FROM", "REAL KEY TO",
                                    "PARTS", "SDK VARIABLES"], lambda r: [
        r["name"], " ".join(r["routes"]), r["upstream"], "; ".join(r["token_places"]),
        r["inject"], " ".join(r["parts"]), " ".join(r["env"])])
    return 0


def cmd_backup(path: str, store: Store, db_path: str) -> int:
    """Online, consistent copy through sqlite's backup API, created 0600; never overwrites."""
    try:                                          # O_EXCL: not even through a dangling link
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise ConfigError(f"{path} exists; choose a new file name") from None
    try:
        progress = Progress("backing up", unit="pages")
        with contextlib.closing(sqlite3.connect(path)) as target, store.connection() as db:
            db.backup(target, pages=256, progress=lambda status, remaining, total: progress.add(
                total - remaining - progress.done, total))
        progress.end()
    except sqlite3.Error:
        os.unlink(path)
        raise
    print(f"backed up {db_path} to {path} (mode 0600). The master key is not in the backup: "
          f"keep {db_path}.key or SEKS_MASTER_KEY safe separately.", file=sys.stderr)
    return 0


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
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cmd_rotate_master_key(args: argparse.Namespace, store: Store, master: bytes,
                          settings: Settings, providers: Dict[str, Provider],
                          environ: Dict[str, str]) -> int:
    """New master key: secrets re-encrypted and the audit chain re-keyed in one transaction.
    With a key file, the new key is written to ``<db>.key.new`` first and renamed over the old
    one only after the commit; a run that dies before the commit leaves the old state intact,
    and one that dies after it is finished by the next command (the DB tells which key it
    wants). One rotation at a time: a second one is refused while the first runs."""
    key_path = settings.db + ".key"
    with contextlib.closing(rotation_lock(settings.db)):
        old_key = load_master_key(settings.db, environ, store)
        from_env = bool(environ.get("SEKS_MASTER_KEY", "").strip())
        if from_env:
            text = read_secret_value("", "New master key (urlsafe base64 of 32 bytes, hidden): ")
            new_key = decode_master_key(text, "the new key on stdin")
        else:
            new_key = secrets.token_bytes(32)
        if hmac.compare_digest(new_key, old_key):
            raise ConfigError("the new master key equals the old one")
        old, new = KeyRing(old_key), KeyRing(new_key)
        ok, message = verify_audit_chain(old.audit, store.audit_rows(), store.audit_anchor())
        if not ok and not args.force:
            raise ConfigError(f"audit chain does not verify ({message}); re-keying would hide "
                              f"that. Investigate, or pass --force")
        pending = key_path + ".new"
        if not from_env:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pending)
            write_key_file(pending, new_key)
        progress = Progress("re-keying", store.counts(time.time())["audit_rows"]
                            + len(store.list_secrets()))
        count = store.rekey(old.cipher, new.cipher, old.audit, new.audit, new.check,
                            force=args.force, progress=progress.add)
        progress.end()
        if from_env:
            print(f"re-encrypted {count} secret(s); set SEKS_MASTER_KEY to the new key and restart "
                  f"running brokers now (until then they answer 503)", file=sys.stderr)
        else:
            with contextlib.suppress(FileNotFoundError):   # a running broker renamed it first
                os.replace(pending, key_path)
            fsync_directory(key_path)
            print(f"re-encrypted {count} secret(s) under a new key in {key_path}; running brokers "
                  f"load it on their next request", file=sys.stderr)
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
    if n < 1024:
        return f"{n} B"
    power = min((int(n).bit_length() - 1) // 10, 3)    # 1024 ** power <= n: KB, MB or GB
    return f"{n / 1024 ** power:.1f} {('KB', 'MB', 'GB')[power - 1]}"


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
    for column in ("agent", "provider"):         # fixed names; the values are bound
        if getattr(args, column, None):
            clauses.append(f"{column} = ?")
            params.append(getattr(args, column))
    if getattr(args, "since", None):
        clauses.append("ts >= ?")
        params.append(parse_since(args.since))
    status = getattr(args, "status", None)
    if status:
        code = status.strip().lower()
        if not re.fullmatch(r"[1-5]xx|[0-9]{3}", code):
            raise UsageError("--status takes a code (404) or a class (4xx)")
        low = int(code.replace("x", "0"))            # 4xx: 400 to 499; 404: 404 alone
        clauses.append("status >= ? AND status < ?")
        params += [low, low + (100 if code.endswith("xx") else 1)]
    return " AND ".join(clauses), tuple(params)


def print_audit(rows: List[AuditRow], as_json: bool, header: bool = True) -> None:
    headers = ["ID", "TIME", "AGENT", "TOKEN", "PROVIDER", "MODEL", "METHOD", "PATH", "STATUS",
               "IN", "OUT", "DURATION", "OUTCOME"]
    print_records(as_json, [dict(zip(r.FIELDS, r.values())) for r in rows],
                  headers if header else None, lambda r: [
        r["id"], r["ts"], r["agent"] or "-", r["token_id"] or "-", r["provider"] or "-",
        (r["model"] or "-")[:40], r["method"] or "-", (r["path"] or "-")[:60], r["status"] or "-",
        human_size(r["bytes_in"]), human_size(r["bytes_out"]), human_duration(r["duration_ms"]),
        r["outcome"] + (f": {r['reason']}" if r["reason"] and r["outcome"] != "ok" else "")])
    sys.stdout.flush()


def cmd_agent(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
              providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    if args.action == "add":
        if not NAME_RE.match(args.name):
            raise UsageError("agent names are 1-64 letters, digits, '.', '_' or '-'")
        store.add_agent(args.name)
        print(f"added agent {args.name}", file=sys.stderr)
    elif args.action in ("disable", "enable"):
        store.set_agent_disabled(args.name, args.action == "disable")
        print(f"{args.action}d agent {args.name}", file=sys.stderr)
    elif args.action == "rm":
        gone = store.remove_agent(args.name, args.force)
        print(f"removed agent {args.name} and its {gone} token(s); its audit rows stay",
              file=sys.stderr)
    else:
        rows = [[n, c, "disabled" if d else "enabled", t] for n, c, d, t in store.list_agents()]
        print_table(["NAME", "CREATED", "STATE", "LIVE TOKENS"], rows)
    return 0


def cmd_audit(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
              providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    key, keys_check = derive_key(master, "audit"), derive_key(master, "key-check")
    if args.action == "verify":
        rows = store.audit_rows()
        progress = Progress("verifying", len(rows))
        ok, message = verify_audit_chain(key, rows, store.audit_anchor(), progress.add)
        progress.end()
        head = rows[-1] if rows else None
        store.record_verify({"at": utc_iso(), "ok": ok, "message": message, "rows": len(rows),
                             "head_id": head.id if head else None,
                             "head_mac": head.mac.hex()[:32] if head else None})
        print(message)
        if ok and head:
            print(f"head: row {head.id} mac {head.mac.hex()[:32]} (keep it elsewhere to "
                  f"detect a truncated tail later)")
        return 0 if ok else 1
    if args.action == "prune":
        progress = Progress("pruning")
        deleted = store.prune_audit(key, parse_since(args.before), keys_check, progress.add)
        progress.end()
        print(f"pruned {deleted} row(s); the chain still verifies from the prune record")
        return 0
    where, params = audit_filter(args)
    follow = getattr(args, "follow", False)
    # --follow reads the newest id before the page: a row written in between is printed next
    last = store.last_audit_id() if follow else 0
    rows = store.audit_rows(where, params, limit=getattr(args, "limit", 100))
    as_json = getattr(args, "json", False)
    print_audit(rows, as_json)
    if not follow:
        return 0
    last = rows[-1].id if rows else last
    try:
        while True:
            time.sleep(0.5)
            fresh = store.audit_rows(where, params, after_id=last)
            print_audit(fresh, as_json, header=False)
            last = fresh[-1].id if fresh else last
    except KeyboardInterrupt:
        return 0


def cmd_usage(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
              providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    """Requests and LLM tokens from the audit log, and their cost where [prices] prices the
    model (cached input counted at the input price: the audit row does not keep the cached
    share). UNMETERED counts LLM answers that reported no usage (an OpenAI stream not asked
    for it): their tokens are not in the totals."""
    llm = {p.name for p in providers.values() if p.usage}
    records = []
    for agent, provider, model, count, tin, tout, unmetered in store.usage_rows(
            *audit_filter(args)):
        price = settings.prices.get((model or "").lower())
        records.append({"agent": agent, "provider": provider, "model": model or None,
                        "requests": count, "tokens_in": tin, "tokens_out": tout,
                        "tokens": tin + tout, "unmetered": unmetered if provider in llm else None,
                        "cost_usd": None if price is None else usage_cost(price, tin, tout) / 1e9})
    print_records(args.json, records, ["AGENT", "PROVIDER", "MODEL", "REQUESTS", "TOKENS IN",
                                       "TOKENS OUT", "TOTAL", "COST (USD)",
                                       "UNMETERED"], lambda r: [
        r["agent"] or "-", r["provider"] or "-", r["model"] or "-", r["requests"],
        f"{r['tokens_in']:,}", f"{r['tokens_out']:,}", f"{r['tokens']:,}",
        "-" if r["cost_usd"] is None else f"{r['cost_usd']:,.4f}",
        "-" if r["unmetered"] is None else r["unmetered"]])
    return 0


def cmd_status(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
               providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    """One screen for the operator; every figure comes from the same tables `audit`,
    `usage` and `token list` read."""
    now = time.time()
    url = (args.url or settings.agent_url()).rstrip("/")
    health = probe_broker(url, "/healthz", timeout=1.0)
    tokens = [dict(t, state=token_state(t, now)) for t in store.list_tokens()]
    agents = [{"name": name, "state": "disabled" if disabled else "enabled", "live_tokens": sum(
        1 for t in tokens if t["agent"] == name and t["state"] == "active")}
        for name, _, disabled, _ in store.list_agents()]
    traffic = {label: dict(zip(("requests", "llm_tokens"), store.query(
        "SELECT COUNT(*), COALESCE(SUM(tokens_in), 0) + COALESCE(SUM(tokens_out), 0) FROM audit "
        "WHERE outcome NOT IN ('prune', 'introspect') AND ts >= ?", (utc_iso(now - seconds),))[0]))
        for label, seconds in (("last_hour", 3600), ("last_day", 86400))}
    low = [{"id": t["id"], "agent": t["agent"], "used": t[budget_counter(t["policy"])],
            "budget": t["policy"][budget_key(t["policy"])],
            "unit": "nano-usd" if budget_key(t["policy"]) == "budget_nusd" else "tokens"}
           for t in tokens if t["state"] == "active" and budget_key(t["policy"]) and
           t["policy"][budget_key(t["policy"])] - t[budget_counter(t["policy"])] <
           0.1 * t["policy"][budget_key(t["policy"])]]
    denials = [{"reason": reason or outcome, "count": count} for outcome, reason, count in
               store.query("SELECT outcome, COALESCE(reason, ''), COUNT(*) FROM audit "
                           "WHERE outcome = 'denied' AND ts >= ? GROUP BY outcome, reason "
                           "ORDER BY 3 DESC, 2", (utc_iso(now - 3600),))]
    head = store.query("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1")
    running, verify = health is not None and health[0] == 200, store.last_verify()
    audit = {"head_id": head[0][0] if head else None, "last_verify": verify,
             "head_mac": bytes(head[0][1]).hex()[:32] if head else None}
    if args.json:
        print(json.dumps({"database": os.path.abspath(settings.db), "agents": agents,
                          "broker": {"url": url, "running": running}, "traffic": traffic,
                          "budgets_low": low, "denials_last_hour": denials, "audit": audit},
                         sort_keys=True))
        return 0
    out = [f"database  {os.path.abspath(settings.db)}",
           f"broker    {url}: " + ("running" if running else
                                   "not answering (start it with: " + prog() + " serve)"),
           "agents    " + (", ".join(f"{a['name']} ({a['state']}, {a['live_tokens']} live "
                                     f"token(s))" for a in agents) or "none")] + [
        f"{label.replace('_', ' '):<9} {counts['requests']:,} request(s), "
        f"{counts['llm_tokens']:,} LLM token(s)" for label, counts in traffic.items()]
    out.append("budgets   " + ("; ".join(f"{b['id']} ({b['agent']}) " + (
        f"${b['used'] / 1e9:,.4f}/${b['budget'] / 1e9:,.2f}" if b["unit"] == "nano-usd" else
        f"{b['used']:,}/{b['budget']:,}") + " used" for b in low)
                               or "none below 10% left"))
    out.append("denials   " + ("; ".join(f"{d['count']} x {d['reason']}" for d in denials)
                               or "none in the last hour"))
    out.append(f"audit     head row {audit['head_id'] or '-'} mac {audit['head_mac'] or '-'}; "
               "last verify: " + (f"{'passed' if verify['ok'] else 'FAILED'} at {verify['at']} "
                                  f"({verify['message']})" if verify else
                                  f"never (run: {prog()} audit verify)"))
    print("\n".join(map(terminal_text, out)))
    return 0


def probe_broker(url: str, path: str, timeout: float) -> Optional[Tuple[int, bytes]]:
    """GET url+path: (status, body), or None if no HTTP server answers there. Loopback and
    operator-given addresses only."""
    try:
        with plain_opener().open(url + path, timeout=timeout) as answer:
            return answer.status, answer.read(65536)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError, http.client.HTTPException):
        return None


# Variables that commonly hold a provider's real key: `run` never passes them to its command.
KNOWN_KEY_VARS = frozenset("""
OPENAI_API_KEY OPENAI_ADMIN_KEY AZURE_OPENAI_API_KEY ANTHROPIC_API_KEY ANTHROPIC_AUTH_TOKEN
CLAUDE_API_KEY GEMINI_API_KEY GOOGLE_API_KEY GOOGLE_GENAI_API_KEY GROQ_API_KEY MISTRAL_API_KEY
COHERE_API_KEY CO_API_KEY XAI_API_KEY DEEPSEEK_API_KEY TOGETHER_API_KEY FIREWORKS_API_KEY
PERPLEXITY_API_KEY OPENROUTER_API_KEY HF_TOKEN HUGGING_FACE_HUB_TOKEN REPLICATE_API_TOKEN
DISCORD_TOKEN DISCORD_BOT_TOKEN TELEGRAM_BOT_TOKEN TELEGRAM_TOKEN GITHUB_TOKEN GH_TOKEN
GITHUB_PAT NOTION_TOKEN NOTION_API_KEY CLOUDFLARE_API_TOKEN CLOUDFLARE_API_KEY CF_API_TOKEN
BRAVE_API_KEY BRAVE_SEARCH_API_KEY AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN
SLACK_BOT_TOKEN SLACK_TOKEN STRIPE_API_KEY STRIPE_SECRET_KEY
""".split())


def child_environment(environ: Dict[str, str], variables: List[Tuple[str, str]],
                      real_values: List[Tuple[str, str]],
                      providers: Dict[str, Provider]) -> Tuple[Dict[str, str], List[str]]:
    """The command's environment: the operator's, minus every SEKS_* variable, every known
    provider key variable and every variable holding a stored secret's real value (in any
    form the scrubber masks: percent-encoded, escaped, a cut-off end), plus the
    SDK variables of the minted tokens. Returns it and a warning per variable removed."""
    key_vars = KNOWN_KEY_VARS.union(name for provider in providers.values() for name, value
                                    in env_vars(provider, "\0", "") if value == "\0")
    env, warnings = {}, []
    scrubbers = [(secret, Scrubber(scrub_pairs(real))) for secret, real in real_values
                 if len(real) >= 8]
    for name, value in environ.items():
        forms = [value.encode("utf-8", "surrogateescape")]   # the key, encoded or cut off too,
        if "\\u" in value:                                   # also inside JSON \u escapes
            forms.append(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)),
                                value).encode("utf-8", "surrogatepass"))
        for run in re.findall(r"[A-Za-z0-9+/]{12,}={0,2}", value):    # or base64 (Basic auth)
            with contextlib.suppress(binascii.Error, ValueError):
                forms.append(base64.b64decode(run + "=" * (-len(run) % 4)))
        holder = next((secret for secret, scrubber in scrubbers for raw in forms
                       if scrubber.scrub(raw) != raw), None)
        if holder is not None:
            warnings.append(f"removed {name}: it holds the real value of secret {holder}")
        elif name in key_vars and value.strip():
            warnings.append(f"removed {name}: a provider key variable (the command gets a "
                            f"seks token where it needs one)")
        elif name.startswith("SEKS_"):
            if name == "SEKS_MASTER_KEY":
                warnings.append("removed SEKS_MASTER_KEY (the broker's master key)")
        else:
            env[name] = value
    env.update(variables)
    return env, warnings


def child_identity(user: str, key_path: str) -> Dict[str, Any]:
    """Popen arguments that start the command as ``user`` (its own group, no others), with
    its HOME, USER and LOGNAME. Only root can switch; the key file must be closed to the user."""
    import pwd
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user {user}: no such user") from None
    if os.geteuid() != 0:
        raise UsageError(f"--user needs run to be started as root (it runs as uid "
                         f"{os.geteuid()}); or start the agent as another user yourself")
    if entry.pw_uid == 0:
        raise UsageError(f"--user {user} is root, who can read the key file; name another user")
    with contextlib.suppress(FileNotFoundError):
        info = os.stat(key_path)
        if info.st_uid == entry.pw_uid or info.st_mode & 0o077:
            raise ConfigError(f"{user} could read the key file {key_path}; it must be owned "
                              f"by another user, mode 0600")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}}


def same_user_warning(db: str, environ: Dict[str, str]) -> str:
    """What a command started as the operator can read that opens every stored key."""
    where = [f"{db}.key"] if os.access(db + ".key", os.R_OK) else []
    if environ.get("SEKS_MASTER_KEY", "").strip():
        where.append("this process's environment (SEKS_MASTER_KEY, in /proc)")
    if not where:
        return ""
    return (f"the command runs as you and can read the master key ({' and '.join(where)}), so "
            f"code it runs can decrypt {db}. run keeps real keys out of its environment, "
            f"output and prompts; to keep them from the agent's own code too, run it as "
            f"another user (--user, as root) or where those files are not")


def embedded_broker(settings: Settings, store: Store, master: bytes,
                    providers: Dict[str, Provider]) -> Tuple[str, Callable[[], None]]:
    """A broker for one `run`: in this process, on a free loopback port, logging problems
    only. Its URL, and what stops it (its audit rows written) when the command ends."""
    own = copy.copy(settings)
    own.host, own.port, own.workers, own.admin_port = "127.0.0.1", 0, 1, -1
    own.tls_cert = own.tls_key = own.public_url = ""
    own.log_level = "warning" if own.log_level in ("debug", "info") else own.log_level
    broker, servers, _ = open_broker(own, store, master, providers)
    threading.Thread(target=servers[0].serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()

    def stop() -> None:
        broker.draining = True
        broker.close(servers, None, min(own.grace, 5.0), threading.Event())
    return f"http://127.0.0.1:{servers[0].server_address[1]}", stop


def cmd_run(args: argparse.Namespace, store: Store, master: bytes, settings: Settings,
            providers: Dict[str, Provider], environ: Dict[str, str]) -> int:
    """Mint a short-lived token per secret, start the command with the SDK variables (and
    no real key) in its environment, pass signals on, revoke the tokens when it ends, and
    return its exit code."""
    import subprocess
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise UsageError(f"run needs a command after '--', e.g. {prog()} run --agent bot "
                         f"--secret openai-main -- python3 agent.py")
    identity = child_identity(args.user, settings.db + ".key") if args.user else {}
    cipher, real_values = SecretCipher(master), []
    for name, provider_name, ciphertext in store.query("SELECT name, provider, ciphertext "
                                                       "FROM secrets ORDER BY name"):
        parts = secret_parts(cipher.decrypt(ciphertext, secret_ad(name, provider_name)))
        public = providers[provider_name].public if provider_name in providers else ()
        real_values += [(name, v) for n, v in parts.items() if n not in public]
    minted: List[Tuple[str, str, Provider, Dict[str, str]]] = []
    stop_broker: Optional[Callable[[], None]] = None
    try:
        for secret in args.secret:
            token, token_id, provider, _, public = mint_token(
                store, master, providers, secret, args.agent, args, 86400, "seks run")
            minted.append((token, token_id, provider, public))     # revoked at the end
            if [p.name for _, _, p, _ in minted].count(provider.name) > 1:
                raise UsageError(f"two secrets for {provider.name}: its SDK reads one key "
                                 f"variable; run with one of them")
        url = (args.url or settings.agent_url()).rstrip("/")
        probe = probe_broker(url, "/seks/v1/token?digest=" + token_digest(minted[0][0]).hex(),
                             timeout=2.0)
        answer = json_value(probe[1]) if probe is not None and probe[0] == 200 else None
        if isinstance(answer, dict) and answer.get("token_id") == minted[0][1]:
            sys.stderr.write(f"seks run: using the broker at {url}\n")
        elif args.url:
            raise ConfigError(f"no broker serving {os.path.abspath(settings.db)} answers at "
                              f"{url}")
        else:
            url, stop_broker = embedded_broker(settings, store, master, providers)
            sys.stderr.write(f"seks run: started a broker for this command on {url}"
                             + (f" (what answers at {settings.agent_url()} is not a broker "
                                f"serving this database)" if probe is not None else "") + "\n")
        variables = [pair for token, _, provider, public in minted
                     for pair in env_vars(provider, token, url, public)]
        env, warnings = child_environment(environ, variables, real_values, providers)
        env.update(identity.pop("env", {}))
        exposed = "" if identity else same_user_warning(settings.db, environ)
        for warning in warnings + ([exposed] if exposed else []):
            sys.stderr.write(f"seks run: warning: {warning}\n")
        try:
            child = subprocess.Popen(command, env=env, **identity)
        except OSError as exc:
            raise ConfigError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
        return wait_forwarding_signals(child, settings.grace)
    finally:
        if stop_broker is not None:
            stop_broker()                         # its in-flight rows are written first
        for _, token_id, _, _ in minted:
            with contextlib.suppress(ConfigError, sqlite3.Error):
                store.revoke_token(None, token_id)
        if minted:
            sys.stderr.write(run_summary(store, [token_id for _, token_id, _, _ in minted]) + "\n")


def wait_forwarding_signals(child: Any, grace: float) -> int:
    """Wait for the child; SIGTERM, SIGHUP and SIGINT sent to `run` go to it (SIGINT not when
    `run` is in the terminal's foreground: the terminal already sent it to the child). After
    a SIGTERM the child has ``grace`` seconds, then it is killed. Returns its exit code (128+N
    if a signal N ended it, as shells report it)."""
    deadline = float("inf")                 # a SIGTERM or SIGHUP starts the grace period

    def relay(signum: int, frame: Any) -> None:
        nonlocal deadline
        with contextlib.suppress(OSError, AttributeError, ValueError):   # no terminal
            if signum == signal.SIGINT and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp():
                return
        with contextlib.suppress(OSError):
            child.send_signal(signum)
        if signum in (signal.SIGTERM, signal.SIGHUP):
            deadline = min(deadline, time.monotonic() + grace)

    previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGTERM, signal.SIGINT,
                                                           signal.SIGHUP)}
    try:
        while child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = child.returncode
    return 128 - code if code < 0 else code


def run_summary(store: Store, token_ids: List[str]) -> str:
    per_provider = (
        f"SELECT provider, COUNT(*), COALESCE(SUM(tokens_in), 0) + COALESCE(SUM(tokens_out), "
        f"0), SUM(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) FROM audit WHERE outcome != "
        f"'introspect' AND token_id IN ({', '.join('?' * len(token_ids))}) GROUP BY provider "
        f"ORDER BY provider")
    deadline = time.monotonic() + 1.0         # an external broker may still write the last row
    per = store.query(per_provider, tuple(token_ids))
    while time.monotonic() < deadline:
        time.sleep(0.2)
        settled, per = per, store.query(per_provider, tuple(token_ids))
        if per == settled:
            break
    total = sum(r[1] for r in per)
    parts = ", ".join(f"{p}: {n} request(s), {t:,} LLM token(s), {d} denied"
                      for p, n, t, d in per) or "no requests"
    return (f"seks run: {total} request(s) ({parts}); {len(token_ids)} token(s) revoked")


def main(argv: Optional[List[str]] = None) -> int:
    os.umask(0o077)             # DB, WAL, SHM and key files are created private
    disable_core_dumps()        # every command may hold a decrypted key (serve, token mint, ...)
    parser, leaves = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments:
        parser.print_help(sys.stderr)
        return 2
    args, extra = parser.parse_known_args(arguments)
    if extra:
        here = " ".join(x for x in (args.command, getattr(args, "action", None)) if x)
        if here in ("secret add", "secret rotate") and not extra[0].startswith("-"):
            args.value = extra[0]            # refused below with a how-to, never echoed
        else:
            leaf = leaves.get(here, parser)
            leaf.print_usage(sys.stderr)
            sys.stderr.write(f"{leaf.prog}: error: {misplaced_flags(extra, leaves, here)}\n"
                             f"(see: {leaf.prog} --help)\n")
            return 2
    try:
        return run_command(args, dict(os.environ), arguments)
    except ConfigError as exc:
        sys.stderr.write("error: " + "\n".join(map(redact, str(exc).split("\n"))) + "\n")
        return 2 if isinstance(exc, UsageError) else 1
    except sqlite3.Error as exc:
        sys.stderr.write(f"error: database {args.db or ''}: {exc}\n".replace("  ", " "))
        return 1
    except OSError as exc:                    # e.g. a file is unreadable
        sys.stderr.write(f"error: {redact(str(exc))}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
