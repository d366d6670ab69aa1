"""A stand-in for the Hugging Face Hub HTTP API, for tests (standard library only).

Serves on 127.0.0.1 the routes that huggingface_hub 2.4 (create_repo, create_branch, upload_folder with regular
files, repo_info/repo_exists, whoami, hf_hub_download, snapshot_download) and transformers' from_pretrained use,
for model repos and Spaces (`repo_type="space"`, under /api/spaces/ and /spaces/). Each repo keeps one immutable
snapshot per commit; branches point at commits. Writes need a known bearer token.
"""

import base64
import hashlib
import json
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


REPO_TYPES = {"models": "model", "spaces": "space"}  # /api/<plural>/... -> repo_type


def _blob_oid(data: bytes) -> str:
    """git's blob sha1: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error reply: status, JSON {"error": message, **extra}, and optionally an X-Error-Code header."""

    def __init__(self, status, message, code=None, headers=None, **extra):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, dict(headers or {})
        self.payload = {"error": message, **extra}


class FakeHub:
    def __init__(self, tokens=("hf_test_token",)):
        self.tokens = set(tokens)
        self.commits: list[dict] = []  # {"repo_id", "repo_type", "revision", "summary", "paths": added} per commit
        self.created: list[dict] = []  # the JSON body of every repo creation received
        self.requests: list[tuple[str, str]] = []  # (method, raw path without query) of every request
        self.drop_next_commit = False
        self.url = None
        # (repo_type, repo_id) -> {"private", "branches": {name: sha}, "snapshots": {sha: {path: bytes}}}
        self._repos = {}
        self._lock = threading.Lock()
        self._server = self._thread = None

    # ------------------------------------------------------------------ lifecycle and test helpers
    def start(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def add_repo(self, repo_id, files=None, private=False, repo_type="model"):
        with self._lock:
            repo = self._new_repo(repo_type, repo_id, private)
            if files:
                self._new_commit(repo, "main", "Initial files", dict(files))

    def files(self, repo_id, revision="main", repo_type="model") -> dict[str, bytes]:
        with self._lock:
            return dict(self._resolve(self._repo(repo_type, repo_id, authed=True), revision)[1])

    # ------------------------------------------------------------------ state (callers hold the lock)
    def _new_repo(self, repo_type, repo_id, private):
        repo = {"private": bool(private), "branches": {"main": ""}, "snapshots": {}}
        self._repos[repo_type, repo_id] = repo
        self._new_commit(repo, "main", "initial commit", {})
        return repo

    def _new_commit(self, repo, branch, summary, files):
        listing = sorted((path, _blob_oid(data)) for path, data in files.items())
        sha = hashlib.sha1(json.dumps([repo["branches"][branch], summary, listing]).encode()).hexdigest()
        repo["snapshots"][sha] = files
        repo["branches"][branch] = sha
        return sha

    def _repo(self, repo_type, repo_id, authed):
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo["private"] and not authed):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo, revision):
        sha = repo["branches"].get(revision, revision)
        if sha not in repo["snapshots"]:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo["snapshots"][sha]

    def _check_token(self, token):
        if token is None:
            raise HubError(401, "You must be authenticated to access this endpoint.")
        if token not in self.tokens:
            msg = "Invalid credentials in Authorization header"
            raise HubError(401, msg, headers={"X-Error-Message": msg})

    # ------------------------------------------------------------------ routes: (status, payload, headers)
    def handle(self, method, parts, query, body, token):
        authed = token in self.tokens
        if method == "POST" and parts == ["api", "repos", "create"]:
            self._check_token(token)
            return self._create_repo(json.loads(body))
        if method == "GET" and parts == ["api", "whoami-v2"]:
            self._check_token(token)
            return 200, {"type": "user", "name": "tester", "fullname": "Tester", "orgs": []}, {}
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return 200, {}, {}
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo_type, repo_id = REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}"
            action, args = (parts[4], parts[5:]) if len(parts) > 4 else ("revision", ["main"])
            if method == "GET" and action in ("revision", "tree") and args:
                repo = self._repo(repo_type, repo_id, authed)
                sha, files = self._resolve(repo, args[0])
                if action == "tree":
                    return 200, self._tree(files, "/".join(args[1:]), query.get("recursive") in ("1", "true")), {}
                siblings = [{"rfilename": path} for path in sorted(files)]
                info = {"id": repo_id, "modelId": repo_id, "author": parts[2], "sha": sha,
                        "private": repo["private"], "siblings": siblings}
                return 200, info, {}
            if method == "POST" and action in ("preupload", "commit", "branch") and len(args) == 1:
                self._check_token(token)
                repo = self._repo(repo_type, repo_id, authed)
                return getattr(self, f"_{action}")((repo_type, repo_id), repo, args[0], body)
        repo_type, at = ("space", 1) if parts[0] == "spaces" else ("model", 0)
        if method in ("GET", "HEAD") and len(parts) >= at + 5 and parts[at + 2] == "resolve":
            repo = self._repo(repo_type, f"{parts[at]}/{parts[at + 1]}", authed)
            sha, files = self._resolve(repo, parts[at + 3])
            path = "/".join(parts[at + 4:])
            if path not in files:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_blob_oid(files[path])}"',
                       "Content-Type": "application/octet-stream"}
            return 200, files[path], headers
        raise HubError(404, "Not Found")

    def _create_repo(self, payload):
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        url = f"{self.url}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=url)
        if repo_type == "space" and payload.get("sdk") not in ("gradio", "docker", "static"):
            raise HubError(400, "A Space needs an sdk: gradio, docker or static")
        self.created.append(payload)
        self._new_repo(repo_type, repo_id, payload.get("private") or payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}, {}

    def _preupload(self, where, repo, revision, body):
        sha, files = self._resolve(repo, revision)
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": _blob_oid(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(body)["files"]]
        return 200, {"files": answer, "commitOid": sha}, {}

    def _commit(self, where, repo, branch, body):
        if branch not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header, parent = lines[0]["value"], repo["branches"][branch]
        if header.get("parentCommit") not in (None, parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, added = dict(repo["snapshots"][parent]), []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                content = value["content"]
                files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                added.append(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                for inside in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                    del files[inside]
            else:
                raise HubError(400, f"This stand-in takes regular files only, not {key!r}")
        sha = self._new_commit(repo, branch, header["summary"], files)
        repo_type, repo_id = where
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "revision": branch,
                             "summary": header["summary"], "paths": added})
        prefix = "spaces/" if repo_type == "space" else ""
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{prefix}{repo_id}/commit/{sha}"}, {}

    def _branch(self, where, repo, branch, body):
        if branch in repo["branches"]:
            raise HubError(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo["branches"][branch] = self._resolve(repo, start)[0]
        return 200, {}, {}

    @staticmethod
    def _tree(files, prefix, recursive):
        entries = {}
        for path, data in files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path.split("/")
            depth = prefix.count("/") + 1 if prefix else 0  # parts[:depth] is the listed folder
            for end in range(depth + 1, len(parts) if recursive else min(depth + 2, len(parts))):
                folder = "/".join(parts[:end])
                entries[folder] = {"type": "directory", "path": folder, "size": 0,
                                   "oid": hashlib.sha1(folder.encode()).hexdigest()}
            if recursive or len(parts) == depth + 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": _blob_oid(data)}
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        return [entries[key] for key in sorted(entries)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every reply carries Content-Length

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method):
        hub = self.server.hub
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        length = int(self.headers.get("Content-Length") or 0)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with hub._lock:
            hub.requests.append((method, url.path))
            drop = method == "POST" and parts[-2:-1] == ["commit"] and hub.drop_next_commit
            if drop:
                hub.drop_next_commit = False
        if drop:  # read part of the body, then reset the connection without a reply
            self.rfile.read(max(1, length // 2))
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.rfile.close()
            self.connection.close()
            return
        body = self.rfile.read(length) if length else b""
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            with hub._lock:
                status, payload, headers = hub.handle(method, parts, query, body, token)
        except HubError as err:
            status, payload, headers = err.status, err.payload, err.headers
            if err.code:
                headers["X-Error-Code"] = err.code
        except (ValueError, KeyError, TypeError) as err:  # malformed request body
            status, payload, headers = 400, {"error": f"Bad request: {err!r}"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)
