"""Registry credentials: ``user:password``, Docker's config.json and credential helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from starlight_core.auth import (
    DOCKER_HUB_AUTH_KEY,
    Credentials,
    CredentialStore,
    docker_config_path,
    normalize_registry_host,
)
from starlight_core.digest import sha256_digest
from starlight_core.errors import InvalidInput, Unauthorized
from starlight_core.registry import RegistryClient
from tests.core.registry_fake import FakeRegistry


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_config(directory: Path, config: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on PATH holding ``docker-credential-fake``.

    The helper logs each server URL it is asked about and answers from a JSON table next to it;
    an unknown server gets the helpers' standard "credentials not found" failure.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker-credential-fake"
    script.write_text(
        "#!/bin/sh\n"
        'dir="$(dirname "$0")"\n'
        '[ "$1" = get ] || { echo "unsupported $1" >&2; exit 2; }\n'
        "read -r server\n"
        'echo "$server" >> "$dir/asked"\n'
        'answer="$(grep -F "\\"$server\\"" "$dir/table" | cut -d"|" -f2-)"\n'
        'if [ -z "$answer" ]; then echo "credentials not found in native keychain"; exit 1; fi\n'
        'echo "$answer"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (bin_dir / "table").write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def add_helper_entry(bin_dir: Path, server: str, username: str, secret: str) -> None:
    answer = json.dumps({"ServerURL": server, "Username": username, "Secret": secret})
    with (bin_dir / "table").open("a") as table:
        table.write(f'"{server}"|{answer}\n')


def asked(bin_dir: Path) -> list[str]:
    path = bin_dir / "asked"
    return path.read_text().split() if path.exists() else []


# --- Credentials ------------------------------------------------------------------------------


def test_parse_user_password() -> None:
    creds = Credentials.parse("alice:pa:ss")
    assert (creds.username, creds.password) == ("alice", "pa:ss")
    assert creds.basic_authorization() == "Basic " + b64("alice:pa:ss")
    assert "pa:ss" not in repr(creds)


@pytest.mark.parametrize("text", ["alice", ":secret", ""])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidInput, match="USER:PASSWORD"):
        Credentials.parse(text)


@pytest.mark.parametrize(
    ("key", "host"),
    [
        (DOCKER_HUB_AUTH_KEY, "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("http://Example.COM:5000/", "example.com:5000"),
        ("https://ghcr.io", "ghcr.io"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ],
)
def test_normalize_registry_host(key: str, host: str) -> None:
    assert normalize_registry_host(key) == host


def test_explicit_credentials_by_host() -> None:
    store = CredentialStore(
        {"127.0.0.1:5000": "alice:s3cret", "docker.io": Credentials("bob", "x")}
    )
    assert store.lookup("127.0.0.1:5000") == Credentials("alice", "s3cret")
    assert store.lookup("registry-1.docker.io") == Credentials("bob", "x")
    assert store.lookup("127.0.0.1:5001") is None
    assert CredentialStore.anonymous().lookup("127.0.0.1:5000") is None


# --- config.json --------------------------------------------------------------------------------


def test_docker_config_auths(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "auths": {
                DOCKER_HUB_AUTH_KEY: {"auth": b64("hubuser:hub:pass")},
                "https://registry.example:5000": {"username": "u2", "password": "p2"},
                "tokens.example": {"identitytoken": "refresh-me"},
                "bearer.example": {"registrytoken": "ready-made"},
                "stored.example": {},
            }
        },
    )
    store = CredentialStore.from_docker_config(path)
    assert store.lookup("docker.io") == Credentials("hubuser", "hub:pass")
    assert store.lookup("registry-1.docker.io") == Credentials("hubuser", "hub:pass")
    assert store.lookup("registry.example:5000") == Credentials("u2", "p2")
    assert store.lookup("tokens.example") == Credentials(identity_token="refresh-me")
    assert store.lookup("bearer.example") == Credentials(registry_token="ready-made")
    assert store.lookup("stored.example") is None
    assert store.lookup("registry.example") is None


def test_explicit_credentials_win_over_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"auths": {"r.example": {"auth": b64("a:b")}}})
    store = CredentialStore.from_docker_config(path, explicit={"r.example": "c:d"})
    assert store.lookup("r.example") == Credentials("c", "d")


def test_docker_config_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path / "elsewhere", {"auths": {"r.example": {"auth": b64("a:b")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "elsewhere"))
    assert docker_config_path() == tmp_path / "elsewhere" / "config.json"
    assert CredentialStore.from_docker_config().lookup("r.example") == Credentials("a", "b")
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert docker_config_path() == tmp_path / "home" / ".docker" / "config.json"


def test_missing_config_means_no_credentials(tmp_path: Path) -> None:
    assert CredentialStore.from_docker_config(tmp_path / "nope.json").lookup("r.example") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        (json.dumps({"auths": {"r.example": {"auth": "!!!"}}}), "not base64"),
        (json.dumps({"auths": {"r.example": {"auth": b64("nocolon")}}}), "not user:password"),
        (json.dumps({"auths": []}), "must be objects"),
        (json.dumps({"credHelpers": {"r.example": 3}}), "credHelpers"),
    ],
)
def test_malformed_config_names_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(InvalidInput, match=message) as caught:
        CredentialStore.from_docker_config(path)
    assert str(path) in str(caught.value)


# --- credential helpers ---------------------------------------------------------------------


def test_cred_helper_per_host(tmp_path: Path, helper_bin: Path) -> None:
    add_helper_entry(helper_bin, "r.example:5000", "alice", "from-helper")
    add_helper_entry(helper_bin, DOCKER_HUB_AUTH_KEY, "<token>", "hub-refresh-token")
    path = write_config(
        tmp_path,
        {
            "auths": {"r.example:5000": {"auth": b64("stale:stale")}},
            "credHelpers": {"r.example:5000": "fake", "docker.io": "fake", "other.example": "fake"},
        },
    )
    store = CredentialStore.from_docker_config(path)
    assert store.lookup("r.example:5000") == Credentials("alice", "from-helper")
    # Docker Hub is asked for by its historical key; "<token>" marks an identity token.
    assert store.lookup("registry-1.docker.io") == Credentials(identity_token="hub-refresh-token")
    assert store.lookup("other.example") is None
    assert store.lookup("r.example:5000") == Credentials("alice", "from-helper")  # cached
    assert asked(helper_bin) == ["r.example:5000", DOCKER_HUB_AUTH_KEY, "other.example"]


def test_creds_store_falls_back_to_auths(tmp_path: Path, helper_bin: Path) -> None:
    add_helper_entry(helper_bin, "in-store.example", "s", "from-store")
    path = write_config(
        tmp_path,
        {"credsStore": "fake", "auths": {"in-file.example": {"auth": b64("f:from-file")}}},
    )
    store = CredentialStore.from_docker_config(path)
    assert store.lookup("in-store.example") == Credentials("s", "from-store")
    assert store.lookup("in-file.example") == Credentials("f", "from-file")
    assert store.lookup("nowhere.example") is None


def test_missing_helper_is_a_clear_error(tmp_path: Path, helper_bin: Path) -> None:
    path = write_config(tmp_path, {"credHelpers": {"r.example": "not-installed"}})
    with pytest.raises(Unauthorized, match="docker-credential-not-installed") as caught:
        CredentialStore.from_docker_config(path).lookup("r.example")
    assert caught.value.hint is not None
    assert "install" in caught.value.hint


def test_failing_helper_is_a_clear_error(tmp_path: Path, helper_bin: Path) -> None:
    broken = helper_bin / "docker-credential-broken"
    broken.write_text("#!/bin/sh\necho 'keychain locked' >&2\nexit 3\n")
    broken.chmod(0o755)
    path = write_config(tmp_path, {"credHelpers": {"r.example": "broken"}})
    with pytest.raises(Unauthorized, match="exit 3: keychain locked"):
        CredentialStore.from_docker_config(path).lookup("r.example")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_client_uses_the_helper_credentials(tmp_path: Path, helper_bin: Path) -> None:
    add_helper_entry(helper_bin, "registry.test", "alice", "s3cret")
    path = write_config(tmp_path, {"credHelpers": {"registry.test": "fake"}})
    fake = FakeRegistry(auth="basic")
    digest = fake.add_blob("team/app", b"hello")
    store = CredentialStore.from_docker_config(path)
    async with RegistryClient(transport=fake.transport, credentials=store) as client:
        assert await client.get_blob("registry.test/team/app", digest) == b"hello"
        assert await client.head_blob("registry.test/team/app", sha256_digest(b"no")) is None
    assert asked(helper_bin) == ["registry.test"]
