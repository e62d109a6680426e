"""Content digests (``algorithm:hex``), their computation and verification."""

from __future__ import annotations

import hashlib
import re
from typing import Final

from starlight_core.errors import DigestMismatch, InvalidDigest

__all__ = ["EMPTY_SHA256", "Digest", "DigestVerifier", "sha256_digest"]

_HEX_LENGTHS: Final = {"sha256": 64, "sha512": 128}
_FAST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}\Z|sha512:[0-9a-f]{128}\Z")
_DIGEST_RE: Final = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


class Digest(str):
    """A validated OCI digest string such as ``sha256:e3b0…``.

    It *is* a ``str`` so it serialises as itself and compares with plain strings; construction
    validates it.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if isinstance(value, Digest):
            return value
        if type(value) is str and _FAST_RE.match(value):
            return super().__new__(cls, value)
        if not isinstance(value, str):
            raise InvalidDigest(f"digest must be a string, not {type(value).__name__}")
        match = _DIGEST_RE.match(value)
        if match is None:
            raise InvalidDigest(f"invalid digest {value!r}: expected algorithm:hex")
        algorithm, encoded = match.groups()
        expected = _HEX_LENGTHS.get(algorithm)
        if expected is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm!r} in {value!r}")
        if len(encoded) != expected or not re.fullmatch(r"[0-9a-f]+", encoded):
            raise InvalidDigest(f"invalid {algorithm} digest {value!r}")
        return super().__new__(cls, value)

    @property
    def algorithm(self) -> str:
        return self.split(":", 1)[0]

    @property
    def hex(self) -> str:  # type: ignore[override,unused-ignore]
        return self.split(":", 1)[1]

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def from_hasher(cls, hasher: hashlib._Hash) -> Digest:
        return cls(f"{hasher.name}:{hasher.hexdigest()}")


def sha256_digest(data: bytes | bytearray | memoryview) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


EMPTY_SHA256: Final = sha256_digest(b"")


class DigestVerifier:
    """Hash bytes as they pass and check them against an expected digest at the end."""

    __slots__ = ("_expected", "_hasher", "_what", "size")

    def __init__(self, expected: Digest, what: str = "content") -> None:
        self._expected = Digest(expected)
        self._hasher = self._expected.hasher()
        self._what = what
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        self.size += len(data)

    def actual(self) -> Digest:
        return Digest.from_hasher(self._hasher)

    def verify(self) -> None:
        actual = self.actual()
        if actual != self._expected:
            raise DigestMismatch(
                f"{self._what}: expected {self._expected}, got {actual} ({self.size} bytes)"
            )
