"""The built-in passes' settings, one file each, without torch: importing this package registers every
pass (name -> config class + implementation module), so `llmshrink validate` never imports an implementation."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
