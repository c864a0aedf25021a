"""Cluster pass (Han et al., Deep Compression): k-means weight sharing, one codebook per layer.

Each target's weights are clustered into k values; the layer keeps the k float centroids (trainable,
so a later distill stage fine-tunes them) and one packed log2(k)-bit index per weight. Biases stay float.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.decompose.kmeans import kmeans_1d
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.clustered import ClusteredLinear, dense_weight
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.cluster import ClusterConfig
from llmshrink.targeting import find_targets, replace_module, untie_targets


def apply(model, cfg: ClusterConfig, ctx: Context) -> PassRecord:
    targets = find_targets(model, cfg.targets, cfg.exclude, cfg.layers)
    k = cfg.k
    untied = untie_targets(model, targets, cfg.tied_embeddings, "cluster", "cluster it")
    layers = []
    for name, module in tqdm(targets, desc="cluster", unit="layer", leave=False):
        weight = dense_weight(module)
        if weight.numel() < k:
            raise LlmshrinkError(f"cluster: {name}: {k} clusters for a layer of only {weight.numel()} weights")
        start = time.perf_counter()
        found = kmeans_1d(weight, k, init=cfg.init, iters=cfg.iters, tol=cfg.tol, seed=ctx.seed)
        new = ClusteredLinear.from_clusters(module, found.centroids.to(weight.dtype), found.assignments)
        with torch.no_grad():
            error = float((new.to_dense().float() - weight.float()).norm() / weight.float().norm().clamp(min=1e-30))
        replace_module(model, name, new)
        layers.append(_layer_record(name, weight, new, cfg.init, found, error, time.perf_counter() - start))
        ctx.log(
            f"  {name}: {weight.shape[0]}x{weight.shape[1]} -> {k} shared values, {new.bits}-bit indices, "
            f"rel. error {error:.4f}"
        )
    before = sum(layer["bytes_before"] for layer in layers)
    after = sum(layer["bytes_after"] for layer in layers)
    return {
        "clusters": k,
        "init": cfg.init,
        "per": cfg.per,
        "seed": ctx.seed,
        "layers": layers,
        "untied": untied,
        "bytes_before": before,
        "bytes_after": after,
        "ratio": round(after / before, 6),
    }


def _layer_record(
    name: str, weight: torch.Tensor, new: ClusteredLinear, init: str, found, error: float, seconds: float
) -> dict:
    index_bytes = new.indices.numel() * new.indices.element_size()
    codebook_bytes = new.codebook.numel() * new.codebook.element_size()
    per_byte = 8 // new.bits
    return {
        "name": name,
        "shape": list(weight.shape),
        "clusters": new.clusters,
        "init": init,
        "bits": math.ceil(math.log2(new.clusters)),  # information per index
        "index_bits": new.bits,  # stored per index (1, 2, 4 or 8, so bytes split evenly)
        "index_storage": f"uint8, {per_byte} per byte" if per_byte > 1 else "uint8",
        "index_bytes": index_bytes,
        "codebook_bytes": codebook_bytes,
        "bytes_before": weight.numel() * weight.element_size(),
        "bytes_after": index_bytes + codebook_bytes,
        "rel_error": round(error, 6),
        "iterations": found.iterations,
        "converged": found.converged,
        "seconds": round(seconds, 3),
    }
