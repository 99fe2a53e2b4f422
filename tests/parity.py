"""Shared harness: run an optimizer on a fixed problem and compare trajectories.

Every backend is checked against the eager reference with these helpers: same
initial params, same losses, many steps, then params and every state entry compared
with a per-dtype tolerance.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import os

# Where parity tests put their parameters: the GPU when there is one and Triton's
# interpreter is off (a GPU session), else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# Odd sizes on purpose: block and word boundaries (32-element probe words), empty.
EDGE_SIZES = (0, 1, 3, 31, 33, 1023, 1025, 10001)

# (rtol, atol) per param dtype for params and state after many steps.
TOLERANCE: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-4, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}


def shape_for(n: int, k: int) -> Tuple[int, ...]:
    """A shape with ``n`` elements; 2-D for some sizes so views/strides vary."""
    if n > 1 and n % 3 == 0 and k % 2 == 0:
        return (3, n // 3)
    return (n,)


def make_params(
    sizes: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0, device: str = DEVICE
) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        t = torch.randn(n, generator=gen, dtype=torch.float64).mul_(0.5).reshape(shape_for(n, k))
        out.append(torch.nn.Parameter(t.to(device=device, dtype=dtype)))
    return out


def clone_params(params: Sequence[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def coupled_loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
    """A smooth loss with a non-diagonal, indefinite Hessian that changes per step.

    Per param: a weighted quadratic, a tanh term (curvature of both signs) and a
    cross term coupling neighbouring elements; plus a coupling between params
    through the square of their summed means. Computed in fp64 from any dtype.
    """
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    coupling = torch.zeros((), dtype=torch.float64, device=total.device)
    for k, p in enumerate(params):
        if p.numel() == 0:
            continue
        x = p.to(torch.float64).reshape(-1)
        idx = torch.arange(x.numel(), dtype=torch.float64, device=x.device)
        a = 1.0 + 0.5 * torch.sin(idx * 0.37 + k + 0.1 * step)
        total = total + (a * x * x).mean() + 0.3 * torch.tanh(x + 0.2 * math.cos(step + k)).mean()
        if x.numel() > 1:
            total = total + 0.2 * (x[1:] * x[:-1]).mean()
        coupling = coupling + x.mean()
    return total + 0.1 * coupling * coupling


def protocol_step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], protocol: str = "official"):
    """One step driven the way users drive it; returns the (first) loss.

    ``"closure"``: ``opt.step(loss_fn)``. ``"official"``: the official code's loop
    (for M-SASSHA: backward with ``create_graph=opt.hessian_due``, then step).
    """
    if protocol == "closure":
        return opt.step(loss_fn)
    loss = loss_fn()
    if type(opt).__name__ == "MSASSHA":
        loss.backward(create_graph=opt.hessian_due)
    else:
        loss.backward()
        opt.perturb_weights(zero_grad=True)
        loss_fn().backward(create_graph=opt.hessian_due)
        opt.unperturb()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def run_trajectory(
    make_opt: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer],
    params: List[torch.nn.Parameter],
    steps: int,
    protocol: str = "closure",
    loss_fn: Callable[[Sequence[torch.Tensor], int], torch.Tensor] = coupled_loss,
    frozen: Optional[Callable[[int, int], bool]] = None,
) -> torch.optim.Optimizer:
    """Run ``steps`` optimizer steps in place on ``params``; returns the optimizer.

    ``protocol``: ``"closure"`` (opt.step(closure)) or ``"official"`` (perturb_weights,
    backward(create_graph=opt.hessian_due), unperturb, step, zero_grad). For
    M-SASSHA ``"official"`` means backward(create_graph=opt.hessian_due) then step.
    ``frozen(step, k)``: True makes param k receive no gradient at that step.
    """
    opt = make_opt(params)

    def loss_at(t: int) -> torch.Tensor:
        if frozen is None:
            return loss_fn(params, t)
        live = [p if not frozen(t, k) else p.detach() for k, p in enumerate(params)]
        return loss_fn(live, t)

    for t in range(steps):
        protocol_step(opt, lambda: loss_at(t), protocol)
    return opt


def assert_close_tensors(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(
        a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu(),
        rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}",
    )


def assert_same_trajectory(
    ref_params: Sequence[torch.Tensor],
    ref_opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    opt: torch.optim.Optimizer,
    dtype: Optional[torch.dtype] = None,
    exact: bool = False,
) -> None:
    """Params and every state entry of ``opt`` match ``ref_opt`` (bitwise if ``exact``)."""
    assert len(ref_params) == len(params)
    for k, (rp, p) in enumerate(zip(ref_params, params)):
        dt = dtype or p.dtype
        if exact:
            assert torch.equal(rp, p), f"param {k} differs"
        else:
            assert_close_tensors(rp, p, dt, f"param {k} (shape {tuple(p.shape)})")
        rs, s = ref_opt.state.get(rp, {}), opt.state.get(p, {})
        assert set(rs) == set(s), f"param {k}: state keys {sorted(rs)} != {sorted(s)}"
        for key in rs:
            if isinstance(rs[key], torch.Tensor):
                if exact:
                    assert torch.equal(rs[key], s[key]), f"param {k} state {key} differs"
                else:
                    assert_close_tensors(rs[key], s[key], dt, f"param {k} state {key!r}")
            else:
                assert math.isclose(float(rs[key]), float(s[key]), rel_tol=1e-12), (
                    f"param {k} state {key!r}: {rs[key]} != {s[key]}"
                )
