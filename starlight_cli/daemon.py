"""Talking to the starlight daemon's control API (``/run/starlight/daemon.sock``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpclib import GRPCError, Status
from grpclib.client import Channel

from starlight_core.errors import (
    AlreadyExists,
    DaemonUnavailable,
    FailedPrecondition,
    ImageNotFound,
    InvalidInput,
    ProxyUnavailable,
    StarlightError,
)
from starlight_worker.api import control_grpc

__all__ = ["control_client", "translate"]

_BY_STATUS: dict[Status, type[StarlightError]] = {
    Status.INVALID_ARGUMENT: InvalidInput,
    Status.NOT_FOUND: ImageNotFound,
    Status.ALREADY_EXISTS: AlreadyExists,
    Status.FAILED_PRECONDITION: FailedPrecondition,
    Status.UNAVAILABLE: ProxyUnavailable,
}


def translate(exc: GRPCError) -> StarlightError:
    """The daemon reports StarlightErrors as gRPC statuses; turn them back for the user."""
    cls = _BY_STATUS.get(exc.status, StarlightError)
    error = cls(exc.message or exc.status.name, hint="")
    error.hint = None
    return error


@asynccontextmanager
async def control_client(socket: str) -> AsyncIterator[control_grpc.ControlStub]:
    if not os.path.exists(socket):
        raise DaemonUnavailable(f"the starlight daemon is not running (no socket at {socket})")
    channel = Channel(path=socket)
    try:
        yield control_grpc.ControlStub(channel)
    except GRPCError as exc:
        raise translate(exc) from exc
    except (ConnectionError, OSError) as exc:
        raise DaemonUnavailable(f"cannot reach the starlight daemon at {socket}: {exc}") from exc
    finally:
        channel.close()
