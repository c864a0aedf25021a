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
# The test %-formats the whole script, with `repo` = the repository root.
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


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, vocab_size=128, n_positions=128,
                        bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=64)
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
