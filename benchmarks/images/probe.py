"""Readiness probes, as data: when is a started container ready to serve?

Three kinds, as the Starlight paper's "ready" events and Kubernetes' probes have them:

* ``log``: a regular expression matched against the container's output so far;
* ``tcp``: connect, send ``send`` (if any) and read until ``expect`` appears in the reply;
* ``http``: ``GET path`` answered with ``status``.

``Probe.check`` makes one attempt and never raises for a service that is not up yet (connection
refused, reset, timeout, wrong answer): the caller polls it at the interval it chooses.
"""

from __future__ import annotations

import http.client
import re
import socket
from typing import Final, Literal

import attrs

__all__ = ["Probe", "ProbeKind"]

ProbeKind = Literal["log", "tcp", "http"]
_ATTEMPT_TIMEOUT: Final = 2.0


@attrs.frozen
class Probe:
    kind: ProbeKind
    port: int = 0
    """TCP port for ``tcp`` and ``http`` probes (the service's default; see ``on_port``)."""
    pattern: str = ""
    """``log``: regular expression searched in the output."""
    path: str = "/"
    status: int = 200
    send: bytes = b""
    expect: bytes = b""
    """``tcp``: bytes the reply must contain (empty: a connection is enough)."""

    def __attrs_post_init__(self) -> None:
        if self.kind == "log" and not self.pattern:
            raise ValueError("a log probe needs a pattern")
        if self.kind in ("tcp", "http") and not 0 < self.port < 65536:
            raise ValueError(f"a {self.kind} probe needs a port")
        if self.kind == "log":
            re.compile(self.pattern)

    def on_port(self, port: int) -> Probe:
        """The same probe against a service started on another port (log probes unchanged)."""
        return self if self.kind == "log" else attrs.evolve(self, port=port)

    def check(self, *, output: str = "", host: str = "127.0.0.1") -> bool:
        """One attempt: is the service ready? ``output`` is the container's output so far."""
        if self.kind == "log":
            return re.search(self.pattern, output, re.MULTILINE) is not None
        try:
            if self.kind == "tcp":
                return self._tcp(host)
            return self._http(host)
        except (OSError, http.client.HTTPException):
            return False

    def describe(self) -> str:
        if self.kind == "log":
            return f"log /{self.pattern}/"
        if self.kind == "tcp":
            return f"tcp :{self.port} {self.send!r} → {self.expect!r}"
        return f"http :{self.port}{self.path} → {self.status}"

    def _tcp(self, host: str) -> bool:
        with socket.create_connection((host, self.port), timeout=_ATTEMPT_TIMEOUT) as sock:
            if self.send:
                sock.sendall(self.send)
            if not self.expect:
                return True
            reply = b""
            while self.expect not in reply and len(reply) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return self.expect in reply

    def _http(self, host: str) -> bool:
        connection = http.client.HTTPConnection(host, self.port, timeout=_ATTEMPT_TIMEOUT)
        try:
            connection.request("GET", self.path, headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            return response.status == self.status
        finally:
            connection.close()
