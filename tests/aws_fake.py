"""A fake AWS upstream's half of the tests: an independent SigV4 verifier and event-stream encoder.

Written from AWS's published rules, sharing no code with seks_broker.py, so that a request the
broker re-signed is checked the way AWS itself would check it:

  verify_sigv4(...)              -> None if the Authorization header is a valid AWS4-HMAC-SHA256
                                    signature by key_id/secret, else a short reason
  event_stream_message(h, p)     -> one binary application/vnd.amazon.eventstream message
  converse_stream_events(t, u)   -> the messages Bedrock's ConverseStream sends for one reply

Standard library only; Python 3.9+.
"""

from __future__ import annotations

import binascii
import calendar
import hashlib
import hmac
import json
import re
import struct
import time
import urllib.parse
from typing import Dict, List, Optional, Sequence, Tuple

_ALGORITHM = "AWS4-HMAC-SHA256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_SKEW = 15 * 60                     # AWS refuses requests dated more than 15 minutes away


def _parse_authorization(value: str) -> Optional[Dict[str, str]]:
    """'AWS4-HMAC-SHA256 Credential=.., SignedHeaders=.., Signature=..' -> its three fields."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != _ALGORITHM:
        return None
    fields = {}
    for part in rest.split(","):
        name, eq, val = part.strip().partition("=")
        if eq:
            fields[name] = val
    return fields if {"Credential", "SignedHeaders", "Signature"} <= set(fields) else None


def _canonical_query(query: str) -> str:
    """Each name and value decoded once, re-encoded per RFC 3986 (%20, not +), then sorted."""
    pairs = []
    for item in query.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append(tuple(urllib.parse.quote(urllib.parse.unquote(s), safe="-_.~") for s in (name, value)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _canonical_header_value(values: Sequence[str]) -> str:
    """Values trimmed, inner runs of whitespace collapsed to one space, repeats joined with ','."""
    return ",".join(" ".join(v.split()) for v in values)


def _signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for step in (day, region, service, "aws4_request"):
        key = hmac.new(key, step.encode(), hashlib.sha256).digest()
    return key


def verify_sigv4(method: str, target: str, headers: List[Tuple[str, str]], body: Optional[bytes],
                 key_id: str, secret: str, session_token: Optional[str] = None) -> Optional[str]:
    """Check a request's SigV4 Authorization header as AWS would; None when valid, else why not.

    `target` is the request-target as received (path?query, still percent-encoded), `headers`
    every header as received (Host included: the signature must be for the host actually
    connected to). `body` is the raw body, or None when it is not at hand (then a hex
    x-amz-content-sha256 is taken on trust). A STREAMING-* or UNSIGNED-PAYLOAD payload hash is used
    as is in the canonical request; aws-chunked chunk signatures are not checked.

    Also refused, as AWS refuses them: host or x-amz-date unsigned, a date more than 15 minutes
    away, an x-amz-security-token other than `session_token` (or any, when None is expected) or
    unsigned, and for S3 a missing x-amz-content-sha256 or any x-amz-* header left unsigned.
    """
    received: Dict[str, List[str]] = {}
    for name, value in headers:
        received.setdefault(name.lower(), []).append(value)
    auth = _parse_authorization(_canonical_header_value(received.get("authorization", [""])))
    if auth is None:
        return "no AWS4-HMAC-SHA256 Authorization header"
    scope = auth["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        return "malformed credential scope"
    cred_key, day, region, service = scope[:4]
    if not hmac.compare_digest(cred_key.encode(), key_id.encode()):
        return "wrong access key id"
    signed = auth["SignedHeaders"].split(";")
    if signed != sorted(set(signed)) or any(n != n.lower() for n in signed):
        return "SignedHeaders not lowercase, sorted and unique"
    for required in ("host", "x-amz-date"):
        if required not in signed:
            return f"{required} is not signed"
    missing = [n for n in signed if n not in received]
    if missing:
        return f"signed header {missing[0]} is missing"
    unsigned = sorted(n for n in received if n.startswith("x-amz-") and n not in signed)
    if service == "s3" and unsigned:            # S3 answers these with AccessDenied (HeadersNotSigned)
        return f"{unsigned[0]} is present but not signed"

    amz_date = received["x-amz-date"][0]
    try:
        when = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return "malformed x-amz-date"
    if amz_date[:8] != day:
        return "x-amz-date is not the credential scope's day"
    if abs(when - time.time()) > _MAX_SKEW:
        return "x-amz-date is more than 15 minutes away"

    token = received.get("x-amz-security-token")
    if session_token is not None:
        if token != [session_token]:
            return "wrong or missing x-amz-security-token"
        if "x-amz-security-token" not in signed:
            return "x-amz-security-token is not signed"
    elif token is not None:
        return "unexpected x-amz-security-token"

    declared = received.get("x-amz-content-sha256", [None])[0]
    if declared is None:
        if service == "s3":
            return "x-amz-content-sha256 is missing"
        if body is None:
            return "no payload hash and no body"
        payload_hash = hashlib.sha256(body).hexdigest()
    elif _HEX64.fullmatch(declared):
        if body is not None and hashlib.sha256(body).hexdigest() != declared:
            return "x-amz-content-sha256 does not match the body"
        payload_hash = declared
    elif declared == "UNSIGNED-PAYLOAD" or declared.startswith("STREAMING-"):
        payload_hash = declared
    else:
        return "malformed x-amz-content-sha256"

    path, _, query = target.partition("?")
    # S3 signs the path as sent; every other service signs it percent-encoded once more.
    uri = path if service == "s3" else urllib.parse.quote(path, safe="/~")
    canonical = "\n".join([
        method.upper(), uri, _canonical_query(query),
        "".join(f"{n}:{_canonical_header_value(received[n])}\n" for n in signed),
        ";".join(signed), payload_hash])
    to_sign = "\n".join([_ALGORITHM, amz_date, "/".join(scope[1:]), hashlib.sha256(canonical.encode()).hexdigest()])
    expected = hmac.new(_signing_key(secret, day, region, service), to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), auth["Signature"].encode()):
        return "signature does not match"
    return None


# ============================================================================
# application/vnd.amazon.eventstream (Bedrock's ConverseStream / InvokeModelWithResponseStream)
# ============================================================================

def event_stream_message(headers: Dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32 of those 8 bytes),
    headers (1-byte name length, name, type 7 = string, 2-byte value length, value), payload,
    then the CRC32 of everything before it. All integers big-endian."""
    encoded = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        encoded += struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def _event(event_type: str, body: dict) -> bytes:
    return event_stream_message({":event-type": event_type, ":content-type": "application/json",
                                 ":message-type": "event"}, json.dumps(body).encode())


def converse_stream_events(text: str, usage: Dict[str, int]) -> List[bytes]:
    """The messages of a ConverseStream answer that says `text` (in two deltas when it can):
    messageStart, contentBlockDelta..., contentBlockStop, messageStop, metadata."""
    half = max(1, len(text) // 2)
    pieces = [p for p in (text[:half], text[half:]) if p] or [""]
    return ([_event("messageStart", {"role": "assistant"})]
            + [_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": p}}) for p in pieces]
            + [_event("contentBlockStop", {"contentBlockIndex": 0}),
               _event("messageStop", {"stopReason": "end_turn"}),
               _event("metadata", {"usage": dict(usage), "metrics": {"latencyMs": 1}})])
