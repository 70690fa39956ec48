"""AWS through the broker (issue 15): SigV4 re-signing pinned by published vectors, routes that can
only reach <service>.<region>.amazonaws.com, and, over real sockets, a loopback upstream that
verifies every signature with the real credentials (tests/aws_fake.py, an independent
implementation) answering Bedrock and S3 requests."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import load_broker_module

sb = load_broker_module()
SUITE = json.loads((Path(__file__).parent / "vectors" / "sigv4_suite.json").read_text(encoding="utf-8"))
# The broker refuses paths with dot segments or empty segments (validate_path) before any
# signing, so the suite's path-normalisation cases never reach the signer; "after" adds the
# session token after signing, which the broker never does.
NOT_SIGNED_HERE = {"get-relative", "get-relative-relative", "get-slash", "get-slash-dot-slash",
                   "get-slash-pointless-dot", "get-slashes", "post-sts-header-after"}
CASES = [c for c in SUITE["cases"] if c["name"] not in NOT_SIGNED_HERE]


# ============================================================================
# Signature Version 4, pinned by AWS's test suite and the S3 documentation's examples
# ============================================================================

@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sigv4_matches_the_aws_test_suite(case: Dict) -> None:
    headers: List[Tuple[str, str]] = [(n, v) for n, v in case["headers"]]
    if case["name"] == "get-vanilla-with-session-token":
        headers.append(("X-Amz-Security-Token", SUITE["session_token"]))
    payload = hashlib.sha256(case["body"].encode()).hexdigest()
    uri = sb.aws_quote(case["path"], "/")                  # the suite's paths are not yet encoded
    canonical, signed = sb.sigv4_request(case["method"], uri, case["query"], headers, payload)
    assert canonical == case["canonical_request"], canonical
    amz_date = dict((n.lower(), v) for n, v in headers)["x-amz-date"]
    auth = sb.sigv4_authorization(SUITE["key_id"], SUITE["secret"], SUITE["region"], SUITE["service"],
                                  amz_date, canonical, signed)
    assert auth == case["authorization"]


def test_the_suite_is_all_there() -> None:
    assert len(CASES) == 27 and {"get-vanilla", "get-vanilla-query-order-key-case", "get-unreserved",
                                 "get-header-key-duplicate", "post-x-www-form-urlencoded"} <= {c["name"] for c in CASES}


# AWS's own documented example credentials (they sign the published vectors below; no account has them)
S3_KEY_ID, S3_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("method, path, query, headers, payload, signature", [
    # the S3 API reference's "Signature Calculations for the Authorization Header" examples
    ("GET", "/test.txt", "", [("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9"),
                              ("x-amz-content-sha256", EMPTY), ("x-amz-date", "20130524T000000Z")], EMPTY,
     "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
    ("PUT", "/test%24file.text", "", [("Host", "examplebucket.s3.amazonaws.com"), ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
                                      ("x-amz-date", "20130524T000000Z"), ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
                                      ("x-amz-content-sha256", "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072")],
     "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
     "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
    ("GET", "/", "lifecycle", [("Host", "examplebucket.s3.amazonaws.com"), ("x-amz-date", "20130524T000000Z"),
                               ("x-amz-content-sha256", EMPTY)], EMPTY,
     "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    ("GET", "/", "max-keys=2&prefix=J", [("Host", "examplebucket.s3.amazonaws.com"), ("x-amz-date", "20130524T000000Z"),
                                         ("x-amz-content-sha256", EMPTY)], EMPTY,
     "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    ("PUT", "/big%20file.bin", "",                       # UNSIGNED-PAYLOAD, as botocore 1.44 signs it
     [("Host", "examplebucket.s3.amazonaws.com"), ("Content-Type", "application/octet-stream"),
      ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"), ("x-amz-date", "20130524T000000Z")], "UNSIGNED-PAYLOAD",
     "a296cb9d61264bbd2d651cfcf85d0a093ddccb78a76101514645111089c959e3"),
    ("PUT", "/examplebucket/chunkObject.txt", "",       # the aws-chunked example's seed signature
     [("Host", "s3.amazonaws.com"), ("x-amz-date", "20130524T000000Z"), ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
      ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"), ("Content-Encoding", "aws-chunked"),
      ("x-amz-decoded-content-length", "66560"), ("Content-Length", "66824")],
     "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"),
])
def test_sigv4_matches_the_s3_documentation(method: str, path: str, query: str, headers: list, payload: str,
                                            signature: str) -> None:
    canonical, signed = sb.sigv4_request(method, path, query, headers, payload)
    auth = sb.sigv4_authorization(S3_KEY_ID, S3_SECRET, "us-east-1", "s3", "20130524T000000Z", canonical, signed)
    assert auth.endswith("Signature=" + signature), (canonical, auth)


def test_a_tampered_request_or_key_changes_the_signature() -> None:
    headers = [("Host", "examplebucket.s3.amazonaws.com"), ("x-amz-date", "20130524T000000Z"), ("x-amz-content-sha256", EMPTY)]
    good = sb.sigv4_authorization(S3_KEY_ID, S3_SECRET, "us-east-1", "s3", "20130524T000000Z",
                                  *sb.sigv4_request("GET", "/test.txt", "", headers, EMPTY))
    for method, path, query, secret, region in (("PUT", "/test.txt", "", S3_SECRET, "us-east-1"),
                                                ("GET", "/test.txu", "", S3_SECRET, "us-east-1"),
                                                ("GET", "/test.txt", "a=b", S3_SECRET, "us-east-1"),
                                                ("GET", "/test.txt", "", S3_SECRET + "x", "us-east-1"),
                                                ("GET", "/test.txt", "", S3_SECRET, "us-east-2")):
        other = sb.sigv4_authorization(S3_KEY_ID, secret, region, "s3", "20130524T000000Z",
                                       *sb.sigv4_request(method, path, query, headers, EMPTY))
        assert other.rsplit("=", 1)[1] != good.rsplit("=", 1)[1]


def test_aws_sign_signs_for_the_host_it_connects_to_and_encodes_twice_outside_s3() -> None:
    parts = {"access_key_id": "AKIDEXAMPLE", "secret_access_key": "test-secret-0123456789", "session_token": "test-session-tok"}
    target = sb.Target("http", "127.0.0.1", 9000, True, "/model/anthropic.claude-v2%3A1/converse?x=1")
    headers = sb.aws_sign("POST", target, [("Content-Type", "application/json"), ("Accept", "*/*")], EMPTY, parts,
                          "us-east-1", "bedrock-runtime", 1440938160.0)
    got = dict((n.lower(), v) for n, v in headers)
    assert "host" not in got and got["x-amz-date"] == "20150830T123600Z"      # the forwarder sets Host
    headers = headers + [("Host", "127.0.0.1:9000")]
    assert got["x-amz-security-token"] == "test-session-tok"
    assert "/20150830/us-east-1/bedrock/aws4_request" in got["authorization"]          # signing name
    assert "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token," in got["authorization"]
    canonical, _ = sb.sigv4_request("POST", "/model/anthropic.claude-v2%253A1/converse", "x=1",
                                    [(n, v) for n, v in headers if n.lower() in ("content-type", "host") or n.lower().startswith("x-amz-")],
                                    EMPTY)
    scope = "20150830/us-east-1/bedrock/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", "20150830T123600Z", scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = b"AWS4" + parts["secret_access_key"].encode()
    for step in ("20150830", "us-east-1", "bedrock", "aws4_request"):
        key = hmac.new(key, step.encode(), hashlib.sha256).digest()
    assert got["authorization"].endswith("Signature=" + hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest())


@pytest.mark.parametrize("rest, expected", [
    ("/s3/us-east-1/bucket/a/b.txt", ("s3", "us-east-1", "/bucket/a/b.txt")),
    ("/bedrock-runtime/eu-west-3/model/m%3A0/converse", ("bedrock-runtime", "eu-west-3", "/model/m%3A0/converse")),
    ("/sts/us-gov-west-1", ("sts", "us-gov-west-1", "/")),
])
def test_aws_routes(rest: str, expected: tuple) -> None:
    assert sb.aws_route(rest) == expected


@pytest.mark.parametrize("rest", ["/", "/s3", "/S3/us-east-1/b", "/s3/US-EAST-1/b", "/s3/us-east-1.evil.example/b",
                                  "/s3.evil.example/us-east-1/b", "/s3/us-east-1:443/b", "/s3@evil/us-east-1/b",
                                  "/s3/us-east-1%2Fevil/b", "/s3/localhost/b", "/s3/127.0.0.1/b", "/-s3/us-east-1/b"])
def test_a_forged_service_or_region_is_not_a_route(rest: str) -> None:
    with pytest.raises(sb.NotFound):
        sb.aws_route(rest)


def aws_decision(parts: dict, rest: str, query: str = "", body=None, fields=(), policy=None):
    facts = sb.RequestFacts("POST", "/x")
    facts.aws, facts.action, facts.reads = sb.aws_facts(rest, parts, query, body, list(fields))
    return sb.decide(policy or {}, facts)


def test_a_secret_narrows_services_and_regions() -> None:
    assert aws_decision({}, "/bedrock-runtime/ap-south-1/model/m/converse") is None
    assert isinstance(aws_decision({}, "/iam/us-east-1/"), sb.Forbidden)
    narrow = {"services": "s3", "regions": "eu-west-1, eu-central-1"}
    assert aws_decision(narrow, "/s3/eu-central-1/b/k") is None
    assert isinstance(aws_decision(narrow, "/s3/us-east-1/b/k"), sb.Forbidden)
    assert isinstance(aws_decision(narrow, "/bedrock-runtime/eu-west-1/model/m/converse"), sb.Forbidden)


@pytest.mark.parametrize("query, body, fields, allowed", [
    ("Action=GetCallerIdentity&Version=2011-06-15", None, (), True),
    ("", b"Action=GetCallerIdentity&Version=2011-06-15", (), True),
    ("Action=GetSessionToken", None, (), False),
    ("Action=GetCallerIdentity", b"Action=AssumeRole", (), False),        # named twice
    ("Action=GetCallerIdentity&%41ction=AssumeRole", None, (), False),     # the second name encoded
    ("", b"29;chunk-signature=0&Action=GetCallerIdentity&x\r\nAction=GetSessionToken&Version=2011-06-15"
         b"\r\n0\r\n\r\n", (("Content-Encoding", "aws-chunked"),), False),   # sent decoded
    ("Action=GetCallerIdentity", b"Action=AssumeRole", (("Content-Encoding", "gzip"),), False),
    ("Action=GetCallerIdentity", b"x", (("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),), False),
    ("Action=GetCallerIdentity", None, (("X-Amz-Target", "A.GetCallerIdentity"), ("X-Amz-Target", "A.AssumeRole")),
     False),                                                                 # a repeated target
    ("", b"", (), False),
    ("", iter([b"Action=GetCallerIdentity"]), (), False),                 # a streamed body
    ("Action=GetCallerIdentity", None, (("X-Amz-Target", "AWSSecurityTokenServiceV20110615.AssumeRole"),), False),
])
def test_the_sts_action_fact_is_get_caller_identity_or_nothing(query, body, fields, allowed) -> None:
    refusal = aws_decision({"services": "sts"}, "/sts/us-east-1/", query, body, fields)
    assert (refusal is None) == allowed, refusal


def test_a_copy_reads_within_the_token_paths_only() -> None:
    for source, allowed in (("/bucket/reports/q1.csv", True), ("bucket/reports/a?versionId=3", True),
                            ("/bucket/secret/k", False), ("/bucket/reports/../secret/k", False),
                            ("bucket%2Freports%2F..%2Fsecret", False)):
        for header in ("x-amz-copy-source", "x-amz-rename-source"):
            refusal = aws_decision({}, "/s3/us-east-1/bucket/reports/new", fields=[(header, source)],
                                   policy={"paths": ["/x", "/bucket/reports"]})
            assert (refusal is None) == allowed, (header, source, refusal)
    # no paths in the policy: a copy reads anything the secret reaches
    assert aws_decision({}, "/s3/us-east-1/b/k", fields=[("x-amz-copy-source", "/other/k")]) is None


def chunked(payload: bytes, size: int, trailer: str = "") -> bytes:
    out = b""
    for i in range(0, len(payload), size):
        piece = payload[i:i + size]
        out += b"%x;chunk-signature=%s\r\n" % (len(piece), b"0" * 64) + piece + b"\r\n"
    return out + b"0;chunk-signature=" + b"0" * 64 + b"\r\n" + trailer.encode() + b"\r\n"


@pytest.mark.parametrize("cut", [1, 7, 64, 4096])
def test_aws_unchunk_drops_chunk_signatures_and_collects_trailers(cut: int) -> None:
    payload = bytes(range(256)) * 40
    body = chunked(payload, 1000, "x-amz-checksum-crc32:AAAAAA==\r\n")
    trailers: Dict[str, str] = {}
    pieces = [body[i:i + cut] for i in range(0, len(body), cut)]
    assert b"".join(sb.aws_unchunk(pieces, trailers, len(payload))) == payload
    assert trailers == {"x-amz-checksum-crc32": "AAAAAA=="}
    assert b"".join(sb.aws_unchunk([chunked(b"", 10)], {})) == b""
    assert b"".join(sb.aws_unchunk([b"", body[:5], b"", body[5:], b""], {}, len(payload))) == payload


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n0\r\n\r\n", b"3\r\nabcXY0\r\n\r\n", b"5\r\nab", b"3;x\r\nabc\r\n",
                                  b"1" * 5000, b"3\r\nabc\r\n0\r\nno-colon\r\n\r\n"])
def test_a_malformed_aws_chunked_body_is_a_400(body: bytes) -> None:
    with pytest.raises(sb.BadRequest):
        b"".join(sb.aws_unchunk([body], {}))


def test_an_aws_chunked_body_has_at_most_eight_trailers() -> None:
    """Each kept trailer becomes a header sent upstream: nine are a 400, not nine more headers."""
    eight = "".join(f"x-amz-checksum-t{i}:AAAA\r\n" for i in range(8))
    assert b"".join(sb.aws_unchunk([chunked(b"abc", 2, eight)], {}, 3)) == b"abc"
    with pytest.raises(sb.BadRequest):
        b"".join(sb.aws_unchunk([chunked(b"abc", 2, eight + "x-amz-checksum-t8:AAAA\r\n")], {}, 3))


def test_an_aws_chunked_body_of_another_length_than_declared_is_a_400() -> None:
    with pytest.raises(sb.BadRequest):
        b"".join(sb.aws_unchunk([chunked(b"abcdef", 2)], {}, 5))
    with pytest.raises(sb.BadRequest):
        b"".join(sb.aws_unchunk([chunked(b"abcdef", 2)], {}, 7))


@pytest.mark.parametrize("status, s3_code, json_code", [(401, "InvalidAccessKeyId", "UnrecognizedClientException"),
                                                        (403, "AccessDenied", "AccessDeniedException"),
                                                        (429, "SlowDown", "ThrottlingException")])
def test_errors_come_in_the_shapes_aws_sdks_parse(status: int, s3_code: str, json_code: str) -> None:
    exc = {401: sb.AuthError, 403: sb.Forbidden, 429: sb.RateLimited}[status]("no <way> & back")
    code, headers, body = sb.error_answer(exc, "aws-s3")
    assert code == status and headers["Content-Type"] == "application/xml"
    assert f"<Code>{s3_code}</Code><Message>no &lt;way&gt; &amp; back</Message>" in body.decode()
    code, headers, body = sb.error_answer(exc, "aws-query")                        # STS, IAM
    assert headers["Content-Type"] == "text/xml" and body.decode().endswith(
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{s3_code}</Code><Message>no &lt;way&gt; &amp; back</Message>"
        f"</Error><RequestId>seks-broker</RequestId></ErrorResponse>")
    code, headers, body = sb.error_answer(exc, "aws-json")
    assert headers["x-amzn-ErrorType"] == json_code and json.loads(body) == {"__type": json_code, "message": "no <way> & back"}


# ============================================================================
# Over sockets: a loopback "AWS" that checks every signature with the real credentials
# ============================================================================

import base64        # noqa: E402  (the socket half of the module)
import binascii      # noqa: E402
import re            # noqa: E402
import time          # noqa: E402
import urllib.parse  # noqa: E402
from typing import Iterator, Optional  # noqa: E402

import aws_fake      # noqa: E402
from conftest import Broker, Brokers, FakeUpstream, RecordedRequest, UpstreamHandler  # noqa: E402

REAL = {"access_key_id": "TEST-AWS-KEY-ID-REAL-0123", "secret_access_key": "test/Real+Secret0123456789abcdefABCDEF01",
        "session_token": "test-session-token-0123456789abcdef", "regions": "us-east-1, eu-west-1"}
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
_AUTH_RE = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request, "
                      r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})")


def check_signature(req: RecordedRequest, creds: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The test upstream's own SigV4 check (written from the specification, not shared with the
    broker): None if `req` is signed with `creds` (REAL) for the Host it arrived with, else why."""
    creds = creds or REAL
    m = _AUTH_RE.fullmatch(req.header("authorization") or "")
    if not m:
        return "no SigV4 Authorization"
    key_id, day, region, service, signed, signature = m.groups()
    if key_id != creds["access_key_id"] or "seks_" in req.wire_text():
        return "wrong key id, or a seks token reached the upstream"
    names = signed.split(";")
    if not {"host", "x-amz-date", "x-amz-content-sha256"} <= set(names) or (
            creds.get("session_token") and "x-amz-security-token" not in names):
        return "host, date, payload hash or session token unsigned"
    if req.header("x-amz-security-token") != creds.get("session_token"):
        return "wrong session token"
    amz_date = req.header("x-amz-date") or ""
    if amz_date[:8] != day or abs(time.mktime(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")) - time.mktime(time.gmtime())) > 900:
        return "stale date"
    payload = req.header("x-amz-content-sha256") or ""
    if payload != "UNSIGNED-PAYLOAD" and payload != req.body_sha256:
        return "payload hash does not match the body"
    path, _, query = req.target.partition("?")
    uri = path if service == "s3" else urllib.parse.quote(path, safe="/~")
    pairs = sorted((urllib.parse.quote(urllib.parse.unquote(n), safe="~"), urllib.parse.quote(urllib.parse.unquote(v), safe="~"))
                   for n, _, v in (p.partition("=") for p in query.split("&") if p))
    lines = "".join(f"{n}:{','.join(' '.join(v.split()) for v in req.header_all(n))}\n" for n in names)
    canonical = "\n".join([req.method, uri, "&".join(f"{n}={v}" for n, v in pairs), lines, signed, payload])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = ("AWS4" + creds["secret_access_key"]).encode()
    for step in (day, region, service, "aws4_request"):
        key = hmac.new(key, step.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
        return "bad signature"
    return None


def event(event_type: str, payload: dict) -> bytes:
    """One AWS event-stream message (prelude with CRC32, string headers, payload, CRC32)."""
    headers = b""
    for name, value in ((":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")):
        headers += bytes([len(name)]) + name.encode() + b"\x07" + len(value).to_bytes(2, "big") + value.encode()
    body = json.dumps(payload).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = total.to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    message = prelude + binascii.crc32(prelude).to_bytes(4, "big") + headers + body
    return message + binascii.crc32(message).to_bytes(4, "big")


STREAM_EVENTS = [event("messageStart", {"role": "assistant"}),
                 event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}}),
                 event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}}),
                 event("contentBlockStop", {"contentBlockIndex": 0}), event("messageStop", {"stopReason": "end_turn"}),
                 event("metadata", {"usage": {"inputTokens": 5, "outputTokens": 2, "totalTokens": 7}, "metrics": {"latencyMs": 9}})]
OBJECTS: Dict[str, bytes] = {}


def fake_aws(h: UpstreamHandler, req: RecordedRequest) -> None:
    problem = check_signature(req) or aws_fake.verify_sigv4(       # two independent checks, the
        req.method, req.target, req.headers, req.body, REAL["access_key_id"],   # second stricter
        REAL["secret_access_key"], REAL["session_token"])          # (every x-amz-* signed, sorted)
    if problem is not None:
        h.send_json(403, {"message": problem})
        return
    path, _, query = req.target.partition("?")
    model = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream|invoke)", path)
    if model and urllib.parse.unquote(model.group(1)) == MODEL:
        if model.group(2) == "converse-stream":
            h.send_stream(200, STREAM_EVENTS, [("Content-Type", "application/vnd.amazon.eventstream")], delay=0.05)
        elif model.group(2) == "converse":
            h.send_json(200, {"output": {"message": {"role": "assistant", "content": [{"text": "Hello"}]}},
                              "stopReason": "end_turn", "usage": {"inputTokens": 5, "outputTokens": 1, "totalTokens": 6}})
        else:
            h.send_json(200, {"completion": "Hello", "echo": REAL["secret_access_key"]})     # a debug echo
    elif path.startswith("/bucket") and req.method == "PUT":
        OBJECTS[path] = req.body or b""
        h.send_bytes(200, b"", [("ETag", '"%s"' % hashlib.md5(req.body or b"").hexdigest())])
    elif path == "/bucket/synthetic-100m" and req.method == "GET":       # generated as it goes
        block = hashlib.sha256(b"seed").digest() * 2048                    # 64 KiB
        h.send_stream(200, (block for _ in range(1600)), [("Content-Type", "binary/octet-stream")],
                      length=len(block) * 1600)
    elif path.startswith("/bucket/") and req.method == "GET" and path in OBJECTS:
        data = OBJECTS[path]
        h.send_stream(200, (data[i:i + 65536] for i in range(0, len(data), 65536)),
                      [("Content-Type", "binary/octet-stream")], length=len(data))     # S3's default type
    elif path == "/bucket" and req.method == "GET" and "list-type=2" in query:
        keys = "".join(f"<Contents><Key>{k[len('/bucket/'):]}</Key><Size>{len(v)}</Size></Contents>" for k, v in sorted(OBJECTS.items()))
        h.send_bytes(200, f"<ListBucketResult><Name>bucket</Name>{keys}</ListBucketResult>".encode(), content_type="application/xml")
    else:
        h.send_json(404, {"message": f"no such thing {req.method} {req.target}"})


def answering(responder: object) -> Iterator[FakeUpstream]:
    """A loopback "AWS" answering with `responder`, stopped at the end of the module."""
    up = FakeUpstream("aws", key="unused")
    up.set_responder(responder)         # type: ignore[arg-type]
    yield up
    up.stop()


def serving(broker_factory: Brokers, up: FakeUpstream, secret: Dict[str, str], *others: str) -> Broker:
    """A broker whose aws secret is `secret` and whose AWS routes all go to `up`."""
    return broker_factory.serve(broker_factory.seed(("aws",) + others, keys={"aws": json.dumps(secret)},
                                                    extra_env={"SEKS_UPSTREAM_AWS": up.url}))


@pytest.fixture(scope="module")
def awsup() -> Iterator[FakeUpstream]:
    yield from answering(fake_aws)


@pytest.fixture(scope="module")
def awsb(broker_factory: Brokers, awsup: FakeUpstream) -> Broker:
    return serving(broker_factory, awsup, REAL, "openai")


def signed_by_agent(token: str, service: str = "bedrock", region: str = "us-east-1", extra: Tuple = ()) -> Dict[str, str]:
    """What an SDK holding the fake token sends: its own (worthless) signature and date."""
    headers = {"Authorization": f"AWS4-HMAC-SHA256 Credential={token}/20260101/{region}/{service}/aws4_request, "
                                f"SignedHeaders=host;x-amz-date, Signature={'0' * 64}",
               "X-Amz-Date": "20260101T000000Z", "X-Amz-Security-Token": "agent-placeholder",
               "X-Amz-Content-Sha256": "0" * 64}
    headers.update(dict(extra))
    return headers


@pytest.mark.parametrize("op", ["converse", "invoke"])
def test_bedrock_requests_are_signed_anew_with_the_real_credentials(awsb: Broker, awsup: FakeUpstream, op: str) -> None:
    awsup.reset()
    awsup.set_responder(fake_aws)
    path = f"/aws/bedrock-runtime/us-east-1/model/{urllib.parse.quote(MODEL, safe='')}/{op}"
    resp = awsb.request("POST", path, dict(signed_by_agent(awsb.token("aws")), **{"Content-Type": "application/json"}),
                        b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}')
    assert resp.status == 200, resp.body
    assert REAL["secret_access_key"].encode() not in resp.body                      # the echo is masked
    req = awsup.only_request()
    assert req.target.startswith("/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/")
    assert "/us-east-1/bedrock/aws4_request" in (req.header("authorization") or "")   # Bedrock's signing name


def test_converse_stream_events_come_through_unchanged_and_one_by_one(awsb: Broker, awsup: FakeUpstream) -> None:
    import http.client
    awsup.reset()
    awsup.set_responder(fake_aws)
    conn = http.client.HTTPConnection(awsb.host, awsb.port, timeout=10)
    conn.request("POST", f"/aws/bedrock-runtime/us-east-1/model/{urllib.parse.quote(MODEL, safe='')}/converse-stream",
                 b"{}", signed_by_agent(awsb.token("aws")))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "application/vnd.amazon.eventstream"
    first = resp.read1(65536)
    started = time.monotonic()
    rest = resp.read()
    conn.close()
    assert first == STREAM_EVENTS[0], "the first event was not relayed on its own"
    assert time.monotonic() - started > 0.1                       # the others came as sent, 50 ms apart
    assert first + rest == b"".join(STREAM_EVENTS)


def test_s3_put_get_and_list_small_large_and_aws_chunked(awsb: Broker, awsup: FakeUpstream) -> None:
    awsup.reset()
    awsup.set_responder(fake_aws)
    OBJECTS.clear()
    token = awsb.token("aws")
    small = b"hello, bucket"
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/notes/a%20b.txt", signed_by_agent(token, "s3"), small)
    assert resp.status == 200, resp.body
    assert awsup.requests[-1].header("x-amz-content-sha256") == hashlib.sha256(small).hexdigest()
    big = bytes(range(256)) * (6 * 4096)                          # 6 MiB: streamed, not held
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/big.bin", signed_by_agent(token, "s3"), big)
    assert resp.status == 200, resp.body
    assert awsup.requests[-1].header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD"
    payload = b"chunked payload " * 5000
    crc = base64.b64encode(binascii.crc32(payload).to_bytes(4, "big")).decode()
    body = chunked(payload, 8192, f"x-amz-checksum-crc32:{crc}\r\n")
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/chunked.txt", signed_by_agent(token, "s3", extra=(
        ("Content-Encoding", "aws-chunked"), ("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
        ("X-Amz-Decoded-Content-Length", str(len(payload))), ("X-Amz-Trailer", "x-amz-checksum-crc32"),
        ("X-Amz-Sdk-Checksum-Algorithm", "CRC32"))), body)
    assert resp.status == 200, resp.body
    sent = awsup.requests[-1]
    assert sent.body == payload and sent.header("x-amz-checksum-crc32") == crc and sent.header("content-encoding") is None
    assert sent.header("x-amz-content-sha256") == hashlib.sha256(payload).hexdigest()      # held: signed
    huge = bytes(range(251)) * 40000                               # 10 MB aws-chunked: decoded as it streams
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/huge.bin", signed_by_agent(token, "s3", extra=(
        ("Content-Encoding", "aws-chunked"), ("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
        ("X-Amz-Decoded-Content-Length", str(len(huge))), ("X-Amz-Trailer", "x-amz-checksum-crc32"),
        ("X-Amz-Sdk-Checksum-Algorithm", "CRC32"))), chunked(huge, 65536, "x-amz-checksum-crc32:AAAAAA==\r\n"))
    assert resp.status == 200, resp.body
    sent = awsup.requests[-1]
    assert sent.body_sha256 == hashlib.sha256(huge).hexdigest() and sent.body_len == len(huge)
    assert sent.header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD" and sent.header("x-amz-sdk-checksum-algorithm") is None
    assert OBJECTS["/bucket/notes/a%20b.txt"] == small and OBJECTS["/bucket/big.bin"] == big
    resp = awsb.request("GET", "/aws/s3/us-east-1/bucket/big.bin", signed_by_agent(token, "s3"))
    assert resp.status == 200 and resp.body == big
    resp = awsb.request("GET", "/aws/s3/us-east-1/bucket?list-type=2&prefix=", signed_by_agent(token, "s3"))
    assert resp.status == 200 and b"<Key>chunked.txt</Key>" in resp.body, resp.body


@pytest.mark.parametrize("path, status", [
    ("/aws/iam/us-east-1/", 403),                            # a service the secret does not allow
    ("/aws/s3/ap-south-1/bucket/x", 403),                    # a region it does not allow
    ("/aws/s3/us-east-1.evil.example/bucket/x", 404),        # forged: not a region
    ("/aws/s3.evil.example/us-east-1/bucket/x", 404),
    ("/aws/s3/us-east-1/../../x", 400),
])
def test_a_forged_or_unallowed_endpoint_reaches_nobody(awsb: Broker, awsup: FakeUpstream, path: str, status: int) -> None:
    awsup.reset()
    resp = awsb.request("GET", path, signed_by_agent(awsb.token("aws"), "s3"))
    assert resp.status in (status, 400 if status == 404 else status), (path, resp.status, resp.body)
    assert awsup.requests == []
    assert resp.status != 403 or b"<Code>AccessDenied</Code>" in resp.body or b"AccessDeniedException" in resp.body


@pytest.mark.parametrize("auth, status", [
    (None, 401), ("AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00", 401),
    ("AWS4-HMAC-SHA256 Credential=seks_aws_" + "Q" * 43 + "/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00", 401),
    ("AWS4-HMAC-SHA256 Credential=AKIAREALLOOKING0123/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00", 401),
])
def test_unknown_credentials_are_refused_in_s3_shape(awsb: Broker, awsup: FakeUpstream, auth: Optional[str], status: int) -> None:
    awsup.reset()
    resp = awsb.request("GET", "/aws/s3/us-east-1/bucket/x", {"Authorization": auth} if auth else {})
    assert resp.status == status and b"<Code>InvalidAccessKeyId</Code>" in resp.body, resp.body
    assert resp.headers.get_all("Content-Type") == ["application/xml"]
    assert awsup.requests == []


def test_another_providers_token_as_the_key_id_is_refused(awsb: Broker, awsup: FakeUpstream) -> None:
    awsup.reset()
    resp = awsb.request("POST", f"/aws/bedrock-runtime/us-east-1/model/{urllib.parse.quote(MODEL, safe='')}/converse",
                        signed_by_agent(awsb.token("openai")), b"{}")
    assert resp.status == 403 and resp.headers.get("x-amzn-ErrorType") == "AccessDeniedException", resp.body
    assert awsup.requests == []


def test_a_query_signature_names_the_token_too_and_is_replaced(awsb: Broker, awsup: FakeUpstream) -> None:
    awsup.reset()
    awsup.set_responder(fake_aws)
    OBJECTS["/bucket/q.txt"] = b"query-signed"
    cred = urllib.parse.quote(f"{awsb.token('aws')}/20260101/us-east-1/s3/aws4_request", safe="")
    resp = awsb.request("GET", f"/aws/s3/us-east-1/bucket/q.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={cred}"
                               f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature={'0' * 64}")
    assert resp.status == 200 and resp.body == b"query-signed", resp.body
    assert "X-Amz" not in awsup.only_request().target


def test_models_limit_bedrock_by_the_model_id_in_the_path(awsb: Broker, awsup: FakeUpstream) -> None:
    token = awsb.mint("aws", "aws-models", "--models", MODEL, via_cli=True)
    awsup.reset()
    awsup.set_responder(fake_aws)
    ok_path = f"/aws/bedrock-runtime/us-east-1/model/{urllib.parse.quote(MODEL, safe='')}/converse"
    assert awsb.request("POST", ok_path, signed_by_agent(token), b"{}").status == 200
    other = "/aws/bedrock-runtime/us-east-1/model/meta.llama3-70b-instruct-v1%3A0/converse"
    resp = awsb.request("POST", other, signed_by_agent(token), b"{}")
    assert resp.status == 403 and b"meta.llama3" in resp.body, resp.body
    assert len(awsup.requests) == 1


def test_mint_env_prints_what_boto3_reads(awsb: Broker) -> None:
    from conftest import ok
    out = ok(awsb.cli("token", "mint", "--secret", "aws-key", "--agent", "aws-env", "--format", "env"))
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env["AWS_ACCESS_KEY_ID"].startswith("seks_aws_") and env["AWS_REGION"] == "us-east-1"
    assert env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"].endswith("/aws/bedrock-runtime/us-east-1")
    assert env["AWS_ENDPOINT_URL_S3"].endswith("/aws/s3/us-east-1")
    assert not any(v in out for k, v in REAL.items() if k != "regions")


# ============================================================================
# role_arn: the broker assumes the role itself (STS AssumeRole), caches and renews
# ============================================================================

BASE = {"access_key_id": "TEST-AWS-KEY-ID-BASE-0456", "secret_access_key": "test/Base+Secret-zyxwvutsrqponmlkjihg",
        "role_arn": "arn:aws:iam::123456789012:role/agent-reader"}
ROLE_CALLS: List[Dict[str, str]] = []
ROLE_LIFE = {"seconds": 3600}


def fake_sts_and_s3(h: UpstreamHandler, req: RecordedRequest) -> None:
    """STS answers AssumeRole (signed with the base keys) with fresh temporary credentials that
    expire in ROLE_LIFE seconds; S3 accepts only the newest of those."""
    if req.method == "POST" and req.target == "/" and b"Action=AssumeRole" in (req.body or b""):
        problem = check_signature(req, BASE)
        form = urllib.parse.parse_qs((req.body or b"").decode())
        if problem or form.get("RoleArn") != [BASE["role_arn"]]:
            h.send_bytes(403, b"<ErrorResponse><Error><Code>AccessDenied</Code></Error></ErrorResponse>", content_type="text/xml")
            return
        n = len(ROLE_CALLS) + 1
        creds = {"access_key_id": f"TEST-AWS-TEMP-KEY-ID-{n:04d}", "secret_access_key": f"test-temp-secret-{n}-abcdefghijklmnop",
                 "session_token": f"test-temp-session-{n}-0123456789abcdefghij"}
        ROLE_CALLS.append(creds)
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + ROLE_LIFE["seconds"]))
        h.send_bytes(200, ("<AssumeRoleResponse><AssumeRoleResult><Credentials>"
                           f"<AccessKeyId>{creds['access_key_id']}</AccessKeyId><SecretAccessKey>{creds['secret_access_key']}"
                           f"</SecretAccessKey><SessionToken>{creds['session_token']}</SessionToken>"
                           f"<Expiration>{expiry}</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>").encode(),
                     content_type="text/xml")
        return
    problem = check_signature(req, ROLE_CALLS[-1]) if ROLE_CALLS else "no role assumed"
    h.send_json(403 if problem else 200, {"message": problem or "ok", "echo": ROLE_CALLS[-1]["secret_access_key"] if ROLE_CALLS else ""})


@pytest.fixture(scope="module")
def roleup() -> Iterator[FakeUpstream]:
    yield from answering(fake_sts_and_s3)


@pytest.fixture(scope="module")
def roleb(broker_factory: Brokers, roleup: FakeUpstream) -> Broker:
    return serving(broker_factory, roleup, BASE)


def test_role_arn_is_assumed_once_cached_renewed_and_masked(roleb: Broker, roleup: FakeUpstream) -> None:
    ROLE_LIFE["seconds"] = 3600
    ROLE_CALLS.clear()
    for _ in range(3):
        resp = roleb.request("GET", "/aws/s3/us-east-1/bucket/x", signed_by_agent(roleb.token("aws"), "s3"))
        assert resp.status == 200, resp.body
        assert ROLE_CALLS[-1]["secret_access_key"].encode() not in resp.body      # the role's secret is masked
    assert len(ROLE_CALLS) == 1                     # assumed once, then from memory
    ROLE_LIFE["seconds"] = 120             # less than the 5-minute margin: renewed at each use
    from conftest import ok
    ok(roleb.cli("secret", "add", "aws-short", "--provider", "aws", input=json.dumps(BASE)))
    token = roleb.mint("aws", "short-role-agent", secret="aws-short", via_cli=True)
    for _ in range(2):
        assert roleb.request("GET", "/aws/s3/us-east-1/bucket/x", signed_by_agent(token, "s3")).status == 200
    assert len(ROLE_CALLS) == 3                     # renewed before it runs out
    ROLE_LIFE["seconds"] = 3600


def test_a_refused_assume_role_is_a_clear_502_naming_no_value(roleb: Broker, broker_factory: Brokers, roleup: FakeUpstream) -> None:
    bad = dict(BASE, role_arn="arn:aws:iam::123456789012:role/not-allowed")
    from conftest import ok
    ok(roleb.cli("secret", "add", "aws-badrole", "--provider", "aws", input=json.dumps(bad)))
    token = roleb.mint("aws", "role-agent", secret="aws-badrole", via_cli=True)
    resp = roleb.request("GET", "/aws/s3/us-east-1/bucket/x", signed_by_agent(token, "s3"))
    assert resp.status == 502 and b"could not assume the role of secret aws-badrole" in resp.body, resp.body
    assert b"<Code>" in resp.body and BASE["secret_access_key"].encode() not in resp.body


def test_assumed_role_reads_the_credentials_and_refuses_a_malformed_answer() -> None:
    xml = (b"<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId>"
           b"<SecretAccessKey>s3cr3t</SecretAccessKey><SessionToken>tok/en+=</SessionToken>"
           b"<Expiration>2026-12-04T05:00:00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>")
    creds, expires = sb.assumed_role(xml)
    assert creds == {"access_key_id": "ASIAEXAMPLE", "secret_access_key": "s3cr3t", "session_token": "tok/en+="}
    assert expires == 1796360400.0
    for broken in (xml.replace(b"SessionToken", b"Session"), xml.replace(b"2026-12-04T05", b"tomorrow"), b"", b"{}"):
        with pytest.raises(ValueError):
            sb.assumed_role(broken)


def test_bedrock_usage_is_metered_from_converse_and_its_stream(awsb: Broker, awsup: FakeUpstream) -> None:
    """Audit rows carry Bedrock's token counts: Converse's `usage`, and the stream's `metadata`
    event read out of the binary event stream as it passes."""
    from conftest import audit_json, fresh_token
    agent, token = fresh_token(awsb, "aws", prefix="aws-usage")
    awsup.reset()
    awsup.set_responder(fake_aws)
    base = f"/aws/bedrock-runtime/us-east-1/model/{urllib.parse.quote(MODEL, safe='')}"
    assert awsb.request("POST", base + "/converse", signed_by_agent(token), b"{}").status == 200
    resp = awsb.request("POST", base + "/converse-stream", signed_by_agent(token), b"{}")
    assert resp.status == 200 and resp.body == b"".join(STREAM_EVENTS)
    rows = [r for r in audit_json(awsb, "--agent", agent) if r.get("outcome") == "ok"]
    assert [(r["model"], r["tokens_in"], r["tokens_out"]) for r in rows] == [(MODEL, 5, 1), (MODEL, 5, 2)], rows


def test_the_usage_meter_reads_event_streams_split_anywhere() -> None:
    data = b"".join(STREAM_EVENTS)
    for cut in (1, 5, 13, 100):
        meter = sb.UsageMeter("bedrock", "application/vnd.amazon.eventstream")
        for i in range(0, len(data), cut):
            meter.feed(data[i:i + cut])
        state = meter.finish()
        assert (state["tokens_in"], state["tokens_out"]) == (5, 2), (cut, state)
    meter = sb.UsageMeter("bedrock", "application/vnd.amazon.eventstream")
    meter.feed(b"\xff\xff\xff\xff" + b"\x00" * 20)              # a length no message has: stop reading
    assert meter.finish() == {}


def test_a_token_budget_bounds_bedrock_requests(awsb: Broker, awsup: FakeUpstream) -> None:
    """Converse's inferenceConfig.maxTokens (and an Anthropic body's max_tokens) is lowered to
    what the budget has left; usage settles it; what the broker cannot bound is refused."""
    from conftest import fresh_token, ok
    agent, token = fresh_token(awsb, "aws", "--budget-tokens", "400", prefix="aws-budget")
    awsup.reset()
    awsup.set_responder(fake_aws)
    base = f"/aws/bedrock-runtime/us-east-1/model/{urllib.parse.quote(MODEL, safe='')}"
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 4096}})
    resp = awsb.request("POST", base + "/converse", signed_by_agent(token), body.encode())
    assert resp.status == 200, resp.body
    sent = json.loads(awsup.requests[-1].body or b"{}")
    assert 1 <= sent["inferenceConfig"]["maxTokens"] < 400, sent
    anthropic = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 4096,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert awsb.request("POST", base + "/invoke", signed_by_agent(token), anthropic.encode()).status == 200
    assert json.loads(awsup.requests[-1].body or b"{}")["max_tokens"] < 400
    sent_before = len(awsup.requests)
    for path, refused in (("/converse", {"messages": [], "additionalModelRequestFields": {"max_tokens": 100000}}),
                          ("/converse", {"messages": [{"role": "user", "content": [{"document": {"source": {
                              "s3Location": {"uri": "s3://b/k"}}, "name": "d", "format": "pdf"}}]}]}),
                          ("/converse", {"messages": [], "toolConfig": {"tools": [{"systemTool": {"name": "web"}}]}}),
                          ("/invoke", {"inputText": "hi", "textGenerationConfig": {"maxTokenCount": 100000}})):
        resp = awsb.request("POST", base + path, signed_by_agent(token), json.dumps(refused).encode())
        assert resp.status == 403 and resp.headers.get("x-amzn-ErrorType") == "AccessDeniedException", (refused, resp.body)
    assert len(awsup.requests) == sent_before
    rows = json.loads(ok(awsb.cli("token", "list", "--agent", agent, "--json")).splitlines()[0])
    assert rows["tokens_used"] > 0 and rows["tokens_used"] <= 400, rows
    cp = awsb.cli("token", "mint", "--secret", "aws-key", "--agent", "aws-money", "--budget-usd", "1")
    assert cp.returncode != 0 and "--budget-usd does not apply to aws" in cp.stderr


def test_an_s3_download_streams_with_flat_memory(awsb: Broker, awsup: FakeUpstream) -> None:
    import http.client
    awsup.reset()
    awsup.set_responder(fake_aws)
    awsb.reset_peak_rss()
    before = awsb.vm_hwm_bytes()
    conn = http.client.HTTPConnection(awsb.host, awsb.port, timeout=30)
    conn.request("GET", "/aws/s3/us-east-1/bucket/synthetic-100m", headers=signed_by_agent(awsb.token("aws"), "s3"))
    resp = conn.getresponse()
    assert resp.status == 200
    digest, size = hashlib.sha256(), 0
    while True:
        piece = resp.read(1 << 20)
        if not piece:
            break
        digest.update(piece)
        size += len(piece)
    conn.close()
    block = hashlib.sha256(b"seed").digest() * 2048
    assert size == len(block) * 1600 and digest.hexdigest() == hashlib.sha256(block * 1600).hexdigest()
    after = awsb.vm_hwm_bytes()
    if before is not None and after is not None:
        assert after - before < 40 * 1024 * 1024, f"peak RSS grew {(after - before) >> 20} MiB for 100 MiB"


def test_path_and_method_policies_apply_to_the_path_after_the_region(awsb: Broker, awsup: FakeUpstream) -> None:
    from conftest import fresh_token
    _, token = fresh_token(awsb, "aws", "--allow-path", "/bucket/reports/", "--allow-method", "GET", prefix="aws-pol")
    awsup.reset()
    awsup.set_responder(fake_aws)
    OBJECTS["/bucket/reports/q1.csv"] = b"a,b"
    assert awsb.request("GET", "/aws/s3/us-east-1/bucket/reports/q1.csv", signed_by_agent(token, "s3")).body == b"a,b"
    for method, path in (("GET", "/aws/s3/us-east-1/bucket/private.txt"), ("PUT", "/aws/s3/us-east-1/bucket/reports/x"),
                         ("GET", "/aws/s3/eu-west-1/bucket/other/x")):
        resp = awsb.request(method, path, signed_by_agent(token, "s3"), b"x" if method == "PUT" else None)
        assert resp.status == 403 and b"<Code>AccessDenied</Code>" in resp.body, (method, path, resp.body)
    assert len(awsup.requests) == 1


def test_a_path_limited_token_cannot_copy_from_outside_its_paths(awsb: Broker, awsup: FakeUpstream) -> None:
    """CopyObject reads the object named in x-amz-copy-source: with --allow-path that object
    must be within the token's paths too, else nothing is sent."""
    from conftest import fresh_token
    _, token = fresh_token(awsb, "aws", "--allow-path", "/bucket/reports/", prefix="aws-copy")
    awsup.reset()
    awsup.set_responder(fake_aws)
    for source in ("/secret-bucket/private.pdf", "secret-bucket/private.pdf", "/bucket/reports/../private.pdf",
                   "%2Fsecret-bucket%2Fprivate.pdf", "/bucket/reportsX/a"):
        resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/reports/copy.pdf",
                            signed_by_agent(token, "s3", extra=(("x-amz-copy-source", source),)), b"")
        assert resp.status == 403 and b"x-amz-copy-source" in resp.body, (source, resp.body)
    assert awsup.requests == []
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/reports/copy.pdf",
                        signed_by_agent(token, "s3", extra=(("x-amz-copy-source", "/bucket/reports/q1.csv?versionId=3"),)), b"")
    assert resp.status == 200 and len(awsup.requests) == 1


# ============================================================================
# Review 4 (a helper attacking today's AWS and parts code): each finding's test
# ============================================================================

@pytest.mark.parametrize("method, path, body", [
    ("GET", "/aws/sts/us-east-1/?Action=GetSessionToken&Version=2011-06-15&DurationSeconds=129600", None),
    ("POST", "/aws/sts/us-east-1/", b"Action=GetFederationToken&Name=x&Version=2011-06-15"),
    ("POST", "/aws/sts/us-east-1/", b"Action=AssumeRole&RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fx&RoleSessionName=s"),
    ("POST", "/aws/sts/us-east-1/?Action=GetCallerIdentity", b"Action=GetSessionToken"),
    ("POST", "/aws/sts/us-east-1/", b"Action=GetCallerIdentity&Action=GetSessionToken"),
])
def test_sts_passes_get_caller_identity_only(awsb: Broker, awsup: FakeUpstream, method: str, path: str,
                                             body: Optional[bytes]) -> None:
    """F1: STS actions that mint credentials would hand the agent working AWS keys nothing masks."""
    awsup.reset()
    resp = awsb.request(method, path, dict(signed_by_agent(awsb.token("aws"), "sts"),
                                           **{"Content-Type": "application/x-www-form-urlencoded"}), body)
    assert resp.status == 403 and b"GetCallerIdentity only" in resp.body and b"<ErrorResponse>" in resp.body, resp.body
    assert awsup.requests == []


def test_sts_reads_no_action_out_of_an_encoded_body(awsb: Broker, awsup: FakeUpstream) -> None:
    """Review 5 F1: a chunk extension spelling Action=GetCallerIdentity, with GetSessionToken in
    the chunk the broker would decode and send, is refused before anything reaches STS."""
    awsup.reset()
    body = (b"29;chunk-signature=0&Action=GetCallerIdentity&x\r\n"
            b"Action=GetSessionToken&Version=2011-06-15\r\n0\r\n\r\n")
    headers = dict(signed_by_agent(awsb.token("aws"), "sts"), **{
        "Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": "41"})
    resp = awsb.request("POST", "/aws/sts/us-east-1/", headers, body)
    assert resp.status == 403 and b"GetCallerIdentity only" in resp.body, resp.body
    assert awsup.requests == []


def test_a_query_credential_never_reaches_the_audit_or_the_log(awsb: Broker, awsup: FakeUpstream) -> None:
    """F5: a percent-encoded token in X-Amz-Credential authenticates; the logged path masks it."""
    from conftest import audit_json
    awsup.reset()
    awsup.set_responder(fake_aws)
    OBJECTS["/bucket/q5.txt"] = b"q5"
    token = awsb.token("aws")
    cred = "%73" + urllib.parse.quote(f"{token[1:]}/20260101/us-east-1/s3/aws4_request", safe="")
    resp = awsb.request("GET", f"/aws/s3/us-east-1/bucket/q5.txt?X-Amz-Credential={cred}&X-Amz-Signature={'0' * 64}")
    assert resp.status == 200, resp.body
    assert token[10:] not in json.dumps(audit_json(awsb)[-3:]) and token[10:] not in awsb.stderr_text()


def test_a_hostile_aws_chunked_body_costs_linear_time_and_bounded_memory(awsb: Broker, awsup: FakeUpstream) -> None:
    """F2: 200,000 one-byte chunks decode in well under a second; a body far larger than it
    declares is refused instead of held."""
    body = b"1\r\nx\r\n" * 200_000 + b"0\r\n\r\n"
    started = time.monotonic()
    assert b"".join(sb.aws_unchunk([body[i:i + 65536] for i in range(0, len(body), 65536)], {}, 200_000)) == b"x" * 200_000
    assert time.monotonic() - started < 2.0
    awsup.reset()
    big = chunked(b"y" * (3 << 20), 65536)
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/liar.bin", signed_by_agent(awsb.token("aws"), "s3", extra=(
        ("Content-Encoding", "aws-chunked"), ("X-Amz-Decoded-Content-Length", "1"),
        ("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"))), big)
    assert resp.status == 400 and awsup.requests == [], resp.body


def test_a_non_ascii_signed_header_is_refused_not_signed_wrongly(awsb: Broker, awsup: FakeUpstream) -> None:
    """F4: the canonical request must be the bytes sent; S3 quotes a mismatching one in hex."""
    awsup.reset()
    resp = awsb.request("PUT", "/aws/s3/us-east-1/bucket/meta.txt",
                        signed_by_agent(awsb.token("aws"), "s3", extra=(("x-amz-meta-note", "caf\xe9"),)), b"x")
    assert resp.status == 400 and b"ASCII" in resp.body and awsup.requests == []


def test_html_escaped_echoes_of_a_key_are_masked() -> None:
    """F3: an XML/HTML error page escapes & < > " ' in what it quotes."""
    key = "x&K9<abcdefghij>klmn'op\"qrstuvwxyE&y"
    import html
    for echo in (html.escape(key), html.escape(key, quote=False), html.escape(key).replace("&#x27;", "&#39;")):
        page = f"<Error><Message>bad key {echo}</Message></Error>".encode()
        assert echo.encode() not in sb.Scrubber(sb.scrub_pairs(key)).scrub(page), echo


def test_a_budget_invoke_needs_an_anthropic_model_for_an_anthropic_body(awsb: Broker, awsup: FakeUpstream) -> None:
    """N1: a Llama body with a decoy anthropic_version is not bounded by max_tokens."""
    from conftest import fresh_token
    _, token = fresh_token(awsb, "aws", "--budget-tokens", "400", prefix="aws-n1")
    awsup.reset()
    decoy = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 10, "prompt": "hi", "max_gen_len": 2048})
    resp = awsb.request("POST", "/aws/bedrock-runtime/us-east-1/model/meta.llama3-70b-instruct-v1%3A0/invoke",
                        signed_by_agent(token), decoy.encode())
    assert resp.status == 403 and awsup.requests == [], resp.body
