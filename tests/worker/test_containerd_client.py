"""``ContainerdClient._call``: UNAVAILABLE from containerd (it cannot reach a plugin behind it,
e.g. our snapshotter socket while its gRPC client redials after a daemon start) is retried
for a while; other errors and a lasting UNAVAILABLE are translated at once / in the end."""

from __future__ import annotations

from typing import Any

import pytest
from grpclib import GRPCError, Status

from starlight_core.errors import NotFound
from starlight_worker import containerd
from starlight_worker.containerd import ContainerdClient, ContainerdUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Flaky:
    """A stub method failing with ``status`` its first ``failures`` calls."""

    def __init__(self, failures: int, status: Status = Status.UNAVAILABLE) -> None:
        self.failures = failures
        self.status = status
        self.calls = 0

    async def __call__(self, request: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise GRPCError(self.status, "connection error: snapshotter.sock: timeout")
        return f"answer to {request}"


async def test_unavailable_is_retried_until_containerd_reaches_the_plugin() -> None:
    method = Flaky(failures=3)
    async with ContainerdClient("/nonexistent/containerd.sock", "test") as client:
        assert await client._call("prepare snapshot", method, "req") == "answer to req"
    assert method.calls == 4


async def test_a_lasting_unavailable_ends_as_containerd_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(containerd, "UNAVAILABLE_PATIENCE", 0.5)
    method = Flaky(failures=1_000)
    async with ContainerdClient("/nonexistent/containerd.sock", "test") as client:
        with pytest.raises(ContainerdUnavailable, match="prepare snapshot") as caught:
            await client._call("prepare snapshot", method, "req")
    assert "snapshotter" in (caught.value.hint or "")
    assert 2 <= method.calls < 20


async def test_other_errors_are_not_retried() -> None:
    method = Flaky(failures=1, status=Status.NOT_FOUND)
    async with ContainerdClient("/nonexistent/containerd.sock", "test") as client:
        with pytest.raises(NotFound):
            await client._call("stat snapshot", method, "req")
    assert method.calls == 1
