"""An async client for the Starlight proxy's HTTP API, and the API's JSON models.

The CLI (notify, ping, images) and the worker's bundle fetcher both use ``ProxyClient``::

    async with ProxyClient("http://proxy:8090", user="worker:secret") as proxy:
        await proxy.notify("registry.example/app:v2")
        async with proxy.delta(DeltaRequest(to=("registry.example/app:v2",),
                                            from_=("registry.example/app:v1",))) as bundle:
            async for chunk in bundle:
                reader.receive_data(chunk)

Errors: the proxy answers ``{"error": code, "message": ..., "hint": ...}``; the client raises
the ``StarlightError`` subclass with that code. A proxy that cannot be reached (refused,
timed out, cut) is ``ProxyUnavailable``. Like ``starlight_core.registry``, importing
``starlight_core`` does not import this module (nor httpx).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Final, TypeVar

import attrs
import httpx
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from starlight_core import __version__, wire
from starlight_core.bundle.codec import error_for
from starlight_core.bundle.header import ResumeInfo
from starlight_core.digest import Digest
from starlight_core.errors import (
    AuthenticationRequired,
    InvalidInput,
    NotFound,
    ProxyUnavailable,
    ResourceExhausted,
    StarlightError,
)
from starlight_core.platform import Platform
from starlight_core.reference import Reference

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "HEADER_BUNDLE_EXTENTS",
    "HEADER_BUNDLE_HEADER_SIZE",
    "HEADER_BUNDLE_ID",
    "HEADER_BUNDLE_OFFSET",
    "HEADER_BUNDLE_SIZE",
    "TRACE_MEDIA_TYPE",
    "BundleStream",
    "DeltaRequest",
    "Health",
    "ImageList",
    "ImageView",
    "NotifyRequest",
    "NotifyResult",
    "ProxyClient",
    "ReportResult",
    "TraceTooLarge",
    "error_from_response",
]

BUNDLE_MEDIA_TYPE: Final = "application/vnd.starlight.bundle.v1"
HEADER_BUNDLE_ID: Final = "Starlight-Bundle-Id"
HEADER_BUNDLE_OFFSET: Final = "Starlight-Bundle-Offset"
"""Stream offset of this response's first byte (the requested ``offset``)."""
HEADER_BUNDLE_SIZE: Final = "Starlight-Bundle-Size"
"""Length of the whole stream when it completes (the response carries ``size - offset``)."""
HEADER_BUNDLE_EXTENTS: Final = "Starlight-Bundle-Extents"
HEADER_BUNDLE_HEADER_SIZE: Final = "Starlight-Bundle-Header-Size"
TRACE_MEDIA_TYPE: Final = "application/vnd.starlight.trace.v1+jsonl"
"""``POST /starlight/report`` takes one start-up trace in its JSON Lines form."""
_NOTIFY_TIMEOUT: Final = 3600.0  # indexing a large image reads every layer blob once
_MAX_ERROR_BODY: Final = 64 * 1024
T = TypeVar("T")


# --- the API's JSON models ------------------------------------------------------------------


@attrs.frozen
class NotifyRequest:
    """``POST /starlight/notify``: index ``ref`` (one platform, or all of an index)."""

    ref: str
    platform: str | None = None
    """Default: the image's only platform, or the proxy's own for an index."""
    all_platforms: bool = False


@attrs.frozen
class ImageView:
    """One indexed image (one platform's manifest) as ``/starlight/images`` lists it."""

    name: str
    digest: Digest
    platform: str
    state: str
    """``indexing``, ``ready`` or ``failed``."""
    tags: tuple[str, ...] = ()
    index_digest: Digest | None = None
    config_digest: Digest | None = None
    manifest_media_type: str | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.digest}"


@attrs.frozen
class NotifyResult:
    images: tuple[ImageView, ...]
    layers_scanned: int = 0
    """Layer blobs read and indexed by this notify."""
    layers_known: int = 0
    """Layers whose TOC the proxy had already (shared with images indexed before)."""
    seconds: float = 0.0


@attrs.frozen
class ReportResult:
    """``POST /starlight/report``: what became of one uploaded trace."""

    trace_id: str
    image: str
    """The traced image as the proxy knows it: ``name@manifest-digest``."""
    stored: bool
    """False: a trace with this id was stored before (an upload repeated), nothing changed."""
    accesses: int = 0
    files_ranked: int = 0
    """Files in the image's ranking after this trace was merged."""
    group: str | None = None


class TraceTooLarge(ResourceExhausted):
    """An uploaded trace is larger than the proxy accepts (HTTP 413)."""

    code = "trace_too_large"
    http_status = 413


@attrs.frozen
class ImageList:
    images: tuple[ImageView, ...]


@attrs.frozen
class Health:
    status: str
    version: str
    database: str


def _as_tuple(value: Any, _: Any) -> tuple[str, ...]:
    # ``to`` and ``from`` take one reference or a list of them.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidInput("expected a reference or a list of references")


@attrs.frozen(kw_only=True)
class DeltaRequest:
    """``POST /starlight/delta``: the bundle provisioning ``to`` on a worker holding ``from_``.

    ``to`` is one reference, or several for one joint bundle. ``have`` names contents the
    worker holds besides those of the ``from_`` images. ``offset`` with ``bundle_id`` resumes
    that bundle byte for byte (412 ``bundle_changed`` if the proxy would now send another);
    ``resumes`` marks a new bundle as the continuation of an interrupted one (it is written in
    the header). ``ordering`` false sends contents in layer order (for measurements);
    ``tocs`` spares the header the file lists the worker already has.
    """

    to: tuple[str, ...]
    from_: tuple[str, ...] = ()
    platform: str | None = None
    have: tuple[Digest, ...] = ()
    offset: int = 0
    bundle_id: str | None = None
    ordering: bool = True
    resumes: ResumeInfo | None = None
    tocs: tuple[Digest, ...] = ()
    """diff_ids of layers whose TOC the worker holds: the header sends those layers without
    their entries (``BundleHeader.omitted``), which makes an update's header small."""

    def __attrs_post_init__(self) -> None:
        if not self.to:
            raise InvalidInput("a delta needs at least one target image (to)")
        if self.offset < 0:
            raise InvalidInput("offset must not be negative")
        if self.offset and self.bundle_id is None:
            raise InvalidInput("resuming at an offset needs the bundle_id")


for _cls in (NotifyRequest, ImageView, NotifyResult, ImageList, Health, ReportResult):
    wire.register(_cls, forbid_extra_keys=_cls in (NotifyRequest,))

_DELTA_OVERRIDES: Final[dict[str, Any]] = {
    "from_": override(rename="from", struct_hook=_as_tuple),
    "to": override(struct_hook=_as_tuple),
}
wire.converter.register_structure_hook(
    DeltaRequest,
    make_dict_structure_fn(
        DeltaRequest, wire.converter, _cattrs_forbid_extra_keys=True, **_DELTA_OVERRIDES
    ),
)
wire.converter.register_unstructure_hook(
    DeltaRequest,
    make_dict_unstructure_fn(
        DeltaRequest,
        wire.converter,
        _cattrs_omit_if_default=True,
        from_=override(rename="from"),
    ),
)


# --- errors -----------------------------------------------------------------------------------


def error_from_response(status: int, body: bytes, *, what: str) -> StarlightError:
    """The error a proxy's failed answer stands for (its JSON, else its status)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        message = str(document.get("message") or document["error"])
        error = error_for(document["error"], f"{what}: {message}")
        hint = document.get("hint")
        if isinstance(hint, str) and hint:
            error.hint = hint
        return error
    text = " ".join(body.decode("utf-8", errors="replace").split())[:200]
    message = f"{what}: HTTP {status}" + (f" {text}" if text else "")
    if status == 401:
        return AuthenticationRequired(message)
    if status == 404:
        return NotFound(message)
    if status >= 500:
        return ProxyUnavailable(message)
    return StarlightError(message)


def _describe(exc: httpx.HTTPError) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the client -------------------------------------------------------------------------------


class BundleStream:
    """A bundle response: its headers, then ``async for chunk in stream`` (raw bytes).

    A connection lost mid-stream raises ``ProxyUnavailable``; ``received`` says how many
    bytes arrived (resume from ``offset + received``).
    """

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.received = 0
        headers = response.headers
        self.bundle_id: str = headers.get(HEADER_BUNDLE_ID, "")
        self.offset = _int_header(headers, HEADER_BUNDLE_OFFSET)
        self.size = _int_header(headers, HEADER_BUNDLE_SIZE)
        self.extents = _int_header(headers, HEADER_BUNDLE_EXTENTS)
        self.header_size = _int_header(headers, HEADER_BUNDLE_HEADER_SIZE)

    @property
    def headers(self) -> httpx.Headers:
        return self._response.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                self.received += len(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise ProxyUnavailable(
                f"proxy {self._url}: bundle {self.bundle_id[:12]} cut after "
                f"{self.offset + self.received} bytes: {_describe(exc)}",
                hint="ask again from that offset with the bundle_id",
            ) from exc

    async def read(self) -> bytes:
        """The rest of the stream in memory (tests and small bundles)."""
        return b"".join([chunk async for chunk in self])


def _int_header(headers: httpx.Headers, name: str) -> int:
    value = headers.get(name, "0")
    return int(value) if value.isdigit() else 0


class ProxyClient:
    """Talk to one proxy: ``async with ProxyClient(url) as proxy: ...``.

    ``user`` (``USER:PASSWORD``) or ``token`` authenticate this client; ``transport`` replaces
    the network (tests: ``httpx.ASGITransport(app=create_app(...))``).
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"proxy URL {url!r} must start with http:// or https://")
        if user is not None and token is not None:
            raise InvalidInput("give the proxy a user or a token, not both")
        headers = {"User-Agent": f"starlight/{__version__}"}
        if user is not None:
            if ":" not in user:
                raise InvalidInput("proxy credentials must be given as USER:PASSWORD")
            headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
        )

    async def __aenter__(self) -> ProxyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @contextlib.asynccontextmanager
    async def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """One request, its answer open for streaming; failures raised as StarlightErrors."""
        headers = {"Accept": "application/json"}
        content = None
        if body is not None:
            content = wire.dumps(body)
            headers["Content-Type"] = "application/json"
        request = self._http.build_request(
            method,
            path,
            content=content,
            params=params,
            headers=headers,
            timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        describe = f"proxy {self.url}: {what}"
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ProxyUnavailable(f"{describe}: {_describe(exc)}") from exc
        try:
            if response.status_code >= 400:
                error_body = await _read_limited(response, describe)
                raise error_from_response(response.status_code, error_body, what=describe)
            yield response
        finally:
            await response.aclose()

    async def _json(
        self,
        method: str,
        path: str,
        what: str,
        cls: type[T],
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> T:
        async with self._send(
            method, path, what, body=body, params=params, timeout=timeout
        ) as response:
            data = await _read_limited(response, f"proxy {self.url}: {what}", limit=None)
        try:
            return wire.loads(data, cls, f"proxy answer to {what}")
        except InvalidInput as exc:
            raise StarlightError(f"proxy {self.url}: {exc.message}") from exc

    async def health(self) -> Health:
        return await self._json("GET", "/health-check", "checking health", Health)

    async def ping(self) -> float:
        """Seconds one health check took, round trip."""
        start = time.perf_counter()
        await self.health()
        return time.perf_counter() - start

    async def notify(
        self,
        reference: Reference | str,
        *,
        platform: Platform | str | None = None,
        all_platforms: bool = False,
        timeout: float = _NOTIFY_TIMEOUT,
    ) -> NotifyResult:
        """Have the proxy index ``reference`` (it reads every new layer: may take a while)."""
        request = NotifyRequest(
            ref=str(reference),
            platform=None if platform is None else str(platform),
            all_platforms=all_platforms,
        )
        return await self._json(
            "POST",
            "/starlight/notify",
            f"notifying {reference}",
            NotifyResult,
            body=request,
            timeout=timeout,
        )

    async def images(self, *, name: str | None = None) -> list[ImageView]:
        params = {"name": name} if name is not None else None
        listed = await self._json(
            "GET", "/starlight/images", "listing images", ImageList, params=params
        )
        return list(listed.images)

    @contextlib.asynccontextmanager
    async def delta(
        self, request: DeltaRequest, *, timeout: float | None = None
    ) -> AsyncIterator[BundleStream]:
        """Open the bundle stream for ``request`` (errors before the first byte are raised
        here; errors mid-stream arrive as the bundle's ERROR record)."""
        what = f"bundle for {', '.join(request.to)}"
        async with self._send(
            "POST", "/starlight/delta", what, body=request, timeout=timeout
        ) as response:
            yield BundleStream(response, self.url)

    async def report(self, trace: bytes, *, timeout: float | None = None) -> ReportResult:
        """Upload one start-up trace (its JSON Lines form). Repeating an upload is harmless:
        the proxy answers ``stored=False``. A trace the proxy refuses raises the error it
        answered (``InvalidInput``, ``ImageNotFound``, ``TraceTooLarge``…)."""
        describe = f"proxy {self.url}: reporting a trace"
        request = self._http.build_request(
            "POST",
            "/starlight/report",
            content=trace,
            headers={"Accept": "application/json", "Content-Type": TRACE_MEDIA_TYPE},
            timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ProxyUnavailable(f"{describe}: {_describe(exc)}") from exc
        try:
            limit = _MAX_ERROR_BODY if response.status_code >= 400 else None
            body = await _read_limited(response, describe, limit=limit)
        finally:
            await response.aclose()
        if response.status_code >= 400:
            raise error_from_response(response.status_code, body, what=describe)
        try:
            return wire.loads(body, ReportResult, "proxy answer to a report")
        except InvalidInput as exc:
            raise StarlightError(f"proxy {self.url}: {exc.message}") from exc


async def _read_limited(
    response: httpx.Response, describe: str, *, limit: int | None = _MAX_ERROR_BODY
) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if limit is not None and size > limit:
                break
            parts.append(chunk)
    except httpx.HTTPError as exc:
        raise ProxyUnavailable(f"{describe}: connection lost: {_describe(exc)}") from exc
    return b"".join(parts)
