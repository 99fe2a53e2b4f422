"""Accuracy of finite-difference Hessian-vector products against exact ones, same probes.

Three models after some training (an MLP, a CNN, a 2-block causal transformer with
written-out attention), each refresh taken through the optimizer itself: SASSHA
with ``rho=0`` (the HVP point is the params), ``lazy_hessian=1``, and a spy around
the eager reference that records the Hutchinson sample mean ``h = mean_s z*Hz`` the
update receives. The same seed gives the same probes to every run, so
``|h_fd - h_exact| / |h_exact|`` is the error of the finite differences alone
(Hutchinson's own sampling noise cancels).

Rows: the default step (``fd_eps="auto"``) and a sweep; forward and central
differences; float32, and bf16 autocast (against the exact product under the same
autocast and against the float32 one).

    python bench/fd_accuracy.py              # the table (about a minute on 2 CPU cores)
    python bench/fd_accuracy.py --quick      # smaller models, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import env_info  # noqa: E402
from sassha_fused import SASSHA  # noqa: E402
from sassha_fused.backends.eager import EagerBackend, hessian_sample_mean  # noqa: E402
from sassha_fused.backends.base import math_dtype  # noqa: E402
from sassha_fused.hvp import FD_EPS  # noqa: E402


class RecordH(EagerBackend):
    """The eager reference, recording the refresh's h of every param."""

    name = "record-h"

    def __init__(self) -> None:
        self.h: Optional[torch.Tensor] = None

    def update(self, b, x_t, grads, scalars, power, refresh):
        if refresh is not None:
            self.h = torch.cat([hessian_sample_mean(b, j, grads[j], refresh, math_dtype(p.dtype)).reshape(-1)
                                for j, p in enumerate(b.params)])
        super().update(b, x_t, grads, scalars, power, refresh)


# ---------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.f1, self.f2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.h)
        a = a.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf")).softmax(-1)
        x = x + self.o((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.f2(F.gelu(self.f1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab=32, d=64, seq=16, layers=2, heads=4):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.ln(self.blocks(self.emb(x) + self.pos[: x.shape[1]])))


def problems(quick: bool) -> Dict[str, tuple]:
    """name -> (model, inputs, targets, loss)."""
    g = torch.Generator().manual_seed(1)
    width = 32 if quick else 128
    ce = lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # noqa: E731
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                        nn.GELU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    tf = Transformer(d=32 if quick else 64, layers=1 if quick else 2)
    tokens = torch.randint(0, 32, (32, 16), generator=g)
    return {
        "MLP": (mlp, torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g), ce),
        "CNN": (cnn, torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g), ce),
        "transformer": (tf, tokens[:, :-1], tokens[:, 1:], ce),
    }


def pretrain(model: nn.Module, x, y, loss, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()


def refresh_h(model: nn.Module, closure_of: Callable, **options) -> torch.Tensor:
    """h of one refresh at the model's params (rho = 0, lr = 0: nothing moves)."""
    spy = RecordH()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = SASSHA(params, lr=0.0, rho=0.0, lazy_hessian=1, seed=7, backend=spy, **options)
    opt.step(closure_of(model))
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return spy.h


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pretrain", type=int, default=30, help="Adam steps before measuring")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sweep = [1e-4, 1e-3, 1e-2, 3e-2] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    results: Dict = {"env": env_info(torch.device("cpu")), "rows": []}
    print("| model | precision | scheme | fd_eps | error vs exact (same precision) | error vs exact fp32 |")
    print("|---|---|---|---|---:|---:|")
    for name, (model, x, y, loss) in problems(args.quick).items():
        pretrain(model, x, y, loss, args.pretrain)
        for precision in ("float32", "bf16 autocast"):
            autocast = precision != "float32"

            def closure_of(m, autocast=autocast):
                def closure():
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        out = m(x)
                    return loss(out.float(), y)
                return closure

            exact = refresh_h(model, closure_of, hvp="autograd")
            exact32 = exact if not autocast else refresh_h(model, lambda m: closure_of(m, False), hvp="autograd")
            for scheme in ("forward", "central"):
                default = FD_EPS[(scheme, 16 if autocast else 32)]
                for fd_eps in ["auto"] + sweep:
                    h = refresh_h(model, closure_of, hvp="finite_difference", fd_scheme=scheme, fd_eps=fd_eps)
                    row = {"model": name, "precision": precision, "scheme": scheme,
                           "fd_eps": fd_eps if fd_eps != "auto" else f"auto ({default:g})",
                           "error": rel(h, exact), "error_vs_fp32": rel(h, exact32)}
                    results["rows"].append(row)
                    bold = "**" if fd_eps == "auto" else ""
                    print(f"| {name} | {precision} | {scheme} | {bold}{row['fd_eps']}{bold} | "
                          f"{bold}{row['error']:.1e}{bold} | {row['error_vs_fp32']:.1e} |")
            if autocast:
                row = {"model": name, "precision": precision, "scheme": "autograd", "fd_eps": "-",
                       "error": 0.0, "error_vs_fp32": rel(exact, exact32)}
                results["rows"].append(row)
                print(f"| {name} | {precision} | autograd (double backward) | - | - | {row['error_vs_fp32']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
