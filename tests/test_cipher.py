"""The cipher's format is a spec: fixed vectors (generate / verify / invalid), HKDF against
RFC 5869, round trips and tampering. Vectors come from tests/vectors/make_vectors.py, a second
implementation of the spec that does not share code with seks_broker."""
import base64
import json
import os

import pytest

import seks_broker
from seks_broker import DecryptError, SecretCipher, hkdf_sha256, secret_ad

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def load(name):
    with open(os.path.join(VECTORS, f"cipher_{name}.json")) as fh:
        rows = json.load(fh)
    assert rows, name
    return pytest.mark.parametrize("row", rows, ids=[r["desc"] for r in rows])


@load("invalid")
def test_invalid_vectors_are_rejected_with_one_messageless_error(row):
    cipher = SecretCipher(bytes.fromhex(row["master_key"]))
    with pytest.raises(DecryptError) as info:
        cipher.decrypt(row["token"], bytes.fromhex(row["ad"]))
    assert str(info.value) == ""


@load("generate")
def test_generate_vectors(row):
    cipher = SecretCipher(bytes.fromhex(row["master_key"]))
    token = cipher.encrypt(bytes.fromhex(row["plaintext"]), bytes.fromhex(row["ad"]),
                           nonce=bytes.fromhex(row["nonce"]))
    assert token == row["token"]


@load("verify")
def test_verify_vectors(row):
    cipher = SecretCipher(bytes.fromhex(row["master_key"]))
    assert cipher.decrypt(row["token"], bytes.fromhex(row["ad"])) == bytes.fromhex(row["plaintext"])


RFC5869 = [
    # (IKM, salt, info, L, OKM) -- RFC 5869 appendix A, test cases 1-3 (SHA-256)
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xB0)).hex(), bytes(range(0xB0, 0x100)).hex(), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
     "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
     "cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    ("0b" * 22, "", "", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize("ikm,salt,info,length,okm", RFC5869, ids=["case1", "case2", "case3"])
def test_hkdf_rfc5869(ikm, salt, info, length, okm):
    assert hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length).hex() == okm


def test_round_trip_and_fresh_nonce_each_time():
    cipher = SecretCipher(os.urandom(32))
    ad = secret_ad("main", "openai")
    for size in (0, 1, 31, 32, 33, 1000):
        plaintext = os.urandom(size)
        first, second = cipher.encrypt(plaintext, ad), cipher.encrypt(plaintext, ad)
        assert first != second                      # random nonce per encryption
        assert cipher.decrypt(first, ad) == plaintext
        assert cipher.decrypt(second, ad) == plaintext


def test_every_single_bit_flip_is_rejected():
    cipher = SecretCipher(bytes(32))
    ad = secret_ad("main", "openai")
    raw = base64.urlsafe_b64decode(cipher.encrypt(b"sk-test-0123", ad))
    for index in range(len(raw)):
        for bit in range(8):
            tampered = bytearray(raw)
            tampered[index] ^= 1 << bit
            with pytest.raises(DecryptError):
                cipher.decrypt(base64.urlsafe_b64encode(bytes(tampered)).decode(), ad)


def test_other_master_key_is_rejected():
    ad = secret_ad("main", "openai")
    token = SecretCipher(bytes(32)).encrypt(b"sk-test-x", ad)
    with pytest.raises(DecryptError):
        SecretCipher(bytes([1]) + bytes(31)).decrypt(token, ad)


def test_layout_is_version_nonce_ciphertext_tag():
    cipher = SecretCipher(bytes(32))
    raw = base64.urlsafe_b64decode(cipher.encrypt(b"abc", b"", nonce=b"N" * 16))
    assert raw[0] == 1 and raw[1:17] == b"N" * 16 and len(raw) == 1 + 16 + 3 + 32


def test_repr_hides_keys():
    cipher = SecretCipher(b"K" * 32)
    assert "K" * 4 not in repr(cipher) and "hidden" in repr(cipher)


def test_master_key_length_checked():
    with pytest.raises(ValueError):
        SecretCipher(b"short")


def test_spec_is_written_in_the_docstring():
    doc = seks_broker.SecretCipher.__doc__
    for phrase in ("version", "nonce", "tag", "compare_digest", "HKDF"):
        assert phrase in doc
