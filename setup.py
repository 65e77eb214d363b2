"""megatron-sed: SED-SFT (selective diversity regularisation for SFT) for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-sed",
    version="0.1.0",
    description="Vocab-parallel SED-SFT loss and Megatron-Core SFT plugin (--loss-type sed)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sed", "megatron_sed.*"]),
    include_package_data=True,
    install_requires=[
        # Pinned exactly by constraints.txt in scripts/; ranges here so a cluster
        # image with its own torch / megatron-core is not replaced.
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "packaging",
        "tqdm",
        "datasets>=3.0",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "sacrebleu>=2.4",
        "matplotlib",
        "tensorboard",
        "psutil",
    ],
    extras_require={
        # The trainer (megatron-sed-train) runs Megatron's own pretrain loop, which the
        # megatron-core wheel ships from 0.19 (Python >= 3.12).
        "training": ["megatron-core[training]>=0.19"],
        # Everything the CPU test-suite needs. Triton runs its kernels on CPU
        # tensors with TRITON_INTERPRET=1; six/regex/pyyaml/pydantic let
        # Megatron-LM's argument parser and pretrain_gpt import on CPU.
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",  # lint + format check, run by scripts/test.sh before pytest
            "triton>=3.1",
            "six",
            "regex",
            "pyyaml",
            "pydantic",
        ],
        # GPU clusters: Transformer Engine for bf16/FP8 layers. apex is optional and
        # never a pip dependency (the PyPI name "apex" is an unrelated package).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "megatron-sed-train=megatron_sed.train.__main__:main",
            "megatron-sed-preprocess=megatron_sed.data.preprocess:main",
            "megatron-sed-eval=megatron_sed.eval.__main__:main",
            "megatron-sed-convert=megatron_sed.convert.__main__:main",
        ]
    },
)
