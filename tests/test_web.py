"""The web page at ``/`` in headless Chromium (Debian's package, driven by Playwright): pick a catalog item,
search, see the neighbours as images with scores and the predicted attributes; then a composed query
with a typed modification; then an uploaded file that is not an image. A screenshot is saved under the
test's tmp dir.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.requirements_in_ci import require, require_module
from tests.test_serve import Served, shared_app

CHROMIUM = os.environ.get("VISURAY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.ray, pytest.mark.browser]


@pytest.fixture(scope="module")
def served_app(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # Checked before the app starts: without a browser there is nothing to drive.
    require(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    yield shared_app(tmp_path_factory)


def test_search_page_end_to_end(served_app: Served, tmp_path: Path) -> None:
    sync_api = require_module("playwright.sync_api", "playwright is not installed (dev extra)")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(served_app.url + "/")
            expect = sync_api.expect
            expect(page.get_by_test_id("versions")).to_contain_text(served_app.model_version, timeout=30_000)

            # Pick a catalog item as the query: it comes back first, with score ~1, as an image.
            picker = page.get_by_test_id("picker").locator("img")
            expect(picker).to_have_count(8, timeout=30_000)
            chosen = picker.nth(2)
            item_id = chosen.get_attribute("data-item-id")
            chosen.click()
            expect(page.get_by_test_id("search")).to_be_enabled(timeout=30_000)
            page.get_by_test_id("search").click()
            hits = page.locator("#results figure.hit")
            expect(hits).to_have_count(8, timeout=60_000)
            assert hits.first.get_attribute("data-item-id") == item_id
            assert float(hits.first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            attributes = page.locator("#attributes li.attribute")
            expect(attributes.first).to_contain_text("red", timeout=30_000)  # threshold 0: always predicted
            expect(page.get_by_test_id("attributes")).not_to_contain_text("green")  # threshold above 1: never
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

            # A typed modification goes to composed search.
            page.get_by_test_id("text").fill("in red")
            page.get_by_test_id("search").click()
            expect(page.get_by_test_id("status")).to_contain_text("for “in red”", timeout=60_000)
            expect(hits).to_have_count(8)

            # An uploaded file that is not an image: the service's error is shown, nothing breaks.
            bad = tmp_path / "notes.jpg"
            bad.write_bytes(b"this is not an image")
            page.get_by_test_id("file").set_input_files(str(bad))
            page.get_by_test_id("text").fill("")
            page.get_by_test_id("search").click()
            expect(page.get_by_test_id("status")).to_have_class("error", timeout=60_000)
            expect(page.get_by_test_id("status")).to_contain_text("not a decodable image")
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
            # The browser logs the 400 responses themselves as console errors; nothing else may fail.
            assert [e for e in console_errors if "400" not in e] == []
        finally:
            browser.close()
    assert (tmp_path / "search.png").stat().st_size > 10_000
    print(f"\nscreenshots: {tmp_path / 'search.png'}, {tmp_path / 'error.png'}")
