"""Make a Java KeyStore (JKS) file reproducible: entry dates set to SOURCE_DATE_EPOCH.

ca-certificates-java builds ``/etc/ssl/certs/java/cacerts`` when the JRE is installed; the JKS
format records the time each certificate was added, so two builds never match. The format is
simple (magic, version, count; per entry a tag, alias, date in milliseconds, certificate(s);
then a SHA-1 over a password-derived prefix and everything before it): the dates are rewritten
and the integrity digest computed again with the store's password, which is checked first
against the existing digest so that a store we cannot re-seal is left untouched.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Final

__all__ = ["DEBIAN_STOREPASS", "KeystoreError", "normalise_keystore", "normalise_keystore_file"]

_MAGIC: Final = 0xFEEDFEED
_PRIVATE_KEY: Final = 1
_TRUSTED_CERT: Final = 2
_WHITENER: Final = b"Mighty Aphrodite"
DEBIAN_STOREPASS: Final = "changeit"
"""ca-certificates-java's default store password (/etc/default/cacerts)."""


class KeystoreError(ValueError):
    pass


def _seal(body: bytes, password: str) -> bytes:
    return hashlib.sha1(
        password.encode("utf-16-be") + _WHITENER + body, usedforsecurity=False
    ).digest()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise KeystoreError("truncated keystore")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def skip_utf(self) -> None:
        (length,) = struct.unpack(">H", self.take(2))
        self.take(length)

    def skip_certificate(self, version: int) -> None:
        if version == 2:
            self.skip_utf()  # certificate type ("X.509")
        self.take(self.u32())


def normalise_keystore(data: bytes, epoch: int, password: str = DEBIAN_STOREPASS) -> bytes:
    """``data`` with every entry dated ``epoch`` (seconds) and the digest sealed again."""
    if len(data) < 32:
        raise KeystoreError("not a JKS keystore: too short")
    body, digest = data[:-20], data[-20:]
    if _seal(body, password) != digest:
        raise KeystoreError("integrity digest does not match the password")
    reader = _Reader(body)
    magic, version, count = reader.u32(), reader.u32(), reader.u32()
    if magic != _MAGIC or version not in (1, 2):
        raise KeystoreError(f"not a JKS keystore (magic {magic:#x}, version {version})")
    stamp = struct.pack(">q", epoch * 1000)
    out = bytearray(body)
    for _ in range(count):
        tag = reader.u32()
        reader.skip_utf()  # alias
        out[reader.at : reader.at + 8] = stamp
        reader.take(8)
        if tag == _PRIVATE_KEY:
            reader.take(reader.u32())  # protected key
            for _ in range(reader.u32()):
                reader.skip_certificate(version)
        elif tag == _TRUSTED_CERT:
            reader.skip_certificate(version)
        else:
            raise KeystoreError(f"unknown keystore entry tag {tag}")
    if reader.at != len(body):
        raise KeystoreError("trailing bytes after the keystore entries")
    return bytes(out) + _seal(bytes(out), password)


def normalise_keystore_file(path: Path, epoch: int) -> None:
    """Rewrite ``path`` in place when it is a JKS store sealed with the Debian password."""
    data = path.read_bytes()
    fixed = normalise_keystore(data, epoch)
    if fixed != data:
        stat = path.stat()
        path.write_bytes(fixed)
        path.chmod(stat.st_mode & 0o7777)
