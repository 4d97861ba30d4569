"""The Models panel end to end: real Chromium, a real server with two real models (the embedded
SmolLM2 and Gemma 3 270M from a --models-dir), and pulls from the local stand-in hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from innkeeper.models import store
from tests.helpers import ServerProcess, run_server
from tests.models.fakehub import BIG_KIB, KIB, FakeHub, build_repos, make_gguf
from tests.web.conftest import DESKTOP, PHONE, SHOTS, open_page
from tests.web.test_page import send

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MIB = 1024 * 1024
LOAD_TIMEOUT = 120_000  # ms: a model load on a shared 2-core machine
SLOW = "fake/Slow-GGUF"
SLOW_FILE = "Slow-Q8_0.gguf"
HOSTILE = "<img src=x onerror=window.__xss=1>-Q2_K"  # a file name is text, never markup


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    h = FakeHub()
    src = tmp_path_factory.mktemp("fakehub-src")
    build_repos(h, src)
    slow = make_gguf(src / SLOW_FILE, n_floats=BIG_KIB * KIB // 4, seed=98)
    h.add_repo(SLOW, {SLOW_FILE: slow, "README.md": b"# slow"})
    with h:
        yield h


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def models_server(
    hub: FakeHub, store_dir: Path, gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """SmolLM2 as the default, Gemma in a --models-dir, the stand-in hub, an empty store."""
    folder = tmp_path_factory.mktemp("models")
    (folder / gemma_path.name).symlink_to(gemma_path)
    tiny = hub.repos["fake/Tiny-GGUF"].files["Tiny-Q2_K.gguf"]
    (folder / f"{HOSTILE}.gguf").write_bytes(tiny.read(0, tiny.size))
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(store_dir.parent / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "",
        "INNKEEPER_MODELS": str(store_dir),
    }
    args = ("--ctx-size", "1024", "--parallel", "1", "--models-dir", str(folder))
    with run_server(*args, env=env, name="web-models") as srv:
        yield srv


@pytest.fixture()
def page(browser: Any, models_server: ServerProcess) -> Iterator[Any]:
    with open_page(
        browser, models_server.url + "/", "#models-panel:not([hidden]) .model-item"
    ) as pg:
        yield pg


@pytest.fixture(autouse=True)
def _clean_hub(hub: FakeHub) -> Iterator[None]:
    yield
    hub.reset_faults()
    hub.reset_counters()


def listed(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/api/innkeeper/models", timeout=30).json())


def item(pg: Any, model_id: str) -> Any:
    return pg.locator(f"#model-list .model-item[data-id='{model_id}']")


def watch_badges(pg: Any) -> None:
    """Record every text the status badges show, to prove the status is live."""
    pg.evaluate(
        """() => {
            window.__badges = [];
            new MutationObserver(() => {
                for (const b of document.querySelectorAll('#model-list .badge'))
                    window.__badges.push(b.closest('li').dataset.id + '=' + b.textContent);
            }).observe(document.querySelector('#model-list'),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )


def test_panel_lists_both_models_then_load_switches_the_answering_model(
    page: Any, models_server: ServerProcess, gemma_path: Path
) -> None:
    data = listed(models_server)
    ids = [m["id"] for m in data["models"]]
    smol = data["default"]
    [gemma] = [m for m in data["models"] if m["id"] == gemma_path.stem]
    assert "SmolLM2" in smol and len(ids) == 3 and HOSTILE in ids
    expect(page.locator("#model-list .model-item")).to_have_count(3)
    expect(item(page, smol).locator(".badge")).to_have_text("loaded")
    expect(item(page, smol).locator(".model-id")).to_have_text("★ " + smol)
    row = item(page, gemma["id"])
    expect(row.locator(".badge")).to_have_text("unloaded")
    facts = row.locator(".muted.small-text").first.inner_text()
    assert "GGUF" in facts and "Q4_K_M" in facts.upper() and "MB" in facts
    if gemma["plan"] and gemma["plan"].get("verdict"):
        assert "This machine" in row.inner_text()
    expect(page.locator("#st-default")).to_contain_text(smol)
    # The load form is prefilled from the entry's settings (the memory plan's defaults).
    row.locator(".load-settings summary").click()
    ctx = row.get_by_label("Context size")
    assert ctx.input_value() == str(gemma["settings"]["ctx_size"])
    assert row.get_by_label("Parallel slots").input_value() == str(gemma["settings"]["parallel"])
    assert row.get_by_label("KV cache type").input_value() == gemma["settings"]["cache_type_k"]
    ctx.fill("1024")
    page.screenshot(path=str(SHOTS / "20-models-panel.png"))
    watch_badges(page)
    row.get_by_role("button", name=f"Load {gemma['id']}").click()
    expect(row.locator(".badge")).to_have_text("loaded", timeout=LOAD_TIMEOUT)
    assert any(
        b.startswith(gemma["id"] + "=") and b.endswith(("loading", "working"))
        for b in page.evaluate("window.__badges")
    )
    expect(row.locator(".model-id")).to_have_text("★ " + gemma["id"])
    expect(page.locator("#st-default")).to_contain_text(gemma["id"])
    expect(page.locator("#st-model")).to_contain_text(gemma["id"], timeout=10_000)
    after = {m["id"]: m for m in listed(models_server)["models"]}
    assert after[gemma["id"]]["status"] == "loaded"
    assert after[gemma["id"]]["settings"]["ctx_size"] == 1024
    # The page's chat now goes to Gemma (requests without a model go to the default).
    send(page, "Say hello.", max_tokens=8)
    page.screenshot(path=str(SHOTS / "21-models-switched.png"))
    # Switch back, then unload the other one if the server kept it.
    item(page, smol).get_by_role("button", name=f"Load {smol}").click()
    expect(item(page, smol).locator(".badge")).to_have_text("loaded", timeout=LOAD_TIMEOUT)
    expect(page.locator("#st-default")).to_contain_text(smol)
    if row.get_by_role("button", name=f"Unload {gemma['id']}").is_visible():
        row.get_by_role("button", name=f"Unload {gemma['id']}").click()
    expect(row.locator(".badge")).to_have_text("unloaded", timeout=LOAD_TIMEOUT)
    # The embedded and folder models cannot be deleted from the page.
    assert not item(page, smol).get_by_role("button", name=f"Delete {smol} from the store").count()
    assert not row.locator("button:has-text('Delete')").is_visible()


def test_pull_shows_progress_then_the_model_can_be_deleted(
    page: Any, hub: FakeHub, models_server: ServerProcess, store_dir: Path
) -> None:
    hub.rates[hub.key("fake/Big-GGUF", "Big-Q8_0.gguf")] = 4 * MIB  # ~6 s for 24 MiB
    page.evaluate(
        """() => {
            window.__progress = [];
            new MutationObserver(() => window.__progress.push(
                Number(document.querySelector('#pull-bar').getAttribute('aria-valuenow'))))
            .observe(document.querySelector('#pull-bar'), {attributes: true});
        }"""
    )
    page.get_by_label("Pull from the hub").fill("fake/Big-GGUF:Q8_0")
    page.get_by_role("button", name="Pull", exact=True).click()
    page.wait_for_function(
        "(() => { const v = Number(document.querySelector('#pull-bar')"
        ".getAttribute('aria-valuenow')); return v > 0 && v < 100; })()",
        timeout=60_000,
    )
    page.screenshot(path=str(SHOTS / "22-pull-progress.png"))
    expect(page.locator("#pull-text")).to_have_text("Pulled Big:Q8_0", timeout=60_000)
    progress = page.evaluate("window.__progress")
    assert any(0 < p < 100 for p in progress) and progress[-1] == 100, progress
    assert progress == sorted(progress)
    row = item(page, "Big:Q8_0")
    expect(row).to_be_visible()
    expect(row.locator(".badge")).to_have_text("unloaded")
    assert any(e.name == "Big:Q8_0" and e.complete for e in store.list_models(store_dir))
    # Delete asks first; "Keep it" keeps it.
    delete = row.get_by_role("button", name="Delete Big:Q8_0 from the store")
    delete.click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("Big:Q8_0")
    page.screenshot(path=str(SHOTS / "23-delete-confirm.png"))
    page.click("#confirm-no")
    page.wait_for_timeout(300)
    expect(row).to_be_visible()
    delete.click()
    page.click("#confirm-yes")
    expect(row).to_have_count(0, timeout=30_000)
    assert not (store_dir / "fake__Big-GGUF").exists()
    assert all(e.name != "Big:Q8_0" for e in store.list_models(store_dir))


def test_cancel_stops_a_pull_and_keeps_it_resumable(
    page: Any, hub: FakeHub, models_server: ServerProcess, store_dir: Path
) -> None:
    hub.rates[hub.key(SLOW, SLOW_FILE)] = 2 * MIB  # ~12 s: the cancel lands mid-file
    page.set_viewport_size(PHONE)
    page.click("#toggle-right")
    page.get_by_label("Pull from the hub").fill(SLOW)
    page.get_by_role("button", name="Pull", exact=True).click()
    page.wait_for_function(
        "Number(document.querySelector('#pull-bar').getAttribute('aria-valuenow')) > 0",
        timeout=60_000,
    )
    page.locator("#pull-progress").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "24-pull-progress-phone.png"))
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#pull-text")).to_contain_text("Cancelled", timeout=30_000)
    expect(page.locator("#pull-cancel")).to_be_hidden()
    expect(page.locator("#pull-start")).to_be_enabled()
    page.screenshot(path=str(SHOTS / "25-pull-cancelled-phone.png"))
    variant = store_dir / "fake__Slow-GGUF" / "Q8_0"
    partial = [p for p in variant.iterdir() if p.name.endswith(store.PARTIAL_SUFFIX)]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < BIG_KIB * KIB
    assert not (variant / SLOW_FILE).exists()
    expect(item(page, "Slow:Q8_0")).to_have_count(0)
    # What the cancelled pull left can be deleted from the page (after confirming).
    page.get_by_role("button", name="Delete the partial download").click()
    expect(page.locator("#confirm-text")).to_contain_text("Slow:Q8_0")
    page.click("#confirm-yes")
    expect(page.locator("#pull-text")).to_contain_text("Deleted the partial download")
    assert not (store_dir / "fake__Slow-GGUF").exists()


def test_panel_controls_are_named_and_model_names_are_text(page: Any) -> None:
    page.locator("#model-list .load-settings summary").first.click()
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('#models-panel :is(button, input, select, textarea,'
                + ' [role=progressbar]), #confirm-dialog button')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby') && !(el.textContent || '').trim())
            .map(el => el.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []
    names = page.locator("#model-list .model-id").all_inner_texts()
    assert any(HOSTILE in n for n in names), names
    assert page.locator("#model-list img").count() == 0
    assert page.evaluate("window.__xss") is None


def test_admin_actions_ask_for_the_admin_key(browser: Any) -> None:
    """With --admin-key, Unload asks for the key once, then Load works without asking again."""
    args = ("--ctx-size", "1024", "--parallel", "1", "--admin-key", "adm1n-key")
    with run_server(*args, name="web-models-admin") as srv:
        context = browser.new_context(viewport=DESKTOP)
        pg = context.new_page()
        pg.goto(srv.url + "/")
        pg.wait_for_selector("#models-panel:not([hidden]) .model-item")
        smol = listed(srv)["default"]
        pg.get_by_role("button", name=f"Unload {smol}").click()
        pg.wait_for_selector("#key-dialog[open]")
        expect(pg.locator("#key-error")).to_contain_text("admin key")
        pg.fill("#key-input", "adm1n-key")
        pg.click("#key-ok")
        expect(item(pg, smol).locator(".badge")).to_have_text("unloaded", timeout=LOAD_TIMEOUT)
        pg.get_by_role("button", name=f"Load {smol}").click()
        expect(item(pg, smol).locator(".badge")).to_have_text("loaded", timeout=LOAD_TIMEOUT)
        assert not pg.is_visible("#key-dialog")
        context.close()


def test_panel_is_hidden_when_the_server_has_no_model_routes(
    browser: Any, models_server: ServerProcess
) -> None:
    """An older server answers 404 for /api/innkeeper/models: the page works without the panel."""
    context = browser.new_context(viewport=DESKTOP)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.route(
        "**/api/innkeeper/models",
        lambda route: route.fulfill(
            status=404, content_type="application/json", body='{"detail": "Not Found"}'
        ),
    )
    pg.goto(models_server.url + "/")
    pg.wait_for_selector("#st-model:has-text('SmolLM2')")
    pg.wait_for_timeout(500)
    assert not pg.is_visible("#models-panel")
    assert not pg.is_visible("#st-default")
    send(pg, "Hi!", max_tokens=4)
    context.close()
    assert not errors, errors


def test_the_load_form_takes_rpc_workers(browser: Any) -> None:
    """The form's RPC workers field loads across a real loopback worker; an endpoint the
    server may not reach on a client's word is refused with the server's reason."""
    from innkeeper.engine import rpc
    from tests.engine.test_rpc import run_worker
    from tests.helpers import free_port

    if not rpc.available():
        pytest.skip("this llama-cpp-python has no RPC backend")
    port = free_port()
    worker = f"127.0.0.1:{port}"
    with (
        run_worker(port),
        run_server("--ctx-size", "512", "--parallel", "1", name="web-models-rpc") as srv,
    ):
        smol = listed(srv)["default"]
        # Unloaded before the page opens: a page that sees it loaded previews the chat prompt,
        # and a preview already in flight when Unload is clicked loads the model again.
        unload = httpx.post(f"{srv.url}/api/innkeeper/models/unload", json={"model": smol})
        assert unload.status_code == 200, unload.text
        with open_page(browser, srv.url + "/", "#models-panel:not([hidden]) .model-item") as pg:
            row = item(pg, smol)
            expect(row.locator(".badge")).to_have_text("unloaded", timeout=LOAD_TIMEOUT)
            load = row.get_by_role("button", name=f"Load {smol}", exact=True)
            row.locator(".load-settings summary").click()
            field = row.get_by_label("RPC workers")
            assert field.input_value() == ""  # serve's own: none
            assert row.get_by_label("GPU layers").input_value() == "0"  # no GPU here
            field.fill("10.0.0.1:50052")
            assert row.get_by_label("GPU layers").input_value() == ""  # auto: the plan's split
            load.click()
            expect(pg.locator("#toast")).to_contain_text("not on loopback")
            # The refused load left the model unloaded, and the page's own reads (its prompt
            # preview) did not load it behind the user's back: the page says so, and so does the
            # server.
            expect(pg.locator("#raw-kind")).to_contain_text("not loaded")
            expect(row.locator(".badge")).to_have_text("unloaded")
            assert next(m for m in listed(srv)["models"] if m["id"] == smol)["status"] == "unloaded"
            field.fill("http://x:1")  # the browser's own check, before any request
            load.click()
            expect(row.locator(".error")).to_contain_text("RPC workers")
            field.fill(worker)
            load.click()
            expect(pg.locator("#toast")).to_contain_text("is loaded", timeout=LOAD_TIMEOUT)
            entry = next(m for m in listed(srv)["models"] if m["id"] == smol)
            assert entry["settings"]["rpc"] == [worker] and entry["status"] == "loaded"
            assert any(
                d["name"] == f"GPU 0: RPC {worker}" and d["layers"] > 0
                for d in entry["plan"]["devices"]
            )
