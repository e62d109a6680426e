"""Platforms (``os/arch[/variant]``), normalised and matched the way containerd does."""

from __future__ import annotations

import platform as _stdlib_platform
import re
from typing import Final

import attrs

from starlight_core.errors import InvalidPlatform

__all__ = ["Platform"]

_ARCH_ALIASES: Final = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "386": ("386", None),
}
_OS_ALIASES: Final = {"macos": "darwin"}
_PART_RE: Final = re.compile(r"^[a-z0-9_.-]+$")


def _normalize(arch: str, variant: str | None) -> tuple[str, str | None]:
    arch = arch.lower()
    variant = variant.lower() if variant else None
    canonical, implied_variant = _ARCH_ALIASES.get(arch, (arch, None))
    if implied_variant is not None and variant is None:
        variant = implied_variant
    if canonical == "arm64" and variant in ("8", "v8"):
        variant = None
    elif canonical == "arm":
        if variant in (None, "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    elif canonical == "amd64" and variant in ("v1", "1"):
        variant = None
    return canonical, variant


@attrs.frozen
class Platform:
    """A normalised platform; ``linux/arm64/v8`` and ``linux/aarch64`` are the same one."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def create(cls, os: str, architecture: str, variant: str | None = None) -> Platform:
        if not os or not architecture:
            raise InvalidPlatform("a platform needs an os and an architecture")
        for part in (os, architecture, variant or "x"):
            if not _PART_RE.match(part.lower()):
                raise InvalidPlatform(f"invalid platform component {part!r}")
        arch, normalized_variant = _normalize(architecture, variant or None)
        return cls(
            os=_OS_ALIASES.get(os.lower(), os.lower()),
            architecture=arch,
            variant=normalized_variant,
        )

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` (``linux/amd64``, ``linux/arm64/v8``)."""
        parts = text.strip().split("/") if isinstance(text, str) else []
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidPlatform(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls.create(*parts)

    @classmethod
    def host(cls) -> Platform:
        return cls.create("linux", _stdlib_platform.machine() or "amd64")

    def matches(self, other: Platform) -> bool:
        """Whether an image built for ``other`` is the one asked for by ``self`` (exact)."""
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and self.variant == other.variant
        )

    def runs(self, other: Platform) -> bool:
        """Whether a host of platform ``self`` can run an image built for ``other``."""
        if self.matches(other):
            return True
        if self.os != other.os:
            return False
        if self.architecture == "arm" and other.architecture == "arm":
            return _arm_rank(other.variant) <= _arm_rank(self.variant)
        if self.architecture == "arm64" and other.architecture == "arm":
            return other.variant in ("v7", "v6", "v5")
        return self.architecture == "amd64" and other.architecture == "386"

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def _arm_rank(variant: str | None) -> int:
    return int(variant[1:]) if variant and variant[1:].isdigit() else 7
