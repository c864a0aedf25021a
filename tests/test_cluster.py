"""The cluster pass (k-means weight sharing): exactness, initialisations, storage, reload, training."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    apply_and_save,
    reload_without_llmshrink,
    save_tiny,
    stage_error,
    tensor_bytes,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.decompose.kmeans import initial_centroids, kmeans_1d
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.clustered import ClusteredLinear, pack_indices, unpack_indices
from llmshrink.passes.cluster import ClusterConfig, apply
from llmshrink.targeting import find_targets, replace_module

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])
INITS = ("forgy", "density", "linear")
BLOCKS = r".*\.\d+\..*"


def ctx() -> Context:
    return Context(tokenizer=None, log=lambda _: None)



def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@torch.no_grad()
def share_values(model: nn.Module, k: int) -> None:
    """Give every block layer weights drawn from k distinct values, so k clusters are lossless."""
    gen = torch.Generator().manual_seed(3)
    for _, module in find_targets(model, BLOCKS):
        levels = torch.linspace(-0.08, 0.08, k) + 0.003 * torch.rand(k, generator=gen)
        module.weight.copy_(levels[torch.randint(k, module.weight.shape, generator=gen)])


def densified(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, ClusteredLinear):
            replace_module(model, name, module.to_linear())
    return model


# --- k-means ------------------------------------------------------------------------------------


def test_initialisations_by_hand():
    values = torch.tensor([8.0, 0.0, 2.0, 0.0, 1.0, 16.0, 0.0, 4.0, 1.0, 0.0])  # sorted: 0 0 0 0 1 1 2 4 8 16
    assert initial_centroids(values, 4, "linear").tolist() == pytest.approx([0.0, 16 / 3, 32 / 3, 16.0])
    # CDF quantiles at 1/8, 3/8, 5/8, 7/8: sorted positions 1.125, 3.375, 5.625, 7.875 (interpolated).
    assert initial_centroids(values, 4, "density").tolist() == pytest.approx([0.0, 0.375, 1.625, 7.5])
    forgy = initial_centroids(values, 4, "forgy", seed=0)
    picks = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4]
    assert torch.equal(forgy, values[picks].sort().values)  # four weights drawn without replacement
    assert torch.equal(forgy, initial_centroids(values, 4, "forgy", seed=0))  # reproducible
    others = {tuple(initial_centroids(values, 4, "forgy", seed=s).tolist()) for s in range(1, 6)}
    assert len(others) > 1  # and the seed matters


@pytest.mark.parametrize("init", INITS)
def test_k_distinct_values_are_reproduced_exactly(init):
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([-0.7, -0.05, 0.0, 0.02, 0.3, 1.9])
    # Unequal frequencies, so the density quantiles and forgy draws start on repeated values.
    weights = levels[torch.multinomial(torch.tensor([0.05, 0.4, 0.3, 0.15, 0.08, 0.02]), 40 * 30, True,
                                       generator=gen)].view(40, 30)
    found = kmeans_1d(weights, 6, init=init)
    assert torch.equal(found.centroids, levels)
    assert torch.equal(found.centroids[found.assignments], weights)
    assert found.converged


class _OutputSizes(TorchDispatchMode):
    """Records the number of elements of every tensor each op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor)]
        return out


def test_large_layer_clusters_near_the_optimum_without_per_value_work_per_iteration():
    torch.manual_seed(0)
    weights = torch.randn(1536, 576) * 0.02  # ~0.9M values, SmolLM2's MLP shape
    with _OutputSizes() as seen:
        found = kmeans_1d(weights, 16, init="linear")
    n = weights.numel()
    # What keeps a large layer fast (a wall-clock bound said so less reliably): no n x k distance matrix
    # (14M values here), nothing bigger than the prefix sum (n + 1)...
    assert max(seen.sizes) <= n + 1
    # ...and no pass over all the values inside the Lloyd loop: the ops giving n values (sort, prefix sum,
    # the final assignment: 11 measured) run once, where one per iteration would add `iterations` (208).
    assert found.converged and found.iterations > 100
    assert sum(size >= n for size in seen.sizes) < 20
    error = float((found.centroids[found.assignments] - weights).norm() / weights.norm())
    # Lloyd-Max 16-level quantiser of a Gaussian: distortion 0.009497 sigma^2 -> relative error 0.0975.
    assert error == pytest.approx(0.0975, abs=0.001)


def test_pack_roundtrip_with_padding():
    for bits in (1, 2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 7), generator=torch.Generator().manual_seed(bits))
        packed = pack_indices(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-21 * bits // 8)
        assert torch.equal(unpack_indices(packed, bits, 21).view(3, 7), codes)
    assert pack_indices(torch.tensor([1, 2, 15, 0]), 4).tolist() == [1 + 2 * 16, 15]  # low nibble first


# --- the pass -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
def test_more_clusters_never_increase_error(init):
    errors = []
    for bits in range(1, 9):
        model = tiny_gpt2()
        record = apply(model, ClusterConfig(targets=r"transformer\.h\.0\.mlp\.c_fc", bits=bits, init=init), ctx())
        errors.append(record["layers"][0]["rel_error"])
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.5 and errors[-1] < 0.02


@torch.no_grad()
def test_gpt2_conv1d_and_fused_qkv_lossless_at_k_values():
    model = tiny_gpt2()
    share_values(model, 16)
    before = logits(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight.clone()  # Conv1D: (in 64, out 192)
    record = apply(model, ClusterConfig(bits=4, init="density"), ctx())
    assert [layer["name"] for layer in record["layers"]] == [
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert all(layer["rel_error"] == 0.0 for layer in record["layers"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, ClusteredLinear) and (layer.out_features, layer.in_features) == (192, 64)
    assert torch.equal(layer.to_dense(), c_attn.T)
    assert torch.allclose(logits(model), before, atol=1e-5)
    expected = {"shape": [192, 64], "clusters": 16, "init": "density", "bits": 4, "index_bits": 4,
                "index_storage": "uint8, 2 per byte", "index_bytes": 192 * 64 // 2, "codebook_bytes": 16 * 4,
                "bytes_before": 192 * 64 * 4, "bytes_after": 192 * 64 // 2 + 16 * 4}
    assert {key: record["layers"][0][key] for key in expected} == expected
    assert record["bytes_after"] == sum(x["bytes_after"] for x in record["layers"])
    assert record["ratio"] == pytest.approx(record["bytes_after"] / record["bytes_before"], abs=1e-6)


@torch.no_grad()
def test_llama_lossy_layers_match_their_dense_weights():
    model = tiny_llama()
    embedding = model.model.embed_tokens.weight.clone()
    record = apply(model, ClusterConfig(clusters=20, layers=[1], exclude=r".*\.o_proj"), ctx())
    assert len(record["layers"]) == 6  # q, k, v (GQA: 32 out), gate, up, down of block 1
    k_proj = next(x for x in record["layers"] if x["name"].endswith("k_proj"))
    assert k_proj["shape"] == [32, 64] and k_proj["index_storage"] == "uint8" and k_proj["bits"] == 5
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # layer filter respected
    assert isinstance(model.model.layers[1].self_attn.o_proj, nn.Linear)  # exclude respected
    reference = tiny_llama()
    for x in record["layers"]:
        dense = reference.get_submodule(x["name"]).weight
        clustered = model.get_submodule(x["name"])
        error = float((clustered.to_dense() - dense).norm() / dense.norm())
        assert x["rel_error"] == pytest.approx(error, abs=1e-6) and 0.01 < error < 0.2
        assert clustered.codebook.unique().numel() == 20
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.allclose(logits(model), logits(densified(model)), atol=1e-5)


@torch.no_grad()
def test_bert_encoder_lossless_at_k_values():
    model = tiny_bert()
    share_values(model, 4)
    before = logits(model)
    record = apply(model, ClusterConfig(bits=2), ctx())
    assert len(record["layers"]) == 12  # query, key, value, attention out, intermediate, out x 2 blocks
    assert all(x["rel_error"] == 0.0 and x["index_storage"] == "uint8, 4 per byte" for x in record["layers"])
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_centroids_train_and_indices_stay():
    model = tiny_llama()
    apply(model, ClusterConfig(bits=3, targets=r".*\.mlp\.up_proj"), ctx())
    layer = model.model.layers[0].mlp.up_proj
    codebook, packed = layer.codebook.detach().clone(), layer.indices.clone()
    assert [name for name, _ in layer.named_parameters()] == ["codebook"]  # Llama: no bias
    model.train()
    model(IDS, labels=IDS).loss.backward()
    # The centroid gradient is the summed weight gradient over its cluster (Deep Compression).
    dense = layer.to_dense().requires_grad_(True)
    x = torch.randn(5, 64)
    layer.codebook.grad = None
    (layer(x) ** 2).sum().backward()
    (torch.nn.functional.linear(x, dense) ** 2).sum().backward()
    by_cluster = torch.zeros(8).index_add_(0, layer.assignments().flatten(), dense.grad.flatten())
    assert torch.allclose(layer.codebook.grad, by_cluster, atol=1e-4)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(layer.codebook.detach(), codebook)
    assert torch.equal(layer.indices, packed)


def test_tied_lm_head_is_refused_then_untied_on_request():
    model = tiny_llama()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, ClusterConfig(targets="lm_head", bits=4), ctx())
    assert str(info.value) == (
        "cluster.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to cluster it alone (the other stays dense)"
    )
    record = apply(model, ClusterConfig(targets="lm_head", bits=4, tied_embeddings="untie"), ctx())
    assert record["untied"] == ["lm_head"] and model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head, ClusteredLinear) and isinstance(model.model.embed_tokens, nn.Embedding)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"clusters": 300}, ".clusters: input should be less than or equal to 256, got 300"),
        ({"clusters": 1}, ".clusters: input should be greater than or equal to 2, got 1"),
        ({"bits": 9}, ".bits: input should be less than or equal to 8, got 9"),
        ({"bits": 0}, ".bits: input should be greater than or equal to 1, got 0"),
        ({"clusters": 16, "bits": 4}, ": set clusters (2..256) or bits (1..8), not both, got {'clusters': 16, 'bits': 4}"),
        ({}, ": set clusters (2..256) or bits (1..8), got {}"),
        ({"bits": 4, "init": "kmeans"}, ".init: input should be 'forgy', 'density' or 'linear', got 'kmeans'"),
    ],
)
def test_bad_config_is_one_line(body, message):
    assert stage_error("cluster", body) == message


def test_targets_that_match_nothing_or_too_small_layers():
    with pytest.raises(LlmshrinkError, match=r"^targets: 'nothing' matches no Linear/Conv1D layer; layer names "):
        apply(tiny_gpt2(), ClusterConfig(targets="nothing", bits=4), ctx())
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(LlmshrinkError) as info:
        apply(model, ClusterConfig(targets="0", clusters=16), ctx())
    assert str(info.value) == "cluster: 0: 16 clusters for a layer of only 12 weights"


# --- storage and checkpoints --------------------------------------------------------------------


def test_packed_indices_halve_the_bytes_on_disk(tmp_path):
    outs = {}
    for name, cfg in {"dense": None, "k17": ClusterConfig(clusters=17), "k16": ClusterConfig(clusters=16)}.items():
        model = tiny_llama()
        if cfg is not None:
            apply(model, cfg, ctx())
        outs[name] = save_tiny(model, tmp_path / name)
    block_weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 192)  # q, o, k, v, gate, up, down x 2 blocks
    assert tensor_bytes(outs["k17"], ".indices") == block_weights  # one uint8 per index
    assert tensor_bytes(outs["k16"], ".indices") == block_weights // 2  # two 4-bit indices per byte
    assert tensor_bytes(outs["k16"], ".codebook") == 14 * 16 * 4
    size = {name: (out / "model.safetensors").stat().st_size for name, out in outs.items()}
    saved = size["dense"] - size["k16"]
    assert saved >= block_weights * 3.5 - 14 * 16 * 4 - 4096  # 4 bytes -> half a byte per weight (+ header)
    assert size["k16"] < size["k17"] < size["dense"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """GPT-2 (4-bit packed), Llama (200 clusters: one uint8 per index) and BERT (3 bits), clustered and saved."""
    return apply_and_save(tmp_path_factory.mktemp("clustered"), apply, {
        "gpt2": ClusterConfig(bits=4), "llama": ClusterConfig(clusters=200, init="forgy"), "bert": ClusterConfig(bits=3)})


def packed_indices(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if key.endswith(".indices")}


def test_checkpoints_reload_exactly(saved):
    for model, out, _ in saved.values():
        loaded = load_checkpoint(out)
        assert torch.equal(logits(loaded), logits(model))
        original, reloaded = packed_indices(model), packed_indices(loaded)
        assert original and reloaded.keys() == original.keys()
        assert all(t.dtype == torch.uint8 and torch.equal(t, original[k]) for k, t in reloaded.items())


CLUSTER_INDICES = """
def probe(model, name):
    return {k: v for k, v in model.state_dict().items() if k.endswith(".indices")}
"""


def test_remote_code_reloads_exactly_without_llmshrink(saved):
    reloaded = reload_without_llmshrink({name: out for name, (_, out, _) in saved.items()}, IDS,
                                        auto={name: auto for name, (_, _, auto) in saved.items()},
                                        layer="ClusteredLinear", probe=CLUSTER_INDICES)
    assert list(reloaded) == list(saved)
    for name, got in reloaded.items():
        model = saved[name][0]
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert got["layers"] and all(module.startswith(f"transformers_modules.{name}.")
                                     and module.endswith(".clustered") for module in got["layers"])
        assert torch.equal(got["logits"], logits(model))
        remote, original = got["probe"], packed_indices(model)
        assert remote.keys() == original.keys() and all(torch.equal(remote[k], original[k]) for k in remote)
