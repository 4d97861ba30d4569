"""The built-in chat page, end to end: real Chromium, real server, real SmolLM2 replies."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from playwright.sync_api import expect

from tests.helpers import ServerProcess, run_server
from tests.web.conftest import DESKTOP, PHONE, SHOTS, open_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPLY_TIMEOUT = 30_000  # ms; the machine is shared, so be generous


@pytest.fixture()
def page(browser: Any, web_server: ServerProcess) -> Iterator[Any]:
    """A fresh browser profile (empty storage) with the page loaded and the server status shown."""
    with open_page(browser, web_server.url + "/", "#st-model:has-text('SmolLM2')") as pg:
        yield pg


def shot(pg: Any, name: str, phone: bool = False) -> Path:
    path = SHOTS / f"{name}{'-phone' if phone else ''}.png"
    if phone:
        pg.set_viewport_size(PHONE)
        pg.wait_for_timeout(250)  # the drawers' transition
    pg.screenshot(path=str(path))
    if phone:
        pg.set_viewport_size(DESKTOP)
    return path


def set_field(pg: Any, selector: str, value: str) -> None:
    pg.fill(selector, value)
    pg.dispatch_event(selector, "change")


def replies(pg: Any) -> int:
    """How many replies the page has finished and saved (it counts them on <body>)."""
    return int(pg.evaluate("document.body.dataset.generated || '0'"))


def click_and_wait(pg: Any, selector: str) -> None:
    before = replies(pg)
    pg.click(selector)
    wait_reply(pg, before)


def wait_reply(pg: Any, before: int) -> None:
    pg.wait_for_function(
        f"Number(document.body.dataset.generated || 0) > {before}", timeout=REPLY_TIMEOUT
    )
    assert pg.is_visible("#send") and not pg.is_visible("#stop")


def send(pg: Any, text: str, max_tokens: int = 24, wait: bool = True) -> None:
    set_field(pg, "#max_tokens", str(max_tokens))
    pg.fill("#input", text)
    before = replies(pg)
    pg.press("#input", "Enter")
    if wait:
        wait_reply(pg, before)


def last_reply(pg: Any) -> str:
    return pg.inner_text("#log .msg.assistant:last-child .text")


def perf(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(server.url + "/api/extra/perf", timeout=10).json()


def test_page_shows_the_model_and_server_state(page: Any, web_server: ServerProcess) -> None:
    status = httpx.get(web_server.url + "/api/innkeeper/status", timeout=10).json()
    model_id = status["model"]["id"]
    assert page.inner_text("#model-name") == model_id
    assert "Q4_1" in page.inner_text("#st-format")
    assert "2048" in page.inner_text("#st-ctx")
    assert page.inner_text("#st-threads").startswith(str(status["settings"]["threads"]))
    assert "of 2" in page.inner_text("#st-slots")
    plan = status["memory_plan"]
    memory = page.inner_text("#st-memory")
    if plan is None:
        assert memory == "not computed"
    else:
        assert "total" in memory and plan["verdict"] in memory
    page.wait_for_selector("#health.ok")
    # The default assistant greets, and the context bar counts the prompt the server rendered.
    assert "How can I help" in page.inner_text("#log")
    page.wait_for_function("document.querySelector('#ctx-text').textContent.includes('/ 2048')")
    shot(page, "01-loaded")
    shot(page, "01-loaded", phone=True)
    page.emulate_media(color_scheme="dark")
    shot(page, "01-loaded-dark")
    page.emulate_media(color_scheme="light")
    page.click("#connect-panel summary")
    urls = page.locator("#connect-list code").all_inner_texts()
    assert urls == [web_server.url, web_server.url, web_server.url + "/v1", web_server.url + "/api"]
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#connect-list button[aria-label='Copy the OpenAI-compatible URL']")
    assert page.evaluate("navigator.clipboard.readText()") == web_server.url + "/v1"
    page.set_viewport_size(PHONE)
    page.click("#toggle-right")
    expect(page.locator("#toggle-right")).to_have_attribute("aria-expanded", "true")
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / "01-settings-drawer-phone.png"))


def test_page_scripts_are_served_as_javascript_modules(web_server: ServerProcess) -> None:
    """A browser runs a module script only with a JavaScript type: the entry module and every
    module it imports, followed through the imports, answer 200 as JavaScript, and together
    they are every script the package ships."""
    index = httpx.get(web_server.url + "/").text
    todo = re.findall(r'<script type="module" src="([^"]+)"></script>', index)
    assert todo == ["/static/app.js"]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        r = httpx.get(web_server.url + path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/javascript"), (path, r.headers)
        todo += [urljoin(path, m) for m in re.findall(r'^import .* from "([^"]+)";$', r.text, re.M)]
    static = files("innkeeper") / "web" / "static"
    shipped = {f"/static/{f.name}" for f in static.iterdir() if f.name.endswith(".js")}
    assert seen == shipped


def test_every_control_has_an_accessible_name(page: Any) -> None:
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, select, textarea, [role=progressbar]')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby') && !(el.textContent || '').trim())
            .map(el => el.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []


def test_reply_streams_into_the_page(page: Any) -> None:
    # Shift+Enter is a new line, not a send.
    page.fill("#input", "Write a short poem about the sea.")
    page.press("#input", "Shift+Enter")
    page.type("#input", "Four lines.")
    assert page.input_value("#input") == "Write a short poem about the sea.\nFour lines."
    assert page.locator("#log .msg.user").count() == 0
    # Record every state of the streaming message: several growing texts prove streaming.
    page.evaluate(
        """() => {
            window.__seen = [];
            new MutationObserver(() => {
                const el = document.querySelector('.msg.streaming .text');
                if (el) window.__seen.push(el.textContent);
            }).observe(document.querySelector('#log'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    send(page, page.input_value("#input"), max_tokens=32)
    seen = [s for s in page.evaluate("window.__seen") if s]
    final = last_reply(page)
    assert final.strip()
    assert len(set(seen)) >= 3, f"the reply did not stream: {seen[:5]}"
    assert all(final.startswith(s.strip()[:10]) for s in seen), (
        "streamed text is not a prefix of the reply"
    )
    assert "Four lines." in page.inner_text("#log .msg.user")
    assert "tok/s" in page.inner_text("#log .msg.assistant:last-child .meta")
    assert "tok/s" in page.inner_text("#st-tps")
    shot(page, "02-streamed")


def test_stop_frees_the_backend(page: Any, web_server: ServerProcess) -> None:
    before = replies(page)
    send(page, "Tell me a very long story about a dragon and a knight.", 1500, wait=False)
    page.wait_for_function(
        "(document.querySelector('.msg.streaming .text')?.textContent || '').length > 20",
        timeout=REPLY_TIMEOUT,
    )
    shot(page, "03-streaming")
    page.click("#stop")
    wait_reply(page, before)
    assert "stopped" in page.inner_text("#log .msg.assistant:last-child .meta")
    deadline = time.monotonic() + 5
    while (p := perf(web_server))["busy_slots"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p["busy_slots"] == 0 and p["queue"] == 0
    assert p["last_token_count"] < 1500
    stopped_text = last_reply(page)
    # The freed slot serves the next message to the end.
    send(page, "Say hello.", max_tokens=16)
    assert page.locator("#log .msg.assistant").count() == 3
    meta = page.inner_text("#log .msg.assistant:last-child .meta")
    assert "tok/s" in meta and "stopped" not in meta
    assert stopped_text.strip() and last_reply(page).strip()
    assert perf(web_server)["busy_slots"] == 0
    shot(page, "04-after-stop")


def test_regenerate_swipe_edit_and_continue(page: Any) -> None:
    send(page, "Name three colours.", max_tokens=12)
    first = last_reply(page)
    click_and_wait(page, "#regen")
    assert page.inner_text("#log .msg.assistant:last-child .swipe-count") == "2/2"
    page.click("#log .msg.assistant:last-child [aria-label='Previous reply']")
    expect(page.locator("#log .msg.assistant:last-child .swipe-count")).to_have_text("1/2")
    assert last_reply(page) == first
    # Edit the last message, then continue it: the new text extends the edit.
    page.click("#log .msg.assistant:last-child [aria-label^='Edit']")
    page.fill("#log .edit-box", "Red, green and")
    page.click("#log .msg.assistant:last-child button:has-text('Save')")
    expect(page.locator("#log .msg.assistant:last-child .text")).to_have_text("Red, green and")
    set_field(page, "#max_tokens", "8")
    click_and_wait(page, "#continue")
    continued = last_reply(page)
    assert continued.startswith("Red, green and") and len(continued) > len("Red, green and")
    shot(page, "05-swipe-edit-continue")


def make_card_png(path: Path, card: dict[str, Any]) -> None:
    img = Image.new("RGB", (96, 96), (40, 90, 160))
    for x in range(20, 76):
        for y in range(30, 66):
            img.putpixel((x, y), (235, 170, 60))
    info = PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card).encode()).decode())
    img.save(path, pnginfo=info)


def test_import_v2_png_card(page: Any, tmp_path: Path) -> None:
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Captain Mira",
            "description": "{{char}} is a cheerful pirate captain who calls {{user}} 'matey'.",
            "personality": "bold, kind",
            "scenario": "",
            "first_mes": "Ahoy, {{user}}! I am {{char}}, captain of the Gull.",
            "mes_example": "",
            "alternate_greetings": ["Back again, {{user}}?"],
        },
    }
    png = tmp_path / "mira.png"
    make_card_png(png, card)
    set_field(page, "#user-name", "Tess")
    page.set_input_files("#card-file", str(png))
    page.wait_for_selector("#char-name:has-text('Captain Mira')")
    first = page.inner_text("#log .msg.assistant:first-child .text")
    assert first == "Ahoy, Tess! I am Captain Mira, captain of the Gull."
    assert page.inner_text("#log .msg.assistant:first-child .swipe-count") == "1/2"
    assert page.get_attribute("#char-avatar", "src").startswith("data:image/png;base64,")
    assert page.is_visible("#char-avatar")
    page.click("#char-details summary")
    assert "Captain Mira is a cheerful pirate captain who calls Tess" in page.inner_text(
        "#char-description"
    )
    assert "{{" not in page.inner_text("#log")
    # The character and the default assistant are both listed; the card's chat is separate.
    assert page.locator("#char-list .label").all_inner_texts() == ["Assistant", "Captain Mira"]
    # The card's description reaches the prompt, macros replaced.
    page.check("#show-raw")
    page.wait_for_function(
        "document.querySelector('#raw-prompt').textContent.includes('cheerful pirate captain')"
    )
    assert "Write Captain Mira's next reply" in page.inner_text("#raw-prompt")
    shot(page, "06-card")
    page.set_viewport_size(PHONE)
    page.click("#toggle-left")
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / "06-card-drawer-phone.png"))
    page.click("#backdrop", position={"x": 370, "y": 400})
    page.set_viewport_size(DESKTOP)
    shot(page, "06-card", phone=True)

    # A plain-JSON V3 card, and a file that is no card at all.
    v3 = {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {"name": "Vex", "first_mes": "Hm, {{user}}. <img src=x onerror=alert(1)> *waves*"},
    }
    page.set_input_files(
        "#card-file",
        files=[
            {"name": "vex.json", "mimeType": "application/json", "buffer": json.dumps(v3).encode()}
        ],
    )
    page.wait_for_selector("#char-name:has-text('Vex')")
    # Card text is shown as text (markup escaped), with *actions* in italics.
    first = page.locator("#log .msg.assistant:first-child .text")
    expect(first).to_have_text("Hm, Tess. <img src=x onerror=alert(1)> waves")
    assert first.locator("img").count() == 0 and first.locator("em").inner_text() == "waves"
    page.set_input_files(
        "#card-file", files=[{"name": "x.png", "mimeType": "image/png", "buffer": b"not a png"}]
    )
    page.wait_for_selector("#toast:visible")
    assert "Cannot import x.png" in page.inner_text("#toast")


def test_template_switch_changes_the_raw_prompt(page: Any) -> None:
    page.check("#show-raw")
    page.wait_for_function(
        "document.querySelector('#raw-prompt').textContent.includes('<|im_start|>')"
    )
    page.select_option("#template", "alpaca")
    page.wait_for_function(
        "document.querySelector('#raw-prompt').textContent.includes('### Response:')"
    )
    assert "<|im_start|>" not in page.inner_text("#raw-prompt")
    shot(page, "07-raw-alpaca")
    send(page, "Hi there", max_tokens=8)
    assert "sent" in page.inner_text("#raw-kind")
    raw = page.inner_text("#raw-prompt")
    assert "### Instruction:\nHi there" in raw and raw.rstrip().endswith("### Response:")
    page.select_option("#template", "llama3")
    page.wait_for_function(
        "document.querySelector('#raw-prompt').textContent.includes('<|start_header_id|>')"
    )


def test_chat_survives_a_reload_and_exports(page: Any) -> None:
    send(page, "Remember the word pineapple.", max_tokens=12)
    reply = last_reply(page)
    page.select_option("#template", "chatml")
    page.reload()
    page.wait_for_selector("#st-model:has-text('SmolLM2')")
    page.wait_for_selector("#log .msg.user:has-text('pineapple')")
    assert last_reply(page) == reply
    expect(page.locator("#template")).to_have_value("chatml")
    assert page.input_value("#max_tokens") == "12"
    shot(page, "08-reloaded")
    with page.expect_download() as dl:
        page.click("#export-chat")
    data = json.loads(Path(dl.value.path()).read_text())
    assert data["app"] == "innkeeper"
    assert [m["role"] for m in data["messages"]] == ["assistant", "user", "assistant"]
    assert data["messages"][1]["content"] == "Remember the word pineapple."
    with page.expect_download() as dl:
        page.click("#export-all")
    backup_path = Path(dl.value.path())
    backup = json.loads(backup_path.read_text())
    assert len(backup["chats"]) == 1 and backup["characters"] == []
    # The backup restores into an empty browser profile.
    other = page.context.browser.new_context(viewport=DESKTOP)
    fresh = other.new_page()
    fresh.goto(page.url)
    fresh.wait_for_selector("#st-model:has-text('SmolLM2')")
    assert "pineapple" not in fresh.inner_text("#chat-list")
    fresh.set_input_files("#card-file", str(backup_path))
    fresh.click("#chat-list button:has-text('pineapple')")
    fresh.wait_for_selector("#log .msg.user:has-text('pineapple')")
    assert last_reply(fresh) == reply
    other.close()


def test_api_key_is_asked_once_per_session(browser: Any) -> None:
    with run_server("--api-key", "s3cret-key", "--ctx-size", "1024", name="web-auth") as srv:
        context = browser.new_context(viewport=DESKTOP)
        pg = context.new_page()
        pg.goto(srv.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        shot(pg, "09-key-dialog")
        pg.fill("#key-input", "wrong")
        pg.click("#key-ok")
        pg.wait_for_selector("#key-dialog[open] #key-error:has-text('refused')")
        pg.fill("#key-input", "s3cret-key")
        pg.click("#key-ok")
        pg.wait_for_selector("#st-model:has-text('SmolLM2')")
        assert pg.evaluate("sessionStorage.getItem('innkeeper.apiKey')") == "s3cret-key"
        send(pg, "Hello!", max_tokens=8)
        assert "tok/s" in pg.inner_text("#log .msg.assistant:last-child .meta")
        pg.reload()
        pg.wait_for_selector("#st-model:has-text('SmolLM2')")
        assert not pg.is_visible("#key-dialog")
        context.close()
