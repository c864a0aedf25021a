"""The recipe's `export:` section, run by the engine once the checkpoint is written and verified, and the one
dispatch from a format name to its export (`llmshrink export` uses it too)."""

from __future__ import annotations

import json
from pathlib import Path

from llmshrink.errors import LlmshrinkError
from llmshrink.export.spec import EXPORTS_DIR, GGUF_DEFAULT, ExportSpec
from llmshrink.export.staging import EXPORT_FILE, INSTALL
from llmshrink.fileio import atomic_write_text


def write_exports(specs: list[ExportSpec], staging: Path, work_root: Path, out_dir: Path, log) -> dict:
    """The recipe's export: section, each made from the verified checkpoint in `staging` into the work folder
    (an export refuses a folder inside its checkpoint) and then moved to staging/exports/<name>/, so that the
    output still appears complete by one rename; a failed export fails the run. Returns the manifest's `exports`:
    {name: the export's record}, its paths relative to the output folder (as in its export.json there)."""
    records = {}
    for spec in specs:
        scratch = work_root / f"export-{spec.folder}.partial"
        final = staging / EXPORTS_DIR / spec.folder
        shown = str(out_dir / EXPORTS_DIR / spec.folder)  # its log line names where it will be, not the scratch

        def log_line(line: str, scratch=scratch, shown=shown) -> None:
            log(f"  {line.replace(str(scratch), shown)}")

        result = run_export(spec.format, staging, scratch, spec.quant, log_line)
        final.parent.mkdir(exist_ok=True)
        scratch.rename(final)
        record = {**result, "name": spec.folder, "source": ".",
                  "path": (Path(EXPORTS_DIR) / spec.folder / Path(result["path"]).relative_to(scratch)).as_posix()}
        atomic_write_text(final / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
        records[spec.folder] = record
    return records


def check_runtimes(specs: list[ExportSpec]) -> None:
    """The runtimes the exports write and check with are installed (else the export's own one line)."""
    formats = {spec.format for spec in specs}
    if "onnx" in formats:
        from llmshrink.export.onnx_run import require_runtime

        require_runtime()
    if "gguf" in formats:
        try:
            from llmshrink.export.gguf_runtime import llama_cpp_module
        except ImportError as err:  # the gguf package (the export extra too)
            raise LlmshrinkError(f"gguf: the GGUF export needs {err.name}, not installed: {INSTALL}") from None
        llama_cpp_module()


def run_export(fmt: str, checkpoint: Path, out: Path, quant: str | None = None, log=print) -> dict:
    """One export of `checkpoint` into the new folder `out` (each format imported here: they pull in their
    runtimes); `quant` None: the format's default."""
    if fmt == "gguf":
        from llmshrink.export.gguf import export_gguf

        return export_gguf(checkpoint, out, quant=quant or GGUF_DEFAULT, log=log)
    if fmt == "onnx":
        from llmshrink.export.onnx import export_onnx

        return export_onnx(checkpoint, out, quant=quant, log=log)
    from llmshrink.export.hf_dense import export_hf_dense

    return export_hf_dense(checkpoint, out, log=log)
