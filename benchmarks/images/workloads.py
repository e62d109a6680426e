"""Realistic workload images for the benchmark harness: Debian equivalents of the images the
Starlight paper evaluated, each at two genuine versions.

Every image is a Debian bookworm minbase layer plus application layers made the way
``docker build`` makes them (``benchmarks.images.builder``): packages installed with apt at
pinned versions inside the root filesystem, the difference before/after becoming the layer.
``v1`` is bookworm as released; ``v2`` carries the security/stable updates of the application
(and newer PyPI releases), built as an *app update* (v1's base layer kept) or a full *rebuild*
(every layer regenerated from an updated base: every digest changes, most files do not).

Each workload starts in the foreground from ``/usr/local/bin/docker-entrypoint.sh`` as root —
as ``ctr run --net-host`` starts it — prepares its directories, drops to its service user
with ``setpriv`` (as official images do with gosu) and listens on ``$PORT`` (default: the
service's usual port). ``Workload.probe`` says when it is ready; ``ready_log`` is the log line
the paper used.

Command line::

    python -m benchmarks.images.workloads --list
    python -m benchmarks.images.workloads --build redis nginx      # all three images of each
    python -m benchmarks.images.workloads --build-all [--quick]
    python -m benchmarks.images.workloads --verify redis           # rebuild, compare digests
    python -m benchmarks.images.workloads --relock redis           # resolve pins again
    python -m benchmarks.images.workloads --publish 127.0.0.1:5000 redis [--docker]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import attrs

from benchmarks.images.builder import Builder, Layer
from benchmarks.images.debian import CACHE
from benchmarks.images.probe import Probe
from benchmarks.images.recipe import Apt, Copy, Pip, Version, Workload
from starlight_core import oci, wire
from starlight_core.convert import ConvertOptions, convert_image
from starlight_core.digest import Digest, sha256_digest
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient

__all__ = [
    "BUILDS",
    "ENTRYPOINT",
    "QUICK",
    "WORKLOADS",
    "PublishedImage",
    "build_layers",
    "image_config",
    "publish",
    "tag_for",
]

ENTRYPOINT: Final = "/usr/local/bin/docker-entrypoint.sh"
PATH_ENV: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILDS: Final = (("v1", "app-update"), ("v2", "app-update"), ("v2", "rebuild"))
"""The three images of every workload: v1, v2 as an app update, v2 as a full rebuild."""


def _entrypoint(script: str) -> Copy:
    return Copy({ENTRYPOINT: ("#!/bin/sh\nset -e\n" + script.lstrip(), 0o755)})


def _system_user(name: str, home: str) -> str:
    return (
        f"groupadd --system {name} && useradd --system --no-log-init --gid {name} "
        f"--home-dir {home} --shell /usr/sbin/nologin {name}"
    )


def _drop(user: str) -> str:
    return f"setpriv --reuid={user} --regid={user} --init-groups"


# --- redis ---------------------------------------------------------------------------------

_REDIS = Workload(
    name="redis",
    description="Redis 7.0 key-value store (redis-server)",
    paper="redis",
    steps=(
        Apt(
            ("redis-server",),
            after="mkdir -p /data && chown redis:redis /data",
        ),
        _entrypoint(
            f"""
cd /data
exec {_drop("redis")} redis-server --port "${{PORT:-6379}}" --bind 0.0.0.0 \\
    --protected-mode no --dir /data
"""
        ),
    ),
    versions={
        "v1": Version(debian={"redis-server": "5:7.0.15-1~deb12u7"}),
        "v2": Version(debian={"redis-server": "5:7.0.15-1~deb12u10"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=6379,
    probe=Probe(kind="tcp", port=6379, send=b"PING\r\n", expect=b"+PONG"),
    ready_log=r"Ready to accept connections",
    working_dir="/data",
    quick=True,
)

# --- memcached -----------------------------------------------------------------------------

_MEMCACHED = Workload(
    name="memcached",
    description="memcached 1.6 in-memory cache",
    paper="memcached",
    steps=(
        Apt(("memcached",)),
        _entrypoint(
            f"""
echo "memcached: listening on port ${{PORT:-11211}}"
exec {_drop("memcache")} memcached -p "${{PORT:-11211}}" -U 0 -l 0.0.0.0 -m 64 -c 1024
"""
        ),
    ),
    versions={
        "v1": Version(debian={"memcached": "1.6.18-1"}),
        "v2": Version(debian={"memcached": "1.6.18-1+deb12u1"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=11211,
    probe=Probe(kind="tcp", port=11211, send=b"version\r\n", expect=b"VERSION "),
    ready_log=r"memcached: listening on port",
    quick=True,
)

# --- nginx ---------------------------------------------------------------------------------

_NGINX_SITE: Final = """\
server {
    listen @PORT@ default_server;
    server_name _;
    root /var/www/html;
    index index.html index.htm index.nginx-debian.html;
    location / {
        try_files $uri $uri/ =404;
    }
}
"""

_NGINX = Workload(
    name="nginx",
    description="nginx 1.22 web server serving its default page",
    paper="nginx",
    steps=(
        Apt(
            ("nginx",),
            # As the official image: logs to the container's output.
            after="ln -sf /dev/stdout /var/log/nginx/access.log\n"
            "ln -sf /dev/stderr /var/log/nginx/error.log",
        ),
        Copy({"/etc/nginx/templates/default.conf": (_NGINX_SITE, 0o644)}),
        _entrypoint(
            """
rm -f /etc/nginx/sites-enabled/default
sed "s/@PORT@/${PORT:-80}/" /etc/nginx/templates/default.conf > /etc/nginx/sites-enabled/default
echo "nginx: configuration complete; ready for start up"
exec nginx -g 'daemon off;'
"""
        ),
    ),
    versions={
        "v1": Version(debian={"nginx": "1.22.1-9+deb12u9"}),
        "v2": Version(debian={"nginx": "1.22.1-9+deb12u11"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=80,
    probe=Probe(kind="http", port=80, path="/"),
    ready_log=r"ready for start up",
    quick=True,
)

# --- apache2 (httpd) -----------------------------------------------------------------------

_APACHE = Workload(
    name="httpd",
    description="Apache httpd 2.4 (Debian apache2) serving its default page",
    paper="httpd",
    steps=(
        Apt(
            ("apache2",),
            # Port from the environment (Apache expands ${PORT}), logs to the output.
            after="""\
sed -i 's/^Listen 80$/Listen ${PORT}/; /Listen 443/d' /etc/apache2/ports.conf
sed -i 's/<VirtualHost \\*:80>/<VirtualHost *:${PORT}>/' \\
    /etc/apache2/sites-available/000-default.conf
ln -sf /dev/stdout /var/log/apache2/access.log
ln -sf /dev/stdout /var/log/apache2/other_vhosts_access.log
ln -sf /dev/stderr /var/log/apache2/error.log
echo 'ServerName localhost' > /etc/apache2/conf-available/servername.conf
a2enconf -q servername
""",
        ),
        _entrypoint(
            """
export PORT="${PORT:-80}"
. /etc/apache2/envvars
# containerd mounts an empty tmpfs on /run, where /var/lock points.
mkdir -p /run/lock "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR" "$APACHE_LOG_DIR"
rm -f "$APACHE_PID_FILE"
exec apache2 -DFOREGROUND
"""
        ),
    ),
    versions={
        "v1": Version(debian={"apache2": "2.4.68-1~deb12u1"}),
        "v2": Version(debian={"apache2": "2.4.71-1~deb12u1"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=80,
    probe=Probe(kind="http", port=80, path="/"),
    ready_log=r"resuming normal operations",
)

# --- postgresql ----------------------------------------------------------------------------

_POSTGRES = Workload(
    name="postgres",
    description="PostgreSQL 15 (initialises its cluster on first start, as the official image)",
    paper="postgres",
    steps=(
        Apt(
            ("postgresql-15",),
            # No cluster in the image: the entrypoint makes one in the container.
            before="mkdir -p /etc/postgresql-common/createcluster.d\n"
            "echo 'create_main_cluster = false' "
            "> /etc/postgresql-common/createcluster.d/no-main-cluster.conf",
            # ssl-cert's postinst made a random snakeoil key named after the build host:
            # neither belongs in an image (the server here runs without TLS).
            after="rm -f /etc/ssl/private/ssl-cert-snakeoil.key "
            "/etc/ssl/certs/ssl-cert-snakeoil.pem\n"
            "find /etc/ssl/certs -xtype l -delete\n"
            "mkdir -p /var/lib/postgresql/data /var/run/postgresql\n"
            "chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql\n"
            "chmod 700 /var/lib/postgresql/data\n"
            "chmod 2777 /var/run/postgresql",
        ),
        _entrypoint(
            f"""
export PGDATA=/var/lib/postgresql/data
bin=/usr/lib/postgresql/15/bin
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    {_drop("postgres")} "$bin/initdb" --username=postgres --auth=trust --encoding=UTF8 \\
        -D "$PGDATA" > /dev/null
fi
exec {_drop("postgres")} "$bin/postgres" -D "$PGDATA" -p "${{PORT:-5432}}" \\
    -c listen_addresses=0.0.0.0
"""
        ),
    ),
    versions={
        "v1": Version(debian={"postgresql-15": "15.18-0+deb12u1"}),
        "v2": Version(debian={"postgresql-15": "15.20-0+deb12u1"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=5432,
    probe=Probe(kind="log", pattern=r"database system is ready to accept connections"),
    ready_log=r"database system is ready to accept connections",
    env=("PGDATA=/var/lib/postgresql/data",),
)

# --- mariadb -------------------------------------------------------------------------------

_MARIADB = Workload(
    name="mariadb",
    description="MariaDB 10.11 (initialises its data directory on first start)",
    paper="mariadb",
    steps=(
        Apt(
            ("mariadb-server",),
            # The package's postinst made a data directory: none in the image (the official
            # image does the same), the entrypoint makes it in the container.
            after="rm -rf /var/lib/mysql\n"
            "mkdir -p /var/lib/mysql /run/mysqld\n"
            "chown mysql:mysql /var/lib/mysql /run/mysqld",
        ),
        _entrypoint(
            """
port="${PORT:-3306}"
mkdir -p /run/mysqld /var/lib/mysql
chown mysql:mysql /run/mysqld /var/lib/mysql
if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \\
        --auth-root-authentication-method=socket > /dev/null
fi
exec mariadbd --user=mysql --datadir=/var/lib/mysql --port="$port" --bind-address=0.0.0.0 \\
    --skip-name-resolve
"""
        ),
    ),
    versions={
        "v1": Version(debian={"mariadb-server": "1:10.11.18-0+deb12u1"}),
        "v2": Version(debian={"mariadb-server": "1:10.11.19-0+deb12u1"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=3306,
    # The server greets a client (protocol handshake, with its version) once it serves.
    probe=Probe(kind="tcp", port=3306, expect=b"MariaDB"),
    ready_log=r"ready for connections",
)

# --- a Python web application --------------------------------------------------------------

_FLASK_APP: Final = '''\
"""A tiny Flask application: the JSON a health check or a front end would fetch."""

import platform

import flask

app = flask.Flask(__name__)


@app.get("/")
def index() -> flask.Response:
    return flask.jsonify(status="ok", python=platform.python_version())
'''

_FLASK_PACKAGES: Final = (
    "blinker",
    "click",
    "flask",
    "gunicorn",
    "itsdangerous",
    "jinja2",
    "markupsafe",
    "packaging",
    "werkzeug",
)

_PYTHON = Workload(
    name="python-flask",
    description="Python 3.11 web application: Flask on gunicorn in a virtual environment",
    paper="python",
    steps=(
        Apt(("python3", "python3-venv"), after=_system_user("app", "/app")),
        Pip("/opt/venv", _FLASK_PACKAGES),
        Copy({"/app/app.py": (_FLASK_APP, 0o644)}),
        _entrypoint(
            f"""
exec {_drop("app")} /opt/venv/bin/gunicorn --bind "0.0.0.0:${{PORT:-8000}}" --workers 2 \\
    --chdir /app app:app
"""
        ),
    ),
    versions={
        "v1": Version(
            debian={"python3": "3.11.2-1+b1", "python3-venv": "3.11.2-1+b1"},
            pypi={
                "blinker": "1.8.2",
                "click": "8.1.7",
                "flask": "3.0.3",
                "gunicorn": "22.0.0",
                "itsdangerous": "2.2.0",
                "jinja2": "3.1.4",
                "markupsafe": "2.1.5",
                "packaging": "24.1",
                "werkzeug": "3.0.4",
            },
        ),
        "v2": Version(
            debian={"python3": "3.11.2-1+b1", "python3-venv": "3.11.2-1+b1"},
            pypi={
                "blinker": "1.9.0",
                "click": "8.2.1",
                "flask": "3.1.2",
                "gunicorn": "23.0.0",
                "itsdangerous": "2.2.0",
                "jinja2": "3.1.6",
                "markupsafe": "3.0.2",
                "packaging": "25.0",
                "werkzeug": "3.1.3",
            },
        ),
    },
    entrypoint=(ENTRYPOINT,),
    port=8000,
    probe=Probe(kind="http", port=8000, path="/"),
    ready_log=r"Booting worker with pid",
    working_dir="/app",
    env=("PYTHONDONTWRITEBYTECODE=1",),
)

# --- a Java application on the JDK ---------------------------------------------------------

_JAVA_SERVER: Final = """\
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;

/** A small HTTP service, run from source (java Server.java): the JDK compiles it at start. */
public class Server {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args.length > 0 ? args[0] : "8080");
        HttpServer server = HttpServer.create(new InetSocketAddress("0.0.0.0", port), 0);
        server.createContext("/", exchange -> {
            byte[] body = ("{\\"status\\":\\"ok\\",\\"java\\":\\""
                + System.getProperty("java.version") + "\\"}").getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().set("Content-Type", "application/json");
            exchange.sendResponseHeaders(200, body.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(body);
            }
        });
        server.start();
        System.out.println("Server started on port " + port);
    }
}
"""

_OPENJDK = Workload(
    name="openjdk",
    description="OpenJDK 17 (headless JDK) running a Java HTTP service from source",
    paper="openjdk",
    steps=(
        Apt(("openjdk-17-jdk-headless",), after=_system_user("app", "/app")),
        Copy({"/app/Server.java": (_JAVA_SERVER, 0o644)}),
        _entrypoint(
            f"""
export HOME=/app
exec {_drop("app")} java -XX:+UseSerialGC /app/Server.java "${{PORT:-8080}}"
"""
        ),
    ),
    versions={
        "v1": Version(debian={"openjdk-17-jdk-headless": "17.0.19+10-1~deb12u2"}),
        "v2": Version(debian={"openjdk-17-jdk-headless": "17.0.21.1+2-1~deb12u1"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=8080,
    probe=Probe(kind="http", port=8080, path="/"),
    ready_log=r"Server started on port",
    working_dir="/app",
)

# --- a Node.js application -----------------------------------------------------------------

_NODE_SERVER: Final = """\
// A small HTTP service on Node's own http module.
"use strict";
const http = require("http");

const port = Number(process.env.PORT || 3000);
const server = http.createServer((request, response) => {
  response.writeHead(200, { "Content-Type": "application/json" });
  response.end(JSON.stringify({ status: "ok", node: process.version }));
});
server.listen(port, "0.0.0.0", () => {
  console.log(`Server listening on port ${port}`);
});
"""

_NODE = Workload(
    name="node",
    description="Node.js 18 running a small HTTP service",
    paper="node",
    steps=(
        Apt(("nodejs",), after=_system_user("node", "/app")),
        Copy({"/app/server.js": (_NODE_SERVER, 0o644)}),
        _entrypoint(
            f"""
export HOME=/app
exec {_drop("node")} node /app/server.js
"""
        ),
    ),
    versions={
        "v1": Version(debian={"nodejs": "18.20.4+dfsg-1~deb12u2"}),
        "v2": Version(debian={"nodejs": "18.20.4+dfsg-1~deb12u3"}),
    },
    entrypoint=(ENTRYPOINT,),
    port=3000,
    probe=Probe(kind="http", port=3000, path="/"),
    ready_log=r"Server listening on port",
    working_dir="/app",
)


WORKLOADS: Final[Mapping[str, Workload]] = {
    w.name: w
    for w in (
        _REDIS,
        _MEMCACHED,
        _NGINX,
        _APACHE,
        _POSTGRES,
        _MARIADB,
        _PYTHON,
        _OPENJDK,
        _NODE,
    )
}
QUICK: Final = tuple(name for name, w in WORKLOADS.items() if w.quick)


def _workload(workload: Workload | str) -> Workload:
    if isinstance(workload, Workload):
        return workload
    try:
        return WORKLOADS[workload]
    except KeyError:
        raise KeyError(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})") from None


def build_layers(
    workload: Workload | str,
    version: str = "v1",
    kind: str = "app-update",
    *,
    builder: Builder | None = None,
) -> list[Layer]:
    """The layers of one image, base first (``Layer.tar``: uncompressed, ``Layer.blob``:
    gzip), from the cache or built. Big images take minutes the first time."""
    return (builder or Builder()).build(_workload(workload), version, kind)


def tag_for(version: str, kind: str = "app-update") -> str:
    """``v1``, ``v2-update`` or ``v2-rebuild``."""
    if version == "v1":
        return "v1"
    return "v2-update" if kind == "app-update" else "v2-rebuild"


def _timestamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_config(workload: Workload, version: str, kind: str, layers: Sequence[Layer]) -> bytes:
    """The image configuration (deterministic: times are the layers' build times)."""
    config = oci.ImageConfig(
        architecture="amd64",
        os="linux",
        rootfs=oci.RootFS(type="layers", diff_ids=tuple(layer.diff_id for layer in layers)),
        created=_timestamp(max(layer.created for layer in layers)),
        config=oci.RuntimeConfig(
            entrypoint=workload.entrypoint,
            cmd=workload.cmd or None,
            env=(PATH_ENV, *workload.env),
            working_dir=workload.working_dir or None,
            labels={
                "org.starlight.workload": workload.name,
                "org.starlight.version": version,
                "org.starlight.build": tag_for(version, kind),
            },
        ),
        history=tuple(
            oci.History(created=_timestamp(layer.created), created_by=layer.created_by)
            for layer in layers
        ),
    )
    return wire.dumps(config)


@attrs.frozen
class PublishedImage:
    workload: str
    version: str
    kind: str
    original: Reference
    """The image as built, pinned to its manifest digest."""
    starlight: Reference | None
    """The converted image, pinned (None when not converted)."""
    layers: tuple[Layer, ...]

    @property
    def compressed_size(self) -> int:
        return sum(layer.compressed_size for layer in self.layers)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


async def _push(
    client: RegistryClient,
    reference: Reference,
    layers: Sequence[Layer],
    config: bytes,
    *,
    docker: bool,
) -> Digest:
    for layer in layers:
        if await client.head_blob(reference, layer.digest) is None:
            await client.upload_blob(reference, layer.blob.read_bytes(), layer.digest)
    config_digest = sha256_digest(config)
    if await client.head_blob(reference, config_digest) is None:
        await client.upload_blob(reference, config, config_digest)
    layer_type = oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP
    manifest = oci.Manifest(
        schema_version=2,
        media_type=oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST,
        config=oci.Descriptor(
            media_type=oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG,
            digest=config_digest,
            size=len(config),
        ),
        layers=tuple(
            oci.Descriptor(media_type=layer_type, digest=layer.digest, size=layer.compressed_size)
            for layer in layers
        ),
    )
    return await client.put_manifest(reference, wire.dumps(manifest), manifest.effective_media_type)


async def publish(
    workload: Workload | str,
    version: str,
    registry: str,
    *,
    kind: str = "app-update",
    client: RegistryClient | None = None,
    repository: str | None = None,
    convert: bool = True,
    docker: bool = False,
    builder: Builder | None = None,
) -> PublishedImage:
    """Build (or take from the cache) one image, push it to ``registry`` (``host:port``) as
    ``<repository>:<tag>`` (default repository: ``starlight-bench/<workload>``; tags from
    ``tag_for``), and convert it — as ``ctr-starlight convert`` does — to ``<tag>-starlight``.
    ``client`` defaults to a plain-HTTP client (a local registry)."""
    target = _workload(workload)
    layers = await asyncio.to_thread(build_layers, target, version, kind, builder=builder)
    config = image_config(target, version, kind, layers)
    name = repository or f"starlight-bench/{target.name}"
    reference = Reference.parse(f"{registry}/{name}:{tag_for(version, kind)}")
    own_client = client is None
    active = client if client is not None else RegistryClient(plain_http=True)
    try:
        digest = await _push(active, reference, layers, config, docker=docker)
        starlight = None
        if convert:
            destination = reference.with_tag(f"{tag_for(version, kind)}-starlight")
            result = await convert_image(active, reference, destination, ConvertOptions())
            starlight = result.reference
    finally:
        if own_client:
            await active.aclose()
    return PublishedImage(
        workload=target.name,
        version=version,
        kind=kind,
        original=reference.with_digest(digest),
        starlight=starlight,
        layers=tuple(layers),
    )


# --- command line --------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


def _sizes(name: str, builds: Sequence[tuple[str, str, list[Layer]]]) -> None:
    for version, kind, layers in builds:
        total = sum(layer.size for layer in layers)
        packed = sum(layer.compressed_size for layer in layers)
        _say(
            f"{name}:{tag_for(version, kind)}  {len(layers)} layers, "
            f"{total / 1e6:.1f} MB ({packed / 1e6:.1f} MB gzip)"
        )
        for layer in layers:
            _say(
                f"    {layer.digest.hex[:12]}  {layer.size / 1e6:8.1f} MB "
                f"{layer.compressed_size / 1e6:7.1f} MB gz  {layer.created_by}"
            )


def _build(names: Sequence[str], builder: Builder) -> dict[str, object]:
    report: dict[str, object] = {}
    for name in names:
        workload = _workload(name)
        started = time.monotonic()
        builds = [
            (version, kind, builder.build(workload, version, kind)) for version, kind in BUILDS
        ]
        elapsed = time.monotonic() - started
        _sizes(name, builds)
        _say(f"{name}: {elapsed:.0f} s")
        report[name] = {
            tag_for(version, kind): [
                {
                    "digest": str(layer.digest),
                    "size": layer.size,
                    "compressed_size": layer.compressed_size,
                    "created_by": layer.created_by,
                }
                for layer in layers
            ]
            for version, kind, layers in builds
        }
    return report


def _verify(names: Sequence[str], cache: Path) -> int:
    """Build each image again from scratch (same fetched packages, fresh base and layers) in a
    scratch store and compare every layer digest with the cached build."""
    failures = 0
    for name in names:
        workload = _workload(name)
        store = Path(tempfile.mkdtemp(prefix="verify-", dir=cache))
        try:
            fresh = Builder(cache, store=store, progress=_say)
            for version, kind in BUILDS:
                cached = Builder(cache, progress=_say).build(workload, version, kind)
                again = fresh.build(workload, version, kind)
                same = [a.digest == b.digest for a, b in zip(cached, again, strict=True)]
                verdict = "identical" if all(same) else "DIFFERENT"
                _say(f"{name}:{tag_for(version, kind)} rebuilt: {verdict} {same}")
                failures += not all(same)
        finally:
            shutil.rmtree(store, ignore_errors=True)
    return failures


async def _publish_all(
    registry: str, names: Sequence[str], *, docker: bool, builder: Builder
) -> None:
    for name in names:
        for version, kind in BUILDS:
            image = await publish(
                name, version, registry, kind=kind, docker=docker, builder=builder
            )
            _say(f"{image.original}\n  -> {image.starlight}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.images.workloads",
        description="Build the benchmark workload images (Debian bookworm, two versions each).",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="list the workloads")
    action.add_argument("--build", nargs="+", metavar="NAME", help="build these workloads")
    action.add_argument("--build-all", action="store_true", help="build every workload")
    action.add_argument("--verify", nargs="+", metavar="NAME", help="rebuild, compare digests")
    action.add_argument(
        "--relock", nargs="+", metavar="NAME", help="resolve the package sets again, rebuild"
    )
    action.add_argument(
        "--publish", nargs="+", metavar=("REGISTRY", "NAME"), help="push and convert"
    )
    parser.add_argument("--quick", action="store_true", help="only the small workloads")
    parser.add_argument("--docker", action="store_true", help="Docker media types")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"default: {CACHE}")
    parser.add_argument("--json", type=Path, help="write layer sizes and digests here")
    args = parser.parse_args(argv)
    builder = Builder(args.cache, progress=_say)
    selected = list(QUICK if args.quick else WORKLOADS)
    if args.list:
        for name, workload in WORKLOADS.items():
            pins = {
                v: ", ".join(
                    [f"{k}={p}" for k, p in workload.versions[v].debian.items()]
                    + [f"{k}=={p}" for k, p in workload.versions[v].pypi.items()]
                )
                for v in ("v1", "v2")
            }
            state = "built" if all(builder.cached(workload, v, k) for v, k in BUILDS) else "-"
            _say(
                f"{name:14} {'quick' if workload.quick else '     '} {state:5} "
                f"{workload.description}\n{'':21}v1: {pins['v1']}\n{'':21}v2: {pins['v2']}\n"
                f"{'':21}ready: {workload.probe.describe()} / log /{workload.ready_log}/"
            )
        return 0
    if args.build or args.build_all:
        names = args.build or selected
        started = time.monotonic()
        report = _build(names, builder)
        _say(f"built {len(names)} workloads in {time.monotonic() - started:.0f} s")
        if builder.irreproducible:
            _say("not reproducible:\n  " + "\n  ".join(builder.irreproducible))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    if args.verify:
        return 1 if _verify(args.verify, args.cache) else 0
    if args.relock:
        for name in args.relock:
            builder.relock(_workload(name))
        _build(args.relock, builder)
        return 0
    registry, *names = args.publish
    asyncio.run(_publish_all(registry, names or selected, docker=args.docker, builder=builder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
