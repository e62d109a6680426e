"""``ctr-starlight notify``, ``ping`` and ``convert --notify`` against a real ``starlight-proxy``
process and a real docker-registry."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.images.build import push_image
from benchmarks.services import free_port
from benchmarks.services.proxy import ProxyProcess
from benchmarks.services.registry import Registry
from starlight_cli.main import cli
from starlight_core.proxy_client import ImageView, ProxyClient
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_core.testing import TarMember, build_tar

pytestmark = pytest.mark.e2e

USER = "ci:s3cret"


@pytest.fixture(autouse=True)
def no_cli_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what each test passes: no cli.toml, no STARLIGHT_PROXY* from the environment."""
    monkeypatch.setenv("STARLIGHT_CLI_CONFIG", str(tmp_path / "absent.toml"))
    for name in ("STARLIGHT_PROXY", "STARLIGHT_PROXY_USER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def proxy(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with ProxyProcess(
        tmp_path_factory.mktemp("proxy"),
        registries=[{"host": registry.host, "plain_http": True}],
    ) as process:
        yield process


@pytest.fixture(scope="module")
def guarded(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy that wants client credentials."""
    name, password = USER.split(":")
    with ProxyProcess(
        tmp_path_factory.mktemp("guarded"),
        registries=[{"host": registry.host, "plain_http": True}],
        auth={"users": [{"name": name, "password": password}]},
    ) as process:
        yield process


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def push_plain(registry: Registry, name: str) -> Reference:
    reference = Reference.parse(f"{registry.host}/{name}-{uuid.uuid4().hex[:8]}:v1")
    layers = [
        build_tar([TarMember("etc", kind="dir"), TarMember("etc/motd", data=b"hello\n" * 100)]),
        build_tar([TarMember("app", kind="dir"), TarMember("app/run.sh", data=b"#!/bin/sh\n")]),
    ]

    async def push() -> None:
        async with RegistryClient(plain_http=True) as client:
            await push_image(client, reference, layers)

    asyncio.run(push())
    return reference


def images_of(proxy: ProxyProcess, name: str) -> list[ImageView]:
    async def listed() -> list[ImageView]:
        async with ProxyClient(proxy.url) as client:
            return await client.images(name=name)

    return asyncio.run(listed())


def test_convert_notify_then_notify_again(registry: Registry, proxy: ProxyProcess) -> None:
    source = push_plain(registry, "cli-notify")
    destination = source.with_tag("v1-starlight")
    code, out, err = run(
        "convert", "--quiet", "--plain-http", "--notify", "--proxy", proxy.url,
        str(source), str(destination),
    )  # fmt: skip
    assert code == 0, err
    (image,) = images_of(proxy, destination.name)
    assert image.state == "ready"
    assert image.tags == ("v1-starlight",)
    assert out.strip().endswith(str(image.digest))  # convert prints the pinned reference

    code, out, err = run("notify", "--proxy", proxy.url, str(destination))
    assert code == 0, err
    assert out.strip() == f"{image.name}@{image.digest} linux/amd64 ready"
    assert "0 layers indexed, 2 already known" in err


def test_notify_by_environment_with_credentials(
    registry: Registry, guarded: ProxyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = push_plain(registry, "cli-env")
    destination = source.with_tag("v1-starlight")
    code, _, err = run("convert", "--quiet", "--plain-http", str(source), str(destination))
    assert code == 0, err

    monkeypatch.setenv("STARLIGHT_PROXY", guarded.url)
    code, _, err = run("notify", str(destination))
    assert code == 1
    assert err.startswith("ctr-starlight: error: ")
    assert len(err.strip().splitlines()) == 1
    assert "credentials" in err

    monkeypatch.setenv("STARLIGHT_PROXY_USER", USER)
    code, out, err = run("notify", "--platform", "linux/amd64", str(destination))
    assert code == 0, err
    assert out.endswith("linux/amd64 ready\n")
    assert "2 layers indexed" in err


def test_notify_refuses_an_image_not_converted(registry: Registry, proxy: ProxyProcess) -> None:
    source = push_plain(registry, "cli-plain")
    code, out, err = run("notify", "--proxy", proxy.url, str(source))
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "not in Starlight format" in err
    assert "ctr-starlight convert" in err


def test_ping(proxy: ProxyProcess) -> None:
    code, out, err = run("ping", "--proxy", proxy.url, "--count", "3")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"proxy {proxy.url}: starlight-proxy 0.1.0, sqlite")
    assert [line.split()[0] for line in lines[1:4]] == ["seq=1", "seq=2", "seq=3"]
    assert lines[4].startswith("rtt min/avg/max = ")


def test_proxy_down_exits_3_with_one_line() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("ping", "--proxy", dead), ("notify", "--proxy", dead, "example.com/a:b")):
        code, _, err = run(*args)
        assert code == 3, (args, err)
        assert err.startswith("ctr-starlight: error: proxy ")
        assert len(err.strip().splitlines()) == 1
        assert "starlight-proxy is running" in err


def test_no_proxy_configured() -> None:
    code, _, err = run("ping")
    assert code == 1
    assert "proxy not configured" in err
    code, _, err = run("notify", "--proxy", "ftp://x", "example.com/a:b")
    assert code == 1
    assert "http://" in err


def test_the_installed_command(proxy: ProxyProcess) -> None:
    """The entry point itself (not click's runner): exit status and streams."""
    binary = Path(sys.executable).with_name("ctr-starlight")
    result = subprocess.run(
        [str(binary), "ping", "--proxy", proxy.url, "-c", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "rtt min/avg/max" in result.stdout
