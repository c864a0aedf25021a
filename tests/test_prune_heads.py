"""The prune_heads pass on every family's tiny model: GPT-2 (fused c_attn), Llama / Mistral / Qwen2 / Gemma 3 (GQA:
4 query heads, 2 kv groups; Qwen2 with q/k/v biases) and BERT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    AUTO,
    BUILDERS,
    FAMILY,
    calibrated,
    n_params,
    pruned_checkpoints,
    recipe_error,
    reload_without_llmshrink,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_tokenizer,
)
from torch import nn

import llmshrink
from llmshrink.checkpoint import module_attrs, save_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.families import supported
from llmshrink.modules.pruned import PrunedLinear
from llmshrink.passes.prune_heads import (
    PruneHeadsConfig,
    apply,
    calibration_scores,
    find_attention_blocks,
    select_units,
)

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])


# Pruning units per layer (kv groups), query heads per unit, and the parameters one unit holds. Hidden 64,
# head size 16. GPT-2/BERT: q, k, v rows with biases + output columns (the output bias stays). Llama, Mistral,
# Gemma 3 (no biases): 2 query heads' q rows and o columns + one kv group's k and v rows; Qwen2 adds the q, k
# and v biases of those rows.
UNITS = {"gpt2": (4, 1, 3 * 16 * 65 + 16 * 64), "bert": (4, 1, 3 * 16 * 65 + 16 * 64),
         "llama": (2, 2, 2 * 32 * 64 + 2 * 16 * 64), "mistral": (2, 2, 2 * 32 * 64 + 2 * 16 * 64),
         "qwen2": (2, 2, 32 * 65 + 32 * 64 + 2 * 16 * 65), "gemma3": (2, 2, 2 * 32 * 64 + 2 * 16 * 64)}
GQA = ("llama", "mistral", "qwen2", "gemma3")


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits



def rows(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight as a view, so that writing into it changes the layer (Conv1D stores it transposed)."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


@torch.no_grad()
def silence(model: nn.Module, units: list[list[int]], weights: bool = False) -> None:
    """Zero the output-projection columns of `units[i]` of layer i, so that they contribute nothing; with
    weights=True also their query/key/value rows and biases (then their weights' norm is 0 as well)."""
    for block, chosen in zip(find_attention_blocks(model), units, strict=True):
        d, g = block.head_dim, block.group
        q = [(u * g + r) * d + i for u in chosen for r in range(g) for i in range(d)]
        kv = [u * d + i for u in chosen for i in range(d)]
        rows(model.get_submodule(block.output))[:, q] = 0
        if not weights:
            continue
        if block.fused:  # GPT-2's c_attn: q | k | v blocks of 64 features, one head each per group
            c_attn = model.get_submodule(block.qkv[0])
            fused = [offset + i for offset in (0, 64, 128) for i in q]
            rows(c_attn)[fused] = 0
            c_attn.bias[fused] = 0
            continue
        for name, index in zip(block.qkv, (q, kv, kv), strict=True):
            layer = model.get_submodule(name)
            layer.weight[index] = 0
            if layer.bias is not None:
                layer.bias[index] = 0


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_keep_one_leaves_model_unchanged(family):
    model = BUILDERS[family]()
    before, params = logits(model), n_params(model)
    units, group, _ = UNITS[family]
    record = apply(model, PruneHeadsConfig(importance="magnitude", keep=1.0, scope="global"), calibrated())
    assert torch.equal(logits(model), before) and n_params(model) == params
    assert [(layer["heads_kept"], layer["removed_heads"]) for layer in record["layers"]] == [(4, [])] * 2
    assert record["params_after"] == record["params_before"] and record["model_params_after"] == params
    record = apply(model, PruneHeadsConfig(importance="magnitude", heads_per_layer=4), calibrated())
    assert torch.equal(logits(model), before) and record["heads_kept"] == [4, 4]
    assert not module_attrs(model) and not any(isinstance(m, PrunedLinear) for m in model.modules())


CASES = [(family, importance) for family in BUILDERS for importance in ("output_norm", "taylor", "magnitude")
         if (family, importance) != ("bert", "taylor")]


@pytest.mark.parametrize(("family", "importance"), CASES)
def test_pruning_silent_heads_is_exact(family, importance):
    """Half the heads contribute nothing; every criterion ranks them last and removing them is exact."""
    model = BUILDERS[family]()
    units, group, per_unit = UNITS[family]
    # Different per layer: the global budget keeps 3 and 1 of 4 heads (GPT-2, BERT), 1 of 2 groups (Llama).
    silent = [[1], [0]] if family in GQA else [[1], [0, 2, 3]]
    silence(model, silent, weights=importance == "magnitude")
    before, params = logits(model), n_params(model)
    record = apply(model, PruneHeadsConfig(importance=importance, keep=0.5, scope="global"), calibrated())
    assert (logits(model) - before).abs().max().item() < 1e-5
    assert [layer["removed_kv_groups"] for layer in record["layers"]] == silent
    removed = [[u * group + r for u in units_ for r in range(group)] for units_ in silent]
    assert [layer["removed_heads"] for layer in record["layers"]] == removed
    lost = sum(len(s) for s in silent) * per_unit
    assert params - n_params(model) == lost == record["params_before"] - record["params_after"]
    assert record["model_params_before"] - record["model_params_after"] == lost
    assert record["heads_before"] == 8 and record["heads_after"] == 4 == sum(record["heads_kept"])
    assert record["importance"] == importance and record["family"] == FAMILY[family]
    assert record["normalize"] == ("none" if importance == "taylor" else "layer_mean")  # auto
    first = find_attention_blocks(model)[0]
    assert all(isinstance(model.get_submodule(n), PrunedLinear) for n in (*first.qkv, first.output))
    attention = model.get_submodule(first.name)
    if family == "gpt2":
        assert record["heads_kept"] == [3, 1]
        assert first.heads == attention.num_heads == 3 and attention.split_size == 48
        assert model.get_submodule(first.qkv[0]).weight.shape == (3 * 48, 64)
    elif family == "bert":
        assert attention.num_attention_heads == 3 and attention.all_head_size == 48
    else:  # GQA: whole groups go, so 2 query heads per kv head still
        assert record["heads_kept"] == [2, 2] and attention.num_key_value_groups == 2
        assert model.get_submodule(first.qkv[0]).out_features == 32
        assert model.get_submodule(first.qkv[1]).out_features == 16
        assert [layer["kv_groups_kept"] for layer in record["layers"]] == [1, 1]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_heads_per_layer_and_at_least_one_unit(family):
    units, group, per_unit = UNITS[family]
    model = BUILDERS[family]()
    params = n_params(model)
    record = apply(model, PruneHeadsConfig(importance="magnitude", heads_per_layer=2), calibrated())
    assert record["heads_kept"] == [2, 2] and record["scope"] == "per_layer"
    assert params - n_params(model) == 2 * (units - 2 // group) * per_unit
    # keep 0.1 of 2-4 units rounds to none: every layer keeps its best unit all the same.
    model = BUILDERS[family]()
    record = apply(model, PruneHeadsConfig(importance="magnitude", keep=0.1), calibrated())
    assert [layer["kv_groups_kept"] for layer in record["layers"]] == [1, 1]
    assert logits(model).isfinite().all()


def test_per_layer_and_global_budgets_on_hand_built_scores():
    scores = {"a": torch.tensor([8.0, 8, 8, 0]), "b": torch.tensor([4.0, 0, 0, 0]), "c": torch.tensor([1.0, 2])}

    def chosen(keep, scope, normalize="layer_mean"):
        return {name: kept.tolist() for name, kept in select_units(scores, keep, scope, normalize).items()}

    # Per layer: floor(keep x units), at least one, best first (ties keep the lower index).
    assert chosen(0.5, "per_layer") == {"a": [0, 1], "b": [0, 1], "c": [1]}
    assert chosen(0.1, "per_layer") == {"a": [0], "b": [0], "c": [1]}
    assert chosen(0.7, "per_layer")["a"] == [0, 1]  # 2.8 -> 2
    # Global, 5 of 10: each layer's best first, then the rest by score over the layer mean (a: 4/3 each,
    # b: 0, c: 2/3); raw scores instead: a's 8s.
    assert chosen(0.5, "global") == {"a": [0, 1, 2], "b": [0], "c": [1]}
    assert chosen(0.6, "global") == {"a": [0, 1, 2], "b": [0], "c": [0, 1]}
    scores["c"] = torch.tensor([10.0, 20])
    assert chosen(0.5, "global") == {"a": [0, 1, 2], "b": [0], "c": [1]}  # normalised: scale-free
    assert chosen(0.5, "global", "none") == {"a": [0, 1], "b": [0], "c": [0, 1]}  # raw: c's 10 beats a's 8s
    assert chosen(0.1, "global") == {"a": [0], "b": [0], "c": [1]}  # never fewer than one per layer


def test_layers_filter_and_pruning_twice_composes(tiny_text):
    from llmshrink.specs import DataSpec

    model = tiny_gpt2()
    record = apply(model, PruneHeadsConfig(importance="magnitude", keep=0.5, layers=[1]), calibrated())
    assert [layer["name"] for layer in record["layers"]] == ["transformer.h.1.attn"]
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    # Again, on both layers, scored on the recipe's data: layer 1 now has 2 heads and keeps 1.
    context = Context(tokenizer=tiny_tokenizer(), log=lambda _: None, data=DataSpec(source=str(tiny_text)))
    before = n_params(model)
    record = apply(model, PruneHeadsConfig(importance="taylor", keep=0.5, calibration_tokens=100), context)
    assert record["calibration_tokens"] == 100
    assert [(layer["heads_kept"], layer["heads_total"]) for layer in record["layers"]] == [(2, 4), (1, 2)]
    assert before - n_params(model) == 3 * UNITS["gpt2"][2]
    assert module_attrs(model) == {"transformer.h.0.attn": {"num_heads": 2, "split_size": 32},
                                   "transformer.h.1.attn": {"num_heads": 1, "split_size": 16}}
    assert logits(model).isfinite().all()


@torch.no_grad()
def test_output_norm_is_the_mean_norm_of_each_heads_projected_output():
    """Against the output of c_proj (Conv1D) restricted to one head's rows, without its bias."""
    model = tiny_gpt2()
    blocks = find_attention_blocks(model)
    ids = calibrated(tokens=100).train_token_ids()  # one window
    got = calibration_scores(model, blocks, ids, taylor=False)
    for block in blocks:
        for head in range(4):
            copied = copy.deepcopy(model)
            c_proj = copied.get_submodule(block.output)
            others = [i for i in range(64) if i // 16 != head]
            c_proj.weight[others] = 0  # Conv1D: (in, out); input features are rows
            c_proj.bias.zero_()
            outs = []
            c_proj.register_forward_hook(lambda m, a, out, outs=outs: outs.append(out))
            copied(ids[None])
            want = outs[0].double().norm(dim=-1).mean()
            assert torch.allclose(got[block.name][head], want, rtol=1e-5)


def test_taylor_is_the_loss_derivative_along_a_head_gate():
    """|dL/dg| against a central difference of the summed next-token loss, scaling a kv group's o_proj columns."""
    model = tiny_llama().double()
    blocks = find_attention_blocks(model)
    ids = calibrated(tokens=60).train_token_ids()  # one window
    got = calibration_scores(model.requires_grad_(False), blocks, ids, taylor=True)

    @torch.no_grad()
    def loss(block, unit, scale):
        copied = copy.deepcopy(model)
        copied.get_submodule(block.output).weight[:, unit * 32 : (unit + 1) * 32] *= scale
        out = copied(ids[None]).logits[0]
        return nn.functional.cross_entropy(out[:-1], ids[1:], reduction="sum").item()

    # Llama's RMSNorm computes in float32 even in a float64 model: a step of 1e-3 keeps its noise small.
    eps = 1e-3
    for block in blocks:
        for unit in range(2):
            want = abs(loss(block, unit, 1 + eps) - loss(block, unit, 1 - eps)) / (2 * eps)
            assert abs(got[block.name][unit].item() - want) < 1e-4
    assert all(p.grad is None for p in model.parameters())


HEADS = """
def probe(model, name):
    attn = [m for m in model.modules() if type(m).__name__ in ("GPT2Attention", "BertSelfAttention")]
    return ",".join(str(getattr(m, "num_heads", getattr(m, "num_attention_heads", None))) for m in attn) or "-"
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (pruned model, checkpoint dir)}: layers keeping 3 and 1 heads (Llama: 1 of 2 groups each)."""
    def prune(family, model):
        silence(model, [[1], [0]] if family in GQA else [[1], [0, 2, 3]])
        return apply(model, PruneHeadsConfig(keep=0.5, scope="global"), calibrated())

    return pruned_checkpoints(tmp_path_factory.mktemp("pruned_heads"), "prune_heads", prune)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_checkpoint_reloads_exactly_with_different_heads_per_layer(checkpoints, family, tmp_path):
    model, out = checkpoints[family]
    config = json.loads((out / "config.json").read_text())
    expected_attrs = {
        "gpt2": {"transformer.h.0.attn": {"num_heads": 3, "split_size": 48},
                 "transformer.h.1.attn": {"num_heads": 1, "split_size": 16}},
        "bert": {"bert.encoder.layer.0.attention.self": {"num_attention_heads": 3, "all_head_size": 48},
                 "bert.encoder.layer.1.attention.self": {"num_attention_heads": 1, "all_head_size": 16}},
    }.get(family, {})  # Llama-style attention reshapes by head size: nothing to restore
    assert config.get("llmshrink_module_attrs", {}) == expected_attrs == module_attrs(model)
    assert len(config["llmshrink_layout"]) == (4 if family == "gpt2" else 8)
    loaded = llmshrink.load(out)
    assert torch.equal(logits(loaded), logits(model))
    assert n_params(loaded) == n_params(model) and module_attrs(loaded) == expected_attrs
    # A reloaded model saves (and reloads) the same way again.
    again = save_checkpoint(loaded, None, tmp_path / "again", recipe_text="x\n", manifest={}, model_card="c")
    assert torch.equal(logits(llmshrink.load(again)), logits(model))


def test_checkpoint_reloads_through_remote_code_without_llmshrink(checkpoints):
    reloaded = reload_without_llmshrink({family: out for family, (_, out) in checkpoints.items()}, IDS, auto=AUTO,
                                        layer="PrunedLinear", probe=HEADS)
    assert list(reloaded) == list(BUILDERS)
    heads = {"gpt2": "3,1", "bert": "3,1"}
    for family, got in reloaded.items():
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert got["layers"] and all(module.startswith(f"transformers_modules.{family}.")
                                     and module.endswith(".pruned") for module in got["layers"])
        assert got["probe"] == heads.get(family, "-")
        assert torch.equal(got["logits"], logits(checkpoints[family][0]))


def test_unsupported_model_is_refused_in_one_line():
    with pytest.raises(LlmshrinkError) as err:
        apply(tiny_opt(), PruneHeadsConfig(importance="magnitude"), calibrated())
    assert str(err.value) == (
        f"prune_heads: OPTForCausalLM (model_type 'opt') is not supported; supported: {supported()}"
    )


@pytest.mark.parametrize(
    ("family", "cfg", "message"),
    [
        ("gpt2", {"heads_per_layer": 5},
         "prune_heads.heads_per_layer: 5 exceeds the 4 heads of transformer.h.0.attn"),
        ("llama", {"heads_per_layer": 3},
         "prune_heads.heads_per_layer: 3 is not a multiple of 2, the query heads per kv group of "
         "model.layers.0.self_attn (heads are removed with their kv group)"),
        ("bert", {"importance": "taylor"},
         "prune_heads.importance: 'taylor' needs a causal LM loss and BertForMaskedLM is an encoder; "
         "use 'output_norm' or 'magnitude'"),
        ("gpt2", {"layers": [5]},
         "prune_heads.layers: [5] match no attention block; GPT2LMHeadModel has blocks [0, 1]"),
    ],
)
def test_bad_input_gets_one_line(family, cfg, message):
    with pytest.raises(LlmshrinkError) as err:
        apply(BUILDERS[family](), PruneHeadsConfig(**cfg), calibrated())
    assert str(err.value) == message


def test_replaced_projection_is_refused_in_one_line():
    from llmshrink.modules import KroneckerLinear

    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = KroneckerLinear.from_linear(attn.q_proj, (8, 8), (8, 8), rank=1)
    with pytest.raises(LlmshrinkError) as err:
        apply(model, PruneHeadsConfig(importance="magnitude"), calibrated())
    assert str(err.value) == (
        "prune_heads: model.layers.0.self_attn.q_proj is a KroneckerLinear, not Linear/Conv1D; "
        "run prune_heads before passes that replace it"
    )


RECIPE = "name: t\nmodel: {id: some/dir}\nstages:\n  - prune_heads: {%s}\noutput: {dir: out/t}\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("keep: 1.5", "stages[0].prune_heads.keep: input should be less than or equal to 1, got 1.5"),
        ("keep: 0", "stages[0].prune_heads.keep: input should be greater than 0, got 0"),
        ("heads_per_layer: 0", "stages[0].prune_heads.heads_per_layer: input should be greater than or equal to 1, "
                               "got 0"),
        ("keep: 0.5, heads_per_layer: 2", "stages[0].prune_heads: value error, set keep (share of heads) or "
                                          "heads_per_layer, not both, got {'keep': 0.5, 'heads_per_layer': 2}"),
        ("heads_per_layer: 2, scope: global", "stages[0].prune_heads: value error, heads_per_layer fixes every "
                                              "layer's count; use keep with scope: global, got "
                                              "{'heads_per_layer': 2, 'scope': 'global'}"),
        ("importance: entropy", "stages[0].prune_heads.importance: input should be 'output_norm', 'taylor' or "
                                "'magnitude', got 'entropy'"),
    ],
)
def test_bad_config_is_one_line(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    assert recipe_error(path, RECIPE % body) == f"{path}: {message}"
