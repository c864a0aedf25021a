"""Startup cost of `llmshrink validate`: wall time and peak RSS of a fresh process per shipped recipe,
beside the same for a bare interpreter and for `import torch` alone, measured in the same run.

    python benchmarks/startup.py              # about 15 s on 2 cores
    python benchmarks/startup.py --repeats 3  # the median of 3 runs per row
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).with_name("llmshrink")


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout + stderr) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    # wait4 gives this child's own rusage (getrusage(RUSAGE_CHILDREN) would give the max over all children).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return wall, usage.ru_maxrss / 1024, output  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the median is printed")
    args = parser.parse_args()
    rows = [("python -c pass", [sys.executable, "-c", "pass"]),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"])]
    rows += [(f"validate {p.name}", [str(CLI), "validate", str(p.relative_to(ROOT))])
             for p in sorted((ROOT / "recipes").glob("*.yaml"))]
    torch_wall = None
    print(f"{'command':<44} {'wall s':>7} {'peak MiB':>9} {'lines':>6}  wall / import torch")
    for label, cmd in rows:
        runs = [measure(cmd) for _ in range(args.repeats)]
        wall = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        lines = len(runs[-1][2].splitlines())
        torch_wall = wall if "import torch" in label else torch_wall
        ratio = f"{wall / torch_wall:.2f}x" if torch_wall and label.startswith("validate") else "-"
        print(f"{label:<44} {wall:>7.2f} {rss:>9.1f} {lines:>6}  {ratio}")


if __name__ == "__main__":
    main()
