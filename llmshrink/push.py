"""`llmshrink push`: upload a checkpoint directory to the Hugging Face hub.

huggingface_hub does the work (HfApi.create_repo, then upload_folder); this module checks the input first, so
that a wrong directory, repo id, card or missing login fails in one line before anything is sent, and lists
exactly the files that upload_folder will send (the same walk and the same ignore patterns), which is also
what `--dry-run` prints.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from llmshrink.errors import LlmshrinkError
from llmshrink.fileio import atomic_write_text
from llmshrink.hub import REPO_PLACEHOLDER

# Work files that never belong in the repo: hidden temp dirs and files (.x.tmp-*, .cache), Python caches.
IGNORE_PATTERNS = [".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "*.pyc"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# ORG/NAME: letters, digits, - _ . ; no leading/trailing - or ., no -- or .. (the hub's own rules).
_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$", re.ASCII)
# The HTTP client's own error class (httpx in huggingface_hub >= 1.0, requests before): connection failures.
_CLIENT_ERRORS = tuple(b for b in HfHubHTTPError.__bases__ if b is not OSError)


def push_checkpoint(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Create the model repo (if needed) and upload the checkpoint's files in one commit.

    private=False leaves the visibility to the hub (public unless the namespace defaults to private); an
    existing repo keeps its visibility. token: else HF_TOKEN or the saved login. endpoint: else HF_ENDPOINT.
    Returns {repo_id, url, private, dry_run, files: [{path, size}], total_bytes}.
    """
    folder = check_checkpoint_dir(path)
    check_repo_id(repo_id)
    card = _check_card(folder)
    api = HfApi(endpoint=endpoint, token=token)
    target = f"{api.endpoint}/{repo_id}"
    fill_card = card is not None and REPO_PLACEHOLDER in card
    files = checkpoint_files(folder)
    total = sum(size for _, size in files)
    result: dict[str, Any] = {"repo_id": repo_id, "url": target, "private": private, "dry_run": dry_run,
                              "files": [{"path": p, "size": s} for p, s in files], "total_bytes": total}
    visibility = "private" if private else "hub default visibility"
    if dry_run:
        log(f"dry run: would upload {len(files)} files from {folder} to {target} ({visibility}); nothing sent")
        _log_listing(files, log)
        if fill_card:
            log(f"  README.md: would fill in {repo_id} for {REPO_PLACEHOLDER} in the load snippets")
        return result

    if constants.HF_HUB_OFFLINE:
        raise LlmshrinkError("push: HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push; "
                             "--dry-run works offline")
    token = _token(token)
    log(f"pushing {len(files)} files ({total / 1e6:.2f} MB) from {folder} to {target} ({visibility})")
    try:
        api.create_repo(repo_id, token=token, private=True if private else None, exist_ok=True,
                        repo_type="model")
        if fill_card:  # the card's load snippets name this repo from now on (the local copy too)
            atomic_write_text(folder / "README.md", card.replace(REPO_PLACEHOLDER, repo_id))
            files = checkpoint_files(folder)
            result["files"] = [{"path": p, "size": s} for p, s in files]
            result["total_bytes"] = sum(size for _, size in files)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", token=token,
                                   commit_message=commit_message or f"Upload {folder.name} with llmshrink",
                                   ignore_patterns=list(IGNORE_PATTERNS))
    except (HfHubHTTPError, ValueError, OSError, *_CLIENT_ERRORS) as err:
        raise LlmshrinkError(_push_error(err, repo_id, api.endpoint)) from None
    result["url"] = getattr(commit, "commit_url", None) or target
    log(f"pushed: {result['url']}")
    return result


def check_checkpoint_dir(path: str | Path) -> Path:
    """The directory, if it is a transformers/llmshrink checkpoint (config.json and weights)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LlmshrinkError(f"push: {path}: no such checkpoint directory")
    if not (folder / "config.json").is_file():
        raise LlmshrinkError(f"push: {path}: not a model checkpoint (no config.json); "
                             "pass the output directory of `llmshrink apply` or a save_pretrained directory")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise LlmshrinkError(f"push: {path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return folder.resolve()


def check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or repo_id.endswith(".git"):
        raise LlmshrinkError(
            f"push: --repo-id {repo_id!r} is not ORG/NAME: a user or organization and a model name separated "
            "by one '/', using letters, digits, '-', '_' and '.' (e.g. my-org/smollm2-kron)"
        )


def checkpoint_files(folder: Path) -> list[tuple[str, int]]:
    """[(path in repo, bytes)], sorted: the files upload_folder sends with IGNORE_PATTERNS."""
    found = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    keep = filter_repo_objects(found, ignore_patterns=[*IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS])
    return [(rel, found[rel].stat().st_size) for rel in keep]


def _log_listing(files: list[tuple[str, int]], log: Callable[[str], None]) -> None:
    """One line per file (size, path), then the total."""
    width = len(f"{max((size for _, size in files), default=0):,}")
    for rel, size in files:
        log(f"  {size:>{width},}  {rel}")
    total = sum(size for _, size in files)
    log(f"  total {total:,} bytes ({total / 1e6:.2f} MB) in {len(files)} files")


def _check_card(folder: Path) -> str | None:
    """README.md's text, if its metadata parses the way the hub reads it (ModelCard); None if absent."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    try:
        ModelCard(text)
    except Exception as err:  # ValueError for bad model-index, yaml's own errors for bad YAML
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlmshrinkError(f"push: {readme}: the hub would reject its metadata: {first}") from None
    return text


def _token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise LlmshrinkError(
            "push: not logged in to the Hugging Face hub: run `hf auth login` (or `huggingface-cli login`) with "
            "a write token from https://huggingface.co/settings/tokens, or set HF_TOKEN"
        )
    return token


def _push_error(err: BaseException, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if status == 401:
        return f"push: {endpoint} rejected the token (401): log in again with `hf auth login` or set HF_TOKEN"
    if status == 403:
        return (f"push: no write access to {repo_id} on {endpoint} (403): use a write token that may create "
                f"repos in '{repo_id.split('/')[0]}'")
    if status is not None:
        return f"push: {endpoint} answered {status} for {repo_id}: {first}"
    return f"push: {repo_id} to {endpoint} failed: {first}"
