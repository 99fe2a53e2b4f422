"""FSDP2 (``fully_shard``) with two gloo ranks on the CPU (SPEC section 6, issue 12).

Each rank trains on half of a batch; with a mean loss FSDP's averaged gradient is
the whole batch's gradient, so a sharded run must equal one process trained on the
whole batch, probes included (they are keyed by the global element index), up to the
rounding of another reduction order: each comparison's tolerance is derived from a
bound on that rounding (``_rounded``, ``_tolerance``), not from one machine's result.
Float64 mostly: a finite difference divides that rounding by the step delta, which
float32 turns into visible drift.
"""

import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import every_backend
from parity import assert_within, outside_tolerance, protocol_step
from sassha_fused import MSASSHA, SASSHA
from sassha_fused.encoding import decode_hessian
from sassha_fused.hvp import FD_EPS

pytest.importorskip("torch.distributed.fsdp", reason="torch without torch.distributed")

STEPS, K = 7, 3
# fd_eps: float64's default step (1e-7 relative) turns the 1e-16 rounding of another
# reduction order into 1e-9 differences of h; at 1e-3 a wrong probe or norm still
# shows at 1e-4, and the rounding's effect (measured by _tolerance) stays near 1e-12
ARGS = dict(lr=0.05, rho=0.1, weight_decay=0.01, lazy_hessian=K, hvp="finite_difference", fd_eps=1e-3)
RUNS = [(SASSHA, "closure"), (SASSHA, "official"), (SASSHA, "standard"), (MSASSHA, "closure"), (MSASSHA, "official")]


def _model():
    torch.manual_seed(0)
    # 5, 3 and 1 output rows: uneven shards, and rank 1 holds an empty one
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1)).double()


# ---------------------------------------------------------------- tolerances from a rounding bound
# A sharded run computes what one process computes, in another order:
# - every gradient: FSDP2 averages the two ranks' means of 4 per-sample terms where one process
#   takes the mean of all B = 8 (and its matmuls see 8 rows, not 4: a BLAS may pick other
#   kernels, which add in another order). A sum of B terms in any order errs by at most
#   (B - 1) u times the sum of the terms' magnitudes (u = eps / 2), so the two gradients differ
#   by up to GRAD_ULPS = 2 (B - 1) = 14 u |g| (to first order, cancellation aside: the draws
#   move every element of every gradient at once, where a reordering moves a few by an ulp);
# - the global norms, all-reduced from partial sums of the shards' squares: the radius
#   rho / ||g|| and the finite-difference step delta ~ ||x_t|| differ by up to NORM_ULPS =
#   N u = 62 u relative (N elements).
# The finite difference divides the gradients' rounding by delta, sqrt|h| and then 7 steps
# carry it on, very unevenly: in the float32 run one weight (element 50), whose curvature
# estimate sits near the resolution floor, moves by 1.1e-4 when the batch's rows are merely
# summed in another order (on an Intel Xeon the sharded run ended 1.1e-4 from one process),
# the others by 1e-5 at most. Rather than bound that chain by hand, the tests measure it: the
# one-process reference is run DRAWS more times (split between the ranks), every gradient it
# takes (every pass of every step) moved by +-GRAD_ULPS u |g| and rho and fd_eps by
# +-NORM_ULPS u, random signs from a seeded generator; each element's tolerance is SAFETY
# times its largest deviation over the draws (_tolerance).
# SAFETY = 4: per-element maxima of 8 draws vary up to 3x between sets of 8 seeds. Measured on
# the float32 run (cpp and triton, an AMD EPYC): tolerances 4e-6..3e-4, and 7.6e-3 on element
# 50; 32 real reorderings of the one-process run (batch rows permuted, the sum split
# elsewhere) reached at most 1/18 of them (1/10 with other seeds for the draws), most moving
# element 50 by 1.1e-4 or 2.2e-4 (the Xeon's 1.1e-4 matches the first); the sharded run here:
# 1/35 (float64 cpp: 1/17, the clipped Hessian estimate 1/9). A wrong result fails it
# (asserted below: probes of another seed, 2e4 times over; rho 1% off, as a norm that misses
# part of a shard would give, 17 times; probes drawn at local instead of global element
# offsets, tried once, ended 0.2 away, 4e3 times over).
GRAD_ULPS, NORM_ULPS, DRAWS, SAFETY = 2 * (8 - 1), 62, 8, 4


def _rounded(model, args, draw, dtype=torch.float64):
    """One draw of that rounding: ``model``'s gradients round through hooks (on every pass,
    ``backward()`` and ``torch.autograd.grad`` alike); returns ``args`` with rho and fd_eps rounded."""
    gen = torch.Generator().manual_seed(1000 + draw)
    u = torch.finfo(dtype).eps / 2

    def sign(shape=()):
        return torch.randint(0, 2, shape, generator=gen).to(dtype).mul_(2).sub_(1)

    for p in model.parameters():
        p.register_hook(lambda g: g + sign(g.shape).to(g.device) * (GRAD_ULPS * u) * g.abs())
    fd_eps = args["fd_eps"]
    if fd_eps == "auto":  # the step "auto" takes, made explicit (the resolution floor stays by precision)
        fd_eps = FD_EPS[args.get("fd_scheme", "forward"), 64 if dtype == torch.float64 else 32]
    return dict(args, rho=args["rho"] * (1 + NORM_ULPS * u * float(sign())),
                fd_eps=fd_eps * (1 + NORM_ULPS * u * float(sign())))


def _spread(run, reference, rank, world=2):
    """This rank's share of the draws: the largest ``|run(draw) - reference|`` per element."""
    return torch.stack([(run(d) - reference).abs() for d in range(rank, DRAWS, world)]).amax(0)


def _tolerance(spread0, spread1):
    """Per element: SAFETY times the largest deviation of any draw (the ranks' shares together)."""
    return SAFETY * torch.maximum(spread0, spread1)


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


def _whole(cls, protocol, backend, args, draw=None, dtype=torch.float64):
    """The same model and data in one process: the whole batch, no process group; with
    ``draw``, under that draw of the rounding (``_rounded``)."""
    model = _model().to(dtype)
    if draw is not None:
        args = _rounded(model, args, draw, dtype)
    opt = cls(model.parameters(), backend=backend, distributed=False, **args)
    _train(opt, model, *(t.to(dtype) for t in _batch()), protocol, STEPS)
    return _full(model, opt)


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

    def whole_run(draw=None):
        model = _model()
        kw = args if draw is None else _rounded(model, args, draw)
        return run(model, SASSHA(model.parameters(), backend=backend, distributed=False, **kw), *_batch())

    args = dict(ARGS, lazy_hessian=1, fd_eps="auto")
    model = _shard(_model())
    sharded = run(model, SASSHA(model.parameters(), backend=backend, **args), *_batch(rank))
    whole = whole_run()
    return dict(sharded=sharded, whole=whole, spread=_spread(whole_run, whole, rank))


def _worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _batch(rank)
        results, spread = {}, {}
        for cls, protocol in RUNS:
            model = _shard(_model())
            opt = cls(model.parameters(), backend=backend, **ARGS)
            counts = _train(opt, model, x, y, protocol, STEPS)
            local_state = sum(opt.state[p]["exp_avg"].to_local().numel() for p in model.parameters())
            local_params = sum(p.to_local().numel() for p in model.parameters())
            sharded = _full(model, opt)
            whole = _whole(cls, protocol, backend, ARGS)
            if cls not in spread:  # the protocols take the same steps: the first one's draws serve all
                spread[cls] = _spread(lambda d: _whole(cls, protocol, backend, ARGS, d), whole, rank)  # noqa: B023
            results[cls.__name__, protocol] = dict(sharded=sharded, whole=whole, spread=spread[cls], counts=counts,
                                                   local_state=local_state, local_params=local_params,
                                                   hvp=opt.hvp_method)
        # a deliberately wrong result: the probes of another seed
        results["wrong"] = _whole(SASSHA, "closure", backend, dict(ARGS, seed=1))
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
    tol = _tolerance(clipped["spread"], r1["results"].pop("clipped")["spread"])
    assert_within(clipped["sharded"], clipped["whole"], tol, "clipped: the Hessian estimate")
    wrong = r0["results"].pop("wrong")
    r1["results"].pop("wrong")
    tols = {key: _tolerance(a["spread"], r1["results"][key]["spread"]) for key, a in r0["results"].items()}
    assert outside_tolerance(wrong, r0["results"]["SASSHA", "closure"]["whole"], tols["SASSHA", "closure"])
    for key, a in r0["results"].items():
        b = r1["results"][key]
        assert a["hvp"] == "finite_difference"
        assert torch.equal(a["sharded"], b["sharded"]), key
        # sharded == unsharded on the whole batch, up to the reduction order
        assert_within(a["sharded"], a["whole"], tols[key], key)
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
    # the same closure-protocol SASSHA run, another reduction order in its last 4 steps only: the
    # draws over all 7 steps bound it
    assert_within(one_process, r0["dcp"]["SASSHA"][0], tols["SASSHA", "closure"], "resumed in one process")
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
        whole = _whole(SASSHA, "closure", backend, args, dtype=torch.float32)
        spread = _spread(lambda d: _whole(SASSHA, "closure", backend, args, d, torch.float32), whole, rank)
        # deliberately wrong results (one per rank): the probes of another seed, rho 1% off
        wrong_args = dict(args, seed=1) if rank == 0 else dict(args, rho=1.01 * args["rho"])
        wrong = _whole(SASSHA, "closure", backend, wrong_args, dtype=torch.float32)
        torch.save({"sharded": _full(model), "whole": whole, "spread": spread, "wrong": wrong,
                    "backends": opt.backends, "counts": counts}, os.path.join(out_dir, f"rank{rank}.pt"))
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
    tol = _tolerance(r0["spread"], r1["spread"])
    assert_within(r0["sharded"], r0["whole"], tol, "float32")
    assert outside_tolerance(r0["wrong"], r0["whole"], tol) and outside_tolerance(r1["wrong"], r0["whole"], tol)
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


def _aligned_model():
    """Rows of 32 elements: FSDP2's shards split at groups of the 8-bit state (encoding.scales_shape).
    3 output rows in the second layer: uneven shards (2 and 1)."""
    torch.manual_seed(0)
    return _aligned_layers()


def _aligned_layers():
    return torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False), torch.nn.Tanh(), torch.nn.Linear(32, 32, bias=False),
                               torch.nn.Tanh(), torch.nn.Linear(32, 3, bias=False)).double()


def _aligned_batch(rank=None):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 32, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    return (x, y) if rank is None else (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])


_ENCODED = ("exp_avg_codes", "exp_avg_scales", "exp_hessian_diag_codes", "exp_hessian_diag_scales")


def _aligned_whole(args, draw=None):
    """The 8-bit run in one process on the whole batch: params and every param's codes and scales."""
    model = _aligned_model()
    if draw is not None:
        args = _rounded(model, args, draw)
    opt = SASSHA(model.parameters(), backend="foreach", distributed=False, **args)
    _train(opt, model, *_aligned_batch(), "closure", STEPS)
    return _full(model), [{k: opt.state[p][k] for k in _ENCODED} for p in model.parameters()]


def _compact_worker(rank, world, init_file, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _batch(rank)
        args = dict(ARGS, state_bits=16)
        model = _shard(_model())
        opt = SASSHA(model.parameters(), backend="foreach", **args)
        _train(opt, model, x, y, "closure", STEPS)
        whole = _whole(SASSHA, "closure", "foreach", args)
        out = dict(sharded=_full(model, opt), whole=whole,
                   spread=_spread(lambda d: _whole(SASSHA, "closure", "foreach", args, d), whole, rank),
                   dtypes={str(opt.state[p]["exp_avg"].dtype) for p in model.parameters()},
                   sharded_state=all(hasattr(opt.state[p]["exp_avg"], "to_local") for p in model.parameters()))
        # bfloat16 params with master weights: the corrections shard like the parameter too
        model16 = _shard(_model().to(torch.bfloat16))
        opt16 = SASSHA(model16.parameters(), backend="foreach", state_bits=16, master_weight_bits=24,
                       **dict(ARGS, fd_eps="auto"))
        losses = []
        for _ in range(4):
            losses.append(float(opt16.step(lambda: _loss(model16, x.to(torch.bfloat16), y.to(torch.bfloat16))())))
        out["master"] = dict(losses=losses, sharded=all(
            hasattr(opt16.state[p]["master_correction"], "to_local") for p in model16.parameters()))
        # state_bits=8 where no shard splits at a group (rows of 7, 5, 3): bfloat16 state, as the 16-bit run
        model8 = _shard(_model())
        opt8 = SASSHA(model8.parameters(), backend="foreach", **dict(ARGS, state_bits=8))
        _train(opt8, model8, x, y, "closure", STEPS)
        out["fallback"] = dict(params=_full(model8, opt8),
                               keys={k for p in model8.parameters() for k in opt8.state[p]})
        # state_bits=8 with rows of 32: codes and scales shard like the parameter
        xa, ya = _aligned_batch(rank)
        args8 = dict(ARGS, state_bits=8)
        for backend in ("foreach", "cpp"):
            aligned = _shard(_aligned_model())
            opt_a = SASSHA(aligned.parameters(), backend=backend, **args8)
            _train(opt_a, aligned, xa, ya, "closure", STEPS)
            states = [{k: opt_a.state[p][k] for k in _ENCODED} for p in aligned.parameters()]
            out[f"aligned-{backend}"] = dict(
                params=_full(aligned),
                sharded=all(hasattr(v, "to_local") for st in states for v in st.values()),
                local_scales=[tuple(st["exp_avg_scales"].to_local().shape) for st in states],
                state=[{k: v.full_tensor() for k, v in st.items()} for st in states],
                float_state=[opt_a.float_state(p)["exp_hessian_diag"].full_tensor() for p in aligned.parameters()])
        whole8, whole8_state = _aligned_whole(args8)
        out["aligned-whole"] = dict(params=whole8, state=whole8_state,
                                    spread=_spread(lambda d: _aligned_whole(args8, d)[0], whole8, rank))
        # a DCP checkpoint of the 8-bit sharded state: a fresh run loaded from it goes on bit for bit
        aligned = _shard(_aligned_model())
        opt_a = SASSHA(aligned.parameters(), backend="foreach", **args8)
        _train(opt_a, aligned, xa, ya, "closure", 3)
        msd, osd = get_state_dict(aligned, opt_a)
        ckpt = os.path.join(out_dir, "ckpt8")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        _train(opt_a, aligned, xa, ya, "closure", 3)
        torch.manual_seed(7)
        fresh = _shard(_aligned_layers())
        opt_f = SASSHA(fresh.parameters(), backend="foreach", **args8)
        msd2, osd2 = get_state_dict(fresh, opt_f)
        state = {"model": msd2, "optim": osd2}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(fresh, opt_f, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _train(opt_f, fresh, xa, ya, "closure", 3)
        out["dcp8"] = (_full(aligned), _full(fresh))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_compact_state_shards_like_the_parameter():
    """state_bits=16 keeps bfloat16 DTensor state and equals the whole-batch run; state_bits=8 keeps
    DTensor codes and scales where shards split at groups of 32 (a shard quantises as the whole
    tensor: the same codes, within one code step where a last-bit difference crosses a rounding
    boundary) and bfloat16 state where they do not."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compact_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    assert r0["dtypes"] == {"torch.bfloat16"} and r0["sharded_state"]
    assert torch.equal(r0["sharded"], r1["sharded"])
    assert_within(r0["sharded"], r0["whole"], _tolerance(r0["spread"], r1["spread"]), "state_bits=16 under FSDP2")
    # rows of 7, 5 and 3 elements: every parameter falls back to bfloat16 state, and runs as state_bits=16
    assert r0["fallback"]["keys"] == {"step", "exp_avg", "exp_hessian_diag", "bias_correction2"}
    assert torch.equal(r0["fallback"]["params"], r0["sharded"])
    whole = r0["aligned-whole"]
    tol = _tolerance(whole["spread"], r1["aligned-whole"]["spread"])
    for backend in ("foreach", "cpp"):
        got = r0[f"aligned-{backend}"]
        assert got["sharded"], "codes and scales are DTensors placed like the parameter"
        # rank 0 holds rows 0..15 of the 32-row weights (16 rows of one group) and rows 0..1 of the last
        assert got["local_scales"] == [(16, 1), (16, 1), (2, 1)]
        assert torch.equal(got["params"], r1[f"aligned-{backend}"]["params"])
        assert_within(got["params"], whole["params"], tol, f"state_bits=8 under FSDP2 ({backend})")
        for k, (st, ref) in enumerate(zip(got["state"], whole["state"])):
            for codes, scales in (("exp_avg_codes", "exp_avg_scales"),
                                  ("exp_hessian_diag_codes", "exp_hessian_diag_scales")):
                assert st[scales].shape == ref[scales].shape == (ref[codes].shape[0], 1)
                off = (st[codes].int() - ref[codes].int()).abs()
                assert int(off.max()) <= 1, f"param {k} {codes} ({backend}): a code {int(off.max())} steps off"
                # the float64 runs differ by ~1e-13 relative, so a code flips only for a value that close to a
                # rounding boundary (codes are ~1e-2 apart): a handful at most; shards grouped apart from the
                # whole tensor would change most codes
                assert (off > 0).float().mean() < 0.01, f"param {k} {codes} ({backend}): shards quantise apart"
        torch.testing.assert_close(got["float_state"][0], decode_hessian(got["state"][0]["exp_hessian_diag_codes"],
                                                                         got["state"][0]["exp_hessian_diag_scales"]).double(),
                                   rtol=0, atol=0)
    assert torch.equal(*r0["dcp8"]) and torch.equal(*r1["dcp8"])
    assert r0["master"]["sharded"] and all(map(math.isfinite, r0["master"]["losses"]))
