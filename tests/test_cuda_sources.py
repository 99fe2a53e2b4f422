"""The CUDA sources compile, and (with a GPU) the cuda backend equals the reference.

The compile checks need only nvcc (and, for the torch binding, the headers of any
torch wheel), not a GPU: they catch a broken .cu on CPU-only machines.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

from conftest import requires_cuda_backend
from parity import (
    EDGE_SIZES,
    assert_same_trajectory,
    check_phases_match_eager,
    clone_params,
    make_params,
    phase_bucket,
    run_trajectory,
)
from sassha_fused import MSASSHA, SASSHA, _build

CSRC = _build.csrc_dir()
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (set CUDA_HOME)")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(CSRC or "", "*.cu"))), ids=os.path.basename)
def test_cu_file_compiles(source, tmp_path):
    out = subprocess.run(
        [NVCC, "-std=c++17", *_build.NVCC_FLAGS, f"-I{CSRC}", "-c", source, "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, f"nvcc failed on {source}:\n{out.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.fixture(scope="module")
def sm90_kernels(tmp_path_factory):
    """{kernel: {"ptx": its PTX, "registers": n, "spill_bytes": n}} of sassha_cuda_kernels.cu for sm_90."""
    tmp = tmp_path_factory.mktemp("sm90")
    ptx, cubin = tmp / "k.ptx", tmp / "k.cubin"
    base = [NVCC, "-std=c++17", *_build.NVCC_FLAGS, "-arch=sm_90", f"-I{CSRC}"]
    out = subprocess.run([*base, "-ptx", os.path.join(CSRC, "sassha_cuda_kernels.cu"), "-o", str(ptx)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]
    out = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Xptxas", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]
    text = ptx.read_text()
    kernels = {}
    for body in re.split(r"^\.visible \.entry |^\.entry ", text, flags=re.M)[1:]:
        mangled = body.split("(")[0]
        kernels[mangled] = {"ptx": body}
    for mangled, report in re.findall(r"Compiling entry function '(\S+)'.*?\n(.*?Used \d+ registers)", out.stderr, re.S):
        spills = re.findall(r"(\d+) bytes spill", report)
        kernels[mangled].update(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                                spill_bytes=sum(map(int, spills)))
    # short names: sq_norm_kernelIfLb1E..., update_kernelILi2ELb1E...
    return {re.findall(r"[a-z][a-z_]*_kernel(?:I\w*)?", m)[-1]: k for m, k in kernels.items()}


# a global access and its width in bytes: ld.global.nc.u64, st.global.v4.u32, ...
_ACCESS = re.compile(r"\b(ld|st)(\.global)?((?:\.(?:nc|ca|cg|cs|lu|cv|wb|wt))*)(\.v[248])?\.[bfsu](8|16|32|64)\b")


@needs_nvcc
def test_cuda_kernels_move_16_bytes_per_access_without_spills(sm90_kernels):
    """Every data kernel moves its vectors 16 bytes at a time, also for bf16/fp16; <= 128 registers, no spills.

    Vector accesses narrower than 16 bytes are allowed only as read-only table loads
    (``ld.global.nc``: the block map's 8-byte records); scalar ones are the guarded
    tail of a tile (or a misaligned tensor).
    """
    assert len(sm90_kernels) >= 20, sorted(sm90_kernels)
    for name, k in sm90_kernels.items():
        assert k["registers"] <= 128 and k["spill_bytes"] == 0, (name, k["registers"], k["spill_bytes"])
        if "sum_partials" in name:
            continue
        wide, narrow = 0, []
        for op, space, qualifiers, vec, bits in _ACCESS.findall(k["ptx"]):
            if not vec:
                continue
            width = int(vec[2:]) * int(bits) // 8
            if width == 16 and space:
                wide += 1
            elif not (op == "ld" and space and ".nc" in qualifiers):
                narrow.append(f"{op}{space}{qualifiers}{vec}.{bits}")
        assert wide > 0 and not narrow, f"{name}: {wide} 16-byte accesses; narrower vectors: {sorted(set(narrow))}"


@needs_nvcc
def test_update_kernels_cover_every_state_format(sm90_kernels):
    """update_kernel<mode, sqrt power, state_bits>: 4 refresh modes x 2 power paths x state_bits 32 / 16 / 8.

    Every one of them also takes the master weights of bfloat16 params. The 8-bit ones find a
    group's scale (32 elements: 4 threads' runs) with warp shuffles, and move their one-byte
    codes 8 bytes per thread (scalar 64-bit accesses: a warp's are 256 contiguous bytes)."""
    update = {name: k for name, k in sm90_kernels.items() if name.startswith("update_kernel")}
    formats = {}
    for name in update:
        mode, power, bits = re.match(r"update_kernelILi(\d)ELb(\d)ELi(\d+)E", name).groups()
        formats.setdefault(int(bits), set()).add((int(mode), int(power)))
    assert sorted(formats) == [8, 16, 32] and all(len(v) == 8 for v in formats.values()), sorted(update)
    for name, k in update.items():
        if "ELi8E" in name:
            assert "shfl.sync.bfly" in k["ptx"], f"{name}: no warp shuffle for the group maxima"
            assert re.search(r"\b(ld|st)\.global\.u64\b", k["ptx"]), f"{name}: codes not moved 8 bytes at a time"


@needs_nvcc
def test_cuda_binding_parses(tmp_path):
    # The torch side of the CUDA backend (sassha_cuda.cpp) against this torch's
    # headers. CPU wheels ship c10/cuda headers but not the build-generated
    # cuda_cmake_macros.h; a stand-in defines what a shared CUDA build defines.
    from torch.utils.cpp_extension import include_paths

    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"), "/usr/local/cuda/include"]
    cuda_include = next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_runtime.h"))), None)
    if cuda_include is None:
        pytest.skip("CUDA headers (cuda_runtime.h) not found; set CUDA_HOME")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in include_paths()):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{cuda_include}", f"-I{tmp_path / 'stub'}", f"-I{CSRC}"]
    out = subprocess.run(
        [cxx, "-std=c++20", "-fsyntax-only", *flags, os.path.join(CSRC, "sassha_cuda.cpp")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-6000:]


# ---------------------------------------------------------------- with a GPU
@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("protocol", ["closure", "official"])
def test_cuda_sassha_matches_eager(dtype, protocol):
    p0 = make_params(EDGE_SIZES, dtype, device="cuda")
    ref, new = clone_params(p0), clone_params(p0)

    def factory(backend):
        return lambda ps: SASSHA([dict(params=ps[:4], lr=0.02, rho=0.1), dict(params=ps[4:], lr=0.01, weight_decay=0.1)],
                                 backend=backend, lazy_hessian=3, n_samples=2, adaptive=protocol == "official")

    ref_opt = run_trajectory(factory("eager"), ref, 30, protocol)
    new_opt = run_trajectory(factory("cuda"), new, 30, protocol)
    assert_same_trajectory(ref, ref_opt, new, new_opt)


@requires_cuda_backend
def test_cuda_msassha_matches_eager():
    p0 = make_params(EDGE_SIZES, torch.float32, device="cuda", seed=1)
    ref, new = clone_params(p0), clone_params(p0)
    ref_opt = run_trajectory(lambda ps: MSASSHA(ps, backend="eager", lazy_hessian=4), ref, 30)
    new_opt = run_trajectory(lambda ps: MSASSHA(ps, backend="cuda", lazy_hessian=4), new, 30)
    assert_same_trajectory(ref, ref_opt, new, new_opt)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_every_phase_matches_eager(dtype):
    from sassha_fused.backends import get_backend

    check_phases_match_eager(get_backend("cuda"), dtype)


@requires_cuda_backend
@pytest.mark.parametrize("cls,scheme,n_samples", [(SASSHA, "forward", 1), (SASSHA, "central", 2), (MSASSHA, "forward", 2)])
def test_cuda_finite_differences_match_eager(cls, scheme, n_samples):
    p0 = make_params(EDGE_SIZES, torch.float32, device="cuda", seed=3)
    ref, new = clone_params(p0), clone_params(p0)
    kw = dict(lazy_hessian=3, n_samples=n_samples, hvp="finite_difference", fd_scheme=scheme)
    ref_opt = run_trajectory(lambda ps: cls(ps, backend="eager", **kw), ref, 12)
    new_opt = run_trajectory(lambda ps: cls(ps, backend="cuda", **kw), new, 12)
    assert_same_trajectory(ref, ref_opt, new, new_opt)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_probes_bitwise(dtype):
    from sassha_fused.backends import ProbeKeys, get_backend
    from sassha_fused.probes import key_prefix, probe_key, rademacher

    sizes = list(EDGE_SIZES) + [100_003]
    b = phase_bucket(get_backend("cuda"), dtype, sizes, device="cuda")
    keys = ProbeKeys(tuple(key_prefix(2**64 - 1, 7, s) for s in range(2)))
    zs = get_backend("cuda").probes(b, keys, 1)
    for j, (p, z) in enumerate(zip(b.params, zs)):
        want = rademacher(p.numel(), probe_key(2**64 - 1, 7, 1, b.param_index[j]), dtype=dtype, device="cuda")
        assert torch.equal(z.reshape(-1), want), f"probe {j} differs"
