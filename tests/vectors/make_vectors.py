"""Regenerate the cipher vectors with a second, deliberately plain implementation of the spec
in seks_broker.SecretCipher's docstring (it does not import seks_broker).

    python3 tests/vectors/make_vectors.py   # rewrites tests/vectors/cipher_*.json

Any layout change bumps the version byte and changes prose and vectors in the same commit.
"""
import base64
import hashlib
import hmac
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()      # empty salt = 32 zeros
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def seal(master: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> str:
    enc = hkdf(master, b"seks-broker/v1/encrypt")
    mac = hkdf(master, b"seks-broker/v1/mac")
    stream = b""
    counter = 0
    while len(stream) < len(plaintext):
        stream += hmac.new(enc, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    ct = bytes(p ^ k for p, k in zip(plaintext, stream))
    tag = hmac.new(mac, b"\x01" + nonce + len(ad).to_bytes(4, "big") + ad + ct,
                   hashlib.sha256).digest()
    return base64.urlsafe_b64encode(b"\x01" + nonce + ct + tag).decode()


def secret_ad(name: str, provider: str) -> bytes:
    return b"secret\x00" + name.encode() + b"\x00" + provider.encode()


CASES = [
    ("empty plaintext", bytes(range(32)), bytes(16), secret_ad("a", "openai"), b""),
    ("short key", bytes(range(32)), bytes(range(16)), secret_ad("openai-main", "openai"),
     b"sk-test-openai-0123456789abcdef"),
    ("exactly one block", b"\x42" * 32, b"\x01" * 16, secret_ad("x", "gemini"), b"A" * 32),
    ("block plus one", b"\x42" * 32, b"\x02" * 16, secret_ad("x", "gemini"), b"B" * 33),
    ("telegram key, empty ad", bytes(range(100, 132)), bytes(range(50, 66)), b"",
     b"123456789:AAH-test-telegram-key_0123456789"),
    ("long utf-8 value", bytes(range(7, 39)), bytes(range(9, 25)), secret_ad("n", "notion"),
     ("secret-\u00e9\u6f22\u5b57-" * 20).encode()),
]


def main() -> None:
    generate, verify = [], []
    for desc, master, nonce, ad, pt in CASES:
        token = seal(master, nonce, ad, pt)
        generate.append({"desc": desc, "master_key": master.hex(), "nonce": nonce.hex(),
                         "ad": ad.hex(), "plaintext": pt.hex(), "token": token})
        verify.append({"desc": desc, "master_key": master.hex(), "ad": ad.hex(),
                       "token": token, "plaintext": pt.hex()})
    master, nonce = bytes(range(32)), bytes(range(16))
    ad = secret_ad("openai-main", "openai")
    good = seal(master, nonce, ad, b"sk-test-openai-0123456789abcdef")
    raw = base64.urlsafe_b64decode(good)

    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode()

    def flip(index: int) -> str:
        b = bytearray(raw)
        b[index] ^= 0x01
        return enc(bytes(b))

    invalid = [
        ("tag bit flipped", flip(len(raw) - 1), ad),
        ("ciphertext bit flipped", flip(20), ad),
        ("nonce bit flipped", flip(3), ad),
        ("version byte changed", enc(b"\x02" + raw[1:]), ad),
        ("version 0", enc(b"\x00" + raw[1:]), ad),
        ("truncated by one byte", enc(raw[:-1]), ad),
        ("truncated to header", enc(raw[:17]), ad),
        ("tag removed", enc(raw[:-32]), ad),
        ("empty", "", ad),
        ("wrong associated data: other name", good, secret_ad("openai-other", "openai")),
        ("wrong associated data: other provider", good, secret_ad("openai-main", "groq")),
        ("wrong associated data: empty", good, b""),
        ("not base64", "!!!not-base64!!!", ad),
        ("standard base64 alphabet instead of url-safe", good.replace("-", "+").replace("_", "/")
         if ("-" in good or "_" in good) else good[:-2] + "+/", ad),
        ("trailing garbage", good + "AAAA", ad),
    ]
    invalid_rows = [{"desc": d, "master_key": master.hex(), "ad": a.hex(), "token": t}
                    for d, t, a in invalid]
    for name, rows in (("generate", generate), ("verify", verify), ("invalid", invalid_rows)):
        with open(os.path.join(HERE, f"cipher_{name}.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
