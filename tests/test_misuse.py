"""The rough edges a new user hits (issue 13): documented API, full repr, protocol (b)
misuse, closures that call backward, and the reference cycle of create_graph."""

import copy
import gc
import pydoc
import weakref

import pytest
import torch

from sassha_fused import MSASSHA, SASSHA
from sassha_fused.schedules import LinearSchedule

DT = torch.float64


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DT)
    x, y = torch.randn(16, 5, dtype=DT), torch.randn(16, 3, dtype=DT)
    return model, x, y


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def standard_closure(opt, model, x, y):
    """torch.optim's closure: clears the gradients, calls backward, returns the loss."""
    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def assert_unchanged(model, opt, snap, grads_too=True):
    params, grads, sd = snap
    for p, q, g in zip(model.parameters(), params, grads):
        assert torch.equal(p, q)
        if grads_too:
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert now["sassha_fused"] == sd["sassha_fused"]
    assert set(now["state"]) == set(sd["state"])
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(now["state"][i][k], v)


# ------------------------------------------------------------------ documentation
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_help_shows_the_algorithm_and_every_argument(cls):
    doc = cls.__doc__
    assert doc and "Args:" in doc
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    import inspect

    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"{name}:" in doc, f"{name} is not documented in {cls.__name__}.__doc__"
    assert "perturb" in text and "hvp_passes" in text


def test_repr_shows_options_and_the_backend_in_use():
    model, x, y = model_and_data()
    opt = SASSHA(model.parameters(), lazy_hessian=3, hessian_power=0.7, n_samples=2, adaptive=True)
    text = repr(opt)
    for fragment in ("lazy_hessian: 3", "hessian_power: 0.7", "n_samples: 2", "adaptive: True",
                     "backend: 'auto' (in use: cpu/float64:", "hvp: 'auto' (in use: autograd)",
                     "Parameter Group 0", "lr: 0.15"):
        assert fragment in text, (fragment, text)
    assert opt.backends == {"cpu/float64": opt.backends["cpu/float64"]}
    assert "hessian_power" in repr(MSASSHA(model.parameters())) and "adaptive" not in repr(MSASSHA(model.parameters()))


# ------------------------------------------------------------- protocol (b) misuse
def test_step_without_perturb_weights_is_refused_and_changes_nothing():
    model, x, y = model_and_data()
    opt = SASSHA(model.parameters(), lazy_hessian=1)
    opt.step(lambda: loss_of(model, x, y))  # some state first
    loss_of(model, x, y).backward()  # timm's loop: backward, then step()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="without perturb_weights"):
        opt.step()
    assert_unchanged(model, opt, snap)
    assert opt.global_step == 1
    # the same step, done right, still works afterwards
    opt.perturb_weights(zero_grad=True)
    loss_of(model, x, y).backward(create_graph=opt.hessian_due)
    opt.unperturb()
    opt.step()
    assert opt.global_step == 2


def test_step_without_perturbation_is_allowed_when_rho_is_zero():
    model, x, y = model_and_data()
    ref, _, _ = model_and_data()
    opt = SASSHA(model.parameters(), rho=0.0, lazy_hessian=2)
    ropt = SASSHA(ref.parameters(), rho=0.0, lazy_hessian=2)
    for _ in range(3):
        loss_of(model, x, y).backward(create_graph=opt.hessian_due)
        opt.step()
        opt.zero_grad()
        ropt.step(lambda: loss_of(ref, x, y))  # perturbs by 0
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # a rho schedule may return anything: it needs perturb_weights()
    opt2 = SASSHA(model.parameters(), rho=LinearSchedule(0.0, 0.1, 10))
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="without perturb_weights"):
        opt2.step()


def test_msassha_step_needs_no_perturb_weights():
    model, x, y = model_and_data()
    opt = MSASSHA(model.parameters(), lazy_hessian=2)
    for _ in range(3):
        loss_of(model, x, y).backward(create_graph=opt.hessian_due)
        opt.step()
        opt.zero_grad()
    assert opt.global_step == 3


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_step_without_gradients_leaves_the_schedule_alone(cls):
    model, x, y = model_and_data()
    rho = LinearSchedule(0.1, 0.3, 10)
    opt = cls(model.parameters(), lazy_hessian=2, rho=rho, hessian_power=LinearSchedule(0.5, 1.0, 10))
    opt.step(lambda: loss_of(model, x, y))
    opt.zero_grad()
    snap = snapshot(model, opt)
    for _ in range(3):
        assert opt.step() is None  # no gradient anywhere
    assert_unchanged(model, opt, snap)
    assert opt.global_step == 1 and not opt.refresh_due
    # the schedules did not move either: the next real step equals a run without the empty steps
    ref, _, _ = model_and_data()
    ropt = cls(ref.parameters(), lazy_hessian=2, rho=LinearSchedule(0.1, 0.3, 10),
               hessian_power=LinearSchedule(0.5, 1.0, 10))
    for m, o in ((model, opt), (ref, ropt)):
        if o is ropt:
            o.step(lambda: loss_of(ref, x, y))
        o.step(lambda m=m: loss_of(m, x, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------- closures that call backward
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_autograd_hvps_with_a_closure_that_calls_backward_say_so(cls):
    model, x, y = model_and_data()
    opt = cls(model.parameters(), hvp="autograd")
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError) as info:
        opt.step(standard_closure(opt, model, x, y))
    msg = str(info.value)
    assert "the closure calls backward() itself" in msg and "hvp='finite_difference'" in msg
    assert "differentiated twice" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no internal exception chained
    assert_unchanged(model, opt, snap, grads_too=False)  # (the gradients are the closure's)


def test_a_closure_that_reuses_a_spent_graph_gets_our_message_only():
    model, x, y = model_and_data()
    opt = SASSHA(model.parameters())

    def closure():  # backward, then clears the gradients: the optimizer cannot run the pass
        loss = loss_of(model, x, y)
        loss.backward()
        opt.zero_grad()
        return loss

    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError) as info:
        opt.step(closure)
    assert "already used by a backward pass" in str(info.value)
    assert "retain_graph" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_unchanged(model, opt, snap, grads_too=False)


# -------------------------------------------------------------- reference cycle
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_protocol_b_with_create_graph_leaves_no_reference_cycle(cls):
    """PyTorch warns that backward(create_graph=True) creates a parameter/gradient cycle; the
    optimizer breaks it (it detaches graph-carrying gradients when it takes the products), so
    everything is freed by reference counting alone, without the garbage collector."""
    gc.collect()
    gc.disable()
    try:
        model, x, y = model_and_data()
        opt = cls(model.parameters(), lazy_hessian=1, hvp="autograd")
        for _ in range(2):
            loss_of(model, x, y).backward()
            if cls is SASSHA:
                opt.perturb_weights(zero_grad=True)
                loss_of(model, x, y).backward(create_graph=opt.hessian_due)
                opt.unperturb()
            else:
                opt.zero_grad()
                loss_of(model, x, y).backward(create_graph=opt.hessian_due)
            for _ in opt.hvp_passes():
                pass
            assert not any(p.grad.requires_grad for p in model.parameters())
            opt.step()
        probe = weakref.ref(model[0].weight)
        del model, opt
        assert probe() is None, "a parameter outlived its model and optimizer: a reference cycle"
    finally:
        gc.enable()


def test_nested_unperturbed_blocks_record_the_outside_point():
    model, x, y = model_and_data()
    opt = MSASSHA(model.parameters())
    opt.step(lambda: loss_of(model, x, y))
    assert opt.is_perturbed
    with opt.unperturbed():
        with opt.unperturbed():  # e.g. a trainer's checkpoint around its save_model
            pass
        sd = opt.state_dict()  # taken after the inner block: still records x~ outside
    assert sd["sassha_fused"]["is_perturbed"]
    assert opt.is_perturbed


# -------------------------------------------------------- review fixes (second reader)
def test_a_closure_that_skips_its_batch_skips_the_step():
    """Lightning's training_step may return None to skip a batch: no loss, no gradient."""
    model, x, y = model_and_data()
    for cls in (SASSHA, MSASSHA):
        opt = cls(model.parameters(), lazy_hessian=2)
        opt.step(lambda: loss_of(model, x, y))
        opt.zero_grad()
        snap = snapshot(model, opt)
        assert opt.step(lambda: None) is None
        assert_unchanged(model, opt, snap)
        assert opt.global_step == 1
    calls = []

    def second_pass_returns_none():  # inconsistent: the first pass had a loss
        calls.append(1)
        return loss_of(model, x, y) if len(calls) == 1 else None

    opt = SASSHA(model.parameters())
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(second_pass_returns_none)


def test_an_aborted_step_does_not_count_as_perturbed():
    model, x, y = model_and_data()
    opt = SASSHA(model.parameters(), hvp="autograd")
    with pytest.raises(RuntimeError, match="calls backward"):
        opt.step(standard_closure(opt, model, x, y))  # aborted after perturb_weights() ran
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="without perturb_weights"):
        opt.step()
    opt.zero_grad()
    assert opt.step() is None and opt.global_step == 0  # and a step without gradients is still a no-op


def test_zero_grad_carries_out_a_deferred_restore_of_a_skipped_step():
    """defer_unperturb=True leaves the restore to step(); a step that never comes (GradScaler
    skipped it) must not leave the parameters at the perturbed point."""
    model, x, y = model_and_data()
    opt = SASSHA(model.parameters(), defer_unperturb=True, lazy_hessian=5)
    opt.step(lambda: loss_of(model, x, y))
    x_t = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.perturb_weights(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.unperturb()  # deferred
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), x_t))
    opt.zero_grad()  # the scaler skipped step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), x_t)) and not opt.is_perturbed


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_finite_differences_see_the_dropout_masks_of_the_pass_they_differ_from(cls):
    """With dropout, step(closure)'s finite-difference passes replay the random state of the pass
    at the Hessian point: the estimate equals autograd's (taken on that pass's graph), and the
    run's random stream is the one autograd leaves."""
    runs = {}
    for hvp in ("autograd", "finite_difference"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(32, 3)).to(DT)
        x, y = torch.randn(16, 5, dtype=DT), torch.randn(16, 3, dtype=DT)
        opt = cls(model.parameters(), lazy_hessian=1, hvp=hvp, fd_eps=1e-5)
        for _ in range(3):
            opt.step(lambda: loss_of(model, x, y))
        runs[hvp] = ([p.detach().clone() for p in model.parameters()],
                     [opt.state[p]["exp_hessian_diag"].clone() for p in model.parameters()],
                     torch.rand(3))
    (_, da, ra), (_, df, rf) = runs["autograd"], runs["finite_difference"]
    assert torch.equal(ra, rf)
    # element-wise relative difference of D: ~1e-3 (the difference quotient's truncation);
    # with fresh masks in the difference pass it was ~1e7 (the masks, divided by delta)
    worst = max(((a - f).abs() / a.abs()).max().item() for a, f in zip(da, df))
    assert worst < 0.05, worst


def test_random_state_replay_restores_the_stream():
    from sassha_fused import RandomState

    import random

    import numpy as np

    def draw():
        return torch.rand(4).tolist() + [random.random()] + np.random.rand(2).tolist()

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    rng = RandomState.capture()
    a = draw()
    with rng.replay():
        b = draw()  # torch, Python and numpy masks alike
    c = draw()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    draw()
    assert a == b and c == draw()  # and the stream went on as if the block had not run


def test_a_skipped_batch_is_refused_where_other_ranks_wait_or_a_step_is_under_way(monkeypatch):
    model, x, y = model_and_data()
    opt = SASSHA(model.parameters())
    monkeypatch.setattr(opt, "_data_parallel", lambda: True)  # another rank would wait for this one
    with pytest.raises(TypeError, match="data-parallel"):
        opt.step(lambda: None)
    monkeypatch.undo()
    loss_of(model, x, y).backward()
    opt.perturb_weights(zero_grad=True)  # a protocol (b) step under way: a dummy closure must not end it
    loss_of(model, x, y).backward()
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(lambda: None)
    assert not opt.is_perturbed  # the failed step was aborted: params back at x_t


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_reentrant_checkpoint_around_the_first_layer_is_trained(cls):
    """No parameter lies upstream of the checkpoint: autograd.grad prunes it without an error and
    the parameters inside would silently get no gradient. The first pass finds it in the graph
    and takes plain backward() passes: the run equals one without checkpointing (dropout
    included: no pass is taken twice, so the masks stay those of the plain run)."""
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.ckpt = torch.nn.Linear(5, 16).to(DT), torch.nn.Linear(16, 3).to(DT), ckpt
            self.drop = torch.nn.Dropout(0.3)

        def inner(self, h):
            return self.drop(torch.tanh(self.a(h)))

        def forward(self, h):
            h = checkpoint(self.inner, h, use_reentrant=True) if self.ckpt else self.inner(h)
            return self.b(h)

    runs = []
    for ckpt in (False, True):
        net = Net(ckpt)
        torch.manual_seed(1)
        x, y = torch.randn(8, 5, dtype=DT, requires_grad=True), torch.randn(8, 3, dtype=DT)
        opt = cls(net.parameters(), lazy_hessian=2, hvp="finite_difference")
        for _ in range(3):
            opt.step(lambda: loss_of(net, x, y))
        assert len(opt.state) == 4  # every parameter took part
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a - b).abs().max()


def test_explicit_autograd_keeps_refusing_a_reentrant_checkpointed_model():
    """hvp='autograd' refuses the model on every step; a caught error must not leave later steps
    silently skipping the checkpointed parameters."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 8).to(DT), torch.nn.Linear(8, 1).to(DT)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)

    def closure():
        return b(checkpoint(lambda h: torch.tanh(a(h)), x, use_reentrant=True)).pow(2).mean()

    for cls in (SASSHA, MSASSHA):
        opt = cls(list(a.parameters()) + list(b.parameters()), hvp="autograd", lazy_hessian=1)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="reentrant"):
                opt.step(closure)
        assert len(opt.state) == 0 and opt.global_step == 0


def test_graphs_too_deep_to_walk_get_a_warning_not_a_crash():
    """Walking very deep autograd graphs from Python crashed PyTorch when the graph was freed;
    the walk stops after a bound, and only runs when a parameter got no gradient."""
    torch.manual_seed(0)
    w, unused = torch.nn.Parameter(torch.full((3,), 0.5, dtype=DT)), torch.nn.Parameter(torch.zeros(2, dtype=DT))
    x = torch.randn(3, dtype=DT)

    def deep():
        h = x
        for _ in range(4000):  # ~8000 autograd nodes
            h = torch.tanh(h * w)
        return h.sum()

    opt = SASSHA([w, unused], lazy_hessian=1, hvp="finite_difference")
    with pytest.warns(RuntimeWarning, match="too large"):
        opt.step(deep)
    assert "exp_avg" in opt.state[w] and opt.global_step == 1
