"""Atomic file writes with ordinary permissions (what the umask allows, not mkstemp's 0600)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temp file beside `path`, then rename it over `path` (readers never see half)."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_png(figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG, atomically like atomic_write_text."""
    return _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def make_readable(directory: Path) -> None:
    """Give a directory and the files in it the permissions a plain mkdir/open would have."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for entry in directory.iterdir():
        if entry.is_file():
            entry.chmod(0o666 & ~mask)
