"""`hub.pull` against the local stand-in hub: resume, verify, move in; never write a file in place.

A server mmaps the GGUF it serves: writing into that file (truncating it, re-downloading over it)
kills the server with SIGBUS at its next token. So a file's final name only ever appears by an
atomic rename of a complete, verified download, and a file being replaced is unlinked, never
opened for writing.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from innkeeper.models import hub, store
from tests.models import fakehub
from tests.models.fakehub import FakeHub

fake_hub = fakehub.fake_hub
hub_sources = fakehub.hub_sources

TINY = "fake/Tiny-GGUF"


def _pull(repo_id: str, root: Path, **kw: str) -> hub.PullResult:
    return hub.pull(hub.select(hub.list_repo(repo_id), **kw), root, progress=False)


def _store_files(root: Path) -> list[str]:
    """Every file in the store, the lock files that serialize pulls included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_pull_verifies_and_lands_in_store(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = _pull(TINY, tmp_path, quant="Q8_0")
    src = fake_hub.repos[TINY].files["Tiny-Q8_0.gguf"]
    assert result.entry.complete and result.entry.name == "Tiny:Q8_0"
    assert result.downloaded_bytes == src.size
    assert result.entry.path.read_bytes() == src.read(0, src.size)
    manifest = store.read_manifest(result.entry.path.parent)
    assert manifest is not None and manifest.complete
    assert manifest.revision == fake_hub.repos[TINY].commit
    assert manifest.files[0].sha256 == src.sha256 and manifest.files[0].verified
    # a second pull finds everything in place and fetches nothing
    fake_hub.reset_counters()
    again = _pull(TINY, tmp_path, quant="Q8_0")
    assert (again.downloaded_bytes, again.reused_files) == (0, 1)
    assert sum(fake_hub.bytes_served.values()) == 0


def test_split_pull_resolves_to_first_shard(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = _pull("fake/Split-GGUF", tmp_path, quant="Q4_K_M")
    assert result.entry.path.name == "Split-Q4_K_M-00001-of-00002.gguf"
    assert (result.entry.path.parent / "Split-Q4_K_M-00002-of-00002.gguf").is_file()
    found = store.find_in_store("Split:q4_k_m", tmp_path)
    assert found.path == result.entry.path


def test_interrupted_download_resumes_with_only_the_remaining_bytes(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    key = fake_hub.key("fake/Big-GGUF", "Big-Q8_0.gguf")
    size = fake_hub.repos["fake/Big-GGUF"].files["Big-Q8_0.gguf"].size
    cut = 15 * 1024 * 1024
    fake_hub.cuts[key] = cut
    fake_hub.outage_after_cut.add(key)  # the network stays down: the client's retries fail too
    with pytest.raises(hub.HubError, match=r"interrupted \(.* of 24\.0 MiB kept\).*to resume"):
        _pull("fake/Big-GGUF", tmp_path)
    partial = list(tmp_path.rglob("*.incomplete"))
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert 0 < kept <= cut  # the client writes in 10 MB chunks: what it wrote is kept
    assert not list(tmp_path.rglob("Big-Q8_0.gguf"))  # nothing that looks complete
    assert [e.complete for e in store.list_models(tmp_path)] == [False]

    fake_hub.reset_faults()
    fake_hub.reset_counters()
    result = _pull("fake/Big-GGUF", tmp_path)
    assert result.entry.complete
    assert fake_hub.range_starts[key] == [kept]
    assert fake_hub.bytes_served[key] == size - kept
    assert (result.resumed_from_bytes, result.downloaded_bytes) == (kept, size - kept)
    assert not list(tmp_path.rglob("*.incomplete"))


def test_bad_partial_is_thrown_away_and_fetched_afresh(fake_hub: FakeHub, tmp_path: Path) -> None:
    sel = hub.select(hub.list_repo(TINY), quant="Q2_K")
    final = store.entry_dir(tmp_path, TINY, "Q2_K") / "Tiny-Q2_K.gguf"
    final.parent.mkdir(parents=True)
    store.partial_path(final, sel.files[0].sha256 or "").write_bytes(b"garbage" * 100)
    result = hub.pull(sel, tmp_path, progress=False)
    assert result.entry.complete
    key = fake_hub.key(TINY, "Tiny-Q2_K.gguf")
    assert fake_hub.range_starts[key] == [700, 0]


def test_corrupted_download_is_deleted_with_a_clear_error(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.corrupt.add(fake_hub.key(TINY, "Tiny-Q4_K_M.gguf"))
    with pytest.raises(hub.IntegrityError, match=r"sha256 does not match.*deleted"):
        _pull(TINY, tmp_path, quant="Q4_K_M")
    assert _store_files(tmp_path) == []
    assert store.list_models(tmp_path) == []


def test_shard_listed_but_missing_on_the_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    repo = fake_hub.repos["fake/Split-GGUF"]
    repo.vanished.add("Q4_K_M/Split-Q4_K_M-00002-of-00002.gguf")
    with pytest.raises(hub.MissingShardError, match="missing"):
        _pull("fake/Split-GGUF", tmp_path, quant="Q4_K_M")
    assert [e.complete for e in store.list_models(tmp_path)] == [False]
    with pytest.raises(store.ModelNotFoundError, match="incomplete"):
        store.find_in_store("Split:Q4_K_M", tmp_path)


def test_gated_repo_needs_a_token_with_access(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "fake/Gated-GGUF"
    with pytest.raises(hub.HubAccessError, match=r"gated repo.*set HF_TOKEN"):
        _pull(repo, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(hub.HubAccessError, match=r"gated repo.*has no access"):
        _pull(repo, tmp_path)
    assert _store_files(tmp_path) == []
    monkeypatch.setenv("HF_TOKEN", fake_hub.good_token)
    assert _pull(repo, tmp_path).entry.complete


def test_not_enough_disk_space_stops_before_downloading(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(hub.DiskSpaceError, match=r"needs 512\.3 KiB, 4\.0 KiB free"):
        _pull(TINY, tmp_path, quant="Q8_0")
    assert sum(fake_hub.bytes_served.values()) == 0
    assert _store_files(tmp_path) == []


def test_repull_replaces_a_loaded_file_by_rename_never_in_place(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """The hub publishes a new revision of a file a server has mapped; the pull resumes it from
    a partial download. The mapped inode keeps its bytes, size and mtime: only a rename put the
    new file at its name."""
    final = _pull(TINY, tmp_path, quant="Q8_0").entry.path
    old = final.read_bytes()
    new = bytes(reversed(old))  # same size, other bytes: a writer in place would not show in size
    with final.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as loaded:
        before = os.fstat(fh.fileno())
        fake_hub.add_repo(TINY, {final.name: new})
        sel = hub.select(hub.list_repo(TINY), quant="Q8_0")
        manifest = store.read_manifest(final.parent)
        assert manifest is not None and manifest.revision != sel.revision  # a new commit
        store.partial_path(final, sel.files[0].sha256 or "").write_bytes(new[: len(new) // 2])
        result = hub.pull(sel, tmp_path, progress=False)
        after = os.fstat(fh.fileno())
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert loaded[:] == old  # what the server reads is what it loaded
        assert os.stat(final).st_ino != before.st_ino
    assert result.entry.complete and final.read_bytes() == new
    assert (result.resumed_from_bytes, result.downloaded_bytes) == (len(new) // 2, len(new) // 2)


def test_pull_then_delete_leaves_nothing_behind(fake_hub: FakeHub, tmp_path: Path) -> None:
    """Deleting a pulled model removes its lock file too (no empty `.locks/*.lock` left)."""
    pulled = _pull(TINY, tmp_path, quant="Q8_0").entry
    assert _store_files(tmp_path) != [] and list((tmp_path / store.LOCKS_DIR).glob("*.lock"))
    store.remove_model(pulled.name, tmp_path)
    assert _store_files(tmp_path) == []


def test_resolve_fetches_the_projector_beside_a_vision_model(
    fake_hub: FakeHub, hub_sources: Path, tmp_path: Path
) -> None:
    from innkeeper.models.projector import projector_for
    from tests.models.vision_factory import write_pair

    folder = hub_sources / "vision"
    folder.mkdir(exist_ok=True)
    model, proj = write_pair(folder)
    fake_hub.add_repo(
        "fake/TinyVision-GGUF",
        {
            "TinyVision-F16.gguf": model,
            "mmproj-TinyVision-F32.gguf": proj,
            "mmproj-TinyVision-F16.gguf": proj,  # the one to take: F16 runs everywhere
            "other/mmproj-x.gguf": proj,  # not beside the model: never taken
        },
    )
    got = hub.resolve(hub.parse_ref("fake/TinyVision-GGUF"), tmp_path, machine=None, progress=False)
    assert got.selection is not None
    assert [f.path for f in got.selection.files] == [
        "TinyVision-F16.gguf",
        "mmproj-TinyVision-F16.gguf",
    ]
    beside = projector_for(got.entry.path)
    assert beside == got.entry.path.parent / "mmproj-TinyVision-F16.gguf"
    assert beside.read_bytes() == proj.read_bytes()
    # a text-only repo fetches its model alone
    plain = hub.resolve(
        hub.parse_ref("fake/Split-GGUF:Q4_K_M"), tmp_path, machine=None, progress=False
    )
    assert plain.selection is not None
    assert not any("mmproj" in f.path for f in plain.selection.files)
