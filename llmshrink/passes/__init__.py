"""Built-in passes, one file each; importing this package imports them all, and each registers
itself (register_pass at the end of its file), so a new pass file needs no edit elsewhere."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
