"""Smoke test of bench/hf_trainer_bench.py (tiny sizes), so the script cannot rot."""

import json
import sys

import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")

import hf_trainer_bench  # noqa: E402


def test_hf_trainer_bench_smoke(request, tmp_path, monkeypatch, capsys):
    if not request.config.getoption("benchmark_disable", default=False):
        pytest.skip("smoke test of the script; run the script itself for numbers")
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["hf_trainer_bench.py", "--steps", "2", "--warmup", "1", "--width", "32",
                                      "--layers", "1", "--k", "2", "--batch", "2", "--device", "cpu",
                                      "--out", str(out)])
    hf_trainer_bench.main()
    assert "SasshaTrainer / Trainer+AdamW" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["optimizer"] for r in data["results"]] == ["adamw", "sassha"]
    assert all(r["steps"] == 2 and r["step_ms_mean"] > 0 for r in data["results"])
