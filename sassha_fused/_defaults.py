"""One table of defaults, their validation, and the argument documentation.

``OPTIONS`` declares every keyword of both optimizer classes once: its default,
whether it is a per-group hyper-parameter or an optimizer-wide option, which class
takes it, whether ``state_dict()`` saves it, and its documentation. The classes'
defaults, docstrings (``args_doc``), attributes, ``repr`` and saved options all come
from it. Adding a hyper-parameter means: a row here, a check in a validator, the
keyword in the class signatures, and its use (``functional.py`` for scalars of the
update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .schedules import is_schedule

__all__ = [
    "Option",
    "OPTIONS",
    "OPTION",
    "args_doc",
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

@dataclass(frozen=True)
class Option:
    """One keyword of the optimizer classes: its default, where it lives, its documentation.

    ``scope``: ``"group"`` for torch.optim's per-group hyper-parameters (kept in
    ``param_groups``), ``"optimizer"`` for optimizer-wide options (attributes of the
    optimizer, listed by ``repr``). ``only``: the one class that takes it. ``saved``:
    stored in ``state_dict()`` (a resumed run keeps it). ``convert``: applied to the
    value before it is kept.
    """

    name: str
    default: Any
    scope: str
    only: Optional[str] = None
    saved: bool = False
    convert: Optional[Callable[[Any], Any]] = None
    doc: str = ""

    def takes(self, cls_name: str) -> bool:
        return self.only is None or self.only == cls_name


#: Every keyword of SASSHA and M-SASSHA, in the order of their signatures: the one place
#: that sets defaults, docs (``args_doc``), attributes, ``repr`` and what ``state_dict`` saves.
OPTIONS: Tuple[Option, ...] = (
    Option("lr", 0.15, "group", doc=r"""
        learning rate :math:`\eta` (default 0.15)."""),
    Option("betas", (0.9, 0.999), "group", doc=r"""
        :math:`(\beta_1, \beta_2)`, decays of the momentum and of the
        absolute Hessian-diagonal EMA (default (0.9, 0.999))."""),
    Option("weight_decay", 0.0, "group", doc=r"""
        decoupled weight decay :math:`\lambda` (default 0)."""),
    Option("rho", 0.2, "group", doc=r"""
        perturbation radius :math:`\rho`, a number or a schedule object with
        ``step() -> float`` called once per optimizer step (``schedules.py``)."""),
    Option("lazy_hessian", 10, "optimizer", doc=r"""
        refresh the Hessian estimate every ``k`` steps: at steps
        1, k+1, 2k+1, ... (default 10)."""),
    Option("n_samples", 1, "optimizer", doc=r"""
        Rademacher probes per refresh (default 1)."""),
    Option("eps", 1e-4, "group", doc=r"""
        added to the preconditioner after the power (default 1e-4)."""),
    Option("perturb_eps", 1e-12, "group", doc=r"""
        added to the norm of the perturbation direction (default 1e-12)."""),
    Option("hessian_power", 0.5, "optimizer", doc=r"""
        exponent :math:`p` of the preconditioner, a number or a
        schedule object (default 0.5, the square root)."""),
    Option("adaptive", False, "optimizer", only="SASSHA", convert=bool, doc=r"""
        element-wise adaptive perturbation (ASAM): the norm is taken over
        :math:`|x| \odot g` and :math:`e = \rho\, x^2 \odot g / (n + \epsilon_p)`."""),
    Option("seed", 0, "optimizer", saved=True, doc=r"""
        seed of the counter-based probes (``sassha_fused.probes``); the
        same seed gives the same probes on every backend, device and rank."""),
    Option("backend", "auto", "optimizer", doc=r"""
        ``"auto"``, ``"eager"``, ``"foreach"``, ``"triton"``, ``"cuda"``,
        ``"cpp"``, or a ``Backend`` instance. ``"auto"`` picks the fastest
        available for each device; an explicit choice that cannot run raises
        and says why (``available_backends()`` lists them)."""),
    Option("hvp", "auto", "optimizer", doc=r"""
        how Hessian-vector products are taken on refresh steps.
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
        which one runs."""),
    Option("fd_eps", "auto", "optimizer", doc=r"""
        relative step of the finite differences:
        :math:`\delta = \text{fd\_eps}\,(1 + \lVert x_t\rVert_2)/\sqrt{N}`
        over the N elements of the params taking part, about ``fd_eps`` times
        their RMS. ``"auto"`` (default) picks it from the precision the
        gradients were computed in: 1e-3 (forward) / 3e-3 (central) for
        float32, 3e-2 for bf16/fp16 (16-bit params, or autocast, recognised from
        the gradients' mantissa bits), 1e-7 / 1e-5 for float64."""),
    Option("fd_scheme", "forward", "optimizer", doc=r"""
        ``"forward"`` (default, one pass per probe, reuses the
        gradient at :math:`\tilde x`) or ``"central"`` (two passes per probe,
        second-order accurate)."""),
    Option("nonfinite", "skip", "optimizer", doc=r"""
        what a step whose gradients or Hessian estimate hold NaN/Inf
        does. ``"skip"`` (default): parameters (unperturbed) and every state
        entry stay as they were; the decision is a device flag the update
        reads (no host synchronisation), and the warning and ``skipped_steps``
        follow when the flag has reached the host (at the latest one step
        later on a GPU). ``"raise"``: the same, then ``FloatingPointError``
        (reads the flag at once). ``"ignore"``: no check."""),
    Option("max_consecutive_skips", 10, "optimizer", doc=r"""
        ``FloatingPointError`` once this many steps in a
        row were skipped (the run is stuck); ``None`` never raises (default 10)."""),
    Option("distributed", True, "optimizer", convert=bool, doc=r"""
        when ``torch.distributed`` is initialised, average the
        perturbed gradients and Hessian-vector products over ``process_group``
        in flat buckets before the update (default True). Turn off when a
        wrapper already averages them. FSDP2 (``fully_shard``) parameters are
        recognised: FSDP averages every pass, the optimizer steps each rank's
        shards and only sums scalars (norms, the finite check) over the mesh."""),
    Option("process_group", None, "optimizer", doc=r"""
        the group to average over (default: the default group)."""),
    Option("grad_scaler", None, "optimizer", doc=r"""
        a ``torch.amp.GradScaler`` for fp16 training: the optimizer
        unscales the first-pass gradients before perturbing and the
        Hessian-vector products before the update (drive the step with
        ``scaler.step(opt)``; see the README)."""),
    Option("capturable", False, "optimizer", convert=bool, doc=r"""
        keep every per-step value on the device so that the
        optimizer's calls can be captured in a CUDA graph (CUDA params only)."""),
    Option("state_bits", 32, "optimizer", doc=r"""
        how ``exp_avg`` and ``exp_hessian_diag`` are kept: ``32`` (default)
        in float32; ``16`` in bfloat16; ``8`` as 8-bit codes with one float32
        scale per 32 elements (1.125 bytes per element; the encodings are in
        ``sassha_fused.encoding``). The update decodes, computes in float32 and
        encodes again in one pass; ``opt.float_state(p)`` reads them as floats.
        Under FSDP2 a parameter whose shards do not split at groups of 32
        elements (biases, norms) keeps ``16`` instead of ``8``.
        With compact state (16, 8, or master weights) SASSHA also holds the x_t
        backup only inside a step (not with ``capturable``)."""),
    Option("master_weight_bits", None, "optimizer", doc=r"""
        for bfloat16 parameters: ``24`` or ``32`` keeps the bits of a float32
        master weight below the parameter's 16 in ``master_correction`` state
        (8 bits: int8, or all 16: int16), and the update computes on the master
        and writes both halves; ``None`` (default) updates the bfloat16 values
        themselves. Other parameters are their own master."""),
    Option("defer_unperturb", False, "optimizer", only="SASSHA", convert=bool, doc=r"""
        in the official protocol, let ``unperturb()`` leave the
        restore to the next ``step()``, which fuses it into the update (one read
        and one write of every parameter less per step). Parameters read between
        ``unperturb()`` and ``step()`` then still hold the perturbed point; any
        other call (``perturb_weights``, ``state_dict``, ``unperturbed()``)
        restores first. Default False: ``unperturb()`` restores at once."""),
    Option("no_sync", None, "optimizer", only="SASSHA", doc=r"""
        DDP-native data parallelism: pass ``model.no_sync`` of a
        ``DistributedDataParallel`` model. The first pass of each step runs
        under it, so every rank perturbs along its own gradient (SPEC section
        6), and DDP's reducer averages the perturbed and finite-difference
        passes, overlapped with their backward; the optimizer issues no
        collective of its own and the Hessian-vector products are taken by
        finite differences. In the official protocol wrap the first backward
        yourself: ``with model.no_sync(): loss_fn(model(x), y).backward()``."""),
)
OPTION = {o.name: o for o in OPTIONS}

DEFAULTS: Dict[str, Any] = {o.name: o.default for o in OPTIONS if o.only is None}
SASSHA_ONLY: Dict[str, Any] = {o.name: o.default for o in OPTIONS if o.only == "SASSHA"}
MSASSHA_ONLY: Dict[str, Any] = {o.name: o.default for o in OPTIONS if o.only == "MSASSHA"}

# What a param group may set for itself (torch.optim's per-group hyper-parameters).
GROUP_KEYS = tuple(o.name for o in OPTIONS if o.scope == "group")

HVP_METHODS = ("auto", "autograd", "finite_difference")
FD_SCHEMES = ("forward", "central")
NONFINITE = ("skip", "raise", "ignore")

_PARAMS_DOC = """\
        params: iterable of parameters or dicts defining parameter groups. Groups
            may set their own ``lr``, ``betas``, ``weight_decay``, ``rho``, ``eps``
            and ``perturb_eps``."""


def args_doc(cls_name: Optional[str] = None, shared: bool = True) -> str:
    """The ``Args:`` section of a class docstring, from ``OPTIONS``: the options both classes
    take (``shared``), or only those of ``cls_name``."""
    rows = [o for o in OPTIONS if (o.only is None) == shared and (shared or o.only == cls_name)]
    text = []
    for o in rows:
        first, *rest = o.doc.strip("\n").split("\n")
        text.append("\n".join([f"        {o.name}: {first.strip()}"] + ["    " + line if line else line for line in rest]))
    head = "\n    Args:\n" + _PARAMS_DOC + "\n" if shared else ""
    return head + "\n".join(text) + "\n"


ARGS_DOC = args_doc()


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
    if options["state_bits"] not in (32, 16, 8) or isinstance(options["state_bits"], bool):
        raise ValueError(f"state_bits: expected 32, 16 or 8, got {options['state_bits']!r}")
    if options["master_weight_bits"] not in (None, 24, 32) or isinstance(options["master_weight_bits"], bool):
        raise ValueError(f"master_weight_bits: expected None, 24 or 32, got {options['master_weight_bits']!r}")
    check_backend_name(options["backend"])
    no_sync = options.get("no_sync")
    if no_sync is not None and not callable(no_sync):
        raise ValueError(f"no_sync: expected DDP's model.no_sync (a callable returning a context manager), "
                         f"got {no_sync!r}")
