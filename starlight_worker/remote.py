"""Images pulled by containerd's own client, served lazily: the remote-snapshot path.

When containerd itself pulls an image into the starlight snapshotter with remote-snapshot
labels (``ctr-remote image rpull --snapshotter starlight``, nerdctl, the CRI plugin with
snapshot annotations), every layer's Prepare carries ``containerd.io/snapshot.ref`` (its chain
ID) and labels naming the image and the layer:

- the CRI plugin's ``containerd.io/snapshot/cri.image-ref`` and ``cri.layer-digest`` (and
  ``cri.image-layers``, ``cri.manifest-digest`` when known);
- stargz's ``containerd.io/snapshot/remote/stargz.reference`` and ``stargz.digest`` (what
  ``ctr-remote`` sets).

``RemoteSnapshots.prepare`` (the ``StarlightLayers.remote_fallback`` hook) pulls that image
through the proxy — one pull per image, shared by the Prepare calls of all its layers, without
registering anything in containerd (containerd's client does that) — waits until the bundle
header is in and every layer begun, and maps the layer digest containerd names (the
*compressed* digest in the manifest containerd pulls) to the store's layer through the TOCs'
``layer.digest``. The snapshotter then commits an external snapshot and answers
ALREADY_EXISTS: containerd neither downloads nor unpacks the layer.

Anything else is declined, and containerd downloads and unpacks the layer itself. A silent
fallback to a full download is what users of lazy pulling complain about most, so each is
said: an info log line naming the image and the reason, and
``starlight_worker_remote_fallbacks_total{reason}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Final, Protocol

import anyio
import attrs

from starlight_core.bundle import BundleHeader
from starlight_core.digest import Digest
from starlight_core.errors import InvalidInput, StarlightError
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_worker.layers import LABEL_IMAGE, LABEL_LAYER
from starlight_worker.metrics import Metrics
from starlight_worker.puller import Pull, PullOptions
from starlight_worker.snapshotter import LABEL_SNAPSHOT_REF
from starlight_worker.store import layer_key

__all__ = [
    "LABEL_CRI_IMAGE_LAYERS",
    "LABEL_CRI_IMAGE_REF",
    "LABEL_CRI_LAYER_DIGEST",
    "LABEL_CRI_MANIFEST_DIGEST",
    "LABEL_STARGZ_DIGEST",
    "LABEL_STARGZ_LAYERS",
    "LABEL_STARGZ_REFERENCE",
    "LayerRequest",
    "RemoteSnapshots",
    "layer_request",
]

log = logging.getLogger(__name__)

LABEL_CRI_IMAGE_REF: Final = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_LAYER_DIGEST: Final = "containerd.io/snapshot/cri.layer-digest"
LABEL_CRI_IMAGE_LAYERS: Final = "containerd.io/snapshot/cri.image-layers"
LABEL_CRI_MANIFEST_DIGEST: Final = "containerd.io/snapshot/cri.manifest-digest"
LABEL_STARGZ_REFERENCE: Final = "containerd.io/snapshot/remote/stargz.reference"
LABEL_STARGZ_DIGEST: Final = "containerd.io/snapshot/remote/stargz.digest"
LABEL_STARGZ_LAYERS: Final = "containerd.io/snapshot/remote/stargz.layers"

_LABEL_PAIRS: Final = (
    (LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST),
    (LABEL_STARGZ_REFERENCE, LABEL_STARGZ_DIGEST),
)
_REMEMBER: Final = 30.0
"""Seconds a decision about an image is reused by the Prepare calls of its other layers (they
come one after the other): one pull, one log line per image, not one per layer."""


@attrs.frozen
class LayerRequest:
    """What containerd says it is unpacking: a layer (compressed digest) of an image."""

    reference: Reference
    layer: Digest
    manifest: Digest | None = None


def layer_request(labels: Mapping[str, str]) -> LayerRequest | None:
    """The image and layer named by ``labels``; None if they name none. Malformed values
    raise ``InvalidInput``."""
    for ref_label, digest_label in _LABEL_PAIRS:
        reference, digest = labels.get(ref_label), labels.get(digest_label)
        if reference and digest:
            manifest = labels.get(LABEL_CRI_MANIFEST_DIGEST)
            return LayerRequest(
                Reference.parse(reference),
                Digest(digest),
                Digest(manifest) if manifest else None,
            )
    return None


class PullStarter(Protocol):
    def start(self, options: PullOptions) -> Pull: ...


@attrs.define
class _Decision:
    until: float
    header: BundleHeader | None = None
    reason: str = ""
    message: str = ""


class RemoteSnapshots:
    """The remote-snapshot hook: ``prepare(key, parent, labels)`` → labels naming the
    starlight layer, or None (containerd unpacks the layer itself)."""

    def __init__(
        self,
        pulls: PullStarter,
        *,
        namespace: str,
        platform: Platform | None = None,
        timeout: float = 120.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._pulls = pulls
        self.namespace = namespace
        self.platform = platform or Platform.host()
        self.timeout = timeout
        self.metrics = metrics
        self._decisions: dict[str, _Decision] = {}

    async def prepare(
        self, key: str, parent: str, labels: Mapping[str, str]
    ) -> Mapping[str, str] | None:
        chain_id = labels.get(LABEL_SNAPSHOT_REF, key)
        try:
            request = layer_request(labels)
        except InvalidInput as exc:
            return self._decline(chain_id, None, "bad_labels", f"its labels are malformed: {exc}")
        if request is None:
            return self._decline(
                chain_id,
                None,
                "no_image_labels",
                "containerd did not say which image it belongs to (pull with "
                "`ctr-remote image rpull`, nerdctl, or the CRI plugin's snapshot annotations; "
                "or with `ctr-starlight pull`)",
            )
        decision = await self._decide(request.reference)
        if decision.header is None:
            return self._decline(chain_id, request, decision.reason, decision.message)
        header = decision.header
        if request.manifest is not None and all(
            image.manifest_digest != request.manifest for image in header.images
        ):
            return self._decline(
                chain_id,
                request,
                "manifest_differs",
                f"containerd pulls manifest {request.manifest}, the proxy serves "
                f"{header.images[0].manifest_digest} under that name",
            )
        for toc in header.layers:
            if toc.layer.digest == request.layer:
                if self.metrics is not None:
                    self.metrics.remote_layers.inc()
                log.debug("layer %s of %s: served lazily", request.layer, request.reference)
                return {
                    LABEL_LAYER: layer_key(toc.layer.diff_id),
                    LABEL_IMAGE: str(request.reference),
                }
        return self._decline(
            chain_id,
            request,
            "layer_not_in_image",
            f"the proxy's {request.reference} ({header.images[0].manifest_digest}) has no "
            f"layer {request.layer}: containerd is pulling another manifest under that name",
        )

    async def _decide(self, reference: Reference) -> _Decision:
        """Pull ``reference`` through the proxy (or join the pull under way) until its header
        is in; a recent decision about the same image is reused."""
        now = time.monotonic()
        for name in [n for n, d in self._decisions.items() if d.until <= now]:
            del self._decisions[name]
        known = self._decisions.get(str(reference))
        if known is not None:
            return known
        options = PullOptions(
            reference=reference,
            platform=self.platform,
            namespace=self.namespace,
            register=False,
        )
        pull = self._pulls.start(options)
        with anyio.move_on_after(self.timeout):
            await pull.ready.wait()
        if pull.header is not None and pull.usable:
            decision = _Decision(time.monotonic() + _REMEMBER, header=pull.header)
        elif not pull.ready.is_set():
            decision = _Decision(
                time.monotonic() + _REMEMBER,
                reason="timeout",
                message=f"the proxy sent no bundle header within {self.timeout:g}s "
                "(the pull goes on in the background)",
            )
        else:
            error = pull.error or StarlightError("the pull ended without a header")
            reason = (
                "image_not_found" if error.code in ("image_not_found", "not_found") else error.code
            )
            decision = _Decision(
                time.monotonic() + _REMEMBER,
                reason=reason,
                message=f"the proxy cannot serve it: {error}",
            )
        self._decisions[str(reference)] = decision
        return decision

    def _decline(
        self, chain_id: str, request: LayerRequest | None, reason: str, message: str
    ) -> Mapping[str, str] | None:
        """Count and say a fallback; returns the hook's "declined"."""
        if self.metrics is not None:
            self.metrics.remote_fallbacks.labels(reason).inc()
        image = str(request.reference) if request is not None else "(unknown image)"
        log.info(
            "remote snapshot %s of %s: falling back to a full download by containerd: %s",
            chain_id,
            image,
            message,
        )
        return None
