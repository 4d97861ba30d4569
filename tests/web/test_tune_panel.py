"""The Models panel's Tune, end to end: real Chromium, a real server, a real (tiny) tune.

The page asks for the default budget; the test shrinks each tune request on its way (budget
and prompt), so the run is short on a shared CPU while the page, routes and tune are real.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.helpers import ServerProcess, run_server
from tests.web.conftest import SHOTS, open_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct.Q4_1"
TUNE_TIMEOUT = 120_000  # ms


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config")


@pytest.fixture(scope="module")
def tune_server(config_dir: Path) -> Iterator[ServerProcess]:
    env = {"INNKEEPER_CONFIG": str(config_dir)}
    with run_server("--ctx-size", "512", "--parallel", "1", env=env, name="web-tune") as srv:
        yield srv


def _shrink(route: Any) -> None:
    """Let the page's tune request through with a tiny budget and prompt."""
    body = json.loads(route.request.post_data or "{}")
    body.update(budget_s=5, prompt_tokens=16, gen_tokens=4)
    route.continue_(post_data=json.dumps(body))


def test_tune_from_the_models_panel(
    browser: Any, tune_server: ServerProcess, config_dir: Path
) -> None:
    with open_page(browser, tune_server.url, f"li.model-item[data-id='{MODEL}']") as page:
        page.route("**/api/innkeeper/tune", _shrink)
        item = page.locator(f"li.model-item[data-id='{MODEL}']")
        status = item.locator(".tune-status")
        expect(status).to_have_text("")  # not tuned yet
        item.get_by_role("button", name=f"Tune {MODEL}").click()
        expect(item.get_by_role("progressbar", name=f"Tuning {MODEL}")).to_be_visible()
        expect(status).to_contain_text("Tuning…")
        page.screenshot(path=str(SHOTS / "tune-running.png"))
        # a tiny budget measures serve's defaults only (or, at most, a winner with its flags)
        expect(status).to_contain_text("Tuned: ", timeout=TUNE_TIMEOUT)
        expect(status).to_have_text(
            re.compile(r"Tuned: (serve's defaults are the fastest here|.+ \(used when serve.*)")
        )
        expect(item.get_by_role("progressbar", name=f"Tuning {MODEL}")).to_be_hidden()
        expect(item.get_by_role("button", name=f"Tune {MODEL}")).to_be_enabled()
        page.screenshot(path=str(SHOTS / "tune-done.png"))
    assert len(list((config_dir / "profiles").glob("*.json"))) == 1
