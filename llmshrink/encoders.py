"""Which `model.task` fits which model, the transformers Auto class of each task, and the sentence-transformers
files written beside an `embedding` model's checkpoint (so `SentenceTransformer(out_dir)` loads it).

Decoders (causal LMs) load as `causal_lm` only; BERT-family encoders as `embedding` (the bare encoder,
AutoModel) or `sequence_classification` (AutoModelForSequenceClassification).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmshrink.errors import LlmshrinkError

TASK_AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "embedding": "AutoModel",
}
DECODER_TASKS = ("causal_lm",)
ENCODER_TASKS = ("embedding", "sequence_classification")
_SUPPORTED = "llmshrink loads causal LMs (GPT-2, Llama-family, ...) and BERT-family encoders"


def is_encoder(config: Any) -> bool:
    """A BERT-like model as configured: it has a masked-LM head class and is not set up as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    return getattr(config, "model_type", "") in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_task(config: Any, task: str, shown: str, trust_remote_code: bool = False) -> None:
    """Refuse a model that `task` does not fit (and kinds of model no task fits), in one line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", "") or type(config).__name__
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if getattr(config, "is_encoder_decoder", False):
        raise LlmshrinkError(f"model.id: {shown} is an encoder-decoder model ({kind}); {_SUPPORTED}")
    if is_encoder(config):
        what, allowed = "an encoder", ENCODER_TASKS
    elif kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote_causal:
        what, allowed = "a causal LM", DECODER_TASKS
    else:
        raise LlmshrinkError(f"model.id: {shown} is neither a causal LM nor an encoder ({kind}); {_SUPPORTED}")
    if task not in allowed:
        raise LlmshrinkError(
            f"model.task: '{task}' does not fit {shown}, {what} ({kind}); allowed for it: {', '.join(allowed)}"
        )


def is_embedding_model(model: Any) -> bool:
    """A bare encoder, as `model.task: embedding` loads it (BertModel, or llmshrink's subclass of it)."""
    import transformers

    config = getattr(model, "config", None)
    if config is None or not is_encoder(config):
        return False
    bare = transformers.AutoModel._model_mapping.get(type(config), None)
    return isinstance(bare, type) and isinstance(model, bare)


# --- sentence-transformers ---------------------------------------------------------------------------------
# The classic layout (as the hub's all-MiniLM-L6-v2 has it): every sentence-transformers release from 2.x to
# 6.x loads it, where the module paths 6.x itself writes (sentence_transformers.base.modules...) need 6.x.
POOLING_DIR = "1_Pooling"
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", f"{POOLING_DIR}/config.json",
                  "config_sentence_transformers.json")


def write_sentence_transformers_files(directory: Path, model: Any, tokenizer: Any) -> None:
    """modules.json (Transformer, then mean Pooling), sentence_bert_config.json, 1_Pooling/config.json and
    config_sentence_transformers.json, so `SentenceTransformer(directory)` gives the mean-pooled (masked)
    last hidden states; the weights and tokenizer are the checkpoint's own, in `directory`."""
    config = model.config
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {
        "word_embedding_dimension": int(config.hidden_size),
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": _max_seq_length(config, tokenizer), "do_lower_case": False},
        f"{POOLING_DIR}/config.json": pooling,
        "config_sentence_transformers.json": {
            "__version__": _versions(), "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
        },
    }
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def adopt_sentence_max_length(directory: Path, tokenizer: Any) -> str | None:
    """A sentence-transformers model directory truncates at its own max_seq_length (256 for all-MiniLM-L6-v2,
    below its 512 positions): give the tokenizer that limit, so embeddings (and the checkpoint's
    sentence_bert_config.json) match. Returns a note when it changed the tokenizer."""
    try:
        limit = json.loads((directory / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    current = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit < 1 or (isinstance(current, int) and current <= limit):
        return None
    tokenizer.model_max_length = limit
    return f"tokenizer truncates at {limit} tokens, the max_seq_length of {directory.name}/sentence_bert_config.json"


def _max_seq_length(config: Any, tokenizer: Any) -> int:
    # The positions the model has, or fewer where the tokenizer says so (its default is a huge sentinel).
    limit = int(getattr(config, "max_position_embeddings", 512) or 512)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    return limit


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for key, dist in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"),
                      ("pytorch", "torch")):
        try:
            found[key] = version(dist)
        except PackageNotFoundError:
            continue
    return found
