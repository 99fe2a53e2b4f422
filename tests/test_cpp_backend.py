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

import pytest
import torch

from conftest import requires_cpp
from parity import (
    EDGE_SIZES,
    SpyBackend,
    check_phases_match_eager,
    phase_bucket,
    assert_same_trajectory,
    clone_params,
    make_params,
    run_trajectory,
)
from sassha_fused import MSASSHA, SASSHA, BackendUnavailable, _build
from sassha_fused.backends import ProbeKeys
from sassha_fused.probes import key_prefix, probe_key, rademacher

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
@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_phase_matches_eager(dtype):
    check_phases_match_eager(cpp(), dtype)


# ---------------------------------------------------------------- probes
@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_probes_bitwise_equal_to_definition(dtype):
    sizes = list(EDGE_SIZES) + [100_003]
    b = phase_bucket(cpp(), dtype, sizes, device="cpu")
    for seed, refresh, sample in ((0, 0, 0), (2**64 - 1, 17, 2), (12345, 2**32 + 5, 1)):
        keys = ProbeKeys(tuple(key_prefix(seed, refresh, s) for s in range(sample + 1)))
        for j, (p, z) in enumerate(zip(b.params, cpp().probes(b, keys, sample))):
            key = probe_key(seed, refresh, sample, b.param_index[j])
            want = rademacher(p.numel(), key, dtype=dtype).view(p.shape)
            assert z.dtype == dtype and z.shape == p.shape
            assert torch.equal(z, want), f"probe of param {j} ({p.numel()} elements) differs"


# ---------------------------------------------------------------- dispatch
@requires_cpp
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_cpp_backend_really_runs(hvp):
    from sassha_fused.backends.cpp_backend import CppBackend

    spy = SpyBackend(cpp())
    assert isinstance(spy.inner, CppBackend)
    p0 = make_params([33, 1025, 3], torch.float32)
    ref, new = clone_params(p0), clone_params(p0)
    ref_opt = run_trajectory(lambda ps: SASSHA(ps, backend="eager", lazy_hessian=2, n_samples=2, hvp=hvp), ref, 4)
    new_opt = run_trajectory(lambda ps: SASSHA(ps, backend=spy, lazy_hessian=2, n_samples=2, hvp=hvp), new, 4)
    counts = {}
    for phase, _ in spy.calls:
        counts[phase] = counts.get(phase, 0) + 1
    if hvp == "autograd":
        # sq_norm: the perturbation's norm and the finite check of g~ and each sample's H z
        assert counts == {"sq_norm": 4 + 2 + 2 * 3, "perturb": 4, "probes": 4, "update": 4}
    else:
        # refresh steps add the step size's norm, a move before each pass and a fold after it
        assert counts == {"sq_norm": 4 + 2 + 2 * 2 + 2, "perturb": 4, "fd_move": 4, "fd_fold": 4, "update": 4}
    assert_same_trajectory(ref, ref_opt, new, new_opt)
    assert "C++ extension" in cpp().description


@requires_cpp
@pytest.mark.parametrize("dtype,acc_fp64", [(torch.float32, False), (torch.bfloat16, False), (torch.float64, True)])
def test_restore_reads_the_finite_check_in_the_same_sweep(dtype, acc_fp64):
    """restore_sq_norm: params back to their backups bit for bit, and the sources' sum of squares
    equal to sq_norm's (its lanes and chunks run the same way), across tile, lane and chunk edges."""
    ops = torch.ops.sassha_fused
    g = torch.Generator().manual_seed(3)
    sizes = (1, 15, 17, 257, 1025, 70001)
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    backups = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    sources = [torch.randn(n, generator=g).to(dtype) * 1e3 for n in sizes]
    want = ops.sq_norm(sources, params, False, acc_fp64)
    got = ops.restore_sq_norm(params, backups, sources, acc_fp64)
    assert all(torch.equal(p, b) for p, b in zip(params, backups))
    assert got.dtype == want.dtype and torch.equal(got, want)
    sources[-1][-1] = float("nan")
    assert not torch.isfinite(ops.restore_sq_norm(params, backups, sources, acc_fp64))


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
    bf = [torch.zeros(4, dtype=torch.bfloat16)]
    table = torch.zeros(1, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 optimizer state"):
        ops.update(bf, bf, bf, bf, [torch.zeros(4)], [], [], [], 32, table, 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match="update_scalars"):
        ops.update(x[:1], x[:1], x[:1], x[:1], x[:1], [], [], [], 32, table.float(), 0.5, 0, [], [0], [], [], None)
    with pytest.raises(RuntimeError, match="not contiguous"):
        ops.probes([torch.zeros(4, 3).t()], [1], [], 7)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        ops.probes([torch.zeros(4)], [1, 2], [], 7)
    with pytest.raises(RuntimeError, match="element_offset values"):
        ops.probes([torch.zeros(4)], [1], [0, 5], 7)
    with pytest.raises(RuntimeError, match="element_offset values"):
        ops.update(x[:1], x[:1], x[:1], x[:1], x[:1], [], [], [], 32, table, 0.5, 0, [], [0], [1, 2], [], None)
    with pytest.raises(RuntimeError, match=r"outside the probes' range \[0, 2\*\*37\)"):
        ops.probes([torch.zeros(4)], [1], [2**37 - 3], 7)
    with pytest.raises(RuntimeError, match="outside the probes' range"):
        ops.fd_move([torch.zeros(4)], [], [], torch.ones(()), [1], [-1], 7, 1.0)
    with pytest.raises(RuntimeError, match="group table"):
        ops.perturb(x, x, [torch.zeros(4), torch.zeros(5)], torch.ones(()), [0, 3],
                    torch.zeros(1, 7, dtype=torch.float64), 1.0, False)
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


def _compiler_and_ninja() -> bool:
    return (shutil.which("c++") or shutil.which("g++")) is not None and (
        shutil.which("ninja") is not None or os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja")))


def test_the_extension_builds_where_it_can():
    # The cpp tests skip when the extension is unavailable; where a compiler and
    # ninja are present that can only mean a broken build, which must fail the suite.
    from sassha_fused import available_backends

    if not _compiler_and_ninja():
        pytest.skip("no C++ compiler or ninja here: the extension is optional and 'auto' uses foreach")
    status = available_backends()["cpp"]
    assert status.available, f"the C++ extension did not build although a compiler and ninja are here:\n{status.reason}"


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
