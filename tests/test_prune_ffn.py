"""The prune_ffn pass on every family's tiny model: GPT-2 (Conv1D), Llama / Mistral / Qwen2 / Gemma 3 (SwiGLU,
tied embeddings) and BERT (encoder)."""

from __future__ import annotations

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
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_tokenizer,
)
from torch import nn

import llmshrink
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.families import supported
from llmshrink.modules.pruned import PrunedLinear
from llmshrink.passes.prune_ffn import (
    PruneFfnConfig,
    apply,
    calibration_scores,
    find_ffn_blocks,
    select_neurons,
)

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])


# (neurons per block, per-neuron parameters) of the tiny models: hidden 64; GPT-2/BERT have a c_fc bias, the
# SwiGLU ones (Llama, Mistral, Qwen2, Gemma 3: gate, up, down) none.
SHAPES = {"gpt2": (256, 2 * 64 + 1), "bert": (128, 2 * 64 + 1),
          **{family: (192, 3 * 64) for family in ("llama", "mistral", "qwen2", "gemma3")}}
SWIGLU = ("llama", "mistral", "qwen2", "gemma3")
# The Family each builder's model belongs to (what records say).


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits



@torch.no_grad()
def silence(model: nn.Module, counts: list[int], side: str, seed: int = 1) -> list[list[int]]:
    """Make `counts[i]` random neurons of block i contribute nothing; return their indices per block.

    side="output": zero their output-projection columns; side="input": zero their input rows and biases,
    so that their activation is act(0) = 0 (GELU, SiLU).
    """
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for block, count in zip(find_ffn_blocks(model), counts, strict=True):
        out = model.get_submodule(block.output)
        neurons = torch.randperm(out.weight.shape[0 if type(out).__name__ == "Conv1D" else 1], generator=gen)[:count]
        chosen.append(sorted(neurons.tolist()))
        if side == "output":
            if type(out).__name__ == "Conv1D":
                out.weight[neurons, :] = 0
            else:
                out.weight[:, neurons] = 0
            continue
        for name in block.inputs:
            layer = model.get_submodule(name)
            if type(layer).__name__ == "Conv1D":
                layer.weight[:, neurons] = 0
            else:
                layer.weight[neurons, :] = 0
            if layer.bias is not None:
                layer.bias[neurons] = 0
    return chosen


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_keep_one_leaves_model_unchanged(family):
    model = BUILDERS[family]()
    before, params = logits(model), n_params(model)
    record = apply(model, PruneFfnConfig(importance="magnitude", keep=1.0, scope="global"), calibrated())
    assert torch.equal(logits(model), before) and n_params(model) == params
    assert [(layer["kept"], layer["pruned"]) for layer in record["layers"]] == [(SHAPES[family][0], [])] * 2
    assert record["params_after"] == record["params_before"]


CASES = [(family, importance) for family in BUILDERS for importance in ("magnitude", "activation", "taylor")
         if (family, importance) != ("bert", "taylor")]


@pytest.mark.parametrize(("family", "importance"), CASES)
def test_pruning_silent_neurons_is_exact(family, importance):
    """Half the neurons contribute nothing; every criterion ranks them last and removing them is exact."""
    model = BUILDERS[family]()
    n, per_neuron = SHAPES[family]
    counts = [n // 4, 3 * n // 4]  # different per block: global scope keeps 3n/4 and n/4
    silent = silence(model, counts, "input" if importance == "activation" else "output")
    before, params = logits(model), n_params(model)
    record = apply(model, PruneFfnConfig(importance=importance, keep=0.5, scope="global"), calibrated())
    assert [layer["pruned"] for layer in record["layers"]] == silent
    assert [(layer["kept"], layer["total"]) for layer in record["layers"]] == [(3 * n // 4, n), (n // 4, n)]
    assert (logits(model) - before).abs().max().item() < 1e-5
    assert params - n_params(model) == n * per_neuron  # half of 2 blocks x n neurons
    assert record["params_before"] - record["params_after"] == n * per_neuron
    assert record["neurons_before"] == 2 * n and record["neurons_after"] == n
    assert record["importance"] == importance and record["family"] == FAMILY[family]
    first = find_ffn_blocks(model)[0]
    assert all(isinstance(model.get_submodule(name), PrunedLinear) for name in (*first.inputs, first.output))
    assert model.get_submodule(first.output).in_features == 3 * n // 4


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_parameter_count_drops_by_exactly_the_pruned_neurons(family):
    model = BUILDERS[family]()
    n, per_neuron = SHAPES[family]
    params = n_params(model)
    record = apply(model, PruneFfnConfig(importance="magnitude", keep=0.25), calibrated())
    assert [layer["kept"] for layer in record["layers"]] == [n // 4, n // 4]
    assert params - n_params(model) == 2 * (n - n // 4) * per_neuron
    assert logits(model).shape[-1] == 128  # still runs


def test_ratio_budgets_parameters_and_multiple_of_rounds_down():
    model = tiny_gpt2()
    record = apply(model, PruneFfnConfig(importance="magnitude", ratio=0.5), calibrated())
    # Per block: 256 neurons x 129 params + c_proj's 64-bias; keep n with 129 n + 64 <= 0.5 (256 x 129 + 64).
    assert [layer["kept"] for layer in record["layers"]] == [127, 127]
    assert all(layer["params_after"] <= 0.5 * layer["params_before"] for layer in record["layers"])
    assert record["layers"][0]["params_after"] == 127 * 129 + 64
    record = apply(tiny_gpt2(), PruneFfnConfig(importance="magnitude", keep=0.3, multiple_of=8), calibrated())
    assert [layer["kept"] for layer in record["layers"]] == [72, 72]  # 0.3 x 256 = 76.8 -> 72


def test_per_layer_and_global_budgets_on_hand_built_scores():
    scores = {"a": torch.tensor([8.0, 8, 8, 0]), "b": torch.tensor([4.0, 0, 0, 0])}

    def chosen(**kw):
        return {name: kept.tolist() for name, kept in select_neurons(scores, **kw).items()}

    # Per layer: half of each block, best first (ties keep the lower index).
    assert chosen(share=0.5, scope="per_layer") == {"a": [0, 1], "b": [0, 1]}
    # Global: scores divided by their block's mean (a: 4/3 each, b: 4 then 0) and ranked together.
    assert chosen(share=0.5, scope="global") == {"a": [0, 1, 2], "b": [0]}
    # Normalised: scaling one block's scores changes nothing.
    scores["b"] = scores["b"] * 1e6
    assert chosen(share=0.5, scope="global") == {"a": [0, 1, 2], "b": [0]}
    # min_keep is granted before the global ranking spends the rest.
    assert chosen(share=0.5, scope="global", min_keep=2) == {"a": [0, 1], "b": [0, 1]}
    assert chosen(share=0.25, scope="global", min_keep=1) == {"a": [0], "b": [0]}

    # multiple_of: neurons go in groups of 4 (ranked by their mean score); counts are multiples of 4.
    scores = {"steep": torch.arange(16, 0, -1).float(), "flat": torch.ones(16)}
    assert chosen(share=0.5, scope="per_layer", multiple_of=4) == {"steep": list(range(8)), "flat": list(range(8))}
    kept = select_neurons(scores, 0.3, "per_layer", multiple_of=4)  # 4.8 of 16 -> 4
    assert [k.numel() for k in kept.values()] == [4, 4]
    # Global, budget 12: the first group of each (min_keep 1 -> 4), then steep's second (mean 10.5/8.5 > 1).
    kept = select_neurons(scores, 12 / 32, "global", multiple_of=4)
    assert kept["steep"].tolist() == list(range(8)) and kept["flat"].tolist() == [0, 1, 2, 3]
    # A block size that is not a multiple: the remainder goes as a last, smaller group.
    kept = select_neurons({"x": torch.arange(10, 0, -1).float()}, 1.0, "per_layer", multiple_of=4)
    assert kept["x"].tolist() == list(range(10))


def test_layers_filter_prunes_only_those_blocks():
    model = tiny_llama()
    record = apply(model, PruneFfnConfig(importance="magnitude", keep=0.5, layers=[1]), calibrated())
    assert [layer["name"] for layer in record["layers"]] == ["model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[1].mlp.down_proj.in_features == 96


def test_calibration_reads_the_recipe_data_and_pruning_twice_composes(tiny_text):
    from llmshrink.specs import DataSpec

    model = tiny_llama()
    context = Context(tokenizer=tiny_tokenizer(), log=lambda _: None, data=DataSpec(source=str(tiny_text)))
    record = apply(model, PruneFfnConfig(importance="taylor", keep=0.5, calibration_tokens=100), context)
    assert record["calibration_tokens"] == 100 and [layer["kept"] for layer in record["layers"]] == [96, 96]
    record = apply(model, PruneFfnConfig(importance="activation", keep=0.5, calibration_tokens=100), context)
    assert [(layer["kept"], layer["total"]) for layer in record["layers"]] == [(48, 96), (48, 96)]
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (48, 64) and logits(model).isfinite().all()


@pytest.mark.parametrize("taylor", [False, True], ids=["activation", "taylor"])
def test_calibration_scores_match_a_plain_backward(taylor):
    """Mean |a| and Σ|a·∂L/∂a| (L: summed next-token loss) against retain_grad + backward on a copy."""
    frozen = tiny_gpt2().requires_grad_(False)  # the pass must cope with a frozen model
    blocks = find_ffn_blocks(frozen)
    ids = calibrated(tokens=200).train_token_ids()
    got = calibration_scores(frozen, blocks, ids, taylor=taylor)

    model, acts = tiny_gpt2(), []
    hooks = [model.get_submodule(b.output).register_forward_pre_hook(lambda m, a: acts.append(a[0]))
             for b in blocks]
    expected = [torch.zeros(256, dtype=torch.float64) for _ in blocks]
    for chunk in ids.split(128):  # window = min(256, tokens, n_positions = 128)
        acts.clear()
        out = model(chunk[None]).logits[0]
        for act in acts:
            act.retain_grad()
        nn.functional.cross_entropy(out[:-1], chunk[1:], reduction="sum").backward()
        for total, act in zip(expected, acts, strict=True):
            total += ((act * act.grad) if taylor else act).detach().abs().double().reshape(-1, 256).sum(0)
    for hook in hooks:
        hook.remove()
    for block, total in zip(blocks, expected, strict=True):
        want = total if taylor else total / ids.numel()
        assert torch.allclose(got[block.name], want, rtol=1e-4, atol=1e-9)


def test_pruned_linear_from_conv1d_and_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(3, 16)
    conv = Conv1D(8, 16)  # 16 -> 8, weight (16, 8)
    nn.init.normal_(conv.bias)
    full = PrunedLinear.from_linear(conv)
    assert torch.allclose(full(x), conv(x), atol=1e-6) and full.layout_args() == {
        "in_features": 16, "out_features": 8, "bias": True}
    rows = PrunedLinear.from_linear(conv, keep_out=torch.tensor([1, 5]))
    assert torch.allclose(rows(x), conv(x)[:, [1, 5]], atol=1e-6)
    linear = nn.Linear(16, 8, bias=False)
    cols = PrunedLinear.from_linear(linear, keep_in=torch.tensor([0, 3, 4]))
    assert torch.equal(cols.weight, linear.weight[:, [0, 3, 4]]) and cols.bias is None
    assert isinstance(cols, nn.Linear) and PrunedLinear(**cols.layout_args()).weight.shape == (8, 3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (pruned model, checkpoint dir)}, blocks keeping 3/4 and 1/4 of their neurons."""
    def prune(family, model):
        n = SHAPES[family][0]
        silence(model, [n // 4, 3 * n // 4], "output")
        return apply(model, PruneFfnConfig(importance="magnitude", keep=0.5, scope="global"), calibrated())

    return pruned_checkpoints(tmp_path_factory.mktemp("pruned"), "prune_ffn", prune)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_checkpoint_reloads_exactly_with_different_sizes_per_block(checkpoints, family):
    model, out = checkpoints[family]
    n = SHAPES[family][0]
    layout = json.loads((out / "config.json").read_text())["llmshrink_layout"]
    first, second = find_ffn_blocks(model)
    bias = family not in SWIGLU
    assert layout[first.output] == {"type": "PrunedLinear",
                                    "args": {"in_features": 3 * n // 4, "out_features": 64, "bias": bias}}
    assert layout[second.output]["args"] == {"in_features": n // 4, "out_features": 64, "bias": bias}
    assert layout[second.inputs[0]]["args"] == {"in_features": 64, "out_features": n // 4, "bias": bias}
    assert len(layout) == (6 if family in SWIGLU else 4)
    loaded = llmshrink.load(out)
    assert torch.equal(logits(loaded), logits(model))
    assert n_params(loaded) == n_params(model)


def test_checkpoint_reloads_through_remote_code_without_llmshrink(checkpoints):
    reloaded = reload_without_llmshrink({family: out for family, (_, out) in checkpoints.items()}, IDS, auto=AUTO,
                                        layer="PrunedLinear")
    assert list(reloaded) == list(BUILDERS)
    for family, got in reloaded.items():
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert all(module.startswith(f"transformers_modules.{family}.") and module.endswith(".pruned")
                   for module in got["layers"])
        assert len(got["layers"]) == (6 if family in SWIGLU else 4)
        assert torch.equal(got["logits"], logits(checkpoints[family][0]))


def test_unsupported_model_is_refused_in_one_line():
    with pytest.raises(LlmshrinkError) as err:
        apply(tiny_opt(), PruneFfnConfig(importance="magnitude"), calibrated())
    assert str(err.value) == f"prune_ffn: OPTForCausalLM (model_type 'opt') is not supported; supported: {supported()}"


def test_other_bad_input_gets_one_line():
    with pytest.raises(LlmshrinkError) as err:
        apply(tiny_bert(), PruneFfnConfig(importance="taylor"), calibrated())
    assert str(err.value) == (
        "prune_ffn.importance: 'taylor' needs a causal LM loss and BertForMaskedLM is an encoder; "
        "use 'activation' or 'magnitude'"
    )
    with pytest.raises(LlmshrinkError) as err:
        apply(tiny_gpt2(), PruneFfnConfig(importance="magnitude", layers=[5]), calibrated())
    assert str(err.value) == "prune_ffn.layers: [5] match no FFN block; GPT2LMHeadModel has blocks [0, 1]"


RECIPE = "name: t\nmodel: {id: some/dir}\nstages:\n  - prune_ffn: {%s}\noutput: {dir: out/t}\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("keep: 1.5", "stages[0].prune_ffn.keep: input should be less than or equal to 1, got 1.5"),
        ("keep: 0", "stages[0].prune_ffn.keep: input should be greater than 0, got 0"),
        ("ratio: -0.1", "stages[0].prune_ffn.ratio: input should be greater than 0, got -0.1"),
        ("keep: 0.5, ratio: 0.5", "stages[0].prune_ffn: value error, set keep (share of neurons) or ratio "
                                  "(share of FFN parameters), not both, got {'keep': 0.5, 'ratio': 0.5}"),
        ("scope: everywhere", "stages[0].prune_ffn.scope: input should be 'per_layer' or 'global', got 'everywhere'"),
        ("refit_tokens: 8", "stages[0].prune_ffn.refit_tokens: input should be greater than or equal to 16, got 8"),
    ],
)
def test_bad_config_is_one_line(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    assert recipe_error(path, RECIPE % body) == f"{path}: {message}"
