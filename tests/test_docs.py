"""The documentation: every ```python block in docs/ and README.md runs as written (each file's blocks share
one namespace), and the mkdocs site builds in strict mode (no broken link, anchor or docstring reference)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
SITE_BUILD_TIMEOUT_S = 120


def _pages_with_code():
    return [p for p in PAGES if BLOCK.search(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run(page):
    namespace = {"__name__": f"doc_{page.stem}"}
    for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)


def test_some_pages_have_examples():
    assert len(_pages_with_code()) >= 2


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict` (what CI runs for the site): mkdocs, mkdocs-material and mkdocstrings are test
    dependencies (setup.py's `test` extra), so a missing one fails here rather than skipping."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # silence mkdocs-material's banner about its successor
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SITE_BUILD_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    for page in ("index.html", "api/token_logprobs/index.html", "math/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # The API reference is generated from the docstrings (mkdocstrings), not only the hand-written prose.
    assert 'id="rlloss.token_logprobs"' in (tmp_path / "site" / "api/token_logprobs/index.html").read_text(
        encoding="utf-8")


# A repository path written in code, comments, docstrings or docs: docs/…, rlloss/…, kernels/…, tests/…,
# benchmarks/…, examples/… (a glob such as examples/*.py is checked as a glob).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:docs|rlloss|kernels|tests|benchmarks|examples)/[\w./*-]*[\w*])")
GENERATED = ("docs/benchmarks/",)  # reports written by the benchmark runs


def test_paths_named_in_the_repository_exist():
    """Docs and comments point at files that exist (a renamed file leaves no stale pointer behind)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    missing = []
    for name in listed.stdout.split():
        if not name.endswith((".py", ".md", ".yml")) or name.startswith(GENERATED):
            continue
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            for found in REPO_PATH.findall(line):
                path = found.rstrip(".")
                if path.startswith(GENERATED):
                    continue  # written by a benchmark run on some device (e.g. docs/benchmarks/<gpu-slug>/)
                if not any(ROOT.glob(path)) if "*" in path else not (ROOT / path).exists():
                    missing.append(f"{name}:{number}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
