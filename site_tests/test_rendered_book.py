"""Open every page of the built book in headless Chromium and check what a reader sees.

Run after the book is built: ``make test-site`` (``make test`` builds it first).
The pages come from ``_toc.yml``. Each test is parametrized by page, so a failure
names the page, and each checks one condition. The server binds 127.0.0.1 and the
browser aborts any other request, which proves that the built site works offline.
"""

from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT_DIR = REPO_ROOT / "_build" / "screenshots"
CONFIG = yaml.safe_load((REPO_ROOT / "_config.yml").read_text(encoding="utf-8"))
TOC = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8"))

SEARCH_TERM = "attention"
SEARCH_PAGE = f"search.html?q={SEARCH_TERM}"
BIBLIOGRAPHY_PAGE = "bibliography"


def toc_files(node: object) -> list[str]:
    """Return every ``file`` entry of a ``_toc.yml`` tree, in reading order, at any depth."""
    if isinstance(node, list):
        return [name for child in node for name in toc_files(child)]
    if not isinstance(node, dict):
        return []
    if "glob" in node:
        raise ValueError(f"_toc.yml entry {node} uses glob, which this test does not expand")

    files = [node["file"]] if "file" in node else []
    for key, value in node.items():
        if key != "file":
            files += toc_files(value)
    return files


def book_pages() -> list[str]:
    """Return the page names (source paths without suffix): the root page, the TOC, the bibliography."""
    names = [TOC["root"], *toc_files(TOC), BIBLIOGRAPHY_PAGE]
    pages = []
    for name in names:
        stem = str(Path(name).with_suffix("")) if Path(name).suffix in (".md", ".ipynb", ".rst") else name
        if stem not in pages:
            pages.append(stem)
    return pages


PAGES = book_pages()
# A chapter is a page whose source is in chapters/. Each one is a notebook with code cells.
CHAPTERS = [page for page in PAGES if page.startswith("chapters/")]
PAGES_AND_SEARCH = [*PAGES, SEARCH_PAGE]


def page_path(page: str) -> str:
    """Map a page name to its URL path relative to the site root. The search URL is returned unchanged."""
    return page if page == SEARCH_PAGE else f"{page}.html"


def screenshot_path(page: str) -> Path | None:
    return SCREENSHOT_DIR / f"{Path(page).name}.png" if page in CHAPTERS else None


def open_visit(visit_page, page: str):
    return visit_page(page_path(page), screenshot_path(page))


def same_origin_links(visit) -> list[str]:
    """Return the page's links that point into the served site, in order and without duplicates."""
    origin = urlsplit(visit.url).netloc
    links = [href for href in visit.link_hrefs if urlsplit(href).netloc == origin]
    return list(dict.fromkeys(links))


def format_lines(items: list[str]) -> str:
    return "\n".join(f"  {item}" for item in items)


def test_toc_lists_chapters():
    assert CHAPTERS, f"_toc.yml lists no page under chapters/: {PAGES}"


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_no_console_errors(visit_page, page):
    visit = open_visit(visit_page, page)
    assert not visit.console_errors, f"console errors on {visit.url}:\n{format_lines(visit.console_errors)}"


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_no_page_errors(visit_page, page):
    visit = open_visit(visit_page, page)
    assert not visit.page_errors, f"uncaught JavaScript errors on {visit.url}:\n{format_lines(visit.page_errors)}"


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_no_failed_requests(visit_page, page):
    visit = open_visit(visit_page, page)
    assert not visit.failed_requests, f"failed requests on {visit.url}:\n{format_lines(visit.failed_requests)}"


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_no_request_leaves_loopback(visit_page, page):
    visit = open_visit(visit_page, page)
    assert not visit.external_requests, (
        f"{visit.url} requested other hosts, so the built site needs a network:\n"
        f"{format_lines(visit.external_requests)}"
    )


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_images_loaded(visit_page, page):
    visit = open_visit(visit_page, page)
    assert not visit.broken_images, f"images that did not load on {visit.url}:\n{format_lines(visit.broken_images)}"


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_math_typeset(visit_page, page):
    visit = open_visit(visit_page, page)
    if visit.math_count:
        assert visit.mathjax_container_count > 0, f"{visit.url} has {visit.math_count} math elements but no mjx-container"
    assert not visit.untypeset_math, f"math that MathJax did not typeset on {visit.url}:\n{format_lines(visit.untypeset_math)}"
    assert not visit.mathjax_errors, f"MathJax errors on {visit.url}:\n{format_lines(visit.mathjax_errors)}"
    assert not visit.undefined_macro_math, (
        f"math with undefined TeX macros on {visit.url}:\n{format_lines(visit.undefined_macro_math)}"
    )


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_internal_links_resolve(visit_page, fetch_page, page):
    visit = open_visit(visit_page, page)
    broken = []
    for link in same_origin_links(visit):
        target, _ = urldefrag(link)
        status = fetch_page(target).status
        if status != 200:
            broken.append(f"{link}: HTTP {status}")
    assert not broken, f"internal links on {visit.url} that do not resolve:\n{format_lines(broken)}"


@pytest.mark.parametrize("page", PAGES_AND_SEARCH)
def test_link_fragments_exist(visit_page, fetch_page, page):
    visit = open_visit(visit_page, page)
    missing = []
    for link in same_origin_links(visit):
        target, fragment = urldefrag(link)
        if not fragment:
            continue
        fetched = fetch_page(target)
        if fetched.status == 200 and unquote(fragment) not in fetched.ids:
            missing.append(f"{link}: no element with id {unquote(fragment)!r}")
    assert not missing, f"links on {visit.url} to fragments that do not exist:\n{format_lines(missing)}"


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_code_cells(visit_page, page):
    visit = open_visit(visit_page, page)
    assert visit.cell_count > 0, f"{visit.url} has no code cell (div.cell)"
    assert visit.cells_missing_input == 0, (
        f"{visit.url}: {visit.cells_missing_input} of {visit.cell_count} code cells have no source (.cell_input) "
        "and no remove-input tag"
    )
    assert visit.cell_output_count > 0, f"{visit.url} shows no cell output (.cell_output); are the stored outputs missing?"
    assert visit.empty_output_count == 0, f"{visit.url} has {visit.empty_output_count} empty cell outputs"


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_launch_links(visit_page, page):
    visit = open_visit(visit_page, page)
    repository = CONFIG["repository"]
    launch = CONFIG["launch_buttons"]
    owner_and_name = urlsplit(repository["url"]).path.strip("/")
    branch = repository["branch"]
    book_dir = (repository.get("path_to_book") or "").strip("/")
    notebook = f"{book_dir}/{page}.ipynb" if book_dir else f"{page}.ipynb"

    binder_prefix = f"{launch['binderhub_url'].rstrip('/')}/v2/gh/{owner_and_name}/{branch}?urlpath="
    binder_links = [href for href in visit.link_hrefs if href.startswith(binder_prefix) and href.endswith(notebook)]
    assert binder_links, f"{visit.url} has no Binder link starting {binder_prefix} for {notebook}"

    colab_link = f"{launch['colab_url'].rstrip('/')}/github/{owner_and_name}/blob/{branch}/{notebook}"
    assert colab_link in visit.link_hrefs, f"{visit.url} has no Colab link {colab_link}"

    download_links = [href for href in same_origin_links(visit) if href.endswith(f"/_sources/{page}.ipynb")]
    assert download_links, f"{visit.url} has no download link to _sources/{page}.ipynb"


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_screenshot_saved(visit_page, page):
    visit = open_visit(visit_page, page)
    assert visit.screenshot is not None and visit.screenshot.stat().st_size > 0, f"no screenshot of {visit.url}"


def test_search_finds_results(visit_page):
    visit = open_visit(visit_page, SEARCH_PAGE)
    assert not visit.search_timed_out, f"the search on {visit.url} did not finish"
    assert visit.search_result_count > 0, f"{visit.url} found no page for {SEARCH_TERM!r}"
