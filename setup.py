"""Packaging for rlloss.

The top-level folder ``kernels/`` holds the Triton device code and is installed as the subpackage
``rlloss.kernels``, so no top-level module named ``kernels`` is installed.
"""
from setuptools import setup

setup(
    name="rlloss",
    version="0.1.0",
    description="Fused Triton kernels for the losses of RL post-training of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rlloss", "rlloss.integrations", "rlloss.kernels"],
    package_dir={"rlloss.kernels": "kernels"},
    # Triton ships Linux wheels only; elsewhere the torch backend runs.
    install_requires=["torch>=2.4", "numpy", "triton>=3.2; platform_system == 'Linux'"],
    extras_require={
        # The test suite also builds the documentation site (tests/test_docs.py), hence the docs tools here.
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "transformers>=4.56",
                 "mkdocs>=1.6", "mkdocs-material>=9.5.20", "mkdocstrings[python]>=1.0"],
        # matplotlib draws the PNG plots of `python -m benchmarks` (skipped with a message when it is missing).
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5.20", "mkdocstrings[python]>=1.0"],
    },
    license="Apache-2.0",
)
