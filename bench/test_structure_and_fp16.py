"""Smoke runs of bench/step_structure.py and bench/fp16_scaler.py, so they cannot rot."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_step_structure_counts_a_step():
    run = subprocess.run([sys.executable, os.path.join(HERE, "step_structure.py")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["class_layer"]["total_lines"] > 0
    for name in ("SASSHA", "MSASSHA"):
        assert "optimizer.py" in out[name]["files"] and out[name]["attributes"] > 0


def test_fp16_scaler_runs_and_writes_its_summary(tmp_path):
    dest = tmp_path / "fp16.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "fp16_scaler.py"), "--steps", "12", "--tasks", "digits",
                          "--out", str(dest)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(dest.read_text())["results"]
    assert result["task"] == "digits" and result["steps"] == 12
