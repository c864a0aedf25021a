"""Save compressed checkpoints that reload exactly, with llmshrink (see checkpoint_load) and without it.

    out/<name>/  config.json (+ llmshrink_layout, llmshrink_module_attrs, auto_map)  model.safetensors
                 tokenizer files  recipe.yaml  llmshrink.json  README.md  modeling_llmshrink.py  <layer files>.py
                 (a bare encoder, model.task embedding: modules.json, sentence_bert_config.json, 1_Pooling/ ...)

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
import secrets
import shutil
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from llmshrink.bnb import quantization_config
from llmshrink.checkpoint_files import check_aliases, check_keys, read_json, read_tensor_meta
from llmshrink.encoders import is_embedding_model, write_sentence_transformers_files
from llmshrink.errors import LlmshrinkError
from llmshrink.fileio import make_readable
from llmshrink.lazy_load import meta_weights
from llmshrink.modules import COMPRESSED_MODULES
from llmshrink.remote_template import REMOTE_FILE, write_remote_code
from llmshrink.targeting import module_attrs, set_module_attrs
from llmshrink.version import __version__

LAYOUT_KEY = "llmshrink_layout"
ATTRS_KEY = "llmshrink_module_attrs"
BASE_KEY = "llmshrink_base_architecture"
MANIFEST_FILE = "llmshrink.json"
RECIPE_FILE = "recipe.yaml"  # the exact recipe text that ran
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
        if is_embedding_model(model):  # a bare encoder: also loadable as SentenceTransformer(directory)
            write_sentence_transformers_files(directory, model, tokenizer)
        _check_saved_keys(model, directory)
        (directory / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
        (directory / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")
        (directory / "README.md").write_text(model_card, encoding="utf-8")
        make_readable(directory)  # safetensors and mkdtemp-style dirs would otherwise be owner-only
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


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
    config = read_json(config_path)
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
    saved = set(read_tensor_meta(tmp))
    check_keys(model, saved, tmp)
    check_aliases(model, saved, tmp)


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
