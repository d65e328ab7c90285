"""The web page (/ui) in a real browser: Debian's headless Chromium driven by Playwright.

One server (tiny model, task ``alpha`` with versions v1 and v2, an admin token, a controller
round every second) and one rollout started through the API. Without the token the page
shows only its sign-in and the API refuses the controls; signed in, the page shows the
rollout with its weight, draws the controller's next judgment without a reload, and its pause
control pauses the rollout (checked through the API). The API docs pages load with every
asset from the server itself. Every page must load with no console error, no failed request
and no HTTP error; the signed-in page's screenshot is saved in the test's temporary directory.

The browser is /usr/bin/chromium (``scripts/install-test-browser.sh``, run by the README's test
command, installs it); ``PEFTSERVE_CHROMIUM`` names another. Without it the test fails, with
the advice: it never skips quietly (``PEFTSERVE_SKIP_BROWSER=1`` skips it on purpose).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peftserve.canary.router import bucket, routing_key, threshold
from tests.server_utils import adapter_parts, running_server, upload_parts, wait_for
from tests.tiny_models import make_peft_adapter, make_tiny_model

CHROMIUM = os.environ.get("PEFTSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip
TOKEN = "ui-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ANALYSIS = {
    "min_samples": 10,
    "metrics": [
        {
            "name": "error_rate",
            "kind": "proportion",
            "direction": "increase",
            "tolerance": 0.01,
            "critical": True,
        },
        {
            "name": "latency_e2e",
            "kind": "continuous",
            "direction": "increase",
            "tolerance": 0.5,
            "relative": True,
        },
    ],
}
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = make_tiny_model(tmp_path_factory.mktemp("model"), "llama")
    adapters = tmp_path_factory.mktemp("adapters")
    one = make_peft_adapter(model, adapters / "one", std=0.3, seed=1)
    two = make_peft_adapter(model, adapters / "two", std=0.3, seed=2)
    with running_server(
        model, served_model_name="base", admin_token=TOKEN, canary_interval_s=1.0
    ) as base_url:
        for version, path in (("v1", one), ("v2", two)):
            assert (
                upload_parts(base_url, "alpha", version, adapter_parts(path), ADMIN).status_code
                == 201
            )
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("PEFTSERVE_SKIP_BROWSER") == "1":
        pytest.skip("PEFTSERVE_SKIP_BROWSER=1")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no browser at {CHROMIUM}: run scripts/install-test-browser.sh (apt-get install chromium) "
                    "or set PEFTSERVE_CHROMIUM; PEFTSERVE_SKIP_BROWSER=1 skips this test on purpose")  # fmt: skip
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


class Watch:
    """Everything a page should not do: console errors, uncaught exceptions, failed requests,
    HTTP errors, and requests to any origin but the server's."""

    def __init__(self, page: Any, origin: str) -> None:
        self.problems: list[str] = []
        self.requests: list[str] = []
        page.on(
            "console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}")
        )
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on(
            "response",
            lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"),
        )
        self.origin = origin

    def check(self) -> None:
        elsewhere = [
            u
            for u in self.requests
            if not u.startswith((self.origin, f"blob:{self.origin}", "data:"))
        ]
        assert not self.problems, self.problems
        assert not elsewhere, elsewhere


def traffic(url: str, weight: float, per_arm: int) -> None:
    """``per_arm`` requests from users inside the candidate's cohort and as many from outside."""
    inside = outside = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(10_000):
            user = f"user-{i}"
            candidate = bucket("alpha", routing_key(user, {}, "")) < threshold(weight)
            if (inside if candidate else outside) >= per_arm:
                if inside >= per_arm and outside >= per_arm:
                    return
                continue
            body = {
                "model": "alpha",
                "prompt": "abc",
                "max_tokens": 2,
                "temperature": 0,
                "user": user,
            }
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.headers["x-peftserve-arm"] == ("candidate" if candidate else "stable")
            inside, outside = inside + candidate, outside + (not candidate)


def rollout(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/rollouts/alpha", headers=ADMIN, timeout=10).json()


def latest_judgment(url: str) -> float | None:
    events = httpx.get(f"{url}/admin/rollouts/alpha/history", params={"kind": "judgment", "limit": 1},
                       headers=ADMIN, timeout=10).json()["data"]  # fmt: skip
    return events[-1]["at"] if events else None


def test_rollout_page_in_chromium(url: str, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    body = {
        "task": "alpha",
        "candidate": "v2",
        "steps": [10, 50],
        "step_interval_s": 3600,
        "analysis": ANALYSIS,
    }
    started = httpx.post(f"{url}/admin/rollouts", json=body, headers=ADMIN, timeout=30)
    assert started.status_code == 201, started.text
    traffic(url, 10, ANALYSIS["min_samples"])  # enough for judgments with numbers to chart

    # Without the token: only the sign-in; a wrong token is refused and not kept; the API refuses the controls.
    anonymous = browser.new_context()
    page = anonymous.new_page()
    watch = Watch(page, url)
    page.goto(f"{url}/", wait_until="networkidle")
    assert page.url == f"{url}/ui/"
    page.locator("#login-section").wait_for(state="visible", timeout=TIMEOUT_MS)
    assert (
        page.locator("article.rollout").count() == 0
        and page.locator("button[data-action]").count() == 0
    )
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    expect(page.locator("#notice")).to_contain_text("not correct", timeout=TIMEOUT_MS)
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("article.rollout").count() == 0
    refused = anonymous.request.post(
        f"{url}/admin/rollouts/alpha/pause", data={"reason": "anonymous"}
    )
    assert refused.status == 401
    assert rollout(url)["state"] == "ramping"
    watch.check()
    anonymous.close()

    # Signed in: the rollout with its weight, live.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    watch = Watch(page, url)
    page.goto(f"{url}/ui/", wait_until="networkidle")
    page.fill("#token", TOKEN)
    page.click("#login button[type=submit]")
    card = page.locator('article.rollout[data-task="alpha"]')
    card.wait_for(timeout=TIMEOUT_MS)
    assert card.locator(".weight-value").inner_text() == "10 %"
    assert card.get_attribute("data-state") == "ramping"
    assert page.evaluate("sessionStorage.getItem('peftserve.adminToken')") == TOKEN
    assert TOKEN not in page.url
    assert page.locator('tr[data-adapter="alpha@v2"]').count() == 1

    # The controller's next round appears on the chart without a reload.
    page.evaluate("window.notReloaded = true")
    chart = card.locator('[data-chart="weight"]')
    chart.wait_for(timeout=TIMEOUT_MS)
    shown = float(chart.get_attribute("data-last-judgment") or 0)
    assert wait_for(lambda: (latest_judgment(url) or 0) > shown, timeout=15)
    newer = latest_judgment(url)
    assert wait_for(
        lambda: float(chart.get_attribute("data-last-judgment") or 0) >= newer - 1e-3, timeout=15
    )
    assert page.evaluate("window.notReloaded") is True
    # Each metric per arm and as a difference with its interval against the margin, as uPlot canvases.
    for key in ("latency_e2e:arms", "latency_e2e:diff", "error_rate:arms", "error_rate:diff"):
        card.locator(f'[data-chart="{key}"] canvas').first.wait_for(timeout=TIMEOUT_MS)

    # Pause with a reason, through the page's control; the API agrees.
    card.locator('input[aria-label="reason"]').fill("looking at latency")
    card.locator('button[data-action="pause"]').click()
    expect(card).to_have_attribute("data-state", "paused", timeout=TIMEOUT_MS)
    status = rollout(url)
    assert status["state"] == "paused" and status["weight"] == 10.0
    history = httpx.get(
        f"{url}/admin/rollouts/alpha/history", params={"kind": "state"}, headers=ADMIN
    )
    paused = history.json()["data"][-1]
    assert paused["state_to"] == "paused" and paused["actor"] == "admin"
    assert paused["reason"].endswith("looking at latency")
    assert card.locator('button[data-action="resume"]').is_visible()
    page.screenshot(path=str(tmp_path / "rollout-page.png"), full_page=True)
    watch.check()

    # The API docs, offline: every asset from this server.
    for path, ready in (("/docs", ".opblock"), ("/redoc", "[data-section-id]")):
        page.goto(f"{url}{path}", wait_until="networkidle")
        page.locator(ready).first.wait_for(timeout=TIMEOUT_MS)
    watch.check()
    context.close()
    assert (tmp_path / "rollout-page.png").stat().st_size > 10_000
