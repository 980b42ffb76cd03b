"""A small Hub-compatible HTTP server for tests: the endpoints huggingface_hub 1.x/2.x call to push and pull.

It serves loopback only, on an ephemeral port, from a thread, and keeps everything in memory. Request and
response shapes follow what the client code expects (``hf_api.py``, ``_commit_api.py``, ``lfs.py``,
``file_download.py``, ``_snapshot_download.py``):

- ``GET /api/whoami-v2``: the token's user.
- ``POST /api/validate-yaml``: checks the README metadata, including ``base_model_relation``.
- ``POST /api/repos/create``: 409 when the repository exists (``exist_ok`` relies on it); ``"visibility":
  "private"`` (huggingface_hub 1.x/2.x) or ``"private": true`` (0.x) makes it private.
- ``POST /api/models/{repo}/branch/{branch}``: a branch from the default branch.
- ``POST /api/models/{repo}/preupload/{rev}``: ``regular`` or ``lfs`` per file, with the remote oid.
- ``POST /{repo}.git/info/lfs/objects/batch``: "basic" transfer actions (upload URL + verify URL), or none
  for content already stored; then ``PUT`` to the upload URL and ``POST`` to the verify URL.
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON body (``header``, ``file``, ``lfsFile``, deletions);
  ``?create_pr=1`` commits to a new ``refs/pr/N``.
- ``GET /api/models/{repo}[/revision/{rev}]``: the model info with ``sha`` and ``siblings``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``list_repo_files``, used by optimum).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files answered directly with ``X-Repo-Commit``,
  ``ETag`` (the git blob id) and ``Content-Length``; LFS files redirected, as on the Hub, to a storage URL
  with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``. The storage answer repeats ``X-Repo-Commit``:
  huggingface_hub 1.x/2.x follow a redirect to the same host (ours is on loopback, not on a CDN) and read the
  commit from the last answer.

Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers and the JSON ``error`` field that
``hf_raise_for_status`` turns into typed errors. Tokens map to a user and a role; a ``read`` token may read
but every write is refused with 403, as the Hub does. Every body is bounded.

``HubServer.fail`` plays a ``Fault`` instead of the normal answer to the matching requests: an error answer as
the Hub sends it (gated, disabled, ...), a connection dropped halfway through the answer, or a stall past
the client's timeout. The client must run with Xet off (``HF_HUB_DISABLE_XET=1``): this server speaks the
"basic" LFS transfer only. ``online_client`` and ``use_endpoint`` set up the client in a test; ``no_retry_waits``
spares a test the seconds huggingface_hub waits between the retries of a failed request.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import huggingface_hub
import pytest
import yaml
from huggingface_hub import close_session

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY = 64 * 2**20
MAX_STORED = 256 * 2**20
MAX_REPOS = 64
LFS_MIN_SIZE = 2**20
LFS_EXTENSIONS = (".safetensors", ".bin", ".onnx", ".onnx_data", ".gguf", ".png", ".pt", ".msgpack", ".h5")
DEFAULT_BRANCH = "main"
HUB_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO_ID = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"


class HubHTTPError(Exception):
    """An error answer: status, message, and the ``X-Error-Code`` the client dispatches on."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit
        self.extra = dict(extra or {})


@dataclass(frozen=True)
class Fault:
    """What the server does instead of its normal answer to requests of ``method`` whose path matches ``path``.

    Attributes:
        method: the HTTP method to match.
        path: a regular expression that the whole request path (without the query) must match.
        error: answer with this error, as the Hub would, without running the endpoint.
        drop: run the endpoint, send the first half of its answer's bytes and close the connection.
        stall: seconds to wait before answering (the server's ``stop`` ends the wait).
    """

    method: str
    path: str
    error: HubHTTPError | None = None
    drop: bool = False
    stall: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.fullmatch(self.path, path) is not None


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def git_oid(self) -> str:
        """What git names the file: the blob of the content, or of the LFS pointer for an LFS file."""
        data = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 (git's own hash)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0

    def resolve(self, revision: str) -> Commit:
        oid = self.refs.get(revision, revision if revision in self.commits else None)
        if oid is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return self.commits[oid]


@dataclass
class HubState:
    """Everything the server holds; tests read it to check what arrived."""

    tokens: dict[str, tuple[str, str]]
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    def fault_for(self, method: str, path: str) -> Fault | None:
        return next((fault for fault in self.faults if fault.matches(method, path)), None)

    def stored_bytes(self) -> int:
        return sum(len(blob) for blob in self.lfs_objects.values())

    def new_commit(
        self, repo: Repo, parent: str | None, message: str, files: dict[str, StoredFile]
    ) -> Commit:
        self._counter += 1
        digest = hashlib.sha1()  # noqa: S324 (an id, as git's)
        digest.update(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n".encode())
        for path in sorted(files):
            digest.update(f"{path} {files[path].git_oid}\n".encode())
        commit = Commit(oid=digest.hexdigest(), parent=parent, message=message, files=dict(files))
        repo.commits[commit.oid] = commit
        return commit


ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in (
        ("GET", r"/api/whoami-v2", "_whoami"),
        ("POST", r"/api/validate-yaml", "_validate_yaml"),
        ("POST", r"/api/repos/create", "_create_repo"),
        ("POST", rf"/api/models/{REPO_ID}/branch/(?P<branch>[^/]+)", "_create_branch"),
        ("POST", rf"/api/models/{REPO_ID}/preupload/(?P<rev>[^/]+)", "_preupload"),
        ("POST", rf"/api/models/{REPO_ID}/commit/(?P<rev>[^/]+)", "_commit"),
        ("GET", rf"/api/models/{REPO_ID}(?:/revision/(?P<rev>[^/]+))?", "_model_info"),
        ("GET", rf"/api/models/{REPO_ID}/tree/(?P<rev>[^/]+)(?:/(?P<path>[^/]+))?", "_tree"),
        ("POST", rf"/{REPO_ID}\.git/info/lfs/objects/batch", "_lfs_batch"),
        ("PUT", r"/__lfs/upload/(?P<oid>[0-9a-f]{64})", "_lfs_upload"),
        ("POST", r"/__lfs/verify", "_lfs_verify"),
        ("GET", r"/__lfs/objects/(?P<oid>[0-9a-f]{64})", "_lfs_object"),
        ("HEAD", r"/__lfs/objects/(?P<oid>[0-9a-f]{64})", "_lfs_object"),
        ("GET", rf"/{REPO_ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
        ("HEAD", rf"/{REPO_ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    )
]
"""(method, path pattern, handler method): the endpoints, matched in order against the raw path."""


class HubServer:
    """The server on ``127.0.0.1:<ephemeral port>``; use as a context manager, or ``start``/``stop``."""

    def __init__(self, tokens: Mapping[str, tuple[str, str]]) -> None:
        self.state = HubState(tokens=dict(tokens))
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer((HOST, 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self._httpd.server_port}"
        handler.base_url = self.url  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def fail(
        self,
        method: str,
        path: str,
        error: HubHTTPError | None = None,
        drop: bool = False,
        stall: float = 0.0,
    ) -> None:
        """Play a fault for every later request that matches (see ``Fault``)."""
        with self.state.lock:
            self.state.faults.append(Fault(method, path, error=error, drop=drop, stall=stall))

    def stop(self) -> None:
        self.state.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection frees its thread after this many seconds
    state: HubState
    base_url: str

    # --- plumbing ------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("hub-server: %s", format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        with self.state.lock:
            self.state.requests.append((method, parts.path))
            fault = self.state.fault_for(method, parts.path)
        if fault is not None and fault.stall:
            self.state.released.wait(fault.stall)
        if fault is not None and fault.drop:
            self._answer_half(method, parts.path)
            return
        self._answer(method, parts.path, fault.error if fault is not None else None)

    def _answer(self, method: str, path: str, fault: HubHTTPError | None) -> None:
        try:
            self.body = self._read_body()
            if fault is not None:
                self._error(fault)
                return
            name, args = _route(method, path)
            with self.state.lock:
                getattr(self, name)(**args)
        except HubHTTPError as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): nobody to answer
            self.close_connection = True
        except Exception as error:  # a bug in this server: answer 500 rather than hang the client
            logger.exception("hub-server failed on %s %s", method, path)
            self._error(HubHTTPError(500, f"test server error: {type(error).__name__}"))

    def _answer_half(self, method: str, path: str) -> None:
        """The normal answer cut in the middle, then a closed connection: a network drop mid-transfer."""
        connection, self.wfile = self.wfile, io.BytesIO()
        try:
            self._answer(method, path, None)
            answer = self.wfile.getvalue()
        finally:
            self.wfile = connection
        connection.write(answer[: len(answer) // 2])
        connection.flush()
        self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise HubHTTPError(413, f"request body over {MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline(64)
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                self.close_connection = True
                raise HubHTTPError(413, f"request body over {MAX_BODY} bytes")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(64)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(data).encode(), content_type)

    def _error(self, error: HubHTTPError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        body = {**error.extra, "error": error.message}
        self._send(error.status, json.dumps(body).encode(), headers=headers)

    def _body_json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise HubHTTPError(400, f"invalid JSON body: {exc}") from exc

    # --- auth ----------------------------------------------------------------------------------------------

    def _user(self, required: bool = True) -> tuple[str, str] | None:
        header = self.headers.get("authorization", "")
        if not header:
            if required:
                raise HubHTTPError(401, "Unauthorized")
            return None
        scheme, _, token = header.partition(" ")
        found = self.state.tokens.get(token) if scheme.lower() == "bearer" else None
        if found is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return found

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
            raise HubHTTPError(404, "Repository not found", code="RepoNotFound")
        if write:
            self._check_write(user, repo.owner)
        return repo

    @staticmethod
    def _check_write(user: tuple[str, str] | None, namespace: str) -> None:
        if user is None or user[0] != namespace or user[1] != "write":
            raise HubHTTPError(403, f"You don't have the rights to write to the namespace {namespace}")

    # --- account and repositories --------------------------------------------------------------------------

    def _whoami(self) -> None:
        user = self._user()
        assert user is not None
        name, role = user
        self._json(
            {
                "type": "user",
                "name": name,
                "fullname": name,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            }
        )

    def _validate_yaml(self) -> None:
        content = str(self._body_json().get("content", ""))
        errors = [{"message": message} for message in metadata_errors(content)]
        self._json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _create_repo(self) -> None:
        user = self._user()
        assert user is not None
        payload = self._body_json()
        if payload.get("type") not in (None, "model"):
            raise HubHTTPError(400, "this test server only holds model repositories")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        self._check_write(user, namespace)
        if repo_id in self.state.repos:  # the client reads the url even from this answer
            raise HubHTTPError(
                409, "You already created this model repo", extra={"url": self._repo_url(repo_id)}
            )
        if len(self.state.repos) >= MAX_REPOS:
            raise HubHTTPError(429, "too many repositories on the test server")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = Repo(repo_id=repo_id, owner=namespace, private=private)
        initial = self.state.new_commit(repo, None, "initial commit", {})
        repo.refs[DEFAULT_BRANCH] = initial.oid
        self.state.repos[repo_id] = repo
        self._json({"url": self._repo_url(repo_id), "name": repo_id, "id": repo_id})

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.base_url}/{repo_id}"

    def _create_branch(self, repo: str, branch: str) -> None:
        stored = self._repo(repo, write=True)
        if branch in stored.refs:
            raise HubHTTPError(409, f"Reference {branch} already exists")
        start = self._body_json() or {}
        stored.refs[branch] = stored.resolve(start.get("startingPoint") or DEFAULT_BRANCH).oid
        self._json({})

    def _model_info(self, repo: str, rev: str = DEFAULT_BRANCH) -> None:
        stored = self._repo(repo)
        commit = stored.resolve(rev)
        self._json(
            {
                "id": repo,
                "modelId": repo,
                "author": stored.owner,
                "sha": commit.oid,
                "private": stored.private,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        """The files and folders under ``path`` (all levels with ``?recursive=True``), on one page."""
        commit = self._repo(repo).resolve(rev)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for name, stored in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": _tree_id(folder)})
            if recursive or len(parts) == 1:
                entries[name] = _file_entry(name, stored)
        if prefix and not entries:
            raise HubHTTPError(404, f"{path} does not exist", code="EntryNotFound", commit=commit.oid)
        self._json(list(entries.values()))

    # --- upload --------------------------------------------------------------------------------------------

    def _preupload(self, repo: str, rev: str) -> None:
        stored = self._repo(repo, write=self.query.get("create_pr") != "1")
        current = stored.resolve(rev).files
        answers = []
        for item in self._body_json().get("files", []):
            path, size = str(item["path"]), int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size >= LFS_MIN_SIZE or path.endswith(LFS_EXTENSIONS) or b"\0" in sample
            remote = current.get(path)
            oid = (
                None if remote is None else (remote.sha256 if remote.lfs else _git_blob_sha1(remote.content))
            )
            answers.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": answers})

    def _lfs_batch(self, repo: str) -> None:
        self._repo(repo, write=True)
        payload = self._body_json()
        if payload.get("operation") != "upload":
            raise HubHTTPError(400, "this test server only accepts LFS uploads")
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.state.lfs_objects:
                signature = secrets.token_hex(8)
                entry["actions"] = {
                    "upload": {"href": f"{self.base_url}/__lfs/upload/{oid}?sig={signature}", "header": {}},
                    "verify": {"href": f"{self.base_url}/__lfs/verify", "header": {}},
                }
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str) -> None:
        if not self.query.get("sig"):
            raise HubHTTPError(403, "unsigned upload URL")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubHTTPError(400, "the uploaded content does not match its sha256")
        if self.state.stored_bytes() + len(self.body) > MAX_STORED:
            raise HubHTTPError(507, "the test server is full")
        self.state.lfs_objects[oid] = self.body
        self._send(200, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self) -> None:
        self._user()
        payload = self._body_json()
        blob = self.state.lfs_objects.get(str(payload.get("oid")))
        if blob is None or len(blob) != int(payload.get("size", -1)):
            raise HubHTTPError(404, "object not found or of another size")
        self._json({})

    def _commit(self, repo: str, rev: str) -> None:
        create_pr = self.query.get("create_pr") == "1"
        stored = self._repo(repo, write=not create_pr)
        if create_pr:
            self._user()
        base = stored.resolve(rev)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the commit body must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != base.oid:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            self._apply(files, line["key"], line["value"])
        commit = self.state.new_commit(stored, base.oid, str(header.get("summary", "")), files)
        answer: dict[str, Any] = {
            "commitUrl": f"{self.base_url}/{repo}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "success": True,
        }
        if create_pr:
            stored.pull_requests += 1
            number = stored.pull_requests
            stored.refs[f"refs/pr/{number}"] = commit.oid
            answer["pullRequestUrl"] = f"{self.base_url}/{repo}/discussions/{number}"
        else:
            stored.refs[rev] = commit.oid
        self._json(answer)

    def _apply(self, files: dict[str, StoredFile], key: str, value: Mapping[str, Any]) -> None:
        path = str(value["path"])
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubHTTPError(400, f"unsupported encoding for {path}")
            files[path] = StoredFile(content=base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            blob = self.state.lfs_objects.get(str(value["oid"]))
            if blob is None or ("size" in value and len(blob) != int(value["size"])):
                raise HubHTTPError(422, f"LFS object for {path} was not uploaded")
            files[path] = StoredFile(content=blob, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
        else:
            raise HubHTTPError(400, f"unknown commit operation {key!r}")

    # --- download ------------------------------------------------------------------------------------------

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        stored = self._repo(repo)
        commit = stored.resolve(rev)
        found = commit.files.get(path)
        if found is None:
            raise HubHTTPError(404, "Entry not found", code="EntryNotFound", commit=commit.oid)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{found.git_oid}"'}
        if found.lfs:
            headers["Location"] = f"{self.base_url}/__lfs/objects/{found.sha256}?commit={commit.oid}"
            headers["X-Linked-Etag"] = f'"{found.sha256}"'
            headers["X-Linked-Size"] = str(len(found.content))
            self._send(302, headers=headers)
            return
        self._send(200, found.content, content_type="application/octet-stream", headers=headers)

    def _lfs_object(self, oid: str) -> None:
        blob = self.state.lfs_objects.get(oid)
        if blob is None:
            raise HubHTTPError(404, "object not found")
        headers = {"ETag": f'"{oid}"', "X-Repo-Commit": self.query.get("commit", "")}
        self._send(200, blob, content_type="application/octet-stream", headers=headers)


# --- the client side --------------------------------------------------------------------------------------


@contextmanager
def online_client(monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[None]:
    """Lift the test session's offline mode for huggingface_hub, with Xet off and no developer login or cache.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_DISABLE_XET into ``constants`` at import and checks the
    constants on every request, so those are patched (the variables too, for subprocesses). Its shared
    HTTP client is closed on the way out, so that no connection to a stopped server is reused.
    """
    constants = huggingface_hub.constants
    for name, value in {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "no-login" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub-cache"))
    try:
        yield
    finally:
        close_session()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What HF_ENDPOINT=url does at import: huggingface_hub parses commit URLs against ``ENDPOINT`` and
    builds download URLs from ``HUGGINGFACE_CO_URL_TEMPLATE``, whatever endpoint a call names."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make ``time.sleep`` return at once and record what was asked, for one test.

    huggingface_hub retries a dropped or timed-out request 5 times, waiting 1 to 8 s in between (23 s for
    an upload); the server's own waits (``Fault.stall``) use an event, not ``time.sleep``.
    """
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


# --- routing and helpers ------------------------------------------------------------------------------------


def _route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The handler method's name and its arguments (unquoted path parts) for a request."""
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(path)
        if route_method == method and match:
            return name, {
                key: unquote(value) for key, value in match.groupdict().items() if value is not None
            }
    raise HubHTTPError(404, f"no route for {method} {path}")


def _file_entry(path: str, stored: StoredFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(stored.content), "oid": stored.git_oid}
    if stored.lfs:
        entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": len(stored.pointer)}
    return entry


def _tree_id(folder: str) -> str:
    return hashlib.sha1(f"tree {folder}".encode()).hexdigest()  # noqa: S324 (an id, as git's)


def _git_blob_sha1(content: bytes) -> str:
    return StoredFile(content=content, lfs=False).git_oid


def metadata_errors(readme: str) -> Iterator[str]:
    """What the Hub would reject in a README's YAML block (the part of its checks our cards exercise)."""
    if not readme.startswith("---"):
        return
    block = readme.split("---", 2)
    if len(block) < 3:
        yield "the metadata block is not closed by ---"
        return
    try:
        data = yaml.safe_load(block[1])
    except yaml.YAMLError as exc:
        yield f"invalid YAML: {exc}"
        return
    if data is None:
        return
    if not isinstance(data, dict):
        yield "the metadata is not a mapping"
        return
    relation = data.get("base_model_relation")
    if relation is not None and relation not in HUB_RELATIONS:
        yield f'"base_model_relation" must be one of {", ".join(HUB_RELATIONS)}'
    if relation is not None and not data.get("base_model"):
        yield '"base_model_relation" needs "base_model"'
    if "license" in data and not isinstance(data["license"], str):
        yield '"license" must be a string'
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        yield '"tags" must be a list of strings'
    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str | list):
        yield '"base_model" must be a model id or a list of them'
