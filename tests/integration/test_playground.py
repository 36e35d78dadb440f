"""The web playground (/) and the API docs page (/api/v1/docs) in headless Chromium.

A real browser drives the pages against the real stack (HTTP API, Redis, a
worker with the tiny model). Screenshots are kept in ``test-artifacts/``.
Needs the ``playwright`` Python package (the ``dev`` extra) and a Chromium
(``apt-get install -y chromium``; another binary can be named with
``IMAGEGENX_CHROMIUM``); the tests skip, saying which is missing, without them.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import REPO

pytestmark = pytest.mark.integration

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 40  # long enough on any CPU for the page's polls to see PROGRESS


def chromium_binary() -> str:
    """The browser to drive, or skip saying what is missing."""
    named = os.environ.get("IMAGEGENX_CHROMIUM")
    if named:
        if not Path(named).is_file():
            pytest.skip(f"IMAGEGENX_CHROMIUM={named} is not a file")
        return named
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is missing (apt-get install -y chromium, or set IMAGEGENX_CHROMIUM)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright package is missing (pip install -e '.[dev]')",
        exc_type=ImportError,
    )
    binary = chromium_binary()
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="module")
def stack(browser: Any, redis_base: str, tiny_model: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("playground"), tiny_model,
                       name="playground") as s:
        yield s


class Page:
    """A fresh browser context and page that records errors and every URL it loads."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.urls.append(r.url))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    p = Page(browser)
    try:
        yield p
    finally:
        p.context.close()


# Records what the status area shows on every change, so the test sees each
# state the page rendered, however briefly.
WATCH_STATUS = """() => {
  window.__seen = [];
  const record = () => {
    const bar = document.getElementById('progress');
    window.__seen.push({state: document.getElementById('task-state').textContent,
                        detail: document.getElementById('task-detail').textContent,
                        value: bar.hasAttribute('value') ? bar.value : null, max: bar.max});
  };
  new MutationObserver(record).observe(document.getElementById('status'),
      {subtree: true, childList: true, characterData: true, attributes: true});
}"""

IMAGES_LOADED = """(n) => {
  const imgs = [...document.querySelectorAll('#result img')];
  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


def test_playground_submits_shows_progress_and_the_images(stack: Stack, page: Page) -> None:
    p = page.page
    p.goto(f"{stack.base}/")
    assert p.title() == "ImageGenX playground"
    p.fill("#api-key", API_KEY)
    p.fill("#prompt", "a red circle on a blue background")
    p.fill("#steps", str(STEPS))
    p.fill("#seed", "4242")
    p.fill("#num_images", "2")
    p.select_option("#sampler", "euler_a")
    p.evaluate(WATCH_STATUS)
    p.click("#submit")

    p.wait_for_function(IMAGES_LOADED, arg=2, timeout=90_000)
    assert p.text_content("#task-state") == "SUCCESS"
    seen = p.evaluate("window.__seen")
    progress = [s for s in seen if s["state"] == "PROGRESS"]
    assert progress, f"the page never showed PROGRESS: {seen}"
    assert all(s["max"] == STEPS and 0 <= s["value"] <= STEPS for s in progress), progress
    assert any(s["value"] > 0 for s in progress), progress  # the bar moved
    assert any(re.search(rf"step \d+ / {STEPS}", s["detail"]) for s in progress), progress
    assert p.evaluate("(b => b.value === b.max)(document.getElementById('progress'))")  # full at the end

    # The images are the task's own: same URLs, sizes and seeds as the API reports.
    task_id = p.text_content("#task-id")
    status = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers,
                          timeout=5).json()
    images = status["result"]["images"]
    shown = p.eval_on_selector_all(
        "#result img", "imgs => imgs.map(i => [i.src, i.naturalWidth, i.naturalHeight])")
    assert shown == [[im["url"], im["width"], im["height"]] for im in images]
    assert [im["seed"] for im in images] == [4242, 4243]
    assert p.eval_on_selector_all("#result figcaption", "c => c.map(x => x.textContent)") == [
        "seed 4242 · 64×64", "seed 4243 · 64×64"]
    assert status["result"]["sampler"] == "euler_a" and status["result"]["steps"] == STEPS
    page.screenshot("playground.png")

    # Key and gallery survive a reload (local storage); the thumbnail loads.
    p.reload()
    assert p.input_value("#api-key") == API_KEY
    p.wait_for_function("""() => {
      const t = document.querySelectorAll('#gallery img');
      return t.length === 1 && t[0].complete && t[0].naturalWidth > 0;
    }""", timeout=10_000)
    assert p.get_attribute("#gallery img", "src") == images[0]["thumbnail_url"]
    # A gallery item shows its images again and puts its settings back in the form.
    p.click("#gallery button.thumb")
    p.wait_for_function(IMAGES_LOADED, arg=2, timeout=10_000)
    assert p.input_value("#seed") == "4242" and p.input_value("#steps") == str(STEPS)
    assert p.input_value("#sampler") == "euler_a"
    assert page.errors == []
    page.screenshot("playground-gallery.png")


def test_playground_shows_field_errors_next_to_their_fields(stack: Stack, page: Page) -> None:
    p = page.page
    p.goto(f"{stack.base}/")
    p.fill("#api-key", API_KEY)
    p.fill("#prompt", "bad sizes")
    p.fill("#width", "100")
    p.fill("#steps", "1000")
    p.click("#submit")
    p.wait_for_selector("#err-width:not(:empty)")
    assert p.text_content("#err-width") == "must be a multiple of 8"
    assert p.text_content("#err-steps") == "must be at most 100"
    assert p.get_attribute("#width", "aria-invalid") == "true"
    assert p.text_content("#err-height") == ""
    assert p.is_visible("#banner") and not p.is_visible("#status")  # nothing was queued
    page.screenshot("playground-errors.png")

    # A wrong key is named at the key field.
    p.fill("#width", "64")
    p.fill("#steps", "2")
    p.fill("#api-key", "not-a-key")
    p.click("#submit")
    p.wait_for_selector("#err-api_key:not(:empty)")
    assert "X-API-Key" in p.text_content("#err-api_key")
    assert p.text_content("#err-width") == ""
    # The browser logs the refused calls (422, 401) as errors; nothing else may fail.
    assert all("status of 4" in e for e in page.errors), page.errors


def test_playground_cancels_a_running_task(stack: Stack, page: Page) -> None:
    p = page.page
    p.goto(f"{stack.base}/")
    p.fill("#api-key", API_KEY)
    p.fill("#prompt", "cancel me")
    # Long enough to be running when Cancel is clicked: at the tiny model's own 64x64, 100
    # steps can end within a second, before the click (as test_revocation's step-boundary test).
    p.fill("#width", "256")
    p.fill("#height", "256")
    p.fill("#steps", "100")
    p.click("#submit")
    p.wait_for_function("() => document.getElementById('task-state').textContent === 'PROGRESS'",
                        timeout=60_000)
    p.click("#cancel")
    p.wait_for_function("() => document.getElementById('task-state').textContent === 'REVOKED'",
                        timeout=30_000)
    assert p.text_content("#task-detail") == "cancelled"
    assert not p.is_visible("#banner") and not p.is_visible("#cancel")  # asked for: no error
    assert p.is_enabled("#submit")
    assert p.eval_on_selector_all("#result img", "imgs => imgs.length") == 0
    assert p.eval_on_selector_all("#gallery img", "imgs => imgs.length") == 0
    task_id = p.text_content("#task-id")
    status = requests.get(f"{stack.base}/api/v1/tasks/{task_id}", headers=stack.headers,
                          timeout=5).json()
    assert status["state"] == "REVOKED"
    assert page.errors == []


def test_docs_page_renders_every_operation_from_local_assets(stack: Stack, page: Page) -> None:
    spec = requests.get(f"{stack.base}/api/v1/openapi.json", timeout=5).json()
    # Paths and (OpenAPI 3.1) webhooks: Swagger UI draws one block per operation of either.
    items = [*spec["paths"].items(), *spec.get("webhooks", {}).items()]
    operations = sorted((method.upper(), path) for path, item in items
                        for method in item if method in ("get", "post", "put", "patch", "delete"))
    p = page.page
    p.goto(f"{stack.base}/api/v1/docs")
    p.wait_for_function("n => document.querySelectorAll('.opblock').length === n",
                        arg=len(operations), timeout=30_000)
    shown = p.eval_on_selector_all(".opblock", """blocks => blocks.map(b => [
        b.querySelector('.opblock-summary-method').textContent,
        b.querySelector('.opblock-summary-path').getAttribute('data-path')])""")
    assert sorted((m, path) for m, path in shown) == operations
    assert "ImageGenX" in p.text_content(".info .title")
    # An operation opens with its request body drawn from the schema.
    p.click("#operations-default-submit .opblock-summary-control")
    p.wait_for_selector("#operations-default-submit .opblock-section-request-body")
    assert "prompt" in p.text_content("#operations-default-submit .opblock-body")
    # Every asset came from this server: no CDN.
    assert page.urls and all(u.startswith(stack.base) or u.startswith("data:") for u in page.urls), \
        page.urls
    assert page.errors == []
    page.screenshot("api-docs.png")
