"""The proxy's configuration (file, environment, flags), client authentication, the entry
point's config check and the client's error mapping. Pure: no services."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks.services.proxy import render_toml
from starlight_core.errors import (
    AuthenticationRequired,
    ImageNotFound,
    InvalidInput,
    NotFound,
    ProxyUnavailable,
    RegistryNotServed,
    StarlightError,
)
from starlight_core.proxy_client import ProxyClient, error_from_response
from starlight_core.reference import Reference
from starlight_proxy.auth import ClientAuth
from starlight_proxy.config import (
    DEFAULT_DATABASE,
    AuthConfig,
    BasicUser,
    ProxyConfig,
    UpstreamRegistry,
    load_config,
)
from starlight_proxy.upstream import Upstreams

FULL = """
listen = "0.0.0.0"
port = 9100
database = "postgresql://starlight@db/starlight"
allow_any_registry = false
auto_notify = true

[[registries]]
host = "registry.example:5000"
url = "http://10.0.0.7:5000"
username = "proxy"
password = "pw"

[[registries]]
host = "docker.io"

[auth]
tokens = ["t0ken"]
[[auth.users]]
name = "worker"
password = "secret"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path


def test_defaults_work_on_one_box() -> None:
    config = ProxyConfig()
    assert (config.listen, config.port, config.database) == ("127.0.0.1", 8090, DEFAULT_DATABASE)
    assert not config.auth.enabled
    assert not config.allow_any_registry
    assert not config.auto_notify


def test_file_environment_and_flags_in_that_order(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(path, environ={})
    assert config.listen == "0.0.0.0"
    assert config.port == 9100
    assert config.auto_notify is True
    (ours, hub) = config.registries
    assert ours.upstream_host == "10.0.0.7:5000"
    assert ours.uses_plain_http
    assert hub.upstream_host == "registry-1.docker.io"
    assert not hub.uses_plain_http
    assert config.auth.enabled

    environ = {
        "STARLIGHT_PROXY_PORT": "9200",
        "STARLIGHT_PROXY_AUTO_NOTIFY": "off",
        "STARLIGHT_PROXY_REGISTRY_TIMEOUT": "2.5",
        "STARLIGHT_PROXY_USER": "ignored:not-a-setting",  # the CLI's variable, not ours
    }
    config = load_config(path, environ=environ)
    assert (config.port, config.auto_notify, config.registry_timeout) == (9200, False, 2.5)
    config = load_config(path, environ=environ, port=9300, listen=None)
    assert (config.port, config.listen) == (9300, "0.0.0.0")
    # The file named by the environment.
    config = load_config(environ={"STARLIGHT_PROXY_CONFIG": str(path)})
    assert config.port == 9100


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("port = 70000", {}, "port must be 0..65535"),
        ("port = 'x'", {}, "$.port"),
        ("colour = 'blue'", {}, "colour"),
        ("log_level = 'loud'", {}, "log_level"),
        ("database = ''", {}, "database must not be empty"),
        ("ranges_in_flight = 0", {}, "ranges_in_flight must be positive"),
        ("[[registries]]\nhost = 'nohost'", {}, "registry name"),
        ("[[registries]]\nhost = 'r.example'\nurl = 'ftp://x'", {}, "http://"),
        ("[[registries]]\nhost = 'r.example'\nurl = 'http://x/path'", {}, "path"),
        ("[[registries]]\nhost = 'r.example'\nusername = 'u'", {}, "both username and password"),
        ("[[registries]]\nhost = 'r.example'\n[[registries]]\nhost = 'r.example'", {}, "once"),
        ("[[auth.users]]\nname = 'a'", {}, "exactly one of password"),
        ("[[auth.users]]\nname = 'a'\npassword_sha256 = 'xyz'", {}, "64 hex"),
        ("[[auth.users]]\nname = 'a:b'\npassword = 'p'", {}, "without ':'"),
        ("[auth]\ntokens = ['']", {}, "tokens must not be empty"),
        ("port = [", {}, "not valid TOML"),
        ("", {"STARLIGHT_PROXY_PORT": "many"}, "STARLIGHT_PROXY_PORT='many'"),
        ("", {"STARLIGHT_PROXY_AUTO_NOTIFY": "maybe"}, "true or false"),
    ],
)
def test_bad_configs_are_named(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as raised:
        load_config(path, environ=environ)
    assert message in str(raised.value)


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


def test_launcher_toml_reads_back(tmp_path: Path) -> None:
    data = {
        "port": 1234,
        "auto_notify": True,
        "registries": [{"host": "a.example", "plain_http": True}, {"host": "b.example:1"}],
        "auth": {"tokens": ['quo"te'], "users": [{"name": "u", "password": "p"}]},
    }
    assert tomllib.loads(render_toml(data)) == data
    config = load_config(write(tmp_path, render_toml(data)), environ={})
    assert config.auth.tokens == ('quo"te',)


def test_check_config_entry_point(tmp_path: Path) -> None:
    good = write(tmp_path, FULL)
    binary = Path(sys.executable).with_name("starlight-proxy")
    ok = subprocess.run(
        [str(binary), "--config", str(good), "--check-config", "--port", "9999"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "0.0.0.0:9999" in ok.stdout
    bad = write(tmp_path, "port = 'x'")
    failed = subprocess.run(
        [str(binary), "--config", str(bad)], capture_output=True, text=True, check=False
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith("starlight-proxy: error: invalid proxy config")


# --- client authentication ------------------------------------------------------------------


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_client_auth_schemes() -> None:
    auth = ClientAuth(
        AuthConfig(
            users=(
                BasicUser(name="plain", password="a:b"),
                BasicUser(name="hashed", password_sha256=hashlib.sha256(b"pw").hexdigest()),
            ),
            tokens=("tok",),
        )
    )
    assert auth.enabled
    for good in (basic("plain:a:b"), basic("hashed:pw"), "Bearer tok", "bearer  tok "):
        assert auth.allows(good), good
    for bad in (
        None,
        "",
        basic("plain:a"),
        basic("hashed:" + hashlib.sha256(b"pw").hexdigest()),  # the hash is not the password
        basic("nobody:a:b"),
        basic("plain"),
        "Basic %%%",
        "Bearer tok2",
        "Bearer",
        "Token tok",
    ):
        assert not auth.allows(bad), bad
    assert auth.challenges() == [
        'Basic realm="starlight-proxy", charset="UTF-8"',
        'Bearer realm="starlight-proxy"',
    ]


def test_no_auth_configured_lets_everyone_in() -> None:
    auth = ClientAuth(AuthConfig())
    assert not auth.enabled
    assert auth.allows(None)


def test_tokens_only_refuse_basic() -> None:
    auth = ClientAuth(AuthConfig(tokens=("t",)))
    assert not auth.allows(basic("t:t"))
    assert auth.challenges() == ['Bearer realm="starlight-proxy"']


# --- which registries are served ------------------------------------------------------------


def test_upstreams_map_and_refuse_registries() -> None:
    config = ProxyConfig(
        registries=(
            UpstreamRegistry(host="registry.example:5000", url="http://10.0.0.7:5000"),
            UpstreamRegistry(host="index.docker.io"),
        )
    )
    upstreams = Upstreams(config)
    mapped = upstreams.resolve(Reference.parse("registry.example:5000/team/app:v1"))
    assert str(mapped.reference) == "10.0.0.7:5000/team/app:v1"
    hub = upstreams.resolve(Reference.parse("redis"))
    assert str(hub.reference) == "docker.io/library/redis:latest"
    with pytest.raises(RegistryNotServed, match=r"other\.example"):
        upstreams.resolve(Reference.parse("other.example/app"))
    anything = Upstreams(ProxyConfig(allow_any_registry=True))
    assert (
        anything.resolve(Reference.parse("other.example/app")).reference.domain == "other.example"
    )


# --- the client's view of errors ------------------------------------------------------------


def test_error_mapping() -> None:
    error = error_from_response(
        404,
        b'{"error": "image_not_found", "message": "no such image", "hint": "notify it"}',
        what="proxy x: bundle",
    )
    assert isinstance(error, ImageNotFound)
    assert str(error) == "proxy x: bundle: no such image (notify it)"
    unknown = error_from_response(418, b'{"error": "teapot", "message": "short"}', what="w")
    assert type(unknown) is StarlightError
    assert isinstance(error_from_response(401, b"<html>", what="w"), AuthenticationRequired)
    assert isinstance(error_from_response(404, b"", what="w"), NotFound)
    assert isinstance(error_from_response(502, b"Bad Gateway", what="w"), ProxyUnavailable)
    assert "HTTP 400" in str(error_from_response(400, b"nope", what="w"))


def test_client_arguments() -> None:
    with pytest.raises(InvalidInput, match="http://"):
        ProxyClient("proxy:8090")
    with pytest.raises(InvalidInput, match="USER:PASSWORD"):
        ProxyClient("http://proxy:8090", user="nopassword")
    with pytest.raises(InvalidInput, match="not both"):
        ProxyClient("http://proxy:8090", user="a:b", token="t")
