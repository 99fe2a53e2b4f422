"""Do SASSHA's minima come out flatter, and does it generalise better? A small, honest check.

    python bench/science/sharpness_study.py            # default configuration (about 15 min on 2 CPU cores)
    python bench/science/sharpness_study.py --quick    # smoke test (CI)

The paper (Table 1, section 6) reports that SASSHA finds flatter minima (lower
``lambda_max``, ``trace``, ``delta_worst``, ``delta_avg``) and generalises better,
also under label noise. This script puts that to a test at small scale, on data that
ships with Python packages (nothing is downloaded):

* ``digits``: scikit-learn's 8x8 digits (1,797 images), an MLP 64-128-128-10, 60 epochs;
* ``mnist1d``: MNIST-1D, generated procedurally by the ``mnist1d`` package
  (``make_dataset(get_dataset_args())``; its downloader is never called), an MLP
  40-128-128-10, 60 epochs;
* ``charlm``: a character-level transformer language model (1 block, width 48,
  context 32) on the help text of Python's ``pydoc_data.topics``, 250 steps of 32
  windows.

Optimizers: SGD (momentum 0.9), AdamW, SAM (over SGD with momentum, rho 0.05), SASSHA,
M-SASSHA, and SASSHA with rho = 0 (a lazily refreshed diagonal-Hessian method written
on the same Hessian-vector products: the second-order peer without the sharpness
term). No weight decay anywhere, the same epoch (or step) budget for all.

Protocol: each optimizer's learning rate is picked from a grid of the same width
(three values a factor 3 apart) by the validation split (which carries the same label
noise as training: clean labels are what one does not have), with seed 0; then 3
seeds run at that rate. Label noise (classifiers): 0, 20 and 40% of the training and
validation labels replaced by a different random class; test labels are clean.
Reported per run: test accuracy (classifiers) or held-out loss (charlm), final
training loss, the four sharpness metrics of ``sassha_fused.sharpness`` on a fixed
subset of the training data, and wall time. Because the curvature of a cross-entropy
minimum shrinks with its loss, the clean runs are also compared at equal training
loss: every optimizer is stopped when its training loss first reaches the largest
final loss among them, and measured there.

Output (``--out``, default ``bench/science/results``): ``results.json``, ``tables.md``
and three PNG figures; ``bench/science/RESULTS.md`` quotes them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sassha_fused import MSASSHA, SASSHA, sharpness  # noqa: E402

OPTIMIZERS = ["sgd", "adamw", "sam", "sassha", "msassha", "sassha-rho0"]
# each grid: three values a factor 3 apart (the same width for every optimizer)
LR_GRID = {
    "sgd": [0.01, 0.03, 0.1],
    "adamw": [3e-4, 1e-3, 3e-3],
    "sam": [0.01, 0.03, 0.1],
    "sassha": [0.015, 0.05, 0.15],
    "msassha": [0.015, 0.05, 0.15],
    "sassha-rho0": [0.015, 0.05, 0.15],
}
SAM_RHO = 0.05
SASSHA_RHO = 0.05


# ------------------------------------------------------------------------------ data
@dataclass
class Task:
    name: str
    kind: str  # "classify" or "lm"
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    make_model: Callable[[], nn.Module]
    batch: int
    budget: int  # epochs (classify) or steps (lm)


def mlp(d_in: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, n_classes))


def digits_task(quick: bool) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = 397
    return Task("digits", "classify", x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10, lambda: mlp(64, 10),
                64, 2 if quick else 60)


def mnist1d_task(quick: bool) -> Task:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # procedural: built from templates in code, no download
    x, y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long)
    xt, yt = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long)
    if quick:
        x, y = x[:800], y[:800]
    return Task("mnist1d", "classify", x, y, xt, yt, 10, lambda: mlp(40, 10), 64, 2 if quick else 60)


VOCAB, SEQ = 95, 32


class CharLM(nn.Module):
    def __init__(self, d: int = 48, heads: int = 4) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.ln1, self.ln2, self.ln = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head, self.heads = nn.Linear(d, VOCAB), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        h = self.emb(x) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        h = h + self.proj(a)
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln(h)).reshape(b * t, VOCAB)


def charlm_task(quick: bool) -> Task:
    from pydoc_data.topics import topics

    raw = "".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")
    data = torch.tensor(list(raw), dtype=torch.long).clamp(32, 126) - 32
    n = (len(data) - 1) // SEQ
    windows = data[: n * SEQ + 1]
    x = torch.stack([windows[i * SEQ:(i + 1) * SEQ] for i in range(n)])
    y = torch.stack([windows[i * SEQ + 1:(i + 1) * SEQ + 1] for i in range(n)])
    split = int(0.9 * n)  # the last 10% of the text is held out (half validation, half test)
    x_tr, y_tr = x[:split], y[:split]
    if quick:
        x_tr, y_tr = x_tr[:512], y_tr[:512]
    return Task("charlm", "lm", x_tr, y_tr, x[split:], y[split:], VOCAB, CharLM, 32, 20 if quick else 250)


# ------------------------------------------------------------------------ optimizers
class SAM:
    """SAM (Foret et al. 2021) over SGD with momentum: ascend to x + rho g/||g||, descend with the gradient there."""

    def __init__(self, params, lr: float, rho: float = SAM_RHO) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.base = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.rho = rho

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.base.zero_grad()
        loss = closure()
        loss.backward()
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            scale = self.rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)
            eps = [g * scale for g in grads]
            torch._foreach_add_(self.params, eps)
        self.base.zero_grad()
        closure().backward()
        with torch.no_grad():
            torch._foreach_sub_(self.params, eps)
        self.base.step()
        return loss.detach()


class Plain:
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.opt.zero_grad()
        loss = closure()
        loss.backward()
        self.opt.step()
        return loss.detach()


def make_optimizer(name: str, model: nn.Module, lr: float):
    params = model.parameters()
    if name == "sgd":
        return Plain(torch.optim.SGD(params, lr=lr, momentum=0.9))
    if name == "adamw":
        return Plain(torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    if name == "sam":
        return SAM(params, lr)
    if name == "sassha":
        return SASSHA(params, lr=lr, rho=SASSHA_RHO, lazy_hessian=10)
    if name == "sassha-rho0":
        return SASSHA(params, lr=lr, rho=0.0, lazy_hessian=10)
    if name == "msassha":
        return MSASSHA(params, lr=lr, rho=SASSHA_RHO, lazy_hessian=10)
    raise ValueError(name)


# ---------------------------------------------------------------------------- running
def noisy(y: torch.Tensor, n_classes: int, rate: float, seed: int) -> torch.Tensor:
    """A copy of y with ``rate`` of the labels replaced by a different random class."""
    g = torch.Generator().manual_seed(1000 + seed)
    flip = torch.rand(len(y), generator=g) < rate
    shift = torch.randint(1, n_classes, (len(y),), generator=g)
    return torch.where(flip, (y + shift) % n_classes, y)


def split(task: Task, noise: float):
    """(train, validation, test) with noisy train/validation labels (fixed across seeds and optimizers)."""
    if task.kind == "lm":
        half = len(task.x_test) // 2
        return ((task.x, task.y), (task.x_test[:half], task.y_test[:half]),
                (task.x_test[half:], task.y_test[half:]))
    y = noisy(task.y, task.n_classes, noise, seed=0) if noise > 0 else task.y
    n_val = len(task.x) // 5
    return ((task.x[n_val:], y[n_val:]), (task.x[:n_val], y[:n_val]), (task.x_test, task.y_test))


def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, opt=None) -> Tuple[float, float]:
    """(mean loss, accuracy) at the unperturbed point, in eval mode."""
    ctx = opt.unperturbed() if isinstance(opt, MSASSHA) else _Null()
    was = model.training
    model.eval()
    with ctx:
        losses, correct, count = [], 0, 0
        for i in range(0, len(x), 512):
            out = model(x[i:i + 512])
            target = y[i:i + 512].reshape(-1)
            losses.append(float(F.cross_entropy(out, target, reduction="sum")))
            correct += int((out.argmax(-1) == target).sum())
            count += target.numel()
    model.train(was)
    return sum(losses) / count, correct / count


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure_sharpness(model: nn.Module, task: Task, train, opt, quick: bool) -> Dict[str, float]:
    x, y = train
    n = 256 if task.kind == "classify" else 64
    batches = [(x[:n // 2], y[:n // 2]), (x[n // 2:n], y[n // 2:n])]
    ctx = opt.unperturbed() if isinstance(opt, MSASSHA) else _Null()
    with ctx:
        r = sharpness.measure(model, lambda out, t: F.cross_entropy(out, t.reshape(-1)), batches, rho=0.1,
                              n_samples=5 if quick else 20, max_iter=5 if quick else 30, tol=1e-3)
    return {"lambda_max": r.lambda_max, "trace": r.trace, "delta_worst": r.delta_worst, "delta_avg": r.delta_avg}


def train_run(task: Task, opt_name: str, lr: float, seed: int, noise: float, quick: bool,
              stop_loss: Optional[float] = None, with_sharpness: bool = True) -> Dict[str, object]:
    train, val, test = split(task, noise)
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_optimizer(opt_name, model, lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    curve: List[float] = []
    start = time.perf_counter()
    steps_per_epoch = math.ceil(len(x) / task.batch)
    total = task.budget * steps_per_epoch if task.kind == "classify" else task.budget
    eval_every = steps_per_epoch if task.kind == "classify" else max(1, task.budget // 10)
    diverged = False
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        idx = order[(step % steps_per_epoch) * task.batch:(step % steps_per_epoch + 1) * task.batch]
        xb, yb = x[idx], y[idx]
        loss = opt.step(lambda: loss_on(model, xb, yb))
        if not math.isfinite(float(loss)):
            diverged = True
            break
        if (step + 1) % eval_every == 0:
            train_loss = evaluate(model, task, *train, opt=opt)[0]
            curve.append(train_loss)
            if stop_loss is not None and train_loss <= stop_loss:
                break
    wall = time.perf_counter() - start
    out: Dict[str, object] = {"optimizer": opt_name, "lr": lr, "seed": seed, "noise": noise, "wall_s": wall,
                              "diverged": diverged, "curve": curve}
    if diverged:
        out.update(train_loss=float("nan"), val_loss=float("nan"), val_acc=0.0, test_loss=float("nan"),
                   test_acc=0.0)
        return out
    out["train_loss"] = evaluate(model, task, *train, opt=opt)[0]
    out["val_loss"], out["val_acc"] = evaluate(model, task, *val, opt=opt)
    out["test_loss"], out["test_acc"] = evaluate(model, task, *test, opt=opt)
    if with_sharpness:
        out.update(measure_sharpness(model, task, train, opt, quick))
    return out


def score(run: Dict[str, object], task: Task) -> float:
    """Higher is better: validation accuracy (classifiers) or minus validation loss (LM)."""
    if run["diverged"]:
        return -float("inf")
    return float(run["val_acc"]) if task.kind == "classify" else -float(run["val_loss"])


def study(task: Task, noises: List[float], optimizers: List[str], seeds: int, quick: bool, log) -> Dict[str, object]:
    results: Dict[str, object] = {"runs": [], "chosen": {}, "equal_loss": []}
    for noise in noises:
        for name in optimizers:
            grid = LR_GRID[name][1:2] if quick else LR_GRID[name]
            trials = [train_run(task, name, lr, 0, noise, quick, with_sharpness=False) for lr in grid]
            best = max(trials, key=lambda r: score(r, task))
            lr = best["lr"]
            results["chosen"][f"{noise}/{name}"] = {"lr": lr, "grid": grid,
                                                    "val": [score(r, task) for r in trials]}
            for seed in range(seeds):
                run = train_run(task, name, lr, seed, noise, quick)
                results["runs"].append(run)
                log(f"{task.name} noise {noise:.1f} {name:12s} lr {lr:<7g} seed {seed}: "
                    + (f"test acc {run['test_acc']:.4f}" if task.kind == "classify" else
                       f"test loss {run.get('test_loss', float('nan')):.4f}")
                    + f", train loss {run.get('train_loss', float('nan')):.4f}, "
                      f"lambda_max {run.get('lambda_max', float('nan')):.3g}, {run['wall_s']:.1f}s")
    # equal training loss: clean runs stopped at the largest final training loss among the optimizers
    clean = [r for r in results["runs"] if r["noise"] == 0.0 and r["seed"] == 0 and not r["diverged"]]
    if clean:
        target = max(float(r["train_loss"]) for r in clean)
        results["equal_loss_target"] = target
        for name in optimizers:
            lr = results["chosen"][f"0.0/{name}"]["lr"]
            run = train_run(task, name, lr, 0, 0.0, quick, stop_loss=target)
            results["equal_loss"].append(run)
            log(f"{task.name} equal loss {target:.4f} {name:12s}: train loss {run.get('train_loss', float('nan')):.4f}, "
                f"lambda_max {run.get('lambda_max', float('nan')):.3g}")
    return results


# ---------------------------------------------------------------------------- report
METRICS = ["lambda_max", "trace", "delta_worst", "delta_avg"]


def mean_std(values: List[float]) -> Tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(m: float, s: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}g} ± {s:.1g}"


def tables(all_results: Dict[str, Dict[str, object]], tasks: Dict[str, Task]) -> str:
    lines = []
    for tname, res in all_results.items():
        task = tasks[tname]
        main = "test acc" if task.kind == "classify" else "test loss"
        lines += [f"### {tname}", "",
                  f"| noise | optimizer | lr | {main} | train loss | lambda_max | trace | dL_worst | dL_avg | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        noises = sorted({r["noise"] for r in res["runs"]})
        for noise in noises:
            for name in OPTIMIZERS:
                runs = [r for r in res["runs"] if r["noise"] == noise and r["optimizer"] == name]
                if not runs:
                    continue
                key = "test_acc" if task.kind == "classify" else "test_loss"
                cells = [fmt(*mean_std([r.get(key) for r in runs]), digits=4),
                         fmt(*mean_std([r.get("train_loss") for r in runs]))]
                cells += [fmt(*mean_std([r.get(m) for r in runs])) for m in METRICS]
                diverged = sum(bool(r["diverged"]) for r in runs)
                wall = statistics.mean(float(r["wall_s"]) for r in runs)
                lr = res["chosen"][f"{noise}/{name}"]["lr"]
                lines.append(f"| {noise:.0%} | {name}{' (%d diverged)' % diverged if diverged else ''} | {lr:g} | "
                             + " | ".join(cells) + f" | {wall:.1f} |")
        if res.get("equal_loss"):
            lines += ["", f"At equal training loss (clean data, seed 0, stopped at train loss "
                          f"<= {res['equal_loss_target']:.4f}):", "",
                      "| optimizer | train loss | lambda_max | trace | dL_worst | dL_avg |", "|---|---:|---:|---:|---:|---:|"]
            for r in res["equal_loss"]:
                lines.append(f"| {r['optimizer']} | {r.get('train_loss', float('nan')):.4f} | "
                             + " | ".join(f"{r.get(m, float('nan')):.3g}" for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def figures(all_results: Dict[str, Dict[str, object]], tasks: Dict[str, Task], out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    classify = [t for t in all_results if tasks[t].kind == "classify"]
    if classify:
        fig, axes = plt.subplots(1, len(classify), figsize=(5 * len(classify), 3.6), squeeze=False)
        for ax, tname in zip(axes[0], classify):
            runs = all_results[tname]["runs"]
            noises = sorted({r["noise"] for r in runs})
            for name in OPTIMIZERS:
                ms = [mean_std([r["test_acc"] for r in runs if r["noise"] == n and r["optimizer"] == name])
                      for n in noises]
                ax.errorbar([100 * n for n in noises], [m for m, _ in ms], yerr=[s for _, s in ms], marker="o",
                            capsize=3, label=name)
            ax.set(title=tname, xlabel="label noise (%)", ylabel="test accuracy (clean labels)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, "accuracy_vs_noise.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(len(all_results), 2, figsize=(10, 3.2 * len(all_results)), squeeze=False)
    for row, tname in zip(axes, all_results):
        runs = [r for r in all_results[tname]["runs"] if r["noise"] == 0.0]
        for ax, metric in zip(row, ["lambda_max", "trace"]):
            ms = [mean_std([r.get(metric) for r in runs if r["optimizer"] == name]) for name in OPTIMIZERS]
            ax.bar(OPTIMIZERS, [max(m, 1e-12) if math.isfinite(m) else 0 for m, _ in ms],
                   yerr=[s if math.isfinite(s) else 0 for _, s in ms], capsize=3)
            ax.set(title=f"{tname}, clean: {metric}", yscale="log")
            ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "sharpness.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 3.6), squeeze=False)
    for ax, tname in zip(axes[0], all_results):
        for name in OPTIMIZERS:
            runs = [r for r in all_results[tname]["runs"] if r["noise"] == 0.0 and r["optimizer"] == name
                    and r["seed"] == 0]
            if runs and runs[0]["curve"]:
                ax.plot(range(1, len(runs[0]["curve"]) + 1), runs[0]["curve"], label=name)
        unit = "epoch" if tasks[tname].kind == "classify" else "evaluation (every budget/10 steps)"
        ax.set(title=f"{tname}, clean, seed 0", xlabel=unit, ylabel="training loss", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "training_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def compact(all_results: Dict[str, Dict[str, object]]) -> Dict[str, object]:
    """What results.json keeps: every seed's final numbers (4 significant digits), the
    seed-0 training curves, the lr choice; not the selection runs' curves."""
    def short(run: Dict[str, object], curve: bool) -> Dict[str, object]:
        out = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in run.items() if k != "curve"}
        if curve:
            out["curve"] = [float(f"{v:.4g}") for v in run["curve"]]
        return out

    return {task: {"chosen": res["chosen"], "equal_loss_target": res.get("equal_loss_target"),
                   "runs": [short(r, r["seed"] == 0) for r in res["runs"]],
                   "equal_loss": [short(r, False) for r in res["equal_loss"]]}
            for task, res in all_results.items()}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, one lr, one seed")
    ap.add_argument("--tasks", nargs="+", default=["digits", "mnist1d", "charlm"])
    ap.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    makers = {"digits": digits_task, "mnist1d": mnist1d_task, "charlm": charlm_task}
    tasks = {name: makers[name](args.quick) for name in args.tasks}
    seeds = 1 if args.quick else args.seeds
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    all_results = {}
    for name, task in tasks.items():
        noises = [0.0] if task.kind == "lm" or args.quick else [0.0, 0.2, 0.4]
        all_results[name] = study(task, noises, args.optimizers, seeds, args.quick, log)
    from common import env_info  # bench/common.py

    summary = {"env": env_info(torch.device("cpu")), "quick": args.quick, "seeds": seeds,
               "wall_s": round(time.perf_counter() - started, 1), "lr_grid": LR_GRID,
               "results": compact(all_results)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, default=float)
    md = tables(all_results, tasks)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(md)
    paths = figures(all_results, tasks, args.out)
    print(md)
    print(f"wrote {args.out}/results.json, tables.md, " + ", ".join(os.path.basename(p) for p in paths)
          + f" in {summary['wall_s']:.0f}s")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))  # bench/, for common.env_info
    main()
