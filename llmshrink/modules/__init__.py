"""Compressed layers. Each has from_linear(...), to_dense() and layout_args() (its constructor args).

Every file here lists its layer classes in a module-level `COMPRESSED` tuple; they are collected
below, so a new layer file needs no edit elsewhere. Layer files are copied verbatim as remote code:
they import only torch (and math, typing, ...), never llmshrink.
"""

import importlib
import pkgutil

from llmshrink.modules.kronecker import KroneckerLinear


def _collect() -> dict[str, type]:
    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        for cls in getattr(importlib.import_module(f"{__name__}.{info.name}"), "COMPRESSED", ()):
            found[cls.__name__] = cls
    return found


# Class name -> class: how a checkpoint's layout names the layers it must rebuild.
COMPRESSED_MODULES = _collect()

__all__ = ["COMPRESSED_MODULES", "KroneckerLinear"]
