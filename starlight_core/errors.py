"""One exception tree for all of starlight.

Every error says whose fault it is and maps to an HTTP status and a gRPC status code, so the
proxy, the daemon and the CLI translate them at their edges without guessing. gRPC codes are
plain integers here (they are wire facts) so that the core does not import grpclib.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "AuthenticationRequired",
    "BundleChanged",
    "BundleProtocolError",
    "CorruptLayer",
    "DaemonUnavailable",
    "DigestMismatch",
    "FailedPrecondition",
    "Forbidden",
    "ImageNotFound",
    "InvalidDigest",
    "InvalidInput",
    "InvalidPlatform",
    "InvalidReference",
    "NotFound",
    "NotStarlightFormat",
    "ProxyUnavailable",
    "RegistryError",
    "RegistryNotServed",
    "RegistryUnavailable",
    "ResourceExhausted",
    "StarlightError",
    "TooManyRequests",
    "Unauthorized",
    "UnsafePath",
    "UnsupportedLayer",
]

# gRPC status codes (grpc/status.proto); numbers, not names, keep grpclib out of the core.
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_ALREADY_EXISTS = 6
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_FAILED_PRECONDITION = 9
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_DATA_LOSS = 15
GRPC_UNAUTHENTICATED = 16


class StarlightError(Exception):
    """Base of every error starlight raises on purpose.

    ``code`` is the stable machine-readable name (the proxy's JSON ``error`` field),
    ``http_status`` and ``grpc_status`` say how to report it at each boundary, and ``hint``
    tells the user what to do next.
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[int] = GRPC_INTERNAL
    default_hint: ClassVar[str | None] = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class InvalidInput(StarlightError):
    """The caller gave us something malformed."""

    code = "invalid_input"
    http_status = 400
    grpc_status = GRPC_INVALID_ARGUMENT


class InvalidReference(InvalidInput):
    code = "invalid_reference"


class InvalidPlatform(InvalidInput):
    code = "invalid_platform"


class InvalidDigest(InvalidInput):
    code = "invalid_digest"


class RegistryNotServed(InvalidInput):
    """The proxy is not configured to serve images of this registry."""

    code = "registry_not_served"
    default_hint = "add it to [[registries]] in the proxy's config (or allow_any_registry = true)"


class NotFound(StarlightError):
    code = "not_found"
    http_status = 404
    grpc_status = GRPC_NOT_FOUND


class ImageNotFound(NotFound):
    code = "image_not_found"


class AlreadyExists(StarlightError):
    code = "already_exists"
    http_status = 409
    grpc_status = GRPC_ALREADY_EXISTS


class FailedPrecondition(StarlightError):
    code = "failed_precondition"
    http_status = 409
    grpc_status = GRPC_FAILED_PRECONDITION


class BundleChanged(FailedPrecondition):
    """A bundle cannot be resumed by offset: the proxy now plans a different one."""

    code = "bundle_changed"
    http_status = 412
    default_hint = "ask again naming the contents already received (have)"


class NotStarlightFormat(FailedPrecondition):
    code = "not_starlight_format"
    default_hint = "convert the image first: ctr-starlight convert SRC DST"


class CorruptLayer(StarlightError):
    """A layer (tar or gzip stream) is malformed or hostile."""

    code = "corrupt_layer"
    http_status = 422
    grpc_status = GRPC_DATA_LOSS


class UnsafePath(CorruptLayer):
    """A tar entry or link would escape the root filesystem."""

    code = "unsafe_path"


class UnsupportedLayer(CorruptLayer):
    """A well-formed layer using a tar feature we refuse (e.g. sparse files)."""

    code = "unsupported_layer"


class DigestMismatch(StarlightError):
    """Bytes do not match the digest that names them: someone upstream sent garbage."""

    code = "digest_mismatch"
    http_status = 502
    grpc_status = GRPC_DATA_LOSS


class BundleProtocolError(StarlightError):
    """The bundle stream violates its format (truncated, unknown record, bad framing)."""

    code = "bundle_protocol_error"
    http_status = 502
    grpc_status = GRPC_DATA_LOSS


class ResourceExhausted(StarlightError):
    """Out of disk, or a request too large to accept."""

    code = "resource_exhausted"
    http_status = 507
    grpc_status = GRPC_RESOURCE_EXHAUSTED


class RegistryError(StarlightError):
    """The upstream registry refused or failed a request."""

    code = "registry_error"
    http_status = 502
    grpc_status = GRPC_UNAVAILABLE


class RegistryUnavailable(RegistryError):
    code = "registry_unavailable"
    default_hint = "check that the registry is running and reachable"


class Unauthorized(RegistryError):
    code = "unauthorized"
    http_status = 401
    grpc_status = GRPC_UNAUTHENTICATED
    default_hint = "check the credentials (--user, or ~/.docker/config.json)"


class Forbidden(RegistryError):
    code = "forbidden"
    http_status = 403
    grpc_status = GRPC_PERMISSION_DENIED


class TooManyRequests(RegistryError):
    code = "too_many_requests"
    http_status = 429
    grpc_status = GRPC_RESOURCE_EXHAUSTED
    default_hint = "the registry is rate limiting; retry later"


class ProxyUnavailable(StarlightError):
    code = "proxy_unavailable"
    http_status = 503
    grpc_status = GRPC_UNAVAILABLE
    default_hint = "check the proxy address and that starlight-proxy is running"


class AuthenticationRequired(StarlightError):
    """A client of the proxy gave no credentials, or wrong ones."""

    code = "authentication_required"
    http_status = 401
    grpc_status = GRPC_UNAUTHENTICATED
    default_hint = "give the proxy credentials: --proxy-user USER:PASSWORD or STARLIGHT_PROXY_USER"


class DaemonUnavailable(StarlightError):
    code = "daemon_unavailable"
    http_status = 503
    grpc_status = GRPC_UNAVAILABLE
    default_hint = "start the daemon: starlight-daemon (or systemctl start starlight-daemon)"
