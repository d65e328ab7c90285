"""Take docs/rollout-page.png: the rollout page (/ui) while ``reverse@v2`` ramps on the demo model.

    python scripts/screenshot_rollout_page.py [--out docs/rollout-page.png]

It runs what ``peftserve demo`` runs (a server on the bundled model with fast canary
settings, synthetic users, the held-out eval set as probes), starts the rollout of
``reverse@v2``, and once the rollout has reached its last step and been judged there, has
headless Chromium (Debian's, driven by Playwright as in tests/test_ui_browser.py) load the
page and save it. CPU only, about a minute.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from peftserve.client import Client
from peftserve.config import DEFAULT_ADAPTERS_DIR
from peftserve.demo import ROLLOUT, TASK, Traffic, free_port, start_server

logger = logging.getLogger("screenshot")
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


def wait_for_last_step(client: Client, judged_s: float, timeout_s: float) -> None:
    """Until the rollout has been at its last step for ``judged_s`` (or has ended)."""
    deadline = time.monotonic() + timeout_s
    at_last: float | None = None
    while time.monotonic() < deadline:
        rollout = client.rollout(TASK)
        if not rollout.active:
            return
        if rollout.weight == ROLLOUT["steps"][-1]:
            at_last = at_last or time.monotonic()
            if time.monotonic() - at_last >= judged_s:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the rollout did not reach its last step in {timeout_s:g} s")


def shoot(url: str, out: Path, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(f"{url}/ui/", wait_until="networkidle")
        page.locator('article.rollout [data-chart="weight"] canvas').wait_for(timeout=20_000)
        page.wait_for_timeout(500)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    if errors:
        raise RuntimeError(f"the page logged errors: {errors}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/rollout-page.png"))
    parser.add_argument(
        "--height", type=int, default=1500, help="pixels of the page to keep (from the top)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peftserve-shot-") as data_dir:
        server = start_server(port, data_dir)
        url = f"http://127.0.0.1:{port}"
        traffic = Traffic(url)
        try:
            client = Client(url)
            client.upload(DEFAULT_ADAPTERS_DIR / "reverse-v2", name=TASK, version="v2")
            traffic.start()
            client.start_rollout(
                TASK, "v2", eval_set=DEFAULT_ADAPTERS_DIR / "eval" / f"{TASK}.jsonl", **ROLLOUT
            )
            wait_for_last_step(client, judged_s=2.0, timeout_s=150)
            shoot(url, args.out, args.height)
            logger.info("wrote %s (%s)", args.out, client.rollout(TASK).summary)
        finally:
            traffic.stop.set()
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
