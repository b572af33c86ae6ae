"""Sphinx extension that removes repeated <script> entries from every HTML page.

sphinx-thebe 0.3.1 adds an inline script that declares ``const THEBE_JS_URL``
while Sphinx reads the sources. Sphinx 7 copies the registered scripts into the
page list again before writing, with filename '' in place of None, so its
duplicate check misses the copy. The page then declares the constant twice and
the browser raises a SyntaxError on every page.
"""

from typing import Any

from sphinx.application import Sphinx


def remove_duplicate_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """Keep the first of each group of scripts with the same source, priority and attributes."""
    unique = []
    seen = set()
    for script in context.get("script_files", []):
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict[str, Any]:
    # Priority 900 runs after the themes and extensions have added their page scripts.
    app.connect("html-page-context", remove_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
