"""Benchmark suites of rlloss (installed as ``rlloss.bench``; modules import each other relatively, so either name
works): ``_core`` holds what every suite shares, each ``<name>.py`` of ``__main__.SUITES`` its data and ``run_cpu``
/ ``run_gpu``. They measure and assert nothing; see docs/benchmarks.md.
"""
