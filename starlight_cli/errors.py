"""How the CLI reports failures: one line on stderr, a non-zero exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from starlight_core.errors import StarlightError

__all__ = ["EXIT_ERROR", "EXIT_UNAVAILABLE", "fail", "reports_errors"]

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 3  # the daemon, the proxy or a registry cannot be reached

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"ctr-starlight: error: {message}", err=True)
    sys.exit(code)


def reports_errors(func: F) -> F:
    """Turn a ``StarlightError`` escaping a command into a one-line error and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StarlightError as exc:
            code = EXIT_UNAVAILABLE if exc.grpc_status == 14 else EXIT_ERROR
            fail(" ".join(str(exc).split()), code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        return None

    return wrapper  # type: ignore[return-value]
