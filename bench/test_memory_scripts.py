"""Smoke runs of bench/memory.py, bench/state_encodings.py and bench/state_bits_training.py."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(args, timeout=600):
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_memory_counts_every_configuration(tmp_path):
    dest = tmp_path / "memory.json"
    _run([os.path.join(HERE, "memory.py"), "--width", "64", "--out", str(dest)])
    rows = {r["configuration"]: r for r in json.loads(dest.read_text())["rows"]}
    adamw = rows["fused AdamW, fp32 params (anchor)"]
    assert adamw["between"] > 11.5  # params, exp_avg, exp_avg_sq (and a few step counters)
    fp32_8 = rows["SASSHA, fp32 params, state_bits=8"]
    assert fp32_8["between"] < rows["SASSHA, fp32 params, state_bits=32"]["between"]
    assert fp32_8["peak_fd"] > fp32_8["between"]  # the backup and the refresh buffer during a step


def test_state_encodings_compares_the_candidates(tmp_path):
    dest = tmp_path / "enc.json"
    _run([os.path.join(HERE, "state_encodings.py"), "--steps", "50", "--out", str(dest)])
    rows = json.loads(dest.read_text())["rows"]
    import state_encodings

    # the float32 anchor, each candidate alone, and the two pairs of chosen and earlier encodings
    expected = 1 + len(state_encodings.M_CANDIDATES) + len(state_encodings.D_CANDIDATES) + 2
    assert rows[0]["step_rel_error"] == 0.0 and len(rows) == expected


def test_state_bits_training_quick(tmp_path):
    dest = tmp_path / "train.json"
    _run([os.path.join(HERE, "state_bits_training.py"), "--quick", "--tasks", "digits", "--out", str(dest)])
    rows = json.loads(dest.read_text())["rows"]
    assert len(rows) == 6 and all(len(r["values"]) == 2 for r in rows)
