"""Test configuration.

Without a GPU, Triton kernels run on the CPU under Triton's interpreter, which must
be switched on before triton is first imported anywhere in the process: it is set
here, at the top of the first module pytest loads (``run.sh test`` exports it too).
With a GPU it stays off, and the parity harness (``parity.DEVICE``) puts parameters
on the GPU, so the same tests run the compiled kernels there.
"""

import os
import sys

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/parity.py

import pytest  # noqa: E402

from sassha_fused import available_backends  # noqa: E402

_STATUS = available_backends()


def _requires(name: str):
    status = _STATUS[name]
    return pytest.mark.skipif(not status.available, reason=f"backend {name!r} unavailable here: {status.reason}")


def every_backend(*names: str):
    """``pytest.param`` per backend: the unavailable ones show up as skipped, with the reason."""
    names = names or ("eager", "foreach", "cpp", "triton", "cuda")
    return [pytest.param(n, id=n, marks=pytest.mark.skipif(not _STATUS[n].available,
                                                           reason=f"backend {n!r} unavailable here: {_STATUS[n].reason}"))
            for n in names]


def device_for(backend: str) -> str:
    """Where a backend's tests put their params: the CPU for 'cpp', else the parity device."""
    from parity import DEVICE

    return "cpu" if backend == "cpp" else ("cuda" if backend == "cuda" else DEVICE)


requires_triton = _requires("triton")
requires_cpp = _requires("cpp")
requires_cuda_backend = _requires("cuda")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
