"""FSDP2 (``fully_shard``) with two gloo ranks on the CPU (SPEC section 6, issue 12).

Each rank trains on half of a batch; with a mean loss FSDP's averaged gradient is
the whole batch's gradient, so a sharded run must equal one process trained on the
whole batch, probes included (they are keyed by the global element index). Float64:
a finite difference divides the rounding of a different reduction order by the
step delta, which float32 would turn into visible drift.
"""

import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import every_backend
from parity import protocol_step
from sassha_fused import MSASSHA, SASSHA

pytest.importorskip("torch.distributed.fsdp", reason="torch without torch.distributed")

STEPS, K = 7, 3
# fd_eps: float64's default step (1e-7 relative) turns the 1e-16 rounding of another
# reduction order into 1e-9 differences of h; at 1e-3 a wrong probe or norm would
# still show at 1e-4, and the rounding stays below 1e-12
ARGS = dict(lr=0.05, rho=0.1, weight_decay=0.01, lazy_hessian=K, hvp="finite_difference", fd_eps=1e-3)
RUNS = [(SASSHA, "closure"), (SASSHA, "official"), (SASSHA, "standard"), (MSASSHA, "closure"), (MSASSHA, "official")]


def _model():
    torch.manual_seed(0)
    # 5, 3 and 1 output rows: uneven shards, and rank 1 holds an empty one
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1)).double()


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for i in (0, 2, 4):
        fully_shard(model[i])
    fully_shard(model)
    return model


def _batch(rank=None):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 7, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
    return (x, y) if rank is None else (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])


def _loss(model, x, y):
    return lambda: ((model(x) - y) ** 2).mean()


def _full(model, opt=None):
    """The whole parameters (gathered), at x_t for M-SASSHA."""
    ctx = opt.unperturbed() if isinstance(opt, MSASSHA) else _nothing()
    with ctx:
        return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).reshape(-1)
                          for p in model.parameters()])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _train(opt, model, x, y, protocol, steps):
    counts = []
    for _ in range(steps):
        protocol_step(opt, _loss(model, x, y), protocol)
        counts.append(opt.last_step_collectives)
    return counts


def _dcp_round_trip(rank, backend, tmp, cls):
    """Save after 3 steps, go on for 4; a fresh run loaded from the checkpoint goes on the same way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    x, y = _batch(rank)
    model = _shard(_model())
    opt = cls(model.parameters(), backend=backend, **ARGS)
    _train(opt, model, x, y, "closure", 3)
    msd, osd = get_state_dict(model, opt)
    ckpt = os.path.join(tmp, "ckpt" if cls is SASSHA else f"ckpt-{cls.__name__}")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    _train(opt, model, x, y, "closure", 4)
    expected = _full(model, opt)

    torch.manual_seed(5)
    model2 = _shard(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3),
                                        torch.nn.Tanh(), torch.nn.Linear(3, 1)).double())
    opt2 = cls(model2.parameters(), backend=backend, **ARGS)
    msd2, osd2 = get_state_dict(model2, opt2)  # initialises the fresh optimizer's (sharded) state
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt2.global_step == 3
    _train(opt2, model2, x, y, "closure", 4)
    return expected, _full(model2, opt2)


def _errors(rank):
    """Layouts the optimizer cannot step raise a clear error, and nothing changes."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    out = {}
    model = _shard(_model())
    with pytest.raises(ValueError, match="hvp='finite_difference'"):
        SASSHA(model.parameters(), hvp="autograd")
    mixed = _model()
    fully_shard(mixed[0])  # the rest stays plain: FSDP would not average it
    before = [p.detach().clone() for p in mixed[2:].parameters()]
    with pytest.raises(ValueError, match=r"fully_shard\(model\)"):
        SASSHA(mixed.parameters(), hvp="finite_difference")
    opt = SASSHA(mixed[0].parameters(), hvp="finite_difference")
    with pytest.raises(ValueError, match="plain"):
        opt.add_param_group({"params": list(mixed[2:].parameters())})
    assert len(opt.param_groups) == 1
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, mixed[2:].parameters()))
    # a whole (unsharded) state dict into a sharded optimizer: refused before anything changes
    x, y = _batch(rank)
    sharded = SASSHA(model.parameters(), **ARGS)
    _train(sharded, model, x, y, "closure", 1)
    plain_model = _model()
    plain = SASSHA(plain_model.parameters(), distributed=False, **ARGS)
    _train(plain, plain_model, x, y, "closure", 2)
    m_before = [sharded.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Nothing was loaded"):
        sharded.load_state_dict(plain.state_dict())
    out["unchanged"] &= sharded.global_step == 1 and all(
        torch.equal(a, sharded.state[p]["exp_avg"].to_local()) for a, p in zip(m_before, model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsdp1 = FullyShardedDataParallel(torch.nn.Linear(3, 4).double(), device_id=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="fully_shard"):
        SASSHA(fsdp1.parameters())
    return out


def _clipped(rank, backend):
    """Official protocol, gradients clipped between unperturb() and step(): the Hessian
    estimate (its resolution floor included) is still the whole batch's. A loss linear
    in the last layer leaves only the floor in that layer's D."""
    def run(model, opt, x, y):
        loss = lambda: (model(x) * y).mean()  # noqa: E731
        for _ in range(3):
            loss().backward()
            opt.perturb_weights(zero_grad=True)
            loss().backward()
            for _ in opt.hvp_passes():
                loss().backward()
            opt.unperturb()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-4)
            opt.step()
            opt.zero_grad()
        return torch.cat([(d.full_tensor() if hasattr(d, "full_tensor") else d).reshape(-1)
                          for d in (opt.state[p]["exp_hessian_diag"] for p in model.parameters())])

    args = dict(ARGS, lazy_hessian=1, fd_eps="auto")
    model = _shard(_model())
    sharded = run(model, SASSHA(model.parameters(), backend=backend, **args), *_batch(rank))
    whole_model = _model()
    whole = run(whole_model, SASSHA(whole_model.parameters(), backend=backend, distributed=False, **args), *_batch())
    return dict(sharded=sharded, whole=whole)


def _worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _batch(rank)
        results = {}
        for cls, protocol in RUNS:
            model = _shard(_model())
            opt = cls(model.parameters(), backend=backend, **ARGS)
            counts = _train(opt, model, x, y, protocol, STEPS)
            local_state = sum(opt.state[p]["exp_avg"].to_local().numel() for p in model.parameters())
            local_params = sum(p.to_local().numel() for p in model.parameters())
            sharded = _full(model, opt)
            # the same model and data in one process: the whole batch, no process group
            whole = _model()
            ref = cls(whole.parameters(), backend=backend, distributed=False, **ARGS)
            _train(ref, whole, *_batch(), protocol, STEPS)
            results[cls.__name__, protocol] = dict(sharded=sharded, whole=_full(whole, ref), counts=counts,
                                                   local_state=local_state, local_params=local_params,
                                                   hvp=opt.hvp_method)
        results["clipped"] = _clipped(rank, backend)
        dcp = {cls.__name__: _dcp_round_trip(rank, backend, out_dir, cls) for cls in (SASSHA, MSASSHA)}
        errors = _errors(rank)
        torch.save({"results": results, "dcp": dcp, "errors": errors},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: tearing down gloo mid-collective aborts the other rank
    finally:
        dist.destroy_process_group()


def _resume_in_one_process(ckpt, backend):
    """The 2-rank checkpoint loaded into one unsharded process, then 4 more whole-batch steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _model()
    opt = SASSHA(model.parameters(), backend=backend, **ARGS)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.global_step == 3
    _train(opt, model, *_batch(), "closure", 4)
    return _full(model)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note when loading in one process
@pytest.mark.parametrize("backend", every_backend("eager", "foreach", "cpp"))  # Triton: float32 below
def test_fsdp2_two_ranks_equal_one_process(backend):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, backend), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
        one_process = _resume_in_one_process(os.path.join(tmp, "ckpt"), backend)
    total = sum(p.numel() for p in _model().parameters())
    clipped = r0["results"].pop("clipped")
    torch.testing.assert_close(clipped["sharded"], clipped["whole"], rtol=1e-6, atol=0)
    for key, a in r0["results"].items():
        b = r1["results"][key]
        assert a["hvp"] == "finite_difference"
        assert torch.equal(a["sharded"], b["sharded"]), key
        # sharded == unsharded on the whole batch, up to the reduction order
        torch.testing.assert_close(a["sharded"], a["whole"], rtol=1e-10, atol=1e-12)
        assert not torch.equal(a["whole"], _full(_model())), key  # it trained
        # each rank keeps the state of its own shards only
        assert a["local_state"] == a["local_params"] and b["local_state"] == b["local_params"], key
        assert a["local_state"] + b["local_state"] == total, key
        # scalar all-reduces per step: the norm and the finite check; refresh steps
        # (1, 4, 7) add the norm of x_t for the step delta
        if key[0] == "SASSHA":
            assert a["counts"] == [3, 2, 2, 3, 2, 2, 3], (key, a["counts"])
        else:  # the momentum norm of the perturbation follows the update (counted in the next step)
            assert a["counts"] == [2, 2, 2, 3, 2, 2, 3], (key, a["counts"])
    for name in ("SASSHA", "MSASSHA"):
        for r in (r0, r1):
            expected, resumed = r["dcp"][name]
            assert torch.equal(expected, resumed), f"{name}: the DCP round trip changed the trajectory"
    torch.testing.assert_close(one_process, r0["dcp"]["SASSHA"][0], rtol=1e-10, atol=1e-12)
    assert r0["errors"]["unchanged"] and r1["errors"]["unchanged"]


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_distributed_state_dict_helpers_initialise_a_fresh_optimizer(cls):
    """get_state_dict's zero-lr step on a fresh optimizer creates the state and moves nothing."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _model()
    before = _full(model)
    opt = cls(model.parameters(), **ARGS)
    _, osd = get_state_dict(model, opt)
    assert opt.global_step == 0 and len(opt.state) == len(list(model.parameters()))
    assert torch.equal(_full(model), before) and all(p.grad is None for p in model.parameters())
    assert all(float(g["lr"]) == ARGS["lr"] for g in opt.param_groups)
    assert all(not s["exp_avg"].any() and float(s["step"]) == 0 for s in opt.state.values())
    # a trained optimizer's distributed state dict resumes it: the counters travel in the param groups
    trained = cls(model.parameters(), **ARGS)
    _train(trained, model, *_batch(), "closure", 4)
    _, trained_sd = get_state_dict(model, trained)
    assert "sassha_fused" not in trained_sd and trained_sd["param_groups"][0]["sassha_fused"]["global_step"] == 4
    set_state_dict(model, opt, model_state_dict={}, optim_state_dict=trained_sd)
    assert opt.global_step == 4 and "sassha_fused" not in opt.param_groups[0]
    for p in model.parameters():
        assert torch.equal(opt.state[p]["exp_avg"], trained.state[p]["exp_avg"])


def _float32_worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = (t.float() for t in _batch(rank))
        args = dict(ARGS, fd_eps=1e-2)  # float32: a larger step keeps the reduction-order rounding small
        model = _shard(_model().float())
        opt = SASSHA(model.parameters(), backend=backend, **args)
        counts = _train(opt, model, x, y, "closure", STEPS)
        whole = _model().float()
        ref = SASSHA(whole.parameters(), backend=backend, distributed=False, **args)
        _train(ref, whole, *(t.float() for t in _batch()), "closure", STEPS)
        torch.save({"sharded": _full(model), "whole": _full(whole), "backends": opt.backends, "counts": counts},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: tearing down gloo mid-collective aborts the other rank
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", every_backend("triton", "cpp"))
def test_fsdp2_float32_kernels_on_shards(backend):
    """The Triton kernels (float32 and 16-bit only) on FSDP2 shards: close to one process."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_float32_worker, args=(2, os.path.join(tmp, "init"), tmp, backend), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    assert r0["backends"] == {"cpu/float32": backend}
    assert torch.equal(r0["sharded"], r1["sharded"])
    torch.testing.assert_close(r0["sharded"], r0["whole"], rtol=1e-4, atol=1e-5)
    # float32 refresh steps also agree on the gradients' precision class (one MAX)
    assert r0["counts"] == [4, 2, 2, 4, 2, 2, 4], r0["counts"]


def test_flattened_distributed_state_dict_is_refused_not_half_loaded():
    """DCP's flatten_optimizer_state_dict=True drops the optimizer-wide counters: a clear
    error, and the optimizer is left as it was."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model = _model()
    trained = SASSHA(model.parameters(), **ARGS)
    _train(trained, model, *_batch(), "closure", 2)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    _, osd = get_state_dict(model, trained, options=flat)
    opt = SASSHA(model.parameters(), **ARGS)
    _train(opt, model, *_batch(), "closure", 1)
    before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        set_state_dict(model, opt, model_state_dict={}, optim_state_dict=osd, options=flat)
    assert opt.global_step == 1
    assert all(torch.equal(v, opt.state[next(model.parameters())][k]) for k, v in before.items())
