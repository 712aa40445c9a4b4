"""Headless Chromium driven by Selenium for the explorer's tests and benchmark: the system
Chromium and chromedriver (apt's ``chromium`` / ``chromium-driver``, which ``./dev test``
installs), never a browser download; the flags of ``tests/test_report.py`` (headless, no
sandbox, background networking off, a fresh profile, every host name but 127.0.0.1 (``lin-lens
serve``) unresolvable).

    from tests.explorer.browser import needs_browser, start, open_page, console, requests
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

WHY = ("Chromium not installed (apt-get install chromium chromium-driver)" if CHROMIUM is None
       else "chromedriver not installed (apt-get install chromium-driver)" if CHROMEDRIVER is None
       else "selenium not installed (pip install selenium; the dev extra has it)")
needs_browser = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None or not HAVE_SELENIUM,
                                   reason=WHY)


def start(profile: Path, width: int = 1400, height: int = 900) -> Any:
    """A headless Chromium under chromedriver, logging the console and the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait(driver: Any, script: str, timeout: float = 30.0) -> Any:
    """Poll ``return <script>`` until it is truthy; its value."""
    end = time.monotonic() + timeout
    while True:
        v = driver.execute_script(f"return {script}")
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"{script!r} still falsy after {timeout}s")
        time.sleep(0.02)


def open_page(driver: Any, url: str) -> None:
    """Load a page and wait for the explorer to have started (or failed)."""
    driver.get(url)
    wait(driver, "document.getElementById('ll-app') && (document.getElementById('ll-app')"
                 ".getAttribute('data-ready') || document.getElementById('ll-app')"
                 ".getAttribute('data-error'))")
    err = driver.execute_script("return document.getElementById('ll-app').getAttribute("
                                "'data-error')")
    assert not err, err


def console(driver: Any) -> list[str]:
    """Console messages since the last call (errors, warnings, logs)."""
    return [e["message"] for e in driver.get_log("browser")]


def requests(driver: Any) -> list[str]:
    """URLs requested over the network since the last call (file:, data:, blob: are local)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            if urlparse(url).scheme not in ("file", "data", "blob", "about", "chrome"):
                urls.append(url)
    return urls


def click_node(driver: Any, i: int) -> None:
    """Center node i and click it with the mouse (a real click on the canvas)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.execute_script("llExplorer.center(arguments[0])", i)
    xy = driver.execute_script("return llExplorer.nodeScreen(arguments[0])", i)
    canvas = driver.find_element(By.ID, "ll-canvas")
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(round(xy["x"] - size["width"] / 2)),
        int(round(xy["y"] - size["height"] / 2))).click().perform()
