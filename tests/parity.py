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

# (rtol, atol) per param dtype for params and state after many steps, from a rounding bound.
# Two backends compute the same per-element formulas in the same math precision (float64 for
# float64 params, else float32), in another order or with fused operations (FMA), which also
# differ between CPUs (AVX2 and AVX-512 kernels take other vector widths and tails):
# - per step an element goes through at most OPS = 16 rounded operations (the perturbation, the
#   moments, the bias corrections, the root, the division, the weight decay), each erring by at
#   most u (= eps / 2) times its operands' magnitudes: the backends differ by at most 2 OPS u per
#   step relative to the terms, which are O(1) for these problems (params 0.5 randn, coupled_loss's
#   gradients and curvatures): hence atol = rtol;
# - STEPS = 32 (the longest trajectory) such differences add up, each carried on with the
#   condition KAPPA = 2 of the update (the step is invariant to the gradients' scale and takes
#   sqrt of the curvature: a relative error of d moves it by half of that, of m by all of it);
#   rtol = 2 OPS STEPS KAPPA u: 1.2e-4 for float32 (u = 6e-8), 2.3e-13 for float64;
# - 16-bit params are stored rounded: two float32 results a few ulps apart round to neighbouring
#   16-bit values where they straddle a rounding boundary (odds of about 1e-4 per element and
#   step), one storage ulp (eps16 relative); FLIPS = 2 such flips per element, carried with KAPPA:
#   rtol = FLIPS KAPPA eps16 (3.1e-2 for bfloat16, 3.9e-3 for float16).
# Measured here (foreach, cpp and the Triton interpreter against eager, 1 thread): float64 at
# most 4.4e-16 (1/1500 of the tolerance), float32 6.7e-7 (1/220), bfloat16 runs 6e-8 (no flip).
# A wrong result fails: rho 1% off (SASSHA, EDGE_SIZES, 32 steps, eager) moves the params by up
# to 1.1e-3, 8 times the float32 tolerance and 4e9 times the float64 one.
_OPS, _STEPS, _KAPPA, _FLIPS = 16, 32, 2, 2


def _bound(dtype: torch.dtype) -> Tuple[float, float]:
    if dtype in (torch.bfloat16, torch.float16):
        r = _FLIPS * _KAPPA * torch.finfo(dtype).eps
    else:
        r = 2 * _OPS * _STEPS * _KAPPA * torch.finfo(dtype).eps / 2
    return r, r


TOLERANCE: Dict[torch.dtype, Tuple[float, float]] = {
    dt: _bound(dt) for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
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

    ``"closure"``: ``opt.step(loss_fn)``. ``"standard"``: ``opt.step(closure)`` with
    torch.optim's closure (zero_grad, backward, return the loss). ``"official"``:
    the official code's loop with the README's ``hvp_passes()`` (for M-SASSHA:
    backward with ``create_graph=opt.hessian_due``, the passes, then step).
    """
    if protocol == "closure":
        return opt.step(loss_fn)
    if protocol == "standard":
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        return opt.step(closure)
    loss = loss_fn()
    if type(opt).__name__ == "MSASSHA":
        loss.backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            loss_fn().backward()
    else:
        loss.backward()
        opt.perturb_weights(zero_grad=True)
        loss_fn().backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            loss_fn().backward()
        opt.unperturb()
    opt.step()
    opt.zero_grad()
    return loss.detach()


class SpyBackend:
    """Wraps a real backend and records each phase it runs (chosen by argument, not patched).

    ``calls`` holds ``(phase, detail)``: the update's detail is whether it refreshed.
    """

    def __new__(cls, inner):
        from sassha_fused.backends import Backend

        class _Spy(Backend):
            def __init__(self):
                self.inner = inner
                self.name = f"spy({inner.name})"
                self.calls = []

            def supports(self, device, dtype):
                return self.inner.supports(device, dtype)

            def accepts(self, tensor):
                return self.inner.accepts(tensor)

            def sq_norm(self, b, sources, adaptive, acc_dtype):
                self.calls.append(("sq_norm", None))
                return self.inner.sq_norm(b, sources, adaptive, acc_dtype)

            def perturb(self, b, sources, sq_norm, sign, adaptive, groups):
                self.calls.append(("perturb", sign))
                return self.inner.perturb(b, sources, sq_norm, sign, adaptive, groups)

            def probes(self, b, keys, sample):
                self.calls.append(("probes", sample))
                return self.inner.probes(b, keys, sample)

            def fd_move(self, *args):
                self.calls.append(("fd_move", None))
                return self.inner.fd_move(*args)

            def fd_fold(self, *args):
                self.calls.append(("fd_fold", None))
                return self.inner.fd_fold(*args)

            def update(self, b, x_t, grads, scalars, power, refresh):
                self.calls.append(("update", refresh is not None))
                return self.inner.update(b, x_t, grads, scalars, power, refresh)

        return _Spy()


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


# Finite-difference Hessian-vector products divide the gradients' rounding by the relative
# step delta_rel (fd_eps; "auto": 1e-7 forward / 1e-5 central in float64, 1e-3 / 3e-3 in float32,
# 3e-2 for 16-bit): the quotient errs by FD_ULPS u / delta_rel relative per refresh (two
# gradients of a few operations each and the move), which reaches the update through sqrt(D)
# (KAPPA) at every one of up to STEPS refreshes. That is added to the arithmetic's bound. It
# is loose in float32 (about 3e-2 at delta_rel 1e-3, where rho 1% off moves params by 1e-3);
# float64 runs (5.6e-7) keep their power. Measured: foreach against eager, float64, forward
# differences, 6 steps: 4.1e-11 (test_properties).
_FD_ULPS = 8
_FD_AUTO = {torch.float64: (1e-7, 1e-5), torch.float32: (1e-3, 3e-3)}


def fd_bound(opt: torch.optim.Optimizer, dtype: torch.dtype) -> float:
    """What finite differences add to ``TOLERANCE`` for a run of ``opt`` (0 with autograd HVPs)."""
    if getattr(opt, "hvp_method", "autograd") != "finite_difference":
        return 0.0
    fd_eps = opt.fd_eps
    if fd_eps == "auto":
        fd_eps = _FD_AUTO.get(dtype, (3e-2, 3e-2))[opt.fd_scheme == "central"]
    u = torch.finfo(dtype if dtype in _FD_AUTO else torch.float32).eps / 2
    return _KAPPA * _FD_ULPS * u / fd_eps * _STEPS


def assert_close_tensors(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str, extra: float = 0.0) -> None:
    rtol, atol = TOLERANCE[dtype]
    rtol, atol = rtol + extra, atol + extra
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
        fd = fd_bound(ref_opt, dt)
        if exact:
            assert torch.equal(rp, p), f"param {k} differs"
        else:
            assert_close_tensors(rp, p, dt, f"param {k} (shape {tuple(p.shape)})", fd)
        rs, s = ref_opt.state.get(rp, {}), opt.state.get(p, {})
        assert set(rs) == set(s), f"param {k}: state keys {sorted(rs)} != {sorted(s)}"
        for key in rs:
            if isinstance(rs[key], torch.Tensor):
                if exact:
                    assert torch.equal(rs[key], s[key]), f"param {k} state {key} differs"
                else:
                    assert_close_tensors(rs[key], s[key], dt, f"param {k} state {key!r}", fd)
            else:
                assert math.isclose(float(rs[key]), float(s[key]), rel_tol=1e-12), (
                    f"param {k} state {key!r}: {rs[key]} != {s[key]}"
                )


def sync_run(ref_params, ref_opt, params, opt) -> None:
    """``opt``'s params and tensor state (not the step counters) take ``ref_opt``'s values, in
    place (its plans and buckets keep their tensors): compact-state runs compared in lockstep,
    each step from the same inputs, since a code a step off cannot be bounded over later steps."""
    with torch.no_grad():
        for rp, p in zip(ref_params, params):
            p.copy_(rp)
            for key, value in ref_opt.state.get(rp, {}).items():
                if isinstance(value, torch.Tensor) and key not in ("step", "bias_correction2"):
                    opt.state[p][key].copy_(value)


def code_step(codes_key: str, scales: torch.Tensor) -> torch.Tensor:
    """The most one code of ``state_bits=8`` moves a decoded value, per group (float64), from the
    group scales of ``codes_key`` (encoding.py): m = (q/127)|q/127| s moves by at most
    (127^2 - 126^2) / 127^2 s between neighbouring codes; D = ((q/255) s)^2, s the group's
    largest sqrt(D), by at most (255^2 - 254^2) / 255^2 s^2."""
    s = scales.to(torch.float64)
    if codes_key == "exp_avg_codes":
        return (2 * 127 - 1) / 127 ** 2 * s
    return (2 * 255 - 1) / 255 ** 2 * s * s


def capture_after_warm_up(opt, ref, params, twin, step: Callable, first_loss: Callable):
    """torch.cuda.graphs' recipe for a captured optimizer step: on a side stream, warm up both
    optimizers (a refresh step through ``first_loss(params)``, which needs a loss to differentiate,
    then two plain ``step(opt, params)`` steps, like the one captured); capture one ``step`` of
    ``opt`` and take its eager counterpart on ``ref``. Returns the graph (CUDA only)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for o, ps in ((opt, params), (ref, twin)):
            o.step(lambda ps=ps: first_loss(ps))
            o.zero_grad(set_to_none=True)
        for _ in range(2):
            step(opt, params)
            step(ref, twin)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(opt, params)
    step(ref, twin)
    return graph


# ------------------------------------------------------------------ phase-level checks
def phase_groups():
    """A group table of two groups with their own hyper-parameters."""
    from sassha_fused.functional import GroupTable

    return GroupTable([
        dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-4, rho=0.05, perturb_eps=1e-12),
        dict(lr=0.02, betas=(0.8, 0.999), weight_decay=0.0, eps=1e-3, rho=0.1, perturb_eps=1e-12),
    ])


def phase_bucket(backend, dtype: torch.dtype, sizes: Sequence[int] = EDGE_SIZES, seed: int = 0,
                 alias_backups: bool = False, device: str = DEVICE, element_offset: Sequence[int] = ()):
    """A Bucket of random params and state (steps 3.., c2 > 0) for one backend.

    ``element_offset``: the params' places in the probes (FSDP2 shards); () for none.
    """
    from sassha_fused.backends import Bucket, math_dtype

    gen = torch.Generator().manual_seed(seed)
    mdt = math_dtype(dtype)

    def rnd(n, dt, k=0):
        return torch.randn(n, generator=gen, dtype=torch.float64).reshape(shape_for(n, k)).to(device=device, dtype=dt)

    params = [rnd(n, dtype, k) for k, n in enumerate(sizes)]
    return Bucket(
        backend=backend, device=torch.device(device), params=params,
        param_index=[5 * j + 2 for j in range(len(sizes))], group_index=[j % 2 for j in range(len(sizes))],
        backups=[p if alias_backups else rnd(p.numel(), dtype, k) for k, p in enumerate(params)],
        positions=list(range(len(sizes))), element_offset=list(element_offset),
        exp_avgs=[rnd(n, mdt, k) for k, n in enumerate(sizes)],
        exp_hessian_diags=[rnd(n, mdt, k).abs() for k, n in enumerate(sizes)],
    )


def clone_bucket(b, backend):
    """A deep copy of ``b`` run by ``backend`` (a backup aliasing its param stays aliased)."""
    from sassha_fused.backends import Bucket

    params = [p.clone() for p in b.params]
    return Bucket(
        backend=backend, device=b.device, params=params, param_index=list(b.param_index),
        group_index=list(b.group_index),
        backups=[params[j] if bk is b.params[j] else bk.clone() for j, bk in enumerate(b.backups)],
        positions=list(b.positions), element_offset=list(b.element_offset), exp_avgs=[t.clone() for t in b.exp_avgs],
        exp_hessian_diags=[t.clone() for t in b.exp_hessian_diags],
    )


def _bucket_lists(b):
    return {"params": b.params, "backups": b.backups, "exp_avgs": b.exp_avgs, "exp_hessian_diags": b.exp_hessian_diags}


def assert_buckets_close(ref, new, dtype, what):
    for name, lists in _bucket_lists(ref).items():
        for j, (a, c) in enumerate(zip(lists, _bucket_lists(new)[name])):
            assert_close_tensors(a, c, dtype, f"{what}: {name}[{j}]")


def check_phases_match_eager(backend, dtype: torch.dtype, sizes: Sequence[int] = EDGE_SIZES,
                             element_offset: Sequence[int] = (), device: str = DEVICE) -> None:
    """Every phase of ``backend`` against the eager reference on one bucket.

    sq_norm (three sources, adaptive or not), perturb (both signs), probes (bitwise),
    the finite-difference move and fold (with and without base, save, baseline,
    aliasing), and the update in every refresh mode with some params not live.
    ``element_offset``: the buckets' (FSDP2 shards' places in the probes; () for none);
    ``device``: where the buckets live.
    """
    from sassha_fused import functional as F
    from sassha_fused.backends import ProbeKeys, RefreshInput, RefreshMode, get_backend

    eager = get_backend("eager")
    groups = phase_groups()
    keys = ProbeKeys((0x1234567, 0x89ABCDEF))
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(11)

    def like(b, dt=None, k=0):
        return [torch.randn(p.numel(), generator=gen, dtype=torch.float64).reshape(p.shape).to(p.device, dt or p.dtype)
                for p in b.params]

    # --- norms and the perturbation
    ref = phase_bucket(eager, dtype, sizes, seed=1, element_offset=element_offset, device=device)
    new = clone_bucket(ref, backend)
    grads = like(ref)
    for sources in (grads, ref.exp_avgs, ref.params):
        for adaptive in (False, True):
            a = eager.sq_norm(ref, sources, adaptive, acc_dtype)
            c = backend.sq_norm(new, [t.clone() for t in sources], adaptive, acc_dtype)
            assert c.dtype == a.dtype and c.dim() == 0 and c.device == a.device
            torch.testing.assert_close(c, a, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    for sign, sources in ((1.0, grads), (-1.0, ref.exp_avgs)):
        for adaptive in (False, True):
            sq = eager.sq_norm(ref, sources, adaptive, acc_dtype)
            eager.perturb(ref, sources, sq, sign, adaptive, groups)
            backend.perturb(new, [t.clone() for t in sources], sq, sign, adaptive, groups)
            for j in range(len(ref.params)):
                assert torch.equal(ref.backups[j], new.backups[j]), "the backup is a bitwise copy of x"
            assert_buckets_close(ref, new, dtype, f"perturb(sign={sign}, adaptive={adaptive})")

    # --- probes, bitwise
    for sample in (0, 1):
        for j, (a, c) in enumerate(zip(eager.probes(ref, keys, sample), backend.probes(new, keys, sample))):
            assert a.dtype == c.dtype == dtype and a.shape == c.shape
            assert torch.equal(a.cpu(), c.cpu()), f"probe of param {j} differs"

    # --- finite-difference moves and folds
    delta = torch.tensor(3e-3, device=ref.device)
    saved_r, saved_n = [torch.empty_like(p) for p in ref.params], [torch.empty_like(p) for p in new.params]
    for base, save, sample, sign in ((None, True, 0, 1.0), (True, None, 1, -1.0), (None, None, 1, 1.0)):
        eager.fd_move(ref, delta, keys, sample, sign, saved_r if base else None, saved_r if save else None)
        backend.fd_move(new, delta, keys, sample, sign, saved_n if base else None, saved_n if save else None)
        assert_buckets_close(ref, new, dtype, f"fd_move(base={base}, save={save})")
        for a, c in zip(saved_r, saved_n):
            assert torch.equal(a, c)
    g_ref = like(ref)
    g_new = [t.clone() for t in g_ref]
    base_ref = like(ref)
    base_new = [t.clone() for t in base_ref]
    acc_ref, acc_new = g_ref, g_new  # the first fold writes into the pass's gradient
    for first, baseline, coefficient in ((True, True, 0.5), (False, False, -0.25), (False, True, 1.0)):
        eager.fd_fold(ref, acc_ref, g_ref, base_ref if baseline else None, delta, keys, 1, coefficient, first)
        backend.fd_fold(new, acc_new, g_new, base_new if baseline else None, delta, keys, 1, coefficient, first)
        for j, (a, c) in enumerate(zip(acc_ref, acc_new)):
            assert_close_tensors(a, c, dtype, f"fd_fold(first={first}) acc[{j}]")
        g_ref = like(ref)
        g_new = [t.clone() for t in g_ref]

    # --- the update, every refresh mode, with params that are not live
    n = len(sizes)
    for mode, power, alias in ((RefreshMode.NONE, 0.5, True), (RefreshMode.AUTOGRAD, 0.75, False),
                               (RefreshMode.FD_DIRECT, 0.5, False), (RefreshMode.PRECOMPUTED, 1.0, True)):
        ref = phase_bucket(eager, dtype, sizes, seed=2, alias_backups=alias, element_offset=element_offset,
                           device=device)
        new = clone_bucket(ref, backend)
        grads = like(ref)
        refresh = None
        if mode == RefreshMode.AUTOGRAD:
            ys = [[None if (j + s) % 3 == 0 else y for j, y in enumerate(like(ref))] for s in range(2)]
            refresh = RefreshInput(mode, ys, keys)
        elif mode != RefreshMode.NONE:
            ys = [[None if j % 4 == 1 else y for j, y in enumerate(like(ref))]]
            # a floor that some elements' |h| falls below (FD_DIRECT's |h| ~ |y - g| / delta)
            floor = torch.tensor(300.0 if mode == RefreshMode.FD_DIRECT else 0.5, device=ref.device)
            refresh = RefreshInput(mode, ys, ProbeKeys(keys.prefixes[:1]), torch.stack([delta, floor]))
        live = torch.tensor([0.0 if j % 5 == 3 else 1.0 for j in range(n)], device=ref.device)
        steps = torch.tensor([3.0 + j for j in range(n)], dtype=torch.float64, device=ref.device)
        c2 = torch.tensor([0.05 + 0.01 * j for j in range(n)], dtype=torch.float64, device=ref.device)
        table, _, _ = F.update_scalars(ref, groups, power, refresh is not None, steps, c2, None, live)
        x_t_ref = ref.params if alias else ref.backups
        x_t_new = new.params if alias else new.backups
        eager.update(ref, x_t_ref, grads, table, power, refresh)
        backend.update(new, x_t_new, [g.clone() for g in grads], table, power, refresh)
        assert_buckets_close(ref, new, dtype, f"update(mode={mode}, power={power})")
        for j in range(n):
            if live[j] == 0:
                assert torch.equal(new.params[j], x_t_new[j]), "a param that is not live is x_t again"


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """Every element within its own tolerance (a per-element rounding bound); names the first that is not."""
    dev = (actual - expected).abs()
    bad = (dev > tol).nonzero().flatten().tolist()
    assert not bad, (f"{what}: {len(bad)} of {dev.numel()} elements outside the rounding bound, "
                     f"e.g. element {bad[0]}: {dev[bad[0]]:.3g} > {tol[bad[0]]:.3g} (largest {dev.max():.3g})")


def outside_tolerance(wrong: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> bool:
    """Whether a deliberately wrong result lies outside the tolerance (the check is not vacuous)."""
    return bool(((wrong - expected).abs() > tol).any())
