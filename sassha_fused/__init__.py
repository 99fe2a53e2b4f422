"""sassha_fused: the SASSHA optimizer (Shin, Lee, Chung, Lee, ICML 2025) for PyTorch.

    from sassha_fused import SASSHA, MSASSHA, available_backends
"""

import os as _os

# The Triton kernels live in the top-level ``triton_kernels/`` folder, which setup.py
# installs as ``sassha_fused.triton_kernels`` (Triton ships an unrelated top-level
# package of that name, so ours must never be importable as ``triton_kernels``).
# From a source checkout, expose the same folder under the same name.
_source_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "triton_kernels")
if _os.path.isfile(_os.path.join(_source_kernels, "__init__.py")) and not _os.path.isdir(
    _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "triton_kernels")
):
    __path__.append(_os.path.dirname(_source_kernels))  # noqa: F821  (package __path__)

from . import probes, schedules, sharpness  # noqa: E402
from .backends import BackendStatus, BackendUnavailable, available_backends, get_backend  # noqa: E402
from .optimizer import MSASSHA, SASSHA  # noqa: E402
from .utils import RandomState, preserve_bn_stats  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SASSHA",
    "MSASSHA",
    "available_backends",
    "get_backend",
    "BackendStatus",
    "BackendUnavailable",
    "preserve_bn_stats",
    "RandomState",
    "probes",
    "schedules",
    "sharpness",
    "__version__",
]
