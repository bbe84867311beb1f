"""docs/labeling.md's picture of the labeling page: serves the pairs of an existing label.py --out in this process,
opens the page in headless Chromium (Debian's chromium and chromium-driver, through Selenium), picks a point on the scale
and a few ratings as a person would, and saves a PNG. Nothing is submitted: the labels file is not touched.

    python label.py --policies out/synth/sft.pt out/synth/ppo.pt --out labels/me.json   # draws the pairs (Ctrl-C)
    python tools/label_screenshot.py --out labels/me.json --png results/label_page.png
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import label  # noqa: E402
from support.label_server import make_server, serve_in_thread  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a label.py --out whose <out>.pairs.json exists")
    p.add_argument("--png", default="results/label_page.png", help="where to save the picture")
    p.add_argument("--worker", default="screenshot", help="the worker id shown (it labels nothing)")
    p.add_argument("--width", type=int, default=1200, help="window width in pixels")
    p.add_argument("--height", type=int, default=880, help="window height in pixels")
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    largs = label.parse_args(["--out", args.out])
    labels = label.Labels(largs.out, label.load_or_make_pairs(largs), largs.batch, largs.seed)
    server = make_server(labels, "127.0.0.1", 0, quiet=True)
    serve_in_thread(server)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--window-size={args.width},{args.height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(f"{server.url}&worker={args.worker}")
        for _ in range(200):
            if driver.find_element(By.ID, "progress").text:
                break
            time.sleep(0.05)
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("7")  # a person leaning right, and a few ratings
        for side, axis, value in ((0, "overall", 3), (0, "accuracy", 3), (1, "overall", 6), (1, "coverage", 6)):
            driver.find_element(By.CSS_SELECTOR, f'input[name="axis-{side}-{axis}"][value="{value}"]').click()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.png)
    finally:
        driver.quit()
        server.shutdown()
    print(f"label_screenshot: wrote {args.png}")


if __name__ == "__main__":
    main()
