"""One table of defaults, their validation, and the argument documentation.

Both optimizer classes take their defaults from ``DEFAULTS`` (and ``SASSHA_ONLY`` /
``MSASSHA_ONLY``), validate through ``validate_options`` / ``validate_group``, and
share ``ARGS_DOC``. Adding a hyper-parameter means: a row here, a line of
``ARGS_DOC``, a check in a validator, the keyword in the class signatures, and its
use (``functional.py`` for scalars of the update).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from .schedules import is_schedule

__all__ = [
    "DEFAULTS",
    "SASSHA_ONLY",
    "MSASSHA_ONLY",
    "GROUP_KEYS",
    "HVP_METHODS",
    "FD_SCHEMES",
    "ARGS_DOC",
    "validate_group",
    "validate_options",
]

# Keyword -> default, in the order of the class signatures.
DEFAULTS: Dict[str, Any] = dict(
    lr=0.15,
    betas=(0.9, 0.999),
    weight_decay=0.0,
    rho=0.2,
    lazy_hessian=10,
    n_samples=1,
    eps=1e-4,
    perturb_eps=1e-12,
    hessian_power=0.5,
    seed=0,
    hvp="auto",
    fd_eps="auto",
    fd_scheme="forward",
    backend="auto",
    nonfinite="skip",
    max_consecutive_skips=10,
    distributed=True,
    process_group=None,
    grad_scaler=None,
    capturable=False,
)
SASSHA_ONLY: Dict[str, Any] = dict(adaptive=False, defer_unperturb=False, no_sync=None)
MSASSHA_ONLY: Dict[str, Any] = dict()

# What a param group may set for itself (torch.optim's per-group hyper-parameters).
GROUP_KEYS = ("lr", "betas", "weight_decay", "rho", "eps", "perturb_eps")

HVP_METHODS = ("auto", "autograd", "finite_difference")
FD_SCHEMES = ("forward", "central")
NONFINITE = ("skip", "raise", "ignore")

ARGS_DOC = r"""
    Args:
        params: iterable of parameters or dicts defining parameter groups. Groups
            may set their own ``lr``, ``betas``, ``weight_decay``, ``rho``, ``eps``
            and ``perturb_eps``.
        lr: learning rate :math:`\eta` (default 0.15).
        betas: :math:`(\beta_1, \beta_2)`, decays of the momentum and of the
            absolute Hessian-diagonal EMA (default (0.9, 0.999)).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rho: perturbation radius :math:`\rho`, a number or a schedule object with
            ``step() -> float`` called once per optimizer step (``schedules.py``).
        lazy_hessian: refresh the Hessian estimate every ``k`` steps: at steps
            1, k+1, 2k+1, ... (default 10).
        n_samples: Rademacher probes per refresh (default 1).
        eps: added to the preconditioner after the power (default 1e-4).
        perturb_eps: added to the norm of the perturbation direction (default 1e-12).
        hessian_power: exponent :math:`p` of the preconditioner, a number or a
            schedule object (default 0.5, the square root).
        seed: seed of the counter-based probes (``sassha_fused.probes``); the
            same seed gives the same probes on every backend, device and rank.
        hvp: how Hessian-vector products are taken on refresh steps.
            ``"autograd"``: a double backward (exact; needs ``create_graph=True``
            on the pass before it). ``"finite_difference"``:
            :math:`Hz \approx (\nabla f(\tilde x + \delta z) - \nabla f(\tilde x))/\delta`,
            one more ordinary forward/backward per probe and no graph: works with
            ``torch.compile``, fused attention, activation checkpointing, FSDP2 and
            closures that call ``backward()``. ``"auto"`` (default): autograd where
            the model supports a double backward; through ``step(closure)`` a
            refresh step that cannot differentiate twice finishes with finite
            differences and the run stays with them (one warning), and a closure
            that calls ``backward()`` itself selects them. ``hvp_method`` tells
            which one runs.
        fd_eps: relative step of the finite differences:
            :math:`\delta = \text{fd\_eps}\,(1 + \lVert x_t\rVert_2)/\sqrt{N}`
            over the N elements of the params taking part, about ``fd_eps`` times
            their RMS. ``"auto"`` (default) picks it from the precision the
            gradients were computed in: 1e-3 (forward) / 3e-3 (central) for
            float32, 3e-2 for bf16/fp16 (16-bit params, or autocast, recognised from
            the gradients' mantissa bits), 1e-7 / 1e-5 for float64.
        fd_scheme: ``"forward"`` (default, one pass per probe, reuses the
            gradient at :math:`\tilde x`) or ``"central"`` (two passes per probe,
            second-order accurate).
        backend: ``"auto"``, ``"eager"``, ``"foreach"``, ``"triton"``, ``"cuda"``,
            ``"cpp"``, or a ``Backend`` instance. ``"auto"`` picks the fastest
            available for each device; an explicit choice that cannot run raises
            and says why (``available_backends()`` lists them).
        nonfinite: what a step whose gradients or Hessian estimate hold NaN/Inf
            does. ``"skip"`` (default): parameters (unperturbed) and every state
            entry stay as they were; the decision is a device flag the update
            reads (no host synchronisation), and the warning and ``skipped_steps``
            follow when the flag has reached the host (at the latest one step
            later on a GPU). ``"raise"``: the same, then ``FloatingPointError``
            (reads the flag at once). ``"ignore"``: no check.
        max_consecutive_skips: ``FloatingPointError`` once this many steps in a
            row were skipped (the run is stuck); ``None`` never raises (default 10).
        distributed: when ``torch.distributed`` is initialised, average the
            perturbed gradients and Hessian-vector products over ``process_group``
            in flat buckets before the update (default True). Turn off when a
            wrapper already averages them. FSDP2 (``fully_shard``) parameters are
            recognised: FSDP averages every pass, the optimizer steps each rank's
            shards and only sums scalars (norms, the finite check) over the mesh.
        process_group: the group to average over (default: the default group).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training: the optimizer
            unscales the first-pass gradients before perturbing and the
            Hessian-vector products before the update (drive the step with
            ``scaler.step(opt)``; see the README).
        capturable: keep every per-step value on the device so that the
            optimizer's calls can be captured in a CUDA graph (CUDA params only).
"""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_group(group: Mapping[str, Any]) -> None:
    """ValueError naming the argument for an invalid per-group hyper-parameter."""
    lr, betas = group["lr"], group["betas"]
    if hasattr(lr, "dim"):  # a tensor learning rate (capturable runs)
        if lr.numel() != 1 or not float(lr) >= 0.0:
            raise ValueError(f"lr: invalid learning rate {lr!r}, it must be a one-element tensor >= 0")
    elif not _is_number(lr) or not 0.0 <= lr:
        raise ValueError(f"lr: invalid learning rate {lr!r}, it must be a number >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas: beta{i + 1} = {b!r} is outside [0, 1)")
    for name in ("weight_decay", "eps", "perturb_eps"):
        if not _is_number(group[name]) or not group[name] >= 0.0:
            raise ValueError(f"{name}: invalid value {group[name]!r}, it must be a number >= 0")
    rho = group["rho"]
    if not is_schedule(rho) and not (_is_number(rho) and rho >= 0.0):
        raise ValueError(f"rho: invalid perturbation radius {rho!r}, it must be >= 0")


def validate_options(options: Mapping[str, Any]) -> None:
    """ValueError naming the argument for an invalid optimizer-wide option."""
    from .backends import check_backend_name

    def positive_int(name: str) -> None:
        v = options[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")

    positive_int("lazy_hessian")
    positive_int("n_samples")
    if options["nonfinite"] not in NONFINITE:
        raise ValueError(f"nonfinite: expected one of {', '.join(map(repr, NONFINITE))}, got {options['nonfinite']!r}")
    skips = options["max_consecutive_skips"]
    if skips is not None and (not isinstance(skips, int) or isinstance(skips, bool) or skips < 1):
        raise ValueError(f"max_consecutive_skips: must be an integer >= 1 or None, got {skips!r}")
    power = options["hessian_power"]
    if not is_schedule(power) and not _is_number(power):
        raise ValueError(f"hessian_power: expected a number or a schedule, got {power!r}")
    seed = options["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed: must be an integer in [0, 2**64), got {seed!r}")
    if options["hvp"] not in HVP_METHODS:
        raise ValueError(f"hvp: expected one of {', '.join(map(repr, HVP_METHODS))}, got {options['hvp']!r}")
    if options["fd_scheme"] not in FD_SCHEMES:
        raise ValueError(f"fd_scheme: expected one of {', '.join(map(repr, FD_SCHEMES))}, got {options['fd_scheme']!r}")
    fd_eps = options["fd_eps"]
    if fd_eps != "auto" and not (_is_number(fd_eps) and math.isfinite(fd_eps) and fd_eps > 0):
        raise ValueError(f"fd_eps: expected 'auto' or a finite number > 0 (the relative finite-difference step), "
                         f"got {fd_eps!r}")
    if options["capturable"] and options["nonfinite"] == "raise":
        raise ValueError("nonfinite: 'raise' reads the finite flag on the host every step, which a captured "
                         "CUDA graph cannot; with capturable=True use 'skip' (and read opt.skipped_steps) or 'ignore'")
    check_backend_name(options["backend"])
