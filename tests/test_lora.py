"""The lora pass: peft adapters injected in place on GPT-2 (Conv1D), Llama, BERT and llmshrink's compressed layers;
training only the adapters, merging (exact), saving in peft's format and reloading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import n_params, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from pydantic import ValidationError
from torch import nn

from llmshrink.checkpoint import save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.clustered import ClusteredLinear
from llmshrink.modules.kronecker import KroneckerLinear
from llmshrink.modules.low_rank import LowRankLinear
from llmshrink.passes.lora import (
    LoraPassConfig,
    apply,
    load_adapter,
    lora_settings,
    merge_lora,
    save_adapter,
    unload_lora,
)
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
QUIET = Context(tokenizer=None, log=lambda _: None)
# (out, in) of every block layer: GPT-2 c_attn (fused qkv), c_proj, c_fc, mlp.c_proj; Llama q, k, v, o
# (GQA: k and v project to 2 heads of 16), gate, up, down.
SHAPES = {
    "gpt2": [(192, 64), (64, 64), (256, 64), (64, 256)],
    "llama": [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)],
}


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_adapters(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> None:
    """A few Adam steps of next-token loss on random ids, over the parameters with requires_grad."""
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def compressed_gpt2() -> nn.Module:
    """Tiny GPT-2 whose block-0 MLP input is a LowRankLinear and block-1's a KroneckerLinear."""
    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc = LowRankLinear.from_linear(model.transformer.h[0].mlp.c_fc, 8)
    model.transformer.h[1].mlp.c_fc = KroneckerLinear.from_linear(model.transformer.h[1].mlp.c_fc, (16, 8), (16, 8))
    return model


@pytest.mark.parametrize("arch", MODELS)
def test_adapter_params_and_unchanged_logits_at_init(arch):
    model = MODELS[arch]()
    before, count_before = logits(model), n_params(model)
    record = apply(model, LoraPassConfig(r=4), QUIET)
    shapes = [tuple(layer["shape"]) for layer in record["layers"]]
    assert shapes == SHAPES[arch] * 2  # every attention and MLP projection of both blocks, nothing else
    per_layer = [4 * (out + inp) for out, inp in shapes]
    assert [layer["params"] for layer in record["layers"]] == per_layer
    assert record["adapter_params"] == sum(per_layer) == n_params(model) - count_before
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == sum(per_layer) and all(".lora_" in name for name in trainable)
    assert record["fan_in_fan_out"] is (arch == "gpt2")
    assert torch.equal(logits(model), before)  # B = 0: the adapters add exactly nothing
    assert lora_settings(model) == {"merge": False}


@pytest.mark.parametrize("arch", MODELS)
def test_trained_adapter_merges_saves_and_reloads(arch, tmp_path):
    model = MODELS[arch]()
    original = params(model)
    apply(model, LoraPassConfig(r=4, alpha=8), QUIET)
    start = params(model)
    train_adapters(model)
    trained = logits(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, start[name])}
    assert changed and all(".lora_B." in name or ".lora_A." in name for name in changed)
    assert (trained - logits(MODELS[arch]())).abs().max() > 1e-3  # the adapters did learn something

    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(MODELS[arch](), str(out))  # plain peft, a fresh base
    assert torch.allclose(logits(reloaded), trained, atol=1e-6)
    peft_merged = logits(reloaded.merge_and_unload())

    assert merge_lora(model) == 2 * len(SHAPES[arch])
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert lora_settings(model) is None
    assert params(model).keys() == original.keys()  # the plain architecture again, nothing left over
    assert all(p.requires_grad for p in model.parameters())  # the flags from before the adapters
    merged = logits(model)
    assert torch.allclose(merged, trained, atol=1e-5) and torch.allclose(merged, peft_merged, atol=1e-5)


def test_unload_restores_the_base_exactly():
    model = tiny_llama()
    before, original = logits(model), params(model)
    apply(model, LoraPassConfig(r=2, targets=[r".*\.q_proj", r".*\.down_proj"]), QUIET)
    train_adapters(model, steps=2)
    assert unload_lora(model) == 4
    after = params(model)
    assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)
    assert torch.equal(logits(model), before)


def test_compressed_layers_get_adapters_merge_and_reload(tmp_path):
    model = compressed_gpt2()
    base = copy.deepcopy(model)
    record = apply(model, LoraPassConfig(r=4, targets=r".*\.mlp\.c_fc"), QUIET)
    assert [(layer["type"], layer["params"]) for layer in record["layers"]] == [
        ("LowRankLinear", 4 * (256 + 64)), ("KroneckerLinear", 4 * (256 + 64)),
    ]
    assert torch.equal(logits(model), logits(base))
    start = params(model)
    train_adapters(model)
    trained = logits(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, start[name])}
    assert changed == {f"transformer.h.{i}.mlp.c_fc.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}

    out = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="is not supported"):  # peft does not save the custom-module mapping
        PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), out)), trained, atol=1e-6)

    with pytest.raises(LlmshrinkError, match=r"^merge_lora: transformer\.h\.1\.mlp\.c_fc is a KroneckerLinear"):
        merge_lora(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc, LoraLayer)  # nothing merged: all or nothing
    unload_lora(model)
    assert torch.equal(logits(model), logits(base))


def test_low_rank_merge_grows_the_rank_exactly():
    model = compressed_gpt2()
    apply(model, LoraPassConfig(r=4, targets=r".*\.h\.0\.mlp\.c_fc", merge=True), QUIET)
    train_adapters(model)
    trained = logits(model)
    merge_lora(model)
    layer = model.transformer.h[0].mlp.c_fc
    assert type(layer) is LowRankLinear and layer.rank == 12 and layer.layout_args()["rank"] == 12
    assert tuple(layer.u.shape) == (256, 12) and tuple(layer.v.shape) == (12, 64)
    assert torch.allclose(logits(model), trained, atol=1e-5)


def test_bert_gets_adapters_too():
    model = tiny_bert()
    before = logits(model)
    record = apply(model, LoraPassConfig(r=2), QUIET)
    names = [layer["name"] for layer in record["layers"]]
    assert names == [f"bert.encoder.layer.{i}.{n}" for i in (0, 1) for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    assert torch.equal(logits(model), before)
    adapter_weights = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in adapter_weights:
            p.normal_(std=0.05)  # a non-zero update without a training loop (BERT is no next-token model)
    unmerged = logits(model)
    assert (unmerged - before).abs().max() > 1e-3
    merge_lora(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


def test_distill_stage_trains_only_the_adapters_then_merged_checkpoint_reloads(tiny_text, tmp_path):
    model = compressed_gpt2()
    apply(model, LoraPassConfig(r=4, targets=r".*\.(attn\.c_attn|h\.0\.mlp\.c_fc)", merge=True), QUIET)
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    start = params(model)
    ctx = Context(tokenizer=tiny_tokenizer(), data=DataSpec(source=str(tiny_text), max_tokens=8 * 32),
                  log=lambda _: None)
    distill = get_pass("distill")
    record = distill.apply(model, distill.config_cls(steps=3, seq_len=32, lr=1e-2, warmup_steps=0, alpha=0.0), ctx)
    assert record["trained_params"] == 4 * ((192 + 64) * 2 + (256 + 64))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, start[name])}
    assert changed and changed <= adapters and all(".lora_" in name for name in adapters)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == adapters  # distill restored them

    trained = logits(model)
    assert lora_settings(model) == {"merge": True}
    merge_lora(model)  # what the engine does at the end of the recipe when merge: true
    assert torch.allclose(logits(model), trained, atol=1e-5)
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", recipe_text="", manifest={}, model_card="")
    reloaded = load_checkpoint(out)
    assert reloaded.transformer.h[0].mlp.c_fc.rank == 12
    assert not any(isinstance(m, LoraLayer) for m in reloaded.modules())
    assert torch.equal(logits(reloaded), logits(model))


def test_errors_are_one_clear_line():
    with pytest.raises(LlmshrinkError) as err:
        apply(tiny_gpt2(), LoraPassConfig(targets=r".*\.q_proj"), QUIET)
    assert str(err.value) == (
        r"lora.targets: '.*\\.q_proj' matches no layer LoRA can attach to (Linear, Conv1D, LowRankLinear, "
        "KroneckerLinear, bitsandbytes Linear4bit/Linear8bitLt (QLoRA)); layer names look like transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj, "
        "transformer.h.0.mlp.c_fc, transformer.h.0.mlp.c_proj"
    )

    clustered = tiny_gpt2()
    mlp = clustered.transformer.h[0].mlp
    mlp.c_fc = ClusteredLinear.from_clusters(mlp.c_fc, torch.zeros(4), torch.zeros(256, 64, dtype=torch.long))
    with pytest.raises(LlmshrinkError) as err:
        apply(clustered, LoraPassConfig(), QUIET)
    assert str(err.value) == (
        "lora.targets: transformer.h.0.mlp.c_fc is a ClusteredLinear; LoRA attaches only to Linear, Conv1D, "
        "LowRankLinear, KroneckerLinear, bitsandbytes Linear4bit/Linear8bitLt (QLoRA) layers: leave it out of targets or add it to exclude"
    )
    assert len(apply(clustered, LoraPassConfig(exclude=r".*\.c_fc"), QUIET)["layers"]) == 6

    with pytest.raises(LlmshrinkError) as err:
        apply(compressed_gpt2(), LoraPassConfig(merge=True), QUIET)
    assert str(err.value) == (
        "lora.merge: transformer.h.1.mlp.c_fc is a KroneckerLinear, whose factors cannot absorb a LoRA update "
        "exactly; use merge: false (the adapter is saved beside the model) or exclude it"
    )
    with pytest.raises(LlmshrinkError) as err:
        apply(tiny_llama(), LoraPassConfig(targets="lm_head", merge=True), QUIET)
    assert str(err.value) == (
        "lora.merge: lm_head shares its weight with model.embed_tokens (tied embeddings), which a merge would "
        "change too; exclude it or use merge: false"
    )
    with pytest.raises(LlmshrinkError) as err:
        apply(compressed_gpt2(), LoraPassConfig(r=60, targets=r".*\.h\.0\.mlp\.c_fc", merge=True), QUIET)
    assert str(err.value) == (
        "lora.merge: transformer.h.0.mlp.c_fc: LowRankLinear rank 8 + r 60 exceeds min(256, 64); "
        "lower r or use merge: false"
    )

    twice = tiny_gpt2()
    apply(twice, LoraPassConfig(), QUIET)
    with pytest.raises(LlmshrinkError) as err:
        apply(twice, LoraPassConfig(), QUIET)
    assert str(err.value) == "lora: the model already has LoRA adapters; use one lora stage per recipe"
    with pytest.raises(LlmshrinkError) as err:
        save_adapter(tiny_gpt2(), Path("unused"))
    assert str(err.value) == "save_adapter: the model has no LoRA adapters"


def test_config_validation():
    with pytest.raises(ValidationError, match=r"not a valid regex \(missing \), unterminated subpattern"):
        LoraPassConfig(targets="(q_proj")
    with pytest.raises(ValidationError, match="give at least one regex"):
        LoraPassConfig(targets=[])
    with pytest.raises(ValidationError, match="extra"):
        LoraPassConfig(rank=4)
    assert LoraPassConfig(targets=["a", "b"]).pattern() == "(?:a)|(?:b)"
    assert get_pass("lora").config_cls is LoraPassConfig
