"""onnx: a compressed checkpoint as one ONNX graph for ONNX Runtime, verified in onnxruntime.

    export_onnx(ckpt, out, quant)   load, densify (hf_dense), torch.onnx.export (dynamo) into a temporary sibling of
                                    `out`, optionally quantize (QUANTS), tokenizer files, the checks below in
                                    export.json, rename into place
    onnx_run.py                     running it in onnxruntime: OnnxModel, greedy, onnx_perplexity, decode_speed

Decoders: inputs input_ids, attention_mask, position_ids and past_key_values.{i}.key/value (batch, kv heads of
block i, past, head size), outputs logits and present.{i}.key/value (optimum's names); batch, sequence and past are
dynamic; a prefill passes an empty past. Encoders (BERT family): input_ids, attention_mask, token_type_ids -> logits
(classifier, masked LM) or last_hidden_state (bare encoder). ONNX holds any per-block shape: FFN widths and head
counts that differ between blocks export (densified in memory; config.json only where a plain config holds them).

Checks after every export, in onnxruntime (CPU, 2 threads): prefill logits of a fixed probe against the compressed
model's in float32 (its run-time input rounding off, as in hf_dense; a half-precision checkpoint cast to float32, as
the graph holds it; the difference from the model as it runs is reported too); for
decoders, DECODE_TOKENS steps with the KV cache along PyTorch's greedy path (generate(do_sample=False)): each step's
logits against PyTorch's, and whether onnxruntime picks the same token. The fp32 graph, always: max |Δ| <= 1e-4 x
max |logit| and the same greedy tokens, or nothing is written. A quantized graph (made from that one): measured
and reported (export.json), refused only past QUANT_LIMIT.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig
from transformers.pytorch_utils import Conv1D

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.encoders import is_encoder
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.model_inputs import cache_name
from llmshrink.export.hf_dense import (
    RTOL,
    checkpoint_tokenizer,
    densify,
    describe_config,
    probe_ids,
    reference_logits,
    top1_agreement,
)
from llmshrink.export.onnx_run import FORMAT, MODEL_FILE, OnnxModel, require_runtime
from llmshrink.export.spec import ONNX_QUANTS
from llmshrink.export.staging import check_destination, staged_folder
from llmshrink.targeting import replace_module

PROMPT_TOKENS, DECODE_TOKENS = 8, 16  # the greedy check: a prompt from the probe, then this many new tokens
# --quant: what onnxruntime's quantizers do (an embedding table: 8 bits per tensor, dequantized after the Gather).
# (The names come from export/spec.py, which the recipe validates them with.)
QUANTS = dict(zip(ONNX_QUANTS, (
    "quantize_dynamic: int8 weights (per output channel) and activations (per tensor, at each call)",
    "MatMulNBits: 8-bit weights in blocks of 32 (symmetric), int8 compute (accuracy_level 4)",
    "MatMulNBits: 4-bit weights in blocks of 32 (symmetric), int8 compute (accuracy_level 4)",
), strict=True))
# A quantized graph is checked after its fp32 graph passed the fp32 check: its relative logit error ||Δ|| / ||logits||
# must stay below 1 (closer to the model's logits than all-zero logits are). How lossy each quantization is, is
# measured and reported, not bounded. SmolLM2-135M (perplexity on 2k tokens of shakespeare_test, onnxruntime; fp32
# equals PyTorch's): int8 x1.66 at 0.26x the size (one scale per activation tensor cannot hold the outlier channels
# entering the FFN down-projections), int8-weights x1.003 at 0.34x, int4-weights x1.32 at 0.22x.
QUANT_LIMIT = 1.0
FP32_RTOL = RTOL[torch.float32]  # the fp32 graph against the model in float32 (hf_dense.reference_logits)
PAST, PRESENT, KV = "past_key_values.{}.{}", "present.{}.{}", ("key", "value")


# --- export ----------------------------------------------------------------------------------------------


def export_onnx(checkpoint: str | Path, out: str | Path, quant: str | None = None,
                log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write checkpoint `checkpoint` as an ONNX model in a new folder `out` (fp32, or quantized: QUANTS), verified
    in onnxruntime; returns (and writes to out/export.json) what was written and how it compares."""
    checkpoint, out = Path(checkpoint), Path(out)
    if quant is not None and quant not in QUANTS:
        raise LlmshrinkError(f"{FORMAT}: --quant {quant!r} is not an ONNX quantization; allowed: none (fp32), "
                             f"{', '.join(QUANTS)}")
    require_runtime()
    check_destination(FORMAT, checkpoint, out)
    model = load_checkpoint(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)
    decoder = not is_encoder(model.config)
    ids = probe_ids(model.config)
    # The graph holds float32 weights: checked against the model in float32 (the as-run difference, in the
    # checkpoint's own dtype, is reported).
    as_run, reference, rounding = reference_logits(model, ids, float32=True)
    densify(model, describe=False)  # ONNX holds any per-block shape: all it needs is dense layers
    config_refusal = describe_config(model)  # None: config.json describes the graph's shapes
    _conv1d_to_linear(model)
    with staged_folder(FORMAT, out) as staged:
        tmp = staged.folder
        graph = tmp / ("fp32.onnx" if quant else MODEL_FILE)
        (_export_decoder if decoder else _export_encoder)(model, graph)
        probe = ids, as_run, reference
        checked = _checks(model, OnnxModel(graph), probe, None)  # the graph itself, in fp32: tight
        _verdict(checked, None)
        fp32 = {}
        if quant:
            _quantize(graph, tmp / MODEL_FILE, quant)
            fp32, checked = checked, _checks(model, OnnxModel(tmp / MODEL_FILE), probe, quant)
            _verdict(checked, quant)
        result = staged.record = {
            "format": FORMAT, "path": str(out), "source": str(checkpoint), "quant": quant or "fp32",
            "kind": "decoder" if decoder else "encoder", "plain_config": config_refusal is None,
            **({"plain_config_refused": config_refusal} if config_refusal else {}),
            "bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(MODEL_FILE)),
            "probe": {"sequences": int(ids.shape[0]), "tokens": int(ids.numel())},
            "rounding_layers": len(rounding), **checked, **({"fp32_graph": fp32} if fp32 else {})}
        if config_refusal is None:
            model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    greedy = result.get("greedy")
    log(f"{FORMAT}: {out}: {result['quant']}, {result['bytes'] / 1e6:.1f} MB; logits in onnxruntime against the "
        f"compressed model: max |Δ| {result['max_abs_logit_diff']:.2g}, ||Δ|| / ||logits|| "
        f"{result['checked_relative_error']:.2g}, top-1 agreement {result['top1_agreement']:.1%}"
        + (f"; greedy tokens with the KV cache: {greedy['agreement']:.0%} as PyTorch's" if greedy else ""))
    return result


def _checks(model: nn.Module, runtime: OnnxModel, probe: tuple, quant: str | None) -> dict[str, Any]:
    """The exported graph in onnxruntime against PyTorch: prefill logits of the probe, and for a decoder greedy
    decoding with the KV cache."""
    ids, as_run, reference = probe
    got = runtime.logits(ids.numpy())
    found = {"inputs": runtime.input_names, "outputs": runtime.output_names,
             # Against the compressed model as it runs (its run-time rounding included).
             "max_abs_logit_diff": float((got - as_run).abs().max()), "top1_agreement": top1_agreement(got, as_run),
             # Against the reference the limit applies to: the same, with the rounding layers in float.
             **_compare(got, reference, quant)}
    if runtime.is_decoder:
        found["greedy"] = _check_cache(model, runtime, ids[:1, :PROMPT_TOKENS], quant)
    return found


def _compare(got: torch.Tensor, reference: torch.Tensor, quant: str | None) -> dict[str, Any]:
    """Both measures of the difference, and which one the limit applies to: max |Δ| for fp32 (FP32_RTOL x max |logit|),
    ||Δ|| / ||logits|| for a quantized graph (QUANT_LIMIT)."""
    diff = got - reference
    found = {"checked_max_abs_diff": float(diff.abs().max()),
             "checked_relative_error": float(diff.norm() / reference.norm())}
    if quant:
        return {**found, "checked": "relative_error", "limit": QUANT_LIMIT}
    return {**found, "checked": "max_abs_diff", "limit": FP32_RTOL * float(reference.abs().max())}


def _conv1d_to_linear(model: nn.Module) -> None:
    """GPT-2's Conv1D (addmm: a Gemm in ONNX, which onnxruntime's weight-only quantizer skips) -> nn.Linear."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            with torch.device("meta"):
                linear = nn.Linear(*module.weight.shape)
            linear.weight, linear.bias = nn.Parameter(module.weight.detach().T.contiguous()), module.bias
            replace_module(model, name, linear)


def _verdict(result: dict[str, Any], quant: str | None) -> None:
    """Refuse (nothing is written) logits beyond the limit, and for fp32 a greedy token PyTorch does not pick."""
    greedy = result.get("greedy")
    for what, found in (("prefill", result), ("decoding with the KV cache", greedy)):
        value = found and found[f"checked_{found['checked']}"]
        if found and not value <= found["limit"]:  # `not <=` also refuses NaN
            measure = "max |Δ|" if found["checked"] == "max_abs_diff" else "||Δ|| / ||logits||"
            raise LlmshrinkError(f"{FORMAT}: the exported model's logits in onnxruntime ({what}) differ from PyTorch's: "
                                 f"{measure} {value:.3g}, above the limit {found['limit']:.3g}; nothing was written")
    if not quant and greedy and not greedy["same_tokens"]:
        raise LlmshrinkError(
            f"{FORMAT}: decoding with the KV cache in onnxruntime picks another token than PyTorch's greedy decode "
            f"at step {greedy['first_difference']}; nothing was written")


class _DecoderWithPast(nn.Module):
    """The causal LM with its KV cache as flat tensors in and out: what torch.onnx.export can trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        name = cache_name(self.model)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{name: cache})
        return (out.logits, *[t for layer in out[name].layers for t in (layer.keys, layer.values)])


@torch.no_grad()
def _export_decoder(model: nn.Module, path: Path) -> None:
    from torch.export import Dim

    batch, past_len, length = 2, 4, 3  # sample sizes other than 0 and 1, so that none is taken as fixed
    warm = torch.randint(0, int(model.config.vocab_size), (batch, past_len + length),
                         generator=torch.Generator().manual_seed(1))
    cache = model(input_ids=warm[:, :past_len], use_cache=True)[cache_name(model)]
    past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    mask = torch.ones(batch, past_len + length, dtype=torch.long)
    positions = torch.arange(past_len, past_len + length).expand(batch, -1)
    n = len(past) // 2
    b, s, p = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    names = ["input_ids", "attention_mask", "position_ids", *[PAST.format(i, kv) for i in range(n) for kv in KV]]
    outputs = ["logits", *[PRESENT.format(i, kv) for i in range(n) for kv in KV]]
    shapes = ({0: b, 1: s}, {0: b, 1: Dim.AUTO}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    _torch_export(_DecoderWithPast(model).eval(), (warm[:, past_len:], mask, positions, *past), names, outputs,
                  shapes, path, {"attention_mask": ["batch", "past_sequence + sequence"]})


@torch.no_grad()
def _export_encoder(model: nn.Module, path: Path) -> None:
    from torch.export import Dim

    ids = torch.randint(0, int(model.config.vocab_size), (2, 5), generator=torch.Generator().manual_seed(1))
    b, s = Dim("batch"), Dim("sequence")
    output = "logits" if getattr(model(input_ids=ids), "logits", None) is not None else "last_hidden_state"
    wrapper = _Encoder(model, output).eval()
    _torch_export(wrapper, (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                  ["input_ids", "attention_mask", "token_type_ids"], [output], ({0: b, 1: s},) * 3, path, {})


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return getattr(out, self.output)


def _torch_export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], shapes: tuple, path: Path,
                  rename: dict[str, list[str]]) -> None:
    import onnx_ir

    quiet = logging.getLogger("torch.onnx")
    level, quiet.level = quiet.level, logging.ERROR  # "torchvision is not installed"
    try:
        with warnings.catch_warnings():  # the exporter's notes on its own dimension names, pytree deprecations
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=shapes, optimize=False, verbose=False, report=False)
    except Exception as err:
        raise LlmshrinkError(f"{FORMAT}: torch.onnx.export failed on {type(module.model).__name__}: "
                             f"{str(err).strip().splitlines()[0]}") from err
    finally:
        quiet.level = level
    for value in program.model.graph.inputs:  # a dimension torch.export named itself (s53): its meaning
        if value.name in rename:
            value.shape = onnx_ir.Shape(rename[value.name])
    _fold_weight_transposes(program.model.graph)
    program.optimize()  # onnxscript's constant folding (of small tensors only) and clean-up
    program.save(str(path))


def _fold_weight_transposes(graph: Any) -> None:
    """Store transposed the weights a Transpose reads at run time (the exporter folds only small ones: a tied LM
    head's table is left to transpose at every call, and quantize_dynamic skips a MatMul whose weight is computed).
    An embedding Gather of the same table then reads the transposed one (axis 1) and transposes its small output,
    so that the table is stored once."""
    import onnx_ir

    for node in [n for n in graph if n.op_type == "Transpose"]:
        weight = node.inputs[0]
        perm = node.attributes.get("perm")
        if not (weight.is_initializer() and weight.const_value is not None and perm and list(perm.as_ints()) == [1, 0]):
            continue
        table = weight.const_value.numpy().T
        transposed = onnx_ir.Value(name=f"{weight.name}.T", shape=onnx_ir.Shape(table.shape), type=weight.type,
                                   const_value=onnx_ir.tensor(np.ascontiguousarray(table), name=f"{weight.name}.T"))
        graph.register_initializer(transposed)
        node.outputs[0].replace_all_uses_with(transposed)
        graph.remove(node, safe=True)
        for use in list(weight.uses()):
            gather = use.node
            axis = gather.attributes.get("axis")
            if gather.op_type != "Gather" or use.idx != 0 or (axis is not None and axis.as_int() != 0):
                continue
            rank = len(gather.inputs[1].shape) if gather.inputs[1].shape is not None else 2
            columns = onnx_ir.node("Gather", [transposed, gather.inputs[1]], {"axis": 1})
            rows = onnx_ir.node("Transpose", columns.outputs, {"perm": [*range(1, rank + 1), 0]})
            graph.insert_before(gather, [columns, rows])
            gather.outputs[0].replace_all_uses_with(rows.outputs[0], replace_graph_outputs=True)
            graph.remove(gather, safe=True)
        if not weight.uses():
            graph.initializers.pop(weight.name)


def _quantize(fp32: Path, path: Path, quant: str) -> None:
    """`fp32` quantized into `path` by onnxruntime's quantizers (QUANTS), then deleted (with its external data)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # Importing it calls logging.basicConfig(level=INFO): every library's INFO lines would print from then on.
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    root.handlers[:], root.level = handlers, level
    big = sum(f.stat().st_size for f in fp32.parent.glob(f"{fp32.name}*")) > 1.8e9  # protobuf's limit: 2 GB
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "consider pre-processing", one INFO line per node
    try:
        if quant == "int8":
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=big)
        else:
            config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4,
                                                  bits=8 if quant == "int8-weights" else 4, op_types_to_quantize=("MatMul",))
            quantizer = MatMulNBitsQuantizer(onnx.load(fp32), algo_config=config)
            quantizer.process()
            matmuls = fp32.with_name("matmuls.onnx")
            quantizer.model.save_model_to_file(str(matmuls), use_external_data_format=big)
            quantize_dynamic(matmuls, path, weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"],
                             use_external_data_format=big)
    finally:
        logging.disable(previous)
    for leftover in [*fp32.parent.glob(f"{fp32.name}*"), *fp32.parent.glob("matmuls.onnx*")]:
        leftover.unlink()


@torch.no_grad()
def _check_cache(model: nn.Module, runtime: OnnxModel, prompt: torch.Tensor, quant: str | None) -> dict[str, Any]:
    """PyTorch's greedy decode (generate, no stop at EOS); onnxruntime decodes the same tokens one by one with its
    KV cache: each step's logits against PyTorch's on the whole sequence, and the token each step picks."""
    settings = GenerationConfig(max_new_tokens=DECODE_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    sequence = model.generate(prompt, generation_config=settings, attention_mask=torch.ones_like(prompt))
    want = sequence[0, prompt.shape[1]:].tolist()
    reference = model(sequence).logits[0, prompt.shape[1] - 1:-1].float()  # what picks each new token
    steps, past = [], None
    for token in [prompt[0].tolist(), *[[t] for t in want[:-1]]]:
        step, past = runtime(np.array([token]), past=past)
        steps.append(torch.from_numpy(step[0, -1]).float())
    got = torch.stack(steps)
    picked = got.argmax(-1).tolist()
    same = [a == b for a, b in zip(picked, want, strict=True)]
    return {"prompt_tokens": int(prompt.shape[1]), "new_tokens": len(want), "pytorch_tokens": want,
            "onnx_tokens": picked, "same_tokens": all(same), "agreement": sum(same) / len(same),
            "first_difference": None if all(same) else same.index(False), **_compare(got, reference, quant)}
