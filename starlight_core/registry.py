"""An async client for OCI distribution registries: the core's one I/O adapter.

Everything that crosses the network to a registry goes through ``RegistryClient``: manifests,
blobs (whole, streamed, or by HTTP Range), uploads and cross-repository mounts. It speaks the
distribution API (``/v2/…``) with token and Basic authentication, retries what is safe to retry
and turns every failure into a ``starlight_core.errors`` exception whose one-line message names
the registry, the repository and what failed.

Importing ``starlight_core`` does not import this module (nor httpx): import it explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Collection, Mapping
from types import TracebackType
from typing import Final, NoReturn

import anyio
import attrs
import httpx

from starlight_core import __version__, oci
from starlight_core.auth import Credentials, CredentialStore
from starlight_core.digest import Digest, DigestVerifier
from starlight_core.errors import (
    DigestMismatch,
    Forbidden,
    ImageNotFound,
    InvalidInput,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    ResourceExhausted,
    StarlightError,
    TooManyRequests,
    Unauthorized,
)
from starlight_core.reference import Reference

__all__ = [
    "DEFAULT_MAX_BLOB_SIZE",
    "MANIFEST_ACCEPT",
    "MAX_MANIFEST_SIZE",
    "BlobStream",
    "Challenge",
    "ManifestResponse",
    "RegistryClient",
    "parse_challenges",
]

MANIFEST_ACCEPT: Final = ", ".join(
    (oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST, oci.DOCKER_MANIFEST_LIST)
)
# distribution refuses manifests above 4 MiB; anything larger is not a manifest.
MAX_MANIFEST_SIZE: Final = 4 * 1024 * 1024
DEFAULT_MAX_BLOB_SIZE: Final = 64 * 1024 * 1024
_UPLOAD_CHUNK: Final = 4 * 1024 * 1024
_MAX_BACKOFF: Final = 10.0
# A Retry-After longer than this is a rate limit to report, not to sit out.
_MAX_RETRY_AFTER: Final = 30.0
_MAX_ERROR_BODY: Final = 64 * 1024
_TOKEN_SLACK: Final = 10.0
_DEFAULT_TOKEN_LIFETIME: Final = 60.0
_GENERIC_CONTENT_TYPES: Final = frozenset({"", "application/json", "text/plain"})
_OCTET_STREAM: Final = "application/octet-stream"
_CONTENT_RANGE_RE: Final = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LINK_NEXT_RE: Final = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


@attrs.frozen
class ManifestResponse:
    """A manifest or index exactly as the registry served it."""

    data: bytes = attrs.field(repr=False)
    media_type: str
    digest: Digest

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> oci.Descriptor:
        return oci.Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


@attrs.frozen
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: Mapping[str, str] = attrs.field(factory=dict)


_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Unquoted values should be RFC tokens, but realms like https://x/token go out unquoted too.
_PARAM_VALUE_RE: Final = re.compile(r'\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)')


def parse_challenges(values: Collection[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235) into challenges.

    ``Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"`` gives one
    Bearer challenge with three parameters. Several challenges may share one header: a word
    not followed by ``=`` starts the next one.
    """
    challenges: list[Challenge] = []
    for value in values:
        scheme: str | None = None
        params: dict[str, str] = {}
        position = 0
        while True:
            while position < len(value) and value[position] in " \t,":
                position += 1
            word = _TOKEN_RE.match(value, position)
            if word is None:
                break  # end of the header, or bytes we cannot read: keep what we have
            position = word.end()
            param = _PARAM_VALUE_RE.match(value, position)
            if param is None:
                if scheme is not None:
                    challenges.append(Challenge(scheme, params))
                scheme, params = word.group().lower(), {}
                continue
            position = param.end()
            raw = param.group(1)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            if scheme is not None:
                params[word.group().lower()] = raw
        if scheme is not None:
            challenges.append(Challenge(scheme, params))
    return challenges


class _BodyLost(RegistryUnavailable):
    """The connection broke mid-body: an idempotent whole read may start over."""


class BlobStream:
    """The body of one blob response, as an async iterator of byte chunks.

    ``size`` is the number of bytes this stream will deliver, ``total`` the blob's full size
    when the registry said it. A whole-blob stream verifies the digest and raises
    ``DigestMismatch`` instead of ending when it does not match; a range cannot be verified here
    (the caller checks the contents it decodes).
    """

    def __init__(
        self,
        response: httpx.Response,
        *,
        size: int | None,
        total: int | None,
        verifier: DigestVerifier | None,
        describe: str,
    ) -> None:
        self._response = response
        self.size = size
        self.total = total
        self._verifier = verifier
        self._describe = describe
        self._received = 0
        self._chunks: AsyncIterator[bytes] | None = None
        self._done = False

    @property
    def received(self) -> int:
        return self._received

    def __aiter__(self) -> BlobStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._chunks is None:
            self._chunks = self._response.aiter_bytes()
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._done = True
            self._finish()
            raise
        except httpx.TransportError as exc:
            self._done = True
            raise _BodyLost(
                f"{self._describe}: connection lost after {self._received} bytes: {_explain(exc)}"
            ) from exc
        self._received += len(chunk)
        if self.size is not None and self._received > self.size:
            self._done = True
            raise RegistryError(f"{self._describe}: registry sent more than {self.size} bytes")
        if self._verifier is not None:
            self._verifier.update(chunk)
        return chunk

    def _finish(self) -> None:
        if self.size is not None and self._received != self.size:
            raise _BodyLost(
                f"{self._describe}: stream ended after {self._received} of {self.size} bytes"
            )
        if self._verifier is not None:
            self._verifier.verify()


@attrs.define
class _Token:
    value: str
    expires: float

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires


class _Authenticator:
    """Per-host authentication state: the challenge seen, tokens per scope set, credentials."""

    def __init__(self, client: RegistryClient, store: CredentialStore) -> None:
        self._client = client
        self._store = store
        self._credentials: dict[str, Credentials | None] = {}
        self._challenges: dict[str, Challenge] = {}
        self._basic: set[str] = set()
        self._tokens: dict[tuple[str, tuple[str, ...]], _Token] = {}
        self._locks: dict[object, anyio.Lock] = {}
        self.token_requests = 0

    def _lock(self, key: object) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    async def credentials(self, host: str) -> Credentials | None:
        if host not in self._credentials:
            async with self._lock(("credentials", host)):
                if host not in self._credentials:
                    # A credential helper is a subprocess: keep it off the event loop.
                    found = await anyio.to_thread.run_sync(self._store.lookup, host)
                    self._credentials[host] = found
        return self._credentials[host]

    async def header(self, host: str, scopes: tuple[str, ...]) -> str | None:
        """The ``Authorization`` value to send proactively, once the host's scheme is known."""
        if host in self._basic:
            creds = await self.credentials(host)
            return creds.basic_authorization() if creds is not None else None
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        key = (host, scopes)
        token = self._tokens.get(key)
        if token is None or not token.fresh:
            async with self._lock(key):
                token = self._tokens.get(key)
                if token is None or not token.fresh:
                    token = await self._fetch_token(host, challenge, scopes)
                    self._tokens[key] = token
        return f"Bearer {token.value}"

    async def challenged(
        self, host: str, challenges: list[Challenge], scopes: tuple[str, ...], sent: str | None
    ) -> bool:
        """React to a 401: True when there is something new worth sending the request with."""
        by_scheme = {c.scheme: c for c in challenges}
        bearer = by_scheme.get("bearer")
        if bearer is not None and "realm" in bearer.params:
            extra = tuple(bearer.params.get("scope", "").split())
            wanted = tuple(sorted(set(scopes) | set(extra)))
            self._challenges[host] = bearer
            key = (host, scopes)
            async with self._lock(key):
                current = self._tokens.get(key)
                if current is not None and sent != f"Bearer {current.value}":
                    return True  # another task already refreshed it
                token = await self._fetch_token(host, bearer, wanted)
                self._tokens[key] = token
            return sent != f"Bearer {token.value}"
        if "basic" in by_scheme:
            creds = await self.credentials(host)
            header = creds.basic_authorization() if creds is not None else None
            if header is None or header == sent:
                return False
            self._basic.add(host)
            return True
        return False

    async def _fetch_token(
        self, host: str, challenge: Challenge, scopes: tuple[str, ...]
    ) -> _Token:
        creds = await self.credentials(host)
        if creds is not None and creds.registry_token:
            # A registry token is used as is; nothing to exchange.
            return _Token(creds.registry_token, float("inf"))
        realm = challenge.params["realm"]
        service = challenge.params.get("service")
        self.token_requests += 1
        describe = f"registry {host}: getting a token from {realm} for {' '.join(scopes) or '/v2/'}"
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "starlight",
            }
            if service:
                form["service"] = service
            if scopes:
                form["scope"] = " ".join(scopes)
            request = self._client.http.build_request("POST", realm, data=form)
        else:
            params: list[tuple[str, str | int | float | bool | None]] = []
            if service:
                params.append(("service", service))
            params.extend(("scope", scope) for scope in scopes)
            headers = {}
            if creds is not None and creds.has_password:
                params.append(("account", str(creds.username)))
                headers["Authorization"] = str(creds.basic_authorization())
            request = self._client.http.build_request("GET", realm, params=params, headers=headers)
        response = await self._client.send_with_retries(request, describe, retry=True)
        body = await _read_limited(response, _MAX_ERROR_BODY)
        if response.status_code in (401, 403):
            raise Unauthorized(f"{describe}: HTTP {response.status_code}: token server refused")
        if response.status_code != 200:
            raise _error_for_status(response.status_code, describe, _error_detail(body))
        try:
            answer = json.loads(body)
            value = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryError(f"{describe}: token server answered garbage") from exc
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{describe}: token server answered no token")
        lifetime = max(lifetime, _DEFAULT_TOKEN_LIFETIME)
        return _Token(value, time.monotonic() + lifetime - _TOKEN_SLACK)


class RegistryClient:
    """Talk to OCI registries: ``async with RegistryClient() as client: ...``.

    ``credentials`` is a ``CredentialStore`` (or a mapping host → ``Credentials`` /
    ``"user:password"``); ``None`` means anonymous — pass
    ``CredentialStore.from_docker_config()`` to use what ``docker login`` stored.
    ``plain_http`` talks http:// to every registry (``True``) or to the named hosts
    (``host`` or ``host:port``); ``insecure`` skips TLS verification. ``transport`` replaces the
    network (tests: ``httpx.MockTransport``, ``httpx.ASGITransport``). Idempotent requests are
    retried ``retries`` times on 5xx, 429 and connection errors, waiting ``backoff`` × 2ⁿ.
    """

    def __init__(
        self,
        *,
        credentials: CredentialStore | Mapping[str, Credentials | str] | None = None,
        plain_http: bool | Collection[str] = False,
        insecure: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = 4,
        backoff: float = 0.2,
        timeout: float = 30.0,
        max_connections: int = 64,
    ) -> None:
        if retries < 0:
            raise InvalidInput("retries must be >= 0")
        if isinstance(credentials, CredentialStore):
            store = credentials
        else:
            store = CredentialStore(credentials or {})
        self._plain_http = plain_http if isinstance(plain_http, bool) else frozenset(plain_http)
        self.retries = retries
        self.backoff = backoff
        self.http = httpx.AsyncClient(
            transport=transport,
            verify=not insecure,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections),
            headers={"User-Agent": f"starlight/{__version__}"},
            follow_redirects=False,
        )
        self._auth = _Authenticator(self, store)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    @property
    def token_requests(self) -> int:
        """How many tokens were fetched so far (tests check the cache with it)."""
        return self._auth.token_requests

    # --- manifests -------------------------------------------------------------------------

    async def get_manifest(self, ref: Reference | str) -> ManifestResponse:
        """Fetch the manifest or index ``ref`` names (by tag or digest), verified."""
        ref = _as_reference(ref)
        describe = self._describe(ref, f"fetching manifest {ref.object}")
        response = await self._request(
            "GET",
            ref,
            self._url(ref, f"manifests/{ref.object}"),
            describe,
            scopes=_pull(ref),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code != 200:
            await self._fail(response, describe, ref=ref, manifest=True)
        data = await _read_limited(response, MAX_MANIFEST_SIZE, describe=describe)
        expected = ref.digest or _header_digest(response, describe)
        if expected is not None:
            actual = Digest.from_hasher(_hash(expected.algorithm, data))
            if actual != expected:
                raise DigestMismatch(
                    f"{describe}: registry served {actual}, expected {expected} ({len(data)} bytes)"
                )
            digest = expected
            header = _header_digest(response, describe)
            if header is not None and header.algorithm == expected.algorithm and header != expected:
                raise DigestMismatch(f"{describe}: registry says {header}, expected {expected}")
        else:
            digest = Digest.from_hasher(hashlib.sha256(data))
        media_type = _manifest_media_type(response, data)
        return ManifestResponse(data=data, media_type=media_type, digest=digest)

    async def head_manifest(self, ref: Reference | str) -> oci.Descriptor | None:
        """The descriptor of ``ref``'s manifest, or ``None`` if the registry does not have it."""
        ref = _as_reference(ref)
        describe = self._describe(ref, f"checking manifest {ref.object}")
        response = await self._request(
            "HEAD",
            ref,
            self._url(ref, f"manifests/{ref.object}"),
            describe,
            scopes=_pull(ref),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code not in (200, 404):
            await self._fail(response, describe, ref=ref, manifest=True)
        await response.aclose()
        if response.status_code == 404:
            return None
        digest = _header_digest(response, describe)
        length = response.headers.get("Content-Length")
        media_type = _content_type(response)
        if digest is None or length is None or media_type in _GENERIC_CONTENT_TYPES:
            # Not every registry answers HEAD fully: ask for the manifest itself.
            try:
                return (await self.get_manifest(ref)).descriptor()
            except ImageNotFound:
                return None
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatch(f"{describe}: registry says {digest}, expected {ref.digest}")
        return oci.Descriptor(media_type=media_type, digest=digest, size=int(length))

    async def put_manifest(self, ref: Reference | str, data: bytes, media_type: str) -> Digest:
        """Store ``data`` as the manifest ``ref`` names (its tag, or its digest)."""
        ref = _as_reference(ref)
        digest = Digest.from_hasher(hashlib.sha256(data))
        if ref.digest is not None and ref.digest != digest:
            raise DigestMismatch(f"manifest for {ref}: content is {digest}")
        target = ref.tag if ref.tag is not None and ref.digest is None else str(digest)
        describe = self._describe(ref, f"pushing manifest {target}")
        response = await self._request(
            "PUT",
            ref,
            self._url(ref, f"manifests/{target}"),
            describe,
            scopes=_push(ref),
            headers={"Content-Type": media_type},
            content=data,
        )
        if response.status_code not in (200, 201, 202):
            await self._fail(response, describe, ref=ref)
        await response.aclose()
        served = _header_digest(response, describe)
        if served is not None and served != digest:
            raise DigestMismatch(f"{describe}: registry stored it as {served}, not {digest}")
        return digest

    async def list_tags(self, ref: Reference | str) -> list[str]:
        """All tags of ``ref``'s repository, following the registry's pagination."""
        ref = _as_reference(ref)
        describe = self._describe(ref, "listing tags")
        url: httpx.URL | str = self._url(ref, "tags/list")
        tags: list[str] = []
        for _ in range(10_000):
            response = await self._request("GET", ref, url, describe, scopes=_pull(ref))
            if response.status_code != 200:
                await self._fail(response, describe, ref=ref, manifest=True)
            body = await _read_limited(response, DEFAULT_MAX_BLOB_SIZE, describe=describe)
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError) as exc:
                raise RegistryError(f"{describe}: registry answered garbage") from exc
            tags.extend(str(tag) for tag in page)
            match = _LINK_NEXT_RE.search(response.headers.get("Link", ""))
            if match is None:
                return tags
            url = response.request.url.join(match.group(1))
        raise RegistryError(f"{describe}: too many pages")

    # --- blobs -----------------------------------------------------------------------------

    async def head_blob(self, ref: Reference | str, digest: Digest | str) -> int | None:
        """The size of blob ``digest`` in ``ref``'s repository, or ``None`` if it is absent."""
        ref = _as_reference(ref)
        digest = Digest(digest)
        describe = self._describe(ref, f"checking blob {digest}")
        response = await self._request(
            "HEAD",
            ref,
            self._url(ref, f"blobs/{digest}"),
            describe,
            scopes=_pull(ref),
            follow_redirects=True,
        )
        if response.status_code not in (200, 404):
            await self._fail(response, describe, ref=ref)
        await response.aclose()
        if response.status_code == 404:
            return None
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RegistryError(f"{describe}: registry answered without Content-Length")
        return int(length)

    async def get_blob(
        self,
        ref: Reference | str,
        digest: Digest | str,
        *,
        max_size: int = DEFAULT_MAX_BLOB_SIZE,
    ) -> bytes:
        """A whole blob in memory (configs, small files), verified; refuses over ``max_size``."""
        ref = _as_reference(ref)
        digest = Digest(digest)
        attempt = 0
        while True:
            try:
                async with self.stream_blob(ref, digest) as stream:
                    if stream.size is not None and stream.size > max_size:
                        raise ResourceExhausted(
                            f"{self._describe(ref, f'fetching blob {digest}')}: "
                            f"{stream.size} bytes is more than the {max_size} allowed"
                        )
                    parts: list[bytes] = []
                    async for chunk in stream:
                        parts.append(chunk)
                        if stream.received > max_size:
                            raise ResourceExhausted(
                                f"{self._describe(ref, f'fetching blob {digest}')}: "
                                f"more than the {max_size} bytes allowed"
                            )
                    return b"".join(parts)
            except _BodyLost:
                # Lost mid-body: a whole GET is idempotent, start over.
                if attempt >= self.retries:
                    raise
                await self._sleep(attempt)
                attempt += 1

    async def read_range(
        self, ref: Reference | str, digest: Digest | str, start: int, length: int
    ) -> bytes:
        """Exactly ``length`` bytes of blob ``digest`` from offset ``start`` (HTTP Range)."""
        if start < 0 or length < 0:
            raise InvalidInput(f"invalid blob range: start {start}, length {length}")
        if length == 0:
            return b""
        attempt = 0
        while True:
            try:
                async with self.stream_blob(ref, digest, start=start, end=start + length) as s:
                    return b"".join([chunk async for chunk in s])
            except _BodyLost:
                if attempt >= self.retries:
                    raise
                await self._sleep(attempt)
                attempt += 1

    @contextlib.asynccontextmanager
    async def stream_blob(
        self,
        ref: Reference | str,
        digest: Digest | str,
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> AsyncIterator[BlobStream]:
        """Stream blob ``digest``, or its bytes ``[start, end)`` (slice semantics, end exclusive).

        ``start`` alone reads to the end of the blob. A range is checked against the 206
        answer's ``Content-Range``: a registry that ignores Range is an error, not a silent
        whole download. The stream itself is not retried once bytes flowed.
        """
        ref = _as_reference(ref)
        digest = Digest(digest)
        ranged = start is not None or end is not None
        first = start or 0
        if first < 0 or (end is not None and end <= first):
            raise InvalidInput(f"invalid blob range [{start}, {end}) of {digest}")
        span = f" bytes {first}-{'' if end is None else end - 1}" if ranged else ""
        describe = self._describe(ref, f"fetching blob {digest}{span}")
        headers = {"Accept-Encoding": "identity"}
        if ranged:
            headers["Range"] = f"bytes={first}-{'' if end is None else end - 1}"
        response = await self._request(
            "GET",
            ref,
            self._url(ref, f"blobs/{digest}"),
            describe,
            scopes=_pull(ref),
            headers=headers,
            follow_redirects=True,
        )
        try:
            if response.status_code not in ((200, 206, 416) if ranged else (200,)):
                await self._fail(response, describe, ref=ref)
            if ranged:
                stream = self._ranged_stream(response, describe, first, end)
            else:
                length = response.headers.get("Content-Length")
                size = int(length) if length is not None and length.isdigit() else None
                stream = BlobStream(
                    response,
                    size=size,
                    total=size,
                    verifier=DigestVerifier(digest, describe),
                    describe=describe,
                )
            yield stream
        finally:
            await response.aclose()

    def _ranged_stream(
        self,
        response: httpx.Response,
        describe: str,
        start: int,
        end: int | None,
    ) -> BlobStream:
        status = response.status_code
        if status == 416:
            total = _range_total(response.headers.get("Content-Range", ""))
            size = f" (the blob has {total} bytes)" if total is not None else ""
            raise InvalidInput(f"{describe}: range not satisfiable{size}")
        if status == 200:
            raise RegistryError(
                f"{describe}: registry ignored the Range request and sent the whole blob"
            )
        header = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE_RE.match(header.strip())
        if match is None:
            raise RegistryError(f"{describe}: 206 answer with bad Content-Range {header!r}")
        got_start, got_last, total_text = match.groups()
        total = int(total_text) if total_text != "*" else None
        if end is not None and total is not None and end > total:
            raise InvalidInput(f"{describe}: range ends past the blob's {total} bytes")
        want_last = end - 1 if end is not None else (total - 1 if total is not None else None)
        if int(got_start) != start or (want_last is not None and int(got_last) != want_last):
            raise RegistryError(
                f"{describe}: registry answered range {got_start}-{got_last} instead"
            )
        return BlobStream(
            response,
            size=int(got_last) - start + 1,
            total=total,
            verifier=None,
            describe=describe,
        )

    # --- uploads ---------------------------------------------------------------------------

    async def upload_blob(self, ref: Reference | str, data: bytes, digest: Digest | str) -> None:
        """Push ``data`` as blob ``digest`` in one request (POST, then PUT ``?digest=``).

        The whole push is retried from the start on 5xx or a lost connection: the bytes are
        here, and a blob is named by its content, so a repeat cannot do harm.
        """
        ref = _as_reference(ref)
        digest = Digest(digest)
        actual = Digest.from_hasher(_hash(digest.algorithm, data))
        if actual != digest:
            raise DigestMismatch(f"blob for {ref.name}: content is {actual}, not {digest}")
        describe = self._describe(ref, f"pushing blob {digest}")
        attempt = 0
        while True:
            try:
                location = await self._start_upload(ref, describe, retry=False)
                response = await self._request(
                    "PUT",
                    ref,
                    location.copy_merge_params({"digest": str(digest)}),
                    describe,
                    scopes=_push(ref),
                    headers={"Content-Type": _OCTET_STREAM},
                    content=data,
                    retry=False,
                )
                if response.status_code not in (201, 204):
                    await self._fail(response, describe, ref=ref)
                await response.aclose()
                return
            except RegistryUnavailable:
                if attempt >= self.retries:
                    raise
                await self._sleep(attempt)
                attempt += 1

    async def upload_blob_stream(
        self,
        ref: Reference | str,
        chunks: AsyncIterable[bytes],
        *,
        digest: Digest | str | None = None,
        chunk_size: int = _UPLOAD_CHUNK,
    ) -> tuple[Digest, int]:
        """Push a blob as it is produced: POST, a PATCH per ``chunk_size`` bytes, final PUT.

        The digest is computed on the way (``sha256``), so memory stays at about one chunk.
        With ``digest`` given, a mismatch cancels the upload before it is committed. Nothing is
        retried once bytes were sent (the chunks cannot be replayed): retry the whole call.
        Returns the blob's digest and size.
        """
        ref = _as_reference(ref)
        expected = Digest(digest) if digest is not None else None
        hasher = _hash(expected.algorithm if expected is not None else "sha256", b"")
        describe = self._describe(ref, "pushing blob (streamed)")
        location = await self._start_upload(ref, describe)
        size = 0
        buffer = bytearray()
        committed = False
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                hasher.update(chunk)
                buffer += chunk
                if len(buffer) >= chunk_size:
                    location = await self._patch(ref, location, bytes(buffer), size, describe)
                    size += len(buffer)
                    buffer.clear()
            if buffer:
                location = await self._patch(ref, location, bytes(buffer), size, describe)
                size += len(buffer)
                buffer.clear()
            actual = Digest.from_hasher(hasher)
            if expected is not None and actual != expected:
                raise DigestMismatch(
                    f"{describe}: content is {actual}, not {expected} ({size} bytes)"
                )
            describe = self._describe(ref, f"pushing blob {actual} (streamed)")
            response = await self._request(
                "PUT",
                ref,
                location.copy_merge_params({"digest": str(actual)}),
                describe,
                scopes=_push(ref),
                headers={"Content-Type": _OCTET_STREAM, "Content-Length": "0"},
                retry=False,
            )
            if response.status_code not in (201, 204):
                await self._fail(response, describe, ref=ref)
            await response.aclose()
            committed = True
            return actual, size
        finally:
            if not committed:
                await self._cancel_upload(ref, location)

    async def mount_blob(
        self, ref: Reference | str, digest: Digest | str, from_repository: str
    ) -> bool:
        """Link blob ``digest`` from ``from_repository`` (same registry) into ``ref``'s.

        True when mounted; False when the registry cannot mount it (unknown there, or no
        access) — the upload it opened instead is cancelled and the caller pushes the bytes.
        """
        ref = _as_reference(ref)
        digest = Digest(digest)
        source = _repository_path(ref, from_repository)
        describe = self._describe(ref, f"mounting blob {digest} from {source}")
        response = await self._request(
            "POST",
            ref,
            self._url(ref, "blobs/uploads/").copy_merge_params(
                {"mount": str(digest), "from": source}
            ),
            describe,
            scopes=(*_push(ref), f"repository:{source}:pull"),
        )
        if response.status_code not in (201, 202):
            await self._fail(response, describe, ref=ref)
        await response.aclose()
        if response.status_code == 201:
            return True
        await self._cancel_upload(ref, _location(response, describe))
        return False

    async def ping(self, registry: str) -> None:
        """Check that ``registry`` (a host) answers the API and accepts our credentials."""
        ref = Reference(domain=registry, path="ping", tag="latest")
        describe = f"registry {ref.registry_host}: checking /v2/"
        response = await self._request(
            "GET", ref, f"{self._base(ref.registry_host)}/v2/", describe, scopes=()
        )
        if response.status_code != 200:
            await self._fail(response, describe)
        await response.aclose()

    async def _start_upload(
        self, ref: Reference, describe: str, *, retry: bool = True
    ) -> httpx.URL:
        response = await self._request(
            "POST",
            ref,
            self._url(ref, "blobs/uploads/"),
            describe,
            scopes=_push(ref),
            retry=retry,
        )
        if response.status_code != 202:
            await self._fail(response, describe, ref=ref)
        await response.aclose()
        return _location(response, describe)

    async def _patch(
        self, ref: Reference, location: httpx.URL, data: bytes, offset: int, describe: str
    ) -> httpx.URL:
        response = await self._request(
            "PATCH",
            ref,
            location,
            describe,
            scopes=_push(ref),
            headers={
                "Content-Type": _OCTET_STREAM,
                # distribution's form: inclusive, without the ``bytes=`` unit.
                "Content-Range": f"{offset}-{offset + len(data) - 1}",
            },
            content=data,
            retry=False,
        )
        if response.status_code != 202:
            await self._fail(response, describe, ref=ref)
        await response.aclose()
        return _location(response, describe)

    async def _cancel_upload(self, ref: Reference, location: httpx.URL) -> None:
        # Best effort: a dangling upload is purged by the registry eventually anyway.
        with contextlib.suppress(StarlightError, httpx.HTTPError):
            response = await self._request(
                "DELETE",
                ref,
                location,
                self._describe(ref, "cancelling upload"),
                scopes=_push(ref),
                retry=False,
            )
            await response.aclose()

    # --- plumbing --------------------------------------------------------------------------

    def _uses_plain_http(self, host: str) -> bool:
        if isinstance(self._plain_http, bool):
            return self._plain_http
        return host in self._plain_http or host.rsplit(":", 1)[0] in self._plain_http

    def _base(self, host: str) -> str:
        return f"{'http' if self._uses_plain_http(host) else 'https'}://{host}"

    def _url(self, ref: Reference, tail: str) -> httpx.URL:
        return httpx.URL(f"{self._base(ref.registry_host)}/v2/{ref.path}/{tail}")

    @staticmethod
    def _describe(ref: Reference, what: str) -> str:
        return f"registry {ref.registry_host}: {what} in {ref.path}"

    async def _sleep(self, attempt: int, retry_after: float | None = None) -> None:
        delay = min(self.backoff * 2**attempt, _MAX_BACKOFF)
        delay += random.uniform(0, self.backoff)  # jitter: replicas do not retry in lockstep
        if retry_after is not None:
            delay = max(delay, retry_after)
        if delay > 0:
            await anyio.sleep(delay)

    async def send_with_retries(
        self, request: httpx.Request, describe: str, *, retry: bool, follow_redirects: bool = False
    ) -> httpx.Response:
        """Send ``request`` (no auth handling), retrying 5xx, 429 and connection failures.

        The response comes back unread (streamed); the caller reads or closes it.
        """
        attempt = 0
        while True:
            try:
                response = await self.http.send(
                    request, stream=True, follow_redirects=follow_redirects
                )
            except httpx.TransportError as exc:
                if retry and attempt < self.retries:
                    await self._sleep(attempt)
                    attempt += 1
                    continue
                raise RegistryUnavailable(f"{describe}: {_explain(exc)}") from exc
            except httpx.HTTPError as exc:
                raise RegistryError(f"{describe}: {_explain(exc)}") from exc
            status = response.status_code
            if retry and attempt < self.retries and (status >= 500 or status == 429):
                retry_after = _retry_after(response)
                if retry_after is None or retry_after <= _MAX_RETRY_AFTER:
                    await response.aclose()
                    await self._sleep(attempt, retry_after)
                    attempt += 1
                    continue
            return response

    async def _request(
        self,
        method: str,
        ref: Reference,
        url: httpx.URL | str,
        describe: str,
        *,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        retry: bool = True,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """One authenticated request: proactive auth, one re-authentication on 401, retries.

        The response comes back with its body unread: the caller reads it or closes it.
        """
        host = ref.registry_host
        authenticated_again = False
        while True:
            sent = await self._auth.header(host, scopes)
            request_headers = dict(headers or {})
            if sent is not None:
                request_headers["Authorization"] = sent
            request = self.http.build_request(method, url, headers=request_headers, content=content)
            response = await self.send_with_retries(
                request, describe, retry=retry, follow_redirects=follow_redirects
            )
            if response.status_code == 401 and not authenticated_again:
                challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
                if await self._auth.challenged(host, challenges, scopes, sent):
                    await response.aclose()
                    authenticated_again = True
                    continue
            return response

    async def _fail(
        self,
        response: httpx.Response,
        describe: str,
        *,
        ref: Reference | None = None,
        manifest: bool = False,
    ) -> NoReturn:
        """Raise the error ``response`` stands for."""
        try:
            body = await _read_limited(response, _MAX_ERROR_BODY)
        except (StarlightError, httpx.StreamError):
            body = b""
        finally:
            await response.aclose()
        detail = _error_detail(body)
        status = response.status_code
        if status == 404 and manifest and ref is not None:
            raise ImageNotFound(
                f"image {ref} not found: registry {ref.registry_host} answered 404"
                + (f" {detail}" if detail else "")
            )
        raise _error_for_status(status, describe, detail, response)


def _error_for_status(
    status: int, describe: str, detail: str, response: httpx.Response | None = None
) -> StarlightError:
    message = f"{describe}: HTTP {status}" + (f" {detail}" if detail else "")
    if status == 401:
        return Unauthorized(message)
    if status == 403:
        return Forbidden(message)
    if status == 404:
        return NotFound(message)
    if status == 429:
        after = _retry_after(response) if response is not None else None
        hint = f"the registry asks to retry in {after:.0f}s" if after is not None else None
        return TooManyRequests(message, hint=hint)
    if status >= 500:
        return RegistryUnavailable(message)
    return RegistryError(message)


def _error_detail(body: bytes) -> str:
    """The registry's ``{"errors":[{"code","message"}]}`` (or its raw text) on one line."""
    if not body:
        return ""
    text = body.decode("utf-8", errors="replace")
    try:
        errors = json.loads(text).get("errors")
        parts = [
            " ".join(str(p) for p in (e.get("code"), e.get("message")) if p)
            for e in errors
            if isinstance(e, dict)
        ]
        text = "; ".join(p for p in parts if p) or text
    except (ValueError, AttributeError, TypeError):
        pass
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


async def _read_limited(
    response: httpx.Response, limit: int, *, describe: str | None = None
) -> bytes:
    """Read a (streamed) body of at most ``limit`` bytes; over it, ``ResourceExhausted``."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise ResourceExhausted(f"{describe or 'registry answer'}: more than {limit} bytes")
            parts.append(chunk)
    except httpx.TransportError as exc:
        raise RegistryUnavailable(
            f"{describe or 'registry answer'}: connection lost: {_explain(exc)}"
        ) from exc
    finally:
        await response.aclose()
    return b"".join(parts)


def _explain(exc: httpx.HTTPError) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    return None


def _range_total(header: str) -> int | None:
    match = re.match(r"^bytes \*/(\d+)$", header.strip())
    return int(match.group(1)) if match else None


def _header_digest(response: httpx.Response, describe: str) -> Digest | None:
    value = response.headers.get("Docker-Content-Digest")
    if not value:
        return None
    try:
        return Digest(value.strip())
    except StarlightError as exc:
        raise RegistryError(f"{describe}: bad Docker-Content-Digest {value!r}") from exc


def _content_type(response: httpx.Response) -> str:
    value = str(response.headers.get("Content-Type", ""))
    return value.split(";", 1)[0].strip().lower()


def _manifest_media_type(response: httpx.Response, data: bytes) -> str:
    media_type = _content_type(response)
    if media_type not in _GENERIC_CONTENT_TYPES:
        return media_type
    # Some registries (and static file servers) say application/json: read the document.
    try:
        document = json.loads(data)
    except ValueError:
        return media_type or _OCTET_STREAM
    if not isinstance(document, dict):
        return media_type or _OCTET_STREAM
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if "manifests" in document:
        return oci.OCI_INDEX
    config = document.get("config")
    if isinstance(config, dict) and config.get("mediaType") == oci.DOCKER_CONFIG:
        return oci.DOCKER_MANIFEST
    return oci.OCI_MANIFEST


def _location(response: httpx.Response, describe: str) -> httpx.URL:
    value = response.headers.get("Location")
    if not value:
        raise RegistryError(
            f"{describe}: registry answered {response.status_code} without Location"
        )
    return response.request.url.join(value)


def _hash(algorithm: str, data: bytes) -> hashlib._Hash:
    hasher = hashlib.new(algorithm)
    hasher.update(data)
    return hasher


def _pull(ref: Reference) -> tuple[str, ...]:
    return (f"repository:{ref.path}:pull",)


def _push(ref: Reference) -> tuple[str, ...]:
    return (f"repository:{ref.path}:pull,push",)


def _repository_path(ref: Reference, repository: str) -> str:
    """``from_repository`` as a path in ``ref``'s registry (a full name is accepted too)."""
    try:
        other = Reference.parse(repository, default_tag=None)
    except StarlightError:
        return repository
    return other.path if other.registry_host == ref.registry_host else repository


def _as_reference(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)
