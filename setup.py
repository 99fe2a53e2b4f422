"""Build and install sassha_fused.

Layout: ``sassha_fused/`` is the package; the top-level ``triton_kernels/`` folder is
installed as ``sassha_fused.triton_kernels`` (Triton ships its own top-level
``triton_kernels`` package, which ours must never shadow); ``csrc/`` holds the
C++/CUDA extension sources.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["sassha_fused", "sassha_fused.*"]) + ["sassha_fused.triton_kernels"]
# The extension's sources ship inside the package, so an installed copy can build
# them just in time (sassha_fused/_build.py) when no install-time build exists.
packages.append("sassha_fused.csrc")

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_args():
    """ext_modules/cmdclass for the C++ (and, with a CUDA torch and nvcc, CUDA) extension.

    Built only when torch is importable here (``pip install --no-build-isolation``);
    otherwise the package installs without it and builds it on first use. A failed
    build never fails the install: it is reported, and the first use rebuilds just in
    time and records the compiler's message for ``available_backends()``.
    """
    if os.environ.get("SASSHA_FUSED_NO_EXTENSION") == "1":
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # no torch in an isolated build environment
        print(f"sassha_fused: torch not importable at build time ({exc}); "
              "the C++ extension will be built on first use", file=sys.stderr)
        return {}
    spec = importlib.util.spec_from_file_location("_sassha_build", os.path.join(HERE, "sassha_fused", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses look their module up there
    spec.loader.exec_module(build)
    csrc = os.path.join(HERE, "csrc")
    with_cuda, why_not = build.cuda_build_possible()
    define = f"-DSASSHA_FUSED_SOURCES_HASH={build.sources_hash(csrc)}"
    sources = [os.path.relpath(p, HERE) for p in build.extension_sources(csrc, with_cuda)]
    kind = CUDAExtension if with_cuda else CppExtension
    if not with_cuda:
        print(f"sassha_fused: building the C++ extension without CUDA kernels ({why_not})", file=sys.stderr)
    ext = kind(
        "sassha_fused._C",
        sources,
        include_dirs=[csrc],
        extra_compile_args={"cxx": build.CXX_FLAGS + [define], "nvcc": build.NVCC_FLAGS + [define]},
    )

    class SafeBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing: install without it
                print(f"sassha_fused: WARNING: the C++ extension did not build ({exc}); the package "
                      "is installed without it and will try to build it on first use", file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}}


def _safe_extension_args():
    try:
        return _extension_args()
    except Exception as exc:  # never let the optional extension break installing
        print(f"sassha_fused: WARNING: skipping the C++ extension ({exc})", file=sys.stderr)
        return {}


setup(
    name="sassha_fused",
    version="0.1.0",
    description="SASSHA optimizer for PyTorch with fused Triton and C++/CUDA kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    author="sassha_fused developers",
    license="MIT",
    license_files=["LICENSE"],
    keywords=["pytorch", "optimizer", "sassha", "second-order", "sharpness-aware", "hessian",
              "triton", "cuda", "deep-learning"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Software Development :: Libraries :: Python Modules",
        "Typing :: Typed",
    ],
    packages=packages,
    package_dir={"sassha_fused.triton_kernels": "triton_kernels", "sassha_fused.csrc": "csrc"},
    package_data={"sassha_fused": ["py.typed"], "sassha_fused.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    python_requires=">=3.9",
    # torch is not pinned here: the setup script installs the right build first, and
    # an already installed torch (a GPU machine's) must be kept. ninja: the C++
    # extension is built just in time on first use unless it was built at install
    # time (pip install --no-build-isolation .), and that build needs ninja.
    install_requires=["torch>=2.1", "ninja"],
    extras_require={
        "triton": ["triton"],
        # sassha_fused.integrations.hf: transformers' Trainer (training_step with num_items_in_batch: 4.46;
        # TrainingArguments needs accelerate)
        "hf": ["transformers>=4.46", "accelerate>=0.26"],
        "lightning": ["lightning>=2.1"],
        # timm's optimizer registry (timm.optim create_optimizer_v2 / OptimInfo) arrived in 1.0.12
        "timm": ["timm>=1.0.12"],
        "demo": ["scikit-learn", "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11"],
        # the documentation site: mkdocs build --strict (mkdocs.yml, docs/)
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    **_safe_extension_args(),
)
