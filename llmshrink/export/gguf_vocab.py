"""The tokenizer of a GGUF (llmshrink/export/gguf.py), written as llama.cpp's convert_hf_to_gguf.py writes it.

    add_vocab(writer, tokenizer, folder, n_vocab)   byte-level BPE (GPT-2, SmolLM2) as tokenizer.ggml.model "gpt2"
                                                    with the pre-tokenizer named by the converter's hash test; BPE
                                                    with byte fallback (Llama 2, MobileLLM) as "llama" through
                                                    gguf.LlamaHfVocab; anything else refused in one line
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from llmshrink.errors import LlmshrinkError

FORMAT = "gguf"
# convert_hf_to_gguf's get_vocab_base_pre: the sha256 of the token ids of CHECK_TEXT names the pre-tokenizer
# llama.cpp must reproduce (its entries for the tokenizers of the models this export takes).
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
}

def add_vocab(writer: Any, tokenizer: Any, folder: Path, n_vocab: int) -> None:
    """The tokenizer, as convert_hf_to_gguf writes it: _set_vocab_llama_hf for BPE with byte fallback,
    _set_vocab_gpt2 (get_vocab_base + the pre-tokenizer hash) for byte-level BPE; special ids, merges, whether to
    add BOS and the chat template through gguf.SpecialVocab."""
    kind = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    byte_fallback = kind.get("type") == "BPE" and bool(kind.get("byte_fallback"))
    if kind.get("type") != "BPE":
        raise LlmshrinkError(
            f"{FORMAT}: the tokenizer is a {kind.get('type')} model; llama.cpp tokenizes byte-level BPE (GPT-2, "
            "SmolLM2) and BPE with byte fallback (Llama 2, MobileLLM) the way the model saw text, not this one")
    if len(tokenizer) > n_vocab:
        raise LlmshrinkError(f"{FORMAT}: the tokenizer has {len(tokenizer)} tokens, the embedding {n_vocab} rows")
    if byte_fallback:
        tokens, scores, types = (list(x) for x in zip(*gguf.LlamaHfVocab(folder).all_tokens(), strict=True))
        pads = range(len(tokens), n_vocab)  # embedding rows no token uses, as get_vocab_base pads them
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens + [f"[PAD{i}]" for i in pads])
        writer.add_token_scores(scores + [-1000.0 for _ in pads])
        writer.add_token_types(types + [gguf.TokenType.UNUSED for _ in pads])
    else:
        digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
        if digest not in PRE_TOKENIZERS:
            raise LlmshrinkError(
                f"{FORMAT}: the tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce (convert_hf_to_gguf's "
                f"hash {digest[:16]}...; known here: {', '.join(PRE_TOKENIZERS.values())})")
        tokens, types = _bpe_tokens(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZERS[digest])
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=not byte_fallback, n_vocab=n_vocab)
    # What the checkpoint's tokenizer does, written out: llama.cpp's own default for add_bos differs by vocab.
    special.add_special_token["bos"] = bool(tokenizer.bos_token_id is not None and
                                            tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id])
    special.add_to_gguf(writer, quiet=True)


def _bpe_tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf's get_vocab_base: each id's token and type; ids the tokenizer lacks become unused pads."""
    reverse = {i: token for token, i in tokenizer.vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            kind = gguf.TokenType.CONTROL if decoder[i].special or looks_special else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types
