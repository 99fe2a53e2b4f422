"""bench/gpu_check.sh --dry: every stage of the GPU check runs, at toy sizes on the CPU, so the
script a lent GPU runs cannot rot."""

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def test_gpu_check_dry_run_records_every_stage(tmp_path):
    run = subprocess.run([os.path.join(HERE, "gpu_check.sh"), "--dry", "--out", str(tmp_path), "--budget", "400"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {r["stage"]: r for r in data["records"] if r.get("item") == "stage"}
    assert set(stages) == {"build", "tests", "passes", "steps", "syncs", "e2e"}
    assert all(r["status"] == "ok" for r in stages.values()), stages
    items = {r["item"] for r in data["records"]}
    assert {"extension", "pytest", "copy", "pass", "step", "syncs", "e2e"} <= items
    assert all("device" in r and "date" in r and "torch" in r for r in data["records"])
    assert not [r for r in data["records"] if r.get("item") == "e2e" and "error" in r]
    from sassha_fused import available_backends

    if available_backends()["triton"].available:  # the register cap's trade, timed on a GPU
        rows = {r["pass_"] for r in data["records"] if r.get("item") == "pass" and r["backend"] == "triton"}
        assert {"update, without maxnreg", "update+refresh (autograd), without maxnreg"} <= rows
    assert "## Passes" in (tmp_path / "gpu_check.md").read_text()
    assert len(os.listdir(tmp_path)) <= 8  # what the device tool brings back
