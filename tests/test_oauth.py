"""Broker-held OAuth (issue 18), first part: RS256 for the JWT grants (Google service accounts,
GitHub Apps). RSASSA-PKCS1-v1_5 with SHA-256 is deterministic, so RFC 7515's published example
pins it exactly; the key is read from PKCS#1 and PKCS#8 PEM built here from that example's key."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import List

import pytest

from conftest import load_broker_module

sb = load_broker_module()
RFC = json.loads((Path(__file__).parent / "vectors" / "rfc7515_a2_rs256.json").read_text())


def num(field: str) -> int:
    text = RFC["jwk"][field]
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def der(tag: int, content: bytes) -> bytes:
    size = len(content)
    head = bytes([size]) if size < 128 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes(
        (size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + head + content


def der_int(value: int) -> bytes:
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def pem(label: str, body: bytes) -> str:
    text = base64.b64encode(body).decode()
    return f"-----BEGIN {label}-----\n" + "\n".join(text[i:i + 64] for i in range(0, len(text), 64)) + \
        f"\n-----END {label}-----\n"


PKCS1 = der(0x30, b"".join(der_int(v) for v in [0] + [num(f) for f in ("n", "e", "d", "p", "q", "dp", "dq", "qi")]))
RSA_OID = bytes.fromhex("06092a864886f70d0101010500")
PKCS8 = der(0x30, der_int(0) + der(0x30, RSA_OID) + der(0x04, PKCS1))


@pytest.mark.parametrize("text", [pem("RSA PRIVATE KEY", PKCS1), pem("PRIVATE KEY", PKCS8),
                                  pem("PRIVATE KEY", PKCS8).replace("\n", "\\n")])    # as in a JSON file
def test_rs256_matches_rfc_7515_a2(text: str) -> None:
    key = sb.rsa_private_key(text)
    assert key == (num("n"), num("e"), num("d"))
    signature = sb.rs256_sign(key, RFC["signing_input"].encode())
    assert sb.b64url(signature) == RFC["signature"]


def test_a_jwt_verifies_with_the_public_key() -> None:
    key = sb.rsa_private_key(pem("PRIVATE KEY", PKCS8))
    token = sb.jwt_rs256(key, {"iss": "app-1", "iat": 1, "exp": 2})
    head, claims, sig = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "RS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(claims + "==")) == {"iss": "app-1", "iat": 1, "exp": 2}
    s = int.from_bytes(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)), "big")
    em = pow(s, num("e"), num("n")).to_bytes(256, "big")
    import hashlib
    assert em.endswith(hashlib.sha256(f"{head}.{claims}".encode()).digest())
    assert em.startswith(b"\x00\x01\xff\xff") and b"\x00" + sb._SHA256_DIGEST_INFO in em


def small_key_pem() -> str:
    n = num("p") * 3                                  # a 1,026-bit modulus: too small
    return pem("RSA PRIVATE KEY", der(0x30, b"".join(der_int(v) for v in [0, n, 65537, 12345, 1, 1, 1, 1, 1])))


@pytest.mark.parametrize("text", [
    "", "not a key", "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----",
    pem("PRIVATE KEY", PKCS8[:-10]),                                   # truncated
    pem("PRIVATE KEY", der(0x30, der_int(0) + der(0x30, bytes.fromhex("06072a8648ce3d0201")) + der(0x04, PKCS1))),  # EC OID
    pem("RSA PRIVATE KEY", der(0x30, der_int(0) + der(0x04, b"x"))),
    small_key_pem(),
])
def test_a_bad_or_weak_key_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        sb.rsa_private_key(text)


def test_der_items_refuses_bad_lengths() -> None:
    bad: List[bytes] = [b"\x30", b"\x30\x05ab", b"\x30\x85\x00\x00\x00\x00\x01a", b"\x30\x82\xff"]
    for data in bad:
        with pytest.raises(ValueError):
            sb.der_items(data)
