"""The equal-compute study and its hyper-parameter sweep (bench/science/equal_compute.py) run end to end in --quick mode."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = {"adamw", "sam", "sassha", "msassha", "sgd"}


def test_quick_equal_compute_writes_tables_curves_and_sweep(tmp_path):
    script = os.path.join(HERE, "science", "equal_compute.py")
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("tables.md", "curves_passes.png", "curves_seconds.png", "sweep.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for task in ("digits", "mnist1d", "charlm", "charlm128"):
        study = json.loads((tmp_path / f"study_{task}.json").read_text())
        assert {k.split("/")[1] for k in study["combos"]} == OPTIMIZERS
        for combo in study["combos"].values():
            assert combo["lr"] in combo["grid"]
            for r in combo["runs"]:
                if r["diverged"]:
                    continue
                # both budgets reached; the pass budget within one step's passes (at most 4 here)
                assert study["P"] <= r["at_passes"]["passes"] <= study["P"] + 4
                assert r["at_time"]["secs"] >= study["T"]
        sassha = study["combos"][next(k for k in study["combos"] if k.endswith("/sassha"))]["runs"][0]
        # SASSHA's own passes: 2 a step plus the refresh's (2 for a double backward, 1 per FD probe)
        assert sassha["passes"] >= 2 * sassha["steps"]
        sweep = json.loads((tmp_path / f"sweep_{task}.json").read_text())
        assert set(sweep["sweeps"]) == {"lr", "rho", "lazy_hessian", "hessian_power"}
