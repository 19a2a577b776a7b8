"""Plain setuptools build: pure Python, nothing compiled at install time, torch not imported."""
from setuptools import find_packages, setup

setup(
    name="lamb_kernels",
    version="0.1.0",
    description="Fused LAMB optimizer for PyTorch: Triton multi-tensor kernels and a pure-torch fallback",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lamb_kernels", "lamb_kernels.*"]),
    python_requires=">=3.10",
    # A range, never a pin: with a suitable torch already installed (CPU or CUDA build) pip keeps it.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "triton>=3.0"]},
)
