from pathlib import Path

# llmshrink/evals/ (lm-eval task YAMLs and their small data) ships inside the package as package data.
EVALS_DIR = Path(__file__).resolve().parents[1] / "evals"
