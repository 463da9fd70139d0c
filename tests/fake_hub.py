"""A local stand-in for the Hugging Face Hub's HTTP API, for testing pushes with huggingface_hub's real client code.

Implements only the endpoints that ``HfApi.whoami``, ``repo_info``/``repo_exists``, ``create_repo``, ``delete_repo``,
``create_branch``/``delete_branch`` and ``upload_folder`` (huggingface_hub 2.x) call. Every file is answered as a
*regular* upload (base64 inside the commit payload), so neither LFS nor Xet storage is involved and the commit payload
carries the files' bytes. Point a client at it with ``HF_ENDPOINT=hub.url``.

    with FakeHub(token="hf_test") as hub:
        ...  # run `hf-rope-ext push` with HF_ENDPOINT=hub.url HF_TOKEN=hf_test
        hub.repos["tester/model"].commits[-1].files  # {path: bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/?]+)"


@dataclass
class Commit:
    branch: str
    summary: str
    description: str
    files: dict[str, bytes]
    """Files added by the commit: path in repo -> content."""
    oid: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    """branch -> current tree (path -> content)."""
    commits: list[Commit] = field(default_factory=list)


class FakeHub:
    """Threaded HTTP server on 127.0.0.1 answering a minimal subset of the Hub API; records what arrives.

    Args:
        token: the only bearer token accepted.
        user: the name ``whoami`` returns; ``orgs`` the organisations the user belongs to.
        role: the token role reported by ``whoami`` ("write", "read", "fineGrained").
        fail_commit: answer every commit with this HTTP status (to test cleanup after a failed upload).
    """

    def __init__(
        self,
        token: str = "hf_test_token",
        user: str = "tester",
        orgs: tuple[str, ...] = ("test-org",),
        role: str = "write",
        fail_commit: int | None = None,
    ) -> None:
        self.token = token
        self.user = user
        self.orgs = orgs
        self.role = role
        self.fail_commit = fail_commit
        self.repos: dict[str, Repo] = {}
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---------------------------------------------------------------------------------------------------------------
    # request handling: (status, json body, extra headers)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        self.requests.append((method, path))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body))
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {
                "X-Error-Message": "Invalid credentials in Authorization header"
            }
        if path == "/api/whoami-v2" and method == "GET":
            return 200, {
                "type": "user",
                "name": self.user,
                "orgs": [{"name": o} for o in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.role}},
            }, {}
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body))
        if path == "/api/repos/delete" and method == "DELETE":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
            with self._lock:
                if self.repos.pop(repo_id, None) is None:
                    return _not_found(repo_id)
                self.deleted.append(repo_id)
            return 200, {}, {}
        if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/{_REV})?", path):
            repo = self.repos.get(m["repo"])
            if repo is None or method != "GET":
                return _not_found(m["repo"])
            rev = unquote(m["rev"] or "main")
            if rev not in repo.branches:
                return 404, {"error": "revision not found"}, {"X-Error-Code": "RevisionNotFound"}
            return 200, {"id": repo.repo_id, "sha": _sha(repo, rev), "private": repo.private, "siblings": [
                {"rfilename": p} for p in sorted(repo.branches[rev])]}, {}
        if m := re.fullmatch(rf"/api/models/{_REPO}/branch/{_REV}", path):
            return self._branch(method, m["repo"], unquote(m["rev"]))
        if m := re.fullmatch(rf"/api/models/{_REPO}/preupload/{_REV}", path):
            repo, error = self._target(m["repo"], unquote(m["rev"]))
            if error:
                return error
            files = json.loads(body)["files"]
            return 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
            ]}, {}
        if m := re.fullmatch(rf"/api/models/{_REPO}/commit/{_REV}", path):
            return self._commit(m["repo"], unquote(m["rev"]), body)
        return 404, {"error": f"fake hub: no route for {method} {path}"}, {}

    def _validate_yaml(self, payload: dict) -> tuple[int, Any, dict[str, str]]:
        from huggingface_hub import ModelCard

        try:
            ModelCard(payload["content"])
        except Exception as err:  # noqa: BLE001 - report any parse error as the Hub would
            return 400, {"errors": [{"message": str(err)}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _create_repo(self, payload: dict) -> tuple[int, Any, dict[str, str]]:
        namespace = payload.get("organization") or self.user
        if namespace != self.user and namespace not in self.orgs:
            return 403, {"error": f"You don't have the rights to create a model under the namespace {namespace}"}, {}
        repo_id = f"{namespace}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _branch(self, method: str, repo_id: str, branch: str) -> tuple[int, Any, dict[str, str]]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _not_found(repo_id)
        with self._lock:
            if method == "POST":
                if branch in repo.branches:
                    return 409, {"error": "Reference already exists"}, {}
                repo.branches[branch] = dict(repo.branches["main"])
                return 200, {}, {}
            if method == "DELETE":
                repo.branches.pop(branch, None)
                return 200, {}, {}
        return 405, {"error": "method not allowed"}, {}

    def _target(self, repo_id: str, rev: str) -> tuple[Repo | None, tuple | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, _not_found(repo_id)
        if rev not in repo.branches:
            return None, (404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return repo, None

    def _commit(self, repo_id: str, rev: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        repo, error = self._target(repo_id, rev)
        if error:
            return error
        if self.fail_commit:
            return self.fail_commit, {"error": "fake hub: commit refused for the test"}, {}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files: dict[str, bytes] = {}
        for item in lines:
            if item["key"] == "file":
                value = item["value"]
                if value.get("encoding") != "base64":
                    return 400, {"error": "fake hub: expected base64 content"}, {}
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] != "header":
                return 400, {"error": f"fake hub: unsupported commit entry {item['key']!r}"}, {}
        with self._lock:
            repo.branches[rev].update(files)
            oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}{sorted(files)}".encode()).hexdigest()
            repo.commits.append(Commit(rev, header.get("summary", ""), header.get("description", ""), files, oid))
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}, {}


def _sha(repo: Repo, branch: str) -> str:
    commits = [c for c in repo.commits if c.branch == branch]
    return commits[-1].oid if commits else "0" * 40


def _not_found(repo_id: str) -> tuple[int, Any, dict[str, str]]:
    return 404, {"error": f"Repository not found: {repo_id}"}, {"X-Error-Code": "RepoNotFound"}


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, payload, extra = hub.handle(self.command, path, headers, body)
            except Exception as err:  # noqa: BLE001 - surface server bugs to the client as 500
                status, payload, extra = 500, {"error": f"fake hub crashed: {err!r}"}, {}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler
