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

# reload_without_llmshrink's `auto` for checkpoints named by model family.
AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM"}

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
        logits = model(ids).logits
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

    Returns {name: {"logits": model(input_ids).logits, "layers": [type(m).__module__ for each module whose
    class is named `layer`], "probe": probe's value or None}}, in the order of `outs`.
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


def tiny_bert(seed: int = 0, *, layers: int = 2, **overrides):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(**{"hidden_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                           "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64, **overrides})
    return BertForMaskedLM(config).eval()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random GPT-2 and tokenizer saved as a local model directory."""
    path = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


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


def save_tiny(model, out):
    """save_checkpoint with the tiny tokenizer and placeholder recipe, manifest and card."""
    from llmshrink.checkpoint import save_checkpoint

    return save_checkpoint(model, tiny_tokenizer(), out, recipe_text="name: t\n", manifest={"name": "t"},
                           model_card="# t\n")
