"""The chat page with a model that can see: attach an image, send it as an image_url part."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServerProcess, run_server
from tests.models.vision_factory import write_pair
from tests.web.conftest import open_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny vision pair, the projector paired by the file beside the model."""
    model, _ = write_pair(tmp_path_factory.mktemp("vision-web"))
    with run_server(str(model), "--ctx-size", "1024", name="vision-web") as srv:
        yield srv


def png_file(folder: Path) -> Path:
    rgb = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = folder / "photo.png"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_an_image_is_attached_and_sent_as_an_image_url_part(
    browser: Any, vision_server: ServerProcess, tmp_path: Path
) -> None:
    with open_page(browser, vision_server.url + "/", "#attach") as pg:  # shown: it can see
        pg.fill("#max_tokens", "4")
        pg.dispatch_event("#max_tokens", "change")
        pg.set_input_files("#attach-file", str(png_file(tmp_path)))
        pg.wait_for_selector("#attachments .thumb img")
        pg.fill("#input", "What is in the picture?")
        with pg.expect_request("**/v1/chat/completions") as req:
            pg.press("#input", "Enter")
        body = json.loads(req.value.post_data or "{}")
        user = [m for m in body["messages"] if m["role"] == "user"][-1]
        assert user["content"][0] == {"type": "text", "text": "What is in the picture?"}
        url = user["content"][1]["image_url"]["url"]
        assert user["content"][1]["type"] == "image_url" and url.startswith(
            "data:image/png;base64,"
        )
        pg.wait_for_function("Number(document.body.dataset.generated || 0) > 0", timeout=30_000)
        assert pg.is_hidden("#attachments")  # sent: the composer is empty again
        assert pg.locator("#log .msg.user .attachments img").count() == 1
        meta = pg.locator("#log .msg.assistant .meta").last.inner_text()
        assert meta and "failed" not in meta, meta


def test_a_text_model_offers_no_image_button(browser: Any, web_server: ServerProcess) -> None:
    with open_page(browser, web_server.url + "/", "#st-model:has-text('SmolLM2')") as pg:
        pg.wait_for_timeout(500)  # /props answered
        assert pg.is_hidden("#attach")
