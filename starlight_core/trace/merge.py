"""Merging startup traces into the order a bundle sends contents in.

One image: ``merge(traces)`` → ``Ranking``
==========================================

Files are named by their path in the image's merged view: an access to (layer, path) counts for
``path``, whichever layer served it (overlayfs shows one file per path, and ``delta.plan``
takes ranks by path). Each trace is first reduced to its files in order of first access: the
accesses are already in offset order (ties as recorded), and a path reached through several
layers keeps its first access.

**The rule.** Let N be the number of traces of the image, and in trace t let ``p_t(f)`` be the
0-based position of file f and ``n_t`` the number of files t read. Then

* t's *normalised rank* of f is ``r_t(f) = p_t(f) / n_t`` (in [0, 1)) if t read f, and
  ``1 + penalty`` if it did not (default penalty 1: a file missing from a trace counts as read
  at twice that trace's length);
* f's *score* is the mean of ``r_t(f)`` over all N traces;
* files are ranked by score (lower first); ties by the earliest offset at which any trace read
  the file, then by path (code-point order);
* files no trace read are not ranked: ``delta.plan`` sends them after every ranked file, in
  layer order.

``r_t(f)`` is computed as ``floor(p_t(f) · 2**40 / n_t)`` over an integer scale of ``2**40``, so
sums are exact integers: the result cannot depend on the order traces are summed in, and an
incremental update is bit-for-bit the full merge. (Distinct positions stay distinct as long as
a trace reads fewer than 2**40 files.)

What follows from it (``tests/core/test_trace_merge.py`` checks each with hypothesis):

* if every trace that read Y read X before it, X ranks before Y (each trace gives X a lower
  ``r_t`` than Y, or both the same absence rank if it read neither);
* a single trace's ranking is its own order;
* adding a trace that reads a prefix of the current ranking, in ranking order, changes no
  file's place (each term it adds grows along the ranking, the absence rank topping all);
* the order of the traces given does not matter; a trace given twice (same id) counts once;
* traces of other images are ignored.

``Ranking`` keeps only sufficient statistics (per file: sum of normalised ranks, traces that
read it, earliest offset, sum of offsets; the number of traces and their ids), so it absorbs a
new trace in time proportional to that trace's length and gives exactly what a full merge would.

Several images started together: ``merge_group(traces)`` → ``GroupRanking``
===========================================================================

Containers started together (one ``--group``, e.g. an app and its database) need one order
across their images, so a joint bundle interleaves their start-up files. Time is the common
base: every offset counts from its own container's start, as if the group's containers started
at the same instant (as a pod's do; wall clocks are not compared).

1. Each image of the group is ranked by the rule above, from the group's traces of that image.
2. Each ranked file gets an estimated time: the mean offset (integer ns, rounded down) over the
   traces that read it, raised to the largest estimate of any file ranked before it in the
   same image, so estimates never decrease along an image's ranking.
3. All files of all images are ordered by (estimated time, image manifest digest, position in
   that image's ranking).

So each image's files keep exactly their single-image order, and images interleave by when
their files are needed. ``GroupRanking.ranks(image)`` gives each file its position in the joint
order: one scale for all images, the ``ranks`` of ``delta.Target`` for a joint ``delta.plan``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Final

import attrs

from starlight_core.digest import Digest
from starlight_core.errors import InvalidInput
from starlight_core.trace.record import Trace

__all__ = [
    "DEFAULT_PENALTY",
    "SCALE",
    "FileStats",
    "GroupRanking",
    "Ranking",
    "first_accesses",
    "merge",
    "merge_group",
]

SCALE: Final = 1 << 40
"""Normalised ranks are integers: ``r · SCALE``."""
DEFAULT_PENALTY: Final = 1.0

# Per-file statistics, as a mutable list for speed: [rank_sum, count, earliest_ns, offset_sum].
_RANK_SUM: Final = 0
_COUNT: Final = 1
_EARLIEST: Final = 2
_OFFSET_SUM: Final = 3


@attrs.frozen
class FileStats:
    """What a ``Ranking`` knows of one file."""

    rank_sum: int
    """Sum of ``r_t(f) · SCALE`` over the traces that read it."""
    count: int
    """Number of traces that read it."""
    earliest_ns: int
    """Smallest offset at which any trace read it."""
    offset_sum: int
    """Sum of the offsets at which the traces that read it did so."""


def first_accesses(trace: Trace) -> list[tuple[str, int]]:
    """The files ``trace`` read, as (path, offset) in order of first access, each path once."""
    seen: set[str] = set()
    files: list[tuple[str, int]] = []
    for access in trace.accesses:
        if access.path not in seen:
            seen.add(access.path)
            files.append((access.path, access.offset_ns))
    return files


def _absent_rank(penalty: float) -> int:
    if isinstance(penalty, bool) or not math.isfinite(penalty) or penalty < 0:
        raise InvalidInput(f"the absence penalty must be a finite number >= 0, not {penalty!r}")
    return SCALE + round(Fraction(penalty) * SCALE)


class Ranking:
    """The merged ranking of one image's traces, updated one trace at a time.

    ``Ranking(image)`` is empty; ``absorb(trace)`` adds a trace. With ``image`` None the first
    trace absorbed names the image.
    """

    __slots__ = ("_absent", "_files", "_image", "_order", "_penalty", "_trace_ids")

    def __init__(self, image: Digest | None = None, *, penalty: float = DEFAULT_PENALTY) -> None:
        self._absent = _absent_rank(penalty)
        self._penalty = penalty
        self._image = Digest(image) if image is not None else None
        self._files: dict[str, list[int]] = {}
        self._trace_ids: set[str] = set()
        self._order: tuple[str, ...] | None = None

    @property
    def image(self) -> Digest | None:
        """The manifest digest of the ranked image."""
        return self._image

    @property
    def penalty(self) -> float:
        return self._penalty

    @property
    def traces(self) -> int:
        """Number of traces merged."""
        return len(self._trace_ids)

    @property
    def trace_ids(self) -> frozenset[str]:
        return frozenset(self._trace_ids)

    def absorb(self, trace: Trace) -> bool:
        """Merge one more trace. ``False`` (and nothing changes) if it is of another image or
        a trace with its id was merged already."""
        if self._image is None:
            self._image = trace.image
        elif trace.image != self._image:
            return False
        if trace.trace_id in self._trace_ids:
            return False
        self._trace_ids.add(trace.trace_id)
        files = first_accesses(trace)
        length = len(files)
        stats = self._files
        for position, (path, offset) in enumerate(files):
            normalised = position * SCALE // length
            known = stats.get(path)
            if known is None:
                stats[path] = [normalised, 1, offset, offset]
            else:
                known[_RANK_SUM] += normalised
                known[_COUNT] += 1
                known[_OFFSET_SUM] += offset
                known[_EARLIEST] = min(known[_EARLIEST], offset)
        self._order = None
        return True

    def absorb_all(self, traces: Iterable[Trace]) -> int:
        """Absorb each trace; the number that changed the ranking's statistics."""
        return sum(self.absorb(trace) for trace in traces)

    def _key(self, path: str) -> tuple[int, int, str]:
        stats = self._files[path]
        missing = len(self._trace_ids) - stats[_COUNT]
        return (stats[_RANK_SUM] + missing * self._absent, stats[_EARLIEST], path)

    def order(self) -> tuple[str, ...]:
        """Every file any trace read, first needed first."""
        if self._order is None:
            self._order = tuple(sorted(self._files, key=self._key))
        return self._order

    def ranks(self) -> dict[str, int]:
        """Path → position in ``order()`` (0 first): the ``ranks`` of a ``delta.Target``."""
        return {path: position for position, path in enumerate(self.order())}

    def score(self, path: str) -> Fraction:
        """The file's mean normalised rank over all traces (absences included), exactly."""
        total = self._key(path)[0]
        return Fraction(total, len(self._trace_ids) * SCALE)

    def stats(self, path: str) -> FileStats:
        rank_sum, count, earliest, offset_sum = self._files[path]
        return FileStats(rank_sum, count, earliest, offset_sum)

    def mean_offset_ns(self, path: str) -> int:
        """Mean offset (rounded down) at which the traces that read the file did so."""
        stats = self._files[path]
        return stats[_OFFSET_SUM] // stats[_COUNT]

    def copy(self) -> Ranking:
        other = Ranking(self._image, penalty=self._penalty)
        other._files = {path: list(stats) for path, stats in self._files.items()}
        other._trace_ids = set(self._trace_ids)
        other._order = self._order
        return other

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, path: object) -> bool:
        return path in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self.order())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ranking):
            return NotImplemented
        return (
            self._image == other._image
            and self._absent == other._absent
            and self._trace_ids == other._trace_ids
            and self._files == other._files
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"<Ranking {self._image} files={len(self._files)} traces={self.traces}>"


def _check_ids(traces: Iterable[Trace]) -> None:
    """Two different traces under one id would make the result depend on their order."""
    by_id: dict[str, Trace] = {}
    for trace in traces:
        known = by_id.setdefault(trace.trace_id, trace)
        if known != trace:
            raise InvalidInput(
                f"two different traces share the id {trace.trace_id}",
                hint="a worker must choose a fresh UUID for every trace",
            )


def merge(
    traces: Iterable[Trace], image: Digest | None = None, *, penalty: float = DEFAULT_PENALTY
) -> Ranking:
    """Rank the files of one image from its traces (the rule is in the module docstring).

    With ``image`` (a manifest digest), traces of other images are left out; without, every
    trace must be of the same image.
    """
    given = list(traces)
    if image is None:
        images = sorted({trace.image for trace in given})
        if len(images) > 1:
            raise InvalidInput(
                f"traces of {len(images)} different images given: name the one to rank"
            )
        image = images[0] if images else None
    else:
        image = Digest(image)
        given = [trace for trace in given if trace.image == image]
    _check_ids(given)
    ranking = Ranking(image, penalty=penalty)
    ranking.absorb_all(given)
    return ranking


class GroupRanking:
    """One ranking across the images of containers started together (one group).

    ``absorb(trace)`` takes the group's traces one by one; ``ranks(image)`` gives each image's
    files their position in the joint order (see the module docstring).
    """

    __slots__ = ("_group", "_images", "_order", "_penalty", "_trace_ids")

    def __init__(self, group: str, *, penalty: float = DEFAULT_PENALTY) -> None:
        _absent_rank(penalty)
        self._group = group
        self._penalty = penalty
        self._images: dict[Digest, Ranking] = {}
        self._trace_ids: set[str] = set()
        self._order: tuple[tuple[Digest, str], ...] | None = None

    @property
    def group(self) -> str:
        return self._group

    @property
    def images(self) -> tuple[Digest, ...]:
        """The group's images (manifest digests), sorted."""
        return tuple(sorted(self._images))

    @property
    def traces(self) -> int:
        return len(self._trace_ids)

    def absorb(self, trace: Trace) -> bool:
        """Merge one more trace; ``False`` if it is of another group or already merged."""
        if trace.group != self._group or trace.trace_id in self._trace_ids:
            return False
        ranking = self._images.get(trace.image)
        if ranking is None:
            ranking = self._images[trace.image] = Ranking(trace.image, penalty=self._penalty)
        ranking.absorb(trace)
        self._trace_ids.add(trace.trace_id)
        self._order = None
        return True

    def absorb_all(self, traces: Iterable[Trace]) -> int:
        return sum(self.absorb(trace) for trace in traces)

    def ranking(self, image: Digest) -> Ranking:
        """The image's own ranking (from the group's traces only)."""
        return self._images[image]

    def order(self) -> tuple[tuple[Digest, str], ...]:
        """Every (image, path) any trace of the group read, first needed first."""
        if self._order is None:
            joint: list[tuple[int, Digest, int, str]] = []
            for image, ranking in self._images.items():
                estimate = 0
                for position, path in enumerate(ranking.order()):
                    estimate = max(estimate, ranking.mean_offset_ns(path))
                    joint.append((estimate, image, position, path))
            joint.sort()
            self._order = tuple((image, path) for _, image, _, path in joint)
        return self._order

    def ranks(self, image: Digest) -> dict[str, int]:
        """The image's paths → their position in the joint order (one scale for all images)."""
        return self.rank_maps().get(image, {})

    def rank_maps(self) -> dict[Digest, dict[str, int]]:
        """Per image, path → position in the joint order."""
        maps: dict[Digest, dict[str, int]] = {image: {} for image in sorted(self._images)}
        for position, (image, path) in enumerate(self.order()):
            maps[image][path] = position
        return maps

    def __len__(self) -> int:
        return sum(len(ranking) for ranking in self._images.values())

    def __repr__(self) -> str:
        return f"<GroupRanking {self._group!r} images={len(self._images)} traces={self.traces}>"


def merge_group(
    traces: Iterable[Trace], group: str | None = None, *, penalty: float = DEFAULT_PENALTY
) -> GroupRanking:
    """Rank the files of a group's images jointly (the rule is in the module docstring).

    With ``group``, traces of other groups (and ungrouped ones) are left out; without, every
    trace must carry the same group.
    """
    given = list(traces)
    if group is None:
        groups = {trace.group for trace in given}
        if None in groups:
            raise InvalidInput("a trace without a group cannot be merged jointly")
        if len(groups) != 1:
            raise InvalidInput(
                f"traces of {len(groups)} groups given: name the one to rank"
                if groups
                else "no traces given and no group named"
            )
        group = next(iter(groups))
        assert group is not None
    else:
        given = [trace for trace in given if trace.group == group]
    _check_ids(given)
    ranking = GroupRanking(group, penalty=penalty)
    ranking.absorb_all(given)
    return ranking
