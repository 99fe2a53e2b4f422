"""Training with compact optimizer state (``state_bits``, ``master_weight_bits``), 3 seeds.

One row per configuration, each trained from the same starts as the float32-state
anchor of its parameter dtype:

* the demo task: an MLP on scikit-learn's digits (``sassha_fused.demo``), test accuracy;
* MNIST-1D (procedural, ships in the ``mnist1d`` package): an MLP, test accuracy;
* a small causal transformer on the English help text that ships with Python
  (``pydoc_data.topics``), held-out loss: float32 params in float32 and under bf16
  autocast; bfloat16 params in bfloat16.

The claim checked: every configuration reaches its anchor's result within the
spread over seeds. Runs use ``backend="foreach"`` (the encodings are the same on
every backend; this measures them, not a kernel).

    python bench/state_bits_training.py            # about 45 minutes on 2 CPU cores
    python bench/state_bits_training.py --quick    # a smoke run
    # rerun only the 8-bit rows, keeping the others from an earlier run:
    python bench/state_bits_training.py --configs state_bits=8 \
        --keep bench/results/state-bits-training-cpu.json --out bench/results/state-bits-training-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import env_info  # noqa: E402
from fd_training import charlm_run as charlm, summary  # noqa: E402
from sassha_fused import SASSHA  # noqa: E402
from sassha_fused.demo import load_digits  # noqa: E402

#: (label, param dtype, optimizer options); the first row of each dtype is its anchor
CONFIGS = [
    ("fp32 params, state_bits=32 (anchor)", torch.float32, {"state_bits": 32}),
    ("fp32 params, state_bits=16", torch.float32, {"state_bits": 16}),
    ("fp32 params, state_bits=8", torch.float32, {"state_bits": 8}),
    ("bf16 params, state_bits=32 (anchor)", torch.bfloat16, {"state_bits": 32}),
    ("bf16 params, master 24, state_bits=8", torch.bfloat16, {"state_bits": 8, "master_weight_bits": 24}),
    ("bf16 params, master 32, state_bits=16", torch.bfloat16, {"state_bits": 16, "master_weight_bits": 32}),
]


def classify_run(data, width_in: int, options: Dict, dtype: torch.dtype, seed: int, epochs: int) -> Dict[str, float]:
    (xtr, ytr), (xte, yte) = data
    xtr, xte = xtr.to(dtype), xte.to(dtype)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width_in, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 10)).to(dtype)
    opt = SASSHA(model.parameters(), lr=0.05, rho=0.05, weight_decay=1e-3, lazy_hessian=10, backend="foreach",
                 **options)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // 64):
            idx = perm[i * 64:(i + 1) * 64]
            opt.step(lambda: F.cross_entropy(model(xtr[idx]).float(), ytr[idx]))
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return {"test_acc": acc}


def digits_data():
    return load_digits(torch.device("cpu"), seed=0)


def mnist1d_data(quick: bool):
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # procedural: built from templates in code, no download
    x, y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long)
    xt, yt = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long)
    if quick:
        x, y = x[:800], y[:800]
    return (x, y), (xt, yt)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default="digits,mnist1d,charlm")
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default=None,
                    help="run only the configurations whose label contains this text (anchors always run "
                         "unless --keep holds them)")
    ap.add_argument("--keep", default=None,
                    help="an earlier --out file: the rows of configurations not run now are taken from it")
    args = ap.parse_args(argv)
    kept: List[Dict] = []
    if args.keep:
        with open(args.keep) as f:
            kept = json.load(f)["rows"]
    run = [c for c in CONFIGS if args.configs is None or args.configs in c[0]
           or ("(anchor)" in c[0] and not any(r["configuration"] == c[0] for r in kept))]
    seeds = range(2 if args.quick else args.seeds)
    epochs, steps = (1, 10) if args.quick else (12, 300)
    tasks = args.tasks.split(",")
    results: Dict = {"env": env_info(torch.device("cpu")), "rows": []}
    print("| configuration | task | metric | mean ± std over seeds | per seed |")
    print("|---|---|---|---|---|")

    def row(label: str, task: str, metric: str, runs: List[Dict[str, float]]) -> None:
        vals = [r[metric] for r in runs]
        results["rows"].append({"configuration": label, "task": task, "metric": metric, "values": vals})
        print(f"| {label} | {task} | {metric} | {summary(vals)} | {', '.join(f'{v:.4f}' for v in vals)} |",
              flush=True)

    data = {"digits": digits_data() if "digits" in tasks else None,
            "mnist1d": mnist1d_data(args.quick) if "mnist1d" in tasks else None}
    for label, dtype, options in CONFIGS:
        if (label, dtype, options) not in run:
            for r in kept:
                if r["configuration"] == label:
                    results["rows"].append({**r, "kept_from": args.keep})
                    print(f"| {label} | {r['task']} | {r['metric']} | {summary(r['values'])} | "
                          f"{', '.join(f'{v:.4f}' for v in r['values'])} (kept) |", flush=True)
            continue
        if "digits" in tasks:
            row(label, f"digits MLP, {epochs} epochs", "test_acc",
                [classify_run(data["digits"], 64, options, dtype, s, epochs) for s in seeds])
        if "mnist1d" in tasks:
            row(label, f"MNIST-1D MLP, {epochs} epochs", "test_acc",
                [classify_run(data["mnist1d"], 40, options, dtype, s, epochs) for s in seeds])
        if "charlm" in tasks:
            for autocast in ((False, True) if dtype == torch.float32 else (False,)):
                how = "bf16 autocast" if autocast else str(dtype).replace("torch.", "")
                row(label, f"char transformer, {steps} steps, {how}", "held_out_loss",
                    [charlm("auto", s, steps, autocast, dtype, backend="foreach", **options) for s in seeds])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
