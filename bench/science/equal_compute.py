"""Is SASSHA worth its passes? AdamW, SAM, SASSHA, M-SASSHA and SGD at equal compute (issue 24).

    python bench/science/equal_compute.py --tasks digits charlm     # the study, one process per task list
    python bench/science/equal_compute.py --tasks mnist1d            # (run in parallel; results merge in --out)
    python bench/science/equal_compute.py --sweep --tasks digits     # hyper-parameter sensitivity of SASSHA
    python bench/science/equal_compute.py --timing                   # cost per pass, interleaved rounds, no evaluation
    python bench/science/equal_compute.py --report                   # tables.md and PNGs from what ran
    python bench/science/equal_compute.py --quick --out DIR          # smoke test (CI): all of the above, tiny

Tasks, models, data splits, label noise, SAM and the plain wrapper come from
``sharpness_study.py`` (imported, not copied). Each optimizer gets two budgets:

* **equal forward/backward passes** ``P`` (per task). Passes are counted exactly, per step:
  every call of the loss closure is one forward/backward pass (AdamW and SGD 1, SAM 2,
  SASSHA 2, M-SASSHA 1, and each finite-difference Hessian probe 1 more); a Hessian refresh
  taken with autograd (a double backward through the second pass's graph) is counted as
  **2 passes** (its cost is about that of a forward plus a backward, and it also makes the
  pass before it build a graph). SASSHA with lazy_hessian=10 thus uses 2.2 passes a step,
  M-SASSHA 1.2, SAM 2, AdamW 1. A run stops at the first step where its count reaches P (it
  can overshoot by at most one step's passes; the exact count is reported).
* **equal time** ``T``: CPU seconds of the training thread (``time.thread_time``, torch runs
  on one thread), evaluation excluded. On a machine shared with other jobs this is far
  steadier than wall-clock and equals wall-clock on an unloaded core. ``T`` is what AdamW,
  the cheapest per pass, needs for ``P`` passes (measured by one calibration run per task),
  so at equal time each optimizer gets the passes it can afford in AdamW's time.

Protocol: each optimizer's lr is picked by the validation split (which carries the training
labels' noise) at the pass budget, with seed 0, from a grid of values a factor 3 apart that
starts at three values and is widened one value at a time on the side where the pick sits
until the pick is interior (at most ``--max-widen`` widenings; a pick still at an edge is
flagged). Seeds 1.. then run at that lr; the tuning run is seed 0 (the test split is never
used for choosing). The same lr serves both budgets; the lr the validation split would pick
at the time budget is recorded too. Label noise 0% and 40% on the classifiers; the language
model is clean only. Defaults: SASSHA/M-SASSHA at the package defaults except lr (rho 0.2,
lazy_hessian 10, hessian_power 0.5, one probe, no weight decay), SAM rho 0.05 over SGD with
momentum 0.9, SGD momentum 0.9, AdamW weight decay 0.

``--sweep``: SASSHA's sensitivity on each task's clean data, one hyper-parameter at a time
around (lr = the study's tuned SASSHA lr, rho 0.2, lazy_hessian 10, hessian_power 0.5), at
the same pass budget ``P``.

``--timing``: each optimizer's cost per pass measured apart from the study, in rounds that
take the optimizers in turn (so that other jobs' load falls on all alike): the median
training-thread CPU-ms per pass. The in-study ``T`` and seconds come from single runs on a
shared machine and are noisier than this.

Outputs in ``--out`` (default ``bench/science/results/equal_compute``): ``study_<task>.json``,
``sweep_<task>.json`` and ``timing_<task>.json`` (summaries: per run the numbers at both budgets and a 10-20 point
curve), ``tables.md``, ``curves_passes.png``, ``curves_seconds.png``, ``sweep.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # bench/, for common.env_info

import torch  # noqa: E402

import sharpness_study as ss  # noqa: E402
from sharpness_study import MSASSHA, SASSHA  # noqa: E402

OPTIMIZERS = ["adamw", "sam", "sassha", "msassha", "sgd"]
LABEL = {"adamw": "AdamW", "sam": "SAM", "sassha": "SASSHA", "msassha": "M-SASSHA", "sgd": "SGD"}
LR_CENTER = {"adamw": 1e-3, "sam": 0.03, "sassha": 0.05, "msassha": 0.05, "sgd": 0.03}
FACTOR = 3.0
SAM_RHO = 0.05
# pass budgets P: 60 AdamW epochs on digits and MNIST-1D (the sharpness study's budget), 1000 AdamW steps on the LM, 600 on the wide LM
PASSES = {"digits": 1350, "mnist1d": 3000, "charlm": 1000, "charlm128": 600}
EVALS = {"charlm128": 5}  # evaluation checkpoints per budget (the wide LM's evaluation is slow)
PASSES_QUICK = {"digits": 40, "mnist1d": 40, "charlm": 16, "charlm128": 16}
SWEEP = {"lr": [1 / 9, 1 / 3, 1.0, 3.0, 9.0],  # multiples of the tuned lr
         "rho": [0.0, 0.05, 0.2, 0.5],
         "lazy_hessian": [1, 3, 10, 30, 100],
         "hessian_power": [0.25, 0.5, 0.75, 1.0]}
SWEEP_QUICK = {"lr": [1 / 3, 1.0], "rho": [0.0, 0.2], "lazy_hessian": [1, 10], "hessian_power": [0.5, 1.0]}
DEFAULT_HP = {"rho": 0.2, "lazy_hessian": 10, "hessian_power": 0.5}


def make_optimizer(name: str, model: torch.nn.Module, lr: float, hp: Optional[Dict[str, float]] = None):
    hp = {**DEFAULT_HP, **(hp or {})}
    params = model.parameters()
    if name == "sgd":
        return ss.Plain(torch.optim.SGD(params, lr=lr, momentum=0.9))
    if name == "adamw":
        return ss.Plain(torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    if name == "sam":
        return ss.SAM(params, lr, rho=SAM_RHO)
    cls = {"sassha": SASSHA, "msassha": MSASSHA}[name]
    return cls(params, lr=lr, rho=hp["rho"], lazy_hessian=int(hp["lazy_hessian"]),
               hessian_power=hp["hessian_power"])


def r4(v: float) -> float:
    return float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v


def run(task: ss.Task, name: str, lr: float, seed: int, noise: float, P: int, T: float,
        hp: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """Train until both budgets are spent; evaluate at P/10 pass and T/10 second checkpoints (P/5, T/5: EVALS)."""
    train, val, test = ss.split(task, noise)
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_optimizer(name, model, lr, hp)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(x) / task.batch)
    calls = [0]
    batch: List[torch.Tensor] = []

    def closure():
        calls[0] += 1
        return ss.loss_on(model, *batch)

    passes, secs, wall, steps, dbl = 0, 0.0, 0.0, 0, 0
    n_ev = EVALS.get(task.name, 10)
    next_p, next_t, jp, jt = P / n_ev, T / n_ev, 0, 0
    curve: List[Dict[str, object]] = []
    at: Dict[str, Optional[Dict[str, object]]] = {"passes": None, "time": None if math.isfinite(T) else {}}
    diverged = False
    while at["passes"] is None or at["time"] is None:
        if steps % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        idx = order[(steps % per_epoch) * task.batch:(steps % per_epoch + 1) * task.batch]
        batch[:] = [x[idx], y[idx]]
        due = isinstance(opt, (SASSHA, MSASSHA)) and opt.refresh_due
        calls[0] = 0
        w0, t0 = time.perf_counter(), time.thread_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = float(opt.step(closure))
        except FloatingPointError:
            loss = float("nan")
        secs += time.thread_time() - t0
        wall += time.perf_counter() - w0
        extra = 2 if due and opt.hvp_method == "autograd" else 0
        dbl += extra // 2
        passes += calls[0] + extra
        steps += 1
        if not math.isfinite(loss) or steps > 20 * P:
            diverged = True
            break
        if passes >= next_p or secs >= next_t:
            vl, va = ss.evaluate(model, task, *val, opt=opt)
            tl, ta = ss.evaluate(model, task, *test, opt=opt)
            point = {"steps": steps, "passes": passes, "secs": round(secs, 3), "val_loss": r4(vl), "val_acc": r4(va),
                     "test_loss": r4(tl), "test_acc": r4(ta)}
            if passes >= next_p:
                jp += 1
                point["jp"] = jp
                while passes >= next_p:
                    next_p += P / n_ev
            if secs >= next_t:
                jt += 1
                point["jt"] = jt
                while secs >= next_t:
                    next_t += T / n_ev
            if not all(math.isfinite(v) for v in (vl, tl)):
                diverged = True
                break
            curve.append(point)
            if at["passes"] is None and passes >= P:
                at["passes"] = point
            if at["time"] is None and secs >= T:
                at["time"] = point
    return {"optimizer": name, "lr": lr, "seed": seed, "noise": noise, "hp": hp or {}, "diverged": diverged,
            "steps": steps, "passes": passes, "double_backwards": dbl, "secs": round(secs, 3),
            "wall_s": round(wall, 3), "secs_per_pass": r4(secs / max(passes, 1)),
            "at_passes": at["passes"], "at_time": at["time"], "curve": curve}


def score(r: Dict[str, object], task: ss.Task, budget: str = "passes") -> Tuple[float, float]:
    """Higher is better: (validation accuracy, -validation loss) or (-validation loss,) for the LM."""
    p = r.get(f"at_{budget}")
    if r["diverged"] or p is None:
        return (-math.inf, -math.inf)
    if task.kind == "classify":
        return (float(p["val_acc"]), -float(p["val_loss"]))
    return (-float(p["val_loss"]), 0.0)


def widen(task, name, noise, P, T, grid, max_widen, hp=None):
    """Seed-0 runs over ``grid``, widened by a factor 3 on the side of the pick until it is interior."""
    runs = {lr: run(task, name, lr, 0, noise, P, T, hp) for lr in grid}
    widened = 0
    while True:
        lrs = sorted(runs)
        best = max(lrs, key=lambda lr: score(runs[lr], task))
        at_edge = best in (lrs[0], lrs[-1])
        if not at_edge or widened >= max_widen:
            return runs, best, at_edge, widened
        new = lrs[0] / FACTOR if best == lrs[0] else lrs[-1] * FACTOR
        runs[new] = run(task, name, new, 0, noise, P, T, hp)
        widened += 1


def tune(task, name, noise, P, T, quick, max_widen, log) -> Dict[str, object]:
    c = LR_CENTER[name]
    grid = [c, c * FACTOR] if quick else [c / FACTOR, c, c * FACTOR]
    runs, best, at_edge, widened = widen(task, name, noise, P, T, grid, max_widen)
    lrs = sorted(runs)
    best_t = max(lrs, key=lambda lr: score(runs[lr], task, "time"))
    log(f"{task.name} noise {noise:.0%} {name:8s} lr grid {[f'{v:.3g}' for v in lrs]} -> {best:.3g}"
        f"{' (AT EDGE)' if at_edge else ''}; val " + ", ".join(f"{score(runs[v], task)[0]:.4f}" for v in lrs))
    return {"lr": best, "lr_time_pick": best_t, "grid": lrs, "at_edge": at_edge, "widened": widened,
            "val": [r4(score(runs[v], task)[0]) for v in lrs], "val_time": [r4(score(runs[v], task, "time")[0]) for v in lrs],
            "seed0": runs[best]}


def calibrate(task: ss.Task, P: int, log) -> float:
    """T: the training-thread seconds AdamW takes for P passes (one run, clean labels, centre lr)."""
    r = run(task, "adamw", LR_CENTER["adamw"], 0, 0.0, P, math.inf)
    log(f"{task.name}: AdamW takes {r['secs']:.2f} CPU-s for {r['passes']} passes -> T = that")
    return float(r["secs"]) * P / r["passes"]


def charlm128_task(quick: bool) -> ss.Task:
    """The study's char LM, 128 wide instead of 48 (about 7x the parameters), same text."""
    return dataclasses.replace(ss.charlm_task(quick), name="charlm128", make_model=lambda: ss.CharLM(d=128, heads=4))


TASKS = {"digits": ss.digits_task, "mnist1d": ss.mnist1d_task, "charlm": ss.charlm_task, "charlm128": charlm128_task}


def make_tasks(names: List[str], quick: bool) -> Dict[str, ss.Task]:
    tasks = {n: TASKS[n](quick) for n in names}
    if quick:  # smoke test: a short held-out text (half validation, half test) keeps evaluation cheap
        tasks = {n: (dataclasses.replace(t, x_test=t.x_test[:128], y_test=t.y_test[:128]) if t.kind == "lm" else t)
                 for n, t in tasks.items()}
    return tasks


def study(task, args, log) -> Dict[str, object]:
    P = (PASSES_QUICK if args.quick else PASSES)[task.name]
    T = calibrate(task, P, log)
    noises = [0.0] if task.kind == "lm" else ([0.4] if args.quick else [0.0, 0.4])
    out: Dict[str, object] = {"task": task.name, "kind": task.kind, "P": P, "T": round(T, 3), "combos": {}}
    for noise in noises:
        for name in args.optimizers:
            t = tune(task, name, noise, P, T, args.quick, args.max_widen, log)
            runs = [t.pop("seed0")]
            for seed in range(1, args.seeds):
                runs.append(run(task, name, t["lr"], seed, noise, P, T))
            key = "test_acc" if task.kind == "classify" else "test_loss"
            log(f"  {name}: at P " + ", ".join(f"{(r['at_passes'] or {}).get(key, float('nan')):.4f}" for r in runs)
                + "; at T " + ", ".join(f"{(r['at_time'] or {}).get(key, float('nan')):.4f}" for r in runs))
            out["combos"][f"{noise}/{name}"] = {**t, "runs": runs}
    return out


def sweep(task, args, log) -> Dict[str, object]:
    P = (PASSES_QUICK if args.quick else PASSES)[task.name]
    sfile = os.path.join(args.out, f"study_{task.name}.json")
    base_lr, adamw_lr = 0.15, None
    if os.path.exists(sfile):
        with open(sfile) as f:
            s = json.load(f)
        noise = "0.0" if "0.0/sassha" in s["combos"] else min(k.split("/")[0] for k in s["combos"])
        base_lr = s["combos"][f"{noise}/sassha"]["lr"]
        adamw_lr = s["combos"].get(f"{noise}/adamw", {}).get("lr")
        T = s["T"]
    else:
        T = calibrate(task, P, log)
    grid = SWEEP_QUICK if args.quick else SWEEP
    seeds = 1 if args.quick else args.sweep_seeds
    res: Dict[str, object] = {"task": task.name, "kind": task.kind, "P": P, "base_lr": base_lr, "adamw_lr": adamw_lr, "sweeps": {}}
    cache: Dict[str, List[Dict[str, object]]] = {}
    for param, values in grid.items():
        rows = []
        for v in values:
            hp = dict(DEFAULT_HP)
            lr = base_lr
            if param == "lr":
                lr = base_lr * v
            else:
                hp[param] = v
            key = json.dumps([lr, hp], sort_keys=True)
            if key not in cache:
                cache[key] = [run(task, "sassha", lr, seed, 0.0, P, T, hp) for seed in range(seeds)]
                for r in cache[key]:
                    r.pop("curve")
            runs = cache[key]
            value = lr if param == "lr" else v
            rows.append({"value": value, "runs": runs})
            log(f"{task.name} sweep {param} = {value:.4g}: " + ", ".join(
                f"val {score(r, task)[0]:.4f}" for r in runs) + f", {runs[0]['steps']} steps")
        res["sweeps"][param] = rows
    # hessian_power moves the step size (D^-p), so each power also gets its own tuned lr (seed 0)
    res["power_tuned"] = []
    for power in ([1.0] if args.quick else [0.25, 0.5, 0.75, 1.0]):
        hp = {**DEFAULT_HP, "hessian_power": power}
        grid = [base_lr] if args.quick else [base_lr / FACTOR, base_lr, base_lr * FACTOR]
        runs, best, at_edge, _ = widen(task, "sassha", 0.0, P, T, grid, 0 if args.quick else 4, hp)
        for r in runs.values():
            r.pop("curve")
        lrs = sorted(runs)
        res["power_tuned"].append({"hessian_power": power, "lr": best, "at_edge": at_edge, "grid": lrs,
                                   "val": [r4(score(runs[v], task)[0]) for v in lrs], "best": runs[best]})
        log(f"{task.name} hessian_power {power}: tuned lr {best:.3g}{' (EDGE)' if at_edge else ''}, "
            f"val {score(runs[best], task)[0]:.4f}")
    return res


def timing(task, args, log) -> Dict[str, object]:
    """Cost per pass, measured apart from the study: rounds that take the optimizers in turn
    (so that load from other jobs falls on all of them alike), each a fresh model trained for a
    fixed number of passes without evaluation; the median over rounds of training-thread
    CPU-seconds per pass (and wall seconds per pass)."""
    n = (PASSES_QUICK if args.quick else {"digits": 300, "mnist1d": 300, "charlm": 200, "charlm128": 100})[task.name]
    rounds = 1 if args.quick else args.timing_rounds
    x, y = task.x, task.y
    per: Dict[str, Dict[str, List[float]]] = {o: {"cpu": [], "wall": [], "passes_per_step": []} for o in args.optimizers}
    for rnd in range(rounds):
        for name in args.optimizers:
            torch.manual_seed(rnd)
            model = task.make_model()
            opt = make_optimizer(name, model, LR_CENTER[name] / 10)
            calls, passes, steps, cpu, wall = [0], 0, 0, 0.0, 0.0
            while passes < n:
                i = (steps * task.batch) % (len(x) - task.batch)
                xb, yb = x[i:i + task.batch], y[i:i + task.batch]

                def closure():
                    calls[0] += 1
                    return ss.loss_on(model, xb, yb)

                due = isinstance(opt, (SASSHA, MSASSHA)) and opt.refresh_due
                calls[0] = 0
                w0, t0 = time.perf_counter(), time.thread_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    float(opt.step(closure))
                cpu += time.thread_time() - t0
                wall += time.perf_counter() - w0
                passes += calls[0] + (2 if due and opt.hvp_method == "autograd" else 0)
                steps += 1
            per[name]["cpu"].append(cpu / passes)
            per[name]["wall"].append(wall / passes)
            per[name]["passes_per_step"].append(passes / steps)
    out = {"task": task.name, "passes_per_round": n, "rounds": rounds, "optimizers": {}}
    for name, v in per.items():
        out["optimizers"][name] = {"cpu_ms_per_pass": r4(1e3 * statistics.median(v["cpu"])),
                                   "cpu_ms_spread": [r4(1e3 * min(v["cpu"])), r4(1e3 * max(v["cpu"]))],
                                   "wall_ms_per_pass": r4(1e3 * statistics.median(v["wall"])),
                                   "passes_per_step": r4(statistics.median(v["passes_per_step"]))}
        log(f"{task.name} {name}: {out['optimizers'][name]}")
    return out


# ---------------------------------------------------------------------------- report
def mean_sd(values) -> Tuple[float, float]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric(task_kind: str) -> Tuple[str, str, bool]:
    return ("test_acc", "test acc", True) if task_kind == "classify" else ("test_loss", "test loss", False)


def at(r, budget, key):
    p = r.get(f"at_{budget}")
    return None if (r["diverged"] or p is None) else p.get(key)


def verdict(s: Dict[str, object], noise: float, budget: str) -> str:
    key, _, higher = metric(s["kind"])
    stats = {}
    for k, c in s["combos"].items():
        n, name = k.split("/")
        if float(n) == noise:
            stats[name] = mean_sd([at(r, budget, key) for r in c["runs"]])
    if "sassha" not in stats:
        return ""
    sign = 1 if higher else -1
    others = {n: v for n, v in stats.items() if n != "sassha" and math.isfinite(v[0])}
    if not others:
        return ""
    best = max(others, key=lambda n: sign * others[n][0])
    (m, sd), (mo, so) = stats["sassha"], others[best]
    gap = sign * (m - mo)
    noise_band = max(sd, so)
    scale = 100 if higher else 1
    unit = " points" if higher else ""
    if gap > noise_band:
        word = f"SASSHA wins by {gap * scale:.2f}{unit} over {LABEL[best]} (beyond one seed sd, {noise_band * scale:.2f})"
    elif gap < -noise_band:
        word = f"SASSHA loses by {-gap * scale:.2f}{unit} to {LABEL[best]} (beyond one seed sd, {noise_band * scale:.2f})"
    else:
        word = f"SASSHA and {LABEL[best]} are within one seed sd ({gap * scale:+.2f}{unit}, sd {noise_band * scale:.2f})"
    return word


def tables(studies: Dict[str, Dict[str, object]], sweeps: Dict[str, Dict[str, object]],
           timings: Optional[Dict[str, Dict[str, object]]] = None) -> str:
    lines: List[str] = []
    for tname, s in studies.items():
        key, label, higher = metric(s["kind"])
        scale = 100 if higher else 1
        lines += [f"### {tname}: P = {s['P']} passes, T = {s['T']:.2f} CPU-s (AdamW's time for P)", "",
                  f"| noise | optimizer | lr (grid) | steps at P | {label} at P | CPU-s/pass | passes at T | "
                  f"{label} at T | lr pick at T |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for k, c in s["combos"].items():
            n, name = k.split("/")
            runs = c["runs"]
            div = sum(bool(r["diverged"]) for r in runs)
            mp = mean_sd([at(r, "passes", key) for r in runs])
            mt = mean_sd([at(r, "time", key) for r in runs])
            steps_p = mean_sd([at(r, "passes", "steps") for r in runs])[0]
            passes_t = mean_sd([at(r, "time", "passes") for r in runs])[0]
            spp = mean_sd([r["secs_per_pass"] for r in runs])[0]
            grid = f"{c['lr']:.3g} ({c['grid'][0]:.3g}–{c['grid'][-1]:.3g}{', EDGE' if c['at_edge'] else ''})"
            d = 4 if higher else 3
            fmt = (lambda ms: f"{ms[0] * scale:.{d - 2 if higher else d}f} ± {ms[1] * scale:.{d - 2 if higher else d}f}"
                   if math.isfinite(ms[0]) else "–")
            lines.append(f"| {float(n):.0%} | {LABEL[name]}{f' ({div} diverged)' if div else ''} | {grid} | "
                         f"{steps_p:.0f} | {fmt(mp)} | {spp * 1e3:.2f} ms | {passes_t:.0f} | {fmt(mt)} | "
                         f"{c['lr_time_pick']:.3g} |")
        lines.append("")
        for n in sorted({float(k.split('/')[0]) for k in s["combos"]}):
            for budget in ("passes", "time"):
                v = verdict(s, n, budget)
                if v:
                    lines.append(f"- noise {n:.0%}, equal {budget}: {v}.")
        lines.append("")
    if studies:
        cols = [(t, k.split("/")[0]) for t, s in studies.items() for k in s["combos"]]
        cols = list(dict.fromkeys(cols))
        lines += ["### lr picks (validation, pass budget)", "",
                  "| optimizer | " + " | ".join(f"{t} {float(n):.0%}" for t, n in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for name in OPTIMIZERS:
            cells = []
            for t, n in cols:
                c = studies[t]["combos"].get(f"{n}/{name}")
                cells.append("–" if c is None else f"{c['lr']:.3g}{' (edge)' if c['at_edge'] else ''}")
            lines.append(f"| {LABEL[name]} | " + " | ".join(cells) + " |")
        ratio = []
        for t, n in cols:
            a, b = studies[t]["combos"].get(f"{n}/sassha"), studies[t]["combos"].get(f"{n}/adamw")
            ratio.append("–" if not (a and b) else f"{a['lr'] / b['lr']:.3g}")
        lines += ["| SASSHA lr / AdamW lr | " + " | ".join(ratio) + " |", ""]
    if timings:
        lines += ["### cost per pass, measured apart (median of interleaved rounds, training-thread CPU-ms)", "",
                  "| task | " + " | ".join(LABEL[o] for o in OPTIMIZERS) + " |", "|---|" + "---:|" * len(OPTIMIZERS)]
        for t, tm in timings.items():
            o = tm["optimizers"]
            base = o.get("adamw", {}).get("cpu_ms_per_pass")
            cells = []
            for name in OPTIMIZERS:
                if name not in o:
                    cells.append("–")
                    continue
                c = o[name]
                rel = f", {c['cpu_ms_per_pass'] / base:.2f}x AdamW" if base else ""
                cells.append(f"{c['cpu_ms_per_pass']:.3g} ({c['passes_per_step']:.3g} passes/step{rel})")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    for tname, sw in sweeps.items():
        lines += [f"### sweep {tname}: SASSHA, clean, P = {sw['P']} passes, base lr {sw['base_lr']:.3g}"
                  + (f" (AdamW's tuned lr {sw['adamw_lr']:.3g})" if sw.get("adamw_lr") else ""), "",
                  "| hyper-parameter | value | steps | val (mean ± sd) | test (mean ± sd) |", "|---|---:|---:|---:|---:|"]
        kind = sw.get("kind", "classify")
        key, _, higher = metric(kind)
        vkey = "val_acc" if higher else "val_loss"
        for param, rows in sw["sweeps"].items():
            for row in rows:
                v = mean_sd([at(r, "passes", vkey) for r in row["runs"]])
                t = mean_sd([at(r, "passes", key) for r in row["runs"]])
                steps = at(row["runs"][0], "passes", "steps") or row["runs"][0]["steps"]
                div = sum(bool(r["diverged"]) for r in row["runs"])
                lines.append(f"| {param} | {row['value']:.4g}{' (diverged %d)' % div if div else ''} | {steps} | "
                             f"{v[0]:.4f} ± {v[1]:.4f} | {t[0]:.4f} ± {t[1]:.4f} |")
        for pt in sw.get("power_tuned", []):
            b = pt["best"]
            lines.append(f"| hessian_power {pt['hessian_power']:g}, own lr {pt['lr']:.3g}"
                         f"{' (edge)' if pt['at_edge'] else ''} (grid {pt['grid'][0]:.3g}–{pt['grid'][-1]:.3g}, seed 0) | "
                         f"{pt['hessian_power']:g} | {at(b, 'passes', 'steps') or b['steps']} | {at(b, 'passes', vkey) or float('nan'):.4f} | "
                         f"{at(b, 'passes', key) or float('nan'):.4f} |")
        lines.append("")
    return "\n".join(lines)


def figures(studies, sweeps, out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    panels = [(t, k.split("/")[0]) for t, s in studies.items() for k in s["combos"]]
    panels = list(dict.fromkeys(panels))
    for axis, tag, xlabel in (("passes", "jp", "forward/backward passes"), ("secs", "jt", "training CPU-seconds")):
        if not panels:
            break
        ncol = min(3, len(panels))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.6 * nrow), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (tname, n) in zip(axes.flat, panels):
            s = studies[tname]
            key, label, _ = metric(s["kind"])
            for name in OPTIMIZERS:
                c = s["combos"].get(f"{n}/{name}")
                if not c:
                    continue
                xs, ys, es = [], [], []
                for j in range(1, 21):
                    pts = [p for r in c["runs"] if not r["diverged"] for p in r["curve"] if p.get(tag) == j]
                    if pts:
                        xs.append(statistics.mean(p[axis] for p in pts))
                        m, sd = mean_sd([p[key] for p in pts])
                        ys.append(m)
                        es.append(sd)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=LABEL[name])
            if axis == "passes":
                ax.axvline(s["P"], color="gray", ls=":", lw=1)
            else:
                ax.axvline(s["T"], color="gray", ls=":", lw=1)
            ax.set(title=f"{tname}, noise {float(n):.0%}", xlabel=xlabel, ylabel=label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, f"curves_{'passes' if axis == 'passes' else 'seconds'}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if sweeps:
        params = list(SWEEP)
        fig, axes = plt.subplots(len(sweeps), len(params), figsize=(3.6 * len(params), 3.0 * len(sweeps)),
                                 squeeze=False)
        for row, (tname, sw) in zip(axes, sweeps.items()):
            higher = sw.get("kind", "classify") == "classify"
            vkey, key = ("val_acc", "test_acc") if higher else ("val_loss", "test_loss")
            for ax, param in zip(row, params):
                rows = sw["sweeps"].get(param, [])
                for k, style in ((vkey, "o-"), (key, "s--")):
                    ms = [mean_sd([at(r, "passes", k) for r in rw["runs"]]) for rw in rows]
                    ax.errorbar([rw["value"] for rw in rows], [m for m, _ in ms], yerr=[s for _, s in ms], fmt=style,
                                capsize=2, ms=3, label=k.replace("_", " "))
                if param == "hessian_power" and sw.get("power_tuned"):
                    pts = [(pt["hessian_power"], at(pt["best"], "passes", key)) for pt in sw["power_tuned"]]
                    ax.plot([p for p, v in pts if v is not None], [v for p, v in pts if v is not None], "g*", ms=8,
                            label="test, own lr (seed 0)")
                    ax.legend(fontsize=7)
                if param in ("lr", "lazy_hessian"):
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set(title=f"{tname}: SASSHA {param}" + (" (diverged: omitted)" if param == "lr" else ""),
                       xlabel=param)
                ax.grid(alpha=0.3)
            row[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, "sweep.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def report(out: str, log) -> None:
    studies, sweeps, timings = {}, {}, {}
    for order in TASKS:
        for kind, store in (("study", studies), ("sweep", sweeps), ("timing", timings)):
            p = os.path.join(out, f"{kind}_{order}.json")
            if os.path.exists(p):
                with open(p) as f:
                    store[order] = json.load(f)
    md = tables(studies, sweeps, timings)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(md)
    paths = figures(studies, sweeps, out)
    print(md)
    log(f"wrote {out}/tables.md, " + ", ".join(os.path.basename(p) for p in paths))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, 1 seed, all modes, then --report")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sweep-seeds", type=int, default=2)
    ap.add_argument("--max-widen", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="the hyper-parameter sweep instead of the study")
    ap.add_argument("--timing", action="store_true", help="measure each optimizer's cost per pass, interleaved")
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--report", action="store_true", help="only write tables.md and figures from --out")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "equal_compute"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # one thread: thread CPU time is then the whole cost of a step
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    if not args.report:
        from common import env_info  # bench/common.py

        env = env_info(torch.device("cpu"))
        if args.quick:
            args.seeds, args.max_widen = 1, 0
        tasks = make_tasks(args.tasks, args.quick)
        modes = (["study", "sweep", "timing"] if args.quick else
                 ["sweep"] if args.sweep else ["timing"] if args.timing else ["study"])
        for tname, task in tasks.items():
            for mode in modes:
                t0 = time.perf_counter()
                res = {"study": study, "sweep": sweep, "timing": timing}[mode](task, args, log)
                res.update(env=env, quick=args.quick, seeds=args.seeds, wall_s=round(time.perf_counter() - t0, 1),
                           command=" ".join(sys.argv))
                with open(os.path.join(args.out, f"{mode}_{tname}.json"), "w") as f:
                    json.dump(res, f, default=float)
                log(f"{tname} {mode} done in {res['wall_s']:.0f}s")
    if args.report or args.quick:
        report(args.out, log)


if __name__ == "__main__":
    main()
