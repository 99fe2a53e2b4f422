r"""How :math:`Hz` is obtained on a Hessian-refresh step.

* ``"autograd"``: a double backward through the graph of the pass at the HVP point
  :math:`\tilde x` (``autograd_refresh``); exact, but it needs ``create_graph=True``
  on that pass, which ``torch.compile``, fused attention, reentrant checkpointing,
  FSDP2 and closures that call ``backward()`` cannot give.
* ``"finite_difference"``: ordinary forward/backward passes at
  :math:`\tilde x \pm \delta z` (``FiniteDifferences``):

  forward (default): :math:`h = \tfrac1S \sum_s z_s \odot (\nabla f(\tilde x + \delta z_s) - \nabla f(\tilde x))/\delta`,
  reusing the gradient :math:`\nabla f(\tilde x)` the step already has;
  central: :math:`h = \tfrac1S \sum_s z_s \odot (\nabla f(\tilde x + \delta z_s) - \nabla f(\tilde x - \delta z_s))/(2\delta)`.

  The moves regenerate :math:`z` from the probe counters (``fd_move``); with one
  forward sample the difference quotient is taken inside the update itself
  (``RefreshMode.FD_DIRECT``: no :math:`Hz` is materialised, the only transient
  buffer is the pass's gradient). Otherwise each pass's gradient is folded into a
  running sum held in the first pass's gradient buffer (``fd_fold``), and
  :math:`\tilde x` is kept to return to it exactly between passes.

The step :math:`\delta`. A forward difference errs by about
:math:`\tfrac\delta2 |f'''|` (truncation) plus :math:`\epsilon_g |\nabla f| / \delta`
(rounding of the two gradients, :math:`\epsilon_g` their relative precision), so the
best :math:`\delta` is about :math:`\sqrt{\epsilon_g}` in the units the function
varies on, the scale of the parameters; central differences err by
:math:`\delta^2` and :math:`\epsilon_g/\delta`, best near :math:`\epsilon_g^{1/3}`.
Finite-difference Newton methods take :math:`\delta = c\,(1 + \lVert x\rVert)/\lVert z\rVert`;
with :math:`\lVert z\rVert = \sqrt N` for Rademacher probes this is
:math:`c\,(1 + \lVert x_t\rVert_2)/\sqrt N`, about ``c`` times the parameters' RMS.
``c = fd_eps``; ``"auto"`` takes it from ``FD_EPS`` by the precision the gradients
were computed in. Float32 gradients carry :math:`\epsilon_g \approx 10^{-7}`; under
bf16 autocast :math:`\epsilon_g \approx 4\cdot 10^{-3}` and, worse, a weight moved by
less than a bf16 ulp (~0.4% of its value) is not moved at all inside the matmuls,
so 16-bit arithmetic needs a step some 30 times larger. ``bench/fd_accuracy.py``
measures the error of every setting against exact products on three models.

The norm is taken at :math:`x_t` (identical on every data-parallel replica) and
over every participating element, so every rank and every backend uses the same
:math:`\delta`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .backends import Bucket, ProbeKeys, RefreshInput, RefreshMode
from .functional import global_sq_norm
from .plans import StepPlan, count_present, dense
from .utils import warn_at_caller

__all__ = [
    "FD_EPS",
    "FiniteDifferences",
    "autograd_refresh",
    "cannot_differentiate_twice",
    "fd_precision",
    "fd_scalars",
    "remap_refresh",
]

# fd_eps="auto": (scheme, precision class) -> relative step. Measured in
# bench/fd_accuracy.py (BENCHMARKS.md): float32 forward 1e-3 errs by 1e-3..3e-3,
# central 3e-3 by ~1e-4; under bf16 autocast 3e-2 keeps the error at 10-16%
# (forward) and 3-8% (central), where 1e-3 would err by 140-390%.
FD_EPS: Dict[Tuple[str, int], float] = {
    ("forward", 64): 1e-7,
    ("forward", 32): 1e-3,
    ("forward", 16): 3e-2,
    ("central", 64): 1e-5,
    ("central", 32): 3e-3,
    ("central", 16): 3e-2,
}

# Relative precision of gradients by precision class: the resolution of a
# difference of two of them (RefreshMode's h_floor = resolution / delta).
RESOLUTION: Dict[int, float] = {64: 2.0**-53, 32: 2.0**-24, 16: 2.0**-8}

# Messages of the errors that mean "this model cannot be differentiated twice".
_DOUBLE_BACKWARD_ERRORS = (
    "is not implemented",  # derivative for aten::_scaled_dot_product_..._backward is not implemented
    "double backward",  # torch.compile with aot_autograd does not currently support double backward
    "donated buffers",  # compiled with non-empty donated buffers which requires create_graph=False
    "incompatible with .grad()",  # reentrant activation checkpointing
    "does not require grad and does not have a grad_fn",  # no second-order graph at all
    "once_differentiable",  # custom Functions that refuse a second derivative
)


def cannot_differentiate_twice(exc: BaseException) -> bool:
    """True for the errors PyTorch raises when a model has no double backward."""
    text = str(exc)
    if "is not implemented" in text and "derivative for" not in text:
        return False
    return isinstance(exc, RuntimeError) and any(m in text for m in _DOUBLE_BACKWARD_ERRORS)


def is_reentrant_checkpoint_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "incompatible with .grad()" in str(exc)


REENTRANT_CHECKPOINT = ("reentrant activation checkpointing (use_reentrant=True) is incompatible with .grad(): "
                        "its parameters are reached only by a plain backward()")


def has_reentrant_checkpoint(loss: Tensor, max_nodes: int) -> Optional[bool]:
    """Whether ``loss``'s graph holds a reentrant activation checkpoint; None when the graph
    has more than ``max_nodes`` nodes (the walk stops there).

    ``torch.autograd.grad(loss, params)`` raises when it has to run one, but when no
    parameter lies upstream of the checkpoint (it wraps the first layer) the engine
    prunes it and the parameters inside silently get no gradient; only a plain
    ``backward()`` reaches them.
    """
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        if len(seen) >= max_nodes:
            return None
        seen.add(fn)
        if type(fn).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


# ---------------------------------------------------------------------------- autograd
_warned_partial_graph = False


def autograd_refresh(plan: StepPlan, keys: ProbeKeys) -> Tuple[Optional[List[RefreshInput]], bool]:
    """``H z_s`` by double backward at the params' current values, per bucket.

    Returns ``(inputs, has_graph)``; ``has_graph`` is False when no gradient carries
    a graph (then ``inputs`` is None). A param whose gradient carries none is
    absent from the second-order graph: ``Hz = 0`` there. Gradients are detached
    afterwards, whatever happens (no parameter/gradient reference cycle).
    """
    global _warned_partial_graph
    live = [(bi, j, p) for bi, b in enumerate(plan.buckets) for j, p in enumerate(b.params)
            if p.grad is not None and p.grad.requires_grad]
    if not live:
        return None, False
    try:
        # A few linear params (a last bias under a mean) legitimately carry no graph;
        # most of the model's elements without one means the graph was cut.
        missing = sum(p.numel() for p in plan.participants if p.grad is not None and not p.grad.requires_grad)
        if missing > 0.1 * plan.numel and not _warned_partial_graph:
            _warned_partial_graph = True
            warn_at_caller(
                f"{missing} of {plan.numel} parameter elements have gradients without a second-order graph, "
                "so their Hessian estimate is zero. That is right where the loss is linear in them; if the "
                "model uses reentrant activation checkpointing (use_reentrant=True) or detaches inside, use "
                "hvp='finite_difference'.")
        inputs = [p for _, _, p in live]
        outputs = [p.grad for p in inputs]
        ys: List[List[List[Optional[Tensor]]]] = [[[None] * len(b.params) for _ in range(keys.n_samples)]
                                                   for b in plan.buckets]
        for s in range(keys.n_samples):
            zs = [b.backend.probes(b, keys, s) for b in plan.buckets]
            with torch.enable_grad():
                hz = torch.autograd.grad(outputs, inputs, grad_outputs=[zs[bi][j] for bi, j, _ in live],
                                         retain_graph=s < keys.n_samples - 1, allow_unused=True)
            for (bi, j, _), h in zip(live, hz):
                ys[bi][s][j] = None if h is None else h.detach().contiguous()
    finally:
        for p in plan.participants:
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()
    return [RefreshInput(RefreshMode.AUTOGRAD, ys[bi], keys) for bi in range(len(plan.buckets))], True


def remap_refresh(inputs: List[RefreshInput], src: StepPlan, dst: StepPlan) -> List[RefreshInput]:
    """Refresh inputs taken over ``src``'s buckets, rearranged for ``dst``'s.

    For a step whose participants changed between the HVP and the update (a
    gradient cleared in between): params missing from ``src`` get ``h = 0``.
    """
    where = {id(p): (bi, j) for bi, b in enumerate(src.buckets) for j, p in enumerate(b.params)}
    first = inputs[0]
    out = []
    for b in dst.buckets:
        ys: List[List[Optional[Tensor]]] = [[None] * len(b.params) for _ in first.ys]
        for j, p in enumerate(b.params):
            loc = where.get(id(p))
            if loc is not None:
                for s in range(len(ys)):
                    ys[s][j] = inputs[loc[0]].ys[s][loc[1]]
        fd = None if first.fd is None else first.fd.to(b.device)
        out.append(RefreshInput(first.mode, ys, first.keys, fd))
    return out


# ------------------------------------------------------------------ finite differences
def fd_precision(plan: StepPlan, fd_eps, scheme: str, reduce_max: Optional[Callable[[Tensor], None]] = None):
    """``(relative step, resolution)`` for the gradients' precision class (16, 32 or 64 bits).

    The class is 16 for bf16/fp16 params, 64 when every param is fp64, else 32,
    unless the gradients betray 16-bit arithmetic: it leaves the low mantissa bits
    of the float32 gradients it produces zero, so when most non-zero elements of
    the largest float32 gradients have their low 13 bits clear, the forward ran in
    bf16/fp16 (autocast). That decision is taken on the device (0-dim tensors are
    returned), without a host read; ``reduce_max`` (data-parallel) makes every rank
    take the same one. An explicit ``fd_eps`` sets the step only.
    """
    def pick(bits):
        return (float(fd_eps) if fd_eps != "auto" else FD_EPS[(scheme, bits)]), RESOLUTION[bits]

    if plan.has_16bit:
        return pick(16)
    if plan.all_fp64:
        return pick(64)
    if not plan.fingerprint and reduce_max is None:
        return pick(32)
    low = nonzero = None
    for bi, j in plan.fingerprint:
        g = plan.grads(plan.buckets[bi])[j]
        if g is None:
            continue
        nz = g != 0
        bits = (g.view(torch.int32) & 0x1FFF) == 0
        a, n = (bits & nz).sum(), nz.sum()
        low, nonzero = (a, n) if low is None else (low + a.to(low.device), nonzero + n.to(low.device))
    if low is None:
        if reduce_max is None:
            return pick(32)
        # this rank has nothing to go by (FSDP2: empty shards); it still takes part in the MAX
        device = plan.participants[0].device if plan.participants else torch.device("cpu")
        low, nonzero = torch.zeros((), dtype=torch.int64, device=device), torch.ones((), dtype=torch.int64,
                                                                                      device=device)
    is16 = (low * 2 > nonzero).to(torch.float32)
    if reduce_max is not None:
        reduce_max(is16)
    (rel16, res16), (rel32, res32) = pick(16), pick(32)
    # a blend with a 0/1 weight, in device ops: no host value reaches the device
    return is16 * (rel16 - rel32) + rel32, is16 * (res16 - res32) + res32


def fd_scalars(plan: StepPlan, x_t_of: Callable[[Bucket], List[Tensor]], fd_eps, scheme: str,
               reduce_max: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """``[delta, h_floor]`` as a float32 device tensor (no host-to-device copy).

    ``delta = relative * (1 + ||x_t||) / sqrt(N)``; ``h_floor = resolution / delta``.
    """
    relative, resolution = fd_precision(plan, fd_eps, scheme, reduce_max)
    sq = global_sq_norm(plan, x_t_of).to(torch.float64)
    scale = (sq.sqrt() + 1) / math.sqrt(max(plan.numel, 1))
    delta = (scale * (relative.to(scale.device, torch.float64) if isinstance(relative, Tensor) else relative))
    delta32 = delta.to(torch.float32)
    inv = delta32.to(torch.float64).reciprocal()
    floor = inv * (resolution.to(inv.device, torch.float64) if isinstance(resolution, Tensor) else resolution)
    return torch.stack([delta32, floor.to(torch.float32)])


class FiniteDifferences:
    """The finite-difference passes of one refresh step.

    Usage (both interfaces): ``begin()`` before the first pass, ``after_pass(i)``
    after pass ``i`` (its gradients in ``.grad``), then ``finish()`` for the
    update's input; ``abort()`` on any failure. Between ``begin`` and ``finish``
    the gradient at :math:`\tilde x` is held here and every ``.grad`` of the
    participants is cleared before each pass; ``finish`` puts it back.

    ``direct``: with one forward probe, leave the difference quotient to the update
    (``RefreshMode.FD_DIRECT``), which reads the gradient at :math:`\tilde x` from
    ``.grad`` then. Only the closure takes it: in the official protocol the user
    may change ``.grad`` (clip it, say) between the passes and ``step()``, so there
    the quotient is finished before ``hvp_passes()`` returns (one fold pass).
    ``inv_scale``: a GradScaler's 1/scale; the folded sum is unscaled at the end
    (every gradient it was built from carried the scale). ``averaged_later``: the
    optimizer averages the estimates and gradients after the passes, so the
    resolution floor is left to the update (else it is applied in ``finish``, from
    the gradients as they are then: FSDP2 and DDP have averaged them already).
    ``copy_gradients``: keep a copy of the gradients at :math:`\tilde x` (DDP with
    ``gradient_as_bucket_view=True`` writes the next pass's into the same memory).
    """

    def __init__(self, plan: StepPlan, keys: ProbeKeys, scheme: str, fd_eps,
                 x_t_of: Callable[[Bucket], List[Tensor]], inv_scale: Optional[Tensor] = None,
                 direct: bool = True, reduce_max: Optional[Callable[[Tensor], None]] = None,
                 averaged_later: bool = False, copy_gradients: bool = False) -> None:
        self.plan, self.keys, self.scheme = plan, keys, scheme
        self.n_samples = keys.n_samples
        self.n_passes = self.n_samples * (2 if scheme == "central" else 1)
        self.direct = direct and scheme == "forward" and self.n_samples == 1
        self.fd_eps, self.x_t_of, self.inv_scale, self.reduce_max = fd_eps, x_t_of, inv_scale, reduce_max
        self.averaged_later, self.copy_gradients = averaged_later, copy_gradients
        self.stash: List[List[Optional[Tensor]]] = []  # the gradients at x~, as they were
        self.baseline: List[List[Tensor]] = []  # the same, contiguous (the fold reads them)
        self.fd: Dict[torch.device, Tensor] = {}  # [delta, h_floor] per device
        self.delta: Dict[torch.device, Tensor] = {}  # the step, a 0-dim view of fd
        self.saved: Optional[List[List[Tensor]]] = None  # x~, when there is more than one pass
        self.acc: List[List[Optional[Tensor]]] = [[None] * len(b.params) for b in plan.buckets]
        self.plus: List[Optional[List[Tensor]]] = [None] * len(plan.buckets)  # central: the + pass's gradients
        self.complete: List[List[bool]] = [[True] * len(b.params) for b in plan.buckets]
        self.step_size: Optional[Tensor] = None

    def _pass_point(self, i: int) -> Tuple[int, float]:
        """(sample, sign) of pass ``i``."""
        if self.scheme == "central":
            return i // 2, 1.0 if i % 2 == 0 else -1.0
        return i, 1.0

    def _move(self, i: int, save: bool) -> None:
        sample, sign = self._pass_point(i)
        for bi, b in enumerate(self.plan.buckets):
            base = None if self.saved is None or save else self.saved[bi]
            b.backend.fd_move(b, self.delta[b.device], self.keys, sample, sign, base,
                              self.saved[bi] if save else None)

    @torch.no_grad()
    def begin(self) -> None:
        plan = self.plan
        # the precision fingerprint reads the gradients at x~, before they are put aside
        fd = fd_scalars(plan, self.x_t_of, self.fd_eps, self.scheme, self.reduce_max)
        self.step_size = fd[0]
        for b in plan.buckets:
            if b.device not in self.fd:
                self.fd[b.device] = fd.to(b.device)
                self.delta[b.device] = self.fd[b.device][0]
        self.stash = [[p.grad for p in plan.params_of(b)] for b in plan.buckets]
        if self.copy_gradients:  # DDP(gradient_as_bucket_view=True): the next backward overwrites them
            self.stash = [[None if g is None else g.clone() for g in grads] for grads in self.stash]
            for b, grads in zip(plan.buckets, self.stash):
                for p, g in zip(plan.params_of(b), grads):
                    p.grad = g
        self.baseline = [dense([g if g is not None else torch.zeros_like(p)
                                for g, p in zip(plan.grads(b), b.params)]) for b in plan.buckets]
        for p in plan.participants:
            p.grad = None
        if self.n_passes > 1:
            self.saved = [[torch.empty_like(p) for p in b.params] for b in plan.buckets]
        self._move(0, save=self.saved is not None)

    @torch.no_grad()
    def after_pass(self, i: int) -> None:
        sample, sign = self._pass_point(i)
        taken = [self.plan.grads(b) for b in self.plan.buckets]
        if self.plan.participants and not any(count_present(grads) for grads in taken):
            raise RuntimeError(
                "a finite-difference pass produced no gradients: run one forward and backward per iteration "
                "of opt.hvp_passes() (for _ in opt.hvp_passes(): loss_fn(model(x), y).backward())")
        for bi, b in enumerate(self.plan.buckets):
            grads = taken[bi]
            for p in self.plan.params_of(b):
                p.grad = None
            if count_present(grads) != len(grads):
                for j, g in enumerate(grads):
                    if g is None:  # absent from this pass: no estimate for the param this step
                        self.complete[bi][j] = False
                        grads[j] = torch.zeros_like(b.params[j])
            grads = dense(grads)
            if self.direct:
                if self.inv_scale is not None and grads:  # a GradScaler scaled this pass's loss
                    torch._foreach_mul_(grads, self.inv_scale.to(b.device, grads[0].dtype))
                self.acc[bi] = grads
                continue
            if self.scheme == "central":
                if sign > 0:  # hold grad f(x~ + delta z) until its partner pass
                    self.plus[bi] = grads
                    continue
                # fold c z (G+ - G-) as -c z (G- - G+): the difference is taken before
                # scaling, so nothing of order |g| / delta is ever rounded
                plus, first = self.plus[bi], sample == 0
                acc = plus if first else self.acc[bi]
                b.backend.fd_fold(b, acc, grads, plus, self.delta[b.device], self.keys, sample,
                                  -1.0 / (2 * self.n_samples), first)
                self.plus[bi] = None
            else:
                first = i == 0
                acc = grads if first else self.acc[bi]
                b.backend.fd_fold(b, acc, grads, self.baseline[bi], self.delta[b.device], self.keys, sample,
                                  1.0 / self.n_samples, first)
            self.acc[bi] = acc
        if i + 1 < self.n_passes:
            self._move(i + 1, save=False)

    @torch.no_grad()
    def finish(self) -> List[RefreshInput]:
        """The update's input per bucket; the gradients at x~ are back in ``.grad``."""
        self._restore_grads()
        self.saved = None
        mode = RefreshMode.FD_DIRECT if self.direct else RefreshMode.PRECOMPUTED
        # Official protocol: |h| is floored here, from the gradients at x~ as they were,
        # and the update gets h_floor = 0 (a .grad clipped before step() changes the
        # step only). When the optimizer averages over ranks it floors in the update,
        # after the estimates and the gradients are averaged (an average of floored
        # magnitudes is not the floored magnitude of the average).
        floor_here = not self.direct and not self.averaged_later
        out = []
        for bi, (b, ys) in enumerate(zip(self.plan.buckets, self._present_acc())):
            pairs = [(y, g) for y, g in zip(ys, self.baseline[bi]) if y is not None]
            fd = self.fd.get(b.device)
            if pairs and not self.direct and self.inv_scale is not None:  # every gradient carried the scale
                torch._foreach_mul_([y for y, _ in pairs], self.inv_scale.to(b.device, pairs[0][0].dtype))
            if pairs and floor_here:
                acc, base = map(list, zip(*pairs))
                floor = fd[1].to(acc[0].dtype)
                if self.inv_scale is not None:  # the baseline is still scaled
                    floor = floor * self.inv_scale.to(b.device, acc[0].dtype)
                magnitude = torch._foreach_abs(base)
                torch._foreach_mul_(magnitude, floor)
                torch._foreach_abs_(acc)
                torch._foreach_maximum_(acc, magnitude)
                fd = torch.cat([fd[:1], torch.zeros_like(fd[1:])])
            out.append(RefreshInput(mode, [ys], self.keys, fd))
        self.baseline = []
        return out

    def _present_acc(self) -> List[List[Optional[Tensor]]]:
        """Per bucket, the folded estimate of each param (None where a pass lacked its gradient)."""
        return [[a if ok else None for a, ok in zip(accs, complete)]
                for accs, complete in zip(self.acc, self.complete)]

    @torch.no_grad()
    def abort(self) -> None:
        self._restore_grads()
        self.saved = None
        self.baseline = []
        self.acc = []
        self.plus = []

    def _restore_grads(self) -> None:
        for b, grads in zip(self.plan.buckets, self.stash):
            for p, g in zip(self.plan.params_of(b), grads):
                p.grad = g
        self.stash = []
