"""Screenshot of the review page on a real bundle (docs/review-page.png), taken in headless Chromium.

Starts ``predgate serve`` with the review page on and a fresh outbox, sends Fashion-MNIST test images
until some are answered ``unknown`` (with explanations stored in their items), labels the first one
through the page as a person would, and saves the page. Needs the Debian packages ``chromium`` and
``chromium-driver`` and selenium (``make system-deps``, the dev extra).

    python examples/review_screenshot.py --bundle bundles/fashion-mnist-quick --out docs/review-page.png
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from models.data import read_idx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png(pixels: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # type: ignore[arg-type]
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "fashion-mnist-quick")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "review-page.png")
    parser.add_argument("--images", type=int, default=64, help="test images to send")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PREDGATE_REVIEW": "1", "PREDGATE_FALLBACK_DIR": str(Path(scratch) / "outbox")}
        server = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--bundle", str(args.bundle), "--port", str(port)],
            cwd=ROOT,
            env=env,
        )
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            images = read_idx(args.data / "t10k-images-idx3-ubyte.gz")[: args.images]
            files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
            answers = httpx.post(f"{base}/predict/batch", files=files, timeout=600).json()
            unknown = sum(a["verdict"] == "unknown" for a in answers)
            print(f"{unknown} of {len(answers)} test images answered unknown")

            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in (
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--window-size=1100,1000",
            ):
                options.add_argument(flag)
            driver = webdriver.Chrome(
                options=options, service=Service(executable_path="/usr/bin/chromedriver")
            )
            try:
                driver.get(f"{base}/review")
                first = driver.find_element(By.CSS_SELECTOR, "section.item")
                index = next(
                    i for i, a in enumerate(answers) if a["verdict"] == "unknown"
                )  # the page's first
                truth = int(read_idx(args.data / "t10k-labels-idx1-ubyte.gz")[index])
                Select(first.find_element(By.NAME, "label")).select_by_value(str(truth))
                first.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
                WebDriverWait(driver, 20).until(
                    expected_conditions.text_to_be_present_in_element(
                        (By.CSS_SELECTOR, "section.item .status"), "saved"
                    )
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
                print(f"wrote {args.out}")
            finally:
                driver.quit()
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
