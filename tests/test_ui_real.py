"""The /ui page in a real headless Chromium (Debian's ``chromium``, driven by Playwright; never
``playwright install``), against a live proxy with the embedded models and the real llama.cpp worker on
SmolLM2. Nothing is mocked; every wait is Playwright's ``expect`` with a generous timeout.

A screenshot goes to the test's tmp_path; with ``UI_SCREENSHOT=1`` also to docs/ui.png (the README's).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from tests.harness import REPO, LiveProxy, running, smollm2_config
from tests.test_ops import KEYS

pytestmark = pytest.mark.real

MODEL = "smollm2:135m"
LOAD_TIMEOUT = 180_000  # ms: a loaded 2-core box
UI_TIMEOUT = 30_000
RATE = re.compile(r"^\d+\.\d$")  # tokens/s, one decimal
HTTP_4XX = re.compile(r"^Failed to load resource: the server responded with a status of 40[13] ")


def embedded_models() -> list[dict[str, Any]]:
    """The shipped configs/ (SmolLM2 with the tests' smaller context, Piper's joe voice, Whisper base)."""
    others = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))]
    return [smollm2_config(), *(c for c in others if c["name"] != MODEL)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: scripts/setup.sh --test installs it (apt-get install chromium)")
    expect.set_options(timeout=UI_TIMEOUT)  # a loaded 2-core box
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


class Watched:
    """A page, with every request it made and every error it logged (CSP violations are console errors)."""

    def __init__(self, browser: Browser, proxy: LiveProxy) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(_url(r)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.proxy = proxy

    def open(self) -> Page:
        response = self.page.goto(self.proxy.url + "/ui")
        assert response is not None and response.status == 200
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        return self.page

    def row(self, model: str) -> Any:
        return self.page.locator(f'tr[data-model="{model}"]')

    def outside_origin(self) -> list[str]:
        """Requests the page made anywhere but the proxy (data: URLs stay in the page)."""
        return [u for u in self.requests if not u.startswith(self.proxy.url + "/") and not u.startswith("data:")]

    def close(self) -> None:
        self.context.close()


def _url(request: Request) -> str:
    return request.url


def test_page_lists_loads_follows_logs_and_shows_requests(
    browser: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with running(tmp_path / "proxy", embedded_models()) as proxy:
        watched = Watched(browser, proxy)
        request.addfinalizer(watched.close)
        page = watched.open()
        for name in ("smollm2:135m", "piper-joe", "whisper-base"):
            expect(watched.row(name).locator(".badge")).to_have_text("stopped")
        expect(page.locator("#live")).to_have_text("live")  # the open proxy: the events stream is on
        smol = watched.row(MODEL)
        expect(smol.locator("td.backend")).to_contain_text("llama_cpp")

        smol.locator("button.logs").click()
        log = page.locator('tr[data-log="smollm2:135m"] pre')
        expect(log).to_be_visible()
        page.evaluate("window.notReloaded = true")
        smol.locator("button.load").click()
        # the state changes on the page with no reload: the events stream drives it
        expect(smol.locator(".badge")).to_have_text("ready", timeout=LOAD_TIMEOUT)
        assert page.evaluate("window.notReloaded") is True
        expect(smol.locator("td.where")).to_have_text("cpu")
        expect(smol.locator("td.memory")).to_contain_text("uses ")
        expect(smol.locator("td.keepalive")).to_contain_text("unloads in")
        # the worker's own lines, followed live (the load began after the follow did)
        expect(log).to_contain_text("loading ")
        expect(log).to_contain_text("loaded in ")

        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        request.addfinalizer(client.close)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert answer.usage is not None
        tokens = answer.usage.completion_tokens
        first = page.locator("#requests tbody tr").first
        expect(first).to_contain_text(MODEL)
        expect(first).to_contain_text("POST /v1/chat/completions")
        expect(first.locator("td").nth(3)).to_have_text("200")
        expect(first.locator("td").nth(5)).to_have_text(str(tokens))
        expect(first.locator("td").nth(6)).to_have_text(RATE)
        expect(smol.locator("td.inflight")).to_have_text("0")  # the request is over: no stale /status wins
        expect(page.locator("#requests tbody tr")).to_have_count(1)  # /load names no model: not listed

        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("UI_SCREENSHOT"):
            shutil.copyfile(shot, REPO / "docs" / "ui.png")

        # an unload from elsewhere reaches the page by the event stream alone
        assert httpx.post(f"{proxy.url}/unload/{MODEL}", timeout=60).json() == {"unloaded": [MODEL]}
        expect(smol.locator(".badge")).to_have_text("stopped", timeout=LOAD_TIMEOUT)
        expect(smol.locator("td.where")).to_have_text("—")
        assert page.evaluate("window.notReloaded") is True
        assert watched.errors == []
        assert watched.outside_origin() == []


def test_keys_the_form_and_a_user_key_cannot_unload(browser: Browser, tmp_path: Path) -> None:
    with running(tmp_path / "proxy", [smollm2_config()], tokens=KEYS) as proxy:
        watched = Watched(browser, proxy)
        try:
            page = watched.open()
            form = page.locator("#keyform")
            expect(form).to_be_visible()
            expect(page.locator("#keyreason")).to_have_text("missing API key")
            expect(page.locator("#main")).to_be_hidden()

            page.fill("#key", "not-a-key")
            page.click("#keyform button[type=submit]")
            expect(page.locator("#keyreason")).to_have_text("invalid API key")

            page.fill("#key", "user-key")
            page.click("#keyform button[type=submit]")
            smol = watched.row(MODEL)
            expect(smol.locator(".badge")).to_have_text("stopped")
            expect(form).to_be_hidden()
            expect(page.locator("#live")).to_have_text("polling")
            expect(page.locator("#notice")).to_contain_text("need an admin key")
            # the key is in this tab's session only
            assert page.evaluate("sessionStorage.getItem('proxy-ui-key')") == "user-key"
            assert page.evaluate("localStorage.length") == 0

            smol.locator("button.unload").click()
            expect(smol.locator(".message")).to_contain_text("unload refused (403): this endpoint needs an admin key")

            page.click("#forget")
            expect(form).to_be_visible()
            page.fill("#key", "admin-key")
            page.click("#keyform button[type=submit]")
            expect(page.locator("#live")).to_have_text("live")
            expect(page.locator("#notice")).to_be_hidden()
            # Chromium logs each refused fetch (the 401s and 403s above); nothing else, no CSP violation
            assert all(HTTP_4XX.match(e) for e in watched.errors), watched.errors
            assert watched.outside_origin() == []
        finally:
            watched.close()
