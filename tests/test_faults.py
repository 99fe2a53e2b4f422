"""SPEC section 7: non-finite steps are undone and counted, or raise; no memory growth."""

import copy
import gc
import warnings

import pytest
import torch

from conftest import device_for, every_backend, requires_cuda
from parity import protocol_step
from sassha_fused import MSASSHA, SASSHA


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy({id(p): dict(opt.state[p]) for p in params if p in opt.state})


def _assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    after = {id(p): dict(opt.state[p]) for p in params if p in opt.state and opt.state[p]}
    # state the skipped step created for a param is pristine: it waits for a refresh
    for key in set(after) - set(before_state):
        new = after.pop(key)
        assert new["step"] == 0 and new["bias_correction2"] == 0
        assert not new["exp_avg"].any() and not new["exp_hessian_diag"].any()
    assert set(after) == set(before_state)
    for key, state in before_state.items():
        for name, value in state.items():
            got = after[key][name]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(value)), name


def _loss(params, poison):
    total = sum(((p - 0.3) ** 4).sum() + p.sin().sum() for p in params)
    return total * poison


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize(
    "cls,where",
    # which gradient pass sees NaN; M-SASSHA has a single pass per step
    [(SASSHA, "first"), (SASSHA, "second"), (SASSHA, "both"), (MSASSHA, "second")],
)
def test_nan_gradients_skip_the_step(backend, cls, where):
    params = [torch.nn.Parameter(torch.randn(n, device=device_for(backend))) for n in (7, 40)]
    opt = cls(params, lr=0.01, lazy_hessian=2, backend=backend)
    for _ in range(3):
        opt.step(lambda: _loss(params, 1.0))
    snap = _snapshot(opt, params)
    step_before = opt.global_step
    calls = []

    def poisoned():
        calls.append(1)
        n = len(calls)
        bad = (where == "both") or (where == "first" and n == 1) or (where == "second" and n == 2)
        bad = bad or cls is MSASSHA
        return _loss(params, float("nan") if bad else 1.0)

    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(poisoned)
    _assert_unchanged(opt, params, snap)
    # the step counts (the host does not wait for the flag), the state does not move
    assert opt.skipped_steps == 1 and opt.global_step == step_before + 1
    if cls is SASSHA:
        assert not opt.is_perturbed
    # training goes on normally afterwards
    opt.step(lambda: _loss(params, 1.0))
    assert opt.global_step == step_before + 2
    assert all(opt.state[p]["step"] == step_before + 1 for p in params)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("backend", every_backend())
def test_infinite_hessian_estimate_skips_the_refresh_step(backend):
    # |x|^1.5 has a finite gradient at 0 but an infinite second derivative there.
    p = torch.nn.Parameter(torch.tensor([0.0, 0.5, -1.0], device=device_for(backend)))
    opt = SASSHA([p], lr=0.01, rho=0.0, lazy_hessian=1, backend=backend)
    snap = _snapshot(opt, [p])
    with pytest.warns(RuntimeWarning, match="Hessian"):
        opt.step(lambda: p.abs().pow(1.5).sum())
    _assert_unchanged(opt, [p], snap)
    assert opt.skipped_steps == 1


def test_nonfinite_raise_leaves_everything_unchanged():
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = SASSHA(params, nonfinite="raise", backend="eager")
    opt.step(lambda: _loss(params, 1.0))
    snap = _snapshot(opt, params)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        opt.step(lambda: _loss(params, float("inf")))
    _assert_unchanged(opt, params, snap)
    assert opt.skipped_steps == 0 and not opt.is_perturbed


def test_nonfinite_ignore_does_not_check():
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = SASSHA(params, nonfinite="ignore", backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: _loss(params, float("nan")))
    assert torch.isnan(params[0]).all()


def test_skipped_steps_survive_state_dict():
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = SASSHA(params, backend="eager")
    with pytest.warns(RuntimeWarning):
        opt.step(lambda: _loss(params, float("nan")))
    fresh = SASSHA([torch.nn.Parameter(params[0].detach().clone())], backend="eager")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 1


@pytest.mark.parametrize("protocol", ["closure", "official"])
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_no_memory_growth_over_200_steps(protocol, cls):
    # Refresh every 2 steps; live tensors and uncollectable cycles stay flat.
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = cls(model.parameters(), lr=0.01, lazy_hessian=2, backend="foreach")
    x = torch.randn(8, 6)

    def f():
        return model(x).pow(2).mean()

    def step():
        protocol_step(opt, f, protocol)

    def live_tensors():
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's create_graph notice in protocol (b)
        for _ in range(20):
            step()
        gc.collect()
        gc.disable()
        try:
            base = live_tensors()
            for _ in range(180):
                step()
            assert gc.collect() == 0, "the steps left reference cycles behind"
            assert live_tensors() == base
        finally:
            gc.enable()


@requires_cuda
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_cuda_memory_stays_flat_over_200_steps(cls):
    torch.cuda.empty_cache()
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8)).cuda()
    opt = cls(model.parameters(), lr=0.01, lazy_hessian=2)
    x = torch.randn(32, 64, device="cuda")
    for t in range(200):
        opt.step(lambda: model(x).pow(2).mean())
        if t == 99:  # after warm-up: the fused backends' table caches (bounded LRUs) are full
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base, peak = torch.cuda.memory_allocated(), None
        if t == 149:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
    torch.cuda.synchronize()
    # Flat: no growth over the last 100 steps beyond a few small kernel tables, and
    # the last 50 steps peak no higher than the 50 before them.
    assert torch.cuda.memory_allocated() <= base + 2**20
    assert torch.cuda.max_memory_allocated() <= peak + 2**20


def _protocol_until_unperturb(opt, params, loss):
    """The official protocol up to ``unperturb()``: the gradients are the perturbed ones."""
    loss().backward()
    opt.perturb_weights(zero_grad=True)
    loss().backward()
    opt.unperturb()


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("change", ["none", "nan in place", "nan replaced", "nan before unperturb"])
def test_the_finite_check_read_by_unperturb_follows_the_gradients(backend, change):
    """unperturb() reads the perturbed gradients' squares as it restores (step()'s finite check,
    one sweep less); a gradient changed after it is read again: a NaN put there still skips."""
    params = [torch.nn.Parameter(torch.randn(n, device=device_for(backend))) for n in (7, 40)]
    opt = SASSHA(params, lr=0.01, lazy_hessian=1000, backend=backend)  # one refresh (step 1), then plain steps
    loss = lambda: _loss(params, 1.0)  # noqa: E731
    for _ in range(2):
        protocol_step(opt, loss, "official")
    snap = _snapshot(opt, params)
    if change == "nan before unperturb":
        loss().backward()
        opt.perturb_weights(zero_grad=True)
        loss().backward()
        params[1].grad[3] = float("nan")
        opt.unperturb()
    else:
        _protocol_until_unperturb(opt, params, loss)
    backend_of = opt._backend_for(params[0].device, params[0].dtype)
    reads = []
    original = backend_of.sq_norm
    backend_of.sq_norm = lambda *a, **k: reads.append(1) or original(*a, **k)
    try:
        if change == "nan in place":
            params[0].grad[2] = float("nan")
        elif change == "nan replaced":
            params[0].grad = torch.full_like(params[0].grad, float("nan"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        del backend_of.sq_norm
    skipped = any("skipped" in str(w.message) for w in caught)
    assert reads == ([] if change in ("none", "nan before unperturb") else [1]), "the check was read again or not"
    assert skipped == (change != "none")
    if skipped:
        _assert_unchanged(opt, params, snap)
    opt.zero_grad()
