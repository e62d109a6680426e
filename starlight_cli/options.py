"""Option types and option groups shared by several commands."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from starlight_core.errors import InvalidInput, InvalidPlatform, InvalidReference
from starlight_core.platform import Platform
from starlight_core.reference import Reference

__all__ = ["PLATFORM", "REFERENCE", "SIZE", "registry_options"]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class _ReferenceType(click.ParamType[Reference]):
    name = "REF"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Reference:
        if isinstance(value, Reference):
            return value
        try:
            return Reference.parse(value)
        except InvalidReference as exc:
            self.fail(exc.message, param, ctx)


class _PlatformType(click.ParamType[Platform]):
    name = "OS/ARCH[/VARIANT]"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Platform:
        if isinstance(value, Platform):
            return value
        try:
            return Platform.parse(value)
        except InvalidPlatform as exc:
            self.fail(exc.message, param, ctx)


class _SizeType(click.ParamType[int]):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE_RE.match(str(value))
        if match is None or int(match.group(1)) <= 0:
            self.fail(f"invalid size {value!r} (e.g. 4MiB, 512k, 1048576)", param, ctx)
        unit = (match.group(2) or "").lower()[:1]
        return int(match.group(1)) * _UNITS[unit]


REFERENCE = _ReferenceType()
PLATFORM = _PlatformType()
SIZE = _SizeType()


def parse_credentials(value: str | None) -> str | None:
    if value is not None and ":" not in value:
        raise InvalidInput("credentials must be given as USER:PASSWORD")
    return value


def registry_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--plain-http`` / ``--insecure`` for commands that talk to registries."""
    func = click.option(
        "--insecure",
        is_flag=True,
        help="Skip TLS certificate verification for registries.",
    )(func)
    return click.option(
        "--plain-http",
        is_flag=True,
        help="Talk plain HTTP to registries (e.g. a local registry on 127.0.0.1:5000).",
    )(func)
