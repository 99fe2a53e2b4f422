"""Test configuration.

Triton kernels run on the CPU under Triton's interpreter, which must be switched on
before triton is first imported anywhere in the process: set it here, at the top of
the first module pytest loads. ``.ci/run`` and the README's test command also export
it, so a run started some other way behaves the same.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/parity.py

import pytest  # noqa: E402
import torch  # noqa: E402

from sassha_fused import available_backends  # noqa: E402

_STATUS = available_backends()


def _requires(name: str):
    status = _STATUS[name]
    return pytest.mark.skipif(not status.available, reason=f"backend {name!r} unavailable here: {status.reason}")


requires_triton = _requires("triton")
requires_cpp = _requires("cpp")
requires_cuda_backend = _requires("cuda")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
