"""The README's examples run as the README says (on two CPU ranks)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp2_example_trains_and_resumes_from_its_checkpoint(tmp_path):
    # torchrun, as the README runs it (python -m: a venv that sees a system torch has no torchrun script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "examples", "fsdp2_transformer.py"),
           "--steps", "4", "--width", "32", "--layers", "1", "--checkpoint", str(tmp_path / "ckpt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "2 ranks (cpu/gloo)" in out
    assert "finite_difference HVPs" in out
    assert "its next step is identical to the original's" in out, out
    assert (tmp_path / "ckpt" / ".metadata").exists()
