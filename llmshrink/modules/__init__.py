"""Compressed layers. Each has from_linear(...), to_dense() and layout_args() (its constructor args)."""

from llmshrink.modules.kronecker import KroneckerLinear

# Class name -> class: how a checkpoint's layout names the layers it must rebuild.
COMPRESSED_MODULES = {cls.__name__: cls for cls in (KroneckerLinear,)}

__all__ = ["COMPRESSED_MODULES", "KroneckerLinear"]
