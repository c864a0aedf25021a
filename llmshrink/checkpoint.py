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
from llmshrink.lazy_load import check_materialised, first_nonfinite, meta_weights
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
        like = next(iter(old.parameters()), None) if isinstance(old, nn.Module) else None
        on_meta = like is not None and like.is_meta  # load_checkpoint's empty model: stay empty
        try:
            with meta_weights() if on_meta else nullcontext():
                layer = cls(**spec.get("args", {}))
        except (TypeError, ValueError) as err:
            raise LlmshrinkError(f"{where}: cannot build {cls.__name__}: {err}") from None
        if on_meta:  # .to("meta") would also send the real non-persistent buffers there
            layer = layer.to(dtype=like.dtype)
        elif like is not None:
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
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    write_checkpoint(model, tokenizer, tmp, recipe_text=recipe_text, manifest=manifest, model_card=model_card)
    try:
        move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_checkpoint(
    model: nn.Module, tokenizer: Any, directory: str | Path, *, recipe_text: str, manifest: dict[str, Any],
    model_card: str,
) -> Path:
    """Write every checkpoint file into `directory`, which must not exist yet; on failure it is removed.

    save_checkpoint publishes it with one rename; `apply` first adds its report and checks the reload there.
    """
    directory = Path(directory)
    base = _base_architecture(model)
    layout = compressed_layout(model)
    attrs = module_attrs(model)
    quantization = quantization_config(model)  # bitsandbytes layers, in transformers' format (bnb.py)
    manifest_text = _manifest_text(model, base, manifest)  # fails early if not JSON-serialisable
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir()
    try:
        _save_weights_and_config(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        _patch_config(directory, model, base, layout, attrs, quantization)
        _check_saved_keys(model, directory)
        (directory / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        (directory / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")
        (directory / "README.md").write_text(model_card, encoding="utf-8")
        make_readable(directory)  # safetensors and mkdtemp-style dirs would otherwise be owner-only
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compressed architecture from config.json and load the weights strictly.

    The model is built empty (parameters on "meta", see lazy_load) and takes the file's tensors
    themselves, so neither the dense base nor a second copy of the weights is ever allocated.
    """
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
    """Refuse an existing output unless overwrite is set, or one that cannot be written (also called
    before any work is done)."""
    import os
    import tempfile

    if out_dir.exists() and not overwrite:
        raise LlmshrinkError(
            f"output.dir: {out_dir} already exists; set output.overwrite: true or choose another dir"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmshrinkError(f"output.dir: {out_dir} exists and is not a directory")
    # The checkpoint (and the work dir beside it) is made in the parent: probe the nearest existing
    # folder by creating a directory there, which also catches read-only file systems (and works as root).
    parent = Path(os.path.abspath(out_dir)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LlmshrinkError(f"output.dir: cannot create {out_dir}: {parent} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmshrink-probe-", dir=parent))
    except OSError as err:
        raise LlmshrinkError(
            f"output.dir: cannot create {out_dir}: {parent} is not writable ({err.strerror or err})"
        ) from None


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


def move_into_place(tmp: Path, out_dir: Path, overwrite: bool, aside: Path | None = None) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first and deleted only at the end.

    `aside`: where the old out_dir waits (a path that does not exist, on the same filesystem); by default
    a hidden sibling. If the rename of tmp fails, the old one is put back.
    """
    if not out_dir.exists():
        tmp.rename(out_dir)  # fails (ENOTEMPTY) rather than replace a directory that appeared meanwhile
        return
    if not overwrite:
        raise LlmshrinkError(
            f"output.dir: {out_dir} already exists; set output.overwrite: true or choose another dir"
        )
    old = aside or out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
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
    """Construct the base model empty (see lazy_load) in the saved dtype, skipping random init."""
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
        with no_init_weights(), meta_weights():
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
    """Load block by block; each (checked) file tensor becomes the parameter itself (assign): no copy.

    Those tensors map the file and are read from it when first used (see lazy_load). Tensors already real
    (bnb layers, rebuilt from the file) are copied into, as their classes need.
    """
    state = model.state_dict()
    expected = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    empty = {key for key, t in state.items() if t.is_meta}
    del state
    _check_keys(model, _read_tensor_meta(path).keys(), path)
    loaded: set[str] = set()
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as lazy:
            bad = first_nonfinite(file, lazy.keys())
            if bad is not None:
                raise LlmshrinkError(f"{file}: {bad}: contains NaN or inf")
            for keys in _block_groups(lazy.keys()):
                chunk = {key: _checked_tensor(lazy, key, expected[key], file) for key in keys}
                assign = {key: t for key, t in chunk.items() if key in empty}
                if assign:
                    model.load_state_dict(assign, strict=False, assign=True)
                if len(assign) < len(chunk):
                    model.load_state_dict({k: t for k, t in chunk.items() if k not in empty}, strict=False)
                loaded.update(chunk)
    model.tie_weights()  # the assigned tensors replaced the (meta) ones the tied modules shared
    _check_aliases(model, loaded, path)
    check_materialised(model, path)


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
