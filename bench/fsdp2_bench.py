"""FSDP2 on two gloo ranks: SASSHA against AdamW, per-rank memory and communication.

    python bench/fsdp2_bench.py --steps 20 --out bench/results/fsdp2-cpu.json

Trains the example's character transformer (``examples/fsdp2_transformer.py``),
sharded with ``fully_shard``, on two CPU processes, once with ``torch.optim.AdamW``
and once with SASSHA (finite-difference Hessian refresh every ``k = 10`` steps), and
reports per optimizer:

* ``step_s``: mean wall time of a training step (forward, backward, optimizer), after
  warm-up steps; SASSHA takes 2 passes per step and a third on refresh steps.
* ``state_bytes_rank`` / ``state_bytes_whole``: optimizer state on rank 0 against the
  state of the unsharded model (the goal is 1/world).
* ``comm``: bytes and calls per step by collective, counted by wrapping
  ``torch.distributed``'s all_gather_single / reduce_scatter_single / all_reduce:
  FSDP2's parameter all-gathers and gradient reduce-scatters, and the optimizer's
  scalar all-reduces. ``ideal_bytes``: passes per step times AdamW's bytes per step
  (one pass), i.e. FSDP's traffic for SASSHA's passes and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import env_info  # noqa: E402

COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_reduce")


class CommCounter:
    """Bytes and calls per collective, by wrapping the torch.distributed functions FSDP2 calls."""

    def __init__(self) -> None:
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        self._saved = {}

    def __enter__(self) -> "CommCounter":
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(dist, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                tensor = args[0] if args else next(iter(kwargs.values()))
                self.bytes[_name] += tensor.numel() * tensor.element_size()
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def run_one(kind: str, args, rank: int, world: int) -> Dict[str, object]:
    from fsdp2_transformer import build, text

    from sassha_fused import SASSHA

    model = build(args, torch.device("cpu"))
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    else:
        opt = SASSHA(model.parameters(), lr=args.lr, rho=0.02, weight_decay=1e-2, lazy_hessian=10)
    data = text()
    gen = torch.Generator().manual_seed(1)

    def batch():
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        mine = starts[rank * args.batch // world:(rank + 1) * args.batch // world]
        chunk = torch.stack([data[s:s + args.seq + 1] for s in mine])
        return chunk[:, :-1], chunk[:, 1:]

    def step():
        x, y = batch()
        if kind == "adamw":
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y.reshape(-1))
            loss.backward()
            opt.step()
        else:
            opt.step(lambda: F.cross_entropy(model(x), y.reshape(-1)))

    with CommCounter() as comm:
        for _ in range(args.warmup):
            step()
        comm.reset()
        times = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        comm_bytes = {k: v / args.steps for k, v in comm.bytes.items()}
        comm_calls = {k: v / args.steps for k, v in comm.calls.items()}
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    rank_bytes = sum(t.to_local().numel() * t.element_size() for t in state)
    whole_bytes = sum(t.numel() * t.element_size() for t in state)
    return {"step_s": statistics.mean(times), "step_s_median": statistics.median(times),
            "state_bytes_rank": rank_bytes, "state_bytes_whole": whole_bytes,
            "comm_bytes": comm_bytes, "comm_calls": comm_calls}


def worker(rank: int, world: int, init_file: str, out: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        results = {kind: run_one(kind, args, rank, world) for kind in ("adamw", "sassha")}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        dist.barrier()  # leave together: tearing down gloo mid-collective aborts the other rank
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps (k = 10: two refreshes in 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    args = ap.parse_args()
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), out, args), nprocs=world, join=True)
        with open(out) as f:
            results = json.load(f)
    adamw, sassha = results["adamw"], results["sassha"]
    # SASSHA's passes per timed step: two, and a third on refresh steps (1, 11, 21, ...)
    timed = range(args.warmup + 1, args.warmup + args.steps + 1)
    passes = 2 + sum((t - 1) % 10 == 0 for t in timed) / args.steps
    fsdp = ("all_gather_single", "reduce_scatter_single")
    adamw_fsdp = sum(adamw["comm_bytes"].get(k, 0) for k in fsdp)
    summary = {
        "env": env_info(torch.device("cpu")),
        "world": world,
        "model": {k: getattr(args, k) for k in ("width", "layers", "heads", "seq", "batch")},
        "steps": args.steps,
        "sassha_passes_per_step": passes,
        "results": results,
        "sassha_over_adamw_step_time": sassha["step_s"] / adamw["step_s"],
        "state_fraction_rank0": {k: r["state_bytes_rank"] / r["state_bytes_whole"] for k, r in results.items()},
        "sassha_comm_bytes_per_step": sum(sassha["comm_bytes"].values()),
        "ideal_comm_bytes_per_step": passes * adamw_fsdp,
    }
    summary["comm_over_ideal"] = summary["sassha_comm_bytes_per_step"] / summary["ideal_comm_bytes_per_step"]
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    for kind, r in results.items():
        calls = ", ".join(f"{k} {v:g}" for k, v in sorted(r["comm_calls"].items()))
        print(f"{kind:7s} step {r['step_s'] * 1e3:8.1f} ms  state on rank 0 {r['state_bytes_rank'] / 2**20:.2f} "
              f"of {r['state_bytes_whole'] / 2**20:.2f} MiB  comm {sum(r['comm_bytes'].values()) / 2**20:.2f} "
              f"MiB/step  calls/step: {calls}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
