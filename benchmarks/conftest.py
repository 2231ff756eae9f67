"""pytest options for ``pytest benchmarks/ --benchmark-only`` (this folder is outside the repository's
testpaths, so the main test run never collects it)."""


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="benchmark the quick sizes of `python -m benchmarks --quick`")
