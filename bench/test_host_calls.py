"""The host-work goal of the one-step-path design, counted (not timed): a
non-refresh step makes as many package-level Python calls at 1000 tensors as at 10.

Runs ``host_calls.py`` in a subprocess (it replaces the Triton kernels with stubs
when they would run under the interpreter, which must not leak into other tests).
"""

import json
import os
import subprocess
import sys

import pytest

from sassha_fused import available_backends

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_calls_per_step_do_not_grow_with_the_number_of_tensors(backend, tmp_path):
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable here: {status.reason}")
    out = tmp_path / "calls.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "host_calls.py"), "--backends", backend,
                          "--tensors", "10", "1000", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(out.read_text())["counts"][backend]
    few, many = counts["10"], counts["1000"]
    assert many <= 1.25 * few, f"{backend}: {few:.0f} package calls per step at 10 tensors, {many:.0f} at 1000"
