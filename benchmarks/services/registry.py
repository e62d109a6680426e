"""A private instance of the real distribution registry (``/usr/bin/docker-registry``).

Storage, configuration and log live under the given work directory and the registry listens
on its own loopback port, so several instances (several test sessions) run side by side. The
port and the storage survive ``stop()``: ``start()`` again brings back the same registry with
the same content, which is how tests simulate an outage.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from benchmarks.services import free_port
from benchmarks.services.process import ServiceProcess
from benchmarks.wan.netns import call_in_netns, netns_argv

__all__ = ["REGISTRY_BINARY", "Registry"]

REGISTRY_BINARY: Final = "/usr/bin/docker-registry"
_START_TIMEOUT: Final = 30.0


class Registry(ServiceProcess):
    """Launch ``docker-registry serve`` with filesystem storage on 127.0.0.1.

    ``htpasswd=(user, password)`` turns on Basic authentication. ``url`` is the base URL
    (``http://127.0.0.1:PORT``), ``host`` the registry part of image references.
    ``netns`` runs it inside that network namespace (``benchmarks.wan``), listening on
    ``listen`` (an address of that namespace); its readiness is checked from inside too.
    """

    name = "docker-registry"
    stop_timeout = 10.0

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        htpasswd: tuple[str, str] | None = None,
        binary: str = REGISTRY_BINARY,
        netns: str | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.netns = netns
        self.listen = listen
        self.port = port if port is not None else free_port()
        self.htpasswd = htpasswd
        self.binary = binary
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        super().__init__(self.workdir / "registry.log")

    @property
    def host(self) -> str:
        return f"{self.listen}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"{self.binary} not found: apt-get install docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self._write_config()
        self._spawn(
            netns_argv(self.netns, [self.binary, "serve", str(self.config_path)]), cwd=self.workdir
        )
        self._wait_ready(
            lambda: call_in_netns(self.netns, self._answers),
            timeout=_START_TIMEOUT,
            what=f"docker-registry on {self.host}",
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def _answers(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            # 401 is the answer of a registry that wants credentials: it is up.
            return exc.code == 401
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _write_config(self) -> None:
        # A fixed HTTP secret: upload state tokens stay valid across a restart.
        secret_path = self.workdir / "http-secret"
        if not secret_path.exists():
            secret_path.write_text(secrets.token_hex(16))
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secret_path.read_text().strip()}",
        ]
        if self.htpasswd is not None:
            htpasswd_path = self.workdir / "htpasswd"
            htpasswd_path.write_text(_bcrypt_line(*self.htpasswd))
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: starlight-test",
                f"    path: {htpasswd_path}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")


def _bcrypt_line(user: str, password: str) -> str:
    tool = shutil.which("htpasswd")
    if tool is None:
        raise FileNotFoundError("htpasswd not found: apt-get install apache2-utils")
    # distribution accepts bcrypt entries only.
    result = subprocess.run(
        [tool, "-Bbn", user, password], check=True, capture_output=True, text=True
    )
    return result.stdout.strip() + "\n"
