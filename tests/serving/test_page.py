"""The web page at `GET /` (SPEC section 10) in headless Chromium against the real server on the tiny model.

Debian's `chromium` is driven by playwright through `executable_path` (playwright cannot download its
own browsers here). Without it these tests are skipped, saying what to install. Each state the tests
reach is saved as a screenshot under out/screenshots/.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tests.support import ROOT, serve, serve_keyed

PAGE_FILE = ROOT / "app" / "serving" / "web" / "static" / "index.html"
SHOTS = ROOT / "out" / "screenshots"
JOBS = "/v1/models/kandinsky/jobs"
TIMEOUT_MS = 120_000  # generous: the CPUs of a test machine are shared


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_page_file_names_no_outside_address():
    html = PAGE_FILE.read_text(encoding="utf-8")
    assert re.findall(r"(?:https?:)?//[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", html) == []
    assert "@import" not in html and "url(" not in html


@pytest.fixture(scope="module")
def base_url(tiny_model_dir):
    for srv in serve(tiny_model_dir):
        yield srv["base"]


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("the web page tests need Chromium: apt-get install chromium (Debian's package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the web page tests need playwright: pip install -r requirements-dev.txt")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


class Session:
    """One browser tab on the page, with every request it made and every script error it hit."""

    def __init__(self, browser, base_url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{base_url}/")
        self.page.wait_for_selector("#model-state[data-state=ready]")

    def posts(self) -> list[str]:
        return [url for method, url in self.requests if method == "POST"]


@pytest.fixture
def session(browser, base_url):
    s = Session(browser, base_url)
    yield s
    s.context.close()
    assert s.errors == [], s.errors


def job_of(page, base_url: str) -> dict:
    job_id = page.get_attribute("#output", "data-job-id")
    assert job_id, "the page names no job"
    return httpx.get(f"{base_url}{JOBS}/{job_id}", timeout=10).json()


def watch_progress(page) -> None:
    """Record every value the progress bar shows and every preview image, as the page renders them."""
    page.evaluate("""() => {
        window.seen = {progress: [], previews: 0};
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.seen.progress.push(Number(bar.getAttribute('aria-valuenow'))))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
        new MutationObserver(() => { window.seen.previews += 1; })
            .observe(document.getElementById('previews'), {childList: true, subtree: true, attributes: true});
    }""")


def test_page_loads_with_every_request_to_its_own_server(session, base_url):
    page = session.page
    origin = urlsplit(base_url)
    outside = [url for _, url in session.requests
               if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url)[:2] != origin[:2]]
    assert outside == []
    paths = {urlsplit(url).path for _, url in session.requests}
    assert {"/", "/v1/models"} <= paths  # the model's name comes from the server, not the page
    assert page.input_value("#model") == "kandinsky"
    # every control has a label (or an aria-label) and the keyboard reaches it
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                        && !(el.tagName === 'BUTTON' && el.textContent.trim()))
        .map((el) => el.id)""")
    assert unlabelled == []
    assert page.evaluate("document.activeElement.id") == "query"  # type at once
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "images_to_gen"
    shot(page, "page-loaded")


def test_generate_shows_a_moving_progress_bar_previews_then_images_with_scores(session, base_url):
    page = session.page
    watch_progress(page)
    page.fill("#query", "Кот в шляпе")
    page.fill("#images_to_gen", "4")
    page.fill("#images_to_cherry_pick", "2")
    page.fill("#seed", "9223372036854775807")  # 2**63-1: past JavaScript's exact integers
    page.focus("#super_res")
    page.keyboard.press("Space")  # off: keep the test quick
    assert not page.is_checked("#super_res")
    page.focus("#query")
    page.keyboard.press("Control+Enter")

    page.wait_for_selector("#previews img")
    shot(page, "generating")
    page.wait_for_selector("#status[data-state=succeeded]")
    shot(page, "done")

    seen = page.evaluate("window.seen")
    values = seen["progress"]
    assert len({v for v in values if 0 < v < 100}) >= 2, values
    assert values == sorted(values) and values[-1] == 100
    assert seen["previews"] > 0

    result = job_of(page, base_url)["result"]
    assert result["seed"] == 2**63 - 1
    assert page.text_content("#result-seed") == str(2**63 - 1)
    cards = page.locator(".result")
    assert cards.count() == 2
    for i, (score, b64) in enumerate(zip(result["clip_scores"], result["images"], strict=True)):
        card = cards.nth(i)
        assert card.locator(".score").text_content() == f"CLIP {score:.3f}"
        link = card.locator("a.download")
        assert link.get_attribute("download") == f"kandinsky-{2**63 - 1}-{i + 1}.jpg"
        with page.expect_download() as download:
            link.focus()
            page.keyboard.press("Enter")
        assert download.value.suggested_filename == f"kandinsky-{2**63 - 1}-{i + 1}.jpg"
        assert Path(download.value.path()).read_bytes() == base64.b64decode(b64)
        assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 256


def test_cancel_stops_the_running_job(session, base_url):
    page = session.page
    page.fill("#query", "кот")
    page.fill("#images_to_gen", "16")
    page.fill("#images_to_cherry_pick", "1")
    page.uncheck("#super_res")
    page.click("#generate")
    page.wait_for_selector("#progress:not([aria-valuenow='0'])")
    assert job_of(page, base_url)["status"] == "running"
    page.focus("#cancel")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status[data-state=cancelled]")
    shot(page, "cancelled")
    job = job_of(page, base_url)
    assert job["status"] == "cancelled" and job["result"] is None
    assert page.locator(".result").count() == 0
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")


@pytest.mark.parametrize(
    ("values", "field", "needle"),
    [
        ({"images_to_gen": "2", "images_to_cherry_pick": "3"}, "images_to_cherry_pick", "images_to_gen (2)"),
        ({"seed": "99999999999999999999"}, "seed", "9223372036854775807"),
        ({"top_k": "100000"}, "top_k", "1..64"),  # inside the closed Sampling section: it opens
        ({"seed": "12abc"}, "seed", "whole number"),  # caught before any request
    ],
)
def test_a_bad_value_shows_the_error_next_to_its_field(session, base_url, values, field, needle):
    page = session.page
    jobs_before = len(httpx.get(f"{base_url}{JOBS}", timeout=10).json()["jobs"])
    page.fill("#query", "кот")
    for name, value in values.items():
        page.evaluate("([id, v]) => { document.getElementById(id).value = v; }", [name, value])
    page.click("#generate")
    error = page.locator(f"[data-error-for='{field}']")
    error.wait_for(state="visible")
    shot(page, f"error-{field}")
    assert needle in error.text_content()
    # next to its field: the message sits in the field's own box, and the control points at it
    same_box = "(f) => document.getElementById(f).closest('.field') " \
               "=== document.getElementById(f + '-error').closest('.field')"
    assert page.evaluate(same_box, field)
    assert f"{field}-error" in page.get_attribute(f"#{field}", "aria-describedby").split()
    assert page.get_attribute(f"#{field}", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == field
    assert page.is_visible(f"#{field}")  # a closed section around it was opened
    assert len(httpx.get(f"{base_url}{JOBS}", timeout=10).json()["jobs"]) == jobs_before
    # typing in the field clears its error
    page.focus(f"#{field}")
    page.keyboard.press("End")
    page.keyboard.type("1")
    assert not error.is_visible()


def test_the_image_prompt_is_sent_as_spec_section_9_says(session, base_url):
    page = session.page
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(picture, "PNG")
    page.fill("#query", "кот")
    page.fill("#images_to_gen", "1")
    page.fill("#images_to_cherry_pick", "1")
    page.uncheck("#super_res")
    page.click("#image-prompt summary")
    page.set_input_files("#ip-file", files=[{"name": "p.png", "mimeType": "image/png",
                                             "buffer": picture.getvalue()}])
    page.fill("#ip-up", "4")
    page.fill("#ip-left", "12")
    page.check("#ip-crop")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith(JOBS)) as request:
        page.click("#generate")
    params = json.loads(request.value.post_data)["instances"][0]["params"]
    assert params["image_prompt"] == {
        "image": base64.b64encode(picture.getvalue()).decode(),
        "borders": {"up": 4, "down": 0, "left": 12, "right": 0},
        "crop_first": True,
    }
    # The server completes the picture: the job succeeds and its image is shown.
    page.wait_for_selector("#status[data-state=succeeded]", timeout=120_000)
    assert page.locator("[data-error-for^='image_prompt']:not([hidden])").count() == 0
    shot(page, "image-prompt")


# ---- a server with API keys (SPEC section 12) -----------------------------------------------------------

PAGE_KEY = "page-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_base_url(tiny_model_dir, tmp_path_factory):
    for srv in serve_keyed(tiny_model_dir, tmp_path_factory.mktemp("keys"), {"web": PAGE_KEY}):
        yield srv["base"]


def test_against_a_keyed_server_the_page_asks_for_the_key_keeps_it_in_the_tab_and_generates(browser,
                                                                                          keyed_base_url):
    s = Session(browser, keyed_base_url)
    page = s.page
    sent: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent.append((f"{r.method} {urlsplit(r.url).path}",
                                              r.headers.get("authorization"))))
    try:
        page.fill("#query", "кот")
        page.fill("#images_to_gen", "1")
        page.fill("#images_to_cherry_pick", "1")
        page.uncheck("#super_res")
        page.click("#generate")
        page.wait_for_selector("#key-dialog[open]")  # the job's POST was answered 401
        assert page.evaluate("document.activeElement.id") == "api-key"
        shot(page, "api-key-asked")
        page.fill("#api-key", "not-the-key-0123456789")
        page.keyboard.press("Enter")
        error = page.locator("#key-error")
        error.wait_for(state="visible")  # asked again, saying the key was refused
        assert "did not accept" in error.text_content()
        page.fill("#api-key", PAGE_KEY)
        page.click("#key-use")
        page.wait_for_selector("#status[data-state=succeeded]")
        shot(page, "api-key-generated")
        assert page.locator(".result").count() == 1

        posts = [auth for what, auth in sent if what == f"POST {JOBS}"]
        assert posts == [None, "Bearer not-the-key-0123456789", f"Bearer {PAGE_KEY}"]
        # the tab keeps it (sessionStorage), nothing else does
        assert page.evaluate("sessionStorage.getItem('kandinsky.apiKey')") == PAGE_KEY
        assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
        assert page.is_visible("#key-button")
        # the job is this key's tenant's
        job_id = page.get_attribute("#output", "data-job-id")
        assert httpx.get(f"{keyed_base_url}{JOBS}/{job_id}", timeout=10).status_code == 401
        job = httpx.get(f"{keyed_base_url}{JOBS}/{job_id}", timeout=10,
                        headers={"Authorization": f"Bearer {PAGE_KEY}"}).json()
        assert job["status"] == "succeeded"
    finally:
        s.context.close()
    assert s.errors == [], s.errors
