"""The playground page in a real headless browser (Debian's chromium + chromedriver, driven by
selenium, a test dependency): type a prompt, press Generate, wait for the streamed text, read the
figures, take a screenshot. The tests use it, and it makes the README's screenshot:

    python -m bakedllama.serve.browser http://127.0.0.1:8000 --prompt "It was" --screenshot docs/x.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import contextmanager

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = ("chromedriver",)


def _which(names):
    for n in names:
        p = shutil.which(n) or (shutil.which(n, path="/usr/lib/chromium") if n == "chromedriver" else None)
        if p:
            return p
    return None


@contextmanager
def browser(width: int = 1180, height: int = 760):
    """A headless chromium (selenium WebDriver); RuntimeError if it is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _which(CHROMIUM), _which(CHROMEDRIVER)
    if not chromium or not driver:
        raise RuntimeError("chromium and chromedriver are needed (Debian: apt-get install chromium "
                           "chromium-driver; `make setup` installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run",
              "--disable-extensions", "--disable-background-networking", "--disable-sync",
              "--disable-component-update", "--disable-default-apps", "--metrics-recording-only",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    try:
        yield d
    finally:
        d.quit()


def run_page(d, url: str, prompt: str, *, max_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
             stop_after_tokens: int | None = None, timeout: float = 120.0) -> dict:
    """Load the page, generate; returns what the page shows (text, figures, state, console log).
    stop_after_tokens: press Stop once that many tokens have arrived."""
    from selenium.webdriver.common.by import By

    d.get(url.rstrip("/") + "/")
    deadline = time.monotonic() + timeout

    def wait(pred, what):
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page: {what} not within {timeout:g} s "
                                   f"(status: {d.find_element(By.ID, 'status').text!r})")
            time.sleep(0.05)

    wait(lambda: "bakedllama" in d.find_element(By.ID, "device").text, "device line")
    for field, value in (("prompt", prompt), ("max_tokens", max_tokens), ("temperature", temperature),
                         ("seed", seed)):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(str(value))
    d.find_element(By.ID, "go").click()
    if stop_after_tokens:
        wait(lambda: (d.find_element(By.ID, "s-tokens").text or "0").isdigit()
             and int(d.find_element(By.ID, "s-tokens").text) >= stop_after_tokens, "tokens to stop at")
        d.find_element(By.ID, "stop").click()
    wait(lambda: d.execute_script("return document.body.dataset.state") in ("done", "stopped", "error"),
         "the end of the generation")
    text = d.execute_script("return document.getElementById('out-text').textContent")
    res = dict(
        state=d.execute_script("return document.body.dataset.state"),
        finish=d.execute_script("return document.body.dataset.finish || null"),
        prompt=d.execute_script("return document.getElementById('out-prompt').textContent"),
        text=text,
        status=d.find_element(By.ID, "status").text,
        device=d.find_element(By.ID, "device").text,
        figures={k: d.find_element(By.ID, f"s-{k}").text for k in ("tokens", "tps", "cycles", "chip", "ttft",
                                                                   "queue")},
        resources=d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"),
        console=[e for e in d.get_log("browser")],
    )
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bakedllama.serve.browser",
                                description="Drive the playground page in headless chromium.")
    p.add_argument("url")
    p.add_argument("--prompt", default="It was")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screenshot", help="PNG to write")
    a = p.parse_args(argv)
    try:
        with browser() as d:
            r = run_page(d, a.url, a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)
            if a.screenshot:
                d.save_screenshot(a.screenshot)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
