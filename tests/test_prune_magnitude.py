"""The prune_magnitude pass: which weights go, global vs per-layer, the gradual schedule, storage, reload."""

from __future__ import annotations

import copy

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
    tiny_tokenizer,
)
from torch import nn

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.sparse import SparseLinear, pack_mask, unpack_mask
from llmshrink.passes import distill as distill_pass
from llmshrink.passes.prune_magnitude import PruneMagnitudeConfig, apply, cubic_schedule
from llmshrink.specs import DataSpec

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])


def ctx() -> Context:
    return Context(tokenizer=None, log=lambda _: None)



def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def hand_model(first: list[list[float]], second: list[list[float]]) -> nn.Sequential:
    """Two bias-free Linear layers ("0" and "2") with the given (out, in) weights."""
    a, b = torch.tensor(first), torch.tensor(second)
    model = nn.Sequential(nn.Linear(a.shape[1], a.shape[0], bias=False), nn.ReLU(),
                          nn.Linear(b.shape[1], b.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(a)
        model[2].weight.copy_(b)
    return model


# --- the layer ----------------------------------------------------------------------------------


def test_mask_packing_by_hand_and_roundtrip():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert pack_mask(bits).tolist() == [1 + 128, 1 + 2]  # lowest bit first; the last byte padded
    keep = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-91 // 8)
    assert torch.equal(unpack_mask(packed, 91).view(7, 13), keep)


def test_sparse_linear_matches_masked_dense_and_trains_only_survivors():
    torch.manual_seed(0)
    linear = nn.Linear(24, 10)
    keep = torch.rand(10, 24) > 0.5
    layer = SparseLinear.from_linear(linear, keep)
    masked = linear.weight.detach() * keep
    assert layer.nnz == int(keep.sum()) and layer.values.numel() == layer.nnz
    assert torch.equal(layer.to_dense(), masked) and torch.equal(layer.kept(), keep)
    assert layer.layout_args() == {"in_features": 24, "out_features": 10, "nnz": layer.nnz, "bias": True}
    x = torch.randn(3, 5, 24)
    assert torch.allclose(layer(x), nn.functional.linear(x, masked, linear.bias), atol=1e-6)
    # The values' gradient is the dense weight's gradient at the kept positions.
    dense = masked.clone().requires_grad_(True)
    (nn.functional.linear(x, dense, linear.bias) ** 2).sum().backward()
    (layer(x) ** 2).sum().backward()
    assert torch.allclose(layer.values.grad, dense.grad[keep], atol=1e-5)
    with pytest.raises(ValueError, match="revives weights"):
        SparseLinear.from_linear(layer, torch.ones(10, 24, dtype=torch.bool))


# --- which weights go ---------------------------------------------------------------------------


W = [[0.5, -0.1, 0.3, -0.7], [0.2, 0.9, -0.2, 0.05], [-0.4, 0.6, 0.1, -0.8]]


@torch.no_grad()
def test_exactly_the_smallest_magnitudes_are_removed():
    model = hand_model(W, [[1.0, 1.0, 1.0]])
    record = apply(model, PruneMagnitudeConfig(targets="0", sparsity=0.5), ctx())
    # |w| sorted: 0.05, 0.1, 0.1, 0.2, 0.2, 0.3 | 0.4 ...: six of twelve go.
    expected = [[0.5, 0.0, 0.0, -0.7], [0.0, 0.9, 0.0, 0.0], [-0.4, 0.6, 0.0, -0.8]]
    assert torch.equal(model[0].to_dense(), torch.tensor(expected))
    assert record["layers"][0]["threshold"] == pytest.approx(0.3) and record["nnz"] == 6
    # 4 of 12: 0.05, 0.1, 0.1 and one of the two |0.2|: the tie is broken by position, the first one goes.
    model = hand_model(W, [[1.0, 1.0, 1.0]])
    apply(model, PruneMagnitudeConfig(targets="0", sparsity=1 / 3), ctx())
    expected = [[0.5, 0.0, 0.3, -0.7], [0.0, 0.9, -0.2, 0.0], [-0.4, 0.6, 0.0, -0.8]]
    assert torch.equal(model[0].to_dense(), torch.tensor(expected))


A = [[0.1, -0.2, 0.3], [-0.4, 0.5, 0.6]]
B = [[-0.05, 0.35], [0.45, -0.9], [1.0, 2.0]]


@torch.no_grad()
def test_global_and_per_layer_thresholds():
    model = hand_model(A, B)
    record = apply(model, PruneMagnitudeConfig(targets="0|2", sparsity=0.5, scope="per_layer"), ctx())
    assert torch.equal(model[0].to_dense(), torch.tensor([[0.0, 0.0, 0.0], [-0.4, 0.5, 0.6]]))
    assert torch.equal(model[2].to_dense(), torch.tensor([[0.0, 0.0], [0.0, -0.9], [1.0, 2.0]]))
    assert [x["threshold"] for x in record["layers"]] == pytest.approx([0.3, 0.45])
    assert [x["nnz"] for x in record["layers"]] == [3, 3]
    # One ranking over both: 0.05 (B), 0.1, 0.2, 0.3 (A), 0.35 (B), 0.4 (A) go; A loses 4, B 2.
    model = hand_model(A, B)
    record = apply(model, PruneMagnitudeConfig(targets="0|2", sparsity=0.5, scope="global"), ctx())
    assert torch.equal(model[0].to_dense(), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.6]]))
    assert torch.equal(model[2].to_dense(), torch.tensor([[0.0, 0.0], [0.45, -0.9], [1.0, 2.0]]))
    assert [x["threshold"] for x in record["layers"]] == pytest.approx([0.4, 0.4])
    assert [x["sparsity"] for x in record["layers"]] == pytest.approx([4 / 6, 2 / 6], abs=1e-6)
    assert record["sparsity"] == 0.5 and record["rounds"][0]["threshold"] == pytest.approx(0.4)


def test_cubic_schedule_by_hand():
    # s_t = 0.8 + (0 - 0.8)(1 - t/4)^3: (3/4)^3 = 27/64, (1/2)^3 = 1/8, (1/4)^3 = 1/64, 0.
    assert cubic_schedule(0.0, 0.8, 4) == pytest.approx([0.8 * 37 / 64, 0.7, 0.7875, 0.8])
    assert cubic_schedule(0.2, 0.6, 2) == pytest.approx([0.55, 0.6])
    assert cubic_schedule(0.3, 0.5, 1) == [0.5]


# --- the three architectures --------------------------------------------------------------------


@torch.no_grad()
def test_zero_sparsity_leaves_logits_unchanged():
    for build in (tiny_gpt2, tiny_llama, tiny_bert):
        model = build()
        before = logits(model)
        record = apply(model, PruneMagnitudeConfig(sparsity=0.0), ctx())
        assert record["sparsity"] == 0.0 and record["nnz"] == record["params"]
        assert all(isinstance(m, SparseLinear) for _, m in find_targets_all(model))
        assert torch.allclose(logits(model), before, atol=1e-5)


def find_targets_all(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]


@torch.no_grad()
def test_gpt2_conv1d_orientation_and_per_layer_counts():
    model = tiny_gpt2()
    reference = tiny_gpt2()
    record = apply(model, PruneMagnitudeConfig(sparsity=0.75), ctx())
    assert [x["name"] for x in record["layers"]] == [
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    for x in record["layers"]:
        dense = reference.get_submodule(x["name"]).weight.T  # Conv1D stores (in, out)
        layer = model.get_submodule(x["name"])
        assert x["nnz"] == round(0.25 * dense.numel()) and x["sparsity"] == 0.75
        kept = layer.kept()
        assert torch.equal(layer.to_dense()[kept], dense[kept])
        assert float(dense.abs()[~kept].max()) <= float(dense.abs()[kept].min())  # the small ones went
    c_attn = record["layers"][0]
    assert c_attn["shape"] == [192, 64] and c_attn["values_bytes"] == 192 * 64 // 4 * 4
    assert c_attn["mask_bytes"] == 192 * 64 // 8 and c_attn["bytes_before"] == 192 * 64 * 4
    assert record["ratio"] == pytest.approx(0.25 + 1 / 32, abs=1e-6)


@torch.no_grad()
def test_llama_keeps_tied_embeddings_and_filters():
    model = tiny_llama()
    record = apply(model, PruneMagnitudeConfig(sparsity=0.5, layers=[1], exclude=r".*\.o_proj"), ctx())
    assert len(record["layers"]) == 6  # q, k, v (GQA: 32 out), gate, up, down of block 1
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.o_proj, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    k_proj = next(x for x in record["layers"] if x["name"].endswith("k_proj"))
    assert k_proj["shape"] == [32, 64] and k_proj["nnz"] == 32 * 64 // 2


def test_bert_is_pruned_one_shot_and_refuses_gradual():
    model = tiny_bert()
    record = apply(model, PruneMagnitudeConfig(sparsity=0.5), ctx())
    assert len(record["layers"]) == 12 and record["sparsity"] == 0.5
    cfg = PruneMagnitudeConfig(sparsity=0.5, schedule="gradual", prune_steps=2, steps_per_round=1)
    with pytest.raises(LlmshrinkError) as info:
        apply(tiny_bert(), cfg, ctx())
    assert str(info.value) == (
        "prune_magnitude.schedule: gradual distils between rounds and BertForMaskedLM is not a causal "
        "language model; use schedule: one_shot"
    )


# --- gradual ------------------------------------------------------------------------------------


def test_gradual_reaches_final_sparsity_with_pruned_weights_zero_throughout(tiny_text, monkeypatch):
    model = tiny_llama()
    context = Context(tokenizer=tiny_tokenizer(), teacher=copy.deepcopy(model),
                      data=DataSpec(source=str(tiny_text), max_tokens=16 * 32), log=lambda _: None)
    real_distill = distill_pass.apply
    seen = {"rounds": 0, "forwards": 0}
    previous: dict[str, torch.Tensor] = {}

    def checked_distill(model, cfg, ctx):
        """Around each round's training: the mask never changes and pruned weights read zero at every forward."""
        layers = dict(find_targets_all(model))
        kept = {name: layer.kept().clone() for name, layer in layers.items()}
        for name in kept:  # each round prunes only among the previous round's survivors
            assert name not in previous or not bool((kept[name] & ~previous[name]).any())
        values = {name: layer.values.detach().clone() for name, layer in layers.items()}

        def zero_at_pruned(layer, _args, name):
            assert not bool(layer.scattered_weight()[~kept[name]].any())
            seen["forwards"] += 1

        hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: zero_at_pruned(m, a, n))
                 for name, layer in layers.items()]
        try:
            record = real_distill(model, cfg, ctx)
        finally:
            for hook in hooks:
                hook.remove()
        for name, layer in layers.items():
            assert model.get_submodule(name) is layer and torch.equal(layer.kept(), kept[name])
            assert not torch.equal(layer.values.detach(), values[name])  # the survivors trained
        previous.update(kept)
        seen["rounds"] += 1
        return record

    monkeypatch.setattr(distill_pass, "apply", checked_distill)
    cfg = PruneMagnitudeConfig.model_validate({
        "sparsity": 0.6, "schedule": "gradual", "prune_steps": 3, "steps_per_round": 2, "targets": r".*\.mlp\..*",
        "distill": {"batch_size": 2, "seq_len": 16, "lr": 1e-2, "warmup_steps": 0},
    })
    record = apply(model, cfg, context)
    schedule = [0.6 * 19 / 27, 0.6 * 26 / 27, 0.6]  # 0.6 - 0.6 (1 - t/3)^3
    assert seen["rounds"] == 3 and seen["forwards"] >= 3 * 2 * 6  # 2 steps x 6 MLP layers per round
    assert record["sparsity_per_round"] == pytest.approx(schedule, abs=1e-6)
    assert [r["sparsity"] for r in record["rounds"]] == pytest.approx(schedule, abs=1e-3)
    assert [r["distill"]["steps"] for r in record["rounds"]] == [2, 2, 2]
    assert record["sparsity"] == pytest.approx(0.6, abs=1e-4)  # 7373 of 12288 per layer: 0.6 x 12288 rounded
    assert all(x["nnz"] == 12288 - 7373 for x in record["layers"])
    for name, layer in find_targets_all(model):
        assert layer.nnz == round(0.4 * layer.in_features * layer.out_features)
        assert torch.equal(layer.kept(), previous[name])


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sparsity": 1.0}, ".sparsity: input should be less than 1, got 1.0"),
        ({"sparsity": -0.1}, ".sparsity: input should be greater than or equal to 0, got -0.1"),
        ({}, ".sparsity: required field is missing"),
        ({"sparsity": 0.5, "scope": "layer"}, ".scope: input should be 'per_layer' or 'global', got 'layer'"),
        ({"sparsity": 0.5, "prune_steps": 3}, ": prune_steps: only for schedule: gradual, got "
         "{'sparsity': 0.5, 'prune_steps': 3}"),
        ({"sparsity": 0.5, "schedule": "gradual", "prune_steps": 3}, ": schedule: gradual needs steps_per_round, "
         "got {'sparsity': 0.5, 'schedule': 'gradual', 'prune_steps': 3}"),
        ({"sparsity": 0.5, "schedule": "gradual", "prune_steps": 2, "steps_per_round": 5, "initial_sparsity": 0.7},
         ": initial_sparsity 0.7 exceeds the final sparsity 0.5, got {'sparsity': 0.5, 'schedule': 'gradual', "
         "'prune_steps': 2, 'steps_per_round': 5, 'initial_sparsity': 0.7}"),
        ({"sparsity": 0.5, "schedule": "gradual", "prune_steps": 2, "steps_per_round": 5, "distill": {"steps": 9}},
         ".distill.steps: set by prune_magnitude.steps_per_round; remove it, got 9"),
        ({"sparsity": 0.5, "schedule": "gradual", "prune_steps": 2, "steps_per_round": 5, "distill": {"lr": 0}},
         ".distill.lr: input should be greater than 0, got 0"),
    ],
)
def test_bad_config_is_one_line(body, message):
    assert stage_error("prune_magnitude", body) == message


def test_tied_lm_head_is_refused_then_untied_on_request():
    model = tiny_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, PruneMagnitudeConfig(targets="lm_head", sparsity=0.5), ctx())
    assert str(info.value) == (
        "prune_magnitude.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to prune it alone (the other stays dense)"
    )
    assert isinstance(model.lm_head, nn.Linear)  # refused before anything changed
    record = apply(model, PruneMagnitudeConfig(targets="lm_head", sparsity=0.5, tied_embeddings="untie"), ctx())
    assert record["untied"] == ["lm_head"] and model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head, SparseLinear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding keeps every weight
    assert torch.equal(model.lm_head.to_dense()[model.lm_head.kept()], embedding[model.lm_head.kept()])


# --- storage and checkpoints --------------------------------------------------------------------


def test_half_sparsity_shrinks_the_safetensors_file(tmp_path):
    dense, pruned = tiny_llama(), tiny_llama()
    apply(pruned, PruneMagnitudeConfig(sparsity=0.5), ctx())
    out_dense, out_pruned = save_tiny(dense, tmp_path / "dense"), save_tiny(pruned, tmp_path / "pruned")
    block_weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 192)  # q, o, k, v, gate, up, down x 2 blocks
    assert tensor_bytes(out_pruned, ".values") == block_weights // 2 * 4  # half the fp32 weights
    assert tensor_bytes(out_pruned, ".mask") == block_weights // 8  # one bit per weight
    size = {name: (out / "model.safetensors").stat().st_size for name, out in (("dense", out_dense),
                                                                                ("pruned", out_pruned))}
    saved = size["dense"] - size["pruned"]
    assert block_weights * (4 - 2.125) - 4096 <= saved <= block_weights * (4 - 2.125)  # up to header growth


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """GPT-2 (per layer, 50%), Llama (global, 70%) and BERT (per layer, 30%), pruned and saved."""
    return apply_and_save(tmp_path_factory.mktemp("pruned"), apply, {
        "gpt2": PruneMagnitudeConfig(sparsity=0.5), "llama": PruneMagnitudeConfig(sparsity=0.7, scope="global"),
        "bert": PruneMagnitudeConfig(sparsity=0.3)})


def test_checkpoints_reload_exactly(saved):
    for model, out, _ in saved.values():
        loaded = load_checkpoint(out)
        assert torch.equal(logits(loaded), logits(model))
        original = {k: v for k, v in model.state_dict().items() if k.endswith((".values", ".mask"))}
        reloaded = loaded.state_dict()
        assert original and all(torch.equal(reloaded[k], v) and reloaded[k].dtype == v.dtype
                                for k, v in original.items())


def test_remote_code_reloads_exactly_without_llmshrink(saved):
    reloaded = reload_without_llmshrink({name: out for name, (_, out, _) in saved.items()}, IDS,
                                        auto={name: auto for name, (_, _, auto) in saved.items()}, layer="SparseLinear")
    assert list(reloaded) == list(saved)
    for name, got in reloaded.items():
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert got["layers"] and all(module.startswith(f"transformers_modules.{name}.")
                                     and module.endswith(".sparse") for module in got["layers"])
        assert torch.equal(got["logits"], logits(saved[name][0]))
