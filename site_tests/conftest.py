"""Fixtures that serve the built book on 127.0.0.1 and open its pages in headless Chromium.

The book must already be built into ``_build/html`` (``make book`` or ``make test-book``).
The browser is Debian's Chromium at /usr/bin/chromium, driven by Playwright for Python.
Every request that is not for 127.0.0.1 is aborted and recorded on the page's visit,
so a page that needs the network fails its test.
"""

import functools
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HTML_DIR = REPO_ROOT / "_build" / "html"
CHROMIUM_PATH = Path("/usr/bin/chromium")
LOOPBACK_HOST = "127.0.0.1"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # A request that bypasses Playwright's routing still cannot leave the machine:
    # it goes through no proxy, and every host name except 127.0.0.1 fails to resolve.
    "--no-proxy-server",
    f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK_HOST}",
]

# Milliseconds that one page may take to load, typeset its math and go idle.
PAGE_TIMEOUT_MS = 30_000
# Milliseconds that Sphinx's client-side search may take to list its results.
SEARCH_TIMEOUT_MS = 10_000

# Runs in the page after the load event. MathJax 3 resolves startup.promise once its
# first typeset pass is done. Pages without math load no MathJax, so the chain is empty.
WAIT_FOR_RENDERING_JS = """
async () => {
  await window.MathJax?.startup?.promise;
  await document.fonts.ready;
  await Promise.all([...document.images].map((img) => {
    img.loading = "eager";
    return img.decode().catch(() => null);
  }));
}
"""

# Sphinx's searchtools.js fills the summary paragraph only when the search has finished.
SEARCH_FINISHED_JS = """
() => document.querySelector("#search-results .search-summary")?.textContent.trim()
"""

COLLECT_PAGE_FACTS_JS = """
() => {
  const images = [...document.images];
  const math = [...document.querySelectorAll(".math")];
  const cells = [...document.querySelectorAll("div.cell")];
  const outputs = [...document.querySelectorAll("div.cell .cell_output")];
  return {
    brokenImages: images
      .filter((img) => !img.complete || img.naturalWidth === 0)
      .map((img) => img.currentSrc || img.src || img.outerHTML.slice(0, 120)),
    mathCount: math.length,
    untypesetMath: math
      .filter((node) => !node.querySelector("mjx-container"))
      .map((node) => node.textContent.trim().slice(0, 120)),
    mathjaxContainerCount: document.querySelectorAll("mjx-container").length,
    mathjaxErrors: [...document.querySelectorAll("mjx-merror")]
      .map((node) => node.getAttribute("data-mjx-error") || node.textContent.trim()),
    // MathJax 3 typesets an undefined macro as red text (its noundefined extension)
    // instead of an error node, so the MathML of each expression is searched for it.
    undefinedMacroMath: window.MathJax?.startup?.document
      ? Array.from(MathJax.startup.document.math)
        .filter((item) => /<mtext mathcolor="red">/.test(MathJax.startup.toMML(item.root)))
        .map((item) => item.math.trim().slice(0, 120))
      : [],
    linkHrefs: [...document.querySelectorAll("a[href]")].map((a) => a.href),
    cellCount: cells.length,
    // A hide-input cell wraps its source in <details>; a remove-input cell has none by design.
    cellsMissingInput: cells
      .filter((cell) => !cell.querySelector(".cell_input") && !cell.classList.contains("tag_remove-input"))
      .length,
    cellOutputCount: outputs.length,
    emptyOutputCount: outputs.filter((node) => !node.textContent.trim() && !node.querySelector("img, svg")).length,
    searchResultCount: document.querySelectorAll("#search-results ul.search > li").length,
  };
}
"""


@dataclass
class PageVisit:
    """What one page did in the browser: its errors, requests, images, math and links."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    math_count: int = 0
    untypeset_math: list[str] = field(default_factory=list)
    mathjax_container_count: int = 0
    mathjax_errors: list[str] = field(default_factory=list)
    undefined_macro_math: list[str] = field(default_factory=list)
    link_hrefs: list[str] = field(default_factory=list)
    cell_count: int = 0
    cells_missing_input: int = 0
    cell_output_count: int = 0
    empty_output_count: int = 0
    search_result_count: int = 0
    search_timed_out: bool = False
    screenshot: Path | None = None


def skip_or_fail(message: str) -> None:
    """Skip the calling test, or fail it where CI is set, so that CI never skips the browser check."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class QuietRequestHandler(SimpleHTTPRequestHandler):
    """A static file handler that keeps its access log out of the test output."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def site_url() -> Iterator[str]:
    """Serve ``_build/html`` on 127.0.0.1 from a background thread and yield its base URL."""
    if not (HTML_DIR / "index.html").is_file():
        skip_or_fail(f"{HTML_DIR / 'index.html'} not found: build the book first with `make book`")

    handler = functools.partial(QuietRequestHandler, directory=str(HTML_DIR))
    server = ThreadingHTTPServer((LOOPBACK_HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="book-http-server", daemon=True)
    thread.start()
    port = server.server_address[1]

    yield f"http://{LOOPBACK_HOST}:{port}/"

    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="session")
def browser():
    """Launch Debian's headless Chromium through Playwright, once for the whole session."""
    if not CHROMIUM_PATH.is_file():
        skip_or_fail(f"{CHROMIUM_PATH} not found: install it with `apt-get install chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail(
            "the playwright module is missing: install it with "
            "`.venv/bin/pip install -r requirements-test.txt`"
        )

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM_PATH), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


def open_page(browser, url: str, screenshot: Path | None) -> PageVisit:
    """Load ``url`` in a fresh browser context, wait for it to finish rendering and record what happened."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    visit = PageVisit(url=url)
    context = browser.new_context(service_workers="block", viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_TIMEOUT_MS)

    def route_loopback_only(route) -> None:
        request_url = route.request.url
        if urlsplit(request_url).hostname == LOOPBACK_HOST:
            route.continue_()
            return
        visit.external_requests.append(request_url)
        route.abort("blockedbyclient")

    def record_console_message(message) -> None:
        if message.type == "error":
            visit.console_errors.append(f"{message.text} (at {message.location.get('url')})")

    def record_failed_request(request) -> None:
        visit.failed_requests.append(f"{request.url}: {request.failure}")

    def record_error_response(response) -> None:
        if response.status >= 400:
            visit.failed_requests.append(f"{response.url}: HTTP {response.status}")

    context.route("**/*", route_loopback_only)
    page = context.new_page()
    page.on("console", record_console_message)
    page.on("pageerror", lambda error: visit.page_errors.append(str(error)))
    page.on("requestfailed", record_failed_request)
    page.on("response", record_error_response)

    try:
        page.goto(url, wait_until="load")
        page.evaluate(WAIT_FOR_RENDERING_JS)
        if page.locator("#search-results").count():
            try:
                page.wait_for_function(SEARCH_FINISHED_JS, timeout=SEARCH_TIMEOUT_MS)
            except PlaywrightTimeoutError:
                # The other checks still run, and the search test fails on the missing results.
                visit.search_timed_out = True
        page.wait_for_load_state("networkidle")

        facts = page.evaluate(COLLECT_PAGE_FACTS_JS)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            visit.screenshot = screenshot
    finally:
        context.close()

    visit.broken_images = facts["brokenImages"]
    visit.math_count = facts["mathCount"]
    visit.untypeset_math = facts["untypesetMath"]
    visit.mathjax_container_count = facts["mathjaxContainerCount"]
    visit.mathjax_errors = facts["mathjaxErrors"]
    visit.undefined_macro_math = facts["undefinedMacroMath"]
    visit.link_hrefs = facts["linkHrefs"]
    visit.cell_count = facts["cellCount"]
    visit.cells_missing_input = facts["cellsMissingInput"]
    visit.cell_output_count = facts["cellOutputCount"]
    visit.empty_output_count = facts["emptyOutputCount"]
    visit.search_result_count = facts["searchResultCount"]
    return visit


@pytest.fixture(scope="session")
def visit_page(browser, site_url) -> Callable[[str, Path | None], PageVisit]:
    """Return a function that opens a page (a path relative to the site root) once and caches its visit.

    A page that fails to load raises the same error in every test that requests it,
    without loading it again, so one broken page costs one timeout.
    """
    visits: dict[str, PageVisit | Exception] = {}

    def visit(path: str, screenshot: Path | None = None) -> PageVisit:
        if path not in visits:
            try:
                visits[path] = open_page(browser, urljoin(site_url, path), screenshot)
            except Exception as error:
                visits[path] = error
        result = visits[path]
        if isinstance(result, Exception):
            raise RuntimeError(f"loading {path} failed: {result}") from result
        return result

    return visit


class ElementIdParser(HTMLParser):
    """Parser that collects the fragment targets of an HTML page, ``id`` attributes and ``<a name>``."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (name == "id" or (tag == "a" and name == "name")):
                self.ids.add(value)


@dataclass
class FetchedPage:
    status: int
    ids: set[str]


@pytest.fixture(scope="session")
def fetch_page(site_url) -> Callable[[str], FetchedPage]:
    """Return a function that fetches a same-origin URL once and caches its HTTP status and element ids."""
    # An empty ProxyHandler ignores the http_proxy environment variables, so requests go straight to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    pages: dict[str, FetchedPage] = {}

    def fetch(url: str) -> FetchedPage:
        if urlsplit(url).hostname != LOOPBACK_HOST:
            raise ValueError(f"{url} is not served by the test server on {LOOPBACK_HOST}")
        if url in pages:
            return pages[url]

        try:
            with opener.open(url, timeout=PAGE_TIMEOUT_MS / 1000) as response:
                status = response.status
                body = response.read()
                content_type = response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            status, body, content_type = error.code, b"", ""

        parser = ElementIdParser()
        if content_type == "text/html":
            parser.feed(body.decode("utf-8", errors="replace"))
        pages[url] = FetchedPage(status=status, ids=parser.ids)
        return pages[url]

    return fetch
