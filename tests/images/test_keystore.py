"""Dating a Java keystore: the JKS layout written by hand, as keytool writes it."""

from __future__ import annotations

import hashlib
import struct

import pytest

from benchmarks.images.keystore import DEBIAN_STOREPASS, KeystoreError, normalise_keystore


def _utf(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _jks(entries: list[tuple[str, int, bytes]], password: str = DEBIAN_STOREPASS) -> bytes:
    body = struct.pack(">III", 0xFEEDFEED, 2, len(entries))
    for alias, millis, certificate in entries:
        body += struct.pack(">I", 2) + _utf(alias) + struct.pack(">q", millis)
        body += _utf("X.509") + struct.pack(">I", len(certificate)) + certificate
    seal = hashlib.sha1(password.encode("utf-16-be") + b"Mighty Aphrodite" + body).digest()
    return body + seal


def test_entries_get_the_build_date_and_a_valid_seal() -> None:
    built_monday = _jks([("debian:a.pem", 1_800_000_000_123, b"cert-a"), ("b", 17, b"cert-b")])
    built_tuesday = _jks([("debian:a.pem", 1_800_086_400_456, b"cert-a"), ("b", 99, b"cert-b")])
    assert built_monday != built_tuesday
    epoch = 1_790_812_800
    fixed = normalise_keystore(built_monday, epoch)
    assert fixed == normalise_keystore(built_tuesday, epoch)
    assert fixed == _jks(
        [("debian:a.pem", epoch * 1000, b"cert-a"), ("b", epoch * 1000, b"cert-b")]
    )
    assert normalise_keystore(fixed, epoch) == fixed


def test_stores_it_cannot_reseal_are_refused() -> None:
    store = _jks([("a", 1, b"c")], password="other")
    with pytest.raises(KeystoreError, match="password"):
        normalise_keystore(store, 0)
    with pytest.raises(KeystoreError):
        normalise_keystore(b"\x30\x82" + bytes(40), 0)  # PKCS#12 (DER), not JKS
    broken = _jks([("a", 1, b"c")])
    with pytest.raises(KeystoreError):
        normalise_keystore(broken[:20] + broken[-20:], 0)
