"""Client authentication: who may ask this proxy for bundles, notifies and metrics.

The proxy checks credentials itself (the original left that to a reverse proxy): HTTP Basic
against the configured users, or ``Bearer`` against the configured tokens. Comparisons are
constant-time; the answer to a refused request names the schemes it accepts.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlight_proxy.config import AuthConfig

__all__ = ["ClientAuth"]


class ClientAuth:
    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._users = {user.name: user for user in config.users}
        self._tokens = tuple(token.encode() for token in config.tokens)

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value lets the request in."""
        if not self.enabled:
            return True
        if not authorization:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "bearer" and self._tokens:
            offered = credentials.encode()
            # Check every token: the time taken must not say which one nearly matched.
            matches = [hmac.compare_digest(offered, token) for token in self._tokens]
            return any(matches)
        if scheme == "basic" and self._users:
            try:
                decoded = base64.b64decode(credentials, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            name, sep, password = decoded.partition(":")
            user = self._users.get(name)
            return bool(sep) and user is not None and user.accepts(password)
        return False

    def challenges(self) -> list[str]:
        """``WWW-Authenticate`` values for a refused request, one per accepted scheme."""
        realm = self._config.realm
        values = []
        if self._config.users:
            values.append(f'Basic realm="{realm}", charset="UTF-8"')
        if self._config.tokens:
            values.append(f'Bearer realm="{realm}"')
        return values
