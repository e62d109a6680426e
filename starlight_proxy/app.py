"""The proxy's HTTP API: a Starlette app over the store, the indexer and the bundle planner.

Routes::

    GET  /                     what this is, its version and its API (open)
    GET  /health-check         the database answers (open)
    GET  /metrics              Prometheus text format
    POST /starlight/notify     {"ref", "platform"?, "all_platforms"?} -> NotifyResult
    GET  /starlight/delta      ?to=REF[,REF]&from=REF[,REF]&platform=P[&have=D,..][&offset=N
                               &bundle_id=ID][&ordering=false] -> the bundle stream
    POST /starlight/delta      the same as a JSON DeltaRequest (long ``have`` lists, resumes,
                               ``tocs``: layers whose file lists the worker holds)
    GET  /starlight/images     [?name=REPO] -> ImageList
    POST /starlight/report     one start-up trace (JSON Lines) -> ReportResult (see reports.py)

Every failure is ``{"error": code, "message": text, "hint": text?}`` with the error's HTTP
status; failures of the upstream registry are 502 (whatever the registry answered: it is not
the client's fault), except an image the registry does not have (404).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final

import attrs
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from starlight_core import wire
from starlight_core.errors import (
    AuthenticationRequired,
    ImageNotFound,
    InvalidInput,
    RegistryError,
    StarlightError,
)
from starlight_core.platform import Platform
from starlight_core.proxy_client import (
    BUNDLE_MEDIA_TYPE,
    HEADER_BUNDLE_EXTENTS,
    HEADER_BUNDLE_HEADER_SIZE,
    HEADER_BUNDLE_ID,
    HEADER_BUNDLE_OFFSET,
    HEADER_BUNDLE_SIZE,
    DeltaRequest,
    Health,
    ImageList,
    ImageView,
    NotifyRequest,
    NotifyResult,
)
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_proxy import __version__
from starlight_proxy.auth import ClientAuth
from starlight_proxy.bundles import BundlePlanner, StreamOptions, stream_bundle
from starlight_proxy.config import ProxyConfig
from starlight_proxy.metrics import Metrics
from starlight_proxy.notify import Indexer
from starlight_proxy.reports import TraceReports
from starlight_proxy.store import ImageRecord, SQLMetadataStore, open_store
from starlight_proxy.upstream import Upstreams

__all__ = ["ProxyState", "create_app"]

log = logging.getLogger(__name__)

_MAX_JSON_BODY: Final = 64 * 1024 * 1024
"""A ``have`` list of a million digests fits; anything larger is not a request."""
_OPEN_PATHS: Final = frozenset({"/", "/health-check"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@attrs.define
class ProxyState:
    """What the handlers work with; built when the app starts (or at once, given a store)."""

    config: ProxyConfig
    store: SQLMetadataStore
    upstreams: Upstreams
    indexer: Indexer
    planner: BundlePlanner
    metrics: Metrics
    reports: TraceReports


def _view(image: ImageRecord) -> ImageView:
    return ImageView(
        name=image.name,
        digest=image.digest,
        platform=str(image.platform),
        state=image.state.value,
        tags=image.tags,
        index_digest=image.index_digest,
        config_digest=image.config_digest,
        manifest_media_type=image.manifest_media_type,
        error=image.error,
        created_at=image.created_at,
        updated_at=image.updated_at,
    )


def _json(obj: object, status: int = 200) -> Response:
    return Response(wire.dumps(obj), status_code=status, media_type="application/json")


def _error_body(code: str, message: str, hint: str | None) -> dict[str, str]:
    body = {"error": code, "message": message}
    if hint:
        body["hint"] = hint
    return body


def error_status(exc: StarlightError) -> int:
    """The HTTP status to answer ``exc`` with, from the client's point of view."""
    if isinstance(exc, RegistryError):
        # The registry refused *us* (credentials, rate limit, outage): a bad gateway.
        return 502
    return exc.http_status


async def _read_json(request: Request, cls: type[Any], what: str) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BODY:
            raise InvalidInput(f"{what}: request body larger than {_MAX_JSON_BODY} bytes")
    if not body:
        raise InvalidInput(f"{what}: a JSON body is required")
    return wire.loads(bytes(body), cls, what)


def _split(values: list[str]) -> list[str]:
    """``a,b`` and repeated parameters both give lists."""
    return [part for value in values for part in value.split(",") if part]


def _delta_from_query(request: Request) -> DeltaRequest:
    query = request.query_params
    unknown = set(query) - {"to", "from", "platform", "have", "offset", "bundle_id", "ordering"}
    if unknown:
        raise InvalidInput(f"unknown query parameters: {', '.join(sorted(unknown))}")
    data: dict[str, Any] = {
        "to": _split(query.getlist("to")),
        "from": _split(query.getlist("from")),
        "have": _split(query.getlist("have")),
    }
    if "platform" in query:
        data["platform"] = query["platform"]
    if "bundle_id" in query:
        data["bundle_id"] = query["bundle_id"]
    if "offset" in query:
        if not query["offset"].isdigit():
            raise InvalidInput(f"offset must be a non-negative integer, not {query['offset']!r}")
        data["offset"] = int(query["offset"])
    if "ordering" in query:
        flag = query["ordering"].lower()
        if flag not in ("true", "false", "1", "0"):
            raise InvalidInput(f"ordering must be true or false, not {query['ordering']!r}")
        data["ordering"] = flag in ("true", "1")
    return wire.structure(data, DeltaRequest, "delta request")


_INDEX_PAGE: Final = """starlight-proxy {version}

Starlight delivers container images to workers in one request per image update: first the
file-level metadata of the image, then only the file contents the worker lacks, in the order
containers read them at start-up. This proxy sits next to an OCI registry and serves workers
(the starlight snapshotter) and the ctr-starlight command line.

API
  GET  /health-check          is the proxy (and its database) up
  GET  /metrics               Prometheus metrics
  POST /starlight/notify      {{"ref": "registry/repo:tag", "platform": "linux/amd64"}}
                              index an image converted with ctr-starlight convert
  GET  /starlight/images      what is indexed
  GET  /starlight/delta       ?to=REF&from=REF[,REF...]&platform=OS/ARCH
  POST /starlight/delta       the same as JSON, with "have", "offset" + "bundle_id" to resume
                              -> {media_type} stream
  POST /starlight/report      one start-up trace (JSON Lines, ctr-starlight report): merged
                              into the image's start-up order

Errors are JSON: {{"error": code, "message": text}}.
"""


def create_app(
    config: ProxyConfig,
    *,
    store: SQLMetadataStore | None = None,
    registry: RegistryClient | None = None,
) -> Starlette:
    """The proxy app. Without ``store`` it opens ``config.database`` when it starts (and
    closes it when it stops); given one, it is ready at once and never closes it.
    ``registry`` replaces the registry clients built from the config."""
    metrics = Metrics()
    auth = ClientAuth(config.auth)
    options = StreamOptions.of(config)
    holder: dict[str, ProxyState] = {}

    def build(opened: SQLMetadataStore) -> ProxyState:
        upstreams = Upstreams(config, client=registry)
        indexer = Indexer(opened, upstreams, metrics, jobs=config.notify_jobs)
        planner = BundlePlanner(opened, upstreams, indexer, metrics, auto_notify=config.auto_notify)
        reports = TraceReports(opened)
        return ProxyState(config, opened, upstreams, indexer, planner, metrics, reports)

    if store is not None:
        holder["state"] = build(store)

    def state() -> ProxyState:
        try:
            return holder["state"]
        except KeyError:
            raise StarlightError("the proxy is starting") from None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if store is not None:
            yield
            await holder["state"].upstreams.aclose()
            return
        opened = await _open(config.database)
        holder["state"] = build(opened)
        served = [r.host for r in config.registries]
        if config.allow_any_registry:
            served.append("any other registry")
        log.info(
            "starlight-proxy %s: %s metadata store, serving %s",
            __version__,
            opened.backend,
            ", ".join(served) or "no registry (configure [[registries]])",
        )
        try:
            yield
        finally:
            current = holder.pop("state")
            await current.upstreams.aclose()
            await opened.close()

    async def index(request: Request) -> Response:
        text = _INDEX_PAGE.format(version=__version__, media_type=BUNDLE_MEDIA_TYPE)
        return PlainTextResponse(text)

    async def health(request: Request) -> Response:
        current = state()
        try:
            await current.store.schema_versions()
        except Exception as exc:
            log.warning("health check failed: %r", exc)
            body = _error_body("unhealthy", f"the metadata store does not answer: {exc}", None)
            return JSONResponse(body, status_code=503)
        return _json(Health(status="ok", version=__version__, database=current.store.backend))

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def notify(request: Request) -> Response:
        body: NotifyRequest = await _read_json(request, NotifyRequest, "notify request")
        reference = Reference.parse(body.ref)
        platform = Platform.parse(body.platform) if body.platform is not None else None
        outcome = await state().indexer.notify(
            reference, platform=platform, all_platforms=body.all_platforms
        )
        return _json(
            NotifyResult(
                images=tuple(_view(i) for i in outcome.images),
                layers_scanned=outcome.layers_scanned,
                layers_known=outcome.layers_known,
                seconds=round(outcome.seconds, 6),
            )
        )

    async def images(request: Request) -> Response:
        unknown = set(request.query_params) - {"name"}
        if unknown:
            raise InvalidInput(f"unknown query parameters: {', '.join(sorted(unknown))}")
        name = request.query_params.get("name")
        if name is not None:
            name = Reference.parse(name, default_tag=None).name
        listed = await state().store.list_images(name=name)
        return _json(ImageList(images=tuple(_view(i) for i in listed)))

    async def delta(request: Request) -> Response:
        if request.method == "POST":
            body: DeltaRequest = await _read_json(request, DeltaRequest, "delta request")
        else:
            body = _delta_from_query(request)
        prepared = await state().planner.prepare(body)
        headers = {
            HEADER_BUNDLE_ID: prepared.bundle_id,
            HEADER_BUNDLE_OFFSET: str(prepared.offset),
            HEADER_BUNDLE_SIZE: str(prepared.layout.total),
            HEADER_BUNDLE_EXTENTS: str(len(prepared.extents)),
            HEADER_BUNDLE_HEADER_SIZE: str(prepared.layout.header_size),
            "Cache-Control": "no-store",
        }
        return StreamingResponse(
            stream_bundle(prepared, options, metrics),
            media_type=BUNDLE_MEDIA_TYPE,
            headers=headers,
        )

    async def report(request: Request) -> Response:
        length = request.headers.get("content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        result = await state().reports.receive(request.stream(), declared=declared)
        return _json(result)

    async def starlight_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarlightError)
        status = error_status(exc)
        if status >= 500 and not isinstance(exc, RegistryError | ImageNotFound):
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return JSONResponse(_error_body(exc.code, exc.message, exc.hint), status_code=status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            _error_body(code, f"{request.method} {request.url.path}: {exc.detail}", None),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            _error_body("internal", f"internal error: {type(exc).__name__}", None),
            status_code=500,
        )

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/health-check", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/starlight/notify", notify, methods=["POST"]),
            Route("/starlight/delta", delta, methods=["GET", "POST"]),
            Route("/starlight/images", images, methods=["GET"]),
            Route("/starlight/report", report, methods=["POST"]),
        ],
        exception_handlers={
            StarlightError: starlight_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
    app.add_middleware(_Guard, auth=auth, metrics=metrics)
    return app


async def _open(database: str) -> SQLMetadataStore:
    if "://" not in database or database.startswith("sqlite://"):
        # The default location may not exist on a fresh host.
        path = Path(database.removeprefix("sqlite://"))
        path.parent.mkdir(parents=True, exist_ok=True)
    return await open_store(os.fspath(database))


class _Guard:
    """Outermost ASGI middleware: client authentication, request metrics and latency.

    Latency runs to the last byte of the answer: for a bundle, the whole stream.
    """

    def __init__(self, app: ASGIApp, *, auth: ClientAuth, metrics: Metrics) -> None:
        self.app = app
        self.auth = auth
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = self.metrics.route(path)
        method: str = scope["method"]
        start = time.monotonic()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.latency.labels(route).observe(time.monotonic() - start)

        try:
            if path not in _OPEN_PATHS and not self.auth.allows(_authorization(scope)):
                error = AuthenticationRequired(f"{method} {path}: credentials required")
                response = JSONResponse(
                    _error_body(error.code, error.message, error.hint),
                    status_code=401,
                )
                for challenge in self.auth.challenges():
                    response.headers.append("WWW-Authenticate", challenge)
                await response(scope, receive, observed)
                return
            await self.app(scope, receive, observed)
        finally:
            self.metrics.requests.labels(route, method, str(status)).inc()


def _authorization(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None
