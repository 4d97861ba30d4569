"""Images over HTTP: OpenAI chat `image_url` parts on a real server with the tiny vision pair."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServerProcess, run_server
from tests.models.vision_factory import write_pair

pytestmark = pytest.mark.slow  # starts servers

GREEDY = {"temperature": 0, "max_tokens": 8}


def png(seed: int, w: int = 40, h: int = 30) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def chat(*urls: str, text: str = "What is this?") -> dict:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}], **GREEDY}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("vision-api"))


@pytest.fixture(scope="module")
def vision_server(pair: tuple[Path, Path]) -> Iterator[ServerProcess]:
    """The text model with its projector given by --mmproj, two images at most."""
    args = ("--mmproj", str(pair[1]), "--ctx-size", "1024", "--parallel", "2")
    with run_server(str(pair[0]), *args, "--max-images", "2", name="vision") as srv:
        yield srv


@pytest.fixture()
def vc(vision_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vision_server.url, timeout=60) as c:
        yield c


def test_image_chat_is_deterministic_and_depends_on_the_image(vc: httpx.Client) -> None:
    a = vc.post("/v1/chat/completions", json=chat(data_uri(png(1))))
    assert a.status_code == 200, a.text
    again = vc.post("/v1/chat/completions", json=chat(data_uri(png(1))))
    other = vc.post("/v1/chat/completions", json=chat(data_uri(png(2))))
    text = a.json()["choices"][0]["message"]["content"]
    assert again.json()["choices"][0]["message"]["content"] == text
    assert other.json()["choices"][0]["message"]["content"] != text
    # The second identical request found the image in a slot's cache.
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 16


def test_props_and_models_report_vision(vc: httpx.Client) -> None:
    assert vc.get("/props").json()["modalities"]["vision"] is True
    card = vc.get("/v1/models").json()["data"][0]
    assert "multimodal" in card["capabilities"]


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("https://example.com/cat.png", 400, "remote image URLs"),
        ("data:image/png;base64,@@@not-base64@@@", 400, "base64"),
        (data_uri(b"this is not an image"), 400, "not a readable image"),
        ("data:image/png,rawtext", 400, "base64"),
    ],
)
def test_bad_images_are_client_errors(vc: httpx.Client, url: str, status: int, words: str) -> None:
    r = vc.post("/v1/chat/completions", json=chat(url))
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_too_many_images_names_the_limit(vc: httpx.Client) -> None:
    uri = data_uri(png(3))
    r = vc.post("/v1/chat/completions", json=chat(uri, uri, uri))
    assert r.status_code == 413, r.text
    assert "--max-images" in r.json()["error"]["message"]


def test_too_many_pixels_names_the_limit(vc: httpx.Client) -> None:
    big = Image.new("RGB", (5000, 4000))  # 20 MP > the 16 MP default; compresses to ~60 KB
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = vc.post("/v1/chat/completions", json=chat(data_uri(buf.getvalue())))
    assert r.status_code == 413, r.text
    assert "--max-image-pixels" in r.json()["error"]["message"]


def test_a_50_mb_body_is_refused(vc: httpx.Client) -> None:
    blob = base64.b64encode(b"\0" * (50 * 2**20 // 4 * 3)).decode()
    r = vc.post("/v1/chat/completions", json=chat(f"data:image/png;base64,{blob}"))
    assert r.status_code == 413


def test_text_only_chat_still_works(vc: httpx.Client) -> None:
    r = vc.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **GREEDY}
    )
    assert r.status_code == 200, r.text


def test_images_to_a_model_without_projector(client: httpx.Client) -> None:
    """The session's SmolLM2 server has no projector: a 400 in OpenAI's shape says so."""
    r = client.post("/v1/chat/completions", json=chat(data_uri(png(1))))
    assert r.status_code == 400, r.text
    assert "vision projector" in r.json()["error"]["message"]


def b64png(seed: int) -> str:
    return base64.b64encode(png(seed)).decode()


def test_completion_image_data_and_img_tags(vc: httpx.Client) -> None:
    """llama-server's `image_data` (SillyTavern's captioning): `[img-ID]` places an image; one
    the prompt does not name goes first, so both spellings below are the same prompt."""
    base = {"temperature": 0, "top_k": 1, "n_predict": 8}
    tagged = vc.post(
        "/completion",
        json={
            "prompt": "[img-7]Describe it.",
            "image_data": [{"data": b64png(4), "id": 7}],
            **base,
        },
    )
    assert tagged.status_code == 200, tagged.text
    unnamed = vc.post(
        "/completion",
        json={"prompt": "Describe it.", "image_data": [{"data": b64png(4), "id": 1}], **base},
    )
    assert unnamed.json()["content"] == tagged.json()["content"]
    other = vc.post(
        "/completion",
        json={
            "prompt": "[img-7]Describe it.",
            "image_data": [{"data": b64png(5), "id": 7}],
            **base,
        },
    )
    assert other.json()["content"] != tagged.json()["content"]
    missing = vc.post(
        "/completion",
        json={
            "prompt": "[img-3]Describe it.",
            "image_data": [{"data": b64png(4), "id": 7}],
            **base,
        },
    )
    assert missing.status_code == 400 and "img-3" in missing.json()["error"]["message"]


def test_ollama_and_kobold_images_match_completion(vc: httpx.Client) -> None:
    """The same raw prompt with the same image gives the same greedy text in every family."""
    native = vc.post(
        "/completion",
        json={
            "prompt": "Describe it.",
            "image_data": [{"data": b64png(6), "id": 0}],
            "temperature": 0,
            "top_k": 1,
            "n_predict": 8,
        },
    ).json()["content"]
    ollama = vc.post(
        "/api/generate",
        json={
            "model": "tiny-vision",
            "prompt": "Describe it.",
            "images": [b64png(6)],
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "top_k": 1, "num_predict": 8},
        },
    )
    assert ollama.status_code == 200, ollama.text
    assert ollama.json()["response"] == native
    kobold = vc.post(
        "/api/v1/generate",
        json={
            "prompt": "Describe it.",
            "images": [b64png(6)],
            "temperature": 0,
            "top_k": 1,
            "rep_pen": 1.0,
            "max_length": 8,
        },
    )
    assert kobold.status_code == 200, kobold.text
    assert kobold.json()["results"][0]["text"] == native
    assert vc.get("/api/extra/version").json()["vision"] is True


def test_the_models_list_says_which_model_can_see(vc: httpx.Client) -> None:
    """The Models panel shows "vision" from this field."""
    models = vc.get("/api/innkeeper/models").json()["models"]
    assert [m["vision"] for m in models if m["is_default"]] == [True]
    plan = next(m for m in models if m["is_default"])["plan"]  # serve's plan counts it too
    assert any("mmproj-tiny-vision.gguf" in n for n in plan["notes"]), plan["notes"]
