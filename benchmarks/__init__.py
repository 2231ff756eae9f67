"""Benchmark suites of rlloss: ``python -m benchmarks`` (see ``python -m benchmarks --help``).

Benchmarks are not tests: they time and measure, they assert nothing. Each suite is one module of this
package (``benchmarks/<name>.py``) that defines ``SUITE = Suite(...)`` (see ``benchmarks._registry``); modules
whose names start with ``_`` or ``test_`` are helpers and pytest-benchmark files, not suites.

Every run writes ``<suite>.json`` (machine-readable, one record per case, enough to draw plots from) and
``<suite>.md`` (the same table for people) to ``docs/benchmarks/<device-slug>/``.
"""
