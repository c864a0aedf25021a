from pathlib import Path

# evals/ (lm-eval task YAMLs and their small data) lives in the source tree beside the package, not in it.
EVALS_DIR = Path(__file__).resolve().parents[2] / "evals"
