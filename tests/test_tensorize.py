"""TensorizedLinear (Tucker / CP / TT), its decompositions and the tensorize pass on GPT-2, Llama, BERT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tensorly as tl
import torch
from conftest import reload_without_llmshrink, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer
from pydantic import ValidationError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import llmshrink
from llmshrink.checkpoint import compressed_layout, save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.decompose.tensor_factor import balanced_factors, choose_ranks, decompose
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.tensorized import TensorizedLinear, factor_params, rank_limits
from llmshrink.passes.tensorize import TensorizeConfig, apply
from llmshrink.targeting import replace_module

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])
GPT2_ALL = r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc|mlp\.c_proj)"
SHAPE = ([6, 8], [5, 7])  # a 48x35 weight as a (6, 8, 5, 7) tensor
EXACT_RANKS = {"tucker": [2, 3, 2, 3], "cp": [3], "tt": [2, 3, 2]}


def ctx() -> Context:
    return Context(tokenizer=None, log=lambda _: None)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.detach() - y).norm() / y.norm())


def densified(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, TensorizedLinear):
            replace_module(model, name, module.to_linear())
    return model


def random_factors(method: str, ranks, seed: int = 0) -> list[torch.Tensor]:
    """Random factors in from_factors order, for a tensor of shape SHAPE."""
    gen = torch.Generator().manual_seed(seed)
    dims = SHAPE[0] + SHAPE[1]
    if method == "tucker":
        modes = [torch.randn(n, r, generator=gen) for n, r in zip(dims, ranks, strict=True)]
        return [torch.randn(*ranks, generator=gen), *modes]
    if method == "cp":
        return [torch.rand(ranks[0], generator=gen) + 0.5, *(torch.randn(n, ranks[0], generator=gen) for n in dims)]
    bonds = [1, *ranks, 1]
    return [torch.randn(bonds[k], n, bonds[k + 1], generator=gen) for k, n in enumerate(dims)]


def tensorly_tensor(method: str, factors) -> torch.Tensor:
    with tl.backend_context("pytorch", local_threadsafe=True):
        if method == "tucker":
            return tl.tucker_to_tensor((factors[0], factors[1:]))
        if method == "cp":
            return tl.cp_to_tensor((factors[0], factors[1:]))
        return tl.tt_to_tensor(factors)


# --- TensorizedLinear ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tucker", "cp", "tt"])
def test_layer_is_tensorlys_tensor_and_forward_paths_agree(method):
    factors = random_factors(method, EXACT_RANKS[method])
    layer = TensorizedLinear.from_factors(method, SHAPE, factors, bias=torch.randn(48))
    assert layer.layout_args() == {"in_features": 35, "out_features": 48, "method": method, "out_shape": [6, 8],
                                   "in_shape": [5, 7], "ranks": EXACT_RANKS[method], "bias": True}
    weight = tensorly_tensor(method, factors).reshape(48, 35)  # row-major (o1, o2) x (i1, i2)
    assert torch.allclose(layer.to_dense(), weight, atol=1e-5)
    x = torch.randn(3, 4, 35)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        factored = layer._factored(x.reshape(12, 35))
    assert torch.allclose(factored.reshape(3, 4, 48) + layer.bias, x @ weight.T + layer.bias, atol=1e-4)
    assert flops.get_total_flops() == 2 * 12 * layer.macs_per_row  # the cost model that picks the path is exact
    assert layer.macs_per_row < 48 * 35  # so a forward of any length goes through the factors
    assert torch.equal(layer(x), factored.reshape(3, 4, 48) + layer.bias)
    assert layer.factor_params() == factor_params(method, [6, 8, 5, 7], EXACT_RANKS[method])


def test_full_rank_forward_rebuilds_the_weight_for_long_inputs():
    layer = TensorizedLinear.from_factors("tucker", SHAPE, random_factors("tucker", [6, 8, 5, 7]))
    assert layer.macs_per_row > 48 * 35  # full Tucker costs more per row than the dense weight
    x = torch.randn(64, 35)
    with torch.no_grad():
        assert layer.bias is None and torch.equal(layer(x), x @ layer.to_dense().T)


# --- decompositions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "randomized"), [("tucker", False), ("tucker", True), ("tt", False),
                                                    ("tt", True), ("cp", False)])
def test_exact_low_rank_tensor_is_recovered(method, randomized):
    weight = tensorly_tensor(method, random_factors(method, EXACT_RANKS[method], seed=1)).reshape(48, 35)
    factors = decompose(weight, method, *SHAPE, EXACT_RANKS[method], randomized=randomized, n_iter_max=200)
    layer = TensorizedLinear.from_factors(method, SHAPE, factors)
    assert layer.ranks == EXACT_RANKS[method]
    assert rel(layer.to_dense(), weight) < 1e-4
    assert tl.get_backend() == "numpy"  # tensorly's global backend is left alone


def test_full_cp_rank_is_exact_by_construction():
    weight = torch.randn(48, 35)
    assert rank_limits("cp", [6, 8, 5, 7]) == [210]  # 6·5·7 fibres of the largest mode
    layer = TensorizedLinear.from_factors("cp", SHAPE, decompose(weight, "cp", *SHAPE, [210]))
    assert torch.allclose(layer.to_dense(), weight, atol=1e-6)


def test_shapes_and_ranks():
    assert balanced_factors(1536, 2) == [32, 48] and balanced_factors(576, 2) == [24, 24]
    assert balanced_factors(1536, 3) == [8, 12, 16] and balanced_factors(192, 2) == [12, 16]
    assert balanced_factors(131, 2) is None and balanced_factors(62, 3) is None
    dims = [32, 48, 24, 24]
    assert choose_ranks("tucker", dims, 30, None) == [30, 30, 24, 24]  # an int caps each mode
    assert choose_ranks("tt", dims, 10**6, None) == rank_limits("tt", dims) == [32, 576, 24]
    for method in ("tucker", "cp", "tt"):
        ranks = choose_ranks(method, dims, None, 0.1)
        budget = 0.1 * 1536 * 576
        assert factor_params(method, dims, ranks) <= budget
        bigger = [min(max(ranks) + 1, limit) for limit in rank_limits(method, dims)]
        assert factor_params(method, dims, bigger) > budget  # the largest uniform rank that fits


# --- the pass ---------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("method", ["tucker", "cp", "tt"])
def test_full_ranks_leave_gpt2_logits_unchanged(method):
    model = tiny_gpt2()
    before = model(IDS).logits
    record = apply(model, TensorizeConfig(targets=GPT2_ALL, method=method, rank=10**6), ctx())
    assert len(record["layers"]) == 6 and record["method"] == method
    qkv = record["layers"][0]
    assert qkv["name"] == "transformer.h.0.attn.c_attn" and qkv["shape"] == [192, 64]  # Conv1D, fused q,k,v
    assert qkv["tensor_shape"] == [[12, 16], [8, 8]] and qkv["ranks"] == rank_limits(method, [12, 16, 8, 8])
    assert all(layer["rel_error"] < 1e-5 for layer in record["layers"])
    assert torch.allclose(model(IDS).logits, before, atol=1e-5)
    layers = [m for m in model.modules() if isinstance(m, TensorizedLinear)]
    assert record["params_after"] == sum(layer.factor_params() for layer in layers)


@pytest.mark.parametrize("method", ["tucker", "cp", "tt"])
def test_ratio_fits_the_budget_and_shrinks_llama(method):
    model = tiny_llama()
    params = sum(p.numel() for p in model.parameters())
    cfg = TensorizeConfig(targets=r".*\.(q|k|v|o|gate|up|down)_proj", method=method, ratio=0.3, n_iter_max=3,
                          randomized=method != "cp")
    record = apply(model, cfg, ctx())
    assert len(record["layers"]) == 14
    for layer in record["layers"]:
        out_f, in_f = layer["shape"]
        dims = layer["tensor_shape"][0] + layer["tensor_shape"][1]
        assert math.prod(dims[:2]) == out_f and math.prod(dims[2:]) == in_f
        assert layer["params_after"] <= 0.3 * out_f * in_f < factor_params(
            method, dims, [min(max(layer["ranks"]) + 1, limit) for limit in rank_limits(method, dims)])
    k_proj = next(layer for layer in record["layers"] if layer["name"] == "model.layers.0.self_attn.k_proj")
    assert k_proj["shape"] == [32, 64] and k_proj["tensor_shape"] == [[4, 8], [8, 8]]  # GQA: 2 kv heads
    # Really smaller: the model lost exactly the dense weights and gained the factors (Llama has no biases).
    after = sum(p.numel() for p in model.parameters())
    assert params - after == record["params_before"] - record["params_after"] > 0.6 * record["params_before"]
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, densified(model)(IDS).logits, atol=1e-5)


@torch.no_grad()
def test_llama_exact_tt_weight_and_tied_lm_head():
    model = tiny_llama()
    gate = model.model.layers[0].mlp.gate_proj  # 192x64 -> (12, 16, 8, 8)
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(1, 12, 3, generator=gen), torch.randn(3, 16, 4, generator=gen),
             torch.randn(4, 8, 2, generator=gen), torch.randn(2, 8, 1, generator=gen)]
    gate.weight.copy_(tensorly_tensor("tt", cores).reshape(192, 64))
    record = apply(model, TensorizeConfig(targets=r".*gate_proj", layers=[0], method="tt", rank=[3, 4, 2]), ctx())
    assert record["layers"][0]["rel_error"] < 1e-5 and record["layers"][0]["params_after"] == 36 + 192 + 64 + 16
    with pytest.raises(LlmshrinkError) as info:
        apply(model, TensorizeConfig(targets="lm_head", rank=4), ctx())
    assert str(info.value) == (
        "tensorize.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to compress it alone (the other stays dense)"
    )
    embedding = model.model.embed_tokens.weight.detach().clone()
    record = apply(model, TensorizeConfig(targets="lm_head", rank=4, tied_embeddings="untie"), ctx())
    assert record["untied"] == ["lm_head"] and model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head, TensorizedLinear) and record["layers"][0]["tensor_shape"] == [[8, 16], [8, 8]]
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@torch.no_grad()
def test_bert_encoder_with_biases():
    model = tiny_bert()
    params = sum(p.numel() for p in model.parameters())
    cfg = TensorizeConfig(targets=r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense", method="tucker",
                          shape={128: [8, 16], 64: [8, 8]}, rank=6)
    record = apply(model, cfg, ctx())
    assert [layer["tensor_shape"] for layer in record["layers"][:2]] == [[[8, 16], [8, 8]], [[8, 8], [8, 16]]]
    assert all(layer["ranks"] == [6, 6, 6, 6] for layer in record["layers"])
    assert sum(p.numel() for p in model.parameters()) == params - record["params_before"] + record["params_after"]
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, TensorizedLinear) and layer.bias is not None
    assert torch.allclose(model(IDS).logits, densified(model)(IDS).logits, atol=1e-5)


# --- checkpoints -----------------------------------------------------------------------------------


def compressed_models() -> dict[str, nn.Module]:
    gpt2 = tiny_gpt2()
    apply(gpt2, TensorizeConfig(targets=GPT2_ALL, method="tucker", ratio=0.3, randomized=True, n_iter_max=2), ctx())
    llama = tiny_llama()
    apply(llama, TensorizeConfig(targets=r".*mlp\..*", method="tt", ratio=0.3), ctx())
    apply(llama, TensorizeConfig(targets=r".*self_attn\.(q|o)_proj", method="cp", rank=8, n_iter_max=2), ctx())
    return {"gpt2": gpt2, "llama": llama}


def save(model: nn.Module, out: Path) -> Path:
    recipe = "name: tiny\noutput: {dir: out/tiny}\n"
    return save_checkpoint(model, tiny_tokenizer(), out, recipe_text=recipe, manifest={"name": "tiny"},
                           model_card="# tiny\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The compressed models and their checkpoint dirs (built once: the two tests below read them)."""
    tmp = tmp_path_factory.mktemp("tensorized")
    models = compressed_models()
    return models, {name: save(model, tmp / name) for name, model in models.items()}


def test_checkpoint_reloads_exactly_through_llmshrink(saved):
    models, outs = saved
    methods = {spec["args"]["method"] for spec in compressed_layout(models["llama"]).values()}
    assert methods == {"tt", "cp"}
    for name, model in models.items():
        loaded = load_checkpoint(outs[name])
        assert compressed_layout(loaded) == compressed_layout(model)
        assert set(loaded.state_dict()) == set(model.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        assert (outs[name] / "tensorized.py").read_text() == Path(llmshrink.modules.tensorized.__file__).read_text()


def test_checkpoint_reloads_exactly_through_remote_code(saved):
    models, outs = saved
    reloaded = reload_without_llmshrink(outs, IDS, layer="TensorizedLinear")
    assert list(reloaded) == ["gpt2", "llama"]
    for name, got in reloaded.items():
        assert got["layers"] and all(module.startswith(f"transformers_modules.{name}.")
                                     and module.endswith(".tensorized") for module in got["layers"])
        with torch.no_grad():
            assert torch.equal(got["logits"], models[name](IDS).logits)


# --- errors ------------------------------------------------------------------------------------------


class PrimeMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(64, 131))


def test_unfactorable_dimension_is_one_line_with_the_fix():
    with pytest.raises(LlmshrinkError) as info:
        apply(PrimeMLP(), TensorizeConfig(targets=r"mlp\.0", rank=4), ctx())
    assert str(info.value) == (
        "tensorize: mlp.0 (131x64): out_features 131 cannot split into 2 factors > 1 (131 = 131); "
        "set shape: {131: [131]} to keep it one mode, or exclude the layer"
    )
    record = apply(PrimeMLP(), TensorizeConfig(targets=r"mlp\.0", rank=4, shape={131: [131]}), ctx())
    assert record["layers"][0]["tensor_shape"] == [[131], [8, 8]] and record["layers"][0]["ranks"] == [4, 4]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"method": "tucker", "rank": [4, 4, 4, 9]},
         "tensorize: transformer.h.0.mlp.c_fc (256x64): tucker rank [4, 4, 4, 9] is too large for tensor "
         "[16, 16, 8, 8]: mode 3 has size 8"),
        ({"method": "cp", "rank": [1025]},
         "tensorize: transformer.h.0.mlp.c_fc (256x64): cp rank [1025] is too large for tensor [16, 16, 8, 8]: "
         "rank 1024 is exact already"),
        ({"method": "tt", "rank": [16, 300, 8]},
         "tensorize: transformer.h.0.mlp.c_fc (256x64): tt rank [16, 300, 8] is too large for tensor "
         "[16, 16, 8, 8]: bond 1 allows at most 64"),
        ({"method": "tt", "rank": [2, 40, 8]},
         "tensorize: transformer.h.0.mlp.c_fc (256x64): tt rank [2, 40, 8] is too large for tensor "
         "[16, 16, 8, 8]: bond 1 allows at most 2 x 16 = 32 after bond 0"),
        ({"method": "tt", "rank": [4, 4], "shape": {256: [16, 4, 4]}},  # modes per layer: known only here
         "tensorize: transformer.h.0.mlp.c_fc (256x64): rank [4, 4] has 2 entries; tt on the 5-mode tensor "
         "[16, 4, 4, 8, 8] needs 4 (one per bond between neighbouring modes)"),
        ({"method": "tucker", "ratio": 0.001},
         "tensorize: transformer.h.0.mlp.c_fc (256x64): ratio 0.001 allows 16 parameters; tucker on tensor "
         "[16, 16, 8, 8] needs 49 at rank 1"),
        ({"shape": [[16, 16], [8, 8]]},
         "tensorize: transformer.h.0.mlp.c_proj (64x256): shape [[16, 16], [8, 8]] gives a 256x64 weight, layer "
         "is 64x256; give a mapping {dimension: factors} for layers of different shapes"),
    ],
    ids=["tucker-rank", "cp-rank", "tt-rank", "tt-bond", "rank-entries", "ratio", "shape"],
)
def test_bad_shapes_and_ranks_are_one_line(cfg, message):
    model = tiny_gpt2()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, TensorizeConfig(targets=r"transformer\.h\.0\.mlp\.c_(fc|proj)", **cfg), ctx())
    assert str(info.value) == message
    assert not any(isinstance(m, TensorizedLinear) for m in model.modules())  # checked before any change


def test_config_and_targets_errors():
    with pytest.raises(LlmshrinkError, match=r"^targets: 'nothing' matches no Linear/Conv1D layer; layer names "
                                             r"look like transformer\.h\.0\.attn\.c_attn, "):
        apply(tiny_gpt2(), TensorizeConfig(targets="nothing"), ctx())
    with pytest.raises(ValidationError, match="set rank or ratio, not both"):
        TensorizeConfig(rank=4, ratio=0.5)
    with pytest.raises(ValidationError, match=r"shape: factors \[8, 8\] must be positive integers whose product is 128"):
        TensorizeConfig(shape={128: [8, 8]})
    with pytest.raises(ValidationError, match="method"):
        TensorizeConfig(method="svd")
    # The mode count follows from the config alone, so a wrong number of ranks fails when the recipe is read.
    with pytest.raises(ValidationError, match=r"rank \[4, 4\] has 2 entries; tt on a 4-mode tensor needs 3 \(one "
                                              r"per bond between neighbouring modes\)"):
        TensorizeConfig(method="tt", rank=[4, 4])
    with pytest.raises(ValidationError, match=r"rank \[2, 2\] has 2 entries; tucker on a 3-mode tensor needs 3"):
        TensorizeConfig(method="tucker", rank=[2, 2], shape=[[16, 16], [64]])
