"""fp16 autocast with a GradScaler and autograd Hessian-vector products, on the CPU.

The README's GradScaler recipe (protocol (b), ``grad_scaler=scaler``) on two tasks:
the demo's digits MLP and the char-level transformer of ``science/sharpness_study.py``.
On a refresh step the scaled Hessian-vector products overflow fp16 long before the
gradients do; the optimizer reports that to the scaler like an inf gradient, so the
scaler skips the step and lowers its scale, and the refresh is taken again on the
next step. Prints the loss, the scale and the steps taken; ``--out`` writes a small
JSON summary.

    python bench/fp16_scaler.py [--steps 40] [--tasks digits charlm] [--out results/fp16_scaler.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "science"))

from sassha_fused import SASSHA  # noqa: E402


def digits(steps: int):
    from sassha_fused.demo import load_digits, make_model

    (x, y), _ = load_digits(torch.device("cpu"))
    return make_model(0, 64, torch.device("cpu")), x[:256], y[:256], dict(lr=0.15)


def charlm(steps: int):
    from sharpness_study import CharLM, charlm_task

    task = charlm_task(quick=True)
    torch.manual_seed(0)
    return CharLM(), task.x[:64], task.y[:64].reshape(-1), dict(lr=0.05)


TASKS = {"digits": digits, "charlm": charlm}


def run(name: str, steps: int, lazy_hessian: int = 10) -> Dict[str, object]:
    model, x, y, kw = TASKS[name](steps)
    scaler = torch.amp.GradScaler("cpu")
    opt = SASSHA(model.parameters(), lazy_hessian=lazy_hessian, grad_scaler=scaler, backend="foreach", **kw)

    def loss():
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(model(x), y)

    losses: List[float] = []
    scales: List[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        first = loss()
        scaler.scale(first).backward()
        opt.perturb_weights(zero_grad=True)
        scaler.scale(loss()).backward(create_graph=opt.hessian_due)
        for _ in opt.hvp_passes():
            scaler.scale(loss()).backward()
        opt.unperturb()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(first.detach()))
        scales.append(scaler.get_scale())
    return {"task": name, "steps": steps, "optimizer_steps": opt.global_step, "skipped_by_optimizer": opt.skipped_steps,
            "skipped_by_scaler": steps - opt.global_step, "first_loss": losses[0], "last_loss": losses[-1],
            "min_loss": min(losses), "scales": sorted(set(scales), reverse=True),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = []
    for name in args.tasks:
        r = run(name, args.steps)
        results.append(r)
        print(f"{name}: loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} in {r['steps']} steps "
              f"({r['optimizer_steps']} taken, {r['skipped_by_scaler']} skipped by the scaler); "
              f"scales {r['scales']}; {r['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
