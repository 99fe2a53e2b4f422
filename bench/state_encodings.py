"""Which 8-bit encoding of m and D: the error each candidate puts into SASSHA's step.

Trains the demo task (digits MLP) with float32 state and, every 50 steps, encodes the
real ``exp_avg`` (m) and ``exp_hessian_diag`` (D) with each candidate (groups of 32,
one float32 scale each), and measures what reaches the update,

    step = m / (D^0.5 / c2 + eps)     (the default hessian_power 0.5),

against the float32 step: the relative error of the whole step (norm), the worst
element relative to its group's largest step, and the fraction of elements whose
step grows more than 2x (where a D entry was rounded down towards zero). Candidates
for m: linear, softsign-companded (FlashOptim's) and square-root-companded signed codes;
for D: linear, sqrt-companded (with and without the rule that a positive entry keeps
code >= 1), and
log-companded codes over 2^-32 of the group's largest (which needs exp/log, whose
last bits differ between math libraries: listed for comparison).

    python bench/state_encodings.py          # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sassha_fused import SASSHA  # noqa: E402
from sassha_fused import encoding  # noqa: E402
from sassha_fused.demo import load_digits, make_model  # noqa: E402

G = encoding.GROUP


def grouped(v: torch.Tensor) -> torch.Tensor:
    return encoding._grouped(v)


def back(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return encoding._ungrouped(v, like)


def m_linear(m: torch.Tensor) -> torch.Tensor:
    v = grouped(m)
    s = v.abs().amax(1, keepdim=True).clamp_min(1e-38)
    return back(torch.round(v / s * 127) / 127 * s, m)


def m_softsign(m: torch.Tensor) -> torch.Tensor:
    v = grouped(m)
    s = v.abs().amax(1, keepdim=True).clamp_min(1e-38)
    u = v / s
    c = torch.round(2 * u / (1 + u.abs()) * 127) / 127
    return back(c / (2 - c.abs()) * s, m)


def m_sqrt(m: torch.Tensor) -> torch.Tensor:
    return encoding.decode_momentum(*encoding.encode_momentum(m))


def d_linear(d: torch.Tensor) -> torch.Tensor:
    v = grouped(d)
    s = v.amax(1, keepdim=True).clamp_min(1e-38)
    return back(torch.round(v / s * 255) / 255 * s, d)


def d_sqrt_no_floor(d: torch.Tensor) -> torch.Tensor:
    v = grouped(d)
    s = v.amax(1, keepdim=True).clamp_min(1e-38)
    c = torch.round(torch.sqrt(v / s) * 255) / 255
    return back(c * c * s, d)


def d_sqrt(d: torch.Tensor) -> torch.Tensor:
    return encoding.decode_hessian(*encoding.encode_hessian(d))


def d_log(d: torch.Tensor) -> torch.Tensor:
    v = grouped(d)
    s = v.amax(1, keepdim=True).clamp_min(1e-38)
    span = 32.0  # 2^-32 .. 1 of the group's largest in 255 steps; code 0 is zero
    e = torch.log2((v / s).clamp_min(2.0 ** -span))
    q = torch.round((e + span) / span * 254) + 1
    out = torch.where(v > 0, s * torch.exp2(q.sub(1) / 254 * span - span), torch.zeros_like(v))
    return back(out, d)


M_CANDIDATES: Dict[str, Callable] = {"linear int8": m_linear, "softsign int8": m_softsign,
                                     "sqrt int8 (chosen)": m_sqrt}
D_CANDIDATES: Dict[str, Callable] = {"linear uint8": d_linear, "sqrt uint8, no floor": d_sqrt_no_floor,
                                     "sqrt uint8, code >= 1 (chosen)": d_sqrt, "log2 uint8 (not portable)": d_log,
                                     "bfloat16": lambda d: d.to(torch.bfloat16).float()}


def snapshots(steps: int, every: int) -> List[List[Dict[str, torch.Tensor]]]:
    (xtr, ytr), _ = load_digits(torch.device("cpu"), seed=0)
    model = make_model(0, 128, torch.device("cpu"))
    opt = SASSHA(model.parameters(), lr=0.05, rho=0.05, weight_decay=1e-3, lazy_hessian=10, backend="foreach")
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        opt.step(lambda: F.cross_entropy(model(xtr[idx]), ytr[idx]))
        if t % every == 0:
            out.append([{"m": opt.state[p]["exp_avg"].clone(), "d": opt.state[p]["exp_hessian_diag"].clone(),
                         "c2": float(opt.state[p]["bias_correction2"]), "eps": opt.param_groups[0]["eps"]}
                        for p in model.parameters()])
    return out


def step_of(m: torch.Tensor, d: torch.Tensor, c2: float, eps: float) -> torch.Tensor:
    return m / (d.sqrt() / c2 + eps)


def errors(snaps, m_enc: Callable, d_enc: Callable) -> Dict[str, float]:
    rel, worst, grown = [], 0.0, [0, 0]
    for snap in snaps:
        exact = torch.cat([step_of(s["m"], s["d"], s["c2"], s["eps"]).reshape(-1) for s in snap])
        approx = torch.cat([step_of(m_enc(s["m"]), d_enc(s["d"]), s["c2"], s["eps"]).reshape(-1) for s in snap])
        rel.append(float((approx - exact).norm() / exact.norm()))
        scale = torch.cat([grouped(step_of(s["m"], s["d"], s["c2"], s["eps"])).abs().amax(1, keepdim=True)
                           .expand(-1, G).reshape(-1)[:s["m"].numel()] for s in snap]).clamp_min(1e-30)
        worst = max(worst, float(((approx - exact).abs() / scale).max()))
        grown[0] += int(((approx.abs() > 2 * exact.abs()) & (exact != 0)).sum())
        grown[1] += exact.numel()
    return {"step_rel_error": sum(rel) / len(rel), "worst_vs_group_max": worst, "grown_2x": grown[0] / grown[1]}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    snaps = snapshots(args.steps, 50)
    rows = []
    print("| m encoding | D encoding | step error (norm, relative) | worst element / group's largest step "
          "| elements whose step grows > 2x |")
    print("|---|---|---|---|---|")
    exact = lambda v: v  # noqa: E731
    cases = [("float32", "float32", exact, exact)]
    cases += [(name, "float32", fn, exact) for name, fn in M_CANDIDATES.items()]
    cases += [("float32", name, exact, fn) for name, fn in D_CANDIDATES.items()]
    cases += [("softsign int8", "sqrt uint8, code >= 1 (chosen)", m_softsign, d_sqrt)]
    cases += [("sqrt int8 (chosen)", "sqrt uint8, code >= 1 (chosen)", m_sqrt, d_sqrt)]
    for m_name, d_name, m_enc, d_enc in cases:
        e = errors(snaps, m_enc, d_enc)
        rows.append({"m": m_name, "D": d_name, **e})
        print(f"| {m_name} | {d_name} | {e['step_rel_error']:.2e} | {e['worst_vs_group_max']:.2e} | "
              f"{e['grown_2x']:.2e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
