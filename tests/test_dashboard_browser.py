"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright through
`executable_path`, so no browser download): load, score a grid, see the table and the
overview, open another square's attention maps, label a square; screenshots at each step."""

import os
import shutil
import sys
from pathlib import Path

import pytest
from dashboard_session import app_env
from servers import free_port, running

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None and os.environ.get("XCRYONET_REQUIRE_BROWSER") != "1",
        reason="no chromium on this machine (.ci/run installs Debian's chromium)",
    ),
]


@pytest.fixture
def server(store, tmp_path):
    labels = tmp_path / "labels.csv"
    shutil.copy(store / "labels.csv", labels)
    port = free_port()
    env = {**os.environ, **app_env(store, labels), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboards" / "app.py"),
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/_stcore/health", tmp_path / "streamlit.log", env=env, cwd=ROOT):
        yield url, labels


def test_score_inspect_and_label_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, labels = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    before = labels.read_text().count("\n")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)
        expect.set_options(timeout=120_000)
        page.goto(url)
        # The first paint is blank: wait for text before any screenshot.
        expect(page.get_by_role("heading", name="Score a grid")).to_be_visible()
        page.screenshot(path=shots / "1-loaded.png")
        page.get_by_role("button", name="Score").click()
        expect(page.get_by_text("squares,", exact=False).first).to_be_visible()
        expect(page.locator('[data-testid="stDataFrame"]').first).to_be_visible()
        images = page.locator('[data-testid="stImage"] img, [data-testid="stImageContainer"] img')
        expect(images.nth(1)).to_be_visible()
        expect(page.get_by_text("cracking and contamination attention maps")).to_be_visible()
        page.screenshot(path=shots / "2-scored.png", full_page=True)
        # Another square's attention maps.
        first_src = images.nth(1).get_attribute("src")
        combo = page.get_by_role("combobox", name="Square", exact=True)
        combo.click()
        combo.press("ArrowDown")  # opens the list
        page.get_by_role("option").nth(2).click()
        expect(images.nth(1)).not_to_have_attribute("src", first_src or "")
        page.screenshot(path=shots / "3-square.png", full_page=True)
        # Label a square.
        page.locator('[data-testid="stSidebar"]').get_by_text("Label squares").click()
        expect(page.get_by_role("heading", name="Label squares")).to_be_visible()
        page.get_by_role("button", name="Save label").click()
        expect(page.get_by_text("added grid01", exact=False)).to_be_visible()
        page.screenshot(path=shots / "4-labelled.png", full_page=True)
        # The next square by keyboard alone: key 3 sets overall 3 and saves.
        first = page.get_by_text("added grid01", exact=False).inner_text()
        page.keyboard.press("3")
        expect(page.get_by_text("added grid01", exact=False)).not_to_have_text(first)
        browser.close()
    lines = labels.read_text().splitlines()
    assert len(lines) == before + 2
    assert lines[-1].endswith(",3")
    assert all((shots / n).stat().st_size > 10_000 for n in
               ("1-loaded.png", "2-scored.png", "3-square.png", "4-labelled.png"))  # fmt: skip


def test_upload_a_serialem_montage_and_a_corrupt_zip_in_chromium(server, store, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    junk = tmp_path / "atlas.zip"
    junk.write_bytes(b"this is not a zip")
    montage = [
        store / "raw" / "grid02" / "grid02.mrc",
        store / "raw" / "grid02" / "grid02.mrc.mdoc",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        expect.set_options(timeout=120_000)
        for files, wait_for in ((montage, "grid02: "), ([junk], "is not a readable zip file")):
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(120_000)
            page.goto(url)
            expect(page.get_by_role("heading", name="Score a grid")).to_be_visible()
            page.get_by_text("Upload", exact=True).click()
            page.locator('input[type="file"]').set_input_files([str(f) for f in files])
            if files is montage:
                page.get_by_role("button", name="Score").click()
                expect(page.locator('[data-testid="stDataFrame"]').first).to_be_visible()
            expect(page.get_by_text(wait_for, exact=False).first).to_be_visible()
            assert page.get_by_text("Traceback").count() == 0
            page.screenshot(path=tmp_path / f"upload-{files[0].suffix[1:]}.png", full_page=True)
            page.close()
        browser.close()


def test_an_upload_over_the_size_cap_gets_a_clear_message(store, tmp_path):
    """``server.maxUploadSize`` (1024 MB in .streamlit/config.toml; 1 MB here) refuses a bigger
    file in the browser with a plain message, and the app never sees it."""
    from playwright.sync_api import expect, sync_playwright

    big = tmp_path / "big.mrc"
    big.write_bytes(b"\0" * (3 << 20))
    port = free_port()
    env = {**os.environ, **app_env(store, tmp_path / "labels.csv"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboards" / "app.py"),
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.maxUploadSize", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/_stcore/health", tmp_path / "streamlit.log", env=env, cwd=ROOT):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
            expect.set_options(timeout=120_000)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            expect(page.get_by_role("heading", name="Score a grid")).to_be_visible()
            page.get_by_text("Upload", exact=True).click()
            expect(page.get_by_text("(up to 1 MB each)", exact=False)).to_be_visible()
            page.locator('input[type="file"]').set_input_files(str(big))
            page.get_by_text("big.mrc").hover()
            expect(page.get_by_text("File must be 1.0MB or smaller", exact=False)).to_be_visible()
            assert page.get_by_role("button", name="Score").count() == 0
            page.screenshot(path=tmp_path / "too-big.png", full_page=True)
            browser.close()
