"""The web UI in a real browser: Debian's headless Chromium driven by Selenium (nothing downloaded).

Fills the New-run form for the tiny model (a wrong value first, whose message must appear beside
its field), starts the run, watches the loss chart grow and a sample image appear, stops the run
from the Live view, and checks from the browser's own network log that no request left
127.0.0.1. With APT_WEBUI_SCREENSHOTS=1 the pages are saved to docs/images/ui/ for docs/ui.md;
with APT_WEBUI_DEMO=1 the form starts from the `demo` preset (the shipped toy model, APT on, a
shortened run) instead of the tiny model, as docs/ui.md's screenshots were taken:

    APT_WEBUI_SCREENSHOTS=1 APT_WEBUI_DEMO=1 python -m pytest -q -m browser tests/test_webui_browser.py

    python -m pytest -q -m browser tests/test_webui_browser.py
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.test_webui import tiny_run_values, tiny_sd15  # noqa: F401  (the fixture)

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "images" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    uvicorn = pytest.importorskip("uvicorn", reason="the web UI extra is not installed (requirements-ui.txt)")
    from tools.ui.app import create_app

    port = _free_port()
    app = create_app(tmp_path / "ws")  # runs start as users start them: accelerate launch
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-ui.txt)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--disable-sync", "--metrics-recording-only"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, check, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
        except Exception:  # an element not there yet, or replaced while read
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; page text: {driver.find_element('tag name', 'body').text[:2000]}")


def _shot(driver, name: str) -> None:
    if os.environ.get("APT_WEBUI_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _type(driver, css: str, text: str) -> None:
    field = driver.find_element("css selector", css)
    field.clear()
    field.send_keys(text)


def test_browser_form_run_chart_sample_stop(server, browser, tmp_path, tiny_sd15):
    from selenium.webdriver.support.ui import Select

    base, app = server
    demo = bool(os.environ.get("APT_WEBUI_DEMO"))
    limit = 900 if demo else 90  # seconds for each wait: the demo model is larger and samples 8 prompts twice
    values, dataset_toml = tiny_run_values(tmp_path, tiny_sd15, steps=400, sample_every=2)
    browser.get(base + "/")
    _wait(browser, lambda: browser.find_element("css selector", "body[data-ready]"), "the page to load")
    if demo:  # the preset fills the form; only the length, the output folder and the samples change
        Select(browser.find_element("id", "preset")).select_by_value("demo")
        browser.find_element("id", "load-preset").click()
        _wait(browser, lambda: "Loaded preset demo" in browser.find_element("id", "form-message").text, "the preset")
        values = {"max_train_steps": "400", "sample_every_n_steps": "40", "output_dir": str(tmp_path / "out"),
                  "log_with": "none", "save_state": True}

    # the form: every value typed as a user would; a wrong rank first
    for key, value in values.items():
        css = "#opt-" + key.replace(".", "__")
        field = browser.find_element("css selector", css)
        browser.execute_script("arguments[0].closest('details').open = true;"
                               "arguments[0].scrollIntoView({block: 'center'})", field)
        if field.tag_name == "select":
            Select(field).select_by_visible_text(str(value).lower() if isinstance(value, bool) else str(value))
        elif field.get_attribute("type") == "checkbox":
            if field.is_selected() != bool(value):
                field.click()
        else:
            _type(browser, css, str(value))
    browser.execute_script("document.querySelector('#table-network').open = true")
    _type(browser, "#opt-network_dim", "0")
    if not demo:
        _type(browser, "#dataset-toml", dataset_toml)
    browser.find_element("id", "validate").click()
    slot = '[data-error-for="network_dim"]'
    message = _wait(browser, lambda: browser.find_element("css selector", slot).text, "the network_dim message")
    assert "[network] network_dim: expected an integer >= 1, got 0" in message
    assert "invalid" in browser.find_element("id", "row-network_dim").get_attribute("class")
    _shot(browser, "new-run-error")
    rank = "8" if demo else "4"
    _type(browser, "#opt-network_dim", rank)
    browser.find_element("id", "validate").click()
    _wait(browser, lambda: "valid" in browser.find_element("id", "form-message").text, "the form to validate")
    assert browser.find_element("css selector", slot).text == ""
    assert f"network_dim = {rank}" in browser.find_element("id", "raw-toml").text
    browser.execute_script("window.scrollTo(0, 0)")
    _shot(browser, "new-run")

    # start: the page switches to the Live view, the chart grows, a sample image arrives
    browser.find_element("id", "start").click()
    _wait(browser, lambda: browser.current_url.endswith("#live"), "the Live view")
    _wait(browser, lambda: int(browser.find_element("id", "chart-loss").get_attribute("data-points")) >= 2,
          "the loss chart to get points", limit)
    first = int(browser.find_element("id", "chart-loss").get_attribute("data-points"))
    _wait(browser, lambda: browser.execute_script(
        "return [...document.querySelectorAll('img.sample-image')].some(i => i.complete && i.naturalWidth > 0)"),
        "a sample image", limit)
    if demo:
        assert int(browser.find_element("id", "chart-gamma").get_attribute("data-points")) == 10  # APT's bins
    _wait(browser, lambda: int(browser.find_element("id", "chart-loss").get_attribute("data-points")) > first,
          "the chart to update", limit)
    assert browser.find_element("id", "stat-speed").text not in ("", "–")
    assert browser.find_elements("css selector", "#chart-loss canvas"), "uPlot drew no canvas"
    _shot(browser, "live")

    # stop from the Live view; the trainer acknowledges and ends as stopped
    browser.find_element("css selector", "[data-command=stop]").click()
    _wait(browser, lambda: browser.find_element("id", "live-status").get_attribute("data-status") == "stopped",
          "the run to stop", limit)
    _wait(browser, lambda: "acknowledged at step" in browser.find_element("id", "live-command").text,
          "the trainer's acknowledgement")
    browser.get(base + "/#runs")
    _wait(browser, lambda: "stopped" in browser.find_element("id", "runs-table").text, "the runs table")
    _shot(browser, "runs")
    run_id = browser.find_element("css selector", "#runs-table tbody tr").get_attribute("data-run")
    browser.get(base + "/#results")
    _wait(browser, lambda: browser.find_element("css selector", f"#results-run option[value='{run_id}']"), "run list")
    browser.find_element("id", "results-load").click()
    _wait(browser, lambda: browser.find_elements("css selector", "#results-files .lora"), "the LoRA files", limit)
    assert "modules" in browser.find_element("id", "results-files").text
    _shot(browser, "results")
    browser.get(base + "/#dataset")
    _type(browser, "#ds-folder", str(ROOT / "demo" / "concept") if demo else str(tmp_path / "images"))
    _type(browser, "#ds-resolution", "64")
    browser.find_element("id", "ds-scan").click()
    _wait(browser, lambda: browser.find_elements("css selector", ".ds-item img"), "the image grid", limit)
    _shot(browser, "dataset")

    # nothing the page loaded or sent went anywhere but this server
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    assert urls, "the browser's network log is empty"
    outside = [u for u in urls if not u.startswith("data:") and urlparse(u).hostname != "127.0.0.1"]
    assert not outside, outside
