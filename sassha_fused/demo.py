"""The main job: a short real training run that shows SASSHA working.

    python -m sassha_fused.demo [--epochs N] [--device cpu|cuda]

Trains a small MLP on scikit-learn's handwritten digits (1,797 8x8 images shipped
inside the scikit-learn package, no download) with AdamW, SASSHA and M-SASSHA, then
reports test accuracy, final training loss and milliseconds per training step for
every backend that can run on the device. Each backend trains the same model from
the same start; they compute the same algorithm, so their accuracies agree.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, List

import torch
from torch import nn

from . import MSASSHA, SASSHA, available_backends, preserve_bn_stats
from .integrations import require

try:
    from tqdm.auto import tqdm
except ImportError:  # the demo still runs without a progress bar
    tqdm = None


@dataclass
class Result:
    name: str
    backend: str
    test_acc: float
    train_loss: float
    ms_per_step: float
    steps: int


def require_sklearn() -> None:
    """Exit with status 2 and one line naming the demo extra, if scikit-learn is missing."""
    try:
        require("sklearn.datasets", "demo", "the demo (scikit-learn's digits data set)")
    except ImportError as exc:  # one line, no traceback
        print(exc, file=sys.stderr)
        raise SystemExit(2)


def load_digits(device: torch.device, seed: int = 0):
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 1e-3
    x = (x - mean) / std
    return (x[n_test:].to(device), y[n_test:].to(device)), (x[:n_test].to(device), y[:n_test].to(device))


def make_model(seed: int, width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(),
        nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, 10),
    ).to(device)


def train(
    name: str,
    backend: str,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    data,
    epochs: int,
    batch: int,
    width: int,
    device: torch.device,
    seed: int = 0,
) -> Result:
    (xtr, ytr), (xte, yte) = data
    model = make_model(seed, width, device)
    opt = make_opt(model)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(xtr) // batch
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc=f"{name:<8} {backend:<8}", leave=False, unit="step") if tqdm else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    elapsed, timed, last = 0.0, 0, float("nan")
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = xtr[idx], ytr[idx]
            sync()
            t0 = time.perf_counter()
            if isinstance(opt, (SASSHA, MSASSHA)):
                def closure():
                    # A model with BatchNorm keeps its running statistics out of the
                    # perturbed pass (this MLP has none; the call shows the pattern).
                    with preserve_bn_stats(model, enabled=opt.is_perturbed):
                        return loss_fn(model(xb), yb)
                loss = opt.step(closure)
            else:
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
            sync()
            if epoch > 0:  # the first epoch warms up (allocations, kernel compilation)
                elapsed += time.perf_counter() - t0
                timed += 1
            if bar:
                bar.update(1)
        last = loss.item()
        if bar:
            bar.set_postfix(loss=f"{last:.3f}")
    if bar:
        bar.close()
    model.eval()
    if isinstance(opt, MSASSHA):
        with opt.unperturbed(), torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
    else:
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
    return Result(name, backend, acc, last, 1000 * elapsed / max(timed, 1), total)


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    require_sklearn()
    device = torch.device(args.device)

    data = load_digits(device)
    status = available_backends()
    print(f"sassha_fused demo: digits ({len(data[0][0])} train / {len(data[1][0])} test), "
          f"MLP 64-{args.width}-{args.width}-10, {args.epochs} epochs, batch {args.batch}, device {device}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads")
    runnable = []
    for name, st in status.items():
        usable = st.available
        reason = st.reason
        if usable and name == "triton" and device.type != "cuda":
            usable, reason = False, "Triton runs on CUDA devices (its CPU interpreter is for tests only)"
        if usable and name == "cuda" and device.type != "cuda":
            usable, reason = False, "needs a CUDA device"
        if usable and name == "cpp" and device.type != "cpu":
            usable, reason = False, "CPU tensors only"
        print(f"  backend {name:<8} {'ok' if usable else 'skipped'}" + ("" if usable else f": {reason}"))
        if usable:
            runnable.append(name)

    common = dict(data=data, epochs=args.epochs, batch=args.batch, width=args.width, device=device)
    results = [train("AdamW", "torch", lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-2), **common)]
    for backend in runnable:
        results.append(train("SASSHA", backend, lambda m, b=backend: SASSHA(
            m.parameters(), lr=0.05, rho=0.05, weight_decay=1e-3, lazy_hessian=10, backend=b), **common))
    best = min((r for r in results if r.name == "SASSHA"), key=lambda r: r.ms_per_step)
    results.append(train("M-SASSHA", best.backend, lambda m: MSASSHA(
        m.parameters(), lr=0.05, rho=0.05, weight_decay=1e-3, lazy_hessian=10, backend=best.backend), **common))

    print()
    print("| optimizer | backend | test accuracy | final train loss | ms / step |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r.name} | {r.backend} | {100 * r.test_acc:.1f}% | {r.train_loss:.4f} | {r.ms_per_step:.2f} |")
    print("\nms / step: one whole training step (forward, backward(s), optimizer), mean over "
          "all steps after the first epoch. SASSHA takes two gradients per step (plus a "
          "Hessian-vector product every 10 steps), AdamW and M-SASSHA one.")


if __name__ == "__main__":
    main()
