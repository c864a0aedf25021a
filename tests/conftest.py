"""Shared fixtures: tiny seeded random models saved with an offline tokenizer (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

# Start of a script run in a subprocess that must load a checkpoint with plain transformers: any
# import of llmshrink fails (the source tree and editable-install hooks are taken off the path).
# %-format it with `repo` = the repository root; reload_without_llmshrink below is the usual way to use it.
WITHOUT_LLMSHRINK = r"""
import importlib.abc, sys
sys.path = [p for p in sys.path if p not in (%(repo)r, "")]
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                 and "editable" not in getattr(f, "__name__", "").lower()]

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llmshrink":
            raise ImportError("llmshrink is blocked in this test")

sys.meta_path.insert(0, Block())
"""

# The rest of reload_without_llmshrink's script (after WITHOUT_LLMSHRINK and the test's `probe` source).
_RELOAD = r"""
try:
    import llmshrink
except ImportError:
    pass
else:
    raise SystemExit("llmshrink importable")
import torch
import transformers
torch.set_num_threads(%(threads)d)  # as in the test process: matmul sums split by thread differ in the last bit
ids = torch.load(%(ids)r)
results = {}
for name, (auto, out) in %(outs)r.items():
    model = getattr(transformers, auto).from_pretrained(out, trust_remote_code=True, **%(load_kwargs)r).eval()
    if "prepare" in globals():
        prepare(model, name)
    with torch.no_grad():
        out = model(ids)
    logits = out.logits if "logits" in out else out.last_hidden_state  # a bare encoder has no logits
    layers = [type(m).__module__ for m in model.modules() if type(m).__name__ == %(layer)r]
    results[name] = {"logits": logits, "layers": layers, "probe": probe(model, name) if "probe" in globals() else None}
assert not any(name.startswith("llmshrink") for name in sys.modules)
torch.save(results, %(results)r)
"""


def reload_without_llmshrink(outs: dict, input_ids: torch.Tensor, *, auto: str | dict = "AutoModelForCausalLM",
                             layer: str = "", probe: str = "", load_kwargs: dict | None = None) -> dict[str, dict]:
    """Load each checkpoint of `outs` ({name: dir}) with plain transformers (trust_remote_code=True) in a
    subprocess where llmshrink cannot be imported, and run `input_ids` through it.

    One subprocess for all of them: starting python + transformers is most of the time. `auto` names the
    transformers Auto class (one for all, or {name: class}); `load_kwargs` go to from_pretrained. The
    subprocess uses this process's torch thread count. `probe` is Python source that may define
    `prepare(model, name)` (run before the forward) and `probe(model, name)` (its value is returned: tensors,
    str, numbers, lists, dicts); both can read the global `ids` (= `input_ids`).

    Returns {name: {"logits": model(input_ids).logits (a bare encoder: last_hidden_state), "layers":
    [type(m).__module__ for each module whose class is named `layer`], "probe": probe's value or None}}, in the
    order of `outs`.
    """
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import llmshrink

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(input_ids, Path(tmp) / "ids.pt")
        autos = {name: auto[name] if isinstance(auto, dict) else auto for name in outs}
        script = WITHOUT_LLMSHRINK % {"repo": str(Path(llmshrink.__file__).parents[1])} + probe + _RELOAD % {
            "threads": torch.get_num_threads(), "ids": str(Path(tmp) / "ids.pt"), "layer": layer,
            "outs": {name: (autos[name], str(out)) for name, out in outs.items()}, "load_kwargs": load_kwargs or {},
            "results": str(Path(tmp) / "results.pt"),
        }
        env = {**os.environ, "HF_MODULES_CACHE": str(Path(tmp) / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        return torch.load(Path(tmp) / "results.pt", weights_only=True)


# A small valid recipe that the recipe tests vary one field at a time.
RECIPE_BASE = """\
name: t
model: {id: some/dir}
stages:
  - kronecker: {targets: '.*mlp.*', rank: 1}
  - distill: {steps: 2}
output: {dir: out/t}
"""

WORDS = (
    "the a of and to in is was he she it that for on with as his her they at by this had not but be "
    "from are have were or all one which their so an there been if would will what when who more no "
    "out up said into them than time could about only like then some my now".split()
)


def tiny_tokenizer():
    """A word-level fast tokenizer over a fixed vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<eos>", pad_token="<eos>")


# The tiny builders: seeded, in eval mode; `layers` and keyword overrides of the config (other sizes) change
# the model without changing the defaults, so each test keeps its numbers.


def tiny_gpt2(seed: int = 0, *, layers: int = 2, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**{"n_layer": layers, "n_embd": 64, "n_head": 4, "n_inner": 256, "vocab_size": 128,
                           "n_positions": 128, "bos_token_id": 1, "eos_token_id": 1, **overrides})
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, *, layers: int = 2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": layers,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                            "max_position_embeddings": 128, "tie_word_embeddings": True, "bos_token_id": 1,
                            "eos_token_id": 1, "pad_token_id": 1, **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_mistral(seed: int = 0, *, layers: int = 2, **overrides):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**{**_LLAMA_STYLE, "num_hidden_layers": layers, "sliding_window": 16, **overrides})
    return MistralForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0, *, layers: int = 2, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)  # Qwen2: biases on q/k/v, none on o
    config = Qwen2Config(**{**_LLAMA_STYLE, "num_hidden_layers": layers, **overrides})
    return Qwen2ForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0, *, layers: int = 2, **overrides):
    """Gemma 3's differences that matter to passes: q/k norms, pre/post FFN norms, scaled embeddings, sliding and
    full attention layers (layer_types: every 2nd layer full here, every 6th in the real model)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = Gemma3TextConfig(**{**_LLAMA_STYLE, "num_hidden_layers": layers, "head_dim": 16, "sliding_window": 16,
                                 "layer_types": types, "query_pre_attn_scalar": 16, **overrides})
    return Gemma3ForCausalLM(config).eval()


# Llama-style sizes shared by the tiny Mistral, Qwen2 and Gemma 3 (tiny_llama keeps its own, older numbers).
_LLAMA_STYLE = {"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 128, "max_position_embeddings": 128, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 1}

# Every decoder family's tiny builder: structural tests run over all of them (and tiny_bert for encoders).
DECODER_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2,
                    "gemma3": tiny_gemma3}


def tiny_bert(seed: int = 0, *, layers: int = 2, **overrides):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(**{"hidden_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                           "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64, **overrides})
    return BertForMaskedLM(config).eval()


# Every tiny builder, decoders then BERT; the Family each one's model belongs to (what records say); and
# reload_without_llmshrink's `auto` for checkpoints named by builder.
BUILDERS = {**DECODER_BUILDERS, "bert": tiny_bert}
FAMILY = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma3": "gemma", "bert": "bert"}
AUTO = {name: "AutoModelForMaskedLM" if name == "bert" else "AutoModelForCausalLM" for name in BUILDERS}


# Tiny models of families llmshrink does not support (unseeded: tests only see them refused).


def tiny_opt(*, layers: int = 1):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(config).eval()


def tiny_neox(*, layers: int = 2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


def model_dir(model, path):
    """`model` and the tiny tokenizer saved (save_pretrained) as a local model directory at `path`."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random GPT-2 and tokenizer saved as a local model directory."""
    return model_dir(tiny_gpt2(), tmp_path / "tiny-gpt2")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return model_dir(tiny_llama(), tmp_path / "tiny-llama")


@pytest.fixture
def tiny_text(tmp_path):
    """A local text file in the tiny tokenizer's vocabulary, with repeated structure to learn."""
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS[:20]) for _ in range(12)) for _ in range(200)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrated(tokens: int = 300, seed: int = 0):
    """A context whose calibration tokens are given directly (no data: section needed)."""
    from llmshrink.context import Context

    class Calibrated(Context):
        def train_token_ids(self) -> torch.Tensor:
            return ids

    ids = torch.randint(0, 100, (tokens,), generator=torch.Generator().manual_seed(seed))
    return Calibrated(tokenizer=None, log=lambda _: None)


def quiet_ctx():
    """A context with no data and no logging, for passes that need neither."""
    from llmshrink.context import Context

    return Context(tokenizer=None, log=lambda _: None)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def save_tiny(model, out, **given):
    """save_checkpoint with the tiny tokenizer and placeholder recipe, manifest and card (or those `given`:
    recipe_text=, manifest=, model_card=)."""
    from llmshrink.checkpoint import save_checkpoint

    return save_checkpoint(model, tiny_tokenizer(), out, **{"recipe_text": "name: t\n", "manifest": {"name": "t"},
                                                            "model_card": "# t\n", **given})


def pruned_checkpoints(root, pass_name: str, prune) -> dict:
    """{name: (model, checkpoint dir)} for each of BUILDERS' models after `prune(name, model)`, which runs the pass
    called `pass_name` and returns its record; saved (save_tiny) under `root / name` with that record."""
    saved = {}
    for name, build in BUILDERS.items():
        model = build()
        record = prune(name, model)
        saved[name] = model, save_tiny(model, root / name, model_card="card",
                                       manifest={"name": name, "passes": [{"pass": pass_name, "record": record}]})
    return saved


def recipe_error(path, text: str) -> str:
    """The RecipeError that loading `text`, written to `path`, raises, as a string."""
    from llmshrink.errors import RecipeError
    from llmshrink.recipe import load_recipe

    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return str(err.value)


def tensor_bytes(out, suffix: str) -> int:
    """Bytes of the tensors in checkpoint `out`'s model.safetensors whose names end with `suffix`."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        tensors = [handle.get_tensor(key) for key in handle.keys() if key.endswith(suffix)]
    return sum(t.numel() * t.element_size() for t in tensors)


def apply_and_save(tmp, apply, configs: dict) -> dict:
    """For each {builder name: pass config}: build the model (BUILDERS), `apply(model, config, quiet_ctx())` and
    save_tiny it under `tmp / name`. Returns {name: (model, checkpoint dir, its AUTO class)}."""
    found = {}
    for name, cfg in configs.items():
        model = BUILDERS[name]()
        apply(model, cfg, quiet_ctx())
        found[name] = (model, save_tiny(model, tmp / name), AUTO[name])
    return found


def stage_error(name: str, body: dict) -> str:
    """What the one-line error of parse_stage for a stage `name: body` says after "recipe.yaml: stages[0].<name>"."""
    from llmshrink.errors import LlmshrinkError
    from llmshrink.recipe import parse_stage

    with pytest.raises(LlmshrinkError) as info:
        parse_stage({name: body}, "recipe.yaml", "stages[0]")
    prefix = f"recipe.yaml: stages[0].{name}"
    assert str(info.value).startswith(prefix)
    return str(info.value)[len(prefix):]


def quantize_with_untied_head(model, method: str) -> None:
    """Quantize a tied tiny Llama's blocks and lm_head with `method`, untying the head from the embedding, and
    check that the record says so and the embedding keeps its weights."""
    from llmshrink.passes.quantize import QuantizeConfig, apply

    embedding = model.model.embed_tokens.weight.detach().clone()
    record = apply(model, QuantizeConfig(method=method, targets=r".*\.\d+\..*|lm_head", tied_embeddings="untie"),
                   quiet_ctx())
    assert record["untied"] == ["lm_head"] and model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def one_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, which is returned."""
    from llmshrink.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]
