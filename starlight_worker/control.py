"""The control API (``starlight.control.v1.Control``) that ``ctr-starlight`` talks to."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import anyio
from grpclib import GRPCError, Status
from grpclib.server import Stream

from starlight_core.errors import InvalidInput, StarlightError
from starlight_core.platform import Platform
from starlight_core.proxy_client import ProxyClient
from starlight_core.reference import Reference
from starlight_worker import __version__
from starlight_worker.api import control_grpc
from starlight_worker.api import control_pb2 as pb
from starlight_worker.puller import Phase, PullOptions, PullProgress

if TYPE_CHECKING:
    from starlight_worker.daemon import Daemon

__all__ = ["ControlService", "progress_to_pb"]


@contextmanager
def _grpc_errors() -> Iterator[None]:
    try:
        yield
    except StarlightError as exc:
        raise GRPCError(Status(exc.grpc_status), " ".join(str(exc).split())) from exc


def progress_to_pb(progress: PullProgress) -> pb.PullProgress:
    return pb.PullProgress(
        phase=pb.PullProgress.Phase.ValueType(progress.phase),
        reference=progress.reference,
        manifest_digest=progress.manifest_digest,
        bundle_id=progress.bundle_id,
        bytes_received=progress.bytes_received,
        bytes_expected=progress.bytes_expected,
        files_done=progress.files_done,
        files_total=progress.files_total,
        contents_local=progress.contents_local,
        elapsed_seconds=progress.elapsed,
        message=progress.message,
        resumes=progress.resumes,
        **{"from": list(progress.from_refs)},
    )


async def _request(stream: Stream[Any, Any]) -> Any:
    request = await stream.recv_message()
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "empty request")
    return request


class ControlService(control_grpc.ControlBase):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def Pull(self, stream: Stream[pb.PullRequest, pb.PullProgress]) -> None:
        request = await _request(stream)
        with _grpc_errors():
            reference = Reference.parse(request.reference)
            platform = Platform.parse(request.platform) if request.platform else Platform.host()
            from_refs: tuple[str, ...] | None = None
            if request.no_from:
                from_refs = ()
            elif getattr(request, "from"):
                from_refs = tuple(str(Reference.parse(r)) for r in getattr(request, "from"))
            options = PullOptions(
                reference=reference,
                platform=platform,
                namespace=request.namespace or self.daemon.config.namespace,
                ordering=not request.no_ordering,
                from_refs=from_refs,
            )
            assert self.daemon.pulls is not None
            pull = self.daemon.pulls.start(options)
            async with pull.subscribe() as updates:
                async for progress in updates:
                    await stream.send_message(progress_to_pb(progress))
                    if not request.wait and progress.phase >= Phase.READY:
                        break  # containers can start; the pull goes on in the daemon
            if request.wait:
                await pull.done.wait()
            else:
                await pull.ready.wait()
            failed_before = request.wait or pull.progress.phase < Phase.READY
            if pull.error is not None and failed_before:
                raise pull.error

    async def Images(self, stream: Stream[pb.ImagesRequest, pb.ImagesResponse]) -> None:
        await _request(stream)
        assert self.daemon.store is not None
        with _grpc_errors():
            images = await anyio.to_thread.run_sync(self.daemon.store.images)
        await stream.send_message(
            pb.ImagesResponse(
                images=[
                    pb.ImageInfo(
                        reference=image.reference,
                        manifest_digest=image.manifest_digest,
                        platform=image.platform,
                        namespace=image.namespace,
                        complete=image.complete,
                        bytes_local=image.bytes_local,
                        bytes_total=image.bytes_total,
                        files_local=image.files_local,
                        files_total=image.files_total,
                        layers=len(image.layers),
                        pulled_at=image.pulled_at,
                    )
                    for image in images
                ]
            )
        )

    async def Ping(self, stream: Stream[pb.PingRequest, pb.PingResponse]) -> None:
        request = await _request(stream)
        count = max(1, min(request.count or 3, 100))
        times: list[float] = []
        error = ""
        try:
            async with self.daemon.proxy_client() as proxy:
                for _ in range(count):
                    started = time.perf_counter()
                    await proxy.health()
                    times.append((time.perf_counter() - started) * 1000)
        except StarlightError as exc:
            error = str(exc)
        await stream.send_message(
            pb.PingResponse(
                version=__version__,
                proxy=self.daemon.config.proxy,
                rtt_min_ms=min(times, default=0.0),
                rtt_avg_ms=sum(times) / len(times) if times else 0.0,
                rtt_max_ms=max(times, default=0.0),
                proxy_error=error,
            )
        )

    async def Status(self, stream: Stream[pb.StatusRequest, pb.StatusResponse]) -> None:
        await _request(stream)
        daemon = self.daemon
        assert daemon.store is not None
        assert daemon.layers is not None
        assert daemon.pulls is not None
        with _grpc_errors():
            counts = await anyio.to_thread.run_sync(daemon.store.layer_counts)
        await stream.send_message(
            pb.StatusResponse(
                version=__version__,
                proxy=daemon.config.proxy,
                root=str(daemon.config.root),
                layers=counts[0],
                layers_complete=counts[1],
                pulls_active=len(daemon.pulls.active),
                fuse_layers=daemon.layers.attached,
                optimizer=daemon.tracer is not None and daemon.tracer.state.enabled,
                optimizer_group=(daemon.tracer.state.group or "") if daemon.tracer else "",
            )
        )

    async def Optimizer(self, stream: Stream[pb.OptimizerRequest, pb.OptimizerResponse]) -> None:
        request = await _request(stream)
        tracer = self.daemon.tracer
        assert tracer is not None
        with _grpc_errors():
            if request.enable:
                state = await tracer.enable(request.group or None)
            else:
                if request.group:
                    raise InvalidInput("a group is given when turning the optimizer on")
                state = await tracer.disable()
            pending = await anyio.to_thread.run_sync(tracer.pending)
        await stream.send_message(
            pb.OptimizerResponse(
                enabled=state.enabled, group=state.group or "", traces_pending=len(pending)
            )
        )

    async def Report(self, stream: Stream[pb.ReportRequest, pb.ReportResponse]) -> None:
        request = await _request(stream)
        tracer = self.daemon.tracer
        assert tracer is not None
        config = self.daemon.config
        with _grpc_errors():
            url = request.proxy or config.proxy
            # The daemon's credentials are for its own proxy only.
            user = config.proxy_user if url == config.proxy else ""
            async with ProxyClient(url, user=user or None, timeout=60.0) as proxy:
                outcome = await tracer.report(proxy)
        await stream.send_message(
            pb.ReportResponse(
                traces_sent=outcome.sent,
                traces_already_sent=outcome.already_sent,
                images=list(outcome.images),
                rejected=list(outcome.rejected),
                traces_pending=outcome.pending,
            )
        )

    async def Reset(self, stream: Stream[pb.ResetRequest, pb.ResetResponse]) -> None:
        request = await _request(stream)
        with _grpc_errors():
            removed = await self.daemon.reset(dry_run=request.dry_run)
        await stream.send_message(pb.ResetResponse(removed=removed))
