"""The demo's sample application, built from Debian packages, in two versions.

Three layers: busybox (a shell and tools), the C library and friends, and the Python 3.11
runtime with a tiny application. Version 2 is the real security update Debian published for
the runtime (``python3.11-minimal`` 3.11.2-6+deb12u8 → deb12u9) plus a new application file —
the kind of update that re-downloads a whole layer with a stock pull.
"""

from __future__ import annotations

import attrs

from benchmarks.images.busybox import busybox_members
from benchmarks.images.debian import packages_layer
from starlight_core.testing import TarMember, build_tar

__all__ = ["SAMPLE_COMMAND", "VERSIONS", "SampleVersion", "sample_layers"]

SAMPLE_COMMAND = ["/usr/bin/python3.11", "/app/main.py"]


@attrs.frozen
class SampleVersion:
    tag: str
    python: str
    message: str


VERSIONS = (
    SampleVersion("v1", "3.11.2-6+deb12u8", "sample app 1.0"),
    SampleVersion("v2", "3.11.2-6+deb12u9", "sample app 2.0"),
)

_APP = """import hashlib, sys
digest = hashlib.sha256(open(sys.executable, "rb").read()).hexdigest()[:16]
print("{message}: python", sys.version.split()[0], "binary", digest, flush=True)
print("ready", flush=True)
"""


def sample_layers(version: SampleVersion) -> list[bytes]:
    t = 1_700_000_000
    shell = build_tar(busybox_members(mtime=t))
    libs = packages_layer(["libc6", "zlib1g", "libexpat1"])
    runtime = packages_layer(
        [f"python3.11-minimal={version.python}", f"libpython3.11-minimal={version.python}"]
    )
    app = build_tar(
        [
            TarMember("app", kind="dir", mtime=t),
            TarMember("app/main.py", data=_APP.format(message=version.message).encode(), mtime=t),
        ]
    )
    return [shell, libs, runtime, app]
