"""Benchmark suites of rlloss: ``python -m benchmarks`` in the repository root, or ``rlloss-bench`` /
``python -m rlloss.bench`` anywhere after ``pip install`` (this folder is installed as ``rlloss.bench``; see
``--help``).

Benchmarks are not tests: they time and measure, they assert nothing. Each suite is one module of this
package (``<name>.py``) that defines ``SUITE = Suite(...)`` (see ``_registry``); modules whose names start with
``_`` or ``test_`` are helpers and pytest-benchmark files, not suites. Modules import each other relatively, so
the package runs under either name.

Every run writes ``<suite>.json`` (machine-readable, one record per case, enough to draw plots from) and
``<suite>.md`` (the same table for people) to the folder it names: ``./rlloss-bench-results/<device-slug>/`` by
default, ``docs/benchmarks/<device-slug>/`` of the checkout (the committed results) with ``--update-docs``.
"""
