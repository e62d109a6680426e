"""An in-memory distribution registry for ``httpx.MockTransport``: enough of ``/v2/`` to test
the registry client against, with switchable authentication (none, Basic, token) and failures
on demand. It checks what a real registry checks (digests on upload, Content-Range order on
PATCH, scopes on tokens) so that a client bug shows up as an error, not as a pass.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Literal

import attrs
import httpx

from starlight_core.digest import Digest, sha256_digest

__all__ = ["Failure", "FakeRegistry"]

_ROUTE_RE = re.compile(
    r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs/uploads|blobs|tags)/(?P<rest>.*)$"
)
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@attrs.define
class Failure:
    """Answer the next ``times`` matching requests with ``status`` (or a broken connection)."""

    status: int | None
    times: int
    method: str | None = None
    path_contains: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    # "connect": refuse before any byte; "body": send half the body then break the connection.
    broken: Literal["connect", "body"] | None = None

    def matches(self, request: httpx.Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        return self.path_contains is None or self.path_contains in request.url.path


class _BrokenBody(httpx.AsyncByteStream):
    def __init__(self, data: bytes, request: httpx.Request) -> None:
        self._data = data
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data[: len(self._data) // 2]
        raise httpx.ReadError("connection reset by peer", request=self._request)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return httpx.Response(
        status,
        content=body.encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


class FakeRegistry:
    """Serve ``https://<host>/v2/…``; tokens from ``https://auth.test/token``; redirected blobs
    from ``https://storage.test/…`` when ``redirect_blobs`` is set."""

    def __init__(
        self,
        host: str = "registry.test",
        *,
        auth: Literal["basic", "token"] | None = None,
        users: dict[str, str] | None = None,
        anonymous_pull: bool = False,
        refresh_token: str | None = None,
    ) -> None:
        self.host = host
        self.auth = auth
        self.users = users if users is not None else {"alice": "s3cret"}
        self.anonymous_pull = anonymous_pull
        self.refresh_token = refresh_token
        self.realm = "https://auth.test/token"
        self.service = "fake-registry"
        self.blobs: dict[str, bytes] = {}
        self.links: dict[str, set[str]] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}
        self.uploads: dict[str, tuple[str, bytearray]] = {}
        self.cancelled: list[str] = []
        self.requests: list[httpx.Request] = []
        self.token_requests: list[httpx.Request] = []
        self.storage_requests: list[httpx.Request] = []
        self.tokens: dict[str, set[tuple[str, str]]] = {}
        self.failures: list[Failure] = []
        self.redirect_blobs = False
        self.ignore_range = False
        self.wrong_content_range = False
        self.manifest_content_type: str | None = None  # override the served Content-Type
        self.wrong_digest_header = False
        self.tags_page_size = 1000
        self.max_patch = 0
        self._ids = itertools.count(1)

    # --- set-up helpers ---------------------------------------------------------------------

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def add_blob(self, repo: str, data: bytes) -> Digest:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        self.links.setdefault(repo, set()).add(digest)
        return digest

    def add_manifest(self, repo: str, tag: str | None, data: bytes, media_type: str) -> Digest:
        digest = sha256_digest(data)
        store = self.manifests.setdefault(repo, {})
        store[digest] = (data, media_type)
        if tag is not None:
            store[tag] = (data, media_type)
        return digest

    def fail(self, status: int | None, times: int = 1, **kwargs: object) -> None:
        self.failures.append(Failure(status, times, **kwargs))  # type: ignore[arg-type]

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def registry_requests(self, method: str | None = None) -> list[httpx.Request]:
        return [r for r in self.requests if method is None or r.method == method]

    # --- dispatch ---------------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            self.token_requests.append(request)
            return self._token(request)
        if request.url.host == "storage.test":
            self.storage_requests.append(request)
            digest = request.url.path.rsplit("/", 1)[-1]
            return self._serve_blob(request, self.blobs[digest])
        assert request.url.host == self.host.split(":")[0], request.url
        self.requests.append(request)
        for failure in self.failures:
            if failure.times > 0 and failure.matches(request):
                failure.times -= 1
                if failure.broken == "connect":
                    raise httpx.ConnectError("connection refused", request=request)
                if failure.broken == "body":
                    data = b"x" * 1000
                    return httpx.Response(
                        200,
                        headers={"Content-Length": str(len(data))},
                        stream=_BrokenBody(data, request),
                    )
                assert failure.status is not None
                return _error(
                    failure.status, "INJECTED", f"injected {failure.status}", failure.headers
                )
        if request.url.path == "/v2/" or request.url.path == "/v2":
            denied = self._check_auth(request, None, "pull")
            return denied or httpx.Response(200, json={})
        match = _ROUTE_RE.match(request.url.path)
        if match is None:
            return _error(404, "NOT_FOUND", "no route")
        name, kind, rest = match.group("name", "kind", "rest")
        action = "pull" if request.method in ("GET", "HEAD") else "push"
        denied = self._check_auth(request, name, action)
        if denied is not None:
            return denied
        if kind == "manifests":
            return self._manifests(request, name, rest)
        if kind == "blobs":
            return self._blobs(request, name, rest)
        if kind == "blobs/uploads":
            return self._uploads(request, name, rest)
        return self._tags(request, name)

    # --- authentication ---------------------------------------------------------------------

    def _user_from_basic(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def _check_auth(
        self, request: httpx.Request, name: str | None, action: str
    ) -> httpx.Response | None:
        header = request.headers.get("Authorization", "")
        if self.auth is None:
            return None
        if self.auth == "basic":
            if self._user_from_basic(header) is not None:
                return None
            return _error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                {"WWW-Authenticate": 'Basic realm="fake-registry"'},
            )
        needed = None if name is None else (name, action)
        if header.startswith("Bearer "):
            granted = self.tokens.get(header[7:])
            if granted is not None and (needed is None or needed in granted):
                return None
        scope = (
            ""
            if name is None
            else f',scope="repository:{name}:{"pull" if action == "pull" else "pull,push"}"'
        )
        error = ',error="insufficient_scope"' if header.startswith("Bearer ") else ""
        challenge = f'Bearer realm="{self.realm}",service="{self.service}"{scope}{error}'
        return _error(
            401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge}
        )

    def _token(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            form = dict(httpx.QueryParams(request.content.decode()))
            if (
                form.get("grant_type") != "refresh_token"
                or form.get("refresh_token") != self.refresh_token
            ):
                return httpx.Response(401, json={"details": "bad refresh token"})
            user: str | None = "alice"
            scopes = form.get("scope", "").split()
            service = form.get("service")
        else:
            header = request.headers.get("Authorization", "")
            user = self._user_from_basic(header)
            if header and user is None:
                return httpx.Response(401, json={"details": "incorrect username or password"})
            if user is not None and request.url.params.get("account") != user:
                return httpx.Response(400, json={"details": "account does not match"})
            scopes = request.url.params.get_list("scope")
            service = request.url.params.get("service")
        if service != self.service:
            return httpx.Response(400, json={"details": "unknown service"})
        granted: set[tuple[str, str]] = set()
        for scope in scopes:
            kind, name, actions = scope.split(":")
            assert kind == "repository"
            for action in actions.split(","):
                if user is not None or (self.anonymous_pull and action == "pull"):
                    granted.add((name, action))
        if user is None and not self.anonymous_pull:
            return httpx.Response(401, json={"details": "authentication required"})
        token = f"token-{next(self._ids)}"
        self.tokens[token] = granted
        return httpx.Response(200, json={"token": token, "expires_in": 300})

    # --- manifests --------------------------------------------------------------------------

    def _manifests(self, request: httpx.Request, name: str, reference: str) -> httpx.Response:
        store = self.manifests.setdefault(name, {})
        if request.method == "PUT":
            media_type = request.headers.get("Content-Type", "")
            data = request.content
            digest = sha256_digest(data)
            if reference.startswith("sha256:") and reference != digest:
                return _error(
                    400, "DIGEST_INVALID", "provided digest did not match uploaded content"
                )
            store[digest] = (data, media_type)
            store[reference] = (data, media_type)
            return httpx.Response(
                201,
                headers={
                    "Docker-Content-Digest": digest,
                    "Location": f"/v2/{name}/manifests/{digest}",
                },
            )
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "method not allowed")
        if reference not in store:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        data, media_type = store[reference]
        digest = sha256_digest(data)
        if self.wrong_digest_header:
            digest = sha256_digest(data + b"!")
        headers = {
            "Content-Type": self.manifest_content_type
            if self.manifest_content_type is not None
            else media_type,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(data)),
        }
        return httpx.Response(
            200, headers=headers, content=b"" if request.method == "HEAD" else data
        )

    # --- blobs ------------------------------------------------------------------------------

    def _blobs(self, request: httpx.Request, name: str, digest: str) -> httpx.Response:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "method not allowed")
        if digest not in self.links.get(name, set()):
            if request.method == "HEAD":
                return httpx.Response(404)
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if self.redirect_blobs:
            return httpx.Response(307, headers={"Location": f"https://storage.test/data/{digest}"})
        return self._serve_blob(request, self.blobs[digest], digest)

    def _serve_blob(
        self, request: httpx.Request, data: bytes, digest: str | None = None
    ) -> httpx.Response:
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if digest is not None:
            headers["Docker-Content-Digest"] = digest
        range_header = request.headers.get("Range")
        if range_header is None or self.ignore_range:
            headers["Content-Length"] = str(len(data))
            return httpx.Response(
                200, headers=headers, content=b"" if request.method == "HEAD" else data
            )
        match = _RANGE_RE.match(range_header)
        assert match is not None, range_header
        start = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else len(data) - 1
        if start >= len(data):
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
        last = min(last, len(data) - 1)
        shown_start = start + 1 if self.wrong_content_range else start
        headers["Content-Range"] = f"bytes {shown_start}-{last}/{len(data)}"
        return httpx.Response(206, headers=headers, content=data[start : last + 1])

    # --- uploads ----------------------------------------------------------------------------

    def _uploads(self, request: httpx.Request, name: str, upload_id: str) -> httpx.Response:
        params = request.url.params
        if request.method == "POST" and not upload_id:
            mount, source = params.get("mount"), params.get("from")
            if mount is not None and source is not None and mount in self.links.get(source, set()):
                self.links.setdefault(name, set()).add(mount)
                return httpx.Response(
                    201,
                    headers={
                        "Location": f"/v2/{name}/blobs/{mount}",
                        "Docker-Content-Digest": mount,
                    },
                )
            new_id = f"upload-{next(self._ids)}"
            self.uploads[new_id] = (name, bytearray())
            # A relative Location with a query of its own, as distribution sends (_state).
            return httpx.Response(
                202,
                headers={
                    "Location": f"/v2/{name}/blobs/uploads/{new_id}?_state=s{new_id}",
                    "Range": "0-0",
                },
            )
        if upload_id not in self.uploads:
            return _error(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry")
        owner, buffer = self.uploads[upload_id]
        assert owner == name
        if params.get("_state") != f"s{upload_id}":
            return _error(400, "BLOB_UPLOAD_INVALID", "lost the upload state")
        if request.method == "DELETE":
            del self.uploads[upload_id]
            self.cancelled.append(upload_id)
            return httpx.Response(204)
        if request.method == "PATCH":
            data = request.content
            self.max_patch = max(self.max_patch, len(data))
            content_range = request.headers.get("Content-Range")
            if content_range is not None:
                start, _, last = content_range.partition("-")
                if int(start) != len(buffer) or int(last) != len(buffer) + len(data) - 1:
                    return httpx.Response(416)
            buffer += data
            return httpx.Response(
                202,
                headers={
                    "Location": f"/v2/{name}/blobs/uploads/{upload_id}?_state=s{upload_id}",
                    "Range": f"0-{len(buffer) - 1}",
                },
            )
        if request.method == "PUT":
            buffer += request.content
            digest = params.get("digest")
            if digest is None or Digest(digest) != Digest(
                f"sha256:{hashlib.sha256(buffer).hexdigest()}"
            ):
                return _error(
                    400, "DIGEST_INVALID", "provided digest did not match uploaded content"
                )
            del self.uploads[upload_id]
            self.add_blob(name, bytes(buffer))
            return httpx.Response(
                201,
                headers={"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest},
            )
        return _error(405, "UNSUPPORTED", "method not allowed")

    # --- tags -------------------------------------------------------------------------------

    def _tags(self, request: httpx.Request, name: str) -> httpx.Response:
        if name not in self.manifests:
            return _error(404, "NAME_UNKNOWN", "repository name not known to registry")
        tags = sorted(t for t in self.manifests[name] if not t.startswith("sha256:"))
        last = request.url.params.get("last")
        if last is not None:
            tags = [t for t in tags if t > last]
        page, more = tags[: self.tags_page_size], len(tags) > self.tags_page_size
        headers = {}
        if more:
            headers["Link"] = (
                f'</v2/{name}/tags/list?n={self.tags_page_size}&last={page[-1]}>; rel="next"'
            )
        return httpx.Response(200, json={"name": name, "tags": page}, headers=headers)
