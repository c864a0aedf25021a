"""quantize method mixed on tiny GPT-2 / Llama: the size budget (exact bytes), the greedy's choices against the
measured table and a brute-force optimum, a deliberately sensitive layer, extreme budgets, exact reloads
(llmshrink and plain transformers), one-line refusals, and output error between the single-format methods."""

from __future__ import annotations

import itertools
import json
import math

import bitsandbytes
import pytest
import torch
from conftest import (
    calibrated,
    relative,
    reload_without_llmshrink,
    save_tiny,
    stage_error,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.perplexity import perplexity
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.passes.quantize import QuantizeConfig, apply
from llmshrink.passes.quantize_mixed import assign
from llmshrink.quant_layers import tensor_bytes as _tensor_bytes
from llmshrink.recipe import parse_stage
from llmshrink.targeting import find_targets

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
LAYER = {"bnb-nf4": bitsandbytes.nn.Linear4bit, "int8-dynamic": Int8DynamicLinear}
SENSITIVE = "transformer.h.1.mlp.c_proj"


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits.float()


def targets_fp32_bytes(model: nn.Module) -> int:
    return sum(_tensor_bytes(m) for _, m in find_targets(model, r".*\.\d+\..*"))


def cost(layer: dict, fmt: str) -> float:
    return max(layer["delta_ppl"][fmt], 0.0)  # what the assignment minimises: increases below 0 count as 0


class Sampled(Context):
    """Calibration text sampled from the model itself: quantizing a layer can then only raise the expected
    perplexity (by the KL divergence), so a big measured increase is signal, not the luck of random tokens."""

    ids: torch.Tensor

    def train_token_ids(self) -> torch.Tensor:
        return self.ids


def sampled(model: nn.Module, sequences: int = 4) -> Sampled:
    torch.manual_seed(0)
    start = torch.ones(sequences, 1, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                             max_new_tokens=127, min_new_tokens=127, pad_token_id=1)
    ctx = Sampled(tokenizer=None, log=lambda _: None)
    ctx.ids = out.reshape(-1)
    return ctx


def sensitive_gpt2() -> nn.Module:
    """A GPT-2 whose last MLP projection loses all its weights to any int8 or 4-bit rounding.

    One input column per block of 64 weights (bnb's absmax block; int8's scale is per row) gets an outlier 1000x
    the largest weight, so every scale is set by the outliers and the other weights round to 0; those inputs
    are gelu(0) = 0 for every token, so the float model does not see them. Its weights x3 make it matter.
    """
    model = tiny_gpt2()
    fc, proj = model.transformer.h[1].mlp.c_fc, model.transformer.h[1].mlp.c_proj
    with torch.no_grad():
        proj.weight.mul_(3.0)
        for column in (0, 64, 128, 192):  # Conv1D: weight is (in, out), row `column` is that input
            fc.weight[:, column] = 0.0
            fc.bias[column] = 0.0
            proj.weight[column, :] = 1000 * proj.weight.abs().max()
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_budget_is_respected_in_real_bytes_and_no_upgrade_that_fits_is_left(family):
    model = BUILDERS[family]()
    total = targets_fp32_bytes(model)
    lines: list[str] = []
    ctx = calibrated(256)
    ctx.log = lines.append
    record = apply(model, QuantizeConfig(method="mixed", budget=0.35), ctx)
    layers = record["layers"]
    assert [layer["name"] for layer in layers] == [name for name, _ in find_targets(BUILDERS[family](), r".*\.\d+\..*")]
    limit = int(0.35 * total)
    # The bytes the layers really take now (state_dict), not the record's arithmetic.
    after = sum(_tensor_bytes(model.get_submodule(layer["name"])) for layer in layers)
    assert after == record["bytes_after"] <= limit == record["bytes_budget"] and record["bytes_before"] == total
    assert record["ratio"] == round(after / total, 6) and 0.3 < record["ratio"] <= 0.35
    for layer in layers:
        module = model.get_submodule(layer["name"])
        assert layer["bytes"][layer["format"]] == layer["bytes_after"] == _tensor_bytes(module)
        if layer["format"] == "fp32":
            assert type(module).__name__ in ("Linear", "Conv1D")
        else:
            assert isinstance(module, LAYER[layer["format"]])
    counts = record["formats"]
    assert sum(counts.values()) == len(layers) and all(counts[fmt] > 0 for fmt in counts)
    assert counts["fp32"] <= 0.35 * len(layers)  # fp32 is 4 bytes a weight: few fit in 0.35
    # The greedy stops only when every upgrade left (to a format with more bytes) is too big or measured worse.
    for layer in layers:
        for fmt in record["choices"]:
            extra = layer["bytes"][fmt] - layer["bytes"][layer["format"]]
            assert extra <= 0 or cost(layer, fmt) > cost(layer, layer["format"]) or after + extra > limit
    summary = (f"  quantize mixed: {counts['bnb-nf4']} bnb-nf4, {counts['int8-dynamic']} int8-dynamic, "
               f"{counts['fp32']} fp32; {after / total:.4f} of the fp32 bytes (budget 0.35)")
    assert lines[-1].startswith(summary)
    json.dumps(record)  # goes into the checkpoint manifest


def test_a_sensitive_layer_gets_fp32_and_the_greedy_matches_the_brute_force_optimum():
    model = sensitive_gpt2()
    ctx = sampled(model)
    record = apply(model, QuantizeConfig(method="mixed", budget=0.35), ctx)
    layers = {layer["name"]: layer for layer in record["layers"]}
    sensitive = layers.pop(SENSITIVE)
    # Measured: rounding wipes the layer in either format (the same perplexity, +1.75 on 128.4), other
    # layers change it by at most 0.04.
    others = max(abs(d) for layer in layers.values() for d in layer["delta_ppl"].values())
    assert sensitive["delta_ppl"]["bnb-nf4"] == sensitive["delta_ppl"]["int8-dynamic"] > 20 * others
    assert sensitive["format"] == "fp32" and type(model.get_submodule(SENSITIVE)).__name__ == "Conv1D"
    assert 0 < record["formats"]["fp32"] < len(record["layers"])  # the budget allowed only some upgrades

    # The table is what it says: perplexity with only that layer in that format, minus the float model's.
    protocol = record["calibration"]
    fresh = sensitive_gpt2()
    base = perplexity(fresh, ctx.ids, protocol["window"], protocol["stride"], progress=False).ppl
    name = "transformer.h.0.attn.c_attn"
    apply(fresh, QuantizeConfig(method="int8-dynamic", targets=name.replace(".", r"\.")), ctx)
    alone = perplexity(fresh, ctx.ids, protocol["window"], protocol["stride"], progress=False).ppl
    assert protocol["base_ppl"] == round(base, 6) and layers[name]["delta_ppl"]["int8-dynamic"] == round(alone - base, 6)

    # Against every assignment within the budget (3^8): the greedy reaches the least total increase.
    table = record["layers"]
    best = min(sum(cost(layer, fmt) for layer, fmt in zip(table, combo, strict=True))
               for combo in itertools.product(record["choices"], repeat=len(table))
               if sum(layer["bytes"][fmt] for layer, fmt in zip(table, combo, strict=True)) <= record["bytes_budget"])
    assert sum(cost(layer, layer["format"]) for layer in table) == pytest.approx(best, abs=1e-12)
    assert record["predicted_ppl_increase"] == pytest.approx(best, abs=1e-5)


def test_assignment_on_hand_made_tables():
    four = {"nf4": 10, "fp32": 40}
    # Gain per byte, not gain: three small upgrades (3 each, 30 bytes) beat one big one (5, 90 bytes).
    sizes = [four, four, four, {"nf4": 100, "fp32": 190}]
    deltas = [{"nf4": 3.0, "fp32": 0.0}] * 3 + [{"nf4": 5.0, "fp32": 0.0}]
    assert assign(sizes, deltas, ["nf4", "fp32"], 130 + 90) == ["fp32", "fp32", "fp32", "nf4"]
    # Layer 0's best upgrade (fp32, 3.0 for 30 bytes) does not fit in 25: the smaller ones that do are made,
    # layer 1's first (0.9 for 10 bytes), then layer 0's int8 (0.1 for 10 bytes), the optimum (total 3.0).
    three = {"nf4": 10, "int8": 20, "fp32": 40}
    deltas = [{"nf4": 3.0, "int8": 2.9, "fp32": 0.0}, {"nf4": 1.0, "int8": 0.1, "fp32": 0.0}]
    assert assign([three, three], deltas, ["nf4", "int8", "fp32"], 20 + 25) == ["int8", "int8"]
    # Below zero is noise: it counts as 0, and bytes left over buy such upgrades (the biggest first); a format
    # measured worse than the current one is never bought.
    deltas = [{"nf4": -0.2, "int8": -0.1, "fp32": 0.0}, {"nf4": 0.0, "int8": 0.5, "fp32": 0.0}]
    assert assign([three, three], deltas, ["nf4", "int8", "fp32"], 20 + 30) == ["fp32", "nf4"]
    assert assign([three, three], deltas, ["nf4", "int8", "fp32"], 20 + 29) == ["int8", "nf4"]
    assert assign([three, three], deltas, ["nf4", "int8", "fp32"], 80) == ["fp32", "fp32"]
    zero = [{"nf4": 0.0, "int8": 0.0, "fp32": 0.0}] * 2  # fp32 for one layer, not int8 for both
    assert assign([three, three], zero, ["nf4", "int8", "fp32"], 20 + 30) == ["fp32", "nf4"]


def test_budget_one_keeps_fp32_the_smallest_budget_keeps_the_cheapest_and_below_is_refused():
    model = tiny_gpt2()
    before = logits(model)
    record = apply(model, QuantizeConfig(method="mixed", budget=1.0), calibrated(256))
    assert record["formats"] == {"bnb-nf4": 0, "int8-dynamic": 0, "fp32": 8}
    assert record["bytes_after"] == record["bytes_before"] == record["bytes_budget"]
    assert torch.equal(logits(model), before)

    total = record["bytes_before"]
    cheapest = {layer["name"]: min(layer["bytes"], key=layer["bytes"].get) for layer in record["layers"]}
    smallest = sum(min(layer["bytes"].values()) for layer in record["layers"])
    lowest = math.ceil(smallest * 10_000 / total) / 10_000
    assert 0.15 < lowest < 0.3  # 4-bit and its scales, and the small layers' quant maps
    with pytest.raises(LlmshrinkError) as info:
        apply(model, QuantizeConfig(method="mixed", budget=lowest - 0.0001), calibrated(256))
    assert str(info.value) == (f"quantize.budget: {lowest - 0.0001} is below what the choices allow: every layer "
                               f"in its cheapest format takes {smallest:,} of the targets' {total:,} fp32 bytes; "
                               f"allowed: {lowest} to 1")
    assert all(type(m).__name__ != "Int8DynamicLinear" for m in model.modules())  # refused before any change
    record = apply(model, QuantizeConfig(method="mixed", budget=lowest), calibrated(256))
    assert {layer["name"]: layer["format"] for layer in record["layers"]} == cheapest
    assert record["bytes_after"] == smallest


BNB_KERNEL = """
def prepare(model, name):
    for m in model.modules():
        if name == "portable" and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False

def probe(model, name):
    layers = " ".join(sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}))
    return layers, any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules()
                       if type(m).__name__ == "Linear4bit")
"""


def test_a_model_mixing_nf4_int8_and_fp32_reloads_exactly_with_llmshrink_and_plain_transformers(tmp_path):
    model = tiny_llama()
    record = apply(model, QuantizeConfig(method="mixed", budget=0.35), calibrated(256))
    assert all(count > 0 for count in record["formats"].values())
    after = logits(model)
    out = save_tiny(model, tmp_path / "mixed")
    config = json.loads((out / "config.json").read_text())
    fp32 = [layer["name"] for layer in record["layers"] if layer["format"] == "fp32"]
    assert config["quantization_config"]["llm_int8_skip_modules"] == [*fp32, "lm_head"]
    reloaded = load_checkpoint(out)
    assert [type(reloaded.get_submodule(layer["name"])) for layer in record["layers"]] == \
        [type(model.get_submodule(layer["name"])) for layer in record["layers"]]
    assert torch.equal(logits(reloaded), after)

    # Plain transformers, twice: on the portable path llmshrink keeps, and as bitsandbytes picks its kernel.
    reloaded = reload_without_llmshrink({"portable": out, "native": out}, IDS, probe=BNB_KERNEL,
                                        load_kwargs={"device_map": "cpu"})
    layers, repacked = reloaded["native"]["probe"]
    assert layers.split() == ["Int8DynamicLinear", "Linear", "Linear4bit"]
    assert torch.equal(reloaded["portable"]["logits"], after)
    plain = reloaded["native"]["logits"]
    if repacked:  # bitsandbytes' bf16 kernel of AVX512-BF16 CPUs: the README's stated bound
        assert relative(plain, after) < 1e-2
    else:
        assert torch.equal(plain, after)


def test_output_error_lies_between_the_all_cheap_and_all_dear_models_and_layers_match_them():
    reference = logits(tiny_llama())
    singles = {}
    for method in ("bnb-nf4", "int8-dynamic"):
        singles[method] = tiny_llama()
        apply(singles[method], QuantizeConfig(method=method), calibrated(256))
    errors = {method: relative(logits(model), reference) for method, model in singles.items()}
    model = tiny_llama()
    record = apply(model, QuantizeConfig(method="mixed", budget=0.22, choices=["bnb-nf4", "int8-dynamic"]),
                   calibrated(256))
    assert record["formats"]["bnb-nf4"] > 0 and record["formats"]["int8-dynamic"] > 0
    # Each layer holds exactly what the single-format method makes of it.
    for layer in record["layers"]:
        ours = model.get_submodule(layer["name"]).state_dict()
        theirs = singles[layer["format"]].get_submodule(layer["name"]).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert errors["int8-dynamic"] < relative(logits(model), reference) < errors["bnb-nf4"]


def test_tied_head_is_refused_naming_no_single_precision_and_untied_it_runs_quantized():
    with pytest.raises(LlmshrinkError) as info:
        apply(tiny_llama(), QuantizeConfig(method="mixed", budget=0.5, targets="lm_head"), calibrated(256))
    assert str(info.value) == ("quantize.targets: lm_head shares its weight with model.embed_tokens (tied "
                               "embeddings); exclude it, or set tied_embeddings: untie to let it take a quantized "
                               "format alone")
    model = tiny_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    record = apply(model, QuantizeConfig(method="mixed", budget=0.3, targets="lm_head", tied_embeddings="untie",
                                         choices=["bnb-nf4", "fp32"]), calibrated(256))
    assert record["layers"][0]["format"] == "bnb-nf4" and record["untied"] == ["lm_head"]
    assert isinstance(model.lm_head, bitsandbytes.nn.Linear4bit) and model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"method": "mixed"}, ".budget: required for method mixed: the targets' bytes after quantizing, as a "
                              "fraction in (0, 1] of their fp32 bytes, got None"),
        ({"method": "mixed", "budget": 0}, ".budget: input should be greater than 0, got 0"),
        ({"method": "mixed", "budget": 1.5}, ".budget: input should be less than or equal to 1, got 1.5"),
        ({"method": "int8-dynamic", "budget": 0.5}, ".budget: only for method mixed, not 'int8-dynamic', got 0.5"),
        ({"method": "bnb-nf4", "calibration_tokens": 64},
         ".calibration_tokens: only for method mixed, not 'bnb-nf4', got 64"),
        ({"method": "mixed", "budget": 0.3, "choices": ["int4", "fp32"]},
         ".choices: 'int4' is not a format; allowed: fp32, int8-dynamic, bnb-nf4, bnb-fp4, bnb-int8, "
         "got ['int4', 'fp32']"),
        ({"method": "mixed", "budget": 0.3, "choices": ["bnb-nf4", "bnb-int8", "fp32"]},
         ".choices: at most one bitsandbytes format, not bnb-nf4 and bnb-int8: a checkpoint's quantization_config "
         "describes one, got ['bnb-nf4', 'bnb-int8', 'fp32']"),
        ({"method": "mixed", "budget": 0.3, "choices": ["fp32", "int8-dynamic", "fp32"]},
         ".choices: each format at most once, got ['fp32', 'int8-dynamic', 'fp32']"),
        ({"method": "mixed", "budget": 0.3, "choices": ["fp32"]},
         ".choices: at least two formats to choose between, got ['fp32']"),
        ({"method": "mixed", "budget": 0.3, "choices": ["int8-dynamic", "fp32"], "double_quant": False},
         ".double_quant: only for method bnb-nf4 or bnb-fp4 (or mixed with bnb-nf4 or bnb-fp4 among its choices), "
         "not 'mixed', got False"),
    ],
)
def test_bad_config_is_one_line(body, message):
    assert stage_error("quantize", body) == message


def test_good_config_parses():
    body = {"method": "mixed", "budget": 0.4, "choices": ["bnb-int8", "fp32"], "int8_threshold": 0,
            "calibration_tokens": 256}
    config = parse_stage({"quantize": body}, "recipe.yaml", "stages[0]").config
    assert (config.budget, config.choices, config.int8_threshold, config.calibration_tokens) == \
        (0.4, ("bnb-int8", "fp32"), 0.0, 256)
    config = parse_stage({"quantize": {"method": "mixed", "budget": 1}}, "recipe.yaml", "stages[0]").config
    assert config.choices == ("bnb-nf4", "int8-dynamic", "fp32") and config.calibration_tokens == 512
