"""Benchmark suites of rlloss: ``python -m benchmarks`` in the repository root, or ``rlloss-bench`` /
``python -m rlloss.bench`` anywhere after ``pip install`` (this folder is installed as ``rlloss.bench``).

Benchmarks are not tests: they time and measure, they assert nothing. ``_core`` holds what every suite shares
(timing, peak memory, fresh processes, reports); each suite is one module, ``<name>.py``, listed in
``__main__.SUITES``, with its data (shapes, cases, columns, notes) and ``run_cpu`` / ``run_gpu``. Modules import
each other relatively, so the package runs under either name. Every run writes ``<suite>.json``, ``<suite>.md``
and a plot drawn from the JSON (``plots``); see docs/benchmarks.md.
"""
