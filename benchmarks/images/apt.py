"""Debian packages at pinned versions, reproducibly and offline once cached.

A ``Universe`` is a private apt (its own sources, lists and state under the cache, nothing of
the host's apt configuration) over one set of Debian suites: ``release`` (bookworm as
released: the main suite only) or ``security`` (bookworm plus bookworm-updates and
bookworm-security). It resolves what ``apt-get install`` would install into a given root
filesystem (simulated against that tree's dpkg status) and fetches exact ``.deb`` files,
checked against their recorded SHA-256.

Builds never let apt choose from the network: ``local_repository`` makes a small apt repository
holding exactly the pinned packages, so an install from it can only produce the locked set. The
pins live in a ``Lock`` (a JSON file kept with the workloads), resolved once and reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

from benchmarks.images.debian import CACHE
from benchmarks.images.lock import Deb

__all__ = [
    "SUITES",
    "AptError",
    "Universe",
    "local_repository",
]

_DEBIAN: Final = "http://deb.debian.org/debian"
_SECURITY: Final = "http://deb.debian.org/debian-security"
_KEYRING: Final = "/usr/share/keyrings/debian-archive-keyring.gpg"

SUITES: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "release": ((_DEBIAN, "bookworm"),),
    "security": (
        (_DEBIAN, "bookworm"),
        (_DEBIAN, "bookworm-updates"),
        (_SECURITY, "bookworm-security"),
    ),
}
"""Universe name → (archive URL, suite) pairs, component ``main``, architecture amd64."""

_ARCH: Final = "amd64"
_INST: Final = re.compile(r"^Inst (\S+) (?:\[[^]]*\] )?\((\S+) ")


class AptError(RuntimeError):
    """apt could not resolve or fetch what a build needs."""


def _deb_file_name(pin: str, deb: Deb) -> str:
    """The name ``apt-get download`` gives the file (an epoch's colon is escaped)."""
    name, _, version = pin.partition("=")
    return f"{name}_{version.replace(':', '%3a')}_{deb.architecture}.deb"


def _stanzas(text: str) -> Iterable[dict[str, str]]:
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key:
                    fields[key] += "\n" + line
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields[key] = value.strip()
        if fields:
            yield fields


class Universe:
    """A private apt over the suites ``SUITES[name]``; state under ``cache/apt/<name>``."""

    def __init__(self, name: str, cache: Path = CACHE) -> None:
        if name not in SUITES:
            raise ValueError(f"unknown package universe {name!r} (one of {sorted(SUITES)})")
        self.name = name
        self.cache = cache
        self.root = cache / "apt" / name
        self.debs = cache / "debs"

    # --- apt's own configuration --------------------------------------------------------------

    def _config(self, status: Path) -> Path:
        root = self.root
        for sub in (
            "lists/partial",
            "state",
            "cache/archives/partial",
            "etc/parts",
            "etc/sources.d",
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            f"deb [arch={_ARCH} signed-by={_KEYRING}] {url} {suite} main"
            for url, suite in SUITES[self.name]
        ]
        (root / "etc" / "sources.list").write_text("\n".join(lines) + "\n")
        settings = {
            "Dir::Etc::main": "/dev/null",
            "Dir::Etc::Parts": root / "etc" / "parts",
            "Dir::Etc::SourceList": root / "etc" / "sources.list",
            "Dir::Etc::SourceParts": root / "etc" / "parts",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": root / "etc" / "parts",
            "Dir::State": root / "state",
            "Dir::State::Lists": root / "lists",
            "Dir::State::status": status,
            "Dir::Cache": root / "cache",
            "APT::Architecture": _ARCH,
            "Acquire::Languages": "none",
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "Debug::NoLocking": "true",
            "APT::Sandbox::User": "root",
        }
        text = "".join(f'{key} "{value}";\n' for key, value in settings.items())
        text += f'APT::Architectures {{ "{_ARCH}"; }};\n'
        config = root / f"apt-{hashlib.sha256(str(status).encode()).hexdigest()[:12]}.conf"
        config.write_text(text)
        return config

    def _apt(
        self, *args: str, status: Path | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        if status is None:
            status = self.root / "state" / "empty-status"
            status.parent.mkdir(parents=True, exist_ok=True)
            status.touch()
        config = self._config(status)
        env = {**os.environ, "APT_CONFIG": str(config), "LC_ALL": "C"}
        result = subprocess.run(
            list(args), env=env, cwd=cwd, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise AptError(f"{' '.join(args[:3])} … failed ({self.name}):\n{result.stderr[-3000:]}")
        return result

    def update(self, *, force: bool = False) -> None:
        """Fetch the suites' package lists (once; ``force`` refreshes them)."""
        lists = self.root / "lists"
        if not force and lists.is_dir() and any(lists.glob("*_Packages")):
            return
        self._apt("apt-get", "update", "-q")

    # --- resolving -------------------------------------------------------------------------

    def required(self) -> list[str]:
        """What ``mmdebstrap --variant=minbase`` starts from: Essential:yes and
        Priority:required packages of the release suite, plus apt."""
        self.update()
        names = {"apt"}
        for path in sorted((self.root / "lists").glob("*_dists_bookworm_main_binary-*_Packages")):
            for fields in _stanzas(path.read_text()):
                if fields.get("Essential") == "yes" or fields.get("Priority") == "required":
                    names.add(fields["Package"])
        return sorted(names)

    def resolve(self, packages: Sequence[str], status: Path | None = None) -> dict[str, Deb]:
        """``name=version`` → file of every package ``apt-get install packages`` would install
        (or upgrade) on a system whose dpkg status is ``status`` (None: an empty system)."""
        self.update()
        simulated = self._apt(
            "apt-get", "install", "-s", "-q", "--no-install-recommends", *packages, status=status
        )
        pins = []
        for line in simulated.stdout.splitlines():
            match = _INST.match(line)
            if match:
                pins.append(f"{match.group(1)}={match.group(2)}")
        return self.describe(pins)

    def describe(self, pins: Sequence[str]) -> dict[str, Deb]:
        """The archive's record of each ``name=version`` (file name, SHA-256, size)."""
        if not pins:
            return {}
        shown = self._apt("apt-cache", "show", "--no-all-versions", *pins)
        found: dict[str, Deb] = {}
        for fields in _stanzas(shown.stdout):
            pin = f"{fields['Package']}={fields['Version']}"
            found[pin] = Deb(
                architecture=fields["Architecture"],
                filename=fields["Filename"],
                sha256=fields["SHA256"],
                size=int(fields["Size"]),
                priority=fields.get("Priority", "optional"),
            )
        missing = sorted(set(pins) - set(found))
        if missing:
            raise AptError(f"not in the {self.name} suites: {', '.join(missing)}")
        return found

    # --- fetching --------------------------------------------------------------------------

    def fetch(self, pins: Sequence[str], debs: Mapping[str, Deb]) -> list[Path]:
        """The ``.deb`` file of each pin: from the cache, else downloaded; checked by SHA-256."""
        self.debs.mkdir(parents=True, exist_ok=True)
        paths = {pin: self.debs / _deb_file_name(pin, debs[pin]) for pin in pins}
        missing = [pin for pin, path in paths.items() if not path.exists()]
        if missing:
            self.update()
            try:
                self._apt("apt-get", "download", "-q", *missing, cwd=self.debs)
            except AptError as exc:
                raise AptError(
                    f"{exc}\nA pinned version left the archive and is not in the cache "
                    f"({self.debs}): restore the cache, or relock the workloads "
                    "(python -m benchmarks.images.workloads --relock)."
                ) from None
        for pin, path in paths.items():
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            if digest != debs[pin].sha256:
                path.unlink()
                raise AptError(
                    f"{path.name}: SHA-256 {digest}, the archive said {debs[pin].sha256}"
                )
        return [paths[pin] for pin in pins]


def local_repository(debs: Sequence[tuple[Path, Deb]], where: Path, suite: str = "bookworm") -> str:
    """Make ``where`` an apt repository (suite ``suite``, component ``main``) holding exactly
    ``debs`` (hard-linked), and return its ``sources.list`` line (``file://``, trusted: it is
    our own cache, each file checked by SHA-256 when fetched). Priorities are the archive's,
    as mmdebstrap chooses a minbase system by them."""
    pool = where / "pool"
    index_dir = where / "dists" / suite / "main" / f"binary-{_ARCH}"
    pool.mkdir(parents=True, exist_ok=True)
    index_dir.mkdir(parents=True, exist_ok=True)
    stanzas = []
    for deb, record in sorted(debs, key=lambda pair: pair[0].name):
        target = pool / deb.name
        if not target.exists():
            try:
                os.link(deb, target)
            except OSError:
                target.write_bytes(deb.read_bytes())
        control = subprocess.run(
            ["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True
        ).stdout.rstrip("\n")
        control = re.sub(r"(?m)^Priority: .*$", f"Priority: {record.priority}", control)
        data = target.read_bytes()
        stanzas.append(
            f"{control}\nFilename: pool/{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    index = "\n".join(stanzas).encode()
    (index_dir / "Packages").write_bytes(index)
    release = (
        f"Origin: starlight-bench\nLabel: starlight-bench\nSuite: {suite}\nCodename: {suite}\n"
        f"Architectures: {_ARCH} all\nComponents: main\nSHA256:\n"
        f" {hashlib.sha256(index).hexdigest()} {len(index)} main/binary-{_ARCH}/Packages\n"
    )
    (where / "dists" / suite / "Release").write_text(release)
    return f"deb [trusted=yes] file://{where} {suite} main"
