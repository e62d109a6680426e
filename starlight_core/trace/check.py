"""Checking an uploaded trace against the image it claims to trace.

A trace names layers by index or diff_id and files by path; before the proxy stores one, every
access must name a layer of the image and a path that layer holds. A trace that does not fit is
refused whole, so rankings never learn of files an image does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from starlight_core.digest import Digest
from starlight_core.errors import InvalidInput
from starlight_core.layer.toc import TOC
from starlight_core.trace.record import FileAccess, Trace

__all__ = ["check_trace"]

_SHOWN: Final = 5


def _names(toc: TOC) -> frozenset[str]:
    """Every path the layer's own tree has: its entries and the directories they imply."""
    names: set[str] = set()
    for entry in toc.entries:
        name = entry.name
        while name and name not in names:
            names.add(name)
            name = name.rpartition("/")[0]
    return frozenset(names)


def check_trace(trace: Trace, layers: Sequence[TOC]) -> None:
    """Raise ``InvalidInput`` unless every access names a layer of the image (``layers``, base
    first) and a path in that layer; the message lists the first few that do not, by line."""
    by_diff_id: dict[Digest, int] = {toc.layer.diff_id: index for index, toc in enumerate(layers)}
    names: dict[int, frozenset[str]] = {}
    problems: list[str] = []
    count = 0

    def problem(line: int, access: FileAccess, why: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < _SHOWN:
            problems.append(f"line {line}: {access.path!r} ({why})")

    for line, access in enumerate(trace.accesses, start=2):
        layer = access.layer
        if isinstance(layer, Digest):
            index = by_diff_id.get(layer)
            if index is None:
                problem(line, access, f"no layer of the image has diff_id {layer}")
                continue
        elif layer < len(layers):
            index = layer
        else:
            problem(line, access, f"the image has {len(layers)} layers, not {layer + 1}")
            continue
        known = names.get(index)
        if known is None:
            known = names[index] = _names(layers[index])
        if access.path not in known:
            problem(line, access, f"not in layer {index}")
    if count:
        more = f" (and {count - len(problems)} more)" if count > len(problems) else ""
        raise InvalidInput(
            f"trace {trace.trace_id} does not fit image {trace.image}: "
            + "; ".join(problems)
            + more,
            hint="was the trace recorded for another image, or the image pushed again?",
        )
