"""The local store: layout, manifests, names `serve` accepts, and no way out of the folder."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from innkeeper.models import store


def _add(
    root: Path,
    repo: str,
    variant: str,
    files: dict[str, bytes],
    *,
    fmt: str = "gguf",
    complete: bool = True,
) -> Path:
    """Put a pulled variant into the store the way `pull` leaves it."""
    entry = store.entry_dir(root, repo, variant)
    for rel, data in files.items():
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        (entry / rel).write_bytes(data)
    manifest = store.Manifest(
        repo=repo,
        revision="a" * 40,
        variant=variant,
        format=fmt,
        main_file=next(iter(files)),
        files=[store.ManifestFile(p, len(d), verified=complete) for p, d in files.items()],
        complete=complete,
    )
    store.write_manifest(entry, manifest)
    return entry


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("INNKEEPER_MODELS", str(models))
    return models


def test_models_dir_and_default_model_unchanged(root: Path) -> None:
    assert store.models_dir() == root
    default = store.resolve_model(None)
    assert default == store.default_model_path() and default.name == store.DEFAULT_MODEL_FILE
    assert store.resolve_model(str(default)) == default  # an existing path is taken as is


def test_store_name_drops_gguf_suffix_and_adds_quant() -> None:
    assert store.store_name("brittlewis12/Kunoichi-DPO-v2-7B-GGUF", "Q6_K", "gguf") == (
        "Kunoichi-DPO-v2-7B:Q6_K"
    )
    assert store.store_name("org/Tiny-Llama", "safetensors", "safetensors") == "Tiny-Llama"


def test_resolve_by_store_name_and_quant(root: Path) -> None:
    repo = "brittlewis12/Kunoichi-DPO-v2-7B-GGUF"
    q6 = _add(root, repo, "Q6_K", {"kunoichi-dpo-v2-7b.Q6_K.gguf": b"GGUF6"})
    q4 = _add(root, repo, "Q4_K_M", {"kunoichi-dpo-v2-7b.Q4_K_M.gguf": b"GGUF4"})
    want6 = q6 / "kunoichi-dpo-v2-7b.Q6_K.gguf"
    assert store.resolve_model("Kunoichi-DPO-v2-7B:Q6_K") == want6
    assert store.resolve_model("kunoichi-dpo-v2-7b:q6_k") == want6
    assert store.resolve_model(f"{repo}:Q4_K_M") == q4 / "kunoichi-dpo-v2-7b.Q4_K_M.gguf"
    with pytest.raises(store.ModelNotFoundError, match=r"several models.*name the quant"):
        store.resolve_model("Kunoichi-DPO-v2-7B")
    with pytest.raises(store.ModelNotFoundError, match=r"not a file or a store name \(Kun"):
        store.resolve_model("Kunoichi-DPO-v2-7B:Q8_0")


def test_bare_name_when_one_variant(root: Path) -> None:
    entry = _add(root, "fake/Solo-GGUF", "Q8_0", {"solo.Q8_0.gguf": b"GGUF"})
    assert store.resolve_model("Solo") == entry / "solo.Q8_0.gguf"


def test_split_model_resolves_to_first_shard(root: Path) -> None:
    files = {
        "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf": b"GGUF1",
        "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf": b"GGUF2",
    }
    entry = _add(root, "fake/Split-GGUF", "Q4_K_M", files)
    assert store.resolve_model("Split:Q4_K_M") == entry / "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"
    (entry / "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf").unlink()
    [listed] = store.list_models(root)
    assert not listed.complete and listed.missing == ["Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(store.ModelNotFoundError, match=r"incomplete.*pull"):
        store.resolve_model("Split:Q4_K_M")


def test_incomplete_pull_is_listed_but_not_served(root: Path) -> None:
    _add(root, "fake/Half-GGUF", "Q8_0", {"half.Q8_0.gguf": b"GG"}, complete=False)
    [listed] = store.list_models(root)
    assert (listed.name, listed.complete) == ("Half:Q8_0", False)
    with pytest.raises(store.ModelNotFoundError, match="incomplete"):
        store.resolve_model("Half:Q8_0")


def test_size_mismatch_is_incomplete(root: Path) -> None:
    entry = _add(root, "fake/Cut-GGUF", "Q8_0", {"cut.Q8_0.gguf": b"GGUF-full"})
    (entry / "cut.Q8_0.gguf").write_bytes(b"GGUF")
    assert [e.complete for e in store.list_models(root)] == [False]


def test_loose_gguf_files(root: Path) -> None:
    (root / "my-model.gguf").write_bytes(b"GGUF")
    (root / "big-00001-of-00002.gguf").write_bytes(b"GGUF")
    (root / "big-00002-of-00002.gguf").write_bytes(b"GGUF")
    names = {e.name: e for e in store.list_models(root)}
    assert set(names) == {"my-model", "big"}
    assert names["big"].complete and names["big"].files == [
        "big-00001-of-00002.gguf",
        "big-00002-of-00002.gguf",
    ]
    assert store.resolve_model("my-model") == root / "my-model.gguf"
    assert store.resolve_model("big", allow_paths=False) == root / "big-00001-of-00002.gguf"


@pytest.mark.parametrize(
    "ref", ["../secret.gguf", "../../etc/passwd", "/etc/passwd", "..", "a/../../b", "~/x.gguf"]
)
def test_store_names_cannot_escape(root: Path, ref: str) -> None:
    (root.parent / "secret.gguf").write_bytes(b"GGUF")
    with pytest.raises(store.ModelNotFoundError):
        store.resolve_model(ref, allow_paths=False)


def test_symlink_out_of_the_store_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    (root / "sneaky.gguf").symlink_to(outside)
    assert store.list_models(root) == []
    with pytest.raises(store.ModelNotFoundError):
        store.resolve_model("sneaky", allow_paths=False)
    # a manifest whose file is a symlink leading out is not complete either
    entry = _add(root, "fake/Link-GGUF", "Q8_0", {"link.Q8_0.gguf": b"GGUF"})
    (entry / "link.Q8_0.gguf").unlink()
    (entry / "link.Q8_0.gguf").symlink_to(outside)
    with pytest.raises(store.ModelNotFoundError, match="incomplete"):
        store.resolve_model("Link:Q8_0", allow_paths=False)
    # and a symlinked repo folder is not followed at all
    elsewhere = _add(tmp_path / "other", "fake/Away-GGUF", "Q8_0", {"away.Q8_0.gguf": b"GGUF"})
    (root / "fake__Away-GGUF").symlink_to(elsewhere.parent)
    assert "Away:Q8_0" not in {e.name for e in store.list_models(root)}


@pytest.mark.parametrize("bad_path", ["../../outside.gguf", "/etc/passwd", "a/./b", ""])
def test_tampered_manifest_is_ignored(root: Path, bad_path: str) -> None:
    entry = _add(root, "fake/Evil-GGUF", "Q8_0", {"evil.Q8_0.gguf": b"GGUF"})
    data = json.loads((entry / store.MANIFEST_NAME).read_text())
    data["files"][0]["path"] = bad_path
    data["main_file"] = bad_path
    (entry / store.MANIFEST_NAME).write_text(json.dumps(data))
    assert store.read_manifest(entry) is None
    assert store.list_models(root) == []
    with pytest.raises(store.ModelNotFoundError):
        store.resolve_model("Evil:Q8_0")


def test_garbage_manifest_is_ignored(root: Path) -> None:
    entry = _add(root, "fake/Junk-GGUF", "Q8_0", {"junk.Q8_0.gguf": b"GGUF"})
    for junk in ("{not json", "[]", '{"repo": 1}', '{"files": "x"}'):
        (entry / store.MANIFEST_NAME).write_text(junk)
        assert store.list_models(root) == []


def test_manifest_write_is_atomic(root: Path) -> None:
    entry = _add(root, "fake/A-GGUF", "Q8_0", {"a.Q8_0.gguf": b"GGUF"})
    manifest = store.read_manifest(entry)
    assert manifest is not None
    for _ in range(3):
        store.write_manifest(entry, manifest)
    leftovers = [p.name for p in entry.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert store.read_manifest(entry) == manifest


def test_repo_folder_rejects_unsafe_ids() -> None:
    assert store.repo_folder("owner/name") == "owner__name"
    for bad in ("../x", "owner/..", "/abs", "a/b/c", "owner/"):
        with pytest.raises(ValueError):
            store.repo_folder(bad)


def _lock_of(root: Path, entry: Path) -> Path:
    """The lock file `pull` leaves for a variant (it creates it on its first pull)."""
    lock = store.lock_path(root, entry)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


def test_delete_removes_the_models_lock_file(root: Path) -> None:
    entry = _add(root, "fake/Gone-GGUF", "Q8_0", {"gone.Q8_0.gguf": b"GGUF"})
    other = _add(root, "fake/Kept-GGUF", "Q8_0", {"kept.Q8_0.gguf": b"GGUF"})
    lock, kept = _lock_of(root, entry), _lock_of(root, other)
    assert store.remove_model("Gone:Q8_0", root).name == "Gone:Q8_0"
    assert not entry.exists() and not lock.exists()
    assert kept.exists()  # another model's lock is not this delete's to take


def test_delete_leaves_a_lock_another_process_holds(root: Path) -> None:
    """A pull of this very variant in another process holds its lock: the model goes as before,
    but the lock file stays, since removing a held lock would let a second pull take a new one."""
    entry = _add(root, "fake/Busy-GGUF", "Q8_0", {"busy.Q8_0.gguf": b"GGUF"})
    lock = _lock_of(root, entry)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from filelock import FileLock; held = FileLock(sys.argv[1]);"
            " held.acquire(); print('held', flush=True); sys.stdin.read()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        store.remove_model("Busy:Q8_0", root)
        assert not entry.exists() and lock.exists()
    finally:
        holder.communicate("", timeout=30)


def test_a_pull_waiting_on_a_removed_lock_file_locks_a_fresh_one(root: Path) -> None:
    """What makes removing a lock file while holding it safe (the delete does so): a pull that
    opened the file before it went, and waited, gets the lock only on the file now at its path,
    never on the removed inode, which a later pull could not see."""
    from filelock import FileLock, Timeout
    from huggingface_hub.utils import WeakFileLock

    lock = _lock_of(root, store.entry_dir(root, "fake/Race-GGUF", "Q8_0"))
    deleting = FileLock(lock, timeout=0)
    deleting.acquire()
    later_pull_must_wait: list[bool] = []

    def pull() -> None:
        with WeakFileLock(lock):
            later = FileLock(lock, timeout=0)
            try:
                later.acquire()
            except Timeout:
                later_pull_must_wait.append(True)
            else:
                later.release()
                later_pull_must_wait.append(False)

    waiter = threading.Thread(target=pull)
    waiter.start()
    waiter.join(0.3)  # it has opened the lock file and waits
    assert waiter.is_alive()
    lock.unlink()
    deleting.release()
    waiter.join(30)
    assert later_pull_must_wait == [True]
