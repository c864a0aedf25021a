"""One targeting vocabulary: every pass that touches layers takes targets, exclude and layers (and, where it
replaces a weight that may be tied, tied_embeddings), and they select the same layers everywhere."""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer
from pydantic import ValidationError

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.fields import Regex
from llmshrink.registry import get_pass, pass_names
from llmshrink.specs import DataSpec
from llmshrink.targeting import check_tied, shared_weight_names, untie

# Passes that choose Linear/Conv1D layers (or the blocks' FFN / attention modules) by name.
LAYER_PASSES = {
    "cluster", "kronecker", "local_distill", "lora", "low_rank", "prune_ffn", "prune_heads", "prune_magnitude",
    "qat", "quantize", "tensorize",
}
# Passes that do not choose layers by name, and why.
EXEMPT = {
    "distill": "trains the whole model (or its `train:` selection); it replaces no layer",
    "drop_layers": "removes whole blocks, chosen by index (`layers`) or by measured influence",
    "share_layers": "shares whole blocks, by index (`share_map`) or by measured similarity",
    "iterate": "runs other passes, which take their own targets; its `layers` are the blocks to walk",
    "finetune": "trains the whole encoder on its task; it replaces no layer",
    "task_distill": "trains the whole encoder from the teacher on its task; it replaces no layer",
}
# Of LAYER_PASSES, those that replace a layer's weight, which may be tied to the embeddings (lm_head).
TIED_POLICY = {"cluster", "kronecker", "low_rank", "prune_magnitude", "quantize", "tensorize"}
# The rest, and why they need no tied_embeddings.
NO_TIED_POLICY = {
    "qat": "always refuses a tied target: the int8 layer a later quantize makes could not stay tied either",
    "lora": "adds an adapter beside the weight; merge: true refuses a tied target",
    "local_distill": "trains compressed layers, which own their weights",
    "prune_ffn": "resizes block FFNs, never the embeddings",
    "prune_heads": "resizes block attentions, never the embeddings",
}
# The fewest settings each config needs to validate.
REQUIRED = {"cluster": {"bits": 2}, "local_distill": {"steps": 1}, "low_rank": {"rank": 2},
            "prune_magnitude": {"sparsity": 0.5}, "quantize": {"method": "int8-dynamic"}}
EXCLUDE_TEXT = ("regex (full match) of ", " to leave as they are")
LAYERS_TEXT = "only these block indices"


def test_every_registered_pass_is_classified():
    assert not LAYER_PASSES & set(EXEMPT)
    unclassified = sorted(set(pass_names()) - LAYER_PASSES - set(EXEMPT))
    assert not unclassified, f"add {unclassified} to LAYER_PASSES (with targets, exclude, layers) or to EXEMPT"
    assert not (LAYER_PASSES | set(EXEMPT)) - set(pass_names())  # no stale names
    assert TIED_POLICY | set(NO_TIED_POLICY) == LAYER_PASSES and not TIED_POLICY & set(NO_TIED_POLICY)


@pytest.mark.parametrize("name", sorted(LAYER_PASSES))
def test_layer_passes_accept_targets_exclude_and_layers(name):
    config = get_pass(name).config_cls
    fields = config.model_fields
    assert {"targets", "exclude", "layers"} <= set(fields)
    assert fields["exclude"].annotation == (Regex | None) and fields["exclude"].default is None
    assert fields["layers"].annotation == (list[int] | None) and fields["layers"].default is None
    assert all(text in fields["exclude"].description for text in EXCLUDE_TEXT), fields["exclude"].description
    assert LAYERS_TEXT in fields["layers"].description
    required = REQUIRED.get(name, {})
    cfg = config(**required, targets=r".*\.1\..*", exclude=r".*\.v_proj", layers=[1, 2])
    assert (cfg.targets, cfg.exclude, cfg.layers) == (r".*\.1\..*", r".*\.v_proj", [1, 2])
    for bad in ({"targets": "("}, {"exclude": "("}, {"layers": "1"}, {"layers": [1.5]}):
        with pytest.raises(ValidationError):
            config(**required, **bad)


@pytest.mark.parametrize("name", sorted(TIED_POLICY))
def test_weight_replacing_passes_take_a_tied_embeddings_policy(name):
    field = get_pass(name).config_cls.model_fields["tied_embeddings"]
    assert field.annotation == Literal["refuse", "untie"] and field.default == "refuse"


# --- the shared tied-embedding helper ----------------------------------------------------------------------


def test_check_tied_refuses_with_one_message_or_lists_the_names_to_untie():
    model = tiny_llama()
    targets = [(name, model.get_submodule(name)) for name in ("model.layers.0.mlp.up_proj", "lm_head")]
    with pytest.raises(LlmshrinkError) as info:
        check_tied(model, targets, "refuse", "kronecker", "compress it")
    assert str(info.value) == (
        "kronecker.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to compress it alone (the other stays dense)"
    )
    with pytest.raises(LlmshrinkError) as info:
        check_tied(model, targets, "refuse", "quantize", "run it in int8", note=None)
    assert str(info.value).endswith("set tied_embeddings: untie to run it in int8 alone")
    assert check_tied(model, targets, "untie", "kronecker", "compress it") == ["lm_head"]
    assert check_tied(model, targets[:1], "refuse", "kronecker", "compress it") == []
    assert model.lm_head.weight is model.model.embed_tokens.weight  # checking changes nothing


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_untie_gives_the_head_its_own_copy(build):
    model = build()
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    untie(model, "lm_head")
    head = model.lm_head.weight
    assert head is not embedding and head.data_ptr() != embedding.data_ptr()
    assert torch.equal(head, before) and torch.equal(embedding, before) and head.requires_grad
    assert shared_weight_names(model, "lm_head") == [] and model.config.tie_word_embeddings is False
    with torch.no_grad():
        head.zero_()
    assert torch.equal(embedding, before)  # separate tensors


@pytest.mark.parametrize("name", sorted(TIED_POLICY))
def test_every_tied_policy_pass_refuses_a_tied_head_in_the_same_words(name):
    settings = {**REQUIRED.get(name, {}), "targets": "lm_head"}
    if name == "kronecker":
        settings["a_shape"] = [8, 8]
    with pytest.raises(LlmshrinkError) as info:
        get_pass(name).apply(tiny_llama(), get_pass(name).config_cls(**settings), Context(tokenizer=None,
                                                                                        log=lambda _: None))
    assert str(info.value).startswith(
        f"{name}.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to "
    )


# --- layers and exclude choose the same layers in the passes that gained them ------------------------------

ATTENTION = [f"model.layers.1.self_attn.{p}_proj" for p in ("q", "k", "v", "o")]
MLP = [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
QUIET = Context(tokenizer=None, log=lambda _: None)


def of_type(model, kind: str) -> list[str]:
    return [name for name, m in model.named_modules() if type(m).__name__ == kind]


def test_qat_layers_and_exclude():
    from llmshrink.passes.qat import QatConfig, apply

    model = tiny_llama(layers=3)
    record = apply(model, QatConfig(layers=[1], exclude=r".*\.mlp\..*"), QUIET)
    assert [layer["name"] for layer in record["layers"]] == ATTENTION
    assert of_type(model, "FakeQuantLinear") == ATTENTION
    assert [layer["shape"] for layer in record["layers"]] == [[64, 64], [32, 64], [32, 64], [64, 64]]


def test_quantize_layers_and_exclude():
    from llmshrink.passes.quantize import QuantizeConfig, apply

    model = tiny_llama(layers=3)
    record = apply(model, QuantizeConfig(method="int8-dynamic", layers=[1], exclude=r".*self_attn.*"), QUIET)
    assert [layer["name"] for layer in record["layers"]] == MLP
    assert of_type(model, "Int8DynamicLinear") == MLP
    assert record["bytes_before"] == 3 * 64 * 192 * 4  # three 192x64 fp32 weights, no biases


def test_lora_layers_and_exclude():
    from llmshrink.passes.lora import LoraPassConfig, apply, unload_lora

    model = tiny_llama(layers=3)
    record = apply(model, LoraPassConfig(r=2, layers=[1], exclude=r".*\.k_proj"), QUIET)
    chosen = [name for name in ATTENTION + MLP if not name.endswith("k_proj")]
    assert [layer["name"] for layer in record["layers"]] == chosen
    # r x (in + out): q 64+64, v 64+32, o 64+64, gate and up 64+192, down 192+64
    assert record["adapter_params"] == 2 * (128 + 96 + 128 + 3 * 256) == 2240
    assert sorted(model.peft_config["default"].target_modules) == sorted(chosen)
    # A list of regexes takes layers too.
    unload_lora(model)
    record = apply(model, LoraPassConfig(targets=[r".*\.q_proj", r".*\.down_proj"], layers=[0, 2]), QUIET)
    assert [layer["name"] for layer in record["layers"]] == [
        f"model.layers.{i}.{p}" for i in (0, 2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    unload_lora(model)
    with pytest.raises(LlmshrinkError, match=r"^lora.targets: '.\*\\\\.q_proj' matches no layer .* in layers \[7\]; "):
        apply(model, LoraPassConfig(targets=r".*\.q_proj", layers=[7]), QUIET)


def test_local_distill_layers_and_exclude(tiny_text):
    from llmshrink.passes.kronecker import KroneckerConfig
    from llmshrink.passes.kronecker import apply as kronecker
    from llmshrink.passes.local_distill import LocalDistillConfig, apply

    model = tiny_llama(layers=3, intermediate_size=128, tie_word_embeddings=False)
    teacher = copy.deepcopy(model).requires_grad_(False)
    kronecker(model, KroneckerConfig(targets=r".*\.mlp\..*", a_shape=[8, 8], permute=False), QUIET)
    assert len(of_type(model, "KroneckerLinear")) == 9
    ctx = Context(tokenizer=tiny_tokenizer(), teacher=teacher, data=DataSpec(source=str(tiny_text)),
                  log=lambda _: None)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = LocalDistillConfig(steps=2, batch_size=1, seq_len=16, warmup_steps=0, layers=[1], exclude=r".*down_proj")
    record = apply(model, cfg, ctx)
    assert record["layers"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    # gate and up: 128x64 = (8x8) ⊗ (16x8), one term each: 64 + 128 parameters
    assert record["trained_params"] == 2 * (64 + 128)
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, untouched[n]))
    assert changed and all(n.startswith(("model.layers.1.mlp.gate_proj.", "model.layers.1.mlp.up_proj."))
                           for n in changed)
