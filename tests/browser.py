"""A real headless Chromium for the status page's tests: Debian's ``chromium`` driven by
Selenium through Debian's ``chromedriver`` (``.ci/run`` installs both), offline (no
Selenium Manager, no downloads, no background network of the browser's own).

:func:`chromium` is the body of a pytest fixture (``yield from chromium(tmp_path)``); the
test is skipped, saying why, when the binaries are missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("DROPCUT_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DROPCUT_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1280, 1700)  # the screenshot's size (CSS pixels, device scale 1)
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # (root in CI containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
)


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (Debian: apt-get install {package}; .ci/run installs it)"
    return None


def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium (``selenium.webdriver.Chrome``), its profile in ``tmp_path``;
    quit after."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
