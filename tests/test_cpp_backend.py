"""The C++ backend equals the eager reference; its probes are the written ones, bit for bit.

Trajectories run through ``tests/parity.py`` for many steps and compare params and
every state entry. Build-failure reporting is tested by building a broken source
directory (chosen by argument, or by environment variable in a subprocess).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from conftest import requires_cpp
from parity import (
    EDGE_SIZES,
    TOLERANCE,
    assert_close_tensors,
    assert_same_trajectory,
    clone_params,
    coupled_loss,
    make_params,
    run_trajectory,
)
from sassha_fused import MSASSHA, SASSHA, BackendUnavailable, _build
from sassha_fused.backends import Backend, GroupTensors, ProbeSpec, math_dtype
from sassha_fused.backends.eager import EagerBackend
from sassha_fused.probes import probe_key, rademacher

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpp():
    from sassha_fused.backends import get_backend

    return get_backend("cpp")


def _groups(ps):
    """Three param groups with their own lr / weight decay / rho / betas."""
    return [
        dict(params=ps[:3], lr=0.02, weight_decay=0.05, rho=0.1),
        dict(params=ps[3:6], lr=0.005, rho=0.3, betas=(0.8, 0.99)),
        dict(params=ps[6:], lr=0.01, weight_decay=1e-3),
    ]


def _pair(cls, p0, steps, protocol="closure", backend="cpp", frozen=None, grouped=True, **kw):
    ref, new = clone_params(p0), clone_params(p0)

    def factory(b):
        return lambda ps: cls(_groups(ps) if grouped else ps, backend=b, **kw)

    ref_opt = run_trajectory(factory("eager"), ref, steps, protocol, frozen=frozen)
    new_opt = run_trajectory(factory(backend), new, steps, protocol, frozen=frozen)
    return ref, ref_opt, new, new_opt


# ---------------------------------------------------------------- trajectories
# Every combination in float32; float64 and bfloat16 on a covering subset.
SASSHA_CASES = [
    (torch.float32, protocol, adaptive, k)
    for protocol in ("closure", "official") for adaptive in (False, True) for k in (1, 10)
] + [
    (dt, protocol, adaptive, k)
    for dt in (torch.float64, torch.bfloat16)
    for protocol, adaptive, k in (("closure", False, 1), ("official", True, 10))
]


@requires_cpp
@pytest.mark.parametrize("dtype,protocol,adaptive,lazy_hessian", SASSHA_CASES)
def test_sassha_matches_eager(dtype, protocol, adaptive, lazy_hessian):
    # 30 steps: with k = 10, refreshes at steps 1, 11, 21 and non-refresh steps between.
    p0 = make_params(EDGE_SIZES, dtype)
    ref, ref_opt, new, new_opt = _pair(SASSHA, p0, 30, protocol, lazy_hessian=lazy_hessian, n_samples=2,
                                       adaptive=adaptive)
    assert_same_trajectory(ref, ref_opt, new, new_opt)
    assert new_opt.global_step == 30


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("protocol", ["closure", "official"])
def test_msassha_matches_eager(dtype, protocol):
    p0 = make_params(EDGE_SIZES, dtype, seed=1)
    ref, ref_opt, new, new_opt = _pair(MSASSHA, p0, 30, protocol, lazy_hessian=4, n_samples=2)
    assert_same_trajectory(ref, ref_opt, new, new_opt)
    assert new_opt.is_perturbed


@requires_cpp
def test_float16_hessian_power_and_frozen_params():
    # fp16 params (fp32 state), p != 0.5 (the generic pow path), and params that get
    # no gradient at some steps (their state must not move).
    p0 = make_params([0, 1, 31, 33, 1025, 7, 64, 3], torch.float16, seed=2)
    frozen = lambda t, k: (t + k) % 4 == 0  # noqa: E731
    ref, ref_opt, new, new_opt = _pair(SASSHA, p0, 20, "closure", frozen=frozen, lazy_hessian=3,
                                       hessian_power=1.0, n_samples=2)
    assert_same_trajectory(ref, ref_opt, new, new_opt)


@requires_cpp
def test_mixed_dtypes_one_optimizer():
    # fp64 somewhere makes the global norm accumulate in fp64 for every param.
    p0 = make_params([33, 1025], torch.float32) + make_params([31, 3], torch.float64, seed=4) \
        + make_params([1023, 10001], torch.bfloat16, seed=5)
    ref, new = clone_params(p0), clone_params(p0)
    ref_opt = run_trajectory(lambda ps: SASSHA(ps, backend="eager", lazy_hessian=2, lr=0.01), ref, 12)
    new_opt = run_trajectory(lambda ps: SASSHA(ps, backend="cpp", lazy_hessian=2, lr=0.01), new, 12)
    # The loss couples all params, so bf16 rounding reaches the fp64 ones: compare
    # everything at the loosest tolerance of the mix.
    assert_same_trajectory(ref, ref_opt, new, new_opt, dtype=torch.bfloat16)


@requires_cpp
def test_non_contiguous_params_take_the_reference_path():
    base = make_params([12 * 7, 33], torch.float32, seed=6)
    p0 = [torch.nn.Parameter(base[0].detach().reshape(12, 7).t()), base[1]]  # a transposed view
    assert not p0[0].is_contiguous()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in p0]
    new = [torch.nn.Parameter(p.detach().t().contiguous().t()) if not p.is_contiguous() else
           torch.nn.Parameter(p.detach().clone()) for p in p0]
    assert not new[0].is_contiguous()
    ref_opt = run_trajectory(lambda ps: SASSHA(ps, backend="eager", lazy_hessian=2), ref, 8)
    new_opt = run_trajectory(lambda ps: SASSHA(ps, backend="cpp", lazy_hessian=2), new, 8)
    assert_same_trajectory(ref, ref_opt, new, new_opt)


# ---------------------------------------------------------------- phases
def _phase_groups(dtype, sizes=EDGE_SIZES, alias_backups=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mdt = math_dtype(dtype)

    def rnd(n, dt):
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dt)

    groups = []
    index = 0
    for gi, chunk in enumerate((sizes[:4], sizes[4:])):
        ps = [rnd(n, dtype) for n in chunk]
        g = GroupTensors(
            params=ps, grads=[rnd(n, dtype) for n in chunk], exp_avgs=[rnd(n, mdt) for n in chunk],
            exp_hessian_diags=[rnd(n, mdt).abs() for n in chunk],
            backups=[p if alias_backups else rnd(p.numel(), dtype) for p in ps],
            steps=[3 + j for j in range(len(chunk))], bias_correction2=[0.05 + 0.01 * j for j in range(len(chunk))],
            param_indices=list(range(index, index + len(chunk))), lr=0.01 * (gi + 1), beta1=0.9, beta2=0.99,
            weight_decay=0.1 * gi, eps=1e-4, rho=0.05 * (gi + 1), perturb_eps=1e-12, hessian_power=0.5,
        )
        index += len(chunk)
        groups.append(g)
    return groups


def _clone_groups(groups):
    out = []
    for g in groups:
        c = GroupTensors(**{**g.__dict__, "extras": {}})
        for name in ("params", "grads", "exp_avgs", "exp_hessian_diags"):
            setattr(c, name, [t.clone() for t in getattr(g, name)])
        c.backups = [c.params[j] if b is g.params[j] else b.clone() for j, b in enumerate(g.backups)]
        out.append(c)
    return out


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alias_backups", [True, False])
def test_update_phase_with_missing_hvps(dtype, alias_backups):
    ref = _phase_groups(dtype, alias_backups=alias_backups)
    new = _clone_groups(ref)
    gen = torch.Generator().manual_seed(9)
    # hvps[g][s][j]: some None (params absent from the second-order graph)
    hvps = [[[None if (j + s) % 3 == 0 else torch.randn(p.numel(), generator=gen, dtype=torch.float64).to(dtype)
              for j, p in enumerate(g.params)] for s in range(2)] for g in ref]
    spec = ProbeSpec(seed=123, refresh=4, n_samples=2)
    EagerBackend().update(ref, hvps, spec)
    cpp().update(new, hvps, spec)
    for r, n in zip(ref, new):
        for name in ("params", "exp_avgs", "exp_hessian_diags"):
            for j, (a, b) in enumerate(zip(getattr(r, name), getattr(n, name))):
                assert_close_tensors(a, b, dtype, f"{name}[{j}]")
    # non-refresh: D untouched
    before = [d.clone() for g in new for d in g.exp_hessian_diags]
    EagerBackend().update(ref, None, None)
    cpp().update(new, None, None)
    after = [d for g in new for d in g.exp_hessian_diags]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    for r, n in zip(ref, new):
        for j, (a, b) in enumerate(zip(r.params, n.params)):
            assert_close_tensors(a, b, dtype, f"params[{j}] after a non-refresh update")


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("source", ["grads", "exp_avgs"])
def test_sq_norm_and_perturb_phases(dtype, adaptive, source):
    ref = _phase_groups(dtype, alias_backups=False, seed=3)
    new = _clone_groups(ref)
    a = EagerBackend().sq_norm(ref, source, adaptive)
    b = cpp().sq_norm(new, source, adaptive)
    assert a.dtype == b.dtype and b.dim() == 0
    torch.testing.assert_close(b, a, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    sign = -1.0 if source == "exp_avgs" else 1.0
    EagerBackend().perturb(ref, a, source, sign, adaptive)
    cpp().perturb(new, a, source, sign, adaptive)
    for r, n in zip(ref, new):
        for j in range(len(r.params)):
            assert torch.equal(r.backups[j], n.backups[j]), "the backup is a bitwise copy of x"
            assert_close_tensors(r.params[j], n.params[j], dtype, f"perturbed param {j}")


# ---------------------------------------------------------------- probes
@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_probes_bitwise_equal_to_definition(dtype):
    sizes = list(EDGE_SIZES) + [100_003]
    params = [torch.zeros(n, dtype=dtype) for n in sizes]
    params[-1] = params[-1].reshape(7, -1) if sizes[-1] % 7 == 0 else params[-1]
    g = GroupTensors(params=params, grads=[torch.zeros_like(p) for p in params], exp_avgs=[], exp_hessian_diags=[],
                     backups=[], steps=[], bias_correction2=[], param_indices=[5 * j + 2 for j in range(len(sizes))])
    for spec, sample in ((ProbeSpec(0, 0, 1), 0), (ProbeSpec(2**64 - 1, 17, 3), 2), (ProbeSpec(12345, 2**32 + 5, 2), 1)):
        zs = cpp().probes([g], spec, sample)[0]
        for j, (p, z) in enumerate(zip(params, zs)):
            key = probe_key(spec.seed, spec.refresh, sample, g.param_indices[j])
            want = rademacher(p.numel(), key, dtype=dtype).view(p.shape)
            assert z.dtype == dtype and z.shape == p.shape
            assert torch.equal(z, want), f"probe of param {j} ({p.numel()} elements) differs"


# ---------------------------------------------------------------- dispatch
class SpyBackend(Backend):
    """Forwards every phase to a real backend and counts the calls."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = f"spy({inner.name})"
        self.calls: Dict[str, int] = {}

    def _count(self, phase: str) -> None:
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def supports(self, device, dtype):
        return self.inner.supports(device, dtype)

    def sq_norm(self, groups, source, adaptive):
        self._count("sq_norm")
        return self.inner.sq_norm(groups, source, adaptive)

    def perturb(self, groups, sq_norm, source, sign, adaptive):
        self._count("perturb")
        return self.inner.perturb(groups, sq_norm, source, sign, adaptive)

    def probes(self, groups, spec, sample):
        self._count("probes")
        return self.inner.probes(groups, spec, sample)

    def update(self, groups, hvps, spec):
        self._count("update")
        return self.inner.update(groups, hvps, spec)


@requires_cpp
def test_cpp_backend_really_runs():
    from sassha_fused.backends.cpp_backend import CppBackend

    spy = SpyBackend(cpp())
    assert isinstance(spy.inner, CppBackend)
    p0 = make_params([33, 1025, 3], torch.float32)
    ref, new = clone_params(p0), clone_params(p0)
    ref_opt = run_trajectory(lambda ps: SASSHA(ps, backend="eager", lazy_hessian=2, n_samples=2), ref, 4)
    new_opt = run_trajectory(lambda ps: SASSHA(ps, backend=spy, lazy_hessian=2, n_samples=2), new, 4)
    # sq_norm twice a step: the perturbation's gradient norm and the finite check
    # of the update's inputs
    assert spy.calls == {"sq_norm": 8, "perturb": 4, "probes": 4, "update": 4}
    assert_same_trajectory(ref, ref_opt, new, new_opt)
    assert "C++ extension" in cpp().description


@requires_cpp
def test_auto_picks_cpp_on_cpu():
    from sassha_fused.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16).name == "cpp"


@requires_cpp
def test_op_argument_errors_say_what_to_do():
    ops = torch.ops.sassha_fused
    x = [torch.zeros(4), torch.zeros(5)]
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        ops.sq_norm(x[:1], x, False, False)
    with pytest.raises(RuntimeError, match="float32 optimizer state"):
        ops.update([torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4, dtype=torch.bfloat16)],
                   [torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4)], [torch.zeros(4, dtype=torch.bfloat16)],
                   [], [], [0.9, 0.999, 0.1, 0.0, 1e-4, 0.5, 0.1, 0.1], 0, False)
    with pytest.raises(RuntimeError, match="not contiguous"):
        ops.probes([torch.zeros(4, 3).t()], [1, 2])
    with pytest.raises(RuntimeError, match="probe_key"):
        ops.probes([torch.zeros(4)], [1])
    assert cpp().supports(torch.device("meta"), torch.float32) is not None


# ---------------------------------------------------------------- build failures
BROKEN = "int broken( { return 0; }  // deliberately not C++\n"


def _broken_sources(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "sassha_ops.cpp").write_text(BROKEN)
    return src


NEEDS_NINJA = pytest.mark.skipif(
    shutil.which("ninja") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja")),
    reason="needs ninja to build extensions",
)


def test_failed_build_becomes_backend_unavailable():
    from sassha_fused.backends import cpp_backend

    failed = _build.ExtensionBuild(False, error="building the C++ extension from x failed:\nx.cpp:1: error: boom")
    with pytest.raises(BackendUnavailable, match="x.cpp:1: error: boom"):
        cpp_backend.load("cpp", build=failed)


@NEEDS_NINJA
def test_build_failure_is_reported_with_compiler_message(tmp_path):
    # A fresh interpreter: this process already holds the working build's operators
    # and the registry's cache. The broken sources are chosen by argument to the
    # loader, then by environment variable for available_backends().
    broken = _broken_sources(tmp_path)
    script = textwrap.dedent(f"""
        import os
        from sassha_fused import _build, available_backends, SASSHA, BackendUnavailable
        from sassha_fused.backends import cpp_backend
        import torch
        result = _build.load_extension(sources={str(broken)!r}, build_dir={str(tmp_path / "b1")!r})
        print("OK", result.ok)
        try:
            cpp_backend.load("cpp", build=result)
        except BackendUnavailable as exc:
            print("LOAD RAISED", str(exc).splitlines()[0])
        os.environ["SASSHA_FUSED_CSRC"] = {str(broken)!r}
        os.environ["SASSHA_FUSED_BUILD_DIR"] = {str(tmp_path / "b2")!r}
        status = available_backends()["cpp"]
        print("AVAILABLE", status.available)
        print("REASON", status.reason)
        try:
            SASSHA([torch.nn.Parameter(torch.zeros(3))], backend="cpp")
        except BackendUnavailable as exc:
            print("RAISED", exc)
        SASSHA([torch.nn.Parameter(torch.zeros(3))], backend="auto")  # auto falls back
        print("AUTO OK")
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "OK False" in out.stdout
    assert "LOAD RAISED building the C++ extension from" in out.stdout
    assert "AVAILABLE False" in out.stdout
    reason = out.stdout.split("REASON", 1)[1]
    assert "sassha_ops.cpp" in reason and "error" in reason.lower(), reason
    assert "RAISED backend 'cpp' is not available" in out.stdout
    assert "AUTO OK" in out.stdout


def test_sources_are_found():
    d = _build.csrc_dir()
    assert d is not None and os.path.isfile(os.path.join(d, "sassha_ops.cpp"))
    srcs = [os.path.basename(s) for s in _build.extension_sources(d, with_cuda=True)]
    assert srcs[0] == "sassha_ops.cpp" and "sassha_cuda_kernels.cu" in srcs and "sassha_cuda.cpp" in srcs
    assert [os.path.basename(s) for s in _build.extension_sources(d, with_cuda=False)] == ["sassha_ops.cpp"]
