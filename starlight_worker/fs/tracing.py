"""First-access tracing for the optimizer: which file each layer served first, and when.

Off by default; a FUSE callback then pays one attribute read. When on, each (layer, file) is
recorded once, at its first access of any kind.
"""

from __future__ import annotations

import threading
import time

from starlight_worker.fs.protocol import Access
from starlight_worker.fs.tree import toc_name

__all__ = ["Tracer"]


class Tracer:
    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] = {}
        """Per layer key, the names recorded already."""
        self._records: list[Access] = []

    def start(self) -> None:
        """Start a fresh trace; while one is on already, keep it (and its undrained records)."""
        with self._lock:
            if not self.enabled:
                self._seen.clear()
                self._records.clear()
            self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    def drain(self) -> list[Access]:
        with self._lock:
            records, self._records = self._records, []
        return records

    def forget(self, layer_key: str) -> None:
        """The layer was detached: what it saw is no longer needed (a key attached again
        starts afresh)."""
        with self._lock:
            self._seen.pop(layer_key, None)

    def record(self, layer_key: str, attached_ns: int, name: str, kind: str) -> None:
        """Note an access to ``name`` (FUSE form) unless this file was already recorded."""
        now = time.monotonic_ns()
        with self._lock:
            if not self.enabled:
                return
            seen = self._seen.get(layer_key)
            if seen is None:
                seen = self._seen[layer_key] = set()
            elif name in seen:
                return
            seen.add(name)
            self._records.append(Access(now - attached_ns, layer_key, toc_name(name), kind))
