"""A local stand-in for the Hugging Face hub that speaks its HTTP protocol.

The real `huggingface_hub` client is pointed at it with HF_ENDPOINT, so the code under test
runs unchanged: the model-info API (`/api/models/{repo}[/revision/{rev}]`, with `blobs=true`
file metadata), the tree API, `resolve` with ETag / X-Linked-Etag / X-Linked-Size /
X-Repo-Commit headers, LFS files redirected (302) to a second "CDN" server on another port
(another origin, as the real hub's signed URLs are), Range requests (206), gated and missing
repos with the hub's `X-Error-Code` headers. Fault knobs: cut a download after N bytes, take a
file offline, serve corrupted bytes, stall mid-file, serve slowly (bytes per second), list a
file that resolve cannot find.

Run standalone (`python tests/models/fakehub.py`) to poke at it by hand.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

CHUNK = 64 * 1024
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".png", ".model")


@dataclass
class FakeFile:
    """One file of a fake repo: bytes in memory or a file on disk, with the hub's hashes."""

    path: str
    source: bytes | Path
    lfs: bool
    size: int = 0
    sha256: str = ""
    blob_id: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.source, bytes):
            self.size = len(self.source)
            self.sha256 = hashlib.sha256(self.source).hexdigest()
            data_for_git = self.source
        else:
            self.size = self.source.stat().st_size
            self.sha256 = _file_sha256(str(self.source), self.size)
            data_for_git = b""
        if self.lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n"
            ).encode()
            self.blob_id = _git_blob_id(pointer)
        else:
            self.blob_id = _git_blob_id(data_for_git)

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file."""
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with self.source.open("rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int) -> str:
    """Hash a big source file once per test session (the 98 MB SmolLM2 copy)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    """A model repo at one commit."""

    repo_id: str
    files: dict[str, FakeFile]
    commit: str
    gated: bool = False
    hidden: set[str] = field(default_factory=set)  # in storage, not in the listing
    vanished: set[str] = field(default_factory=set)  # in the listing, 404 on resolve


class FakeHub:
    """Two loopback HTTP servers (hub + CDN) serving fake repos, with fault knobs and counters."""

    def __init__(self, good_token: str = "hf_good_token") -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.by_sha: dict[str, tuple[FakeRepo, FakeFile]] = {}
        self.good_token = good_token
        self.lock = threading.Lock()
        self.bytes_served: Counter[str] = Counter()
        self.range_starts: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str]] = []
        self.cuts: dict[str, int] = {}
        self.outage_after_cut: set[str] = set()
        self.offline: set[str] = set()
        self.corrupt: set[str] = set()
        self.stalls: dict[str, int] = {}
        self.rates: dict[str, float] = {}  # bytes per second, to watch a download in progress
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = ""
        self.cdn_url = ""

    # --- setup ------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, files: dict[str, bytes | Path], *, gated: bool = False
    ) -> FakeRepo:
        built = {
            path: FakeFile(path, src, lfs=path.lower().endswith(LFS_SUFFIXES))
            for path, src in files.items()
        }
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(f.sha256.encode() for f in built.values())
        )
        repo = FakeRepo(repo_id, built, commit.hexdigest(), gated=gated)
        self.repos[repo_id] = repo
        for f in built.values():
            self.by_sha[f.sha256] = (repo, f)
        return repo

    def key(self, repo_id: str, path: str) -> str:
        return f"{repo_id}/{path}"

    def reset_counters(self) -> None:
        with self.lock:
            self.bytes_served.clear()
            self.range_starts.clear()
            self.requests.clear()

    def reset_faults(self) -> None:
        self.cuts.clear()
        self.outage_after_cut.clear()
        self.offline.clear()
        self.corrupt.clear()
        self.stalls.clear()
        self.rates.clear()
        self.stalled.clear()
        self.release.set()

    def start(self) -> FakeHub:
        for _ in range(2):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
            self._servers.append(server)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass

    # --- plumbing ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        parsed = urlparse(self.path)
        path = unquote(parsed.path)
        query = parse_qs(parsed.query)
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        if path.startswith("/cdn/"):
            self._cdn(path[len("/cdn/") :])
        elif path.startswith("/api/models/"):
            self._api(path[len("/api/models/") :], query)
        elif "/resolve/" in path:
            self._resolve(path.lstrip("/"))
        else:
            self._error(404, None, "Not Found")

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
        return repo

    def _revision_ok(self, repo: FakeRepo, rev: str) -> bool:
        if rev in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    # --- API --------------------------------------------------------------------------------

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        if len(parts) < 2:
            self._error(404, None, "Not Found")
            return
        repo = self._repo("/".join(parts[:2]))
        if repo is None:
            return
        tail = parts[2:]
        if not tail:
            self._model_info(repo, query)
        elif tail[0] == "revision" and len(tail) == 2:
            if self._revision_ok(repo, tail[1]):
                self._model_info(repo, query)
        elif tail[0] == "tree" and len(tail) >= 2:
            if self._revision_ok(repo, tail[1]):
                self._tree(repo, "/".join(tail[2:]), query)
        else:
            self._error(404, None, "Not Found")

    def _listed(self, repo: FakeRepo) -> list[FakeFile]:
        return [f for p, f in sorted(repo.files.items()) if p not in repo.hidden]

    def _model_info(self, repo: FakeRepo, query: dict[str, list[str]]) -> None:
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for f in self._listed(repo):
            sib: dict[str, object] = {"rfilename": f.path}
            if blobs:
                sib["size"] = f.size
                sib["blobId"] = f.blob_id
                if f.lfs:
                    sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sib)
        owner = repo.repo_id.split("/")[0]
        self._json(
            200,
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": owner,
                "sha": repo.commit,
                "lastModified": "2024-05-01T12:00:00.000Z",
                "createdAt": "2024-05-01T12:00:00.000Z",
                "private": False,
                "disabled": False,
                "gated": "manual" if repo.gated else False,
                "downloads": 0,
                "likes": 0,
                "tags": ["gguf"],
                "library_name": None,
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(f.size for f in repo.files.values()),
            },
        )

    def _tree(self, repo: FakeRepo, prefix: str, query: dict[str, list[str]]) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        for f in self._listed(repo):
            if not f.path.startswith(base):
                continue
            rest = f.path[len(base) :]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/", 1)[0])
                continue
            if recursive:
                pieces = f.path.split("/")[:-1]
                for i in range(len(base.split("/")) - 1 if base else 0, len(pieces)):
                    folders.add("/".join(pieces[: i + 1]))
            item: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": f.size}
            item["path"] = f.path
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(item)
        dirs = [
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)
        ]
        self._json(200, dirs + entries)

    # --- files ------------------------------------------------------------------------------

    def _resolve(self, rest: str) -> None:
        repo_part, _, after = rest.partition("/resolve/")
        repo = self._repo(repo_part)
        if repo is None:
            return
        rev, _, file_path = after.partition("/")
        if not self._revision_ok(repo, rev):
            return
        if repo.gated:
            token = self._token()
            if token is None:
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted. You must have access to it"
                    " and be authenticated to access it. Please log in.",
                )
                return
            if token != self.hub.good_token:
                self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted and you are not in the"
                    f" authorized list. Visit https://huggingface.co/{repo.repo_id} to ask for"
                    " access.",
                )
                return
        f = repo.files.get(file_path)
        if f is None or file_path in repo.vanished:
            self._error(404, "EntryNotFound", f'{file_path} does not exist on "{rev}"')
            return
        common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            location = f"{self.hub.cdn_url}/cdn/{f.sha256}?X-Amz-Signature=fake"
            body = f"Found. Redirecting to {location}".encode()
            self._send(
                302,
                body,
                {
                    **common,
                    "Location": location,
                    "ETag": f'"{f.blob_id}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "Content-Type": "text/plain; charset=utf-8",
                },
            )
            return
        self._serve_bytes(repo, f, {**common, "ETag": f'"{f.blob_id}"'})

    def _cdn(self, rest: str) -> None:
        sha = rest.split("?", 1)[0]
        found = self.hub.by_sha.get(sha)
        if found is None:
            self._send(404, b"NoSuchKey")
            return
        repo, f = found
        self._serve_bytes(repo, f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

    def _serve_bytes(self, repo: FakeRepo, f: FakeFile, headers: dict[str, str]) -> None:
        hub = self.hub
        key = hub.key(repo.repo_id, f.path)
        if key in hub.offline:
            self._error(503, None, "Service Unavailable")
            return
        start, end = 0, f.size
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else f.size
            if start >= f.size:
                self._send(416, b"", {"Content-Range": f"bytes */{f.size}"})
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{f.size}"}
        self.send_response(status)
        for k, v in {
            **headers,
            "Content-Length": str(end - start),
            "Content-Type": "application/octet-stream",
        }.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub.lock:
            hub.range_starts.setdefault(key, []).append(start)
        cut = hub.cuts.get(key)
        stall = hub.stalls.get(key)
        rate = hub.rates.get(key)
        pos = start
        while pos < end:
            stop = min(end, pos + CHUNK)
            if cut is not None and pos < cut <= stop:
                stop = cut
            if stall is not None and pos < stall <= stop:
                stop = stall
            data = f.read(pos, stop)
            if key in hub.corrupt and pos <= f.size // 2 < stop:
                i = f.size // 2 - pos
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                return
            with hub.lock:
                hub.bytes_served[key] += len(data)
            if rate:
                time.sleep(len(data) / rate)
            pos = stop
            if cut is not None and pos == cut and pos < end:
                hub.cuts.pop(key, None)
                if key in hub.outage_after_cut:
                    hub.offline.add(key)
                self.close_connection = True
                return
            if stall is not None and pos == stall and pos < end:
                hub.stalled.set()
                hub.release.wait(timeout=60)
                self.close_connection = True
                return


# --- content the tests serve --------------------------------------------------------------------


def make_gguf(path: Path, *, n_floats: int, file_type: int = 7, seed: int = 0, **kv: int) -> Path:
    """A small but real GGUF (written by the `gguf` package): llama metadata and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_file_type(file_type)
    writer.add_context_length(2048)
    writer.add_block_count(1)
    for key, value in kv.items():
        writer.add_uint32(key.replace("__", "."), value)
    rng = np.random.default_rng(seed)
    writer.add_tensor("token_embd.weight", rng.standard_normal(n_floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_safetensors(n_floats: int, seed: int = 0) -> bytes:
    """A valid safetensors blob: 8-byte header length, JSON header, little-endian F32 data."""
    import struct

    import numpy as np

    data = np.random.default_rng(seed).standard_normal(n_floats, dtype=np.float32).tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "model.embed_tokens.weight": {
            "dtype": "F32",
            "shape": [n_floats],
            "data_offsets": [0, len(data)],
        },
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


KIB = 1024
# Bigger than huggingface_hub's 10 MB download chunk, so an interrupted download keeps bytes.
BIG_KIB = 24 * 1024


def build_repos(hub: FakeHub, workdir: Path) -> None:
    """The fake repos every hub test uses; GGUFs are generated once into workdir."""
    workdir.mkdir(parents=True, exist_ok=True)

    def gguf_file(name: str, kib: int, seed: int, **kv: int) -> Path:
        path = workdir / name.replace("/", "_")
        if not path.exists():
            make_gguf(path, n_floats=kib * KIB // 4, seed=seed, **kv)
        return path

    readme = b"---\nlicense: apache-2.0\n---\n# a fake model\n"
    attrs = b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    hub.add_repo(
        "fake/Tiny-GGUF",
        {
            "Tiny-Q2_K.gguf": gguf_file("Tiny-Q2_K.gguf", 128, 1),
            "Tiny-Q4_K_M.gguf": gguf_file("Tiny-Q4_K_M.gguf", 256, 2),
            "Tiny-Q6_K.gguf": gguf_file("Tiny-Q6_K.gguf", 384, 3),
            "Tiny-Q8_0.gguf": gguf_file("Tiny-Q8_0.gguf", 512, 4),
            "Tiny-F16.gguf": gguf_file("Tiny-F16.gguf", 1024, 5),
            "mmproj-Tiny-F32.gguf": gguf_file("mmproj-Tiny-F32.gguf", 1536, 6),
            "README.md": readme,
            ".gitattributes": attrs,
        },
    )
    hub.add_repo(
        "fake/Big-GGUF",
        {"Big-Q8_0.gguf": gguf_file("Big-Q8_0.gguf", BIG_KIB, 7), "README.md": readme},
    )
    split = {"split__count": 2}
    hub.add_repo(
        "fake/Split-GGUF",
        {
            "Q4_K_M/Split-Q4_K_M-00001-of-00002.gguf": gguf_file(
                "Split-Q4_K_M-00001-of-00002.gguf", 256, 8, split__no=0, **split
            ),
            "Q4_K_M/Split-Q4_K_M-00002-of-00002.gguf": gguf_file(
                "Split-Q4_K_M-00002-of-00002.gguf", 256, 9, split__no=1, **split
            ),
            "Split-Q2_K.gguf": gguf_file("Split-Q2_K.gguf", 128, 10),
            "README.md": readme,
        },
    )
    hub.add_repo(
        "fake/Broken-GGUF",
        {
            "Broken-Q8_0-00001-of-00003.gguf": gguf_file("Broken-Q8_0-1.gguf", 256, 11),
            "Broken-Q8_0-00003-of-00003.gguf": gguf_file("Broken-Q8_0-3.gguf", 256, 12),
            "Broken-Q4_0.gguf": gguf_file("Broken-Q4_0.gguf", 128, 13),
        },
    )
    hub.add_repo(
        "fake/Gated-GGUF", {"Gated-Q4_0.gguf": gguf_file("Gated-Q4_0.gguf", 64, 14)}, gated=True
    )

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
    tokenizer = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}).encode()
    shard1, shard2 = make_safetensors(40 * KIB, 15), make_safetensors(40 * KIB, 16)
    index = {
        "metadata": {"total_size": len(shard1) + len(shard2)},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    hub.add_repo(
        "fake/Tiny-Llama",
        {
            "config.json": json.dumps(config).encode(),
            "generation_config.json": b'{"do_sample": true}',
            "tokenizer.json": tokenizer,
            "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
            "special_tokens_map.json": b"{}",
            "model-00001-of-00002.safetensors": shard1,
            "model-00002-of-00002.safetensors": shard2,
            "model.safetensors.index.json": json.dumps(index).encode(),
            "pytorch_model.bin": b"PK\x03\x04 not really a pickle" + bytes(1000),
            "onnx/model.onnx": bytes(2000),
            "assets/logo.png": b"\x89PNG" + bytes(100),
            "README.md": readme,
            ".gitattributes": attrs,
        },
    )
    gptq = {**config, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    hub.add_repo(
        "fake/Tiny-Llama-GPTQ",
        {
            "config.json": json.dumps(gptq).encode(),
            "quantize_config.json": b'{"bits": 4, "group_size": 128}',
            "model.safetensors": make_safetensors(20 * KIB, 17),
            "tokenizer.json": tokenizer,
            "tokenizer_config.json": b"{}",
            "README.md": readme,
        },
    )


def add_smollm2(hub: FakeHub) -> str:
    """Serve the shipped SmolLM2 GGUF as a hub repo, for the pull-then-serve test."""
    from innkeeper.models.store import DEFAULT_MODEL_FILE, default_model_path

    repo_id = "fake/SmolLM2-135M-Instruct-GGUF"
    hub.add_repo(repo_id, {DEFAULT_MODEL_FILE: default_model_path(), "README.md": b"# SmolLM2"})
    return repo_id


# --- pytest fixtures (import them into a test module to use them) -------------------------------


@pytest.fixture(scope="session")
def hub_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated GGUF files, written once per test session."""
    return tmp_path_factory.mktemp("fakehub-src")


@pytest.fixture
def fake_hub(
    hub_sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    """A running fake hub with the standard repos; HF_ENDPOINT points at it, no token is set."""
    hub = FakeHub()
    build_repos(hub, hub_sources)
    hub.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    try:
        yield hub
    finally:
        hub.stop()


if __name__ == "__main__":
    import sys

    hub = FakeHub()
    hub.add_repo("demo/Tiny-GGUF", {"Tiny-Q8_0.gguf": b"GGUF" + bytes(1000), "README.md": b"hi"})
    with hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)
