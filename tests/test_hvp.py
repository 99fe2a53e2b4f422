"""Hessian-vector products: finite differences against closed forms and autograd,
the "auto" switch on models that cannot be differentiated twice, and both
interfaces (closure, torch.optim's standard closure, the official protocol)."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from parity import clone_params, coupled_loss, make_params, protocol_step, run_trajectory
from conftest import device_for, every_backend
from sassha_fused import MSASSHA, SASSHA
from sassha_fused.hvp import FD_EPS, cannot_differentiate_twice

DT = torch.float64


def _d_after_one_refresh(cls, hvp, loss_fn, params, **kw):
    """exp_hessian_diag of every param after the first step (a refresh), from the same start."""
    ps = clone_params(params)
    opt = cls(ps, lazy_hessian=1, hvp=hvp, backend="eager", **kw)
    opt.step(lambda: loss_fn(ps))
    return torch.cat([opt.state[p]["exp_hessian_diag"].reshape(-1) for p in ps]), opt


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_diagonal_quadratic_is_exact(cls, scheme):
    # f = 1/2 sum a x^2: grad f(x + d z) - grad f(x) = d a z exactly, so z*(...)/d = a.
    a = torch.tensor([3.0, -2.0, 0.5, 7.0, -0.1], dtype=DT)
    x0 = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.5], dtype=DT)
    d, opt = _d_after_one_refresh(cls, "finite_difference", lambda ps: 0.5 * (a * ps[0] ** 2).sum(), [x0],
                                  fd_scheme=scheme, n_samples=2)
    torch.testing.assert_close(d, (1 - 0.999) * a.abs(), rtol=1e-8, atol=0)
    assert opt.hvp_method == "finite_difference"


def test_quartic_forward_error_is_first_order_and_central_second_order():
    # f = sum x^4 / 4: H = diag(3 x^2) at the HVP point; forward differences err by
    # 3 x delta, central by delta^2 (z^2 = 1).
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    exact, _ = _d_after_one_refresh(SASSHA, "autograd", lambda ps: (ps[0] ** 4).sum() / 4, [x0])
    errs = {}
    for scheme in ("forward", "central"):
        for fd_eps in (1e-3, 1e-4):
            d, _ = _d_after_one_refresh(SASSHA, "finite_difference", lambda ps: (ps[0] ** 4).sum() / 4, [x0],
                                        fd_scheme=scheme, fd_eps=fd_eps)
            errs[scheme, fd_eps] = _rel(d, exact)
    assert errs["forward", 1e-3] < 1e-2 and errs["central", 1e-3] < 1e-5
    assert 5 < errs["forward", 1e-3] / errs["forward", 1e-4] < 20  # O(delta)
    assert 50 < errs["central", 1e-3] / errs["central", 1e-4] < 200  # O(delta^2)


# ------------------------------------------------------------------ small networks
def _mlp_loss(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g)
    w1, w2 = torch.randn(16, 6, generator=g, dtype=DT) * 0.4, torch.randn(3, 16, generator=g, dtype=DT) * 0.4
    b1 = torch.randn(16, generator=g, dtype=DT) * 0.1
    return [w1, b1, w2], lambda ps: F.cross_entropy(torch.tanh(x.to(ps[0].dtype) @ ps[0].t() + ps[1]) @ ps[2].t(), y)


@pytest.mark.parametrize("dtype,scheme,bound", [
    (torch.float64, "forward", 1e-5), (torch.float64, "central", 1e-7),
    (torch.float32, "forward", 1e-2), (torch.float32, "central", 1e-3),
])
def test_finite_differences_match_autograd_on_a_network(dtype, scheme, bound):
    params, loss = _mlp_loss()
    params = [p.to(dtype) for p in params]
    exact, _ = _d_after_one_refresh(SASSHA, "autograd", loss, params, n_samples=2)
    fd, _ = _d_after_one_refresh(SASSHA, "finite_difference", loss, params, n_samples=2, fd_scheme=scheme)
    assert _rel(fd.double(), exact.double()) < bound


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("cls,scheme,n_samples", [(SASSHA, "forward", 1), (SASSHA, "central", 2),
                                                  (MSASSHA, "forward", 2), (MSASSHA, "central", 1)])
def test_every_backend_takes_the_reference_finite_differences(backend, cls, scheme, n_samples):
    p0 = make_params([33, 0, 7, 1025], torch.float32, seed=5, device=device_for(backend))
    kw = dict(lazy_hessian=2, n_samples=n_samples, hvp="finite_difference", fd_scheme=scheme, lr=0.02)
    from parity import assert_same_trajectory

    for protocol in ("closure", "official"):
        ref, new = clone_params(p0), clone_params(p0)
        ref_opt = run_trajectory(lambda ps: cls(ps, backend="eager", **kw), ref, 6, protocol)
        new_opt = run_trajectory(lambda ps: cls(ps, backend=backend, **kw), new, 6, protocol)
        assert_same_trajectory(ref, ref_opt, new, new_opt)


def test_both_interfaces_and_the_standard_closure_agree():
    p0 = make_params([9, 40], DT, seed=2)
    runs = {}
    for protocol in ("closure", "official", "standard"):
        ps = clone_params(p0)
        opt = run_trajectory(lambda q: SASSHA(q, lazy_hessian=3, hvp="finite_difference", backend="eager", lr=0.05),
                             ps, 8, protocol)
        runs[protocol] = (ps, opt)
    for protocol in ("official", "standard"):
        for p, q in zip(runs["closure"][0], runs[protocol][0]):
            assert torch.equal(p, q), protocol
    assert runs["standard"][1].hvp_method == "finite_difference"


def test_auto_takes_finite_differences_for_a_standard_closure_and_resumes_with_them():
    p0 = make_params([9, 40], DT, seed=3)
    straight = clone_params(p0)
    opt = run_trajectory(lambda q: SASSHA(q, lazy_hessian=2, backend="eager"), straight, 8, "standard")
    assert opt.hvp_method == "finite_difference"
    first = clone_params(p0)
    o1 = run_trajectory(lambda q: SASSHA(q, lazy_hessian=2, backend="eager"), first, 5, "standard")
    state = copy.deepcopy(o1.state_dict())
    resumed = clone_params(first)
    o2 = SASSHA(resumed, lazy_hessian=2, backend="eager")
    o2.load_state_dict(state)
    assert o2.hvp_method == "finite_difference" and not o2.hessian_due  # the protocol needs no graph
    for t in range(5, 8):
        protocol_step(o2, lambda: coupled_loss(resumed, t), "closure")
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


# ------------------------------------------------------------- the official protocol
def test_hessian_due_is_false_with_finite_differences_and_the_passes_run_on_refresh_steps():
    x = torch.nn.Parameter(torch.randn(5, dtype=DT))
    opt = SASSHA([x], lazy_hessian=3, hvp="finite_difference", fd_scheme="central", n_samples=2, backend="eager")
    passes = []
    for t in range(7):
        assert not opt.hessian_due and opt.refresh_due == (t % 3 == 0)
        (x**4).sum().backward()
        opt.perturb_weights()
        (x**4).sum().backward(create_graph=opt.hessian_due)
        n = 0
        for _ in opt.hvp_passes():
            (x**4).sum().backward()
            n += 1
        passes.append(n)
        opt.unperturb()
        opt.step()
        opt.zero_grad()
    assert passes == [4, 0, 0, 4, 0, 0, 4]  # 2 samples x 2 sides, on steps 1, 4, 7


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_missing_finite_difference_pass_raises_and_loses_nothing(cls):
    x = torch.nn.Parameter(torch.randn(6, dtype=DT))
    opt = cls([x], lazy_hessian=2, hvp="finite_difference", backend="eager")
    f = lambda: (x**4).sum()  # noqa: E731
    opt.step(f)
    opt.step(f)
    assert opt.refresh_due
    before_x, before_state = x.detach().clone(), copy.deepcopy(opt.state[x])
    if cls is SASSHA:
        f().backward()
        opt.perturb_weights()
        f().backward()
        opt.unperturb()
    else:
        f().backward()
    with pytest.raises(RuntimeError, match="hvp_passes"):
        opt.step()
    assert torch.equal(x, before_x) and opt.global_step == 2
    for key, value in before_state.items():
        assert torch.equal(opt.state[x][key], value), key
    opt.zero_grad()
    protocol_step(opt, f, "official")  # the right loop goes on from there
    assert opt.global_step == 3


# ------------------------------------------------------ models that cannot differentiate twice
class _Attention(torch.nn.Module):
    def __init__(self, d=16, checkpointed=False):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, 1)
        self.checkpointed = checkpointed

    def block(self, h):
        q, k, v = self.qkv(h).chunk(3, -1)
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointed:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self.block, h, use_reentrant=True)
        else:
            h = self.block(h)
        return self.out(torch.tanh(h)).mean()


def _models():
    torch.manual_seed(0)
    return {"sdpa": _Attention(), "checkpoint": _Attention(checkpointed=True)}


@pytest.mark.parametrize("kind", ["sdpa", "checkpoint", "compile"])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_auto_switches_to_finite_differences_and_loses_nothing(kind, cls):
    torch.manual_seed(0)
    model = _Attention(checkpointed=kind == "checkpoint")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 5, 16)
    run = torch.compile(model, backend="aot_eager") if kind == "compile" else model
    opt = cls(model.parameters(), lr=0.01, lazy_hessian=2, backend="eager")
    ref = cls(twin.parameters(), lr=0.01, lazy_hessian=2, backend="eager", hvp="finite_difference")
    with pytest.warns(RuntimeWarning, match="finite-difference") as record:
        opt.step(lambda: run(x))
    assert [w.filename for w in record if "finite-difference" in str(w.message)] == [__file__], \
        "the warning points at the user's opt.step() line"
    assert opt.hvp_method == "finite_difference" and not opt.hessian_due
    ref.step(lambda: twin(x))
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per run
            opt.step(lambda: run(x))
        ref.step(lambda: twin(x))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_explicit_autograd_on_such_a_model_says_what_to_do_and_loses_nothing():
    model = _models()["sdpa"]
    x = torch.randn(4, 5, 16)
    opt = SASSHA(model.parameters(), hvp="autograd", backend="eager")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="finite_difference"):
        opt.step(lambda: model(x))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(opt.state) == 0 and not opt.is_perturbed and opt.global_step == 0


def test_official_protocol_with_auto_switches_inside_hvp_passes():
    model = _models()["sdpa"]
    x = torch.randn(4, 5, 16)
    opt = SASSHA(model.parameters(), lazy_hessian=2, backend="eager")
    assert opt.hessian_due
    model(x).backward()
    opt.perturb_weights()
    model(x).backward(create_graph=opt.hessian_due)  # builds the graph; sdpa fails only in the HVP
    passes = 0
    with pytest.warns(RuntimeWarning, match="finite-difference") as record:
        for _ in opt.hvp_passes():
            model(x).backward()
            passes += 1
    opt.unperturb()
    opt.step()
    assert passes == 1 and opt.hvp_method == "finite_difference" and opt.global_step == 1
    assert {w.filename for w in record if "finite-difference" in str(w.message)} == {__file__}


def test_known_errors_are_recognised():
    assert cannot_differentiate_twice(RuntimeError(
        "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"))
    assert cannot_differentiate_twice(RuntimeError("torch.compile with aot_autograd does not currently support "
                                                   "double backward"))
    assert not cannot_differentiate_twice(RuntimeError("CUDA out of memory"))
    assert not cannot_differentiate_twice(RuntimeError("the feature is not implemented"))


# ----------------------------------------------------------------------- the step size
def test_step_size_follows_the_parameters_scale_and_precision():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    n = sum(p.numel() for p in model.parameters())
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    for autocast, fd_eps in ((False, FD_EPS["forward", 32]), (True, FD_EPS["forward", 16])):
        m = copy.deepcopy(model)
        opt = SASSHA(m.parameters(), lazy_hessian=100, hvp="finite_difference", rho=0.0, backend="eager")

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return F.cross_entropy(m(x).float(), y)

        opt.step(closure)
        expected = fd_eps * (1 + norm) / math.sqrt(n)
        assert float(opt.last_fd_step) == pytest.approx(expected, rel=1e-4), autocast


@pytest.mark.parametrize("kwargs,name", [
    (dict(hvp="double"), "hvp"), (dict(fd_eps=0.0), "fd_eps"), (dict(fd_eps=float("inf")), "fd_eps"),
    (dict(fd_eps="small"), "fd_eps"), (dict(fd_scheme="backward"), "fd_scheme"),
    (dict(max_consecutive_skips=0), "max_consecutive_skips"),
])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_bad_hvp_options_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)


# ------------------------------------------------- the user's loop around finite differences
@pytest.mark.parametrize("scheme,n_samples", [("forward", 1), ("forward", 2), ("central", 1)])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_a_zero_learning_rate_step_leaves_the_parameters_where_they_were(cls, scheme, n_samples):
    # The difference points x~ + delta z are visited and left: with lr = 0 and no decay
    # the step returns every parameter to x exactly (MSASSHA: to x, seen unperturbed).
    x = torch.nn.Parameter(torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(0)))
    w = torch.nn.Parameter(torch.randn(3, dtype=DT))  # gets a gradient from the second pass on only
    x0, w0 = x.detach().clone(), w.detach().clone()
    opt = cls([x, w], lr=0.0, hvp="finite_difference", fd_scheme=scheme, n_samples=n_samples,
              backend="eager", fd_eps=1e-2)
    calls = [0]

    def closure():
        calls[0] += 1
        return (x**4).sum() + (0 if calls[0] == 1 else (w**4).sum())

    opt.step(closure)
    with opt.unperturbed() if cls is MSASSHA else contextlib.nullcontext():
        assert torch.equal(x, x0) and torch.equal(w, w0)


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_an_error_inside_a_finite_difference_pass_loses_nothing(cls):
    x = torch.nn.Parameter(torch.randn(5, dtype=DT))
    opt = cls([x], hvp="finite_difference", backend="eager")
    with opt.unperturbed() if cls is MSASSHA else contextlib.nullcontext():
        x0 = x.detach().clone()
    state0 = copy.deepcopy(opt.state[x])
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == (2 if cls is MSASSHA else 3):  # the first finite-difference pass
            raise KeyboardInterrupt
        return (x**4).sum()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    with opt.unperturbed() if cls is MSASSHA else contextlib.nullcontext():
        assert torch.equal(x, x0)
    assert opt.global_step == 0
    for key, value in state0.items():
        assert torch.equal(opt.state[x][key], value), key
    # Entries the step began to create are at their initial values: the run goes on
    # as if the aborted step had never begun.
    twin = torch.nn.Parameter(x0.clone())
    fresh = cls([twin], hvp="finite_difference", backend="eager")
    for o, p in ((opt, x), (fresh, twin)):
        for _ in range(2):
            o.step(lambda p=p: (p**4).sum())
    assert torch.equal(x, twin)


def test_hvp_passes_without_a_backward_or_after_unperturb_raise_and_lose_nothing():
    x = torch.nn.Parameter(torch.randn(5, dtype=DT))
    x0 = x.detach().clone()
    f = lambda: (x**4).sum()  # noqa: E731
    opt = SASSHA([x], hvp="finite_difference", backend="eager")
    f().backward()
    opt.perturb_weights()
    f().backward()
    with pytest.raises(RuntimeError, match="one forward and backward per iteration"):
        for _ in opt.hvp_passes():
            pass
    assert torch.equal(x, x0) and not opt.is_perturbed and opt.global_step == 0  # the step was abandoned
    opt.zero_grad()
    f().backward()
    opt.perturb_weights()
    f().backward()
    opt.unperturb()
    with pytest.raises(RuntimeError, match="before unperturb"):
        for _ in opt.hvp_passes():
            f().backward()
    assert torch.equal(x, x0) and opt.global_step == 0


def _official_refresh(cls, hvp, clip=False, zero_grad_in_loop=False, **kw):
    """exp_hessian_diag after one official-protocol refresh step, gradients clipped before step() or not.

    The network's head ``w`` enters the loss linearly (exact curvature 0): its
    finite-difference estimate sits on the resolution floor.
    """
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    w = torch.nn.Parameter(torch.randn(3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    params = [*m.parameters(), w]
    opt = cls(params, lazy_hessian=1, hvp=hvp, backend="eager", **kw)
    loss = lambda: F.cross_entropy(m(x), y) + (w * torch.tensor([1.0, -2.0, 3.0])).sum()  # noqa: E731
    if cls is SASSHA:
        loss().backward()
        opt.perturb_weights(zero_grad=True)
    loss().backward(create_graph=opt.hessian_due)
    for _ in opt.hvp_passes():
        if zero_grad_in_loop:
            opt.zero_grad()
        loss().backward()
    if cls is SASSHA:
        opt.unperturb()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 0.1)
    opt.step()
    return torch.cat([opt.state[p]["exp_hessian_diag"].flatten() for p in params])


@pytest.mark.parametrize("hvp,kw", [("autograd", {}), ("finite_difference", {}),
                                    ("finite_difference", dict(n_samples=2, fd_scheme="central"))])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_clipping_after_hvp_passes_leaves_the_hessian_estimate_alone(cls, hvp, kw):
    # hvp_passes() finishes the estimate from the gradients as they were, its floor
    # included; clipping the step's gradient afterwards changes the step, not D.
    assert torch.equal(_official_refresh(cls, hvp, **kw), _official_refresh(cls, hvp, clip=True, **kw))


@pytest.mark.parametrize("kw", [{}, dict(n_samples=2), dict(fd_scheme="central")])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_zero_grad_inside_the_hvp_passes_loop_changes_nothing(cls, kw):
    plain = _official_refresh(cls, "finite_difference", **kw)
    assert torch.equal(plain, _official_refresh(cls, "finite_difference", zero_grad_in_loop=True, **kw))


def _scaled_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


@pytest.mark.parametrize("scheme,n_samples", [("forward", 1), ("forward", 2), ("central", 1)])
def test_a_grad_scaler_changes_nothing_with_finite_differences(scheme, n_samples):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g)
    y = (x[:, :4] * 2 + x[:, 4:8]).argmax(1)
    a, b = _scaled_model(), _scaled_model()
    kw = dict(lr=0.02, lazy_hessian=2, backend="eager", hvp="finite_difference", n_samples=n_samples,
              fd_scheme=scheme)
    plain = SASSHA(a.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaled = SASSHA(b.parameters(), grad_scaler=scaler, **kw)
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    for _ in range(3):
        plain.step(lambda: loss(a))
        scaler.scale(loss(b)).backward()
        scaled.perturb_weights(zero_grad=True)
        scaler.scale(loss(b)).backward(create_graph=scaled.hessian_due)
        for _ in scaled.hvp_passes():
            scaler.scale(loss(b)).backward()
        scaled.unperturb()
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):  # power-of-two scales: exact
        assert torch.equal(p, q)
        assert torch.equal(plain.state[p]["exp_hessian_diag"], scaled.state[q]["exp_hessian_diag"])


def test_a_refresh_step_the_scaler_skips_is_taken_again():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = MSASSHA(model.parameters(), lr=0.01, lazy_hessian=2, hvp="finite_difference", grad_scaler=scaler,
                  backend="eager")

    def iteration(poison=1.0):
        scaler.scale(F.mse_loss(model(x), y) * poison).backward()
        passes = 0
        for _ in opt.hvp_passes():
            scaler.scale(F.mse_loss(model(x), y)).backward()
            passes += 1
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return passes

    assert [iteration(), iteration()] == [1, 0]
    before = [p.detach().clone() for p in model.parameters()]
    assert iteration(poison=float("inf")) == 1  # step 3 refreshes; the scaler skips it
    assert opt.global_step == 2 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert iteration() == 1 and opt.global_step == 3  # the refresh is taken again


def test_capturable_refuses_raising_on_nonfinite_steps():
    with pytest.raises(ValueError, match="nonfinite"):
        SASSHA([torch.nn.Parameter(torch.zeros(3))], capturable=True, nonfinite="raise")


def test_unscale_and_clip_under_a_grad_scaler_equal_clipping_without_one():
    def run(scaled):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        opt = SASSHA(m.parameters(), lazy_hessian=2, hvp="finite_difference", backend="eager",
                     grad_scaler=scaler if scaled else None)
        loss = lambda: scaler.scale(F.cross_entropy(m(x), y))  # noqa: E731
        for _ in range(3):
            loss().backward()
            opt.perturb_weights(zero_grad=True)
            loss().backward()
            for _ in opt.hvp_passes():
                loss().backward()
            opt.unperturb()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return list(m.parameters())

    for p, q in zip(run(False), run(True)):
        assert torch.equal(p, q)
