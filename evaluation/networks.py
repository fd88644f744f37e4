"""The feature networks of one evaluation, seen by the accumulator as one extractor.

Inception gives `pool`, `spatial` (and `logits`), DINOv2 gives `dinov2`. `FeatureNetworks` holds the networks the
chosen metrics need (Inception only for IS/FID/sFID/precision/recall, DINOv2 only for FD_DINOv2 and its
precision/recall) and runs each uint8 batch through all of them: `extract` returns the union of their
features, so the evaluator, the reference cache and the sampling job feed it like a single network. Any object
with the extractor interface (a stand-in in tests) can be one of the networks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from evaluation import dinov2 as dinov2_network
from evaluation.dinov2 import (
    DEFAULT_RESIZE,
    DINOV2_FEATURE,
    INPUT_SIDE,
    MODEL_NAME,
    POS_OFFSET,
    VITL14,
    DinoV2Extractor,
    DinoV2Weights,
)
from evaluation.errors import EvaluationError
from evaluation.features import DINOV2, LOGITS, POOL, SPATIAL, FeatureExtractor
from evaluation.inception import (
    FEATURE_DIMS,
    INPUT_SIZE,
    InceptionExtractor,
    InceptionWeights,
    resolve_weights_on_every_rank,
)
from evaluation.metrics import FRECHET_FEATURES, MANIFOLD_FEATURES, METRIC_IS
from launch.runtime import dist
from launch.runtime.files import file_sha256

INCEPTION_KINDS = frozenset({POOL, SPATIAL, LOGITS})
DINOV2_KINDS = frozenset({DINOV2})
ID_CHARS = 16
FEATURES_VERSION = 1  # bump when what a feature block holds changes
# How each network turns uint8 images into features, as the protocol records it.
INCEPTION_GRAPH = "inception-2015-12-05 (ADM's TF graph, torch-fidelity's inception-v3-compat)"
INCEPTION_RESIZE = f"TF1 bilinear to {INPUT_SIZE}x{INPUT_SIZE}, (x - 128) / 128"
DINOV2_OUTPUT = "CLS token after the final norm"
assert DINOV2 == DINOV2_FEATURE


def expected_dims() -> dict[str, int | None]:
    """The width of every feature kind a command may find stored statistics of, before any network is loaded:
    Inception's, and DINOv2's from the architecture FD_DINOv2 insists on (None: whatever the file holds)."""
    arch = dinov2_network.METRIC_ARCH
    return {**FEATURE_DIMS, DINOV2: arch.embed_dim if arch is not None else None}


def metric_kinds(metrics: Iterable[str]) -> set[str]:
    """The feature kinds the metrics are computed from (the Inception Score: the logits)."""
    kinds = set()
    for m in metrics:
        if m in FRECHET_FEATURES:
            kinds.add(FRECHET_FEATURES[m])
        if m in MANIFOLD_FEATURES:
            kinds.add(MANIFOLD_FEATURES[m])
        if m == METRIC_IS:
            kinds.add(LOGITS)
    return kinds


def needs_inception(metrics: Iterable[str]) -> bool:
    return bool(metric_kinds(metrics) & INCEPTION_KINDS)


def needs_dinov2(metrics: Iterable[str]) -> bool:
    return bool(metric_kinds(metrics) & DINOV2_KINDS)


class FeatureNetworks:
    """Several networks as one extractor: `extract` = the union of their outputs (distinct kinds)."""

    def __init__(self, networks: Sequence[FeatureExtractor]):
        if not networks:
            raise ValueError("FeatureNetworks needs at least one network")
        self.networks = list(networks)
        self.feature_dims: dict[str, int] = {}
        for net in self.networks:
            clash = set(net.feature_dims) & set(self.feature_dims)
            if clash:
                raise ValueError(f"two networks give the feature kind {sorted(clash)[0]}")
            self.feature_dims.update(net.feature_dims)
        first = self.networks[0]
        self.device, self.batch_size = first.device, first.batch_size
        self.has_logits = any(net.has_logits for net in self.networks)

    @property
    def inception(self) -> FeatureExtractor | None:
        """The network giving pool_3 (Inception, or its stand-in), None when no metric needs it."""
        return next((net for net in self.networks if POOL in net.feature_dims), None)

    @property
    def dinov2(self) -> FeatureExtractor | None:
        return next((net for net in self.networks if DINOV2 in net.feature_dims), None)

    @property
    def weights(self) -> InceptionWeights | None:
        """Inception's weights (what the Inception Score's availability and older reports speak of)."""
        inception = self.inception
        return inception.weights if inception is not None else None

    def extract(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if all(net.device == self.device for net in self.networks):
            x = x.to(self.device)  # one host-to-device copy for all the networks, not one each
        out: dict[str, torch.Tensor] = {}
        for net in self.networks:
            out.update(net.extract(x))
        return out


def networks_of(extractor: FeatureExtractor) -> list[FeatureExtractor]:
    """The single networks behind an extractor (itself when it is one)."""
    return list(getattr(extractor, "networks", None) or [extractor])


def combine(networks: Sequence[FeatureExtractor]) -> FeatureExtractor:
    """One extractor for these networks (the network itself when there is one)."""
    return networks[0] if len(networks) == 1 else FeatureNetworks(networks)


def cache_tag(network: FeatureExtractor) -> str:
    """What besides its weights file tells a network's features apart (DINOv2's resize mode; '' for Inception)."""
    return getattr(network, "cache_tag", "")


def weights_id(weights: InceptionWeights) -> str:
    """What stored Inception features depend on: the content hash of its weights file (and the block format)."""
    return f"v{FEATURES_VERSION}-{file_sha256(weights.path)[:ID_CHARS]}"


def network_id(network: FeatureExtractor) -> str:
    """The identity of one network's features: `weights_id` for Inception (unchanged, so stored blocks stay
    valid), `<tag>-<sha256 prefix>` for the others."""
    tag = cache_tag(network)
    if not tag:
        return weights_id(network.weights)
    return f"{tag}-{file_sha256(network.weights.path)[:ID_CHARS]}"


def features_id(extractor: FeatureExtractor) -> str:
    """What a sampling run's stored feature blocks depend on: every network's identity, joined."""
    return "-".join(network_id(net) for net in networks_of(extractor))


def resolve_network_weights(metrics: Iterable[str], inception_path: str | None, dinov2_path: str | None,
                            allow_download: bool) -> tuple[InceptionWeights | None, DinoV2Weights | None]:
    """The weights the metrics need, found and checked (rank 0 first: it may download), before any network
    is built; None for a network no metric needs."""
    metrics = list(metrics)
    inception = (resolve_weights_on_every_rank(inception_path, allow_download=allow_download)
                 if needs_inception(metrics) else None)
    dino = (dist.rank0_then_others(lambda: dinov2_network.resolve_dinov2_weights(dinov2_path, allow_download,
                                                                    arch=dinov2_network.METRIC_ARCH))
            if needs_dinov2(metrics) else None)
    return inception, dino



def check_weight_files(metrics: Iterable[str], inception_path: str | None, dinov2_path: str | None) -> None:
    """The explicit weight files the metrics will use, checked cheaply before any work (the DINOv2 file's
    architecture from its memory-mapped header): one line naming the flag otherwise."""
    metrics = list(metrics)
    if needs_inception(metrics) and inception_path is not None and not Path(inception_path).is_file():
        raise EvaluationError(f"--inception-weights {inception_path}: no such file")
    if needs_dinov2(metrics) and dinov2_path is not None:
        dinov2_network.resolve_dinov2_weights(dinov2_path, allow_download=False, arch=dinov2_network.METRIC_ARCH)


def open_networks(metrics: Iterable[str], device: torch.device | str, batch_size: int,
                  inception_weights: InceptionWeights | None = None, dinov2_weights: DinoV2Weights | None = None,
                  dinov2_resize: str = DEFAULT_RESIZE) -> FeatureNetworks:
    """Load the networks `metrics` need, from weights the caller resolved (and so checked) before."""
    metrics = list(metrics)
    nets: list[FeatureExtractor] = []
    if needs_inception(metrics):
        if inception_weights is None:
            raise ValueError("the metrics need Inception but no Inception weights were given")
        nets.append(InceptionExtractor(inception_weights, device, batch_size))
    if needs_dinov2(metrics):
        if dinov2_weights is None:
            raise ValueError("the metrics need DINOv2 but no DINOv2 weights were given")
        nets.append(DinoV2Extractor(dinov2_weights, device, batch_size, dinov2_resize))
    return FeatureNetworks(nets)


def protocol_networks(extractor: FeatureExtractor) -> dict[str, dict]:
    """What the protocol records of each network (with its weights `path`, which the protocol hashes)."""
    out: dict[str, dict] = {}
    for net in networks_of(extractor):
        path = net.weights.path
        if POOL in net.feature_dims:
            out["inception"] = {"graph": INCEPTION_GRAPH, "weights": path.name, "path": path,
                                "resize": INCEPTION_RESIZE}
        elif DINOV2 in net.feature_dims:
            arch = getattr(net.weights, "arch", None)
            model = f"dinov2_{MODEL_NAME}" if arch == VITL14 else (arch.describe() if arch else "unknown")
            grid = INPUT_SIDE // arch.patch if arch else None
            pos = (f"bicubic from {arch.pos_grid}x{arch.pos_grid}, scale ({grid} + {POS_OFFSET}) / {arch.pos_grid}, "
                   "no antialias") if arch else None
            out["dinov2"] = {"model": model, "weights": path.name, "path": path,
                             "resize": getattr(net, "resize", None), "input_side": INPUT_SIDE,
                             "output": DINOV2_OUTPUT, "pos_embed": pos}
    return out


def dinov2_resize_of(extractor: FeatureExtractor) -> str:
    """The resize mode of the extractor's DINOv2 (the default when it has none)."""
    for net in networks_of(extractor):
        if DINOV2 in net.feature_dims:
            return getattr(net, "resize", DEFAULT_RESIZE)
    return DEFAULT_RESIZE
