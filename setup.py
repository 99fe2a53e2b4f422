"""Build and install sassha_fused.

Layout: ``sassha_fused/`` is the package; the top-level ``triton_kernels/`` folder is
installed as ``sassha_fused.triton_kernels`` (Triton ships its own top-level
``triton_kernels`` package, which ours must never shadow); ``csrc/`` holds the
C++/CUDA extension sources.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["sassha_fused", "sassha_fused.*"]) + ["sassha_fused.triton_kernels"]

setup(
    name="sassha_fused",
    version="0.1.0",
    description="SASSHA optimizer for PyTorch with fused Triton and C++/CUDA kernels",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=packages,
    package_dir={"sassha_fused.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    # torch is not pinned here: the setup script installs the right build first, and
    # an already installed torch (a GPU machine's) must be kept.
    install_requires=["torch>=2.1"],
    extras_require={
        "triton": ["triton"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11"],
        "demo": ["scikit-learn", "tqdm"],
    },
)
