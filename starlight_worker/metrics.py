"""The daemon's Prometheus metrics, and the small HTTP endpoint that serves them.

Exposed when ``metrics_address`` is set in the daemon's configuration (``HOST:PORT``, e.g.
``127.0.0.1:9863``; empty, the default, serves nothing): ``GET /metrics`` answers the text
exposition format. One registry per ``Metrics`` object, so tests and several daemons in one
process never mix their counts.

What is counted (all counters, monotonic since the daemon started):

- ``starlight_worker_pulls_total{outcome}`` — pull attempts ended: ``complete``, ``failed``
  (before the image was ready: reported to the caller), ``retrying`` (after: retried in the
  background), ``resumed`` (started again from the store after a daemon restart).
- ``starlight_worker_pull_resumes_total{reason}`` — reconnections inside a pull.
- ``starlight_worker_bundle_bytes_total`` — bundle bytes received from the proxy.
- ``starlight_worker_remote_layers_total`` — layers containerd asked for through the
  remote-snapshot protocol that starlight provides lazily.
- ``starlight_worker_remote_fallbacks_total{reason}`` — such layers declined: containerd pulls
  and unpacks them itself (a full download). ``reason`` is a short code: ``no_image_labels``,
  ``image_not_found``, ``layer_not_in_image``, ``proxy_unavailable``, ``timeout``, or the error
  code the proxy answered with.
- ``starlight_worker_fuse_detached_total`` — complete layers the reaper detached from FUSE.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import anyio
import anyio.abc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from starlight_core.errors import InvalidInput

__all__ = ["Metrics", "parse_address", "serve_metrics"]

log = logging.getLogger(__name__)

_MAX_REQUEST: Final = 8192
_READ_TIMEOUT: Final = 5.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pulls = Counter(
            "starlight_worker_pulls",
            "Pull attempts ended, by outcome (complete, failed, retrying, resumed).",
            ("outcome",),
            registry=r,
        )
        self.pull_resumes = Counter(
            "starlight_worker_pull_resumes",
            "Reconnections inside a pull, by reason (the error's code).",
            ("reason",),
            registry=r,
        )
        self.bundle_bytes = Counter(
            "starlight_worker_bundle_bytes", "Bundle bytes received from the proxy.", registry=r
        )
        self.remote_layers = Counter(
            "starlight_worker_remote_layers",
            "Layers asked for by containerd's remote-snapshot protocol and served lazily.",
            registry=r,
        )
        self.remote_fallbacks = Counter(
            "starlight_worker_remote_fallbacks",
            "Layers asked for by containerd's remote-snapshot protocol that starlight declined"
            " (containerd downloads and unpacks them itself), by reason.",
            ("reason",),
            registry=r,
        )
        self.fuse_detached = Counter(
            "starlight_worker_fuse_detached",
            "Complete layers detached from FUSE once no mount used them.",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 if never counted): for tests and ``status``."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 <= int(port) <= 65535:
        raise InvalidInput(
            f"metrics_address {address!r} is not HOST:PORT", hint="e.g. 127.0.0.1:9863"
        )
    return host.strip("[]"), int(port)


async def _answer(metrics: Metrics, stream: anyio.abc.ByteStream) -> None:
    async with stream:
        request = b""
        with anyio.move_on_after(_READ_TIMEOUT):
            while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                try:
                    chunk = await stream.receive(4096)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                request += chunk
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
            status, body, kind = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
        elif line[1].split(b"?", 1)[0] != b"/metrics":
            status, body, kind = b"404 Not Found", b"GET /metrics\n", b"text/plain"
        else:
            status, body, kind = b"200 OK", metrics.exposition(), CONTENT_TYPE_LATEST.encode()
        head = (
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(head + (body if line[:1] != [b"HEAD"] else b""))


async def serve_metrics(
    metrics: Metrics,
    address: str,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``address`` until cancelled; reports the bound port."""
    host, port = parse_address(address)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("metrics at http://%s:%d/metrics", host, bound)
        task_status.started(bound)

        async def handle(stream: anyio.abc.ByteStream) -> None:
            try:
                await _answer(metrics, stream)
            except Exception:  # one bad client must not end the endpoint
                log.debug("metrics request failed", exc_info=True)

        await listener.serve(handle)
