"""gguf: a compressed checkpoint written as one GGUF file that llama.cpp runs alone, checked by running it there.

    export_gguf(ckpt, out, quant)   load the checkpoint, densify it (hf_dense), write its tensors and tokenizer as an
                                    f32 GGUF with the gguf package (what llama.cpp's convert_hf_to_gguf.py writes for
                                    Llama and GPT-2), make the requested type with llama.cpp's own quantizer, and
                                    check in llama.cpp (gguf_runtime); `out` is a new folder holding
                                    model-<quant>.gguf and export.json (hf-dense's convention)

The checks, on a probe of real English text (the built-in python_docs corpus, tokenized):
  - llama.cpp tokenizes the probe text exactly as the checkpoint's tokenizer does (else refused);
  - the f32 file's logits equal the compressed model's (rounding layers in float, see hf_dense) within F32_RTOL
    (GPT-2: GELU_RTOL) x max |logit| (else refused: the file would not compute the model);
  - the requested type's logits are measured against the same reference (max |Δ|, top-1 agreement) and reported,
    not refused: how far rounding moves logits depends on the model (EXPECTED says what a recovered model shows).

The GGUF architecture (every key and tensor name comes from the gguf package's constants):
    llama  Llama-family blocks that all have one FFN width and one pair of head counts (the converter's LlamaModel)
    deci   Llama-family blocks that differ (pruned per block): llama.cpp's llama graph sizes every block from block
           0's values, while its deci graph (Nemotron-NAS; the converter's DeciModel) reads feed_forward_length,
           attention.head_count and head_count_kv as per-block arrays and otherwise computes the same block
           (RMSNorm, RoPE, GQA, SwiGLU, tied or untied head)
    gpt2   GPT-2 (the converter's GPT2Model); llama.cpp's gpt2 graph has one FFN width and an n_embd x n_embd
           attention, so different FFN widths and pruned heads are refused in one line
Tokenizers (gguf_vocab.py): byte-level BPE (GPT-2, SmolLM2) as tokenizer.ggml.model "gpt2" with the pre-tokenizer named by the
converter's own hash test; BPE with byte fallback (Llama 2 / MobileLLM style tokenizer.json) as "llama" through
gguf.LlamaHfVocab (the converter's path when there is no tokenizer.model; it scores every token alike, so llama.cpp
may merge in another order than the BPE merges: the tokenizer check then refuses); any other kind (e.g. word-level)
is refused: llama.cpp could not tokenize text as the model saw it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from llmshrink.checkpoint_load import load_checkpoint, load_tokenizer
from llmshrink.corpus import builtin_text
from llmshrink.errors import LlmshrinkError
from llmshrink.export.gguf_runtime import gguf_logits, gguf_tokenize, llama_cpp_module, quantize, tensor_types
from llmshrink.export.gguf_vocab import add_vocab
from llmshrink.export.hf_dense import (
    PROBE_SHAPE,
    densify,
    max_abs_diff,
    probe_length,
    reference_logits,
    top1_agreement,
)
from llmshrink.export.spec import GGUF_DEFAULT, GGUF_QUANTS
from llmshrink.export.staging import check_destination, staged_folder
from llmshrink.families import GPT2, LLAMA, block_list, join
from llmshrink.targeting import dense_weight

FORMAT = "gguf"
# quant name -> llama.cpp file type. An f32 file is written and checked; every other type is made from it by
# llama.cpp's quantizer, as llama-quantize does (norms and biases stay f32; a tensor whose rows do not fit the type's
# block goes to another type: export.json lists the types). The k-quants are the usual mixes.
# The names come from export/spec.py (the recipe validates them without importing this module).
QUANTS = dict(zip(GGUF_QUANTS, (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16,
                                gguf.LlamaFileType.MOSTLY_Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0,
                                gguf.LlamaFileType.MOSTLY_Q4_K_M, gguf.LlamaFileType.MOSTLY_Q5_K_M,
                                gguf.LlamaFileType.MOSTLY_Q6_K), strict=True))
K_QUANTS = ("q4_k", "q5_k", "q6_k")
K_BLOCK = 256  # a k-quant block spans 256 values of a row (QK_K)
# The f32 check: max |Δlogit| / max |logit|. Only float summation order separates the file from the model
# (measured: 5e-6 on SmolLM2-135M, <= 1e-4 on SmolLM2 pruned without recovery, whose logits amplify any rounding);
# an export mistake (a weight transposed or not permuted, a wrong head count) moves logits by a large share.
F32_RTOL = 1e-3
# ggml's CPU GELU (GPT-2's FFN) rounds its input to f16 and reads an f16 table (GGML_GELU_FP16 in ggml-cpu/vec.h:
# up to ~4e-3 relative per activation), so a GPT-2 file in f32 is only that close.
GELU_RTOL = 1e-2
# What each type's rounding does to max |Δlogit| / max |logit| on the text probe of a model that is not fragile
# (measured on SmolLM2-135M: f16 1e-3, q8_0 3.3e-2, q4_0 0.32 (its weights were Q4_1 already); the tests' tiny
# models stay below). A model pruned without recovery moves much more (f16 ~8%): above this the export says so.
EXPECTED = {"f32": F32_RTOL, "f16": 1e-2, "q8_0": 0.1, "q6_k": 0.1, "q5_k": 0.25, "q4_k": 0.5, "q4_0": 0.5}
# State-dict entries that are buffers llama.cpp computes itself (the converter skips them too).
SKIPPED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
PROBE_TEXT_CHARS = 4000  # of the built-in python_docs text: the probe's tokens and the tokenizer check


# --- export ----------------------------------------------------------------------------------------------


def export_gguf(checkpoint: str | Path, out: str | Path, quant: str = GGUF_DEFAULT,
                log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write checkpoint `checkpoint` as out/model-<quant>.gguf (out: a new folder), checked in llama.cpp; returns
    (and writes to out/export.json) what was written and how its logits compare with the compressed model's."""
    checkpoint, out = Path(checkpoint), Path(out)
    if quant not in QUANTS:
        raise LlmshrinkError(f"{FORMAT}: --quant {quant!r} is not a GGUF type here; allowed: {', '.join(QUANTS)}")
    check_destination(FORMAT, checkpoint, out)
    llama_cpp_module()  # before any work: without the runtime, one line saying what to install
    # Not just any saved tokenizer (hf_dense.checkpoint_tokenizer): add_vocab converts the fast tokenizer's file.
    if not (checkpoint / "tokenizer.json").is_file():
        raise LlmshrinkError(f"{FORMAT}: {checkpoint} has no tokenizer.json; a GGUF carries its tokenizer so that "
                             "llama.cpp runs it alone")
    model = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    text = probe_text()
    ids = text_probe(tokenizer, model.config)
    # The file holds float32 weights: checked against the model in float32 (a bf16 checkpoint's own rounding would
    # exceed F32_RTOL); the difference from the model as it runs, in its own dtype, is reported.
    as_run, reference, rounding = reference_logits(model, ids, float32=True)
    densify(model, describe=False)  # a GGUF takes per-block shapes from the tensors, no config holds them
    family, shapes, head_dim = _layout(model)
    _check_quant(quant, model)
    with staged_folder(FORMAT, out) as staged:
        path = staged.folder / f"model-{quant}.gguf"
        source = path if quant == "f32" else staged.folder / "source-f32.gguf"
        arch = _write(model, tokenizer, checkpoint, source, family, shapes, head_dim)
        params = sum(p.numel() for p in model.parameters())
        del model
        _check_tokenizer(source, tokenizer, text)
        scale = float(reference.abs().max())
        exact = gguf_logits(source, ids)
        checked, rtol = max_abs_diff(exact, reference), (GELU_RTOL if family is GPT2 else F32_RTOL)
        if not checked <= rtol * scale:  # also refuses NaN
            raise LlmshrinkError(
                f"{FORMAT}: llama.cpp's logits of the f32 file differ from the compressed model's by {checked:.3g} "
                f"(max |Δ|), above the tolerance {rtol * scale:.3g} ({rtol:g} x max |logit|): the file does not "
                "compute the model; nothing was written")
        got = exact
        if quant != "f32":
            quantize(source, path, QUANTS[quant])
            source.unlink()
            got = gguf_logits(path, ids)
            if not torch.isfinite(got).all():
                raise LlmshrinkError(f"{FORMAT}: llama.cpp's logits of the {quant} file are not finite; nothing "
                                     "was written")
        result = staged.record = {
            "format": FORMAT, "quant": quant, "path": str(out / path.name), "source": str(checkpoint),
            "architecture": arch, "ffn_widths": [s[0] for s in shapes], "head_counts": [list(s[1:]) for s in shapes],
            "params": params, "bytes": path.stat().st_size, "tensor_types": tensor_types(path),
            "probe": {"text": f"builtin:python_docs test[:{PROBE_TEXT_CHARS}]", "sequences": int(ids.shape[0]),
                      "tokens": int(ids.numel())},
            # Against the compressed model as it runs (its run-time rounding included), as hf-dense reports.
            "max_abs_logit_diff": max_abs_diff(got, as_run), "top1_agreement": top1_agreement(got, as_run),
            # Against the compressed model with its rounding layers in float: the f32 file (checked), this file.
            "rounding_layers": len(rounding), "max_abs_logit": scale,
            "f32_check": {"max_abs_diff": checked, "tolerance": rtol * scale},
            "relative_diff": max_abs_diff(got, reference) / scale, "expected_relative_diff": EXPECTED[quant],
            "checked_top1_agreement": top1_agreement(got, reference),
        }
    log(f"{FORMAT}: {result['path']} ({arch}, {quant}): {params:,} params, {result['bytes'] / 1e6:.1f} MB; llama.cpp's "
        f"logits against the compressed model: max |Δ| {result['max_abs_logit_diff']:.2g}, top-1 agreement "
        f"{result['top1_agreement']:.1%}")
    if result["relative_diff"] > EXPECTED[quant]:
        log(f"{FORMAT}: {quant} moves this model's logits by {result['relative_diff']:.1%} of max |logit|, more than "
            f"it does on a recovered model (~{EXPECTED[quant]:.0%} at most): the model is sensitive to rounding; "
            "measure its perplexity in llama.cpp (gguf_runtime.gguf_perplexity) before using this file")
    return result


def probe_text() -> str:
    return builtin_text("python_docs", "test")[:PROBE_TEXT_CHARS]


def text_probe(tokenizer: Any, config: Any) -> torch.Tensor:
    """PROBE_SHAPE token ids of probe_text(): logits of real text, where rounding matters as in use (random ids,
    hf-dense's probe, exaggerate quantization error ~2x on SmolLM2-135M)."""
    count, length = PROBE_SHAPE[0], probe_length(config)
    ids = tokenizer(probe_text(), add_special_tokens=False).input_ids
    while len(ids) < count * length:  # a tokenizer that packs the text into few tokens: repeat it
        ids = ids + ids
    return torch.tensor(ids[: count * length]).reshape(count, length)


def _check_tokenizer(path: Path, tokenizer: Any, text: str) -> None:
    want = tokenizer(text, add_special_tokens=False).input_ids
    got = gguf_tokenize(path, text)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        raise LlmshrinkError(
            f"{FORMAT}: llama.cpp tokenizes the probe text differently from the checkpoint's tokenizer (from token "
            f"{at}: {got[at:at + 3]} instead of {want[at:at + 3]}); the GGUF would not read text as the model does")


def _layout(model: nn.Module) -> tuple[Any, list[tuple[int, int, int]], int]:
    """The model's family, (FFN width, query heads, key-value heads) per block and the head size; refuses in one
    line what llama.cpp's graphs for that family cannot hold."""
    model_type = getattr(model.config, "model_type", None)
    family = {"llama": LLAMA, "gpt2": GPT2}.get(model_type)
    if family is None:
        raise LlmshrinkError(f"{FORMAT}: exports Llama (SmolLM2, MobileLLM) and GPT-2 models; this checkpoint's "
                             f"model_type is {model_type!r}")
    list_name, blocks = block_list(model, family, FORMAT)
    shapes, head_dims = [], []
    for block in blocks:
        attention = block.get_submodule(family.attention)
        head_dim = int(getattr(attention, family.head_dim))
        width = int(dense_weight(block.get_submodule(join(family.mlp, family.mlp_inputs[0]))).shape[0])
        if family is GPT2:
            heads = kv = int(attention.num_heads)
        else:
            heads, kv = (int(dense_weight(attention.get_submodule(n)).shape[0]) // head_dim for n in family.qkv[:2])
        shapes.append((width, heads, kv))
        head_dims.append(head_dim)
    if family is GPT2:
        config = model.config
        if len({s[0] for s in shapes}) > 1:
            raise LlmshrinkError(f"{FORMAT}: the blocks of {list_name} have different FFN widths "
                                 f"{[s[0] for s in shapes]}; llama.cpp's gpt2 graph reads one feed_forward_length")
        if any(heads * size != config.n_embd for (_, heads, _), size in zip(shapes, head_dims, strict=True)):
            raise LlmshrinkError(
                f"{FORMAT}: the blocks of {list_name} keep {[s[1] for s in shapes]} of {config.n_head} attention "
                f"heads; llama.cpp's gpt2 graph sizes attention as n_embd x n_embd, so it cannot hold pruned heads")
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LlmshrinkError(f"{FORMAT}: llama.cpp's gpt2 graph computes GELU (tanh); this model's activation "
                                 f"is {config.activation_function}")
    else:
        rope = _rope(model.config)
        if rope.get("rope_type", "default") != "default" or getattr(model.config, "hidden_act", "silu") != "silu":
            raise LlmshrinkError(f"{FORMAT}: exports Llama models with plain RoPE and SiLU; this one has rope_type "
                                 f"{rope.get('rope_type')!r}, hidden_act {model.config.hidden_act!r}")
    if len(set(head_dims)) > 1:  # no llmshrink pass does this; llama.cpp reads one key_length
        raise LlmshrinkError(f"{FORMAT}: the blocks of {list_name} have different head sizes {head_dims}")
    return family, shapes, head_dims[0]


def _rope(config: Any) -> dict:
    """RoPE settings: transformers 5's rope_parameters, or transformers 4's rope_theta and rope_scaling."""
    if getattr(config, "rope_parameters", None):
        return dict(config.rope_parameters)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0),
            "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


def _check_quant(quant: str, model: nn.Module) -> None:
    """k-quants need every quantized row (a weight's input width) to be a whole number of 256-value blocks; llama.cpp
    would quietly put other tensors in another type, so refuse and say what fits."""
    if quant not in K_QUANTS:
        return
    rows = sorted({int(dense_weight(m).shape[1]) for m in model.modules() if isinstance(m, nn.Linear)
                   or type(m).__name__ == "Conv1D"} | {int(model.get_input_embeddings().weight.shape[1])})
    bad = [row for row in rows if row % K_BLOCK]
    if bad:
        raise LlmshrinkError(
            f"{FORMAT}: {quant} needs every quantized row to be a multiple of {K_BLOCK} values (llama.cpp's k-quant "
            f"block); this model has rows of {', '.join(map(str, bad))}: use q4_0 (4-bit) or q8_0 instead (blocks of 32)")


# --- writing ---------------------------------------------------------------------------------------------


def _write(model: nn.Module, tokenizer: Any, folder: Path, path: Path, family: Any,
           shapes: list[tuple[int, int, int]], head_dim: int) -> str:
    """The f32 GGUF of the densified model at `path` (what convert_hf_to_gguf --outtype f32 writes); returns the
    architecture name."""
    config = model.config
    per_block = len(set(shapes)) > 1
    arch = gguf.MODEL_ARCH.GPT2 if family is GPT2 else gguf.MODEL_ARCH.DECI if per_block else gguf.MODEL_ARCH.LLAMA
    name = gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(path, name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.resolve().name)
    writer.add_block_count(len(shapes))
    ffn, heads, kv = ([s[i] for s in shapes] for i in range(3))
    if family is GPT2:
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(ffn[0])
        writer.add_head_count(heads[0])
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(ffn if per_block else ffn[0])
        writer.add_head_count(heads if per_block else heads[0])
        writer.add_head_count_kv(kv if per_block else kv[0])
        writer.add_rope_freq_base(_rope(config).get("rope_theta", 10000.0))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        # Pruned heads keep their size: head size x heads is no longer the hidden size, so say it.
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, tokenizer, folder, int(model.get_input_embeddings().weight.shape[0]))
    for key, data in _tensors(model, arch, family, heads, kv, head_dim):
        writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name


def _tensors(model: nn.Module, arch: Any, family: Any, heads: list[int], kv: list[int], head_dim: int):
    """(GGUF name, float32 array) of every tensor, in the layout llama.cpp reads: GPT-2's Conv1D weights transposed
    to (out, in), Llama's q/k rows permuted from Hugging Face's rotate-half RoPE to llama.cpp's interleaved one."""
    names = gguf.get_tensor_name_map(arch, len(heads))
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    for name, tensor in model.state_dict().items():
        if name.endswith(SKIPPED) or (tied and name.endswith("lm_head.weight")):
            continue  # a tied head is read from token_embd by llama.cpp
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if key is None:
            raise LlmshrinkError(f"{FORMAT}: {name} has no GGUF tensor name in llama.cpp's {arch.name.lower()} layout")
        data = tensor.detach().float()
        bid = _block_index(key)
        if family is GPT2 and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T
        elif bid is not None and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads[bid], head_dim)
        elif bid is not None and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv[bid], head_dim)
        yield key, data.contiguous().numpy()


def _block_index(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def _permute(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: each head's two rotate-half halves interleaved."""
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
