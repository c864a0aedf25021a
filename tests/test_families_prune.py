"""prune_ffn and prune_heads across the families: block names, targets / exclude, and unit: query_head (query
heads pruned inside their kv group, e.g. Gemma 3 270M with one key-value head), on eager and sdpa attention."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import DECODER_BUILDERS, calibrated, n_params, reload_without_llmshrink, save_tiny, tiny_bert
from torch import nn

import llmshrink
from llmshrink.errors import LlmshrinkError, RecipeError
from llmshrink.modules.pruned import PrunedLinear
from llmshrink.passes import prune_ffn, prune_heads
from llmshrink.passes.prune_ffn import PruneFfnConfig, find_ffn_blocks
from llmshrink.passes.prune_heads import PruneHeadsConfig, find_attention_blocks
from llmshrink.prune_units import heads_in_slots, slot_scores
from llmshrink.recipe import load_recipe
from llmshrink.targeting import module_attrs

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])
MASK = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])  # left padding: sdpa repeats k/v instead of enable_gqa

BUILDERS = {**DECODER_BUILDERS, "bert": tiny_bert}
LLAMA_STYLE = ("llama", "mistral", "qwen2", "gemma3")
# Block names, as records and targets see them, by builder ({} = block index).
FFN_NAMES = {"gpt2": "transformer.h.{}.mlp", "bert": "bert.encoder.layer.{}",
             **{family: "model.layers.{}.mlp" for family in LLAMA_STYLE}}
ATTENTION_NAMES = {"gpt2": "transformer.h.{}.attn", "bert": "bert.encoder.layer.{}.attention.self",
                   **{family: "model.layers.{}.self_attn" for family in LLAMA_STYLE}}


@torch.no_grad()
def logits(model: nn.Module, implementation: str = "sdpa", mask: torch.Tensor | None = None) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    return model(IDS, attention_mask=mask).logits


# --- names and targeting ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_block_names_are_the_familys(family):
    model = BUILDERS[family]()
    assert [b.name for b in find_ffn_blocks(model)] == [FFN_NAMES[family].format(i) for i in range(2)]
    assert [b.name for b in find_attention_blocks(model)] == [ATTENTION_NAMES[family].format(i) for i in range(2)]
    output = {"gpt2": "transformer.h.0.attn.c_proj", "bert": "bert.encoder.layer.0.attention.output.dense"}
    assert find_attention_blocks(model)[0].output == output.get(family, "model.layers.0.self_attn.o_proj")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_targets_and_exclude_choose_blocks_by_name(family):
    ffn, attention = FFN_NAMES[family], ATTENTION_NAMES[family]
    model = BUILDERS[family]()
    record = prune_ffn.apply(model, PruneFfnConfig(importance="magnitude", targets=re.escape(ffn.format(1))),
                             calibrated())
    assert [layer["name"] for layer in record["layers"]] == [ffn.format(1)]
    first, second = find_ffn_blocks(model)
    assert not isinstance(model.get_submodule(first.output), PrunedLinear)
    assert isinstance(model.get_submodule(second.output), PrunedLinear)

    model = BUILDERS[family]()
    params = n_params(model)
    record = prune_heads.apply(model, PruneHeadsConfig(importance="magnitude", exclude=re.escape(attention.format(0))),
                               calibrated())
    assert [layer["name"] for layer in record["layers"]] == [attention.format(1)]
    assert params - n_params(model) == record["params_before"] - record["params_after"] > 0
    first, second = find_attention_blocks(model)
    assert not isinstance(model.get_submodule(first.output), PrunedLinear)
    assert isinstance(model.get_submodule(second.output), PrunedLinear)


@pytest.mark.parametrize(
    ("apply", "cfg", "message"),
    [
        (prune_ffn.apply, PruneFfnConfig(targets="nope"),
         "prune_ffn.targets: 'nope' matches no FFN block; GPT2LMHeadModel has transformer.h.0.mlp, "
         "transformer.h.1.mlp, transformer.h.2.mlp, transformer.h.3.mlp, ..."),
        (prune_ffn.apply, PruneFfnConfig(targets=r".*\.[01]\.mlp", exclude=".*"),
         r"prune_ffn.exclude: '.*' excludes every FFN block that targets '.*\\.[01]\\.mlp' matches: "
         "transformer.h.0.mlp, transformer.h.1.mlp"),
        (prune_ffn.apply, PruneFfnConfig(targets=r"transformer\.h\.[01]\.mlp", layers=[3]),
         "prune_ffn.layers: [3] match no FFN block; targets / exclude leave blocks [0, 1]"),
        (prune_ffn.apply, PruneFfnConfig(layers=[7]),
         "prune_ffn.layers: [7] match no FFN block; GPT2LMHeadModel has blocks [0, 1, 2, 3, 4]"),
        (prune_heads.apply, PruneHeadsConfig(targets=r".*\.mlp"),
         r"prune_heads.targets: '.*\\.mlp' matches no attention block; GPT2LMHeadModel has transformer.h.0.attn, "
         "transformer.h.1.attn, transformer.h.2.attn, transformer.h.3.attn, ..."),
        (prune_heads.apply, PruneHeadsConfig(exclude=".*attn"),
         "prune_heads.exclude: '.*attn' excludes every attention block that targets '.*' matches: "
         "transformer.h.0.attn, transformer.h.1.attn, transformer.h.2.attn, transformer.h.3.attn, ..."),
        (prune_heads.apply, PruneHeadsConfig(exclude=r".*\.[0-3]\.attn", layers=[0, 1]),
         "prune_heads.layers: [0, 1] match no attention block; targets / exclude leave blocks [4]"),
    ],
)
def test_a_choice_of_no_block_is_one_line(apply, cfg, message):
    with pytest.raises(LlmshrinkError) as err:
        apply(DECODER_BUILDERS["gpt2"](layers=5), cfg, calibrated())
    assert str(err.value) == message


@pytest.mark.parametrize("name", ["prune_ffn", "prune_heads"])
def test_a_bad_regex_is_refused_when_the_recipe_is_read(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: t\nmodel: {{id: some/dir}}\nstages:\n  - {name}: {{exclude: '('}}\noutput: {{dir: o}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}: stages[0].{name}.exclude: not a valid regex (missing ), unterminated subpattern at position 0), "
        "got '('"
    )


# --- unit: query_head ------------------------------------------------------------------------------


def test_slots_keep_the_same_number_of_heads_in_every_group():
    scores = torch.tensor([9.0, 8, 1, 0, 5, 5])  # 3 groups of 2: group 0 holds the two best heads
    assert slot_scores(scores, 2).tolist() == [15.0, 13.0]  # best of each group, then second best of each
    assert heads_in_slots(scores, 2, 1).tolist() == [0, 2, 4]  # ties keep the lower index
    assert heads_in_slots(scores, 2, 2).tolist() == list(range(6))
    assert heads_in_slots(torch.tensor([1.0, 4, 3, 2]), 4, 2).tolist() == [1, 2]


@torch.no_grad()
def silence_heads(model: nn.Module, heads: list[list[int]]) -> None:
    """Zero the query rows (and biases) and output columns of `heads[i]` of layer i: they contribute nothing."""
    for layer, chosen in zip(model.model.layers, heads, strict=True):
        attention = layer.self_attn
        features = [h * attention.head_dim + i for h in chosen for i in range(attention.head_dim)]
        attention.q_proj.weight[features] = 0
        if attention.q_proj.bias is not None:
            attention.q_proj.bias[features] = 0
        attention.o_proj.weight[:, features] = 0


# (builder, config overrides, heads silenced per layer: the same number in every kv group)
QUERY_HEAD = [
    # Gemma 3 270M's shape: 4 query heads, 1 kv head
    pytest.param("gemma3", {"num_key_value_heads": 1}, [[0, 3], [1, 2]], id="gemma3-kv1"),
    pytest.param("gemma3", {}, [[1, 2], [0, 3]], id="gemma3-kv2"),
    pytest.param("llama", {}, [[1, 2], [0, 3]], id="llama-kv2"),  # 2 kv groups of 2 query heads
    pytest.param("qwen2", {}, [[0, 3], [1, 3]], id="qwen2-kv2"),  # q biases
]


@pytest.mark.parametrize(("family", "overrides", "silent"), QUERY_HEAD)
@pytest.mark.parametrize("importance", ["magnitude", "output_norm", "taylor"])
def test_query_head_pruning_equals_zeroing_those_heads(family, overrides, silent, importance):
    model = DECODER_BUILDERS[family](**overrides)
    silence_heads(model, silent)
    reference = {(impl, i): logits(model, impl, mask) for impl in ("eager", "sdpa") for i, mask in enumerate((None, MASK))}
    params = n_params(model)
    record = prune_heads.apply(model, PruneHeadsConfig(unit="query_head", importance=importance, keep=0.5),
                               calibrated())
    assert [layer["removed_heads"] for layer in record["layers"]] == silent
    kv = overrides.get("num_key_value_heads", 2)
    assert record["unit"] == "query_head" and record["heads_kept"] == [2, 2]
    assert [layer["kv_groups_kept"] for layer in record["layers"]] == [kv, kv]
    assert [layer["removed_kv_groups"] for layer in record["layers"]] == [[], []]
    assert len(record["layers"][0]["scores"]) == 4  # one per query head
    for (impl, i), want in reference.items():  # eager and sdpa both read num_key_value_groups
        assert (logits(model, impl, (None, MASK)[i]) - want).abs().max().item() < 1e-5, impl
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.num_key_value_groups == 2 // kv
        assert attention.q_proj.out_features == attention.o_proj.in_features == 32
        assert type(attention.k_proj) is nn.Linear and attention.k_proj.out_features == 16 * kv  # untouched
    bias = 1 if family == "qwen2" else 0
    per_head = 16 * (64 + bias) + 16 * 64  # q rows (+ biases), o columns
    assert params - n_params(model) == 4 * per_head == record["params_before"] - record["params_after"]
    assert module_attrs(model) == {f"model.layers.{i}.self_attn": {"num_key_value_groups": 2 // kv} for i in (0, 1)}


@torch.no_grad()
def test_query_head_magnitude_is_the_norm_of_q_rows_and_o_columns():
    model = DECODER_BUILDERS["gemma3"](num_key_value_heads=1)
    blocks = find_attention_blocks(model, unit="query_head")
    got = prune_heads.magnitude_scores(model, blocks)
    for block, layer in zip(blocks, model.model.layers, strict=True):
        q, o = layer.self_attn.q_proj.weight.double(), layer.self_attn.o_proj.weight.double()
        want = [(q[h * 16 : (h + 1) * 16].pow(2).sum() + o[:, h * 16 : (h + 1) * 16].pow(2).sum()).sqrt()
                for h in range(4)]
        assert torch.allclose(got[block.name], torch.stack(want), rtol=1e-12)


def test_query_head_budgets_count_query_heads():
    model = DECODER_BUILDERS["gemma3"](num_key_value_heads=1, layers=3)
    record = prune_heads.apply(model, PruneHeadsConfig(unit="query_head", importance="magnitude", heads_per_layer=1,
                                                       layers=[0]), calibrated())
    assert record["heads_kept"] == [1] and model.model.layers[0].self_attn.num_key_value_groups == 1
    record = prune_heads.apply(model, PruneHeadsConfig(unit="query_head", importance="output_norm", keep=0.5,
                                                       scope="global", layers=[1, 2]), calibrated())
    assert sum(record["heads_kept"]) == 4 and all(1 <= kept <= 4 for kept in record["heads_kept"])
    assert logits(model, "eager").isfinite().all() and logits(model, "sdpa", MASK).isfinite().all()
    # Llama, 2 kv groups: 0.7 x 4 query heads rounds down to 2, one in each group.
    model = DECODER_BUILDERS["llama"]()
    record = prune_heads.apply(model, PruneHeadsConfig(unit="query_head", importance="magnitude", keep=0.7),
                               calibrated())
    assert record["heads_kept"] == [2, 2]
    assert all(len({h // 2 for h in layer["removed_heads"]}) == 2 for layer in record["layers"])


@pytest.mark.parametrize(
    ("family", "overrides", "cfg", "message"),
    [
        ("gemma3", {"num_key_value_heads": 1}, {},
         "prune_heads.unit: 'kv_group' cannot prune model.layers.0.self_attn, whose 4 query heads share a single "
         "key-value head; use unit: query_head"),
        ("gpt2", {}, {"unit": "query_head"},
         "prune_heads.unit: 'query_head' removes query heads within kv groups and transformer.h.0.attn has one "
         "query head per kv group (no GQA); use unit: kv_group"),
        ("llama", {}, {"unit": "query_head", "heads_per_layer": 3},
         "prune_heads.heads_per_layer: 3 is not a multiple of 2, the kv groups of model.layers.0.self_attn "
         "(unit: query_head keeps as many query heads in every kv group)"),
    ],
)
def test_unit_errors_are_one_line(family, overrides, cfg, message):
    with pytest.raises(LlmshrinkError) as err:
        prune_heads.apply(DECODER_BUILDERS[family](**overrides), PruneHeadsConfig(importance="magnitude", **cfg),
                          calibrated())
    assert str(err.value) == message


KV_GROUPS = """
def probe(model, name):
    return [m.num_key_value_groups for m in model.modules() if hasattr(m, "num_key_value_groups")]
"""


def test_query_head_checkpoints_reload_exactly(tmp_path):
    """Layers keeping 1 and 2 of 4 query heads per kv head: each attention's num_key_value_groups comes back."""
    models, outs = {}, {}
    for family, kv in (("gemma3", 1), ("llama", 2)):
        model = DECODER_BUILDERS[family](num_key_value_heads=kv)
        prune_heads.apply(model, PruneHeadsConfig(unit="query_head", importance="magnitude", heads_per_layer=kv,
                                                  layers=[0]), calibrated())
        if kv == 1:
            prune_heads.apply(model, PruneHeadsConfig(unit="query_head", importance="magnitude", keep=0.5, layers=[1]),
                              calibrated())
        models[family], outs[family] = model, save_tiny(model, tmp_path / family)
        loaded = llmshrink.load(outs[family])
        assert module_attrs(loaded) == module_attrs(model)
        assert torch.equal(logits(loaded, "sdpa"), logits(model, "sdpa"))
        assert torch.equal(logits(loaded, "eager", MASK), logits(model, "eager", MASK))
    assert module_attrs(models["gemma3"]) == {"model.layers.0.self_attn": {"num_key_value_groups": 1},
                                              "model.layers.1.self_attn": {"num_key_value_groups": 2}}
    for model in models.values():
        model.set_attn_implementation("sdpa")
    reloaded = reload_without_llmshrink(outs, IDS, layer="PrunedLinear", probe=KV_GROUPS)
    assert reloaded["gemma3"]["probe"] == [1, 2] and reloaded["llama"]["probe"] == [1, 2]
    for family, got in reloaded.items():
        assert torch.equal(got["logits"], logits(models[family]))
