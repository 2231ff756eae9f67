"""Every ```python block in docs/ and README.md runs as written (each file's blocks share one namespace)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _pages_with_code():
    return [p for p in PAGES if BLOCK.search(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run(page):
    namespace = {"__name__": f"doc_{page.stem}"}
    for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)


def test_some_pages_have_examples():
    assert len(_pages_with_code()) >= 2
