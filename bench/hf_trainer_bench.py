"""SasshaTrainer against transformers.Trainer with AdamW: time per Trainer step.

    python bench/hf_trainer_bench.py --steps 30 --out bench/results/hf-trainer-cpu.json

Trains a GPT-2 built from a config (no download; default attention implementation)
with the same ``TrainingArguments`` twice: ``transformers.Trainer`` with
``torch.optim.AdamW``, and ``SasshaTrainer`` with SASSHA (finite-difference Hessian
refresh every ``k`` steps). Reports the mean wall time per Trainer step after warm-up
(from the Trainer's own callback events) and the ratio. SASSHA takes 2 passes per step
over the accumulation window and one more per probe on refresh steps, so the expected
ratio is about ``2 + n_samples / k`` times AdamW's when the passes dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from common import env_info  # noqa: E402


def run(kind: str, steps: int, warmup: int, accumulation: int, batch: int, width: int, layers: int,
        k: int, device: str) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from sassha_fused import SASSHA
    from sassha_fused.integrations.hf import SasshaTrainer

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_head=4, n_embd=width, vocab_size=512, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 512, (4096, 128), generator=g)]

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_steps=warmup + steps,
                                 report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 use_cpu=device == "cpu", lr_scheduler_type="constant", seed=0)
        if kind == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                              callbacks=[Clock()])
        else:
            opt = SASSHA(model.parameters(), lr=0.05, lazy_hessian=k)
            trainer = SasshaTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                    callbacks=[Clock()])
        trainer.train()
    measured = times[warmup:]
    return {"optimizer": kind, "steps": len(measured), "step_ms_mean": 1e3 * statistics.mean(measured),
            "step_ms_median": 1e3 * statistics.median(measured),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--k", type=int, default=10, help="lazy_hessian")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    results = [run(kind, a.steps, a.warmup, a.accumulation, a.batch, a.width, a.layers, a.k, a.device)
               for kind in ("adamw", "sassha")]
    ratio = results[1]["step_ms_mean"] / results[0]["step_ms_mean"]
    summary = {"env": env_info(torch.device(a.device)), "config": vars(a), "results": results,
               "sassha_over_adamw": ratio, "expected_passes_ratio": 2 + 1 / a.k}
    for r in results:
        print(f"{r['optimizer']:>7}: {r['step_ms_mean']:8.1f} ms/step (median {r['step_ms_median']:.1f}), "
              f"{r['params']:,} params")
    print(f"SasshaTrainer / Trainer+AdamW: {ratio:.2f}x (passes: {2 + 1 / a.k:.2f}x)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
