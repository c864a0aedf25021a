"""The share_layers pass (MobileLLM layer sharing) on every family's tiny model: GPT-2, Llama (GQA, KV cache),
Mistral, Qwen2, Gemma 3 (sliding and full attention layers) and BERT."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    AUTO,
    BUILDERS,
    DECODER_BUILDERS,
    FAMILY,
    n_params,
    recipe_error,
    reload_without_llmshrink,
    tiny_neox,
    tiny_opt,
    tiny_tokenizer,
)
from safetensors.torch import load_file
from torch import nn

import llmshrink
from llmshrink.checkpoint import save_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.families import supported
from llmshrink.modules.kronecker import KroneckerLinear
from llmshrink.modules.shared_block import SharedBlockRef
from llmshrink.passes.share_layers import ShareLayersConfig, apply, merge_most_similar
from llmshrink.specs import DataSpec

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])
LONG = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))  # past sliding windows of 16


def build(family: str, layers: int = 4) -> nn.Module:
    """The family's tiny model with 128-wide MLPs. Gemma 3 in pairs of sliding and full layers, as the real one
    runs 5 sliding layers, then a full one: neighbours that share agree on their attention type."""
    builder = BUILDERS[family]
    sizes = {"bert": {}, "gpt2": {"n_inner": 128}}.get(family, {"intermediate_size": 128})
    pairs = {"layer_types": ["sliding_attention"] * 2 + ["full_attention"] * 2} if family == "gemma3" else {}
    return builder(layers=layers, **sizes, **pairs)


FAMILIES = list(BUILDERS)
LISTS = {name: "model.layers" for name in FAMILIES} | {"gpt2": "transformer.h", "bert": "bert.encoder.layer"}


def ctx() -> Context:
    return Context(tokenizer=None, log=lambda _: None)


def blocks(model: nn.Module, family: str) -> nn.ModuleList:
    return model.get_submodule(LISTS[family])


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def make_identical(model: nn.Module, family: str, pairs) -> None:
    """Copy block i's weights into block j for each (i, j)."""
    layers = blocks(model, family)
    for i, j in pairs:
        layers[j].load_state_dict(layers[i].state_dict())


def unrolled(model: nn.Module, family: str) -> nn.Module:
    """A plain copy of a shared model: every position holds its own (independent) copy of its block."""
    flat = copy.deepcopy(model)
    layers = blocks(flat, family)
    for position, block in enumerate(layers):
        if isinstance(block, SharedBlockRef):
            own = copy.deepcopy(block.block)
            for module in own.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = position
            layers[position] = own
    assert not any(isinstance(m, SharedBlockRef) for m in flat.modules())
    return flat


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_share_map_leaves_logits_unchanged(family):
    model = build(family)
    before = logits(model)
    record = apply(model, ShareLayersConfig(share_map=[0, 1, 2, 3]), ctx())
    assert record["share_map"] == [0, 1, 2, 3] and record["unique_blocks"] == 4 and record["mode"] == "map"
    assert record["family"] == FAMILY[family]
    assert record["params_after"] == record["params_before"] == n_params(model)
    assert torch.equal(logits(model), before)
    assert not any(isinstance(m, SharedBlockRef) for m in model.modules())


@pytest.mark.parametrize("init", ["first", "average"])
@pytest.mark.parametrize("family", FAMILIES)
def test_repeat_of_identical_neighbours_is_exact_and_halves_block_params(family, init):
    model = build(family)
    make_identical(model, family, [(0, 1), (2, 3)])
    before, params_before = logits(model), n_params(model)
    per_block = n_params(blocks(model, family)[0])
    record = apply(model, ShareLayersConfig(mode="repeat", init=init), ctx())
    assert record["share_map"] == [0, 0, 2, 2] and record["groups"] == [[0, 1], [2, 3]]
    assert record["blocks"] == LISTS[family] and record["positions"] == 4
    assert record["block_params_before"] == 4 * per_block and record["block_params_after"] == 2 * per_block
    assert record["params_before"] == params_before
    assert record["params_after"] == n_params(model) == params_before - 2 * per_block  # counted once
    layers = blocks(model, family)
    assert len(layers) == model.config.num_hidden_layers == 4  # depth unchanged
    assert isinstance(layers[1], SharedBlockRef) and layers[1].block is layers[0]
    assert layers[3].block is layers[2] and layers[3].position == 3
    assert not [k for k in model.state_dict() if k.startswith((f"{LISTS[family]}.1.", f"{LISTS[family]}.3."))]
    assert torch.allclose(logits(model), before, atol=1e-5)


# Each position runs the block its map names: moved (position 0 runs block 1), shared by two positions, own.
MAPS = {"gemma3": [1, 1, 3, 2]}  # within its sliding pair and its full pair


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_forward_equals_a_plain_model_with_copied_blocks(family):
    share_map = MAPS.get(family, [1, 0, 1, 3])
    model = build(family)
    originals = [copy.deepcopy(b) for b in blocks(model, family)]
    apply(model, ShareLayersConfig(share_map=share_map), ctx())
    layers = blocks(model, family)
    for position, source in enumerate(share_map):  # a group's first position holds its block, the others refs
        owner = share_map.index(source)
        assert (layers[position] if position == owner else layers[position].block) is layers[owner]
        assert torch.equal(next(layers[owner].parameters()), next(originals[source].parameters()))
    shared = next(p for p, source in enumerate(share_map) if p != share_map.index(source))
    owner = share_map.index(share_map[shared])
    assert layers[shared].target == f"{LISTS[family]}.{owner}"
    flat = unrolled(model, family)
    assert torch.equal(logits(model, LONG), logits(flat, LONG))
    hidden = model(IDS, output_hidden_states=True).hidden_states
    assert len(hidden) == 5  # the shared block reports its output at each position it runs
    if family == "bert":
        return
    # One tensor, trained from both positions: its gradient is the sum of the two copies' gradients.
    for net in (model, flat):
        net(IDS, labels=IDS).loss.backward()
    grad = next(layers[owner].parameters()).grad
    copies = [next(blocks(flat, family)[p].parameters()).grad for p in (owner, shared)]
    assert torch.allclose(grad, copies[0] + copies[1], atol=1e-6)


def test_init_average_is_the_mean_of_the_group():
    model = build("gpt2", 3)
    weights = [b.mlp.c_fc.weight.detach().clone() for b in model.transformer.h]
    record = apply(model, ShareLayersConfig(share_map=[2, 2, 2], init="average"), ctx())
    assert record["groups"] == [[0, 1, 2]] and record["unique_blocks"] == 1
    assert torch.allclose(model.transformer.h[0].mlp.c_fc.weight, sum(weights) / 3, atol=1e-7)
    first = build("gpt2", 3)
    apply(first, ShareLayersConfig(share_map=[2, 2, 2], init="first"), ctx())
    assert torch.equal(first.transformer.h[0].mlp.c_fc.weight, weights[2])  # the named block, moved to 0


@pytest.mark.parametrize("family", list(DECODER_BUILDERS))
@torch.no_grad()
def test_generate_with_cache_equals_without(family):
    model = build(family)
    apply(model, ShareLayersConfig(mode="repeat"), ctx())
    prompt = IDS[:1, :5]  # 17 tokens in all: past Mistral's and Gemma 3's sliding window of 16
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False))
    assert torch.equal(cached, unrolled(model, family).generate(prompt, max_new_tokens=12, do_sample=False))

    def step_gap(net) -> float:
        """Last-token logits from prefix + cache, against the full sequence without cache."""
        out = net(IDS[:, :-1], use_cache=True)
        step = net(IDS[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
        return (step - net(IDS, use_cache=False).logits[:, -1]).abs().max().item()

    assert step_gap(model) < 1e-5
    # Control: without the per-position cache slot, the repeated block overwrites its first run's cache.
    forward = SharedBlockRef.forward
    try:
        SharedBlockRef.forward = lambda self, *args, **kwargs: self.block(*args, **kwargs)
        assert step_gap(model) > 1e-3
    finally:
        SharedBlockRef.forward = forward


def test_select_weights_merges_the_most_similar_neighbours():
    model = build("llama")
    make_identical(model, "llama", [(1, 2)])
    record = apply(model, ShareLayersConfig(unique_blocks=3, select="weights"), ctx())
    sims = record["similarity"]["adjacent"]
    assert record["mode"] == "select" and record["similarity"]["method"] == "weights"
    assert sims[1] == pytest.approx(1.0) and max(sims[0], sims[2]) < 0.99
    assert record["share_map"] == [0, 1, 1, 3] and record["unique_blocks"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_select_outputs_reads_calibration_text(tiny_text, family):
    model = build(family)
    make_identical(model, family, [(2, 3)])
    before = logits(model)
    context = Context(tokenizer=tiny_tokenizer(), log=lambda _: None, data=DataSpec(source=str(tiny_text)))
    record = apply(model, ShareLayersConfig(unique_blocks=3, select="outputs", calibration_tokens=300), context)
    sims = record["similarity"]["adjacent"]
    assert record["similarity"]["calibration_tokens"] == 300
    assert sims[2] == pytest.approx(1.0) and max(sims[:2]) < 0.99  # blocks 2, 3: the same function
    assert record["share_map"] == [0, 1, 2, 2]
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_merge_most_similar_cuts_at_the_least_similar_boundaries():
    assert merge_most_similar([0.9, 0.1, 0.8, 0.2, 0.7], 3) == [0, 0, 2, 2, 4, 4]
    assert merge_most_similar([0.9, 0.1, 0.8, 0.2, 0.7], 1) == [0] * 6
    assert merge_most_similar([0.9, 0.1, 0.8], 4) == [0, 1, 2, 3]


def test_repeat_on_an_odd_depth_keeps_the_last_block_alone():
    model = build("gpt2", 3)
    record = apply(model, ShareLayersConfig(), ctx())
    assert record["share_map"] == [0, 0, 2] and record["unique_blocks"] == 2


# --- checkpoints -----------------------------------------------------------------------------------


def save(model: nn.Module, out: Path, record: dict) -> Path:
    manifest = {"name": out.name, "passes": [{"pass": "share_layers", "record": record}]}
    return save_checkpoint(model, tiny_tokenizer(), out, recipe_text="name: t\n", manifest=manifest,
                           model_card="card")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (shared model, checkpoint dir)}: repeat sharing; Llama's block 0 also has a Kronecker MLP."""
    root = tmp_path_factory.mktemp("shared")
    saved = {}
    for family in FAMILIES:
        model = build(family)
        if family == "llama":
            mlp = model.model.layers[0].mlp
            mlp.up_proj = KroneckerLinear.from_linear(mlp.up_proj, (8, 8), (16, 8), rank=2)
        record = apply(model, ShareLayersConfig(mode="repeat"), ctx())
        saved[family] = model, save(model, root / family, record)
    return saved


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_stores_each_shared_tensor_once_and_reloads_exactly(checkpoints, family):
    model, out = checkpoints[family]
    name = LISTS[family]
    file_keys = set(load_file(out / "model.safetensors"))
    assert not [k for k in file_keys if k.startswith((f"{name}.1.", f"{name}.3."))]
    stored = {k for k in model.state_dict() if k.startswith(f"{name}.")}
    assert {k for k in file_keys if k.startswith(f"{name}.")} == stored
    layout = json.loads((out / "config.json").read_text())["llmshrink_layout"]
    assert layout[f"{name}.1"] == {"type": "SharedBlockRef", "args": {"target": f"{name}.0", "position": 1}}
    assert layout[f"{name}.3"]["args"] == {"target": f"{name}.2", "position": 3}
    loaded = llmshrink.load(out)
    layers = blocks(loaded, family)
    assert layers[1].block is layers[0] and layers[3].block is layers[2]
    assert loaded.config.num_hidden_layers == 4
    assert n_params(loaded) == n_params(model)
    assert torch.equal(logits(loaded), logits(model))
    if family == "llama":
        assert isinstance(layers[0].mlp.up_proj, KroneckerLinear)
        prompt = IDS[:1, :5]
        assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False),
                           model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))


def test_later_passes_compress_each_shared_block_once(tmp_path):
    from llmshrink.passes.prune_ffn import PruneFfnConfig
    from llmshrink.passes.prune_ffn import apply as prune_ffn

    model = build("llama")
    record = apply(model, ShareLayersConfig(), ctx())
    pruned = prune_ffn(model, PruneFfnConfig(importance="magnitude", keep=0.5), ctx())
    assert [layer["name"] for layer in pruned["layers"]] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert model.model.layers[1].block.mlp.down_proj.in_features == 64  # position 1 runs the pruned block
    loaded = llmshrink.load(save(model, tmp_path / "x", record))
    assert torch.equal(logits(loaded), logits(model))


def test_broken_share_target_is_one_line(checkpoints, tmp_path):
    _, out = checkpoints["gpt2"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config = json.loads((broken / "config.json").read_text())
    config["llmshrink_layout"]["transformer.h.1"]["args"]["target"] = "transformer.h.9"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmshrinkError) as err:
        llmshrink.load(broken)
    assert str(err.value) == (
        "llmshrink_layout.transformer.h.1: cannot bind SharedBlockRef: no module transformer.h.9 to share"
    )


SHARED_REFS = f"""
def probe(model, name):
    layers = model.get_submodule({LISTS!r}[name])
    assert layers[1].block is layers[0] and layers[3].block is layers[2]
    if name == "llama":
        return model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
    return None
"""


def test_checkpoint_reloads_through_remote_code_without_llmshrink(checkpoints):
    reloaded = reload_without_llmshrink({family: out for family, (_, out) in checkpoints.items()}, IDS, auto=AUTO,
                                        layer="SharedBlockRef", probe=SHARED_REFS)
    assert list(reloaded) == FAMILIES
    for family, got in reloaded.items():
        # The ref class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert got["layers"] and all(module.startswith(f"transformers_modules.{family}.")
                                     and module.endswith(".shared_block") for module in got["layers"])
        model = checkpoints[family][0]
        assert torch.equal(got["logits"], logits(model))
    model = checkpoints["llama"][0]
    expected = model.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(reloaded["llama"]["probe"], expected)


# --- errors ----------------------------------------------------------------------------------------


def test_bad_input_gets_one_line():
    cases = [
        (tiny_opt(layers=2), ShareLayersConfig(),
         f"share_layers: OPTForCausalLM (model_type 'opt') is not supported; supported: {supported()}"),
        (tiny_neox(), ShareLayersConfig(),
         f"share_layers: GPTNeoXForCausalLM (model_type 'gpt_neox') is not supported; supported: {supported()}"),
        (build("llama"), ShareLayersConfig(share_map=[0, 0, 2]),
         "share_layers.share_map: 3 entries for the 4 positions of model.layers; give one block index per position"),
        (build("llama"), ShareLayersConfig(share_map=[0, 0, 4, 4]),
         "share_layers.share_map[2]: block 4 is out of range; model.layers has blocks 0..3"),
        (build("gpt2"), ShareLayersConfig(share_map=[0, -1, 2, 3]),
         "share_layers.share_map[1]: block -1 is out of range; transformer.h has blocks 0..3"),
        (build("bert"), ShareLayersConfig(unique_blocks=5),
         "share_layers.unique_blocks: 5 exceeds the 4 blocks of bert.encoder.layer"),
    ]
    for model, cfg, message in cases:
        with pytest.raises(LlmshrinkError) as err:
            apply(model, cfg, ctx())
        assert str(err.value) == message

    model = build("llama")
    apply(model, ShareLayersConfig(), ctx())
    with pytest.raises(LlmshrinkError) as err:
        apply(model, ShareLayersConfig(), ctx())
    assert str(err.value) == (
        "share_layers: model.layers already shares blocks (position 1 runs model.layers.0); apply share_layers once"
    )


def test_blocks_that_cannot_be_merged_are_refused():
    model = build("gpt2")
    mlp = model.transformer.h[3].mlp
    mlp.c_fc = KroneckerLinear.from_linear(mlp.c_fc, (8, 8), (16, 8))
    before = logits(model)
    with pytest.raises(LlmshrinkError) as err:
        apply(model, ShareLayersConfig(init="average"), ctx())
    assert str(err.value).startswith(
        "share_layers.init: average: transformer.h.2 and transformer.h.3 differ at mlp.c_fc.a; blocks must have "
        "the same parameter shapes"
    )
    assert torch.equal(logits(model), before)  # checked before anything changed (group [0, 1] was fine)
    assert not any(isinstance(m, SharedBlockRef) for m in model.modules())
    with pytest.raises(LlmshrinkError, match=r"^share_layers.select: weights: transformer.h.2 and transformer.h.3"):
        apply(model, ShareLayersConfig(unique_blocks=2), ctx())
    # init: first only needs the kept block: sharing a compressed block is fine.
    record = apply(model, ShareLayersConfig(share_map=[0, 1, 3, 3]), ctx())
    assert isinstance(model.transformer.h[2].mlp.c_fc, KroneckerLinear) and record["unique_blocks"] == 3


@pytest.mark.parametrize(("cfg", "message"), [
    (ShareLayersConfig(mode="repeat"), "share_layers: positions [0, 1] have different layer types "
                                       "(full_attention, sliding_attention) and cannot share one block"),
    (ShareLayersConfig(share_map=[1, 0, 2, 3]), "share_layers: block 1 (full_attention) cannot run at positions [0] "
                                                "(sliding_attention): different layer types"),
])
def test_gemma3_refuses_sharing_sliding_with_full_layers(cfg, message):
    model = DECODER_BUILDERS["gemma3"](layers=4)  # sliding, full, sliding, full
    before = logits(model, LONG)
    with pytest.raises(LlmshrinkError) as err:
        apply(model, cfg, ctx())
    assert str(err.value) == message
    assert torch.equal(logits(model, LONG), before) and not any(isinstance(m, SharedBlockRef) for m in model.modules())


RECIPE = "name: t\nmodel: {id: some/dir}\nstages:\n  - share_layers: {%s}\noutput: {dir: out/t}\n"


@pytest.mark.parametrize(("body", "message"), [
        ("share_map: [0, 0], unique_blocks: 1", "stages[0].share_layers: value error, set share_map (mode: map) "
                                                "or unique_blocks (mode: select), not both"),
        ("mode: select", "stages[0].share_layers: value error, mode: select needs unique_blocks"),
        ("mode: repeat, unique_blocks: 2",
         "stages[0].share_layers: value error, mode: repeat takes neither share_map nor unique_blocks"),
        ("unique_blocks: 0", "stages[0].share_layers.unique_blocks: input should be greater than or equal to 1, got 0"),
        ("init: mean", "stages[0].share_layers.init: input should be 'first' or 'average', got 'mean'"),
])
def test_bad_config_is_one_line(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    assert recipe_error(path, RECIPE % body).startswith(f"{path}: {message}")

