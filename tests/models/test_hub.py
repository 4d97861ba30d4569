"""The hub package against a local stand-in of the hub, driven by the real huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pytest

from innkeeper.models import hub
from innkeeper.models.filenames import filename_hints, missing_shards, quant_label
from innkeeper.models.hardware import Hardware
from tests.models import fakehub
from tests.models.fakehub import FakeHub

fake_hub = fakehub.fake_hub  # fixtures shared with tests/cli/test_pull.py
hub_sources = fakehub.hub_sources

TINY = "fake/Tiny-GGUF"
GIB = 1024**3


# --- references and names (no server) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo", "quant", "filename", "revision"),
    [
        ("owner/name", "owner/name", None, None, None),
        ("owner/Name-GGUF:Q6_K", "owner/Name-GGUF", "Q6_K", None, None),
        ("owner/name:q4_k_m", "owner/name", "q4_k_m", None, None),
        ("owner/name/model-Q8_0.gguf", "owner/name", None, "model-Q8_0.gguf", None),
        ("owner/name/sub/dir/x.gguf", "owner/name", None, "sub/dir/x.gguf", None),
        ("https://huggingface.co/owner/name", "owner/name", None, None, None),
        ("https://huggingface.co/o/n/blob/main/f.gguf", "o/n", None, "f.gguf", "main"),
        ("hf.co/o/n/resolve/abc123/f.gguf", "o/n", None, "f.gguf", "abc123"),
    ],
)
def test_parse_ref(
    text: str, repo: str, quant: str | None, filename: str | None, revision: str | None
) -> None:
    assert hub.parse_ref(text) == hub.HubRef(repo, quant, filename, revision)


@pytest.mark.parametrize(
    "text", ["name-only", "owner/", "/name", "../x/y", "o/n/../../etc", "o/n:", "o/n:Q4 K", "o/-n"]
)
def test_parse_ref_rejects(text: str) -> None:
    with pytest.raises(hub.HubRefError):
        hub.parse_ref(text)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("mistral-7b-instruct-v0.2.Q4_K_M.gguf", "Q4_K_M"),
        ("Meta-Llama-3-8B-Instruct-IQ3_XXS.gguf", "IQ3_XXS"),
        ("model-q8_0.gguf", "Q8_0"),
        ("Qwen2-7B-bf16.gguf", "BF16"),
        ("Q4_K_M/Big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("DeepSeek-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("ggml-model-f16.gguf", "F16"),
        ("model-fp16.gguf", "F16"),
        ("Qwen2-7B-Instruct.gguf", None),
    ],
)
def test_quant_label(path: str, label: str | None) -> None:
    """One parser for hub variants and local names: a UD- quant or a quant named only by its
    folder is the same label to `pull` and to `inspect`'s filename hints."""
    assert quant_label(path) == label
    assert filename_hints(path.rsplit("/", 1)[-1]).quantization == quant_label(
        path.rsplit("/", 1)[-1]
    )


def test_missing_shards_names_every_absent_part() -> None:
    names = ["a/M-Q8_0-00001-of-00003.gguf", "a/M-Q8_0-00003-of-00003.gguf", "b.gguf"]
    assert missing_shards(names) == ["a/M-Q8_0-00002-of-00003.gguf"]
    assert missing_shards(["model-00002-of-00002.safetensors"]) == [
        "model-00001-of-00002.safetensors"
    ]


# --- listing and choosing ----------------------------------------------------------------------


def test_list_repo_has_sizes_hashes_and_commit(fake_hub: FakeHub) -> None:
    listing = hub.list_repo(TINY)
    repo = fake_hub.repos[TINY]
    assert listing.revision == repo.commit
    q8 = listing.get("Tiny-Q8_0.gguf")
    assert q8 is not None
    assert (q8.size, q8.sha256) == (repo.files["Tiny-Q8_0.gguf"].size, repo.files[q8.path].sha256)
    readme = listing.get("README.md")
    assert readme is not None and readme.sha256 is None and readme.blob_id


def test_explicit_quant_is_case_insensitive(fake_hub: FakeHub) -> None:
    sel = hub.select(hub.list_repo(TINY), quant="q6_k")
    assert (sel.variant, [f.path for f in sel.files]) == ("Q6_K", ["Tiny-Q6_K.gguf"])


def test_unknown_quant_lists_what_exists(fake_hub: FakeHub) -> None:
    with pytest.raises(hub.QuantNotFoundError, match=r"no Q5_K_M file.*Q4_K_M \("):
        hub.select(hub.list_repo(TINY), quant="Q5_K_M")


def _least_ram(size: int) -> int:
    """The least RAM on which serve's defaults run a file of `size` (shape estimated)."""
    lo, hi = 0, 64 * GIB
    while lo < hi:
        mid = (lo + hi) // 2
        if hub.Machine.for_serve(Hardware(mid, mid)).plan(None, size).fits:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_auto_picks_largest_that_fits_and_skips_mmproj(fake_hub: FakeHub) -> None:
    listing = hub.list_repo(TINY)
    q6 = listing.get("Tiny-Q6_K.gguf")
    assert q6 is not None
    ram = _least_ram(q6.size)  # a machine where Q6_K is the largest that fits
    sel = hub.select(listing, machine=hub.Machine.for_serve(Hardware(ram, ram)))
    assert sel.variant == "Q6_K"
    # these fake GGUFs have no attention shape in their header: the plan estimates it
    assert "largest that fits" in sel.reason and "estimated" in sel.reason
    variants = hub.gguf_variants(listing.files)  # smallest first, the projector left out
    assert [v.label for v in variants] == ["Q2_K", "Q4_K_M", "Q6_K", "Q8_0", "F16"]
    roomy = hub.Machine.for_serve(Hardware(64 * GIB, 64 * GIB))
    assert hub.select(listing, machine=roomy).variant == "F16"  # the least quantized


def test_auto_falls_back_to_the_default_quant(fake_hub: FakeHub) -> None:
    listing = hub.list_repo(TINY)
    unknown = hub.select(listing)  # no machine: its memory is unknown
    assert (unknown.variant, unknown.reason) == (
        "Q4_K_M",
        f"the default {hub.DEFAULT_QUANT}: this machine's memory is unknown",
    )
    tiny = hub.select(listing, machine=hub.Machine.for_serve(Hardware(1024, 1024)))
    assert tiny.variant == "Q4_K_M" and "none fits" in tiny.reason
    # a repo without Q4_K_M: its smallest complete file
    broken = hub.select(hub.list_repo("fake/Broken-GGUF"))
    assert broken.variant == "Q4_0" and "no Q4_K_M" in broken.reason


def test_split_gguf_selects_every_shard(fake_hub: FakeHub) -> None:
    sel = hub.select(hub.list_repo("fake/Split-GGUF"), quant="Q4_K_M")
    assert [f.path for f in sel.files] == [
        "Q4_K_M/Split-Q4_K_M-00001-of-00002.gguf",
        "Q4_K_M/Split-Q4_K_M-00002-of-00002.gguf",
    ]
    assert sel.main_file == sel.files[0].path
    named = hub.select(
        hub.list_repo("fake/Split-GGUF"), filename="Q4_K_M/Split-Q4_K_M-00002-of-00002.gguf"
    )
    assert named.files == sel.files  # naming one shard pulls the whole set


def test_missing_shard_in_listing(fake_hub: FakeHub) -> None:
    listing = hub.list_repo("fake/Broken-GGUF")
    with pytest.raises(hub.MissingShardError, match=r"in 3 files but shard\(s\) 2 are missing"):
        hub.select(listing, quant="Q8_0")
    roomy = hub.Machine.for_serve(Hardware(64 * GIB, 64 * GIB))
    assert hub.select(listing, machine=roomy).variant == "Q4_0"  # auto skips the broken set


def test_safetensors_repo_takes_weights_config_and_tokenizer_only(fake_hub: FakeHub) -> None:
    sel = hub.select(hub.list_repo("fake/Tiny-Llama"))
    assert sel.format == "safetensors"
    assert {f.path for f in sel.files} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    gptq = hub.select(hub.list_repo("fake/Tiny-Llama-GPTQ"))
    assert {f.path for f in gptq.files} == {
        "model.safetensors",
        "config.json",
        "quantize_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    with pytest.raises(hub.QuantNotFoundError, match="no GGUF files"):
        hub.select(hub.list_repo("fake/Tiny-Llama"), quant="Q4_K_M")


def test_unknown_repo_is_a_clear_error(fake_hub: FakeHub) -> None:
    with pytest.raises(hub.HubAccessError, match=r"repo fake/Nope not found.*HF_TOKEN"):
        hub.list_repo("fake/Nope")


def test_unreachable_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(hub.HubError, match=r"network error talking to http://127\.0\.0\.1"):
        hub.list_repo(TINY)


def test_stand_in_speaks_tree_and_resolve_to_the_real_client(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """The fake answers the client's other calls too (used by inspect/fit): tree, hf_hub_download."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=fake_hub.url)
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree("fake/Split-GGUF")}
    assert ("RepoFolder", "Q4_K_M") in top and ("RepoFile", "Split-Q2_K.gguf") in top
    deep = [
        e
        for e in api.list_repo_tree("fake/Split-GGUF", recursive=True)
        if e.path.endswith("00002-of-00002.gguf")
    ]
    assert [e.lfs.sha256 for e in deep] == [
        fake_hub.repos["fake/Split-GGUF"].files["Q4_K_M/Split-Q4_K_M-00002-of-00002.gguf"].sha256
    ]
    got = hf_hub_download(
        "fake/Tiny-GGUF", "Tiny-Q2_K.gguf", local_dir=tmp_path, endpoint=fake_hub.url
    )
    src = fake_hub.repos["fake/Tiny-GGUF"].files["Tiny-Q2_K.gguf"]
    assert Path(got).read_bytes() == src.read(0, src.size)
