"""The benchmark report: bandwidth, per-pass GB/s, end-to-end training steps.

    python bench/report.py [--device cuda|cpu] [--numel N] [--quick] [--out bench/results/report-<device>.json]

1. The device's copy bandwidth (``dst.copy_(src)`` on a large buffer).
2. Each fused pass's GB/s from the minimal bytes it must move, for every SASSHA
   backend that runs on the device, at ``--numel`` parameters (default 50M on a GPU,
   10M on a CPU), and the optimizer-side step against ``torch.optim.AdamW``.
3. End-to-end training steps on synthetic batches: a GPT-2-small-shaped transformer
   and a CIFAR-shaped ResNet, for AdamW, SAM, official-style eager SASSHA and fused
   SASSHA (k = 10): ms per step (median over the steps, refresh steps included) and
   peak memory. On a CPU the models are scaled down (same shapes of layers, fewer and
   narrower) so a run finishes in minutes; the table says which shapes ran. Each
   configuration runs in its own process, so peak memory is its own.

Prints markdown tables and writes everything, with device, versions and date, as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    OfficialStyleSASSHA,
    env_info,
    make_problem,
    PASS_BYTES,
    copy_bandwidth_gbps,
    pass_calls,
    sassha_backends,
    summarize,
    time_it,
)
from sassha_fused import SASSHA  # noqa: E402

# ----------------------------------------------------------------- bandwidth


def pass_bandwidth(device: torch.device, numel: int, n_tensors: int, backend_name: str) -> Dict[str, float]:
    out = {}
    reps = 10 if device.type == "cuda" else 5
    for name, fn in pass_calls(backend_name, device, numel, n_tensors).items():
        s = summarize(time_it(fn, device, reps=reps, warmup=2))
        out[name] = {"ms": s["median_ms"], "GB/s": PASS_BYTES[name] * numel / (s["median_ms"] / 1e3) / 1e9}
    return out


def optimizer_step_vs_adamw(device: torch.device, numel: int, n_tensors: int, backend: str) -> Dict[str, float]:
    """Non-refresh optimizer-side step (perturb, restore, update) against AdamW's step."""
    from common import AdamWImpl, SasshaImpl

    out = {}
    for name, make in (("sassha", lambda pb: SasshaImpl(pb, False, backend)),
                       ("adamw-fused", lambda pb: AdamWImpl(pb, False, "fused")),
                       ("adamw-foreach", lambda pb: AdamWImpl(pb, False, "foreach"))):
        impl = make(make_problem(numel, n_tensors, device))
        out[name] = summarize(time_it(impl.step, device, reps=10 if device.type == "cuda" else 5))["median_ms"]
        del impl
    return out


def scaling(device: torch.device, quick: bool) -> Dict[str, Dict[str, list]]:
    """Non-refresh optimizer-side step time of every implementation vs parameter count."""
    from common import implementations

    sizes = [10**5, 10**6] if quick else ([10**6, 10**7, 5 * 10**7, 10**8] if device.type == "cuda"
                                           else [10**5, 10**6, 10**7])
    out: Dict[str, Dict[str, list]] = {}
    for name, make in implementations(device).items():
        if name == "compiled-eager":
            continue  # compile time, not step time, dominates a sweep
        for n in sizes:
            impl = make(make_problem(n, 100, device), False)
            ms = summarize(time_it(impl.step, device, reps=10 if device.type == "cuda" else 5))["median_ms"]
            out.setdefault(name, {"numel": [], "ms": []})
            out[name]["numel"].append(n)
            out[name]["ms"].append(ms)
            del impl
    return out


def plot_scaling(data: Dict[str, Dict[str, list]], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in data.items():
        ax.loglog(d["numel"], d["ms"], marker="o", label=name)
    ax.set_xlabel("parameters (fp32, 100 tensors)")
    ax.set_ylabel("optimizer-side step, ms (median)")
    ax.set_title(f"non-refresh step\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------- models


class Block(nn.Module):
    """A GPT-2 block. Attention is written out (softmax(QK^T)V) by default: fused
    attention kernels have no double backward, which autograd Hessian-vector
    products need; ``sdpa=True`` uses ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, sdpa) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = nn.functional.relu(self.b1(self.c1(x)))
        return nn.functional.relu(self.b2(self.c2(y)) + self.short(x))


class ResNet(nn.Module):
    """ResNet-18 layout for 32x32 inputs (CIFAR-shaped)."""

    def __init__(self, width: int = 64, blocks=(2, 2, 2, 2), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


MODEL_SHAPES = {
    # name: (gpu shape, cpu shape)
    "gpt2-small": (dict(vocab=50257, seq=1024, d=768, layers=12, heads=12, batch=8),
                   dict(vocab=8192, seq=128, d=256, layers=4, heads=4, batch=8)),
    "resnet18-cifar": (dict(width=64, blocks=(2, 2, 2, 2), batch=128),
                       dict(width=16, blocks=(1, 1, 1, 1), batch=32)),
}


def build(model_name: str, device: torch.device, quick: bool, sdpa: bool = False, compiled: bool = False):
    """The model, a loss closure on a fixed synthetic batch, and its shape.

    ``sdpa``: fused attention (GPT only); ``compiled``: the forward through
    ``torch.compile`` (the optimizer still sees the model's own parameters).
    """
    shape = dict(MODEL_SHAPES[model_name][0 if device.type == "cuda" and not quick else 1])
    batch = shape.pop("batch")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if model_name.startswith("gpt2"):
        model = GPT(**shape, sdpa=sdpa).to(device)
        idx = torch.randint(0, shape["vocab"], (batch, shape["seq"] + 1), generator=g).to(device)
        inputs, targets = idx[:, :-1], idx[:, 1:]
        forward = torch.compile(model) if compiled else model

        def loss_fn():
            logits = forward(inputs)
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    else:
        model = ResNet(**shape).to(device)
        x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        forward = torch.compile(model) if compiled else model

        def loss_fn():
            return nn.functional.cross_entropy(forward(x), y)
    shape["batch"] = batch
    return model, loss_fn, shape


class SAM:
    """SAM over AdamW: climb along g/||g||, gradient there, restore, base step."""

    def __init__(self, params, rho=0.05, **adamw):
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.base = torch.optim.AdamW(self.params, **adamw)

    def step(self, loss_fn):
        self.base.zero_grad()
        loss_fn().backward()
        with torch.no_grad():
            norm = torch.stack([p.grad.norm() for p in self.params if p.grad is not None]).norm()
            es = [p.grad * (self.rho / (norm + 1e-12)) if p.grad is not None else None for p in self.params]
            for p, e in zip(self.params, es):
                if e is not None:
                    p.add_(e)
        self.base.zero_grad()
        loss_fn().backward()
        with torch.no_grad():
            for p, e in zip(self.params, es):
                if e is not None:
                    p.sub_(e)
        self.base.step()


def training_step_fn(opt_name: str, model: nn.Module, loss_fn):
    params = list(model.parameters())
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    elif opt_name == "sam":
        sam = SAM(params, rho=0.05, lr=1e-4)

        def step():
            sam.step(loss_fn)
    elif opt_name == "official-style":
        opt = OfficialStyleSASSHA(params, lr=1e-4, rho=0.05, lazy_hessian=10)

        def step():
            opt.zero_grad()
            loss_fn().backward()
            opt.perturb_weights(zero_grad=True)
            loss_fn().backward(create_graph=True)  # the official loop: a graph every step
            opt.unperturb()
            opt.step()
            for p in params:
                p.grad = None  # break the parameter/gradient cycle it would otherwise leak
    elif opt_name.startswith("sassha"):
        # sassha[-fd][-compiled-sdpa]:<backend>; "-fd": hvp="finite_difference", else "auto"
        kind, _, backend = opt_name.partition(":")
        opt = SASSHA(params, lr=1e-4, rho=0.05, lazy_hessian=10, backend=backend or "auto",
                     hvp="finite_difference" if "-fd" in kind else "auto")

        def step():
            opt.step(loss_fn)
    else:
        raise ValueError(opt_name)
    return step


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB.

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a child started
    by a large parent would report the parent's peak. VmHWM starts afresh at exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(model_name: str, opt_name: str, device: torch.device, steps: int, quick: bool) -> Dict:
    fused = "compiled-sdpa" in opt_name
    model, loss_fn, shape = build(model_name, device, quick, sdpa=fused and model_name.startswith("gpt2"),
                                  compiled=fused)
    step = training_step_fn(opt_name, model, loss_fn)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = time_it(step, device, reps=steps, warmup=3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mib()
    return {"model": model_name, "optimizer": opt_name, "shape": shape,
            "params": sum(p.numel() for p in model.parameters()), "peak_MiB": peak,
            **summarize(samples)}


# --------------------------------------------------------------------- main


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=None)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per configuration (k=10: 2 refreshes)")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end rounds (configurations alternate)")
    ap.add_argument("--quick", action="store_true", help="small shapes and sizes everywhere (a smoke run)")
    ap.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), help="end-to-end models")
    ap.add_argument("--optimizers", nargs="+", default=None,
                    help="end-to-end configurations (default: adamw, sam, official-style and the fastest "
                         "backend's sassha, sassha-fd and sassha-fd-compiled-sdpa)")
    ap.add_argument("--end-to-end-only", action="store_true", help="skip the bandwidth and scaling sections")
    ap.add_argument("--only-end-to-end", dest="one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    if args.one:  # child process: one end-to-end configuration
        model_name, opt_name = args.one.split("/")
        print(json.dumps(run_one(model_name, opt_name, device, args.steps, args.quick)))
        return

    numel = args.numel or (50_000_000 if device.type == "cuda" else 10_000_000)
    if args.quick:
        numel = min(numel, 200_000)
    env = env_info(device)
    report: Dict = {"env": env, "numel": numel, "tensors": args.tensors}
    print(f"# sassha_fused benchmark report\n\n{env['date']}, device: {env['device']}, "
          f"torch {env['torch']}, triton {env['triton']}\n")

    backends = sassha_backends(device)
    if not args.end_to_end_only:
        kernel_sections(args, device, numel, backends, env, report)

    fused = ("triton" if "triton" in backends else "cuda" if "cuda" in backends else
             "cpp" if "cpp" in backends else "foreach")
    optimizers = args.optimizers or ["adamw", "sam", "official-style", f"sassha:{fused}", f"sassha-fd:{fused}",
                                     f"sassha-fd-compiled-sdpa:{fused}"]
    end_to_end(args, device, optimizers, report)

    out = args.out or os.path.join(HERE, "results", f"report-{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {out}")


def kernel_sections(args, device: torch.device, numel: int, backends: List[str], env: Dict, report: Dict) -> None:
    """Copy bandwidth, every pass's GB/s, the optimizer-side step vs AdamW, the scaling sweep."""
    bw = copy_bandwidth_gbps(device, max(numel, 1 << 24))
    report["copy_GBps"] = bw
    print(f"Copy bandwidth (dst.copy_(src), fp32): **{bw:.1f} GB/s**\n")
    report["passes"] = {}
    print(f"## Passes at {numel:,} fp32 params in {args.tensors} tensors\n")
    print("| backend | pass | ms | GB/s (minimal bytes) | % of copy |")
    print("|---|---|---:|---:|---:|")
    for b in backends:
        res = pass_bandwidth(device, numel, args.tensors, b)
        report["passes"][b] = res
        for name, r in res.items():
            print(f"| {b} | {name} | {r['ms']:.3f} | {r['GB/s']:.1f} | {100 * r['GB/s'] / bw:.0f}% |")

    print(f"\n## Optimizer-side non-refresh step vs AdamW ({numel:,} params, {args.tensors} tensors)\n")
    print("| backend | SASSHA ms | AdamW fused ms | AdamW foreach ms | SASSHA / fused AdamW |")
    print("|---|---:|---:|---:|---:|")
    report["vs_adamw"] = {}
    for b in backends:
        r = optimizer_step_vs_adamw(device, numel, args.tensors, b)
        report["vs_adamw"][b] = r
        print(f"| {b} | {r['sassha']:.2f} | {r['adamw-fused']:.2f} | {r['adamw-foreach']:.2f} | "
              f"{r['sassha'] / r['adamw-fused']:.2f}x |")

    report["scaling"] = scaling(device, args.quick)
    print("\n## Optimizer-side non-refresh step time vs parameter count (100 tensors)\n")
    names = list(report["scaling"])
    print("| params | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for i, n in enumerate(report["scaling"][names[0]]["numel"]):
        print(f"| {n:,} | " + " | ".join(f"{report['scaling'][k]['ms'][i]:.2f} ms" for k in names) + " |")
    png = os.path.join(HERE, "results", f"scaling-{device.type}.png")
    if plot_scaling(report["scaling"], png, f"{env['device']}, torch {env['torch']}, {env['date']}"):
        print(f"\nplot: {png}")


def end_to_end(args, device: torch.device, optimizers: List[str], report: Dict) -> None:
    """Whole training steps of each model and optimizer, each configuration in its own process."""
    report["end_to_end"] = []
    print(f"\n## End-to-end training steps (synthetic batches, k = 10; {args.rounds} rounds, configurations alternated)\n")
    print("| model | shape | params | optimizer | ms / step (median) | ms / step (mean, refreshes included) "
          "| time / SAM (mean) | time / official-style (mean) | peak MiB |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for model_name in args.models:
        # Each configuration runs in its own process (its own peak memory); rounds
        # alternate them, so a drift of the machine's speed hits all alike.
        runs: Dict[str, List[Dict]] = {o: [] for o in optimizers}
        for _ in range(args.rounds):
            for opt_name in optimizers:
                cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                       "--steps", str(args.steps), "--only-end-to-end", f"{model_name}/{opt_name}"]
                cmd += ["--quick"] if args.quick else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"<!-- {model_name}/{opt_name} failed: {proc.stderr.strip().splitlines()[-1]} -->")
                    continue
                runs[opt_name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        summary = {}
        for opt_name, rs in runs.items():
            if rs:
                summary[opt_name] = {
                    **{k: rs[0][k] for k in ("model", "optimizer", "shape", "params")},
                    "median_ms": statistics.median(r["median_ms"] for r in rs),
                    "mean_ms": statistics.median(r["mean_ms"] for r in rs),
                    "peak_MiB": max(r["peak_MiB"] for r in rs), "rounds": rs,
                }
        for opt_name, r in summary.items():
            report["end_to_end"].append(r)
            shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
            vs = {b: (f"{r['mean_ms'] / summary[b]['mean_ms']:.2f}x" if b in summary else "–")
                  for b in ("sam", "official-style")}
            print(f"| {model_name} | {shape} | {r['params'] / 1e6:.1f}M | {opt_name} | {r['median_ms']:.1f} | "
                  f"{r['mean_ms']:.1f} | {vs['sam']} | {vs['official-style']} | {r['peak_MiB']:.0f} |")
    if device.type == "cpu":
        print("\nCPU peak memory: the configuration's own process, peak resident set (VmHWM), torch included.")


if __name__ == "__main__":
    main()
