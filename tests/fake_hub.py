"""A local stand-in for the Hugging Face hub's upload endpoints, as huggingface_hub 2.4 calls them.

HfApi.create_repo + upload_folder send, in order:

    POST /api/repos/create                              {"name", "organization", "type", "visibility"?}
    POST /api/validate-yaml                             {"content", "repoType"} (when README.md is uploaded)
    POST /api/models/{repo}/preupload/{rev}             {"files": [{path, sample, size}]} -> upload mode per file
    POST /{repo}.git/info/lfs/objects/batch             LFS files only (when xet is off): where to PUT them
    PUT  <href from the batch answer>                   the LFS file's bytes; then POST <verify href>
    POST /api/models/{repo}/commit/{rev}                NDJSON: header, then one line per file: regular files
                                                        inline (base64), LFS files by sha256

With hf_xet installed (the default), upload_folder sends LFS-mode files to a xet storage service that this
server does not implement: run it with lfs_patterns=() (every file regular) or turn xet off in the client
(huggingface_hub.constants.HF_HUB_DISABLE_XET = True) to exercise the LFS path.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


class FakeHub:
    """Records every request; `received()` is the repo's files after the commits, {path: bytes}."""

    def __init__(self, token: str = "hf_fake_write_token", lfs_patterns: tuple[str, ...] = ("*.safetensors",)):
        self.token, self.lfs_patterns = token, lfs_patterns
        self.requests: list[tuple[str, str]] = []  # (method, path), in arrival order
        self.unexpected: list[tuple[str, str]] = []  # requests this fake does not implement (answered 404)
        self.creates: list[dict] = []  # /api/repos/create payloads
        self.repos: set[str] = set()
        self.commits: list[dict] = []  # {"repo", "revision", "header", "files": {path: bytes}, "lfs": {path: oid}}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes PUT by the client
        self.validated: list[str] = []  # README.md texts sent to validate-yaml
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval keeps shutdown (and so each test) fast.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self, repo: str) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for commit in (c for c in self.commits if c["repo"] == repo):
            files.update(commit["files"])
            files.update({path: self.lfs_objects[oid] for path, oid in commit["lfs"].items()})
        return files

    # --- endpoints: (status, JSON answer) ----------------------------------------------------------

    def create(self, body: dict) -> tuple[int, Any]:
        self.creates.append(body)
        repo = f"{body.get('organization')}/{body.get('name')}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
        self.repos.add(repo)
        return 200, {"url": f"{self.url}/{repo}"}

    def validate_yaml(self, body: dict) -> tuple[int, Any]:
        from huggingface_hub import ModelCard

        self.validated.append(body.get("content", ""))
        try:
            ModelCard(body.get("content", ""))
        except Exception as err:
            return 400, {"errors": [{"message": str(err)}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, repo: str, body: dict) -> tuple[int, Any]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                  "uploadMode": "lfs" if any(fnmatch.fnmatch(f["path"], p) for p in self.lfs_patterns) else "regular"}
                 for f in body["files"]]
        return 200, {"files": files, "commitOid": "0" * 40}

    def lfs_batch(self, body: dict) -> tuple[int, Any]:
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                                "verify": {"href": f"{self.url}/lfs-verify"}}} for o in body["objects"]]
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes) -> tuple[int, Any]:
        if hashlib.sha256(data).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        self.lfs_objects[oid] = data
        return 200, {}

    def commit(self, repo: str, revision: str, raw: bytes) -> tuple[int, Any]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        commit: dict[str, Any] = {"repo": repo, "revision": revision, "header": None, "files": {}, "lfs": {}}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                commit["header"] = value
            elif key == "file" and value.get("encoding") == "base64":
                commit["files"][value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile" and value["oid"] in self.lfs_objects:
                commit["lfs"][value["path"]] = value["oid"]
            else:
                return 422, {"error": f"cannot commit line {line}"}
        self.commits.append(commit)
        oid = hashlib.sha1(raw).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_GET(self) -> None:
            self._serve("GET")

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self, method: str) -> None:
            raw = self._body()
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((method, path))
                if self.headers.get("Authorization") != f"Bearer {hub.token}" and not path.startswith("/lfs-"):
                    status, answer = 401, {"error": "Invalid credentials in Authorization header"}
                else:
                    status, answer = _route(hub, method, path, raw)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _route(hub: FakeHub, method: str, path: str, raw: bytes) -> tuple[int, Any]:
    parts = path.strip("/").split("/")
    if method == "POST" and path == "/api/repos/create":
        return hub.create(json.loads(raw))
    if method == "POST" and path == "/api/validate-yaml":
        return hub.validate_yaml(json.loads(raw))
    if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
        return hub.preupload("/".join(parts[2:4]), json.loads(raw))
    if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
        return hub.commit("/".join(parts[2:4]), parts[5], raw)
    if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
        return hub.lfs_batch(json.loads(raw))
    if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
        return hub.lfs_put(parts[1], raw)
    if method == "POST" and path == "/lfs-verify":
        return 200, {}
    hub.unexpected.append((method, path))
    return 404, {"error": f"fake hub: no such endpoint {method} {path}"}
