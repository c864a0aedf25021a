"""The built wheel, installed (not editable) into a fresh venv, works from outside the repository: `llmshrink
validate` on every shipped recipe, and `llmshrink eval --tasks llmshrink_offline` on a tiny checkpoint, whose
lm-eval tasks and data are package data (llmshrink/evals/)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import save_tiny, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TAG = "llmshrink_offline"

# The tests on the fresh venv are slow: about 50 s in all on 2 cores (a wheel build, 17 processes, one
# lm-eval run).


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


def test_constraints_pin_every_direct_dependency_and_pyproject_keeps_ranges():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    pins = {}
    for line in (ROOT / "constraints-cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.]+", version), line  # exact pins only
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    assert pins["torch"] == "2.13.0"
    for requirement in direct:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        assert re.sub(r"[-_.]+", "-", name.lower()) in pins, requirement
        assert "==" not in requirement, requirement  # library users get ranges


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(venv, a working directory outside the repository, env) with the wheel installed in the venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # Build from a copy of the sources, so that no build/ or egg-info lands in the checkout.
    src = tmp / "src"
    shutil.copytree(ROOT / "llmshrink", src / "llmshrink", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(src)], tmp, env)
    (wheel,) = (tmp / "dist").glob("llmshrink-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    # Install before the .pth below exists: pip must not see (nor touch) this venv's editable llmshrink.
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], tmp, env)
    # Third-party packages come from this venv (fast, offline). Paths a .pth adds are not scanned for
    # .pth files, so this venv's editable-install finder stays out.
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env)
    (Path(site.stdout.strip()) / "llmshrink_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    return env_dir, work, env


@pytest.mark.slow
def test_the_installed_package_is_the_wheel_and_carries_its_evals(fresh):
    env_dir, work, env = fresh
    out = run([str(env_dir / "bin" / "python"), "-c",
               "import llmshrink, llmshrink.eval as e; print(llmshrink.__file__); print(e.EVALS_DIR)"], work, env)
    module, evals = map(Path, out.stdout.split())
    assert module.is_relative_to(env_dir) and evals.is_relative_to(env_dir), out.stdout
    shipped = sorted(p.relative_to(ROOT / "llmshrink" / "evals").as_posix()
                     for p in (ROOT / "llmshrink" / "evals").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert sorted(p.relative_to(evals).as_posix() for p in evals.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts) == shipped


@pytest.mark.slow
def test_validate_runs_every_shipped_recipe_from_outside_the_repository(fresh):
    env_dir, work, env = fresh
    llmshrink = str(env_dir / "bin" / "llmshrink")
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        # smollm2-qlora's data.source is relative (llmshrink/evals/data/...): it resolves in site-packages,
        # against the installed package data, as it does in the repository root.
        cwd = site if "llmshrink/evals/" in recipe.read_text() else work
        out = run([llmshrink, "validate", str(recipe)], cwd, env)
        assert out.stdout.strip() == f"{recipe}: ok" or out.stdout.startswith(f"{recipe}: ok ("), out.stdout
        assert len(out.stdout.strip().splitlines()) == 1 and not out.stderr.strip(), (out.stdout, out.stderr)


@pytest.mark.slow
def test_eval_runs_the_packaged_offline_tasks_on_a_tiny_checkpoint(fresh):
    env_dir, work, env = fresh
    checkpoint = save_tiny(tiny_llama(), work / "tiny")
    tagged = [re.search(r"^task: (\S+)", path.read_text(), re.M).group(1)
              for path in sorted((ROOT / "llmshrink" / "evals").glob("*.yaml"))
              if re.search(rf"^tag: {TAG}$", path.read_text(), re.M)]
    assert len(tagged) >= 3
    run([str(env_dir / "bin" / "llmshrink"), "eval", str(checkpoint), "--tasks", TAG, "--limit", "5",
         "--output", str(work / "eval.json")], work, env)
    out = json.loads((work / "eval.json").read_text())
    assert sorted(out["results"]) == sorted(tagged), out["results"].keys()
    assert all(out["results"][task] for task in tagged)
