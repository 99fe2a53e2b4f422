"""Training with finite-difference Hessian-vector products against autograd ones, 3 seeds.

Two tasks, each trained with SASSHA (``hvp="autograd"`` and ``hvp="finite_difference"``,
everything else equal) from the same starts:

* the demo task: an MLP on scikit-learn's digits (``sassha_fused.demo``), test accuracy;
* a small causal transformer (written-out attention, so autograd works) learning
  characters of the English help text that ships with Python (``pydoc_data.topics``),
  held-out loss; in float32 and under bf16 autocast.

The claim checked: FD reaches the same loss and accuracy as autograd within the
spread over seeds.

    python bench/fd_training.py            # about 12 minutes on 2 CPU cores
    python bench/fd_training.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import env_info  # noqa: E402
from fd_accuracy import Transformer  # noqa: E402
from sassha_fused import SASSHA  # noqa: E402
from sassha_fused.demo import load_digits, make_model  # noqa: E402


def digits_run(hvp: str, seed: int, epochs: int) -> Dict[str, float]:
    (xtr, ytr), (xte, yte) = load_digits(torch.device("cpu"), seed=0)
    model = make_model(seed, 128, torch.device("cpu"))
    opt = SASSHA(model.parameters(), lr=0.05, rho=0.05, weight_decay=1e-3, lazy_hessian=10, hvp=hvp)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // 64):
            idx = perm[i * 64:(i + 1) * 64]
            loss = opt.step(lambda: F.cross_entropy(model(xtr[idx]), ytr[idx]))
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(xtr), ytr))
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return {"train_loss": train_loss, "test_acc": acc, "last_batch_loss": float(loss)}


def text() -> torch.Tensor:
    from pydoc_data.topics import topics

    raw = "".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")
    data = torch.tensor(list(raw), dtype=torch.long)
    data = data.clamp(32, 126) - 32  # printable ASCII: 95 symbols
    return data


LR = 0.02


def charlm_run(hvp: str, seed: int, steps: int, autocast: bool, dtype: torch.dtype = torch.float32,
               **options) -> Dict[str, float]:
    """Held-out loss of the char transformer after ``steps`` SASSHA steps (``options`` go to SASSHA)."""
    data = text()
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    seq, batch = 64, 32
    torch.manual_seed(seed)
    model = Transformer(vocab=95, d=64, seq=seq, layers=2, heads=4).to(dtype)
    opt = SASSHA(model.parameters(), lr=LR, rho=0.02, weight_decay=1e-2, lazy_hessian=10, hvp=hvp, **options)
    g = torch.Generator().manual_seed(seed)

    def batch_of(source, gen):
        starts = torch.randint(0, len(source) - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([source[s:s + seq + 1] for s in starts])
        return chunk[:, :-1], chunk[:, 1:]

    def loss_on(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        return F.cross_entropy(out.float().reshape(-1, 95), y.reshape(-1))

    for _ in range(steps):
        x, y = batch_of(train, g)
        opt.step(lambda: loss_on(x, y))
    held_gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        losses = [float(loss_on(*batch_of(held, held_gen))) for _ in range(20)]
    return {"held_out_loss": statistics.mean(losses), "hvp_method": opt.hvp_method}


def summary(values: List[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    seeds = range(2 if args.quick else args.seeds)
    epochs, steps = (2, 20) if args.quick else (12, 300)
    results: Dict = {"env": env_info(torch.device("cpu")), "digits": {}, "charlm": {}}
    print("| task | hvp | metric | mean ± std over seeds | per seed |")
    print("|---|---|---|---|---|")
    for hvp in ("autograd", "finite_difference"):
        runs = [digits_run(hvp, s, epochs) for s in seeds]
        results["digits"][hvp] = runs
        for metric in ("test_acc", "train_loss"):
            vals = [r[metric] for r in runs]
            print(f"| digits MLP, {epochs} epochs | {hvp} | {metric} | {summary(vals)} | "
                  f"{', '.join(f'{v:.4f}' for v in vals)} |")
    for autocast in (False, True):
        label = "bf16 autocast" if autocast else "float32"
        for hvp in ("autograd", "finite_difference"):
            runs = [charlm_run(hvp, s, steps, autocast) for s in seeds]
            results["charlm"][f"{label}/{hvp}"] = runs
            vals = [r["held_out_loss"] for r in runs]
            print(f"| char transformer, {steps} steps, {label} | {hvp} | held-out loss | {summary(vals)} | "
                  f"{', '.join(f'{v:.4f}' for v in vals)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
