"""Install the `deqlab` package from `lib/` (``pip install -e .``)."""
from setuptools import find_packages, setup

subpackages = [f"deqlab.{name}" for name in find_packages("lib")]

setup(
    name="deqlab",
    version="0.1.0",
    description="Deep Equilibrium Models and Multiscale DEQs: solvers, implicit gradients, training.",
    python_requires=">=3.10",
    package_dir={"deqlab": "lib"},
    packages=["deqlab", *subpackages],
    install_requires=open("requirements.txt").read().split(),
    extras_require={
        # torchdeq: tests/test_budgets.py checks deqlab's fixed-point budget against torchdeq's own solver
        "test": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3", "matplotlib>=3.7", "torchdeq==0.1.0"],
        "bench": ["torchdeq==0.1.0", "termcolor"],  # termcolor: imported by the original MDEQ code (compare_original.py)
        "plot": ["matplotlib>=3.7"],
        "lm": ["rdata>=1.0"],
        "tb": ["tensorboard>=2.12"],  # only to view the event files (tensorboardX writes them)
        # NVIDIA DALI loaders (DATASET.LOADER dali); the CUDA 13 build, which also runs CPU-only pipelines.
        # For CUDA 12 drivers install nvidia-dali-cuda120 instead.
        "dali": ["nvidia-dali-cuda130>=2.0"],
    },
)
