"""Registry credentials: explicit ``user:password`` pairs and Docker's ``config.json``.

Lookups follow Docker's order for a host: an explicit credential, then the host's
``credHelpers`` entry, then the ``credsStore`` helper, then the ``auths`` entry. Helpers are
run as ``docker-credential-<name> get`` (the server address on stdin, JSON on stdout), exactly
the protocol ``docker login`` uses, so whatever the operator logged in with works here.

No HTTP here: ``starlight_core.registry`` turns these into ``Authorization`` headers.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from starlight_core.errors import InvalidInput, Unauthorized

__all__ = [
    "DOCKER_HUB_AUTH_KEY",
    "CredentialStore",
    "Credentials",
    "docker_config_path",
    "normalize_registry_host",
]

# The key ``docker login`` writes for Docker Hub, and what its helpers expect as server URL.
DOCKER_HUB_AUTH_KEY: Final = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# A helper answering with this user name hands out an identity (OAuth2 refresh) token.
_HELPER_TOKEN_USER: Final = "<token>"
_HELPER_TIMEOUT: Final = 60.0


@attrs.frozen
class Credentials:
    """What to authenticate with at one registry.

    ``username``/``password`` go to Basic auth or to the token server; ``identity_token`` is an
    OAuth2 refresh token (``docker login`` against some registries stores one instead of the
    password); ``registry_token`` is a bearer token sent to the registry as is.
    """

    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    identity_token: str | None = attrs.field(default=None, repr=False)
    registry_token: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """``user:password`` as given to ``--user`` (the password may contain colons)."""
        username, sep, password = text.partition(":")
        if not sep or not username:
            raise InvalidInput("credentials must be given as USER:PASSWORD")
        return cls(username=username, password=password)

    @property
    def has_password(self) -> bool:
        return self.username is not None and self.password is not None

    def basic_authorization(self) -> str | None:
        """The ``Authorization`` header value for Basic auth, if a password is known."""
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def normalize_registry_host(key: str) -> str:
    """The host part of a registry name or of a ``config.json`` key, Docker Hub folded to one.

    ``https://index.docker.io/v1/``, ``registry-1.docker.io`` and ``docker.io`` are all
    ``docker.io``; ``http://Example.com:5000/`` is ``example.com:5000``.
    """
    host = key.strip()
    for scheme in ("https://", "http://"):
        if host.lower().startswith(scheme):
            host = host[len(scheme) :]
            break
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host


def docker_config_path() -> Path:
    """Where Docker keeps ``config.json``: ``$DOCKER_CONFIG`` or ``~/.docker``."""
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


class CredentialStore:
    """Credentials for every registry host, looked up lazily and cached per host.

    ``explicit`` maps a registry host (``127.0.0.1:5000``, ``docker.io``…) to credentials or to
    ``"user:password"`` text; those win over ``config.json``. ``docker_config`` is the
    ``config.json`` to read (missing file: no credentials from it); ``None`` reads none.
    """

    def __init__(
        self,
        explicit: Mapping[str, Credentials | str] | None = None,
        *,
        docker_config: Path | None = None,
    ) -> None:
        self._explicit: dict[str, Credentials] = {}
        for host, value in (explicit or {}).items():
            creds = Credentials.parse(value) if isinstance(value, str) else value
            self._explicit[normalize_registry_host(host)] = creds
        self._config_path = docker_config
        self._auths: dict[str, Credentials] = {}
        self._helpers: dict[str, str] = {}
        self._store: str | None = None
        if docker_config is not None:
            self._load(docker_config)
        self._cache: dict[str, Credentials | None] = {}

    @classmethod
    def anonymous(cls) -> CredentialStore:
        return cls()

    @classmethod
    def from_docker_config(
        cls,
        path: Path | None = None,
        *,
        explicit: Mapping[str, Credentials | str] | None = None,
    ) -> CredentialStore:
        """Read ``path`` (default: ``$DOCKER_CONFIG/config.json`` or ``~/.docker``)."""
        return cls(explicit, docker_config=path if path is not None else docker_config_path())

    def lookup(self, host: str) -> Credentials | None:
        """Credentials for ``host``, or ``None`` for anonymous access.

        May run a credential helper (a subprocess): async callers run it in a thread.
        """
        key = normalize_registry_host(host)
        if key in self._cache:
            return self._cache[key]
        found = self._find(key)
        self._cache[key] = found
        return found

    def _find(self, key: str) -> Credentials | None:
        if key in self._explicit:
            return self._explicit[key]
        helper = self._helpers.get(key)
        if helper is not None:
            return _run_helper(helper, _server_url(key))
        if self._store is not None:
            found = _run_helper(self._store, _server_url(key))
            if found is not None:
                return found
        return self._auths.get(key)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise InvalidInput(f"cannot read Docker config {path}: {exc.strerror}") from exc
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"invalid Docker config {path}: not JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise InvalidInput(f"invalid Docker config {path}: not a JSON object")
        auths = config.get("auths")
        helpers = config.get("credHelpers")
        auths = {} if auths is None else auths
        helpers = {} if helpers is None else helpers
        store = config.get("credsStore")
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise InvalidInput(f"invalid Docker config {path}: auths/credHelpers must be objects")
        for key, entry in auths.items():
            creds = _parse_auth_entry(entry, f"{path}: auths[{key!r}]")
            if creds is not None:
                self._auths[normalize_registry_host(key)] = creds
        for key, helper in helpers.items():
            if not isinstance(helper, str) or not helper:
                raise InvalidInput(f"invalid Docker config {path}: credHelpers[{key!r}]")
            self._helpers[normalize_registry_host(key)] = helper
        if store is not None:
            if not isinstance(store, str):
                raise InvalidInput(f"invalid Docker config {path}: credsStore must be a string")
            self._store = store or None


def _parse_auth_entry(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise InvalidInput(f"invalid Docker config {where}: not an object")
    username = entry.get("username") or None
    password = entry.get("password") or None
    encoded = entry.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise InvalidInput(f"invalid Docker config {where}: auth is not base64") from exc
        username, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidInput(f"invalid Docker config {where}: auth is not user:password")
    identity_token = entry.get("identitytoken") or None
    registry_token = entry.get("registrytoken") or None
    if not (username or password or identity_token or registry_token):
        # ``{}`` placeholders are what Docker writes when a credsStore holds the secret.
        return None
    return Credentials(
        username=username,
        password=password,
        identity_token=identity_token,
        registry_token=registry_token,
    )


def _server_url(key: str) -> str:
    return DOCKER_HUB_AUTH_KEY if key == "docker.io" else key


def _run_helper(helper: str, server_url: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    path = shutil.which(program)
    if path is None:
        raise Unauthorized(
            f"credential helper {program} for {server_url} is not installed",
            hint=f"install {program} or remove it from the Docker config",
        )
    try:
        result = subprocess.run(
            [path, "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unauthorized(f"credential helper {program} failed for {server_url}: {exc}") from exc
    output = result.stdout.decode(errors="replace").strip()
    if result.returncode != 0:
        # The helpers' one agreed way to say "nothing stored for this server".
        if "credentials not found" in output.lower():
            return None
        detail = (result.stderr.decode(errors="replace").strip() or output).splitlines()
        raise Unauthorized(
            f"credential helper {program} failed for {server_url}: "
            f"exit {result.returncode}: {detail[0] if detail else 'no output'}"
        )
    try:
        answer = json.loads(output)
        username, secret = answer.get("Username"), answer.get("Secret")
    except (ValueError, AttributeError) as exc:
        raise Unauthorized(
            f"credential helper {program} answered garbage for {server_url}"
        ) from exc
    if not isinstance(secret, str) or not secret:
        return None
    if username == _HELPER_TOKEN_USER:
        return Credentials(identity_token=secret)
    return Credentials(username=str(username) if username else None, password=secret)
