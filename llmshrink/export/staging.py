"""What every export (hf-dense, gguf, onnx) does alike around its own work: where it may write, and how.

    check_destination(fmt, ckpt, out)   refuse an `out` that exists or lies inside the checkpoint (one line)
    staged_folder(fmt, out)             a temporary sibling of `out` to write into; on success export.json (the
                                        record set on it), readable permissions, renamed into place; on failure
                                        removed (an OSError: one line), so no half export is ever left
    INSTALL, THREADS                    the install line of the runtimes (the `export` extra) and their CPU threads
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmshrink.checkpoint import move_into_place
from llmshrink.errors import LlmshrinkError
from llmshrink.fileio import make_readable

EXPORT_FILE = "export.json"  # in each export's folder: what was written and how it compares
INSTALL = 'pip install -e ".[export]"'  # llama-cpp-python, onnx, onnxscript, onnxruntime
THREADS = 2  # the runtimes' CPU threads: the deployment this project measures is a small CPU


def check_destination(fmt: str, checkpoint: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise LlmshrinkError(f"{fmt}: {out} already exists; choose another output path (an export never overwrites)")
    source, target = checkpoint.resolve(), out.resolve()
    if target == source or source in target.parents:
        raise LlmshrinkError(f"{fmt}: {out} is inside the checkpoint {checkpoint}, which an export never "
                             "modifies; choose another output path")


class Staged:
    """The folder an export writes into, and its record (written to export.json when the block succeeds)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.record: dict[str, Any] | None = None


@contextmanager
def staged_folder(fmt: str, out: Path) -> Iterator[Staged]:
    """Within: a new temporary sibling of `out` (Staged.folder). On success: Staged.record as export.json, the
    folder made readable and renamed to `out` (never overwriting). On failure: the folder removed; an OSError (a
    full disk, a folder we may not write) becomes one line."""
    staged = Staged(out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        staged.folder.mkdir(parents=True)
        yield staged
        if staged.record is not None:
            (staged.folder / EXPORT_FILE).write_text(json.dumps(staged.record, indent=2) + "\n", encoding="utf-8")
        make_readable(staged.folder)
        move_into_place(staged.folder, out, overwrite=False)
    except OSError as err:
        shutil.rmtree(staged.folder, ignore_errors=True)
        raise LlmshrinkError(f"{fmt}: cannot write {out}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(staged.folder, ignore_errors=True)
        raise
