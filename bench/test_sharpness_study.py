"""The sharpness study (bench/science/sharpness_study.py) runs end to end in --quick mode."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_quick_study_writes_its_tables_and_figures(tmp_path):
    script = os.path.join(HERE, "science", "sharpness_study.py")
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("results.json", "tables.md", "accuracy_vs_noise.png", "sharpness.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"digits", "mnist1d", "charlm"}
    for res in results.values():
        assert {r["optimizer"] for r in res["runs"]} == {"sgd", "adamw", "sam", "sassha", "msassha", "sassha-rho0"}
        assert all("lambda_max" in r for r in res["runs"] if not r["diverged"])
