"""Every architecture and precision pass on the two ways llmshrink runs BERT encoders: a sequence classifier
(model.task: sequence_classification, BertForSequenceClassification) and a bare encoder (model.task: embedding,
BertModel). Each pass runs at its no-compression setting (or, for the lossy precision passes, its only one):
the outputs (logits / last_hidden_state, on a padded batch) stay those of the unmodified model within the
case's tolerance, and the checkpoint reloads to exactly the compressed model's outputs, with llmshrink
(load_checkpoint) and with plain transformers (remote code, llmshrink not importable)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import calibrated, quiet_ctx, relative, reload_without_llmshrink, save_tiny
from test_cluster import share_values  # weights drawn from k values: k clusters are lossless
from test_low_rank import make_low_rank_  # exact rank-r weights: rank r is lossless
from torch import nn

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.registry import get_pass

# Two rows, the second padded (pad id 1, masked out).
IDS = torch.tensor([[2, 5, 9, 33, 4, 60, 7, 48, 3, 3], [4, 8, 15, 16, 23, 42, 0, 1, 1, 1]])
MASK = (torch.arange(IDS.shape[1]) < torch.tensor([[10], [7]])).long()
KINDS = ("classifier", "encoder")
AUTO = {"classifier": "AutoModelForSequenceClassification", "encoder": "AutoModel"}


def tiny_encoder(kind: str) -> nn.Module:
    """A seeded tiny random BERT: BertForSequenceClassification (2 labels) or a bare BertModel."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=64, pad_token_id=1, num_labels=2)
    return (BertForSequenceClassification if kind == "classifier" else BertModel)(config).eval()


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    """The classifier's logits, the encoder's last hidden state (padded positions included), in float32."""
    out = model(input_ids=IDS, attention_mask=MASK)
    return (out.logits if "logits" in out else out.last_hidden_state).float()


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.encoder.layer


@torch.no_grad()
def identical_neighbours(model: nn.Module) -> None:
    """Block 1 a copy of block 0, so that sharing one for both changes nothing."""
    blocks(model)[1].load_state_dict(blocks(model)[0].state_dict())


def without_removed(model: nn.Module, record: dict) -> None:
    """drop_layers by hand: the blocks its record says it removed taken out of the list."""
    for index in sorted(record["removed"], reverse=True):
        del blocks(model)[index]
    model.config.num_hidden_layers = len(blocks(model))


@dataclass(frozen=True)
class Case:
    pass_name: str
    config: dict[str, Any]
    # Largest max |outputs - base outputs| allowed (0.0: bit-identical), and for the lossy passes the largest
    # relative error ||out - base|| / ||base||, with the outputs required to differ from the base.
    atol: float
    lossy: float | None = None
    layer: str = ""  # a module class the pass must have put in (the pass really ran), "" for none
    setup: Callable[[nn.Module], None] | None = None  # on the model before the base outputs are taken
    # (a copy of the base, the pass's record) -> what the pass must have made of it, by hand
    reference: Callable[[nn.Module, dict], None] | None = None
    data: bool = False  # runs on calibration tokens (conftest's calibrated context), not on the weights alone


BLOCK_LAYERS = r".*\.\d+\..*"  # query, key, value, attention.output.dense, intermediate.dense, output.dense
# Lossless settings: 0.0 where nothing is recomputed, 1e-5 where a factorisation exact in exact arithmetic is
# rounded to float32 (measured: at most 4.8e-7). Lossy bounds: about twice what these seeded models give.
CASES = {
    # A: 2x2, B: the rest; 4 terms = the rank of the 4-row rearrangement: the nearest Kronecker sum is W itself.
    "kronecker": Case("kronecker", {"targets": BLOCK_LAYERS, "a_shape": (2, 2), "rank": 4, "permute": False},
                      atol=1e-5, layer="KroneckerLinear"),
    # Full rank (min(m, n) = 64) saves nothing: every layer is kept dense. Rank 8 of exact rank-8 weights is lossless.
    "low_rank": Case("low_rank", {"rank": 64}, atol=0.0),
    "low_rank-exact": Case("low_rank", {"rank": 8}, atol=1e-5, layer="LowRankLinear",
                           setup=lambda m: make_low_rank_(m, BLOCK_LAYERS, 8)),
    "low_rank-activation_aware": Case("low_rank", {"rank": 8, "activation_aware": True, "calibration_tokens": 256},
                                      atol=1e-5, layer="LowRankLinear", data=True,
                                      setup=lambda m: make_low_rank_(m, BLOCK_LAYERS, 8)),
    # Tucker with every mode's rank its size (an int caps each mode): the core holds all of W.
    "tensorize": Case("tensorize", {"targets": BLOCK_LAYERS, "method": "tucker", "rank": 16,
                                    "shape": {128: [8, 16], 64: [8, 8]}}, atol=1e-5, layer="TensorizedLinear"),
    "prune_heads": Case("prune_heads", {"importance": "magnitude", "keep": 1.0}, atol=0.0),
    "prune_heads-output_norm": Case("prune_heads", {"importance": "output_norm", "keep": 1.0,
                                                    "calibration_tokens": 256}, atol=0.0, data=True),
    "prune_ffn": Case("prune_ffn", {"importance": "magnitude", "keep": 1.0}, atol=0.0),
    "prune_ffn-activation": Case("prune_ffn", {"importance": "activation", "keep": 1.0, "calibration_tokens": 256},
                                 atol=0.0, data=True),
    "drop_layers": Case("drop_layers", {"layers": []}, atol=0.0),
    # keep: 2 of 2 is refused (nothing to remove): one block goes, the one the influence picked.
    "drop_layers-influence": Case("drop_layers", {"keep": 1, "calibration_tokens": 256}, atol=0.0, data=True,
                                  reference=without_removed),
    "drop_layers-block": Case("drop_layers", {"layers": [1]}, atol=0.0, reference=without_removed),
    "share_layers": Case("share_layers", {"share_map": [0, 1]}, atol=0.0),
    "share_layers-outputs": Case("share_layers", {"unique_blocks": 2, "select": "outputs", "calibration_tokens": 256},
                                 atol=0.0, data=True),
    "share_layers-identical": Case("share_layers", {"mode": "repeat"}, atol=0.0, layer="SharedBlockRef",
                                   setup=identical_neighbours),
    "cluster": Case("cluster", {"bits": 2}, atol=1e-5, layer="ClusteredLinear", setup=lambda m: share_values(m, 4)),
    "prune_magnitude": Case("prune_magnitude", {"sparsity": 0.0}, atol=0.0),
    # Lossy: (max abs, relative) errors measured, worst of the two kinds: fp16 0.0041 / 1.6e-3, bf16 0.031 / 1.2e-2,
    # int8-dynamic 0.0022 / 1.3e-3 (+ embeddings 0.016 / 1.4e-2), nf4 0.017 / 1.4e-2, fp4 0.023 / 1.6e-2,
    # bnb-int8 0.0014 / 1.2e-3, qat 0.0016 / 8.9e-4 (activations: 0.0022 / 1.3e-3, int8-dynamic's exactly).
    "quantize-fp16": Case("quantize", {"method": "fp16"}, atol=0.01, lossy=4e-3),
    "quantize-bf16": Case("quantize", {"method": "bf16"}, atol=0.1, lossy=3e-2),
    "quantize-int8-dynamic": Case("quantize", {"method": "int8-dynamic"}, atol=0.01, lossy=3e-3,
                                  layer="Int8DynamicLinear"),
    "quantize-int8-dynamic-embeddings": Case("quantize", {"method": "int8-dynamic", "embeddings": True}, atol=0.05,
                                             lossy=3e-2, layer="Int8Embedding"),
    "quantize-bnb-nf4": Case("quantize", {"method": "bnb-nf4"}, atol=0.05, lossy=3e-2, layer="Linear4bit"),
    "quantize-bnb-fp4": Case("quantize", {"method": "bnb-fp4"}, atol=0.05, lossy=3e-2, layer="Linear4bit"),
    "quantize-bnb-int8": Case("quantize", {"method": "bnb-int8"}, atol=0.01, lossy=3e-3, layer="Linear8bitLt"),
    "qat": Case("qat", {}, atol=0.01, lossy=3e-3, layer="FakeQuantLinear"),
    "qat-activations": Case("qat", {"activations": True}, atol=0.01, lossy=3e-3, layer="FakeQuantLinear"),
    # The adapters start with B = 0: they add exactly nothing, merged (into the weights) or not (saved apart).
    "lora-merged": Case("lora", {"r": 4, "merge": True}, atol=0.0),
    "lora-unmerged": Case("lora", {"r": 4}, atol=0.0),
}


@dataclass
class Cell:
    base: torch.Tensor  # the unmodified model's outputs
    expected: torch.Tensor  # what the pass must give: base, or the hand-made reference's outputs
    model: nn.Module  # after the pass (and, for unmerged LoRA, with the adapters taken off for saving)
    out: torch.Tensor  # its outputs before saving (with the LoRA adapters, if any)
    record: dict
    path: Any  # the checkpoint
    adapter: Any = None  # unmerged LoRA: the adapter folder (peft's format), beside the checkpoint
    types: set[str] = field(default_factory=set)  # class names of the compressed model's modules


def build_cell(case: Case, kind: str, tmp) -> Cell:
    model = tiny_encoder(kind)
    if case.setup is not None:
        case.setup(model)
    base = outputs(model)
    reference = copy.deepcopy(model) if case.reference is not None else None
    spec = get_pass(case.pass_name)
    ctx = calibrated() if case.data else quiet_ctx()
    record = spec.apply(model, spec.config_cls(**case.config), ctx)
    expected = base
    if reference is not None:
        case.reference(reference, record)
        expected = outputs(reference)
    hooks = spec.hooks
    if hooks.finalize is not None:
        hooks.finalize(model, ctx)  # as the engine after the last stage (merge: true folds LoRA in here)
    out = outputs(model)
    types = {type(m).__name__ for m in model.modules()}
    adapter = None
    if hooks.save_extra is not None:  # as the engine when saving: the extra apart, the checkpoint without it
        extra = hooks.save_extra(model, tmp / "extra")
        if extra is not None:
            hooks.unload_extra(model)
            adapter = tmp / "extra"
    return Cell(base, expected, model, out, record, save_tiny(model, tmp / "out"), adapter, types)


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """cell(case name, kind): the case run on a model of that kind and saved, built once per module."""
    made: dict[tuple[str, str], Cell | Exception] = {}

    def get(name: str, kind: str) -> Cell:
        if (name, kind) not in made:
            try:
                made[name, kind] = build_cell(CASES[name], kind, tmp_path_factory.mktemp(f"{name}-{kind}"))
            except Exception as err:  # noqa: BLE001 - re-raised in each test of the cell
                made[name, kind] = err
        if isinstance(made[name, kind], Exception):
            raise made[name, kind]
        return made[name, kind]

    return get


# Run in the subprocess without llmshrink: the outputs on the padded batch (`ids` is IDS); unmerged LoRA
# adapters put back with plain peft; bnb layers as llmshrink's (see PORTABLE_BNB in test_quantize_bnb.py).
PROBE = """
import torch

MASK = torch.tensor(%(mask)r)
ADAPTERS = %(adapters)r

def prepare(model, name):
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

def probe(model, name):
    if name in ADAPTERS:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ADAPTERS[name])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=MASK)
    return {"out": (out.logits if "logits" in out else out.last_hidden_state).float(),
            "types": sorted({type(m).__name__ for m in model.modules()})}
"""


@pytest.fixture(scope="module")
def plain_reloads(cell):
    """{kind: {case name: reload_without_llmshrink's result}}, one subprocess per kind, for the cells that built."""
    found = {}
    for kind in KINDS:
        built = {}
        for name in CASES:
            try:
                built[name] = cell(name, kind)
            except Exception:  # noqa: BLE001, S112 - that cell's own tests fail with it
                continue
        adapters = {name: str(c.adapter) for name, c in built.items() if c.adapter is not None}
        probe = PROBE % {"mask": MASK.tolist(), "adapters": adapters}
        found[kind] = reload_without_llmshrink({name: c.path for name, c in built.items()}, IDS, auto=AUTO[kind],
                                               probe=probe, load_kwargs={"device_map": "cpu"})
    return found


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_outputs_at_the_no_compression_setting(cell, name, kind):
    case, got = CASES[name], cell(name, kind)
    assert max_diff(got.out, got.expected) <= case.atol
    if case.lossy is not None:  # rounding is rounding: the outputs moved, by little
        assert not torch.equal(got.out, got.base) and relative(got.out, got.base) <= case.lossy
    assert not case.layer or case.layer in got.types


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_checkpoint_reloads_exactly_with_llmshrink(cell, name, kind):
    case, got = CASES[name], cell(name, kind)
    reloaded = load_checkpoint(got.path)
    assert type(reloaded) is type(got.model) and set(reloaded.state_dict()) == set(got.model.state_dict())
    assert not case.layer or any(type(m).__name__ == case.layer for m in reloaded.modules())
    if got.adapter is not None:
        reloaded = get_pass("lora").hooks.load_extra(reloaded, got.adapter)
    assert max_diff(outputs(reloaded), got.out) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_checkpoint_reloads_exactly_without_llmshrink(cell, plain_reloads, name, kind):
    case, got = CASES[name], cell(name, kind)
    reloaded = plain_reloads[kind][name]["probe"]
    assert not case.layer or case.layer in reloaded["types"]  # the compressed layers came back, as remote code
    assert ("PeftModel" in reloaded["types"]) == (got.adapter is not None)  # plain peft put the adapters back
    assert max_diff(reloaded["out"], got.out) == 0.0


NO_MLP = (r"targets: '.*\\.mlp\\..*' matches no Linear/Conv1D layer; layer names look like "
          + ", ".join(f"{{prefix}}encoder.layer.0.attention.{name}" for name in ("self.query", "self.key", "self.value",
                                                                               "output.dense")))

# What cannot run on an encoder: one line, naming the fix. {case: (pass, config, message with {model} for the
# model's class and {prefix} for its block names' start: "bert." on the classifier, "" on the bare encoder)}.
REFUSED = {
    "kronecker-select_layers": ("kronecker", {"targets": BLOCK_LAYERS, "a_shape": (2, 2), "select_layers": 1},
                                "kronecker.select_layers: ranks blocks by calibration perplexity and {model} is not a "
                                "causal language model; name the blocks in layers instead"),
    "quantize-mixed": ("quantize", {"method": "mixed", "budget": 0.5},
                       "quantize.method: mixed ranks layers by calibration perplexity and {model} is not a causal "
                       "language model; use int8-dynamic or a bnb-* method"),
    "prune_heads-taylor": ("prune_heads", {"importance": "taylor"},
                           "prune_heads.importance: 'taylor' needs a causal LM loss and {model} is an encoder; "
                           "use 'output_norm' or 'magnitude'"),
    "prune_ffn-taylor": ("prune_ffn", {"importance": "taylor"},
                         "prune_ffn.importance: 'taylor' needs a causal LM loss and {model} is an encoder; "
                         "use 'activation' or 'magnitude'"),
    "prune_magnitude-gradual": ("prune_magnitude", {"sparsity": 0.5, "schedule": "gradual", "prune_steps": 2,
                                                    "steps_per_round": 1},
                                "prune_magnitude.schedule: gradual distils between rounds and {model} is not a causal "
                                "language model; use schedule: one_shot"),
    # The default targets are the decoders' .mlp. layers; BERT's FFN is intermediate.dense / output.dense.
    **{f"{name}-default_targets": (name, {}, NO_MLP) for name in ("kronecker", "tensorize")},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", REFUSED)
def test_what_an_encoder_cannot_run_is_refused_in_one_line(name, kind):
    pass_name, config, message = REFUSED[name]
    model = tiny_encoder(kind)
    before = outputs(model)
    spec = get_pass(pass_name)
    with pytest.raises(LlmshrinkError) as info:
        spec.apply(model, spec.config_cls(**config), calibrated())
    assert str(info.value) == message.format(model=type(model).__name__, prefix="bert." if kind == "classifier" else "")
    assert torch.equal(outputs(model), before)  # refused before any change
