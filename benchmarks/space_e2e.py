"""End-to-end check of the Space as a person sees it: headless Chromium clicks "Dream" and screenshots the plots.

    apt-get install -y chromium chromium-driver && .venv/bin/pip install selenium
    .venv/bin/python benchmarks/space_e2e.py [--world-model DIR] [--policy DIR] [--dataset DIR] [--out runs/space_e2e.png]

Starts `space_app/app.py` on 127.0.0.1 (a free port) in a subprocess with the given models (default: the
Space's defaults, i.e. the `vla-pipeline` outputs), opens it in headless Chromium driven by Selenium,
types an instruction, clicks Dream, waits for the trajectory and uncertainty images, and saves a
screenshot. Prints the page-load and click-to-plot times. Only loopback traffic; everything is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1900")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the Space exited with status {server.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: the Space did not answer on {url} within {timeout_s:.0f}s")


def start_space(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, str(REPO_ROOT / "space_app" / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    for flag in ("world_model", "policy", "dataset"):
        if getattr(args, flag):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env)


def make_browser(user_data_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit("error: needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def run_in_browser(url: str, args: argparse.Namespace) -> dict[str, float]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = make_browser(Path(profile))
        try:
            start = time.monotonic()
            browser.get(url)
            button = WebDriverWait(browser, 60).until(
                ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Dream']")))
            loaded = time.monotonic() - start
            box = browser.find_element(By.CSS_SELECTOR, "textarea, input[type='text']")
            box.clear()
            box.send_keys(args.instruction)
            if args.seed is not None:  # a simulator-seed start: the Space also plays it in robosuite
                browser.find_element(By.XPATH, "//label[contains(., 'simulator seed')]").click()
                number = browser.find_element(
                    By.XPATH, "//*[contains(text(), 'held-out episode index')]/ancestor::*[.//input[@type='number']][1]"
                              "//input[@type='number']")
                number.clear()
                number.send_keys(str(args.seed))
            clicked = time.monotonic()
            button.click()
            # The dream images (3-D trajectory, uncertainty; + dream vs real) are <img> elements once the answer arrives.
            expected = 3 if args.seed is not None else 2
            WebDriverWait(browser, args.timeout).until(
                lambda b: len([i for i in b.find_elements(By.TAG_NAME, "img") if "dream_" in (i.get_attribute("src") or "")]) >= expected)
            plotted = time.monotonic() - clicked
            time.sleep(1.0)  # let the images finish painting before the screenshot
            args.out.parent.mkdir(parents=True, exist_ok=True)
            height = browser.execute_script("return document.body.scrollHeight")
            browser.set_window_size(1400, max(1200, min(int(height) + 100, 4000)))
            browser.save_screenshot(str(args.out))
        finally:
            browser.quit()
    return {"page_load_s": loaded, "click_to_plot_s": plotted}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-model", help="folder or repo id (default: the Space's default)")
    parser.add_argument("--policy", help="folder or repo id (default: the Space's default)")
    parser.add_argument("--dataset", help="vla-preprocess folder for held-out starts")
    parser.add_argument("--instruction", default="please pick up the red cube and lift it")
    parser.add_argument("--seed", type=int, help="start from this simulator seed (and show the real rollout); "
                                                  "default: held-out episode 0 of the dataset")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "space_e2e.png")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the plots after the click")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = start_space(args, port)
    try:
        wait_for_http(url, server, timeout_s=180)
        timings = run_in_browser(url, args)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"screenshot: {args.out}")
    print(", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
