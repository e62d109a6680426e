"""Deploy through starlight: the container sees exactly what stock containerd would show.

convert + notify a multi-layer image, ``ctr-starlight pull``, ``ctr run --snapshotter
starlight``: the listing and checksums of the whole root filesystem equal those of the
original image run by stock containerd (overlayfs).
"""

from __future__ import annotations

import difflib

import pytest

from benchmarks.images.fidelity import LISTING_COMMAND, fidelity_layers
from benchmarks.stack import Stack
from tests.e2e.conftest import Publish

pytestmark = pytest.mark.e2e


def _diff(expected: str, actual: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(expected.splitlines(), actual.splitlines(), lineterm="")
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


def test_deploy_equals_stock_containerd(stack: Stack, publish: Publish) -> None:
    source, converted = publish(fidelity_layers(), name="deploy", cmd=LISTING_COMMAND)
    stack.containerd.ctr("images", "pull", "--plain-http", str(source))
    stock = stack.run(source, snapshotter="overlayfs")

    out = stack.pull(converted, "--wait")
    assert "complete" in out
    through_starlight = stack.run(converted)
    assert _diff(stock, through_starlight) == []
    assert "./srv/data/big regular file 644" in stock  # the listing is not vacuous
