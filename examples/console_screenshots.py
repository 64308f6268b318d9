"""Screenshots of the fleet console after the quick start (docs/console/quickstart-*.png).

    KEEP=1 bash examples/fleet-quickstart.sh          # leaves the server and the two devices running
    .venv/bin/python examples/console_screenshots.py http://127.0.0.1:8080 fleet-demo/admin-token docs/console
    kill $(cat fleet-demo/pids)

Needs Playwright and a Chromium (Debian's /usr/bin/chromium; Playwright's own browser download is not needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

PAGES = {"overview": "/console", "rollout-good": "/console/rollouts/1", "rollout-bad": "/console/rollouts/2",
         "device": "/console/devices/pump-2", "audit": "/console/audit"}


def main(url: str, token_file: str, out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                             args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"{url}/console/login")
        page.fill("input[name=token]", Path(token_file).read_text().strip())
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/console")
        for name, path in PAGES.items():
            page.goto(url + path)
            target = folder / f"quickstart-{name}.png"
            page.screenshot(path=str(target))
            try:  # a page of text needs no 24-bit colour: a third of the size in git
                from PIL import Image

                with Image.open(target) as image:
                    small = image.convert("RGB").quantize(colors=128)
                small.save(target, optimize=True)
            except ImportError:
                pass
            print(target)
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: console_screenshots.py URL TOKEN_FILE OUT_DIR")
    main(*sys.argv[1:])
