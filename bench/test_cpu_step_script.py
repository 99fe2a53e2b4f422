"""Tests of the benchmark scripts, so they cannot rot.

``bench_cpu_step.py`` (the issue-4 goal benchmark) runs at a tiny size in CI's smoke
mode (``--benchmark-disable``) and is skipped when benchmarks are enabled (it measures
nothing at this size); ``pytest_benchmark_table.py`` is checked on a small document.
"""

import json
import sys

import pytest

import bench_cpu_step
import restore_check_ab


def test_cpu_step_script_smoke(request, tmp_path, monkeypatch, capsys):
    if not request.config.getoption("benchmark_disable", default=False):
        pytest.skip("smoke test of the script; run the script itself for numbers")
    monkeypatch.setattr(sys, "argv", [
        "bench_cpu_step.py", "--numel", "4000", "--tensors", "4", "--rounds", "2", "--reps", "1",
        "--warmup", "1", "--flush-mib", "1", "--pass-calls", "2", "--phase-steps", "2", "--out", str(tmp_path),
    ])
    bench_cpu_step.main()
    out = capsys.readouterr().out
    assert "| official-style eager |" in out and "| AdamW(fused=True) |" in out
    (path,) = tmp_path.glob("cpu_step_*.json")
    data = json.loads(path.read_text())
    results = data["results"]
    assert {"official-style eager", "sassha eager", "AdamW(fused=True)"} <= set(results)
    for name, r in results.items():
        assert r["median_ms"] > 0 and len(r["rounds_ms"]) == 2, name
        assert r["this_over_adamw_fused"] > 0 and r["official_over_this"] > 0, name
    if bench_cpu_step.available_backends()["cpp"]:
        assert "sassha cpp" in results
        assert set(data["passes"]) == set(bench_cpu_step.PASS_BYTES) | {"AdamW(fused=True) step",
                                                                         bench_cpu_step.READ_REFERENCE}
        calls = {"perturb_weights()", "unperturb()", "step()", "AdamW(fused=True) step"}
        assert set(data["phases"]) == {"full", "host work (1600 params)"}
        for label, phase in data["phases"].items():
            assert set(phase) == calls and all(r["median_ms"] > 0 for r in phase.values()), label
        assert "| step() |" in out


def test_restore_check_ab_smoke(request):
    if not request.config.getoption("benchmark_disable", default=False):
        pytest.skip("smoke test of the script; run the script itself for numbers")
    from sassha_fused import available_backends

    if not available_backends()["cpp"].available:
        pytest.skip("the C++ backend is not available here")
    out = restore_check_ab.measure(4000, 4, rounds=2, reps=1, flush_mib=1)
    assert out["restore / step() ratio"] > 0 and out["AdamW(fused=True)"] > 0


def test_pytest_benchmark_table():
    import pytest_benchmark_table

    def bench(impl, numel, tensors, refresh, median):
        return {"extra_info": {"impl": impl, "numel": numel, "tensors": tensors, "refresh": refresh},
                "stats": {"median": median}}

    data = {"benchmarks": [bench("sassha-cpp", 10**6, 10, False, 0.001), bench("adamw-fused", 10**6, 10, False, 0.0005),
                           bench("sassha-cpp", 10**6, 10, True, 0.004), bench("my-impl", 10_000, 100, False, 0.002)]}
    lines = pytest_benchmark_table.table(data).splitlines()
    assert lines[0] == "| params | tensors | step | sassha-cpp | adamw-fused | my-impl |"
    assert lines[2] == "| 10,000 | 100 | non-refresh | – | – | 2.00 |"
    assert lines[3] == "| 1M | 10 | non-refresh | 1.00 | 0.50 | – |"
    assert lines[4] == "| 1M | 10 | refresh | 4.00 | – | – |"
