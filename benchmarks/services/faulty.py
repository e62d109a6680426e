"""An HTTP forwarder that puts faults between a client and a real server.

``FaultyProxy(upstream)`` listens on a loopback port and forwards every request to
``upstream`` (keeping the ``Host`` header, so a registry's ``Location`` URLs point back at the
forwarder). Faults are planned per request: answer a status instead of forwarding (``fail``),
cut a response body after N bytes (``cut_after``), slow a body down (``rate``), or flip one
byte of it (``corrupt_at``). A fault can also keep a copy of each body it forwarded
(``capture``) and counts the body bytes it sent (``sent``), so tests can tell exactly what a
client received. Tests use it to make a real registry or proxy fail and recover on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

import attrs
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from benchmarks.services import free_port, wait_for

__all__ = ["Fault", "FaultyProxy"]

_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)


@attrs.define
class Fault:
    """What to do to requests that ``match`` (method, path): the first ``times`` of them."""

    match: Callable[[str, str], bool] = lambda method, path: True
    times: int = 1
    status: int | None = None
    """Answer this status without forwarding."""
    cut_after: int | None = None
    """Forward, but drop the connection after this many body bytes."""
    rate: float | None = None
    """Forward, but deliver the body at about this many bytes per second."""
    corrupt_at: int | None = None
    """Forward, but flip every bit of the body byte at this offset."""
    capture: bool = False
    """Keep a copy of each body sent (``bodies``, one per hit, in order)."""
    hits: int = 0
    sent: int = 0
    """Body bytes sent to clients by the requests this fault matched."""
    bodies: list[bytearray] = attrs.Factory(list)


class FaultyProxy:
    def __init__(self, upstream: str, *, port: int | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port or free_port()
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.hits < fault.times and fault.match(method, path):
                    fault.hits += 1
                    return fault
        return None

    async def _forward(self, request: Request) -> Response:
        fault = self._fault_for(request.method, request.url.path)
        if fault is not None and fault.status is not None:
            return Response(f"injected fault {fault.status}\n", status_code=fault.status)
        client: httpx.AsyncClient = request.app.state.client
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        url = (
            self.upstream
            + request.url.path
            + (f"?{request.url.query}" if request.url.query else "")
        )
        upstream = client.build_request(
            request.method, url, headers=headers, content=request.stream()
        )
        response = await client.send(upstream, stream=True)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}

        captured = bytearray()
        if fault is not None and fault.capture:
            fault.bodies.append(captured)

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                async for chunk in response.aiter_raw():
                    if fault is not None and fault.cut_after is not None:
                        room = fault.cut_after - sent
                        if room <= 0:
                            raise ConnectionAbortedError("injected cut")
                        chunk = chunk[:room]
                    if fault is not None and fault.rate:
                        await asyncio.sleep(len(chunk) / fault.rate)
                    if fault is not None and fault.corrupt_at is not None:
                        at = fault.corrupt_at - sent
                        if 0 <= at < len(chunk):
                            chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
                    sent += len(chunk)
                    if fault is not None:
                        fault.sent += len(chunk)
                        if fault.capture:
                            captured.extend(chunk)
                    yield chunk
            finally:
                await response.aclose()

        if "content-length" in response.headers and (fault is None or fault.cut_after is None):
            out_headers["content-length"] = response.headers["content-length"]
        return StreamingResponse(body(), status_code=response.status_code, headers=out_headers)

    def start(self) -> None:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with httpx.AsyncClient(timeout=None, follow_redirects=False) as client:
                app.state.client = client
                yield

        app = Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._forward,
                    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                )
            ],
            lifespan=lifespan,
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(
            lambda: self._server is not None and self._server.started,
            timeout=10,
            what="fault-injecting proxy",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FaultyProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
