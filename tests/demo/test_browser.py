"""End to end in headless Chromium: a comparison from each bundled model's example and from an upload; the columns,
overlays and charts must render, and a bad upload gives one input-error toast.

Needs Debian's `chromium` + `chromium-driver` (CI's `.ci/run` installs them) and the `selenium` package; skips
with the reason otherwise. Set MMREDUCE_UPDATE_SCREENSHOT=1 to refresh `demo/assets/screenshot.png` (README).
"""

from __future__ import annotations

import os
import shutil
import time

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

from mmreduce.demo.app import _EXAMPLES, EXAMPLES_DIR
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

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


def _no_error_toasts(driver) -> bool:
    return not driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")


def _compare_and_check(browser, wait, model: str) -> list[str]:
    """Presses Compare and checks one column per method with an answer, the overlays and both charts; returns the
    answers."""
    # Loading an example sets the upload, which triggers its preview; Compare waits until that event is done.
    WebDriverWait(browser, 60).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".pending, .generating"))
    time.sleep(0.5)
    compare = browser.find_element(By.CSS_SELECTOR, "#compare")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", compare)
    compare.click()
    WebDriverWait(browser, 240).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .mmr-answer")) >= 3
        and f"· {model}," in d.find_element(By.CSS_SELECTOR, "#cards").text)
    labels = [card.get_attribute("data-label") for card in browser.find_elements(By.CSS_SELECTOR, "#cards .mmr-card")]
    assert labels[0] == "baseline" and any(label.startswith("fastv") for label in labels[1:])
    answers = [a.text.strip() for a in browser.find_elements(By.CSS_SELECTOR, "#cards .mmr-answer")]
    assert all(answers) and "(empty)" not in answers
    wait.until(lambda d: _rendered_images(d, "#cards .mmr-method figure img") >= 2)  # kept tokens, per method
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#cards figcaption")]
    assert all("vision tokens" in caption for caption in captions)  # shown in full, not cut off
    wait.until(lambda d: _rendered_images(d, "#tokens_plot img") > 0)
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Latency')]").click()
    wait.until(lambda d: _rendered_images(d, "#latency_plot img") > 0)
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Vision tokens')]").click()
    assert _no_error_toasts(browser)
    return answers


# (example thumbnail, model it loads, the baseline's answer: the benchmark generator's)
EXAMPLE_RUNS = ((0, "tiny-llava-shapes", "red"), (3, "tiny-llava-next-docs", None), (5, "tiny-internvl-docs", None),
                (6, "tiny-llava-video", "left"))


def test_every_bundled_model_from_its_example_and_screenshot(url, browser, tmp_path):
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    for index, model, expected in EXAMPLE_RUNS:
        thumbnails = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item"))
        thumbnails[index].click()
        wait.until(lambda d, m=model: d.find_element(By.CSS_SELECTOR, "#model input").get_attribute("value") == m)
        question = _EXAMPLES[index][1]
        wait.until(lambda d, q=question: d.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value") == q)
        wait.until(lambda d: _rendered_images(d, "#preview img") > 0)
        answers = _compare_and_check(browser, wait, model)
        assert expected is None or answers[0] == expected, (model, answers)
        if model == "tiny-llava-video" and os.environ.get("MMREDUCE_UPDATE_SCREENSHOT"):
            cards = browser.find_element(By.CSS_SELECTOR, "#cards")  # the columns of a clip: 4 frames per stage
            browser.execute_script("arguments[0].scrollIntoView()", cards)
            cards.screenshot(str(tmp_path / "video.png"))
            with Image.open(tmp_path / "video.png") as image:
                image.convert("RGB").quantize(colors=128).save(SCREENSHOT.with_name("screenshot-video.png"),
                                                              optimize=True)
        if index == 0:
            shot = tmp_path / "screenshot.png"
            browser.execute_script("window.scrollTo(0, 0)")
            assert browser.save_screenshot(str(shot))
            with Image.open(shot) as image:
                assert image.width >= 1000
                if os.environ.get("MMREDUCE_UPDATE_SCREENSHOT"):
                    small = image.convert("RGB").resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS)
                    small.quantize(colors=128).save(SCREENSHOT, optimize=True)


def test_earlier_versions_of_a_bundled_model(url, browser):
    """The bundled earlier shapes versions are offered and run from the model menu on a shapes example."""
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    thumbnails = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item"))
    thumbnails[0].click()
    wait.until(lambda d: _rendered_images(d, "#preview img") > 0)
    for model in ("tiny-llava-shapes-v1", "tiny-llava-shapes-v2"):
        menu = browser.find_element(By.CSS_SELECTOR, "#model input")
        menu.click()
        menu.send_keys(Keys.CONTROL, "a")
        menu.send_keys(model)
        menu.send_keys(Keys.ENTER)
        wait.until(lambda d, m=model: d.find_element(By.CSS_SELECTOR, "#model input").get_attribute("value") == m)
        _compare_and_check(browser, wait, model)


def test_upload_compare(url, browser):
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#media input[type=file]"))
    upload.send_keys(str(EXAMPLES_DIR / "shapes-0.png"))
    wait.until(lambda d: _rendered_images(d, "#preview img") > 0)  # the server read the upload as an image
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("what color is the square ?")
    assert _compare_and_check(browser, wait, "tiny-llava-shapes")[0] == "red"


def test_non_image_upload_shows_an_error(url, browser, tmp_path):
    browser.get(url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not pixels")
    upload = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#media input[type=file]"))
    upload.send_keys(str(notes))
    toast = WebDriverWait(browser, 60).until(
        lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']") if "not an image" in t.text])
    assert "notes.txt" in toast[0].text and "Input error" in toast[0].text and "/" not in toast[0].text.split(":")[0]
    # the upload was cleared, so Compare reports the missing image once, not the same message a second time
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("what color is the square ?")
    browser.find_element(By.CSS_SELECTOR, "#compare").click()
    WebDriverWait(browser, 60).until(
        lambda d: any("no image given" in t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")))
    texts = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")]
    assert sum("not an image" in text for text in texts) <= 1
