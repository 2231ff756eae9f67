"""Packaging for rlloss.

The top-level folder ``kernels/`` holds the Triton device code and is installed as the subpackage
``rlloss.kernels``, so no top-level module named ``kernels`` is installed. Likewise the top-level folder
``benchmarks/`` is installed as ``rlloss.bench``: ``python -m benchmarks`` runs in the repository root, and
``rlloss-bench`` (= ``python -m rlloss.bench``) anywhere after ``pip install``, without installing a top-level
module with a name as generic as ``benchmarks``.
"""
from setuptools import setup

# What `import verl` and verl's FSDP engine need beyond torch, transformers and TRL's dependencies. verl itself pins
# transformers < 5.11, so it is installed apart, with `pip install --no-deps "verl==0.9.1"` (the README's test
# command); rlloss.integrations.verl follows verl 0.9.1's code.
VERL_IMPORTS = ["ray>=2.41", "tensordict==0.10.0", "omegaconf>=2.3", "codetiming", "pillow", "pandas", "datasets",
                "peft"]

setup(
    name="rlloss",
    version="0.1.0",
    description="Fused Triton kernels for the losses of RL post-training of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rlloss", "rlloss.integrations", "rlloss.kernels", "rlloss.bench"],
    package_dir={"rlloss.kernels": "kernels", "rlloss.bench": "benchmarks"},
    entry_points={"console_scripts": ["rlloss-bench = rlloss.bench.__main__:main"]},
    # Triton ships Linux wheels only; elsewhere the torch backend runs.
    install_requires=["torch>=2.4", "numpy", "triton>=3.2; platform_system == 'Linux'"],
    extras_require={
        # The test suite also builds the documentation site (tests/test_docs.py), hence the docs tools here.
        "test": ["pytest>=8", "hypothesis>=6", "transformers>=4.56", "trl>=1.16,<1.17",
                 "mkdocs>=1.6", "mkdocs-material>=9.5.20", "mkdocstrings[python]>=1.0", *VERL_IMPORTS],
        # Everything the default run of `python -m benchmarks` / `rlloss-bench` uses: matplotlib draws the PNG
        # plots, transformers builds the prefix_model suite's model, and the peers measured against rlloss
        # (pure-Python wheels that depend only on torch and Triton; liger-kernel requires Triton, which has Linux
        # wheels only, so elsewhere it is left out and its rows are skipped with the reason).
        "bench": ["matplotlib>=3.7", "transformers>=4.56", "cut-cross-entropy>=25.1",
                  "liger-kernel>=0.6; platform_system == 'Linux'"],
        # rlloss.integrations.trl (RllossGRPOTrainer, patch_grpo_trainer) follows TRL 1.16's GRPOTrainer code.
        "trl": ["trl>=1.16,<1.17"],
        # rlloss.integrations.verl: with `pip install --no-deps "verl==0.9.1"`.
        "verl": VERL_IMPORTS,
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5.20", "mkdocstrings[python]>=1.0"],
    },
    license="Apache-2.0",
)
