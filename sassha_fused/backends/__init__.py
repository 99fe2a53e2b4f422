"""Backend registry: which implementations exist, which can run here, and why not.

``backend=`` accepts a name from ``BACKEND_NAMES`` or a ``Backend`` instance (tests
pass a spy that wraps a real backend, so the choice is made by argument).
``"auto"`` picks, per device, the fastest backend that can run there:

    CUDA params:  triton -> cuda -> foreach
    CPU params:   cpp    -> foreach

An optional backend whose import or build failed records the error when first
loaded; asking for it re-raises that error with the reason (apex's ``check_avail``
pattern). ``available_backends()`` reports all of them without raising.

``"auto"`` passing over the C++/CUDA extension because it failed to build (ninja
or a compiler missing, a compiler error: the exception carries ``build_cause``)
warns once per process; passing over a backend that does not apply here (no CUDA,
triton not installed) is silent.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch

from .base import (
    Backend,
    BackendUnavailable,
    Bucket,
    BucketColumns,
    GroupCol,
    GroupTable,
    ProbeKeys,
    RefreshInput,
    RefreshMode,
    UpdateCol,
    math_dtype,
)
from ..utils import warn_at_caller
from .eager import EagerBackend
from .foreach import ForeachBackend

__all__ = [
    "Backend",
    "BackendStatus",
    "BackendUnavailable",
    "BACKEND_NAMES",
    "Bucket",
    "BucketColumns",
    "GroupCol",
    "GroupTable",
    "ProbeKeys",
    "RefreshInput",
    "RefreshMode",
    "UpdateCol",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "math_dtype",
    "check_backend_name",
]

BACKEND_NAMES = ("auto", "eager", "foreach", "triton", "cuda", "cpp")

# Optional backends live in their own modules; each exposes ``load() -> Backend``
# and raises BackendUnavailable with the reason when it cannot run here.
_OPTIONAL_MODULES = {
    "triton": "sassha_fused.backends.triton_backend",
    "cuda": "sassha_fused.backends.cpp_backend",
    "cpp": "sassha_fused.backends.cpp_backend",
}

_BUILTIN: Dict[str, Callable[[], Backend]] = {
    "eager": EagerBackend,
    "foreach": ForeachBackend,
}

_AUTO_ORDER = {"cuda": ("triton", "cuda", "foreach"), "cpu": ("cpp", "foreach")}

_cache: Dict[str, Union[Backend, BackendUnavailable]] = {}
_auto_fallback_warned = False


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here; ``reason`` says why not (or what it runs on)."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _load(name: str) -> Union[Backend, BackendUnavailable]:
    if name in _cache:
        return _cache[name]
    if name in _BUILTIN:
        result: Union[Backend, BackendUnavailable] = _BUILTIN[name]()
    else:
        try:
            module = importlib.import_module(_OPTIONAL_MODULES[name])
            result = module.load(name)
        except BackendUnavailable as exc:
            result = exc
        except ImportError as exc:
            result = BackendUnavailable(f"backend {name!r} could not be imported: {exc}")
    _cache[name] = result
    return result


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises BackendUnavailable saying why it cannot run."""
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(
            f"unknown backend {name!r}: choose one of {', '.join(repr(n) for n in BACKEND_NAMES)}"
        )
    result = _load(name)
    if isinstance(result, BackendUnavailable):
        raise BackendUnavailable(f"backend {name!r} is not available: {result}")
    return result


def available_backends() -> Dict[str, BackendStatus]:
    """Each backend name -> BackendStatus(available, reason). Never raises."""
    out: Dict[str, BackendStatus] = {}
    for name in BACKEND_NAMES:
        if name == "auto":
            continue
        result = _load(name)
        if isinstance(result, BackendUnavailable):
            out[name] = BackendStatus(False, str(result))
        else:
            out[name] = BackendStatus(True, getattr(result, "description", "available"))
    return out


def resolve_backend(
    spec: Union[str, Backend], device: torch.device, dtype: torch.dtype
) -> Backend:
    """The backend that runs tensors of ``device``/``dtype`` for a ``backend=`` argument.

    An explicit name that cannot run raises with the reason; ``"auto"`` picks the
    first backend of ``_AUTO_ORDER`` that can.
    """
    if isinstance(spec, Backend):
        reason = spec.supports(device, dtype)
        if reason is not None:
            raise BackendUnavailable(f"backend {spec.name!r} cannot run {dtype} on {device}: {reason}")
        return spec
    if spec != "auto":
        backend = get_backend(spec)
        reason = backend.supports(device, dtype)
        if reason is not None:
            raise BackendUnavailable(f"backend {spec!r} cannot run {dtype} on {device}: {reason}")
        return backend
    failed_build = None  # (name, reason) of a backend skipped because its build failed
    for name in _AUTO_ORDER.get(device.type, ("foreach",)):
        result = _load(name)
        if isinstance(result, Backend) and result.supports(device, dtype) is None:
            break
        if failed_build is None and getattr(result, "build_cause", None):
            failed_build = (name, str(result))
    else:
        result = _load("foreach")
    if failed_build is not None:
        _warn_auto_fallback(failed_build[0], failed_build[1], result.name, device)  # type: ignore[union-attr]
    return result  # type: ignore[return-value]


def _warn_auto_fallback(skipped: str, reason: str, chosen: str, device: torch.device) -> None:
    """One warning per process: "auto" passed over a backend whose extension did not build."""
    global _auto_fallback_warned
    if _auto_fallback_warned:
        return
    _auto_fallback_warned = True
    first = reason.strip().splitlines()[0] if reason.strip() else "no reason recorded"
    # at the caller's line, outside this package and torch (torch.optim's constructor calls ours)
    warn_at_caller(
        f"sassha_fused: backend='auto' runs {device.type} tensors on {chosen!r} instead of {skipped!r}: "
        f"the C++ extension is unavailable: {first} (sassha_fused.available_backends() gives the full "
        "reason; pass backend='foreach' to choose the fallback explicitly and silence this)")


def check_backend_name(spec: Optional[Union[str, Backend]]) -> None:
    """Raise ValueError for a name that is not a backend at all."""
    if isinstance(spec, Backend):
        return
    if spec not in BACKEND_NAMES:
        raise ValueError(
            f"backend: unknown backend {spec!r}; choose one of "
            f"{', '.join(repr(n) for n in BACKEND_NAMES)} or pass a Backend instance"
        )
