"""The review page in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven
by selenium) opens the page of a real server process, labels two rejected inputs through the page's own
form and script, and the test reads the labels back from the outbox file the server wrote."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.deploy.processes import free_port, start_server, stop, wait_ready
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.integration
KEY = "browser-review-key"
CHROMIUM = os.environ.get("PREDGATE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PREDGATE_CHROMEDRIVER", "/usr/bin/chromedriver")


def chromium(window: tuple[int, int] = (1100, 900)) -> webdriver.Chrome:
    """Headless Chromium from the system packages (never a downloaded browser: no network here)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(path) is None:
            raise AssertionError(f"{path} not found: install the Debian package {package} (make system-deps)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def basic_auth(driver: webdriver.Chrome, user: str, password: str) -> None:
    """What a browser sends once a person has typed the credentials the page asked for (HTTP Basic)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def test_a_person_labels_rejected_inputs_in_chromium(
    tiny_bundle: Path, sample_images: np.ndarray, tmp_path: Path
) -> None:
    port, outbox = free_port(), tmp_path / "outbox"
    base, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    env = {
        "PREDGATE_REVIEW": "1",
        "PREDGATE_FALLBACK_DIR": str(outbox),
        "PREDGATE_API_KEY": KEY,
        "PREDGATE_OPERATING_POINT": "wrong-recall=0.995",
        "PREDGATE_WARMUP": "false",
    }
    server = start_server(tiny_bundle, port, log, env=env)
    driver = None
    try:
        wait_ready(server, base, log)
        files = [
            ("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(sample_images[:12])
        ]
        records = httpx.post(
            f"{base}/predict/batch", files=files, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ).json()
        keys = [r["fallback_item"] for r in records if r["verdict"] == "unknown"]
        assert len(keys) >= 2, records

        driver = chromium()
        basic_auth(driver, "ana", KEY)
        driver.get(f"{base}/review")
        sections = driver.find_elements(By.CSS_SELECTOR, "section.item")
        assert [s.get_attribute("data-key") for s in sections] == keys  # oldest first, in batch order
        images = driver.execute_script(
            "return [...document.querySelectorAll('section.item figure img')].map(i => i.naturalWidth)"
        )
        assert images and all(width > 0 for width in images)  # every image loaded (auth sent along)

        answers = {keys[0]: "4", keys[1]: "none"}
        for section in sections[:2]:
            key = section.get_attribute("data-key")
            Select(section.find_element(By.NAME, "label")).select_by_value(answers[key])
            section.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            WebDriverWait(driver, 20).until(
                expected_conditions.text_to_be_present_in_element(
                    (By.CSS_SELECTOR, f'section[data-key="{key}"] .status'), "saved"
                )
            )
        driver.save_screenshot(str(tmp_path / "review.png"))

        with sqlite3.connect(outbox / "outbox.sqlite3") as db:
            stored = dict(db.execute("SELECT key, label FROM reviews").fetchall())
            reviewers = {r for (r,) in db.execute("SELECT reviewer FROM reviews")}
            states = dict(db.execute("SELECT key, state FROM items").fetchall())
        assert stored == {keys[0]: 4, keys[1]: None} and reviewers == {"ana"}
        assert states[keys[0]] == states[keys[1]] == "delivered" and states[keys[2]] == "pending"
        driver.refresh()  # reviewed items leave the queue
        left = [s.get_attribute("data-key") for s in driver.find_elements(By.CSS_SELECTOR, "section.item")]
        assert left == keys[2:]
    finally:
        if driver is not None:
            driver.quit()
        # uvicorn re-raises SIGTERM once it has shut down cleanly (one process): -15 is a clean stop too
        assert stop(server) in (0, -signal.SIGTERM), log.read_text()
