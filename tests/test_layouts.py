"""The table layouts are written three times (Python, C++/CUDA, Triton); they must agree.

``GroupCol`` (the group table), ``UpdateCol`` (the per-tensor update scalars) and
``RefreshMode`` are defined in ``sassha_fused/backends/base.py`` and spelled out
again in ``csrc/sassha_math.h`` and ``triton_kernels/sassha.py``.
"""

import os
import re

from sassha_fused.backends import GroupCol, RefreshMode, UpdateCol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(cls):
    return {k: v for k, v in vars(cls).items() if k.isupper()}


def _cpp_enum(struct: str):
    src = open(os.path.join(REPO, "csrc", "sassha_math.h")).read()
    body = re.search(r"struct %s \{\s*enum : int \{(.*?)\};" % struct, src, re.S).group(1)
    out = {}
    for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", body):
        out[re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()] = int(value)
    return out


def _triton(prefix: str):
    src = open(os.path.join(REPO, "triton_kernels", "sassha.py")).read()
    return {name: int(v) for name, v in re.findall(r"^%s_(\w+) = tl\.constexpr\((\d+)\)" % prefix, src, re.M)}


def test_group_table_layout():
    py = _python(GroupCol)
    assert _cpp_enum("GroupCol") == py
    assert _triton("G") == py


def test_update_scalar_layout():
    py = _python(UpdateCol)
    assert _cpp_enum("UpdateCol") == py
    assert _triton("U") == py


def test_refresh_modes():
    py = _python(RefreshMode)
    assert _cpp_enum("RefreshMode") == py
    assert _triton("MODE") == py
