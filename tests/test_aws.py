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


def test_a_secret_narrows_services_and_regions() -> None:
    assert sb.aws_allowed({}, "bedrock-runtime", "ap-south-1") is None
    assert isinstance(sb.aws_allowed({}, "iam", "us-east-1"), sb.Forbidden)
    narrow = {"services": "s3", "regions": "eu-west-1, eu-central-1"}
    assert sb.aws_allowed(narrow, "s3", "eu-central-1") is None
    assert isinstance(sb.aws_allowed(narrow, "s3", "us-east-1"), sb.Forbidden)
    assert isinstance(sb.aws_allowed(narrow, "bedrock-runtime", "eu-west-1"), sb.Forbidden)


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


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n0\r\n\r\n", b"3\r\nabcXY0\r\n\r\n", b"5\r\nab", b"3;x\r\nabc\r\n",
                                  b"1" * 5000, b"3\r\nabc\r\n0\r\nno-colon\r\n\r\n"])
def test_a_malformed_aws_chunked_body_is_a_400(body: bytes) -> None:
    with pytest.raises(sb.BadRequest):
        b"".join(sb.aws_unchunk([body], {}))


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
    code, headers, body = sb.error_answer(exc, "aws-json")
    assert headers["x-amzn-ErrorType"] == json_code and json.loads(body) == {"__type": json_code, "message": "no <way> & back"}
