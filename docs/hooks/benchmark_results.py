"""mkdocs hook: list and embed the committed benchmark reports in benchmarks.md at build time.

``python -m benchmarks`` writes ``docs/benchmarks/<device-slug>/<suite>.{json,md}`` and ``<suite>.png``, a plot
drawn from the JSON by ``benchmarks.plots`` (where matplotlib was installed). The marker ``<!-- benchmark-results -->`` in a page is replaced by one section per device
folder that exists in the build (so only committed files on a clean checkout), embedding each report's
markdown with its headings demoted and linking the report and its JSON. Nothing is computed or edited here:
what the site shows is what the benchmark run wrote.
"""
from __future__ import annotations

import posixpath
from collections import defaultdict
from pathlib import Path

MARKER = "<!-- benchmark-results -->"
RESULTS_ROOT = "benchmarks/"
HEADING_SHIFT = 3  # a report's "# title" becomes "#### title", under the page's "## …" and "### <device>"


def _reports(files):
    """{device slug: {suite stem: {extension: File}}} for docs/benchmarks/<device>/<file>."""
    found = defaultdict(lambda: defaultdict(dict))
    for file in files:
        parts = file.src_uri.split("/")
        if len(parts) == 3 and file.src_uri.startswith(RESULTS_ROOT):
            stem, ext = posixpath.splitext(parts[2])
            found[parts[1]][stem][ext.lstrip(".")] = file
    return found


def _demote(markdown: str) -> str:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            line = "#" * HEADING_SHIFT + line
        lines.append(line)
    return "\n".join(lines)


def _section(device: str, suites, page_dir: str) -> str:
    def link(file):
        return posixpath.relpath(file.src_uri, page_dir or ".")

    out = [f"### `{device}`", ""]
    listing = []
    for stem, by_ext in sorted(suites.items()):
        listing.append(", ".join(f"[`{stem}.{ext}`]({link(f)})" for ext, f in sorted(by_ext.items())))
    out += ["Files: " + "; ".join(listing) + ".", ""]
    for stem, by_ext in sorted(suites.items()):
        if "md" in by_ext:
            out += [_demote(Path(by_ext["md"].abs_src_path).read_text(encoding="utf-8")), ""]
        if "png" in by_ext:
            out += [f"![{stem} ({device}): plot drawn from {stem}.json]({link(by_ext['png'])})", ""]
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if MARKER not in markdown:
        return markdown
    reports = _reports(files)
    page_dir = posixpath.dirname(page.file.src_uri)
    sections = [_section(device, reports[device], page_dir) for device in sorted(reports)]
    if not any(device != "cpu" for device in reports):
        sections.append(
            "### GPU\n\n!!! note \"GPU results pending\"\n    No GPU run has been committed yet: there is no "
            "`docs/benchmarks/<gpu-slug>/` folder. No GPU number is quoted anywhere in these docs until it is "
            "measured; [the offline GPU guide](offline_gpu.md) says how to produce one on a machine without internet.\n"
        )
    if not reports:
        sections.insert(0, "No benchmark report is committed yet.\n")
    elif not any("png" in by_ext for suites in reports.values() for by_ext in suites.values()):
        sections.insert(0, "No plot is committed yet: the reports below are the JSON and markdown of each run.\n")
    return markdown.replace(MARKER, "\n\n".join(sections))
