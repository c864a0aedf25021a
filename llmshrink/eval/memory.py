"""Peak memory: this process's peak resident memory, and the peaks of loading a model and generating with it,
measured in a fresh subprocess (peak RSS never goes down within a process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.model_inputs import pad_token_id, random_ids

_PROBE = "import sys; from llmshrink.eval.memory import _memory_probe; _memory_probe(sys.argv[1])"
_MB = 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux, VmHWM of /proc/self/status: the high-water mark of this process's own address space. Not
    ru_maxrss, which Linux carries across fork + exec: a fresh child would report its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / (1024 * 1024)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure_memory(
    model: str | os.PathLike,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    batch_size: int = 1,
    device: str = "cpu",
    timeout: float = 1800,
    forward_only: bool = False,
) -> dict:
    """Peak memory of loading `model` and generating with it, measured in a fresh Python process.

    `model`: an llmshrink checkpoint directory (loaded by load_checkpoint), or anything load_base_model
    takes (a local transformers directory, builtin:NAME, a hub id). The child imports torch,
    transformers and llmshrink, then loads, then greedily generates `new_tokens` tokens after
    `batch_size` random prompts of `prompt_tokens` tokens. A ModelSpec is loaded as load_base_model loads it
    (its `task` picks the Auto class of an encoder). `forward_only` (encoders, which do not generate): one
    forward over the prompts instead, and "peak_rss_forward_mb" (and "peak_gpu_forward_mb") instead of the
    generate peaks. Returns, in MiB of resident memory:
    "rss_before_load_mb" (resident just before loading: the interpreter and libraries),
    "peak_rss_load_mb" (peak of the process once loaded), "peak_rss_generate_mb" (peak of the whole
    process after generating), on CUDA "peak_gpu_load_mb" / "peak_gpu_generate_mb"
    (torch.cuda.max_memory_allocated), "generated_tokens", and the arguments. Peaks include the
    baseline: the model's own share is peak - rss_before_load_mb. Each call starts Python and imports
    transformers afresh (~10 s on a small CPU).
    """
    if prompt_tokens < 1 or new_tokens < 1 or batch_size < 1:
        raise LlmshrinkError("prompt_tokens, new_tokens and batch_size must all be >= 1")
    spec = model.model_dump() if hasattr(model, "model_dump") else None  # a ModelSpec
    args = {"model": spec["id"] if spec else str(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "batch_size": batch_size, "device": device, "forward_only": forward_only}
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])  # the llmshrink the caller runs, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps({**args, "spec": spec})],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlmshrinkError(f"measure_memory({model}): no result after {timeout:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        # The last stderr line is the child's exception; a kill (e.g. out of memory) leaves none.
        stderr = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        tail = stderr[-1][-500:] if stderr else "no error output"
        killed = f", killed by signal {-proc.returncode}" if proc.returncode < 0 else ""
        raise LlmshrinkError(f"measure_memory({model}) failed (exit {proc.returncode}{killed}): {tail}")
    return {**json.loads(lines[-1]), **args}


def _memory_probe(arg: str) -> None:
    """The child of measure_memory: load, generate, print one JSON line of peaks."""
    args = json.loads(arg)
    device = torch.device(args["device"])
    import transformers  # noqa: F401  (before the baseline: its import is not the model's memory)

    from llmshrink.checkpoint import MANIFEST_FILE
    from llmshrink.checkpoint_load import load_checkpoint
    from llmshrink.models import load_base_model
    from llmshrink.specs import ModelSpec

    gpu = device.type == "cuda"
    out = {"rss_before_load_mb": psutil.Process().memory_info().rss / _MB}
    path = Path(args["model"]).expanduser()
    if (path / MANIFEST_FILE).is_file():
        model = load_checkpoint(path, device)
    else:
        spec = ModelSpec(**args["spec"]) if args.get("spec") else args["model"]
        model = load_base_model(spec, device=device, log=lambda _: None).model
    if gpu:
        torch.cuda.synchronize(device)
        out["peak_gpu_load_mb"] = torch.cuda.max_memory_allocated(device) / _MB
    out["peak_rss_load_mb"] = peak_rss_mb()
    ids = random_ids(model, args["batch_size"], args["prompt_tokens"], seed=0)
    if args.get("forward_only"):
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if gpu:
            torch.cuda.synchronize(device)
            out["peak_gpu_forward_mb"] = torch.cuda.max_memory_allocated(device) / _MB
        out["peak_rss_forward_mb"] = peak_rss_mb()
        print(json.dumps(out), flush=True)
        return
    with torch.inference_mode():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["new_tokens"],
            min_new_tokens=args["new_tokens"], do_sample=False, pad_token_id=pad_token_id(model, None),
        )
    if gpu:
        torch.cuda.synchronize(device)
        out["peak_gpu_generate_mb"] = torch.cuda.max_memory_allocated(device) / _MB
    out["peak_rss_generate_mb"] = peak_rss_mb()
    out["generated_tokens"] = int(generated.shape[1] - ids.shape[1])
    print(json.dumps(out), flush=True)
