"""torch.optim's contract, whole (issue 20, item 4), for SASSHA and MSASSHA and both interfaces.

What is checked here:

* ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load(weights_only=False)`` of
  ``(model, opt)`` give an optimizer that can be printed, saved, and stepped, whose next steps
  equal the original's bit for bit (params and every state entry), taken before any step,
  between refreshes and just before a refresh; the copy shares no storage with the original.
* ``load_state_dict`` validates counts, shapes and dtypes against the parameters before
  anything changes; a refusal names the first mismatch (parameter position and state key) and
  leaves params, state, hyper-parameters, counters and the next step exactly as a twin that
  never saw the bad dict. Legitimate mixed precision still loads.
* Hooks: load_state_dict pre-hooks' returned (or in-place edited) dicts are honoured in full
  (state tensors, group hyper-parameters, the optimizer-wide counters under ``"sassha_fused"``);
  post-hooks run; state_dict pre/post hooks; step pre/post hooks once per optimizer step.

Adapted from PyTorch's own optimizer tests (``test/test_optim.py`` ``TestOptimRenewed``, with the
inputs of ``torch/testing/_internal/common_optimizers.py``):

* ``test_state_dict_deterministic``: load a deep copy of the state dict into a fresh optimizer,
  the passed dict is not modified by loading, both continue identically, ``state_dict()`` of the
  loaded one equals the dict loaded (here bitwise, steps included);
* ``test_save_load_equality_with_weights_only``: ``torch.load(weights_only=True)`` of a saved
  state dict loads and resumes exactly;
* ``test_load_nontensor_step``: per-parameter counters given as Python numbers load;
* ``test_deepcopy_copies_all_public_attrs``: a deep copy has the same public attributes;
* ``test_step_is_noop_when_params_have_no_grad``: ``step()`` with no gradient changes nothing;
* ``test_step_pre_hook`` / ``test_step_post_hook`` / ``test_step_all_hooks``,
  ``test_state_dict_pre_hook`` / ``test_state_dict_post_hook``,
  ``test_load_state_dict_pre_hook_and_prepend`` / ``test_load_state_dict_post_hook``;
* ``test_param_groups_lr`` / ``test_param_group_with_lrscheduler_goes_right_direction``:
  per-group lr and an ``lr_scheduler`` driving it (checked bitwise against setting lr by hand),
  ``initial_lr`` surviving a state dict round trip;
* ``add_param_group`` mid-run, ``zero_grad(set_to_none=True/False)``, ``defaults`` present, each
  group carrying every default key, ``state`` keyed by the parameters, ``state_dict()['state']``
  keyed by position.

Not applicable, and why:

* ``test_step_is_noop_for_zero_grads``: a SASSHA step with zero gradients is not a no-op by
  design (the protocol's ``step()`` needs ``perturb_weights()``; decoupled weight decay and the
  momentum still move the params), so there is nothing to carry over;
* ``test_can_load_older_state_dict``: these classes have no versioned group keys (torch's test
  deletes ``foreach``/``fused``/``capturable``-era keys); resuming from plain counters is the
  ``nontensor_step`` case;
* ``foreach``/``fused``/``differentiable``/``maximize``/tensor-``lr``/complex inputs and the
  multi-device, CUDA-params and peak-memory tests: the classes take none of those options
  (complex params are refused, see ``test_optimizer_api``), and backends are compared with the
  eager reference elsewhere (``test_*_backend``, ``parity.py``);
* ``test_errors`` for hyper-parameters is ``test_optimizer_api.test_invalid_hyperparameters_*``;
* LBFGS-style ``step_requires_closure``: both interfaces are exercised instead.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import re

import pytest
import torch

from conftest import device_for, every_backend
from parity import coupled_loss, protocol_step
from sassha_fused import MSASSHA, SASSHA
from sassha_fused.schedules import LinearSchedule

pytestmark = pytest.mark.filterwarnings("ignore:.*create_graph=True.*:UserWarning")

CLASSES = [pytest.param(SASSHA, id="SASSHA"), pytest.param(MSASSHA, id="MSASSHA")]
INTERFACES = [pytest.param("closure", id="closure"), pytest.param("official", id="protocol")]
SHAPES = ((7,), (3, 5), (40,))
EXTRA = "sassha_fused"


# ---------------------------------------------------------------------------- helpers
def make_model(shapes=SHAPES, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.ParameterList(
        [torch.nn.Parameter((0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, dtype))
         for s in shapes])


def make_opt(cls, model, **kw):
    kw.setdefault("lr", 0.02)
    kw.setdefault("lazy_hessian", 2)
    kw.setdefault("backend", "eager")
    kw.setdefault("seed", 3)
    return cls(model.parameters(), **kw)


def step(opt, model, t, interface):
    params = list(model)
    return protocol_step(opt, lambda: coupled_loss(params, t), interface)


def snapshot(opt, model):
    """Params, every state entry (cloned), the global step and where the params are."""
    params = list(model)
    state = []
    for p in params:
        entry = opt.state[p] if p in opt.state else {}
        state.append({k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in entry.items()})
    return {"params": [p.detach().clone() for p in params], "state": state,
            "global_step": opt.global_step, "is_perturbed": opt.is_perturbed}


def assert_same(a, b, what):
    assert a["global_step"] == b["global_step"], f"{what}: global_step {a['global_step']} != {b['global_step']}"
    assert a["is_perturbed"] == b["is_perturbed"], f"{what}: is_perturbed differs"
    for k, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: param {k} differs"
    for k, (s, r) in enumerate(zip(a["state"], b["state"])):
        assert set(s) == set(r), f"{what}: param {k} state keys {sorted(s)} != {sorted(r)}"
        for key in s:
            if torch.is_tensor(s[key]):
                assert s[key].dtype == r[key].dtype, f"{what}: param {k} state {key!r} dtype differs"
                assert torch.equal(s[key], r[key]), f"{what}: param {k} state {key!r} differs"
            else:
                assert s[key] == r[key], f"{what}: param {k} state {key!r}: {s[key]} != {r[key]}"


def assert_nested_equal(a, b, path="state_dict"):
    """Dicts/lists/tensors equal, tensors bitwise and with the same dtype."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_nested_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def storages(opt, model):
    """data_ptrs of every storage the optimizer or model holds (params, grads, state tensors)."""
    out = set()

    def add(t):
        if torch.is_tensor(t) and t.untyped_storage().nbytes() > 0:
            out.add(t.untyped_storage().data_ptr())

    for p in model:
        add(p)
        add(p.grad)
    for entry in opt.state.values():
        for v in entry.values():
            add(v)
    return out


_REFERENCES = {}


def reference(cls, interface, backend, steps):
    """Snapshots after 0..steps steps of an undisturbed run (cached)."""
    key = (cls, interface, backend, steps)
    if key not in _REFERENCES:
        model = make_model(device=device_for(backend), dtype=torch.float32)
        opt = make_opt(cls, model, backend=backend)
        snaps = [snapshot(opt, model)]
        for t in range(steps):
            step(opt, model, t, interface)
            snaps.append(snapshot(opt, model))
        _REFERENCES[key] = snaps
    return _REFERENCES[key]


# Under Triton's interpreter (and for the C++ extension, 0.05 s a step here) fewer copies
SLOW = {"cpp"} | ({"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set())


# ------------------------------------------------------------------ deepcopy / pickle
def _copy(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _copy_cases():
    # torch.save pickles as pickle does: the slow backends run fewer ways of copying
    out = []
    for b in every_backend():
        name = b.values[0]
        for how in ("deepcopy", "pickle", "torch_save"):
            if name in SLOW and (how == "torch_save" or (name == "triton" and how != "deepcopy")):
                continue
            out.append(pytest.param(how, name, id=f"{how}-{name}", marks=b.marks))
    return out


@pytest.mark.parametrize("how,backend", _copy_cases())
@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("cls", CLASSES)
def test_copy_steps_exactly_like_the_original(cls, interface, how, backend):
    """A copy taken before any step, between refreshes (after step 1) and just before a
    refresh (after step 2) prints, saves, and steps bitwise like the original; the copy and
    the original share no storage, and stepping the copy leaves the original alone."""
    steps = 3 if backend in SLOW else 4
    ref = reference(cls, interface, backend, steps)
    model = make_model(device=device_for(backend), dtype=torch.float32)
    opt = make_opt(cls, model, backend=backend)
    copy_points = (2,) if backend in SLOW else (0, 1, 2)
    for t in range(steps):
        if t in copy_points:
            model2, opt2 = _copy((model, opt), how)
            assert type(opt2) is cls
            assert_same(snapshot(opt2, model2), ref[t], f"{how} after {t} steps")
            assert f"{cls.__name__} (" in repr(opt2) and "Parameter Group 0" in repr(opt2)
            assert_nested_equal(opt2.state_dict(), opt.state_dict())
            assert not storages(opt, model) & storages(opt2, model2), "the copy shares storage with the original"
            for u in range(t, min(t + 2, steps)):  # the copy's next two steps
                step(opt2, model2, u, interface)
                assert_same(snapshot(opt2, model2), ref[u + 1], f"{how} after {t} steps, then step {u + 1}")
            assert_same(snapshot(opt, model), ref[t], f"the original after stepping its {how}")
        step(opt, model, t, interface)
        assert_same(snapshot(opt, model), ref[t + 1], f"the original at step {t + 1}")


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
@pytest.mark.parametrize("cls", CLASSES)
def test_copy_keeps_schedules_and_hvp_method(cls, hvp):
    """Schedules (hessian_power, rho) and the HVP method travel with a deep copy."""
    kw = dict(hvp=hvp, hessian_power=LinearSchedule(0.5, 0.9, 6), rho=LinearSchedule(0.05, 0.2, 6))
    model = make_model()
    opt = make_opt(cls, model, **kw)
    for t in range(2):
        step(opt, model, t, "official")
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.hessian_power is not opt.hessian_power
    for t in range(2, 5):
        step(opt, model, t, "official")
        step(opt2, model2, t, "official")
        assert_same(snapshot(opt2, model2), snapshot(opt, model), f"step {t + 1}")
    assert opt2.hvp_method == opt.hvp_method == hvp


@pytest.mark.parametrize("cls", CLASSES)
def test_deepcopy_copies_all_public_attrs(cls):
    """torch's test_deepcopy_copies_all_public_attrs, before and after a step."""
    model = make_model()
    opt = make_opt(cls, model)
    for _ in range(2):
        public = {k for k in vars(opt) if not k.startswith("_")}
        twin = copy.deepcopy(opt)
        assert {k for k in vars(twin) if not k.startswith("_")} == public
        assert all(twin.defaults[k] == v for k, v in opt.defaults.items())  # (torch's setstate adds keys)
        step(opt, model, 0, "closure")


# ------------------------------------------------------------- load_state_dict checks
def _trained(cls, shapes, steps, dtype=torch.float64, **kw):
    model = make_model(shapes, dtype=dtype, seed=len(shapes) + steps)
    opt = make_opt(cls, model, **kw)
    for t in range(steps):
        step(opt, model, t, "closure")
    opt.zero_grad()  # the closure leaves the last pass's gradients; a protocol step would add to them
    return model, opt


def _twins(cls, steps=3, **kw):
    """Two identical optimizers: one is given a bad state dict, the other never is."""
    a = _trained(cls, SHAPES, steps, **kw)
    b = _trained(cls, SHAPES, steps, **kw)
    return a, b


def _assert_untouched(victim, twin):
    (model, opt), (tmodel, topt) = victim, twin
    assert_same(snapshot(opt, model), snapshot(topt, tmodel), "after the refused load")
    for g, h in zip(opt.param_groups, topt.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    assert len(opt.param_groups) == len(topt.param_groups)
    assert_nested_equal(opt.state_dict(), topt.state_dict())
    step(opt, model, 7, "closure")
    step(topt, tmodel, 7, "closure")
    assert_same(snapshot(opt, model), snapshot(topt, tmodel), "the step after the refused load")


def _first_mismatch(saved_state, model):
    """(position, key) of the first saved state tensor whose shape does not fit its param."""
    for k, p in enumerate(model):
        for key, value in saved_state.get(k, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                return k, key
    raise AssertionError("no mismatch")


@pytest.mark.parametrize("other", [
    pytest.param(((7,), (5, 3), (40,)), id="transposed-5x3"),
    pytest.param(((7,), (15,), (40,)), id="flattened-15"),
    pytest.param(((7,), (3, 6), (40,)), id="other-size-3x6"),
])
@pytest.mark.parametrize("cls", CLASSES)
def test_load_refuses_other_shapes_and_changes_nothing(cls, other):
    victim, twin = _twins(cls)
    _, source = _trained(cls, other, 5, lr=0.07)  # other hyper-parameters and counters too
    sd = source.state_dict()
    position, key = _first_mismatch(sd["state"], victim[0])
    with pytest.raises(ValueError) as info:
        victim[1].load_state_dict(sd)
    msg = str(info.value)
    assert key in msg and re.search(rf"\b{position}\b", msg), (
        f"the refusal should name parameter {position} and state {key!r}: {msg}")
    _assert_untouched(victim, twin)


@pytest.mark.parametrize("case", ["fewer-params", "more-groups"])
@pytest.mark.parametrize("cls", CLASSES)
def test_load_refuses_other_counts_and_changes_nothing(cls, case):
    victim, twin = _twins(cls)
    if case == "fewer-params":
        _, source = _trained(cls, SHAPES[:2], 3, lr=0.07)
    else:
        model = make_model()
        source = cls([{"params": [model[0], model[1]]}, {"params": [model[2]], "lr": 0.5}], backend="eager")
        for t in range(3):
            step(source, model, t, "closure")
    with pytest.raises(ValueError, match="group|param"):
        victim[1].load_state_dict(source.state_dict())
    _assert_untouched(victim, twin)


@pytest.mark.parametrize("cls", CLASSES)
def test_load_refuses_integer_moments_and_changes_nothing(cls):
    victim, twin = _twins(cls)
    _, source = _trained(cls, SHAPES, 5, lr=0.07)
    sd = copy.deepcopy(source.state_dict())
    sd["state"][1]["exp_avg"] = torch.arange(15, dtype=torch.int64).reshape(3, 5)
    with pytest.raises(ValueError) as info:
        victim[1].load_state_dict(sd)
    assert "exp_avg" in str(info.value) and re.search(r"\b1\b", str(info.value)), str(info.value)
    _assert_untouched(victim, twin)


@pytest.mark.parametrize("src,dst", [
    pytest.param(torch.float32, torch.bfloat16, id="fp32-into-bf16"),
    pytest.param(torch.float64, torch.float32, id="fp64-into-fp32"),
])
@pytest.mark.parametrize("cls", CLASSES)
def test_load_accepts_legitimate_mixed_precision(cls, src, dst):
    _, source = _trained(cls, SHAPES, 3, dtype=src)
    sd = source.state_dict()
    model = make_model(dtype=dst)
    opt = make_opt(cls, model)
    opt.load_state_dict(sd)
    math = torch.float32 if dst in (torch.bfloat16, torch.float16, torch.float32) else torch.float64
    for k, p in enumerate(model):
        for key in ("exp_avg", "exp_hessian_diag"):
            got = opt.state[p][key]
            assert got.dtype == math and got.shape == p.shape
            assert torch.equal(got, sd["state"][k][key].to(math)), f"param {k} {key}"
    assert opt.global_step == 3
    step(opt, model, 3, "closure")
    assert opt.global_step == 4 and all(torch.isfinite(p.float()).all() for p in model)


# ---------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("mode", ["returns-copy", "in-place"])
@pytest.mark.parametrize("cls", CLASSES)
def test_load_state_dict_pre_hook_is_honoured_in_full(cls, mode):
    _, source = _trained(cls, SHAPES, 3)
    sd = source.state_dict()
    original = copy.deepcopy(sd)
    seen = []

    def hook(optimizer, state_dict):
        seen.append(optimizer)
        out = copy.deepcopy(state_dict) if mode == "returns-copy" else state_dict
        for entry in out["state"].values():
            entry["exp_avg"] = entry["exp_avg"] * 2
        out["param_groups"][0]["lr"] = 0.123
        assert EXTRA in out, "the pre-hook does not see the optimizer-wide counters"
        out[EXTRA]["global_step"] = 11
        for group in out["param_groups"]:
            if EXTRA in group:
                group[EXTRA] = out[EXTRA]
        return out if mode == "returns-copy" else None

    model = make_model()
    opt = make_opt(cls, model)
    opt.register_load_state_dict_pre_hook(hook)
    opt.load_state_dict(sd if mode == "returns-copy" else copy.deepcopy(sd))
    assert seen == [opt]
    for k, p in enumerate(model):
        assert torch.equal(opt.state[p]["exp_avg"], original["state"][k]["exp_avg"] * 2), (
            f"param {k}: the hook's exp_avg was not loaded")
    assert opt.param_groups[0]["lr"] == 0.123
    assert opt.global_step == 11, "the hook's global step was not loaded"
    if mode == "returns-copy":
        assert_nested_equal(sd, original, "the dict given to load_state_dict")


@pytest.mark.parametrize("cls", CLASSES)
def test_load_state_dict_post_hook_runs_after_the_load(cls):
    _, source = _trained(cls, SHAPES, 3)
    model = make_model()
    opt = make_opt(cls, model)
    seen = []

    def post(optimizer):
        seen.append((optimizer.global_step, optimizer.state[model[0]]["exp_avg"].clone()))

    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(source.state_dict())
    assert len(seen) == 1 and seen[0][0] == 3
    assert torch.equal(seen[0][1], source.state[next(iter(source.param_groups[0]["params"]))]["exp_avg"])


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_hooks(cls):
    model, opt = _trained(cls, SHAPES, 3)
    calls = []

    def pre(optimizer):
        calls.append("pre")

    def post(optimizer, state_dict):
        calls.append("post")
        assert EXTRA in state_dict, "the post-hook gets the state dict without the optimizer-wide counters"
        out = dict(state_dict)
        out["from_hook"] = True
        return out

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre", "post"]
    assert sd.get("from_hook") is True and EXTRA in sd and sd[EXTRA]["global_step"] == 3


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("cls", CLASSES)
def test_step_hooks_run_once_per_step(cls, interface):
    model = make_model()
    opt = make_opt(cls, model)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.global_step)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.global_step)))
    for t in range(3):  # steps 1 and 3 refresh
        step(opt, model, t, interface)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("pre", 2), ("post", 3)]


# ---------------------------------------------------------- torch's test_optim, adapted
@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip_is_deep_copied(cls):
    """test_state_dict_deterministic: loading does not modify the dict; the loaded optimizer
    holds no tensor of it; state_dict() of the loaded one equals it; both continue alike."""
    model, opt = _trained(cls, SHAPES, 3)
    sd = copy.deepcopy(opt.state_dict())
    kept = copy.deepcopy(sd)
    model2 = copy.deepcopy(model)
    opt2 = make_opt(cls, model2)
    opt2.load_state_dict(sd)
    assert_nested_equal(sd, kept, "the dict given to load_state_dict")
    assert_nested_equal(opt2.state_dict(), kept, "state_dict() after load_state_dict")
    loaded = {v.untyped_storage().data_ptr() for e in sd["state"].values() for v in e.values() if torch.is_tensor(v)}
    assert not loaded & storages(opt2, model2), "the loaded optimizer aliases the given dict's tensors"
    for t in range(3, 6):
        step(opt, model, t, "official")
        step(opt2, model2, t, "official")
        assert_same(snapshot(opt2, model2), snapshot(opt, model), f"step {t + 1}")
    assert_nested_equal(sd, kept, "the dict given to load_state_dict, after steps")


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_with_weights_only(cls):
    """test_save_load_equality_with_weights_only."""
    model, opt = _trained(cls, SHAPES, 3, hessian_power=LinearSchedule(0.5, 0.9, 6))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = make_opt(cls, model2, hessian_power=LinearSchedule(0.5, 0.9, 6))
    opt2.load_state_dict(sd)
    assert_nested_equal(opt2.state_dict(), opt.state_dict())
    _assert_goes_on_alike(opt, model, opt2, model2)


@pytest.mark.parametrize("cls", CLASSES)
def test_load_nontensor_step(cls):
    """test_load_nontensor_step: per-parameter counters as Python numbers resume exactly."""
    model, opt = _trained(cls, SHAPES, 3)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = int(entry["step"].item())
        entry["bias_correction2"] = float(entry["bias_correction2"].item())
    model2 = copy.deepcopy(model)
    opt2 = make_opt(cls, model2)
    opt2.load_state_dict(sd)
    _assert_goes_on_alike(opt, model, opt2, model2)


def _assert_goes_on_alike(opt, model, opt2, model2):
    """Steps 4 to 6 of the original and the resumed run are bitwise equal."""
    for t in range(3, 6):
        step(opt, model, t, "closure")
        step(opt2, model2, t, "closure")
    assert_same(snapshot(opt2, model2), snapshot(opt, model), "after resuming")


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_layout_defaults_and_group_keys(cls):
    model, opt = _trained(cls, SHAPES, 2)
    group_keys = {"lr", "betas", "weight_decay", "rho", "eps", "perturb_eps"}
    assert group_keys <= set(opt.defaults)
    for group in opt.param_groups:
        assert set(opt.defaults) <= set(group)
    assert all(any(p is q for q in model) for p in opt.state), "state is keyed by the parameters"
    sd = opt.state_dict()
    assert set(sd["state"]) == set(range(len(SHAPES)))
    assert [g["params"] for g in sd["param_groups"]] == [list(range(len(SHAPES)))]
    # torch keeps unknown group keys a user (or a scheduler) put there
    opt.param_groups[0]["my_tag"] = "kept"
    model2 = copy.deepcopy(model)
    opt2 = make_opt(cls, model2)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["my_tag"] == "kept"
    assert set(opt2.param_groups[0]) == set(opt.param_groups[0])


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("cls", CLASSES)
def test_step_without_gradients_changes_nothing(cls, interface):
    """test_step_is_noop_when_params_have_no_grad: before any step and between steps."""
    model = make_model()
    opt = make_opt(cls, model)
    for t in range(3):
        before = snapshot(opt, model)
        opt.zero_grad(set_to_none=True)
        assert opt.step() is None
        assert_same(snapshot(opt, model), before, f"a step without gradients after {t} steps")
        step(opt, model, t, interface)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("cls", CLASSES)
def test_zero_grad(cls, set_to_none):
    model, opt = _trained(cls, SHAPES, 2)
    before = snapshot(opt, model)
    coupled_loss(list(model), 5).backward()
    grads = [p.grad for p in model]
    opt.zero_grad(set_to_none=set_to_none)
    for p, g in zip(model, grads):
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is g and not p.grad.any()
    assert_same(snapshot(opt, model), before, "zero_grad between steps")


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("cls", CLASSES)
def test_add_param_group_mid_run(cls, interface):
    """A group added after two steps behaves as if it had been there, without gradients, from
    the start (SPEC: a param that first gets a gradient between refreshes waits for a refresh)."""
    model = make_model(SHAPES + ((4,), (2, 3)))
    first, late = list(model)[:3], list(model)[3:]
    twin_model = copy.deepcopy(model)
    tfirst, tlate = list(twin_model)[:3], list(twin_model)[3:]
    opt = cls(first, lr=0.02, lazy_hessian=2, backend="eager", seed=3)
    topt = cls([{"params": tfirst}, {"params": tlate, "lr": 0.05, "rho": 0.1}], lr=0.02, lazy_hessian=2,
               backend="eager", seed=3)
    for t in range(2):
        protocol_step(opt, lambda: coupled_loss(first, t), interface)
        protocol_step(topt, lambda: coupled_loss(tfirst, t), interface)
    opt.add_param_group({"params": late, "lr": 0.05, "rho": 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["betas"] == opt.defaults["betas"]
    for t in range(2, 5):
        protocol_step(opt, lambda: coupled_loss(list(model), t), interface)
        protocol_step(topt, lambda: coupled_loss(list(twin_model), t), interface)
        assert_same(snapshot(opt, model), snapshot(topt, twin_model), f"step {t + 1}")
    assert opt.state[late[0]]["step"] > 0


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("cls", CLASSES)
def test_lr_scheduler_drives_lr_and_survives_state_dict(cls, interface):
    model = make_model()
    twin = copy.deepcopy(model)
    opt = make_opt(cls, model, lr=0.05)
    topt = make_opt(cls, twin, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(5):
        step(opt, model, t, interface)
        sched.step()
        step(topt, twin, t, interface)
        topt.param_groups[0]["lr"] = 0.05 * 0.5 ** ((t + 1) // 2)
        assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
        assert_same(snapshot(opt, model), snapshot(topt, twin), f"step {t + 1}")
    resumed = make_opt(cls, copy.deepcopy(model), lr=0.05)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["initial_lr"] == 0.05 and resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("cls", CLASSES)
def test_load_mid_step_is_refused_and_zero_grad_ends_the_step(cls):
    """load_state_dict checks the phase: mid-step it refuses and changes nothing; after
    zero_grad() (which ends the step) it loads."""
    model = make_model(device="cpu", dtype=torch.float32)
    opt = make_opt(cls, model, backend="eager")
    saved = opt.state_dict()
    loss = lambda: coupled_loss(list(model), 1)  # noqa: E731
    x_t = [p.detach().clone() for p in model.parameters()]
    if cls is SASSHA:
        loss().backward()
        opt.perturb_weights()
        loss().backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            with pytest.raises(RuntimeError, match="under way"):
                opt.load_state_dict(saved)
            loss().backward()
        perturbed = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="under way"):
            opt.load_state_dict(saved)
        assert opt.phase.value == "perturbed"
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
        opt.zero_grad()
        assert opt.phase.value == "idle" and not opt.is_perturbed
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), x_t))  # back at x_t, bit for bit
    else:
        loss().backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            with pytest.raises(RuntimeError, match="under way"):
                opt.load_state_dict(saved)
            loss().backward()
        opt.zero_grad()
    opt.load_state_dict(saved)
    assert opt.global_step == 0
