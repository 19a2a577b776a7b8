"""The documentation holds together: README.md is a front page of at most 16 KB, every relative link
in README.md and docs/ points at a file that exists (and at a heading that exists, when it names
one), and every page of docs/ is reachable from the front page."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))  # no headings in code
    return {slug(match) for match in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def relative_links(path: pathlib.Path):
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked here
            yield target


def test_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size <= 16 * 1024


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} points at a missing file"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target} names a missing heading"


def test_every_docs_page_is_linked_from_the_front_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page in linked, f"{page.relative_to(ROOT)} is not linked from README.md"


def test_the_slug_rule():
    assert slug("4. Bytes per step (the performance contract)") == "4-bytes-per-step-the-performance-contract"
    assert slug("Benchmark: `python -m bench`") == "benchmark-python--m-bench"
