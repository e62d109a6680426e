"""What a workload image is made of: a Dockerfile's worth of steps, two pinned versions, and
how to start it and know it is ready.

Every step becomes one layer on top of a Debian bookworm minbase layer, like one instruction of
a Dockerfile: ``Apt`` (``apt-get install`` of pinned packages plus the usual cleanup),
``Pip`` (``pip install`` of pinned wheels into a virtual environment), ``Run`` (a shell script)
and ``Copy`` (files). A ``Version`` pins the Debian packages and PyPI distributions the steps
name; each workload has ``v1`` (built from bookworm as released) and ``v2`` (built with the
bookworm security and stable updates, and newer PyPI releases).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

import attrs

from benchmarks.images.probe import Probe

__all__ = [
    "KINDS",
    "VERSIONS",
    "Apt",
    "Copy",
    "Pip",
    "Run",
    "Step",
    "Version",
    "Workload",
]

VERSIONS: Final = ("v1", "v2")
KINDS: Final = ("app-update", "rebuild")
"""How ``v2`` relates to ``v1``: ``app-update`` keeps v1's base layer (and every layer before
the first step that changed, as docker's build cache would); ``rebuild`` regenerates everything
from a base with the security updates applied."""


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(sorted(value.items()))


@attrs.frozen
class Apt:
    """``RUN apt-get update && apt-get install --no-install-recommends PACKAGES && rm -rf
    /var/lib/apt/lists/*``, with ``before`` and ``after`` shell run in the same layer."""

    packages: tuple[str, ...]
    before: str = ""
    after: str = ""

    def spec(self, version: Version) -> dict[str, object]:
        return {
            "apt": [f"{name}={version.debian[name]}" for name in self.packages],
            "before": self.before,
            "after": self.after,
        }


@attrs.frozen
class Pip:
    """``RUN python3 -m venv VENV && VENV/bin/pip install PACKAGES`` (pinned, no
    dependency resolution: every distribution is listed), then ``after``."""

    venv: str
    packages: tuple[str, ...]
    after: str = ""

    def spec(self, version: Version) -> dict[str, object]:
        return {
            "venv": self.venv,
            "pip": [f"{name}=={version.pypi[name]}" for name in self.packages],
            "after": self.after,
        }


@attrs.frozen
class Run:
    """``RUN script``."""

    script: str

    def spec(self, version: Version) -> dict[str, object]:
        return {"run": self.script}


@attrs.frozen
class Copy:
    """``COPY``: ``files`` maps an absolute path to (content, mode); owned by root."""

    files: Mapping[str, tuple[str, int]]

    def spec(self, version: Version) -> dict[str, object]:
        return {"copy": {path: [content, mode] for path, (content, mode) in self.files.items()}}


Step = Apt | Pip | Run | Copy


def step_spec(step: Step, version: Version) -> str:
    """A canonical text of everything a step's result depends on, apart from the tree it runs
    on, the package universe and the build time: equal specs on equal parents give equal
    layers."""
    return json.dumps(step.spec(version), sort_keys=True)


@attrs.frozen
class Version:
    debian: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    """Debian package → exact version, for every package an ``Apt`` step names."""
    pypi: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    """PyPI distribution → exact version, for every distribution a ``Pip`` step names."""


@attrs.frozen
class Workload:
    name: str
    description: str
    paper: str
    """The image of the Starlight paper's evaluation this one stands for."""
    steps: tuple[Step, ...]
    versions: Mapping[str, Version]
    entrypoint: tuple[str, ...]
    port: int
    """The service's default port; ``PORT=n`` in the environment moves it (see ``run_env``)."""
    probe: Probe
    """The readiness check the harness runs (a reply on the service's port where there is one)."""
    ready_log: str
    """The log line the service prints when ready (the paper's end-of-run event), a regex."""
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    quick: bool = False
    """Small enough for the harness's ``--quick`` run."""

    def __attrs_post_init__(self) -> None:
        if tuple(sorted(self.versions)) != VERSIONS:
            raise ValueError(f"{self.name}: versions must be exactly {VERSIONS}")
        for label, version in self.versions.items():
            for step in self.steps:
                names = step.packages if isinstance(step, Apt | Pip) else ()
                pins = version.debian if isinstance(step, Apt) else version.pypi
                missing = [name for name in names if name not in pins]
                if missing:
                    raise ValueError(f"{self.name} {label}: no pinned version for {missing}")

    def run_env(self, port: int | None = None) -> list[str]:
        """Environment for ``ctr run --env``: the port to listen on (default: ``port``)."""
        return [f"PORT={port if port is not None else self.port}"]

    def probe_on(self, port: int | None = None) -> Probe:
        return self.probe.on_port(port if port is not None else self.port)

    @property
    def log_probe(self) -> Probe:
        return Probe(kind="log", pattern=self.ready_log)
