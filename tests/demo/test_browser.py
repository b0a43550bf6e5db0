"""End to end in headless Chromium: upload an example, run a comparison, check the answers and charts rendered.

Needs Debian's `chromium` + `chromium-driver` (CI's `.ci/run` installs them) and the `selenium` package; skips
with the reason otherwise. Set MMREDUCE_UPDATE_SCREENSHOT=1 to refresh `demo/assets/screenshot.png` (README).
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and DRIVER),
                       reason="headless browser test needs Debian packages chromium and chromium-driver "
                              "(apt-get install -y chromium chromium-driver)"),
    pytest.mark.slow,  # a real browser against a launched app: page loads, a comparison, waits of up to 150 s
]
webdriver = pytest.importorskip("selenium.webdriver", reason="headless browser test needs the selenium package")
pytest.importorskip("gradio")

from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from mmreduce.demo.app import EXAMPLES_DIR  # noqa: E402

SCREENSHOT = EXAMPLES_DIR.parent / "screenshot.png"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1900")


@pytest.fixture(scope="module")
def url(demo_url):
    return demo_url


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # The system chromedriver: Selenium Manager must not try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _rendered_images(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length",
        selector)


def test_upload_compare_and_screenshot(url, browser, tmp_path):
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#media input[type=file]"))
    upload.send_keys(str(EXAMPLES_DIR / "shapes-0.png"))
    wait.until(lambda d: _rendered_images(d, "#preview img") > 0)  # the server read the upload as an image
    question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    question.send_keys("what color is the square ?")
    browser.find_element(By.CSS_SELECTOR, "#compare").click()

    WebDriverWait(browser, 150).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .mmr-answer")) >= 3)
    cards = browser.find_elements(By.CSS_SELECTOR, "#cards .mmr-card")
    labels = [card.get_attribute("data-label") for card in cards]
    assert labels[0] == "baseline" and any(label.startswith("fastv") for label in labels[1:])
    answers = [a.text.strip() for a in browser.find_elements(By.CSS_SELECTOR, "#cards .mmr-answer")]
    assert all(answers) and "(empty)" not in answers
    wait.until(lambda d: _rendered_images(d, "#tokens_plot img") and _rendered_images(d, "#latency_plot img"))
    wait.until(lambda d: _rendered_images(d, "#overlays img") > 0)
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")  # no error popped up

    shot = tmp_path / "screenshot.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.width >= 1000
        if os.environ.get("MMREDUCE_UPDATE_SCREENSHOT"):
            small = image.convert("RGB").resize((image.width // 2, image.height // 2), Image.LANCZOS)
            small.quantize(colors=128).save(SCREENSHOT, optimize=True)


def test_non_image_upload_shows_an_error(url, browser, tmp_path):
    browser.get(url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not pixels")
    upload = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#media input[type=file]"))
    upload.send_keys(str(notes))
    toast = WebDriverWait(browser, 60).until(
        lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']") if "not an image" in t.text])
    assert "notes.txt" in toast[0].text
