"""The drop_layers pass (structured layer pruning) on every family's tiny model: GPT-2, Llama (GQA, tied, KV
cache), Mistral, Qwen2, Gemma 3 (sliding and full attention layers) and BERT."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import (
    DECODER_BUILDERS,
    n_params,
    recipe_error,
    tiny_bert,
    tiny_gpt2,
    tiny_neox,
    tiny_opt,
    tiny_tokenizer,
)
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import llmshrink
from llmshrink.checkpoint import save_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.families import LLAMA, supported
from llmshrink.passes.drop_layers import DropLayersConfig, apply
from llmshrink.passes.iterate import IterateConfig
from llmshrink.passes.iterate import apply as iterate
from llmshrink.passes.share_layers import ShareLayersConfig
from llmshrink.passes.share_layers import apply as share_layers
from llmshrink.recipe import load_recipe
from llmshrink.specs import DataSpec

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])


# family: (tiny builder, its config overrides: 128-wide MLPs, the block list)
FAMILIES = {
    "gpt2": (tiny_gpt2, {"n_inner": 128}, "transformer.h"),
    **{name: (builder, {"intermediate_size": 128}, "model.layers")
       for name, builder in DECODER_BUILDERS.items() if name != "gpt2"},
    "bert": (tiny_bert, {}, "bert.encoder.layer"),
}
DECODERS = sorted(DECODER_BUILDERS)
AUTO = {name: AutoModelForMaskedLM if name == "bert" else AutoModelForCausalLM for name in FAMILIES}


def build(family: str, layers: int = 4, seed: int = 0, **more) -> nn.Module:
    builder, overrides, _ = FAMILIES[family]
    return builder(seed, layers=layers, **overrides, **more)


def blocks(model: nn.Module, family: str) -> nn.ModuleList:
    return model.get_submodule(FAMILIES[family][2])


def ctx() -> Context:
    return Context(tokenizer=None, log=lambda _: None)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


def by_hand(original: nn.Module, family: str, kept: list[int]) -> nn.Module:
    """A fresh model of depth len(kept), built by its own constructor, with the kept blocks' weights."""
    name = FAMILIES[family][2]
    types = getattr(original.config, "layer_types", None)  # Gemma 3, Qwen2: one attention type per block
    fresh = build(family, len(kept), seed=1, **({"layer_types": [types[i] for i in kept]} if types else {}))
    pattern = re.compile(rf"^{re.escape(name)}\.(\d+)\.")
    state = {}
    for key, value in original.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match[1]) in kept:
            state[pattern.sub(f"{name}.{kept.index(int(match[1]))}.", key)] = value
    fresh.load_state_dict(state, strict=True)
    return fresh


@torch.no_grad()
def make_identity(model: nn.Module, family: str, index: int) -> None:
    """Zero block `index`'s output projections: it adds nothing to the residual stream, so out == in (BERT:
    LayerNorm of an already normalised input, about the same)."""
    block = blocks(model, family)[index]
    outputs = {  # Gemma 3's post-norms keep a zero update zero
        "gpt2": ("attn.c_proj", "mlp.c_proj"),
        "bert": ("attention.output.dense", "output.dense"),
    }.get(family, ("self_attn.o_proj", "mlp.down_proj"))
    for name in outputs:
        for param in block.get_submodule(name).parameters():
            param.zero_()


def attention_indices(model: nn.Module) -> list[int]:
    return [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_empty_layers_leaves_the_model_unchanged(family):
    model = build(family)
    before, params = logits(model), n_params(model)
    record = apply(model, DropLayersConfig(layers=[]), ctx())
    assert record["removed"] == [] and record["kept"] == [0, 1, 2, 3] and record["select"] == "layers"
    assert record["params_before"] == record["params_after"] == params == n_params(model)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dropping_equals_a_model_built_without_those_blocks(family):
    model = build(family)
    original = copy.deepcopy(model)
    gone = n_params(blocks(model, family)[0]) + n_params(blocks(model, family)[2])
    params = n_params(model)
    record = apply(model, DropLayersConfig(layers=[2, 0]), ctx())
    assert record["removed"] == [0, 2] and record["kept"] == [1, 3]
    assert (
        record["blocks_before"] == 4
        and record["blocks_after"] == 2
        and record["blocks"] == FAMILIES[family][2]
    )
    assert params - n_params(model) == gone == record["removed_params"]
    assert record["params_before"] - record["params_after"] == gone
    assert len(blocks(model, family)) == model.config.num_hidden_layers == 2
    assert set(attention_indices(model)) == {0, 1}
    assert torch.equal(logits(model), logits(by_hand(original, family, [1, 3])))


def test_config_depth_and_layer_types_follow():
    model = build("gpt2")
    apply(model, DropLayersConfig(layers=[1]), ctx())
    assert model.config.n_layer == 3 and [b.attn.layer_idx for b in model.transformer.h] == [0, 1, 2]
    model = build("llama")
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    apply(model, DropLayersConfig(layers=[0]), ctx())
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]


@torch.no_grad()
def test_gemma3_layer_types_follow_and_rebuild_past_the_sliding_window():
    model = build("gemma3")
    original = copy.deepcopy(model)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    apply(model, DropLayersConfig(layers=[0]), ctx())
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert [b.self_attn.is_sliding for b in model.model.layers] == [False, True, False]  # each kept its own
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))  # 40 > sliding_window 16
    rebuilt = type(model)(copy.deepcopy(model.config)).eval()  # what a checkpoint reload builds
    rebuilt.load_state_dict(model.state_dict())
    dropped = logits(model, ids)
    assert torch.equal(logits(rebuilt, ids), dropped)
    assert torch.equal(logits(by_hand(original, "gemma3", [1, 2, 3]), ids), dropped)
    # Control: the first 3 of the old types (what not filtering would leave) give other logits.
    rebuilt.config.layer_types = original.config.layer_types[:3]
    stale = type(model)(rebuilt.config).eval()
    stale.load_state_dict(model.state_dict())
    assert not torch.allclose(logits(stale, ids), dropped, atol=1e-3)  # a type picks the mask and the RoPE


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_generate_with_cache_equals_without_after_dropping(family):
    model = build(family)
    original = copy.deepcopy(model)
    apply(model, DropLayersConfig(layers=[1]), ctx())
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False))
    expected = by_hand(original, family, [0, 2, 3]).generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(cached, expected)


def test_keep_first_keeps_the_leading_blocks():
    model = build("llama")
    original = copy.deepcopy(model)
    record = apply(model, DropLayersConfig(keep=2, select="first"), ctx())
    assert record["removed"] == [2, 3] and record["influence"] is None and record["select"] == "first"
    assert torch.equal(logits(model), logits(by_hand(original, "llama", [0, 1])))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_influence_removes_a_block_that_changes_nothing(tiny_text, family):
    model = build(family)
    make_identity(model, family, 2)
    before = logits(model)
    context = Context(tokenizer=tiny_tokenizer(), log=lambda _: None, data=DataSpec(source=str(tiny_text)))
    record = apply(model, DropLayersConfig(keep=3, calibration_tokens=300), context)
    scores = record["influence"]["scores"]
    assert record["select"] == "influence" and record["influence"]["calibration_tokens"] == 300
    assert abs(scores[2]) < 1e-6 and min(scores[:2] + scores[3:]) > 1e-4  # tiny BERT: small updates, ~3e-4
    assert record["removed"] == [2] and record["kept"] == [0, 1, 3]
    assert torch.allclose(logits(model), before, atol=1e-5)  # the dropped block did (about) nothing


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_reloads_with_llmshrink_and_with_plain_transformers(tmp_path, family):
    model = build(family)
    record = apply(model, DropLayersConfig(layers=[1]), ctx())
    manifest = {"name": family, "passes": [{"pass": "drop_layers", "record": record}]}
    out = save_checkpoint(
        model,
        tiny_tokenizer(),
        tmp_path / family,
        recipe_text="name: t\n",
        manifest=manifest,
        model_card="card",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers" if family != "gpt2" else "n_layer"] == 3
    if family == "gemma3":
        assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert "auto_map" not in config and not list(out.glob("*.py"))  # a plain architecture: no remote code
    loaded = llmshrink.load(out)
    assert torch.equal(logits(loaded), logits(model)) and n_params(loaded) == n_params(model)
    plain, info = AUTO[family].from_pretrained(out, output_loading_info=True)
    assert type(plain) is type(model) and not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(plain.eval()), logits(model))


# --- errors ----------------------------------------------------------------------------------------


def test_bad_input_gets_one_line():
    scaled = build("gpt2")
    scaled.config.scale_attn_by_inverse_layer_idx = True
    posing = build("gpt2")
    posing.config.model_type = "llama"  # a supported model_type, another layout
    cases = [
        (
            tiny_opt(layers=2),
            DropLayersConfig(layers=[0]),
            f"drop_layers: OPTForCausalLM (model_type 'opt') is not supported; supported: {supported()}",
        ),
        (
            tiny_neox(),
            DropLayersConfig(layers=[0]),
            f"drop_layers: GPTNeoXForCausalLM (model_type 'gpt_neox') is not supported; supported: {supported()}",
        ),
        (
            posing,
            DropLayersConfig(layers=[0]),
            f"drop_layers: GPT2LMHeadModel has no block list at 'layers' as {LLAMA.label} models do; "
            "is it a modified model?",
        ),
        (
            build("llama"),
            DropLayersConfig(layers=[1, 4]),
            "drop_layers.layers[1]: block 4 is out of range; model.layers has blocks 0..3",
        ),
        (
            build("gpt2"),
            DropLayersConfig(layers=[-1]),
            "drop_layers.layers[0]: block -1 is out of range; transformer.h has blocks 0..3",
        ),
        (
            build("bert"),
            DropLayersConfig(layers=[2, 0, 2]),
            "drop_layers.layers[2]: block 2 is listed twice; name each block once",
        ),
        (
            build("llama"),
            DropLayersConfig(layers=[3, 2, 1, 0]),
            "drop_layers.layers: removes all 4 blocks of model.layers; keep at least one",
        ),
        (
            build("gpt2"),
            DropLayersConfig(keep=4),
            "drop_layers.keep: 4 leaves nothing to remove from the 4 blocks of transformer.h; allowed: 1..3",
        ),
        (
            scaled,
            DropLayersConfig(layers=[0]),
            "drop_layers: GPT2LMHeadModel scales attention by block index "
            "(config.scale_attn_by_inverse_layer_idx: true), so its blocks cannot move; not supported",
        ),
        (
            build("llama"),
            DropLayersConfig(keep=2),  # select: influence needs calibration text
            "this pass needs training text: add a `data:` section to the recipe",
        ),
    ]
    for model, cfg, message in cases:
        before = logits(model)
        with pytest.raises(LlmshrinkError) as err:
            apply(model, cfg, ctx())
        assert str(err.value) == message
        assert torch.equal(logits(model), before)  # refused before anything changed


def test_per_block_config_of_another_length_is_refused():
    model = build("gemma3")
    model.config.layer_types = model.config.layer_types[:3]  # entries could not be matched to blocks
    with pytest.raises(LlmshrinkError) as err:
        apply(model, DropLayersConfig(layers=[0]), ctx())
    assert str(err.value) == (
        "drop_layers: config.layer_types has 3 entries for the 4 blocks of model.layers; is it a modified model?"
    )
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # refused before any change


def test_shared_blocks_and_iterate_are_refused():
    model = build("llama")
    share_layers(model, ShareLayersConfig(), ctx())
    with pytest.raises(LlmshrinkError) as err:
        apply(model, DropLayersConfig(layers=[2]), ctx())
    assert str(err.value) == (
        "drop_layers: model.layers already shares blocks (position 1 runs model.layers.0); "
        "run drop_layers before share_layers"
    )
    with pytest.raises(LlmshrinkError) as err:
        iterate(
            build("llama"), IterateConfig(stages=[{"drop_layers": {"keep": 2, "select": "first"}}]), ctx()
        )
    assert str(err.value) == "drop_layers: got both layers and keep; run drop_layers outside iterate"


RECIPE = "name: t\nmodel: {id: some/dir}\nstages:\n  - drop_layers: {%s}\noutput: {dir: out/t}\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "",
            "stages[0].drop_layers: value error, set exactly one of layers (blocks to remove) or keep "
            "(how many blocks remain)",
        ),
        (
            "layers: [1], keep: 2",
            "stages[0].drop_layers: value error, set exactly one of layers (blocks to "
            "remove) or keep (how many blocks remain)",
        ),
        (
            "layers: [1], select: first",
            "stages[0].drop_layers: value error, select chooses the blocks for keep; layers names them already",
        ),
        ("keep: 0", "stages[0].drop_layers.keep: input should be greater than or equal to 1, got 0"),
        (
            "keep: 2, select: best",
            "stages[0].drop_layers.select: input should be 'influence' or 'first', got 'best'",
        ),
    ],
)
def test_bad_config_is_one_line(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    assert recipe_error(path, RECIPE % body).startswith(f"{path}: {message}")



# A stage with the old name of calibration_tokens, for each pass that had it.
OLD_NAME = {"drop_layers": "keep: 2", "share_layers": "unique_blocks: 2, select: outputs"}
STAGE = "name: t\nmodel: {id: some/dir}\nstages:\n  - %s: {%s}\noutput: {dir: out/t}\n"


@pytest.mark.parametrize("name", sorted(OLD_NAME))
def test_old_name_selection_tokens_still_validates(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(STAGE % (name, OLD_NAME[name] + ", selection_tokens: 64"))
    with pytest.warns(FutureWarning, match="^selection_tokens is deprecated, it is now called calibration_tokens$"):
        (stage,) = load_recipe(path).stages
    assert stage.name == name and stage.config.calibration_tokens == 64


@pytest.mark.parametrize("name", sorted(OLD_NAME))
def test_old_and_new_calibration_names_together_are_one_line(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    message = recipe_error(path, STAGE % (name, OLD_NAME[name] + ", selection_tokens: 64, calibration_tokens: 64"))
    assert "\n" not in message and message.startswith(
        f"{path}: stages[0].{name}: selection_tokens is the old name of calibration_tokens; "
        "set only calibration_tokens"
    )
