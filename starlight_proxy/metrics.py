"""Prometheus metrics of one proxy app (a registry per app, so tests and several apps in one
process do not mix their counts)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["ROUTES", "Metrics"]

ROUTES: Final = (
    "/",
    "/health-check",
    "/metrics",
    "/starlight/delta",
    "/starlight/images",
    "/starlight/notify",
    "/starlight/report",
)
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip
_NOTIFY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "starlight_proxy_requests",
            "HTTP requests answered, by route and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self.latency = Histogram(
            "starlight_proxy_request_duration_seconds",
            "Time from request to the last byte of the answer, by route.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bundles = Counter(
            "starlight_proxy_bundles",
            "Bundles started, by outcome (complete, error, cancelled).",
            ("outcome",),
            registry=r,
        )
        self.bundle_bytes = Counter(
            "starlight_proxy_bundle_bytes", "Bundle bytes sent to workers.", registry=r
        )
        self.extents = Counter(
            "starlight_proxy_bundle_extents", "Content extents sent to workers.", registry=r
        )
        self.registry_bytes = Counter(
            "starlight_proxy_registry_bytes",
            "Bytes read from registries, by purpose (notify, bundle).",
            ("purpose",),
            registry=r,
        )
        self.range_reads = Counter(
            "starlight_proxy_registry_range_reads",
            "Range reads issued to registries for bundles.",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "starlight_proxy_digest_mismatches",
            "Extents whose registry bytes did not match the TOC (never sent).",
            registry=r,
        )
        self.plan_seconds = Histogram(
            "starlight_proxy_plan_duration_seconds",
            "Time to plan a bundle and encode its header.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.notify_seconds = Histogram(
            "starlight_proxy_notify_duration_seconds",
            "Time to index an image, by outcome.",
            ("outcome",),
            buckets=_NOTIFY_BUCKETS,
            registry=r,
        )
        self.layers_scanned = Counter(
            "starlight_proxy_layers_scanned", "Layer blobs scanned for their TOC.", registry=r
        )

    def route(self, path: str) -> str:
        """The label for a request path: a known route, or ``other`` (bounded cardinality)."""
        return path if path in ROUTES else "other"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
