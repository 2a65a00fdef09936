"""The web page at /, driven in headless Chromium by Playwright against a real `furina serve`.

Needs Debian's `chromium` (`make test` installs it when it runs as root) and never
downloads a browser: Playwright starts /usr/bin/chromium. Set WEB_SCREENSHOT_DIR to keep
the screenshots of each state; by default they go to a temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from service_support import (
    FINISHED,
    TINY_ADAPTER,
    TINY_BASE,
    ServerHandle,
    copy_data_dir,
    running_server,
    submit_merge,
    wait_for_job,
    write_tiny_adapter,
)

from furina.synthetic import write_random_llama

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not found on PATH: install the Debian package `chromium` "
    "(make test installs it when run as root)",
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "web-page-test-key"
# A base with the tiny model's architecture but other weights: the adapter's recorded
# base fingerprint does not match it, so a merge into it fails while it runs.
MISMATCHED_BASE = "other-llama"
# The tiny base greedily repeats one token, a newline. This base has larger random
# weights and generates varied tokens, so the chat shows text and streams distinct deltas.
VARIED_BASE = "varied-llama"
VARIED_ADAPTER = "varied-furina"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Milliseconds to wait for work on the server: merges, generations and latency comparisons
# of the tiny model take a few seconds on 2 CPU cores.
SERVER_WORK_TIMEOUT_MS = 90_000
LATENCY_FORM = {"Prompt tokens": "8", "New tokens": "4", "Repeats": "1"}
VARIANTS = ["base", "merged", "furina_unmerged", "moe_lora_unmerged"]
BAR_TEXT = re.compile(r"^[0-9.]+ ms, [0-9]+\.[0-9]{2}× base$")


@pytest.fixture(scope="module")
def web_server(data_dir_template, tmp_path_factory) -> Iterator[ServerHandle]:
    """A server with an API key, whose data dir adds a varied model and a mismatched base."""
    root = tmp_path_factory.mktemp("web-server")
    data_dir = copy_data_dir(data_dir_template, root / "data")
    write_random_llama(data_dir / "base" / MISMATCHED_BASE, seed=1)
    varied_base = write_random_llama(
        data_dir / "base" / VARIED_BASE, seed=3, initializer_range=0.2
    )
    write_tiny_adapter(varied_base, data_dir / "adapters" / VARIED_ADAPTER)
    with running_server(data_dir, root / "server.log", {"FURINA_API_KEY": API_KEY}) as handle:
        yield handle


@pytest.fixture(scope="module")
def api(web_server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with web_server.client(headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    configured = os.environ.get("WEB_SCREENSHOT_DIR")
    if not configured:
        return tmp_path_factory.mktemp("screenshots")
    directory = Path(configured)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class PageProblems:
    """Uncaught script errors, CSP violations and requests that left the server's origin."""

    def __init__(self, page: Page, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign_requests: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._on_console)
        page.on("request", lambda request: self._on_request(request.url, origin))

    def _on_console(self, message) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def _on_request(self, url: str, origin: str) -> None:
        if not (url.startswith(origin + "/") or url.startswith("data:")):
            self.foreign_requests.append(url)


def open_page(browser: Browser, server: ServerHandle, viewport: dict) -> tuple[Page, PageProblems]:
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    problems = PageProblems(page, server.base_url)
    page.goto(server.base_url + "/")
    return page, problems


@pytest.fixture
def desktop(browser, web_server) -> Iterator[tuple[Page, PageProblems]]:
    page, problems = open_page(browser, web_server, DESKTOP)
    yield page, problems
    page.context.close()


@pytest.fixture
def phone(browser, web_server) -> Iterator[tuple[Page, PageProblems]]:
    page, problems = open_page(browser, web_server, PHONE)
    yield page, problems
    page.context.close()


@pytest.fixture(scope="module")
def merged_model(api) -> str:
    """A merged model made through the API, for tests that do not merge on the page."""
    name = f"web-api-{uuid.uuid4().hex[:8]}"
    job = wait_for_job(api, submit_merge(api, name).json()["id"], FINISHED)
    assert job["status"] == "succeeded", job["error"]
    return name


def enter_key(page: Page) -> None:
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#base-list")).to_contain_text(TINY_BASE)


def assert_no_problems(problems: PageProblems) -> None:
    assert problems.errors == []
    assert problems.foreign_requests == []


def submit_merge_form(page: Page, base: str, name: str, adapter: str = TINY_ADAPTER) -> None:
    page.get_by_label("Base model", exact=True).select_option(base)
    page.get_by_label("Adapter", exact=True).select_option(adapter)
    page.get_by_label("Name of the merged model").fill(name)
    page.get_by_role("button", name="Merge", exact=True).click()


def run_latency(page: Page, model: str) -> None:
    page.get_by_label("Merged model", exact=True).select_option(model)
    for label, value in LATENCY_FORM.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("#latency-result")).to_be_visible(timeout=SERVER_WORK_TIMEOUT_MS)


def test_page_public_api_protected(web_server):
    with web_server.client() as anonymous:
        page = anonymous.get("/")
        script = anonymous.get("/static/app.js")
        style = anonymous.get("/static/style.css")
        missing = anonymous.get("/static/missing.js")
        outside = anonymous.get("/static/..%2Fapp.py")
        catalog = anonymous.get("/base-models")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<progress id="merge-progress"' in page.text
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.status_code == 200
    assert missing.status_code == 404
    assert outside.status_code == 404
    assert catalog.status_code == 401


def test_page_without_key_shows_api_error(desktop, web_server):
    page, problems = desktop
    with web_server.client() as anonymous:
        expected = anonymous.get("/base-models").json()["detail"]

    expect(page.locator("#catalog-error")).to_have_text(f"{expected} (HTTP 401)")
    assert_no_problems(problems)


def test_merge_chat_latency_on_page(desktop, api, web_server, screenshot_dir):
    page, problems = desktop
    name = f"web-{uuid.uuid4().hex[:8]}"
    enter_key(page)
    expect(page.locator("#adapter-list")).to_contain_text(TINY_ADAPTER)
    assert page.evaluate("sessionStorage.getItem('furina-api-key')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    page.screenshot(path=screenshot_dir / "01-catalog.png", full_page=True)

    # Merge: the progress bar ends at 100 % with every check passed.
    submit_merge_form(page, VARIED_BASE, name, VARIED_ADAPTER)
    job_panel = page.locator("#merge-job")
    expect(job_panel).to_have_attribute("data-state", "succeeded", timeout=SERVER_WORK_TIMEOUT_MS)
    progress = page.get_by_role("progressbar")
    expect(progress).to_have_attribute("aria-valuenow", "100")
    assert progress.evaluate("element => element.value") == 100
    expect(page.locator("#merge-status")).to_have_text(f"succeeded: merged/{name} written")
    expect(page.locator("#merge-error")).to_be_hidden()
    structure = page.locator("#structure-checks tr")
    expect(structure).to_have_count(8)
    expect(structure.locator(".result.pass")).to_have_count(8)
    numerical = page.locator("#numerical-checks tr")
    expect(numerical).to_have_count(4)
    expect(numerical.locator(".result.pass")).to_have_count(4)
    expect(numerical.first).to_contain_text("✓ pass")
    expect(page.locator("#merged-list")).to_contain_text(name)
    page.screenshot(path=screenshot_dir / "02-merge-succeeded.png", full_page=True)

    # Chat: the streamed reply equals the API's non-streamed greedy reply.
    message = "Hello there"
    expected = api.post(
        "/v1/chat/completions",
        json={
            "model": name,
            "messages": [{"role": "user", "content": message}],
            "max_tokens": 12,
            "temperature": 0,
        },
    )
    assert expected.status_code == 200, expected.text
    expected_text = expected.json()["choices"][0]["message"]["content"]
    page.get_by_label("Model", exact=True).select_option(name)
    page.get_by_label("Maximum new tokens").fill("12")
    page.get_by_label("Message", exact=True).fill(message)
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".chat-message.assistant")
    expect(reply).to_have_attribute("data-state", "done", timeout=SERVER_WORK_TIMEOUT_MS)
    assert reply.locator(".chat-content").text_content() == expected_text
    assert int(reply.get_attribute("data-chunks")) >= 2
    expect(page.locator(".chat-message.user .chat-content")).to_have_text(message)
    page.screenshot(path=screenshot_dir / "03-chat.png", full_page=True)

    # Latency: four bars per chart, each with its ratio to base.
    run_latency(page, name)
    for chart in ("#ttft-chart", "#decode-chart"):
        rows = page.locator(f"{chart} .bar-row")
        expect(rows).to_have_count(4)
        assert [row.get_attribute("data-variant") for row in rows.all()] == VARIANTS
        expect(page.locator(f"{chart} .bar")).to_have_count(4)
        for text in page.locator(f"{chart} .bar-value").all_text_contents():
            assert BAR_TEXT.match(text), text
        expect(rows.first.locator(".bar-value")).to_contain_text("1.00× base")
    page.screenshot(path=screenshot_dir / "04-latency.png", full_page=True)
    page.screenshot(path=screenshot_dir / "web-page.png", full_page=True)
    assert_no_problems(problems)


def test_failed_merge_shows_api_error(desktop, api, screenshot_dir):
    page, problems = desktop
    enter_key(page)

    # Rejected at submission: the API's detail, as it returned it.
    invalid = {"base_model": TINY_BASE, "adapter": TINY_ADAPTER, "name": "bad/name"}
    rejected = api.post("/merge", json=invalid)
    assert rejected.status_code == 400
    submit_merge_form(page, TINY_BASE, "bad/name")
    expect(page.locator("#merge-error")).to_have_text(f"{rejected.json()['detail']} (HTTP 400)")

    # Failed while running: the progress bar ends in "failed" with the job's error.
    name = f"web-mismatch-{uuid.uuid4().hex[:8]}"
    submit_merge_form(page, MISMATCHED_BASE, name)
    expect(page.locator("#merge-job")).to_have_attribute(
        "data-state", "failed", timeout=SERVER_WORK_TIMEOUT_MS
    )
    job = api.get("/merge", params={"limit": 1}).json()["items"][0]
    assert job["name"] == name
    assert "fingerprint" in job["error"]
    expect(page.locator("#merge-error")).to_have_text(job["error"])
    expect(page.locator("#merge-status")).to_have_text("failed")
    expect(page.locator("#merge-report")).to_be_hidden()
    page.screenshot(path=screenshot_dir / "05-merge-failed.png", full_page=True)
    assert_no_problems(problems)


def test_keyboard_focus_visible(desktop):
    page, problems = desktop

    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    expect(page.locator("#base-list")).to_contain_text(TINY_BASE)
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "[document.activeElement.textContent,"
        " getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused == ["Use key", "solid"]
    assert_no_problems(problems)


def test_phone_layout(phone, merged_model, screenshot_dir):
    page, problems = phone
    enter_key(page)
    expect(page.locator("#merged-list")).to_contain_text(merged_model)

    run_latency(page, merged_model)
    expect(page.locator("#ttft-chart .bar")).to_have_count(4)
    page.get_by_label("Message", exact=True).fill("Hi")
    page.get_by_label("Maximum new tokens").fill("4")
    page.get_by_label("Model", exact=True).select_option(merged_model)
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".chat-message.assistant")).to_have_attribute(
        "data-state", "done", timeout=SERVER_WORK_TIMEOUT_MS
    )

    # Nothing is wider than the screen, so the page never scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=screenshot_dir / "06-phone.png", full_page=True)
    assert_no_problems(problems)
