"""timm: "sassha" and "msassha" in timm's optimizer registry.

    from sassha_fused.integrations.timm import register
    register()
    opt = timm.optim.create_optimizer_v2(model, opt="sassha", lr=0.15, weight_decay=5e-4, rho=0.2)

``create_optimizer_v2`` then builds the optimizer with timm's parameter groups: no
weight decay on biases and normalisation weights (and on the model's
``no_weight_decay()``), and with ``layer_decay=`` an ``lr_scale`` per group, which
timm's schedulers multiply into each group's ``lr``. Options of ours (``rho``,
``lazy_hessian``, ``hvp``, ``backend``, ...) pass through as keyword arguments.

A SASSHA step takes more than ``loss.backward(); optimizer.step()`` (the loop of
timm's ``train.py``): drive it with ``opt.step(closure)`` or the official protocol
(README, section "timm"). ``step()`` refuses the plain loop with an error that says so.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..optimizer import MSASSHA, SASSHA
from . import require

require("timm", "timm", "sassha_fused.integrations.timm")

__all__ = ["NAMES", "register"]

#: the names ``register()`` adds
NAMES = ("sassha", "msassha")

_DESCRIPTIONS = {
    "sassha": "SASSHA: sharpness-aware adaptive second-order optimizer with a lazily refreshed diagonal "
              "Hessian (Shin et al., ICML 2025); needs opt.step(closure) or the protocol of sassha_fused",
    "msassha": "M-SASSHA: SASSHA perturbing along the momentum, one gradient per step; needs "
               "opt.step(closure) or the protocol of sassha_fused",
}


def _factory(cls: type) -> Callable[..., Any]:
    """``cls`` as timm calls it: ``cls(params, **opt_args)``, with ``foreach`` refused clearly."""

    def build(params: Any, foreach: Optional[bool] = None, **kwargs: Any) -> Any:
        if foreach is not None:
            raise ValueError(
                f"{cls.__name__}: foreach={foreach!r} is a torch.optim option; {cls.__name__} picks its "
                "implementation with backend= ('auto', the default, takes the fastest available: fused "
                "Triton/CUDA kernels on a GPU; 'foreach' is torch._foreach_*; 'eager' per tensor). Leave "
                "foreach unset (timm: no --opt-foreach) and pass backend=... if needed.")
        return cls(params, **kwargs)

    build.__name__ = build.__qualname__ = cls.__name__
    build.__doc__ = cls.__doc__
    build.__module__ = __name__
    build.__wrapped__ = cls  # type: ignore[attr-defined]
    return build


_BUILDERS = {"sassha": _factory(SASSHA), "msassha": _factory(MSASSHA)}


def _info(optim: Any, name: str) -> Any:
    return optim.OptimInfo(
        name=name,
        opt_class=_BUILDERS[name],
        description=_DESCRIPTIONS[name],
        has_eps=True,  # eps: added to the preconditioner
        has_betas=True,  # betas=(beta1, beta2)
        has_momentum=False,  # no SGD momentum argument (timm would pass momentum=0.9)
        second_order=True,  # metadata only (as Adahessian's); the optimizer sets no is_second_order
    )


def register(registry: Optional[Any] = None) -> None:
    """Add "sassha" and "msassha" to timm's optimizer registry (default: timm's own).

    Idempotent: names already registered by this function are left as they are
    (another optimizer registered under one of the names is replaced, with timm's
    warning).
    """
    require("timm", "timm", "registering SASSHA with timm's optimizer registry")
    optim = require("timm.optim", "timm", "registering SASSHA with timm's optimizer registry")
    if registry is None:
        factory = require("timm.optim._optim_factory", "timm", "registering SASSHA with timm's optimizer registry")
        registry = getattr(factory, "default_registry", None)
        if registry is None or not hasattr(optim, "OptimInfo"):
            raise ImportError(
                "sassha_fused: this timm has no optimizer registry (timm.optim.OptimInfo, "
                "timm.optim._optim_factory.default_registry); upgrade: pip install \"sassha_fused[timm]\"")
    for name in NAMES:
        try:
            current = registry.get_optimizer_info(name)
        except (KeyError, ValueError):
            current = None
        if current is not None and getattr(current, "opt_class", None) is _BUILDERS[name]:
            continue
        registry.register(_info(optim, name))
