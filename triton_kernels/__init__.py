"""SASSHA's Triton kernels, installed as ``sassha_fused.triton_kernels``.

Always import through ``sassha_fused.triton_kernels``: Triton ships an unrelated
top-level package called ``triton_kernels``. The host side (grouping, tables,
launches) is ``sassha_fused/backends/triton_backend.py``.
"""

from . import sassha  # noqa: F401

__all__ = ["sassha"]
