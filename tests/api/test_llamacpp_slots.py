"""llama-server's slot files: POST /slots/{id}?action=save|restore|erase with --slot-save-path."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import run_server

pytestmark = pytest.mark.slow  # starts a real server

PROMPT = "The old lighthouse keeper climbed the stairs every evening and"
GREEDY = {"temperature": 0, "top_k": 1, "ignore_eos": True, "return_tokens": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def client(folder: Path) -> Iterator[httpx.Client]:
    with (
        run_server(
            "--ctx-size", "1024", "--parallel", "1", "--slot-save-path", str(folder), name="slots"
        ) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        yield c


def complete(client: httpx.Client, prompt: Any, n: int) -> dict[str, Any]:
    r = client.post("/completion", json={"prompt": prompt, "n_predict": n, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()


def action(client: httpx.Client, name: str, filename: str | None = None) -> httpx.Response:
    if filename is None:
        return client.post(f"/slots/0?action={name}")
    # json.dumps escapes a lone surrogate, which httpx's own encoder cannot send
    body = json.dumps({"filename": filename})
    return client.post(
        f"/slots/0?action={name}", content=body, headers={"content-type": "application/json"}
    )


def test_restore_continues_like_the_uninterrupted_run(client: httpx.Client, folder: Path) -> None:
    ids = client.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    whole = complete(client, PROMPT, 24)["tokens"]
    head = complete(client, PROMPT, 12)["tokens"]
    assert head == whole[:12]

    saved = action(client, "save", "story.bin")
    assert saved.status_code == 200, saved.text
    s = saved.json()
    # the slot holds the prompt and every generated token but the last (never decoded)
    assert (s["id_slot"], s["filename"], s["n_saved"]) == (0, "story.bin", len(ids) + 11)
    assert s["n_written"] == (folder / "story.bin").stat().st_size > 0

    erased = action(client, "erase").json()
    assert erased == {"id_slot": 0, "n_erased": len(ids) + 11}
    complete(client, "Something else entirely.", 4)  # the slot now holds another prompt

    restored = action(client, "restore", "story.bin")
    assert restored.status_code == 200, restored.text
    assert restored.json()["n_restored"] == len(ids) + 11
    slot = client.get("/slots").json()[0]
    assert slot["n_cached"] == len(ids) + 11 and slot["is_processing"] is False

    tail = complete(client, ids + head, 12)
    assert tail["tokens_cached"] == len(ids) + 11  # the restored cache was used
    assert tail["tokens"] == whole[12:]


def test_restore_refuses_another_models_file(client: httpx.Client, folder: Path) -> None:
    complete(client, PROMPT, 2)
    assert action(client, "save", "mine.bin").status_code == 200
    sidecar = folder / "mine.bin.innkeeper.json"
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "model": "renamed.gguf"}))
    assert action(client, "restore", "mine.bin").status_code == 200  # a rename is no matter
    record = {**record, "model": "other-model.gguf", "n_params": record["n_params"] + 1}
    sidecar.write_text(json.dumps(record))
    r = action(client, "restore", "mine.bin")
    assert r.status_code == 400
    assert "other-model.gguf" in r.json()["error"]["message"]
    sidecar.write_text("[1, 2]")
    assert action(client, "restore", "mine.bin").status_code == 400
    (folder / "junk.bin").write_bytes(b"not a slot file" * 10)
    r = action(client, "restore", "junk.bin")
    assert r.status_code == 400, r.text
    assert complete(client, PROMPT, 2)["stop"] is True  # the slot still works


@pytest.mark.parametrize(
    "name",
    [
        "../escape.bin",
        "/etc/passwd",
        "a/b.bin",
        "..",
        ".hidden",
        "a\x00b",
        "a\\b",
        "",
        "x" * 250,
        "a.bin.innkeeper.json",
        "lone\ud800surrogate",
    ],
)
def test_file_names_stay_in_the_folder(client: httpx.Client, folder: Path, name: str) -> None:
    for act in ("save", "restore"):
        r = action(client, act, name)
        assert r.status_code == 400, (act, r.text)
        assert r.json()["error"]["code"] == 400
    assert not (folder.parent / "escape.bin").exists()


def test_unknown_slot_and_action(client: httpx.Client) -> None:
    assert client.post("/slots/7?action=erase").status_code == 404
    assert client.post("/slots/0?action=explode").status_code == 400
    assert client.post("/slots/0?action=restore", json={"filename": "none.bin"}).status_code == 404


def test_busy_slot_is_a_conflict(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "n_predict": 400, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=str(client.base_url), timeout=60) as other,
        other.stream("POST", "/completion", json=body) as r,
    ):
        lines = r.iter_lines()  # held: a generator dropped by `break` closes the connection
        while not next(lines).startswith("data: {"):
            pass  # generating once the first token is out
        for name, filename in (("save", "busy.bin"), ("erase", None)):
            answer = action(client, name, filename)
            assert answer.status_code == 409, answer.text
            assert "processing" in answer.json()["error"]["message"]
    deadline = time.monotonic() + 10  # the closed stream frees the slot
    while client.get("/slots").json()[0]["is_processing"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert action(client, "erase").status_code == 200


def test_slot_actions_follow_the_origin_rule(client: httpx.Client) -> None:
    """Not admin actions (the API key suffices), but a foreign page may not erase a slot."""
    r = client.post("/slots/0?action=erase", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    ok = client.post("/slots/0?action=erase", headers={"Origin": str(client.base_url)})
    assert ok.status_code == 200
