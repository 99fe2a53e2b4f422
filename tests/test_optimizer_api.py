"""What torch.optim users rely on, bad input, and exact resume."""

import copy

import pytest
import torch

from parity import clone_params, coupled_loss, make_params, run_trajectory
from sassha_fused import MSASSHA, SASSHA, BackendUnavailable, available_backends, preserve_bn_stats
from sassha_fused.backends import Backend
from sassha_fused.schedules import CosineSchedule, LinearSchedule

DT = torch.float64


def _param(n=4, dtype=DT):
    return torch.nn.Parameter(torch.randn(n, dtype=dtype))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-0.1), "lr"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(rho=-0.1), "rho"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(lazy_hessian=0), "lazy_hessian"),
        (dict(n_samples=0), "n_samples"),
        (dict(perturb_eps=-1.0), "perturb_eps"),
        (dict(backend="tpu"), "backend"),
        (dict(seed=-3), "seed"),
    ],
)
@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_invalid_hyperparameters_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([_param()], **kwargs)


def test_invalid_group_hyperparameter_is_rejected():
    opt = SASSHA([_param()])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [_param()], "lr": -1.0})


def test_complex_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        SASSHA([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_sparse_gradients_are_rejected_and_nothing_changes():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = SASSHA(emb.parameters(), backend="eager")
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.perturb_weights()
    assert torch.equal(emb.weight, before)
    assert len(opt.state) == 0


def test_unavailable_backend_raises_with_reason():
    status = available_backends()
    assert set(status) == {"eager", "foreach", "triton", "cuda", "cpp"}
    assert status["eager"].available and status["foreach"].available
    for name, st in status.items():
        assert isinstance(st.reason, str) and st.reason
        if not st.available:
            with pytest.raises(BackendUnavailable, match=name):
                SASSHA([_param(dtype=torch.float32)], backend=name)


def test_backend_instance_that_cannot_run_is_rejected():
    class NoFloat64(Backend):
        name = "nof64"

        def supports(self, device, dtype):
            return "float64 is not supported" if dtype == torch.float64 else None

    with pytest.raises(BackendUnavailable, match="float64 is not supported"):
        SASSHA([_param()], backend=NoFloat64())


def test_missing_create_graph_raises_and_loses_nothing():
    x = _param()
    opt = SASSHA([x], lazy_hessian=2, backend="eager")
    f = lambda: (x**4).sum()  # noqa: E731
    opt.step(f)  # step 1 (refresh)
    opt.step(f)  # step 2
    assert opt.hessian_due
    before_x = x.detach().clone()
    before_state = copy.deepcopy(opt.state[x])
    f().backward()
    opt.perturb_weights()
    f().backward()  # forgot create_graph=opt.hessian_due
    opt.unperturb()
    with pytest.raises(RuntimeError, match="create_graph=opt.hessian_due"):
        opt.step()
    assert torch.equal(x, before_x)
    for key, value in before_state.items():
        assert torch.equal(torch.as_tensor(opt.state[x][key]), torch.as_tensor(value))
    assert opt.global_step == 2 and opt.hessian_due
    # and the user can simply redo the step correctly
    opt.zero_grad()
    f().backward()
    opt.perturb_weights()
    f().backward(create_graph=opt.hessian_due)
    opt.unperturb()
    opt.step()
    assert opt.global_step == 3


def test_missing_create_graph_without_unperturb_restores_params():
    x = _param()
    opt = SASSHA([x], backend="eager")
    before = x.detach().clone()
    (x**4).sum().backward()
    opt.perturb_weights()
    (x**4).sum().backward()
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.step()
    assert torch.equal(x, before) and not opt.is_perturbed and len(opt.state) == 0


def test_params_without_grad_are_skipped_and_untouched():
    a, frozen, unused = _param(), _param(), _param()
    frozen.requires_grad_(False)
    opt = SASSHA([a, frozen, unused], backend="eager")
    fb, ub = frozen.detach().clone(), unused.detach().clone()
    for _ in range(3):
        opt.step(lambda: (a**4).sum() + frozen.sum())
    assert torch.equal(frozen, fb) and torch.equal(unused, ub)
    assert frozen not in opt.state and unused not in opt.state
    assert opt.state[a]["step"] == 3


def test_param_joining_between_refreshes_waits_for_the_next_one():
    a, late = _param(), _param()
    opt = SASSHA([a, late], lazy_hessian=3, backend="eager")
    late_before = late.detach().clone()
    opt.step(lambda: (a**4).sum())  # step 1: refresh, late unused
    opt.step(lambda: (a**4).sum() + (late**4).sum())  # step 2: late has a grad, no refresh
    # it takes part from now on, but its state stays at zero until its first refresh
    assert opt.state[late]["step"] == 0 and opt.state[late]["bias_correction2"] == 0
    assert torch.all(opt.state[late]["exp_avg"] == 0)
    assert torch.equal(late, late_before)  # perturbed and restored, not updated
    opt.step(lambda: (a**4).sum() + (late**4).sum())  # step 3
    opt.step(lambda: (a**4).sum() + (late**4).sum())  # step 4: refresh, late joins
    assert opt.state[late]["step"] == 1 and opt.state[late]["bias_correction2"] > 0
    assert not torch.equal(late, late_before)


def test_hvp_tolerates_params_absent_from_second_order_graph():
    # b enters linearly: its gradient has no graph, its Hessian is zero.
    a, b = _param(), _param()
    opt = SASSHA([a, b], lazy_hessian=1, backend="eager")
    for _ in range(2):
        opt.step(lambda: (a**4).sum() + (b * 2.0).sum())
    assert torch.all(opt.state[b]["exp_hessian_diag"] == 0)
    assert torch.all(opt.state[a]["exp_hessian_diag"] > 0)


def test_param_groups_have_their_own_hyperparameters():
    p0 = make_params([5, 7], DT)
    ps = clone_params(p0)
    groups = [{"params": [ps[0]], "lr": 0.01, "weight_decay": 0.1, "rho": 0.05}, {"params": [ps[1]], "betas": (0.8, 0.99)}]
    opt = run_trajectory(lambda q: SASSHA(groups, lr=0.02, backend="eager"), ps, 6)
    # Each group alone, with its settings as the defaults, gives the same params:
    # groups share only the global gradient norm, so run both in one optimizer
    # with identical settings to check the per-group values really apply.
    same = clone_params(p0)
    opt2 = run_trajectory(lambda q: SASSHA(q, lr=0.02, backend="eager"), same, 6)
    assert not torch.equal(ps[0], same[0]) and not torch.equal(ps[1], same[1])
    assert opt.param_groups[1]["betas"] == (0.8, 0.99) and opt.param_groups[0]["lr"] == 0.01
    assert opt2.param_groups[0]["lr"] == 0.02


def test_lr_scheduler_drives_the_learning_rate():
    p0 = make_params([9], DT)
    a, b = clone_params(p0), clone_params(p0)
    opt_a = SASSHA(a, lr=0.1, backend="eager")
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    opt_b = SASSHA(b, lr=0.1, backend="eager")
    for t in range(6):
        opt_a.step(lambda: coupled_loss(a, t))
        sched.step()
        opt_b.step(lambda: coupled_loss(b, t))
        opt_b.param_groups[0]["lr"] = 0.1 * 0.5 ** ((t + 1) // 2)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
@pytest.mark.parametrize("dtype", [DT, torch.float32, torch.bfloat16])
def test_state_dict_resume_gives_the_same_trajectory(cls, dtype):
    def make(q):
        return cls(q, lr=0.02, lazy_hessian=3, n_samples=2, seed=11, backend="eager",
                   hessian_power=CosineSchedule(0.5, 0.8, 20), rho=LinearSchedule(0.05, 0.2, 20))

    p0 = make_params([7, 33, 0, 2], dtype)
    straight = clone_params(p0)
    opt = make(straight)
    for t in range(14):
        opt.step(lambda: coupled_loss(straight, t))

    first = clone_params(p0)
    opt1 = make(first)
    for t in range(7):  # stops mid-way between refreshes (refresh at 7, next at 10)
        opt1.step(lambda: coupled_loss(first, t))
    saved_state = copy.deepcopy(opt1.state_dict())
    saved_params = [p.detach().clone() for p in first]
    del opt1

    resumed = [torch.nn.Parameter(s.clone()) for s in saved_params]
    opt2 = make(resumed)
    opt2.load_state_dict(saved_state)
    for key in ("exp_avg", "exp_hessian_diag"):
        assert all(opt2.state[p][key].dtype == (DT if dtype == DT else torch.float32) for p in resumed if p in opt2.state)
    for t in range(7, 14):
        opt2.step(lambda: coupled_loss(resumed, t))
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        if p in opt.state:
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, opt2.state[q][key]), key
                else:
                    assert value == opt2.state[q][key], key


def test_preserve_bn_stats_keeps_running_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    x = torch.randn(8, 3)
    model(x)  # one normal update
    bn = model[1]
    mean, var, n = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with preserve_bn_stats(model):
        out = model(x * 2)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, n) and bn.momentum == 0.1
    # the forward still normalised with the batch statistics
    assert out.shape == (8, 1)
    with preserve_bn_stats(model, enabled=False):
        model(x * 2)
    assert not torch.equal(bn.running_mean, mean)


def test_perturbed_closure_pass_can_preserve_bn_stats():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = SASSHA(model.parameters(), lr=0.01, backend="eager")
    x = torch.randn(8, 3)
    passes = []

    def closure():
        passes.append(opt.is_perturbed)
        with preserve_bn_stats(model, enabled=opt.is_perturbed):
            return model(x).pow(2).mean()

    opt.step(closure)
    assert passes == [False, True]
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_defer_unperturb_gives_the_same_trajectory(backend):
    p0 = make_params([7, 33, 1025], torch.float32)
    a, b = clone_params(p0), clone_params(p0)
    oa = run_trajectory(lambda q: SASSHA(q, lr=0.01, lazy_hessian=3, backend=backend), a, 10, "official")
    ob = run_trajectory(lambda q: SASSHA(q, lr=0.01, lazy_hessian=3, backend=backend, defer_unperturb=True),
                        b, 10, "official")
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_hessian_diag"):
            assert torch.equal(oa.state[p][key], ob.state[q][key])


def test_deferred_restore_happens_before_anything_that_reads_params():
    x = _param()
    opt = SASSHA([x], backend="eager", defer_unperturb=True)
    before = x.detach().clone()
    for action in ("state_dict", "unperturbed", "perturb_weights"):
        (x**4).sum().backward()
        opt.perturb_weights()
        (x**4).sum().backward(create_graph=opt.hessian_due)
        opt.unperturb()
        assert opt.is_perturbed and not torch.equal(x, before)  # restore left to step()
        if action == "state_dict":
            opt.state_dict()
        elif action == "unperturbed":
            with opt.unperturbed():
                pass
        else:
            # A new step starts from the restored point, not from the perturbed one.
            opt.zero_grad()
            (x**4).sum().backward()
            opt.perturb_weights()
            opt.unperturb()
            with opt.unperturbed():
                pass
        assert torch.equal(x, before) and not opt.is_perturbed
        opt.zero_grad()


# ---- regressions found in review ---------------------------------------------------


def test_msassha_closure_does_not_update_frozen_params_with_stale_grads():
    a, b = _param(), _param()
    opt = MSASSHA([a, b], backend="eager")
    opt.step(lambda: (a**4).sum() + (b**4).sum())
    b.requires_grad_(False)
    b.grad = torch.ones_like(b)  # left over from before it was frozen
    with opt.unperturbed():
        before = b.detach().clone()
    for _ in range(3):
        opt.step(lambda: (a**4).sum() + (b**4).sum())
    assert opt.state[b]["step"] == 1
    with opt.unperturbed():
        assert torch.equal(b, before)


def test_exception_inside_closure_step_loses_nothing():
    x = _param()
    opt = SASSHA([x], backend="eager")
    opt.step(lambda: (x**4).sum())
    before, state = x.detach().clone(), copy.deepcopy(opt.state[x])
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in the perturbed pass")
        return (x**4).sum()

    with pytest.raises(MemoryError):
        opt.step(closure)
    assert torch.equal(x, before) and not opt.is_perturbed
    assert torch.equal(opt.state[x]["exp_avg"], state["exp_avg"]) and opt.global_step == 1
    opt.step(lambda: (x**4).sum())  # and the next step runs
    assert opt.global_step == 2


def test_grad_scaler_with_closure_is_refused():
    scaler = torch.amp.GradScaler("cpu")
    x = _param(dtype=torch.float32)
    for cls in (SASSHA, MSASSHA):
        opt = cls([x], grad_scaler=scaler, backend="eager")
        with pytest.raises(ValueError, match="grad_scaler"):
            opt.step(lambda: (x**4).sum())


def test_rejected_param_group_is_not_kept():
    opt = SASSHA([_param()])
    for bad in ({"params": [_param()], "lr": -1.0},
                {"params": [torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))]}):
        with pytest.raises((ValueError, TypeError)):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1


def test_duplicate_params_are_rejected():
    a = _param()
    with pytest.raises(ValueError, match="twice"):
        SASSHA([a, a])


def test_rho_schedule_leaves_groups_with_their_own_rho_alone():
    a, b = _param(), _param()
    opt = SASSHA([{"params": [a], "rho": 0.0}, {"params": [b]}], rho=LinearSchedule(0.1, 0.2, 5), backend="eager")
    opt.step(lambda: (a**4).sum() + (b**4).sum())
    assert opt.param_groups[0]["rho"] == 0.0 and opt.param_groups[1]["rho"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rho"):
        SASSHA([{"params": [_param()], "rho": LinearSchedule(0.1, 0.2, 5)}])


def test_skipped_step_counts_as_a_step_and_leaves_state_alone():
    # The skip decision is a device flag the update reads, so the host moves on:
    # the optimizer's step counter and the schedules advance, per-parameter state
    # (step counts included) does not.
    x = _param()
    power, rho = LinearSchedule(0.5, 1.0, 10), LinearSchedule(0.05, 0.5, 10)
    opt = SASSHA([x], hessian_power=power, rho=rho, backend="eager")
    opt.step(lambda: (x**4).sum())
    state = copy.deepcopy(opt.state[x])
    with pytest.warns(RuntimeWarning):
        opt.step(lambda: (x**4).sum() * float("nan"))
    for key, value in state.items():
        assert torch.equal(opt.state[x][key], value), key
    opt.step(lambda: (x**4).sum())
    assert power.t == 3 and rho.t == 3 and opt.global_step == 3
    assert opt.state[x]["step"] == 2 and opt.skipped_steps == 1


@pytest.mark.parametrize("inside", [True, False])
def test_msassha_checkpoint_inside_or_outside_unperturbed_resumes_exactly(inside):
    p0 = make_params([9, 40], DT)
    straight, first = clone_params(p0), clone_params(p0)
    make = lambda q: MSASSHA(q, lr=0.02, lazy_hessian=3, backend="eager")  # noqa: E731
    o = make(straight)
    for t in range(10):
        o.step(lambda: coupled_loss(straight, t))
    o1 = make(first)
    for t in range(5):
        o1.step(lambda: coupled_loss(first, t))
    if inside:
        with o1.unperturbed():
            model, opt_state = [p.detach().clone() for p in first], copy.deepcopy(o1.state_dict())
    else:
        model, opt_state = [p.detach().clone() for p in first], copy.deepcopy(o1.state_dict())
    resumed = [torch.nn.Parameter(m) for m in model]  # the model is loaded first
    o2 = make(resumed)
    o2.load_state_dict(opt_state)
    for t in range(5, 10):
        o2.step(lambda: coupled_loss(resumed, t))
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_closure_that_calls_backward_needs_finite_differences():
    x = _param()

    def calls_backward():
        loss = (x**4).sum()
        loss.backward()
        return loss

    opt = SASSHA([x], backend="eager", hvp="autograd")
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="finite_difference"):
        opt.step(calls_backward)
    assert torch.equal(x, before) and not opt.is_perturbed and opt.global_step == 0 and len(opt.state) == 0
    # "auto" (the default) takes finite differences for such a closure
    opt = SASSHA([x], backend="eager")
    opt.step(calls_backward)
    assert opt.hvp_method == "finite_difference" and opt.global_step == 1
    with pytest.raises(ValueError, match="without calling backward"):
        opt.step(lambda: (x**4).sum().detach())
    assert not opt.is_perturbed and opt.global_step == 1


def test_sassha_unperturbed_mid_step_shows_the_unperturbed_point():
    x = _param()
    opt = SASSHA([x], backend="eager")
    before = x.detach().clone()
    (x**4).sum().backward()
    opt.perturb_weights()
    perturbed = x.detach().clone()
    with opt.unperturbed():
        assert torch.equal(x, before)
    assert torch.equal(x, perturbed) and opt.is_perturbed
