"""Image references, parsed and normalised as Docker does.

``redis`` → ``docker.io/library/redis:latest``; ``localhost:5000/app@sha256:…`` keeps its
registry and digest. The grammar is the one of distribution's ``reference`` package.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import InvalidDigest, InvalidReference

__all__ = ["DEFAULT_DOMAIN", "DEFAULT_TAG", "Reference"]

DEFAULT_DOMAIN: Final = "docker.io"
DEFAULT_TAG: Final = "latest"
_LEGACY_DOMAINS: Final = frozenset({"index.docker.io", "registry-1.docker.io"})
_OFFICIAL_PREFIX: Final = "library/"

_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE: Final = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_COMPONENT: Final = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE: Final = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
_TAG_RE: Final = re.compile(r"^[\w][\w.-]{0,127}$")
_MAX_NAME_LENGTH: Final = 255


@attrs.frozen
class Reference:
    """A fully qualified image reference: registry domain, repository path, tag and/or digest."""

    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
        """Parse ``text`` like ``docker pull`` does.

        A reference with neither tag nor digest gets ``default_tag``.
        """
        if not isinstance(text, str) or not text:
            raise InvalidReference("empty image reference")
        if text != text.strip() or any(c.isspace() for c in text):
            raise InvalidReference(f"invalid image reference {text!r}: contains whitespace")
        remainder = text
        digest: Digest | None = None
        if "@" in remainder:
            remainder, _, digest_text = remainder.partition("@")
            try:
                digest = Digest(digest_text)
            except InvalidDigest as exc:
                raise InvalidReference(f"invalid image reference {text!r}: {exc.message}") from exc
        tag: str | None = None
        last_slash = remainder.rfind("/")
        last_colon = remainder.rfind(":")
        if last_colon > last_slash:
            remainder, tag = remainder[:last_colon], remainder[last_colon + 1 :]
            if not _TAG_RE.match(tag):
                raise InvalidReference(f"invalid image reference {text!r}: bad tag {tag!r}")
        domain, path = _split_domain(remainder, text)
        if not _PATH_RE.match(path):
            if path.lower() != path and _PATH_RE.match(path.lower()):
                raise InvalidReference(
                    f"invalid image reference {text!r}: repository name must be lowercase"
                )
            raise InvalidReference(f"invalid image reference {text!r}: bad repository {path!r}")
        if len(domain) + 1 + len(path) > _MAX_NAME_LENGTH:
            raise InvalidReference(f"invalid image reference {text!r}: name too long")
        if tag is None and digest is None:
            tag = default_tag
        return cls(domain=domain, path=path, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """``domain/path`` without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def registry_host(self) -> str:
        """The host to talk to: Docker Hub's API lives at ``registry-1.docker.io``."""
        return "registry-1.docker.io" if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        if self.tag is None:
            raise InvalidReference(f"reference {self} has neither tag nor digest")
        return self.tag

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return attrs.evolve(self, tag=tag, digest=None)

    def with_digest(self, digest: Digest) -> Reference:
        return attrs.evolve(self, digest=Digest(digest))

    def familiar(self) -> str:
        """The short form Docker prints: ``redis:latest`` for the official image."""
        path = self.path
        first = path.split("/", 1)[0]
        # A first component that looks like a registry would be read back as one: keep it whole.
        looks_like_domain = "." in first or ":" in first or first == "localhost"
        if self.domain == DEFAULT_DOMAIN and not looks_like_domain:
            if path.startswith(_OFFICIAL_PREFIX) and path.count("/") == 1:
                path = path[len(_OFFICIAL_PREFIX) :]
            name = path
        else:
            name = self.name
        return name + self._suffix()

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag is not None else ""
        if self.digest is not None:
            suffix += f"@{self.digest}"
        return suffix

    def __str__(self) -> str:
        return self.name + self._suffix()


def _split_domain(remainder: str, original: str) -> tuple[str, str]:
    first, sep, rest = remainder.partition("/")
    if sep and (("." in first or ":" in first) or first == "localhost" or first != first.lower()):
        if not _DOMAIN_RE.match(first):
            raise InvalidReference(f"invalid image reference {original!r}: bad registry {first!r}")
        domain = first
        if domain in _LEGACY_DOMAINS:
            domain = DEFAULT_DOMAIN
        path = rest
    else:
        domain = DEFAULT_DOMAIN
        path = remainder
    if not path:
        raise InvalidReference(f"invalid image reference {original!r}: missing repository")
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    return domain, path
