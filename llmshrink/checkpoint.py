"""Save and load compressed checkpoints that reload exactly, with llmshrink and without it.

    out/<name>/  config.json (+ llmshrink_layout, llmshrink_module_attrs, auto_map)  model.safetensors
                 tokenizer files  recipe.yaml  llmshrink.json  README.md  modeling_llmshrink.py  <layer files>.py

The layout ({module name: {"type", "args"}}) lives in config.json, so that the remote code (which sees
only the config) and `load_checkpoint` rebuild the same modules before the weights load. Plain module
attributes a pass changed (a pruned attention's head count: {module name: {attribute: value}}, see
`set_module_attrs`) are recorded beside it and set again on load.

Layers of bitsandbytes (quantize bnb-*) are saved in transformers' own format, with config.json's
`quantization_config` (see llmshrink/bnb.py), and rebuilt by `rebuild_layers` before the strict load.
"""

from __future__ import annotations

import json
import platform
import re
import secrets
import shutil
from collections.abc import Iterable
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn

from llmshrink import __version__
from llmshrink.bnb import quantization_config, rebuild_layers
from llmshrink.errors import LlmshrinkError
from llmshrink.fileio import make_readable
from llmshrink.modules import COMPRESSED_MODULES
from llmshrink.remote_template import REMOTE_FILE, write_remote_code

LAYOUT_KEY = "llmshrink_layout"
ATTRS_KEY = "llmshrink_module_attrs"
# Name of the dict, on a module, of the plain attributes a pass changed (see set_module_attrs).
MODULE_ATTRS = "llmshrink_attrs"
BASE_KEY = "llmshrink_base_architecture"
MANIFEST_FILE = "llmshrink.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Auto classes tried, in order, to find the one whose mapping names the base architecture.
_AUTO_CLASSES = (
    "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoModel",
)


def compressed_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{dotted name: {"type": class name, "args": layout_args()}} for every compressed layer."""
    layout: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if COMPRESSED_MODULES.get(type(module).__name__) is not type(module):
            continue
        if any(name.startswith(f"{outer}.") for outer in layout):
            continue  # rebuilt by its enclosing compressed layer
        layout[name] = {"type": type(module).__name__, "args": module.layout_args()}
    return layout


def apply_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> None:
    """Replace each named submodule by an (uninitialised) compressed layer of the recorded shape.

    A layer that runs another module (a shared block) has `bind(model)`, called once all are in place.
    """
    built: dict[str, nn.Module] = {}
    for name, spec in layout.items():
        where = f"{LAYOUT_KEY}.{name}"
        cls = COMPRESSED_MODULES.get(spec.get("type", ""))
        if cls is None:
            known = ", ".join(sorted(COMPRESSED_MODULES))
            raise LlmshrinkError(f"{where}: unknown layer type {spec.get('type')!r}; known: {known}")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise LlmshrinkError(f"{where}: {type(model).__name__} has no such module") from None
        try:
            layer = cls(**spec.get("args", {}))
        except (TypeError, ValueError) as err:
            raise LlmshrinkError(f"{where}: cannot build {cls.__name__}: {err}") from None
        like = next(iter(old.parameters()), None) if isinstance(old, nn.Module) else None
        if like is not None:
            layer = layer.to(device=like.device, dtype=like.dtype)
        setattr(parent, child, layer)
        built[name] = layer
    for name, layer in built.items():
        if hasattr(layer, "bind"):
            try:
                layer.bind(model)
            except ValueError as err:
                raise LlmshrinkError(f"{LAYOUT_KEY}.{name}: cannot bind {type(layer).__name__}: {err}") from None


def set_module_attrs(module: nn.Module, **values: Any) -> None:
    """Set plain attributes (JSON values) that the model config no longer implies, and remember them.

    E.g. a GPT-2 attention keeping 3 of 12 heads reads `split_size` at forward time; checkpoints record
    these (`module_attrs`) and set them again after rebuilding the model.
    """
    for key, value in values.items():
        setattr(module, key, value)
    setattr(module, MODULE_ATTRS, {**module.__dict__.get(MODULE_ATTRS, {}), **values})


def module_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{dotted name: {attribute: value}} for every module with attributes set by set_module_attrs."""
    return {name: dict(m.__dict__[MODULE_ATTRS]) for name, m in model.named_modules() if m.__dict__.get(MODULE_ATTRS)}


def apply_module_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> None:
    for name, values in attrs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LlmshrinkError(f"{ATTRS_KEY}.{name}: {type(model).__name__} has no such module") from None
        set_module_attrs(module, **values)


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    recipe_text: str,
    manifest: dict[str, Any],
    model_card: str,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint into a temporary sibling directory, then rename it into place.

    A failure at any point removes the temporary directory and leaves an existing out_dir untouched.
    """
    out_dir = Path(out_dir)
    _check_destination(model, out_dir, overwrite)
    base = _base_architecture(model)
    layout = compressed_layout(model)
    attrs = module_attrs(model)
    quantization = quantization_config(model)  # bitsandbytes layers, in transformers' format (bnb.py)
    manifest_text = _manifest_text(model, base, manifest)  # fails early if not JSON-serialisable
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _save_weights_and_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _patch_config(tmp, model, base, layout, attrs, quantization)
        _check_saved_keys(model, tmp)
        (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
        make_readable(tmp)  # safetensors and mkdtemp-style dirs would otherwise be owner-only
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compressed architecture from config.json and load the weights strictly."""
    path = Path(path)
    if not path.is_dir():
        raise LlmshrinkError(f"{path}: no such checkpoint directory")
    for name in ("config.json", MANIFEST_FILE):
        if not (path / name).is_file():
            raise LlmshrinkError(f"{path}: not an llmshrink checkpoint (no {name})")
    raw = _read_json(path / "config.json")
    layout = raw.get(LAYOUT_KEY) or {}
    attrs = raw.get(ATTRS_KEY) or {}
    base = raw.get(BASE_KEY) or (raw.get("architectures") or [None])[0]
    base_cls = getattr(transformers, str(base), None)
    if not (isinstance(base_cls, type) and issubclass(base_cls, transformers.PreTrainedModel)):
        raise LlmshrinkError(f"{path / 'config.json'}: {BASE_KEY}: {base!r} is not a transformers model class")
    config = transformers.AutoConfig.from_pretrained(path)
    # A plain base config: no routing to remote code, no quantization (the bnb layers are rebuilt below).
    for key in ("auto_map", LAYOUT_KEY, ATTRS_KEY, BASE_KEY, "quantization_config"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [base_cls.__name__]
    model = _build(base_cls, config)
    apply_layout(model, layout)
    apply_module_attrs(model, attrs)
    rebuild_layers(model, raw.get("quantization_config"), _weight_files(path), path / "config.json",
                   torch.device(device))
    _load_weights(model, path)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path))


# --- saving -------------------------------------------------------------------------------------


def _check_destination(model: nn.Module, out_dir: Path, overwrite: bool) -> None:
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if source and Path(source).is_dir() and Path(source).resolve() == out_dir.resolve():
        raise LlmshrinkError(f"output.dir: {out_dir} is the input model; choose another dir")
    check_output_dir(out_dir, overwrite)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output unless overwrite is set (also called before any work is done)."""
    if out_dir.exists() and not overwrite:
        raise LlmshrinkError(
            f"output.dir: {out_dir} already exists; set output.overwrite: true or choose another dir"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmshrinkError(f"output.dir: {out_dir} exists and is not a directory")


def _base_architecture(model: nn.Module) -> str:
    """The transformers class the model is built on (skipping our own remote-code subclass)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and getattr(transformers, cls.__name__, None) is cls:
            return cls.__name__
    raise LlmshrinkError(f"cannot save {type(model).__name__}: it is not built on a transformers model class")


def _manifest_text(model: nn.Module, base: str, manifest: dict[str, Any]) -> str:
    config = getattr(model, "config", None)
    full = {
        **manifest,
        "architecture": base,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "llmshrink_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        return json.dumps(full, indent=2) + "\n"
    except TypeError as err:
        raise LlmshrinkError(f"manifest: not JSON-serialisable: {err}") from None


def _save_weights_and_config(model: nn.Module, tmp: Path) -> None:
    """save_pretrained writes dtype and architectures into the live config; put them back after."""
    config = model.config
    # Reading `torch_dtype` warns in transformers 5, so touch it only where `dtype` does not exist.
    keys = ("architectures", "dtype" if hasattr(config, "dtype") else "torch_dtype")
    saved = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    try:
        # safetensors is the only format in transformers 5 (and the default in 4.x); tied weights
        # are written once.
        model.save_pretrained(tmp)
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _patch_config(tmp: Path, model: nn.Module, base: str, layout: dict[str, Any], attrs: dict[str, Any],
                  quantization: dict[str, Any] | None = None) -> None:
    """Record the layout (and bnb quantization); point AutoModel* at the remote code when there are layers to
    rebuild."""
    config_path = tmp / "config.json"
    config = _read_json(config_path)
    config[BASE_KEY] = base
    config[LAYOUT_KEY] = layout
    config.pop(ATTRS_KEY, None)
    if attrs:
        config[ATTRS_KEY] = attrs
    config.pop("quantization_config", None)
    if quantization:
        config["quantization_config"] = quantization
    config.pop("auto_map", None)
    config["architectures"] = [base]
    if layout or attrs:
        cls = write_remote_code(tmp, base, layout)
        config["architectures"] = [cls]
        config["auto_map"] = {_auto_class(model, base): f"{REMOTE_FILE[:-3]}.{cls}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _auto_class(model: nn.Module, base: str) -> str:
    for name in _AUTO_CLASSES:
        try:
            if getattr(transformers, name)._model_mapping[type(model.config)].__name__ == base:
                return name
        except KeyError:
            continue
    raise LlmshrinkError(f"cannot write remote code for {base}: no transformers auto class maps to it")


def _check_saved_keys(model: nn.Module, tmp: Path) -> None:
    """What was written must load back strictly: catch dropped tensors now, not at load time."""
    saved = set(_read_tensor_meta(tmp))
    _check_keys(model, saved, tmp)
    _check_aliases(model, saved, tmp)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first and deleted only at the end."""
    if not out_dir.exists():
        tmp.rename(out_dir)  # fails (ENOTEMPTY) rather than replace a directory that appeared meanwhile
        return
    if not overwrite:
        raise LlmshrinkError(
            f"output.dir: {out_dir} already exists; set output.overwrite: true or choose another dir"
        )
    old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LlmshrinkError(f"{path}: cannot read JSON: {err}") from None
    if not isinstance(data, dict):
        raise LlmshrinkError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _build(base_cls: type, config: Any) -> nn.Module:
    """Construct the base model in the saved dtype, skipping random init (every tensor is loaded)."""
    dtype = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    dtype = dtype or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            no_init_weights = nullcontext
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            return base_cls(config)
    finally:
        torch.set_default_dtype(previous)


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if (path / WEIGHTS_INDEX).is_file():
        shards = sorted(set(_read_json(path / WEIGHTS_INDEX).get("weight_map", {}).values()))
        return [path / shard for shard in shards]
    raise LlmshrinkError(f"{path}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX})")


def _read_tensor_meta(path: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, dtype name)} from the safetensors headers, without reading the data."""
    meta: dict[str, tuple[list[int], str]] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    meta[key] = (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype())
        except Exception as err:  # safetensors raises its own error types for bad files
            raise LlmshrinkError(f"{file}: cannot read safetensors: {err}") from None
    return meta


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load block by block, so that at most one block's tensors exist twice (file copy and parameter)."""
    expected = {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()}
    _check_keys(model, _read_tensor_meta(path).keys(), path)
    loaded: set[str] = set()
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            groups = _block_groups(handle.keys())
        for keys in groups:
            # A fresh mapping per block: the pages read stay resident while the file is open.
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                chunk = {key: _checked_tensor(handle, key, expected[key], file) for key in keys}
            model.load_state_dict(chunk, strict=False)
            loaded.update(chunk)
    model.tie_weights()
    _check_aliases(model, loaded, path)


def _block_groups(keys: Iterable[str]) -> list[list[str]]:
    """Keys grouped by their numbered block ("model.layers.3."), the rest together: a module's keys
    always share a group, as its load hooks need them together."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        block = re.match(r"(.*?\.\d+\.)", key)
        groups.setdefault(block.group(1) if block else "", []).append(key)
    return list(groups.values())


def _checked_tensor(handle: Any, key: str, want: tuple[tuple[int, ...], torch.dtype], file: Path) -> torch.Tensor:
    tensor = handle.get_tensor(key)
    if (tuple(tensor.shape), tensor.dtype) != want:
        raise LlmshrinkError(
            f"{file}: {key}: saved {tuple(tensor.shape)} {tensor.dtype}, the rebuilt model expects {want[0]} {want[1]}"
        )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise LlmshrinkError(f"{file}: {key}: contains NaN or inf")
    return tensor


def _check_keys(model: nn.Module, file_keys: Iterable[str], where: Path) -> None:
    unexpected = sorted(set(file_keys) - set(model.state_dict()))
    if unexpected:
        raise LlmshrinkError(
            f"{where}: {len(unexpected)} tensor(s) the rebuilt model does not have: {_first(unexpected)}"
        )


def _check_aliases(model: nn.Module, loaded: set[str], where: Path) -> None:
    """Every tensor not in the file must be the very same tensor as one that is (tied weights)."""
    state = model.state_dict(keep_vars=True)
    loaded_ids = {id(state[key]) for key in loaded if key in state}
    missing = sorted(key for key in state if key not in loaded and id(state[key]) not in loaded_ids)
    if missing:
        raise LlmshrinkError(f"{where}: {len(missing)} tensor(s) missing from the weights: {_first(missing)}")


def _first(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")
