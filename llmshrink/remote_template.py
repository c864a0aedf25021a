"""Remote code for a checkpoint: lets plain transformers rebuild the compressed layers.

`write_remote_code` writes `modeling_llmshrink.py` (a subclass of the base architecture that swaps in
the compressed layers named by `config.llmshrink_layout`, and sets the module attributes in
`config.llmshrink_module_attrs`) and copies each layer's source file from
llmshrink/modules beside it. transformers' dynamic-module loader copies files imported relatively
(`from .kronecker import ...`) from the same folder, and `check_imports` demands that every absolute
import be installed, so the generated code imports only transformers and those sibling files.
"""

from __future__ import annotations

import ast
import inspect
import shutil
from pathlib import Path

from llmshrink.errors import LlmshrinkError
from llmshrink.modules import COMPRESSED_MODULES
from llmshrink.version import __version__

REMOTE_FILE = "modeling_llmshrink.py"
CLASS_PREFIX = "Llmshrink"
# A copied layer file may import only these: anything else would need llmshrink (or more) installed.
_ALLOWED_IMPORTS = {"__future__", "torch", "math", "typing", "dataclasses"}

_TEMPLATE = '''"""Written by llmshrink {version}: a {base} whose compressed layers are rebuilt from
config.llmshrink_layout before the weights load. Needs only torch and transformers."""

from transformers import {base}

{imports}

LAYER_TYPES = {{{types}}}


def apply_layout(model, layout):
    """Replace each named submodule by an empty compressed layer on the same device and dtype."""
    built = []
    for name, spec in layout.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        like = next(iter(getattr(parent, child).parameters()), None)
        layer = LAYER_TYPES[spec["type"]](**spec["args"])
        if like is not None:
            layer = layer.to(device=like.device, dtype=like.dtype)
        setattr(parent, child, layer)
        built.append(layer)
    for layer in built:  # a layer that runs another module (a shared block) finds it once all are in place
        if hasattr(layer, "bind"):
            layer.bind(model)


def apply_module_attrs(model, attrs):
    """Set the plain attributes a pass changed (e.g. the head count of a pruned attention)."""
    for name, values in attrs.items():
        module = model.get_submodule(name)
        for key, value in values.items():
            setattr(module, key, value)
        module.llmshrink_attrs = dict(values)


class {cls}({base}):
    def __init__(self, config):
        super().__init__(config)
        apply_layout(self, getattr(config, "llmshrink_layout", None) or {{}})
        apply_module_attrs(self, getattr(config, "llmshrink_module_attrs", None) or {{}})
'''


def remote_class_name(base_name: str) -> str:
    return f"{CLASS_PREFIX}{base_name}"


def _check_self_contained(source: Path, type_name: str) -> None:
    """Refuse a layer file that imports something a bare transformers install may lack."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." * node.level + (node.module or "")]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in _ALLOWED_IMPORTS:
                raise LlmshrinkError(
                    f"{source}: {type_name} imports {name!r}; layer files copied as remote code may "
                    f"import only {', '.join(sorted(_ALLOWED_IMPORTS))}"
                )


def write_remote_code(out_dir: Path, base_name: str, layout: dict) -> str:
    """Write the remote-code files into out_dir; return the generated class name."""
    files: dict[str, list[str]] = {}  # layer file stem -> class names imported from it
    for type_name in sorted({spec["type"] for spec in layout.values()}):
        source = Path(inspect.getsourcefile(COMPRESSED_MODULES[type_name]) or "")
        _check_self_contained(source, type_name)
        files.setdefault(source.stem, []).append(type_name)
        shutil.copyfile(source, out_dir / source.name)
    imports = "\n".join(f"from .{stem} import {', '.join(names)}" for stem, names in sorted(files.items()))
    types = ", ".join(f'"{name}": {name}' for names in files.values() for name in names)
    cls = remote_class_name(base_name)
    text = _TEMPLATE.format(version=__version__, base=base_name, imports=imports, types=types, cls=cls)
    (out_dir / REMOTE_FILE).write_text(text, encoding="utf-8")
    return cls
