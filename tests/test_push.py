"""`push` against a local fake of the hub's upload endpoints (tests/fake_hub.py): no network."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import tiny_gpt2, tiny_tokenizer
from fake_hub import FakeHub
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils._runtime import is_xet_available

from llmshrink.checkpoint import save_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.hub import REPO_PLACEHOLDER, model_card
from llmshrink.push import check_repo_id, checkpoint_files, push_checkpoint

REPO = "acme/tiny-shrunk"
MANIFEST = {"name": "tiny-shrunk", "base_model": {"id": "openai-community/gpt2"},
            "metrics": {"base": {"perplexity": 130.0}, "compressed": {"perplexity": 140.5}},
            "evaluation": {"perplexity": {"dataset": "local:text.txt", "split": "test", "window": 64}}}
# Work files a checkpoint directory can pick up; none of them may be uploaded.
JUNK = [".partial.tmp-1a2b/model.safetensors", ".DS_Store", "__pycache__/modeling_llmshrink.cpython-311.pyc",
        "sub/.hidden", ".cache/huggingface/upload/x.lock"]


@pytest.fixture
def checkpoint(tmp_path):
    """A saved tiny checkpoint with a real card, plus work files; returns (dir, {path: bytes} to upload)."""
    out = save_checkpoint(tiny_gpt2(), tiny_tokenizer(), tmp_path / "tiny-shrunk", recipe_text="name: t\n",
                          manifest=MANIFEST, model_card=model_card(MANIFEST, "name: t\n"))
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}\n")  # subfolders are part of the checkpoint
    expected = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for junk in JUNK:
        (out / junk).parent.mkdir(parents=True, exist_ok=True)
        (out / junk).write_bytes(b"work file")
    assert {"config.json", "model.safetensors", "llmshrink.json", "README.md", "recipe.yaml",
            "tokenizer.json", "adapter/adapter_config.json"} <= set(expected)
    return out, expected


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No token anywhere: environment cleared, token file pointed at a missing path."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def online(monkeypatch, no_login):
    """conftest sets HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every request: lift it here only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _filled(expected: dict[str, bytes]) -> dict[str, bytes]:
    """The expected upload after push filled the repo id into the card."""
    readme = expected["README.md"].decode().replace(REPO_PLACEHOLDER, REPO).encode()
    return {**expected, "README.md": readme}


def test_push_sends_exactly_the_checkpoint_files(checkpoint, online, monkeypatch):
    """The default client path (hf_xet installed): the fake answers "regular" for every file (no xet storage)."""
    out, expected = checkpoint
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()  # upload_folder takes its streamed (xet) pipeline, as for a real user
    logs: list[str] = []
    with FakeHub(lfs_patterns=()) as hub:
        result = push_checkpoint(out, REPO, private=True, token=hub.token, endpoint=hub.url, log=logs.append)
    received = hub.received(REPO)
    assert sorted(received) == sorted(expected)
    assert received == _filled(expected)  # byte for byte
    assert {path: (out / path).read_bytes() for path in received} == received  # the card was filled in place
    card = received["README.md"].decode()
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in card and REPO_PLACEHOLDER not in card
    assert ModelCard(card).data.base_model == "openai-community/gpt2"
    assert hub.creates == [{"name": "tiny-shrunk", "organization": "acme", "visibility": "private", "type": "model"}]
    assert hub.validated == [card]  # the hub's metadata check saw the final card
    assert hub.unexpected == [] and hub.requests[0] == ("POST", "/api/repos/create")
    assert hub.requests[-1] == ("POST", f"/api/models/{REPO}/commit/main")
    assert [c["header"]["summary"] for c in hub.commits] == ["Upload tiny-shrunk with llmshrink"]
    assert result["url"].startswith(f"{hub.url}/{REPO}/commit/")
    assert result["total_bytes"] == sum(len(b) for b in received.values())
    assert sorted(f["path"] for f in result["files"]) == sorted(expected)
    assert logs[-1] == f"pushed: {result['url']}"


def test_push_through_lfs_with_token_from_environment(checkpoint, online, monkeypatch):
    """Xet off: weights go through the LFS batch API and a PUT, keyed by sha256; HF_TOKEN is the login."""
    out, expected = checkpoint
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_TOKEN", hub.token)
        push_checkpoint(out, REPO, endpoint=hub.url, log=lambda _: None)
        push_checkpoint(out, REPO, endpoint=hub.url, commit_message="again", log=lambda _: None)  # repo exists
    assert hub.received(REPO) == _filled(expected)
    weights_sha = hashlib.sha256(expected["model.safetensors"]).hexdigest()
    assert hub.commits[0]["lfs"] == {"model.safetensors": weights_sha}
    assert "model.safetensors" not in hub.commits[0]["files"]
    assert hub.lfs_objects[weights_sha] == expected["model.safetensors"]
    assert ("PUT", f"/lfs-upload/{weights_sha}") in hub.requests
    # Not --private: visibility is left to the hub; the second create answers 409 and push goes on.
    assert [("visibility" in c) for c in hub.creates] == [False, False]
    assert [c["header"]["summary"] for c in hub.commits] == ["Upload tiny-shrunk with llmshrink", "again"]
    assert hub.unexpected == []


def test_dry_run_lists_every_file_and_sends_nothing(checkpoint, no_login):
    """Works offline (conftest's HF_HUB_OFFLINE=1 stays) and without a token; the card is not touched."""
    out, expected = checkpoint
    card_before = (out / "README.md").read_bytes()
    logs: list[str] = []
    with FakeHub() as hub:
        result = push_checkpoint(out, REPO, dry_run=True, endpoint=hub.url, log=logs.append)
    assert hub.requests == []
    assert (out / "README.md").read_bytes() == card_before
    listed = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in logs[1:1 + len(expected)]}
    assert listed == {path: len(data) for path, data in expected.items()}
    total = sum(len(b) for b in expected.values())
    assert logs[0].startswith(f"dry run: would upload {len(expected)} files from {out} to {hub.url}/{REPO}")
    assert f"  total {total:,} bytes ({total / 1e6:.2f} MB) in {len(expected)} files" in logs
    assert any("README.md: would fill in acme/tiny-shrunk" in line for line in logs)
    assert result["total_bytes"] == total and result["dry_run"] is True
    assert [(f["path"], f["size"]) for f in result["files"]] == checkpoint_files(out)


def test_missing_token_says_how_to_log_in(checkpoint, online):
    with FakeHub() as hub, pytest.raises(LlmshrinkError, match=r"not logged in .*`hf auth login`.*HF_TOKEN"):
        push_checkpoint(checkpoint[0], REPO, endpoint=hub.url, log=lambda _: None)
    assert hub.requests == []


def test_rejected_token_is_one_clear_line(checkpoint, online):
    with FakeHub() as hub, pytest.raises(LlmshrinkError, match=r"rejected the token \(401\)"):
        push_checkpoint(checkpoint[0], REPO, token="hf_wrong", endpoint=hub.url, log=lambda _: None)
    assert hub.commits == [] and hub.repos == set()


def test_offline_mode_is_refused_before_any_request(checkpoint, no_login):
    with FakeHub() as hub, pytest.raises(LlmshrinkError, match="HF_HUB_OFFLINE is set"):
        push_checkpoint(checkpoint[0], REPO, token=hub.token, endpoint=hub.url, log=lambda _: None)
    assert hub.requests == []


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(LlmshrinkError, match="no such checkpoint directory"):
        push_checkpoint(tmp_path / "missing", REPO, dry_run=True)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LlmshrinkError, match=r"not a model checkpoint \(no config.json\)"):
        push_checkpoint(tmp_path, REPO, dry_run=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LlmshrinkError, match="no weights"):
        push_checkpoint(tmp_path, REPO, dry_run=True)


@pytest.mark.parametrize("repo_id", ["tiny", "a/b/c", "acme/", "/tiny", "-acme/tiny", "acme/tiny-",
                                     "acme/ti--ny", "acme/ti..ny", "acme/tiny.git", "my org/tiny", "acme/tïny"])
def test_repo_id_must_be_org_slash_name(repo_id):
    with pytest.raises(LlmshrinkError) as err:
        check_repo_id(repo_id)
    assert str(err.value).startswith(f"push: --repo-id {repo_id!r} is not ORG/NAME")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("repo_id", ["acme/tiny-shrunk", "a/b", "Org_1/model.v2", "user/SmolLM2-135M_kron"])
def test_valid_repo_ids(repo_id):
    check_repo_id(repo_id)


def test_card_with_broken_metadata_is_refused(checkpoint):
    out, _ = checkpoint
    (out / "README.md").write_text("---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n# x\n")
    with pytest.raises(LlmshrinkError, match=r"README.md: the hub would reject its metadata"):
        push_checkpoint(out, REPO, dry_run=True, log=lambda _: None)
