"""SasshaTrainer (sassha_fused.integrations.hf) against the real transformers.Trainer.

A GPT-2 built from a config (no download) in its default attention implementation
(sdpa: no double backward, so refresh steps take finite differences). The trainer's
steps are checked against the README's protocol (b) loop over the very batches the
Trainer fed, in float64; gradient accumulation against one big batch; bf16; logging;
checkpoint save/resume against an uninterrupted run.
"""

import math

import pytest
import torch

try:
    import transformers  # noqa: F401
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    import accelerate  # noqa: F401
except Exception as exc:  # noqa: BLE001  (the reason is shown)
    pytest.skip(f"transformers/accelerate cannot be imported here ({type(exc).__name__}: {exc}); "
                "install the extra: pip install -e '.[hf]' with a torch constraint", allow_module_level=True)

from sassha_fused import MSASSHA, SASSHA
from sassha_fused.integrations.hf import SasshaTrainer

VOCAB, SEQ = 64, 16


def gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype)


def dataset(n=32):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": t, "labels": t} for t in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


def arguments(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def make_optimizer(cls, model, **kw):
    return cls(model.parameters(), lr=0.05, lazy_hessian=2, weight_decay=0.01, **kw)


class RecordingTrainer(SasshaTrainer):
    """Records the micro-batches of each step's first pass (the replays do not come through here)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def close(a, b, rtol):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=rtol, atol=rtol), (x - y).abs().max().item()


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_trainer_steps_equal_the_protocol_loop(tmp_path, cls):
    """One Trainer step = the README's protocol (b) step, with max_grad_norm clipping the update's
    gradient between unperturb() and step(), and the given lr scheduler stepped once per step."""
    model = gpt2(torch.float64)
    opt = make_optimizer(cls, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    trainer = RecordingTrainer(model=model, args=arguments(tmp_path, max_grad_norm=0.5, max_steps=5),
                               train_dataset=dataset(), optimizers=(opt, sched))
    assert model.config._attn_implementation == "sdpa"  # the default: no double backward
    trainer.train()
    assert opt.global_step == 5 and opt.hvp_method == "finite_difference"
    assert len(trainer.batches) == 5

    ref = gpt2(torch.float64)
    ropt = make_optimizer(cls, ref)
    rsched = torch.optim.lr_scheduler.LambdaLR(ropt, lambda s: 1.0 / (1 + s))
    ropt.require_finite_differences("test")

    def loss_of(batch):  # as the Trainer computes it (normalised by the tokens of the step)
        return trainer.compute_loss(ref, batch[0], num_items_in_batch=batch[1])

    for batch in trainer.batches:
        loss_of(batch).backward()
        if cls is SASSHA:
            ropt.perturb_weights(zero_grad=True)
            loss_of(batch).backward()
        for _ in ropt.hvp_passes():
            loss_of(batch).backward()
        if cls is SASSHA:
            ropt.unperturb()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ropt.step()
        rsched.step()
        ropt.zero_grad()
    if cls is MSASSHA:
        ropt.unperturb()  # the trainer hands the model back at x_t
    close(params(model), params(ref), 1e-9)
    for p, q in zip(model.parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_hessian_diag"):
            assert torch.allclose(opt.state[p][key], ropt.state[q][key], rtol=1e-8, atol=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 6)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 5 and all("grad_norm" in h and "learning_rate" in h for h in logged)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 4 per step = 1 batch of 8: every pass of the step (first, perturbed,
    finite-difference) runs over the whole accumulation window."""
    runs = []
    for bs, ga in ((8, 1), (4, 2)):
        model = gpt2(torch.float64)
        # fd_eps 1e-3: float64's default 1e-7 turns the sums' last-bit rounding (two micro-batches
        # or one batch) into ~1e-7 differences of H z where |h| is tiny
        opt = make_optimizer(SASSHA, model, fd_eps=1e-3)
        args = arguments(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                         max_steps=3)
        trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None))
        trainer.train()
        assert opt.global_step == 3
        runs.append((params(model), torch.cat([b["input_ids"] for b, _ in trainer.batches])))
    assert torch.equal(runs[0][1], runs[1][1]), "the two runs saw different samples"
    close(runs[0][0], runs[1][0], 1e-7)
    # and the window is really replayed: one accumulation run differs from plain SAM-less steps
    assert not all(torch.equal(a, b) for a, b in zip(runs[1][0], params(gpt2(torch.float64))))


def test_bf16_training_logs_and_learns(tmp_path):
    model = gpt2()
    opt = make_optimizer(SASSHA, model)
    data = dataset(16)
    args = arguments(tmp_path, bf16=True, max_steps=12, per_device_train_batch_size=16)
    trainer = SasshaTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses  # the same 16 sequences every step: it learns them
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert opt.last_fd_step is not None and opt.skipped_steps == 0


@pytest.mark.parametrize("cls", [SASSHA, MSASSHA])
def test_checkpoint_resume_continues_exactly(tmp_path, cls):
    def run(out, resume=None, max_steps=6):
        model = gpt2()
        opt = make_optimizer(cls, model)
        args = arguments(out, max_steps=max_steps, save_strategy="steps", save_steps=3)
        trainer = SasshaTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    whole, whole_opt = run(tmp_path / "whole")
    resumed, resumed_opt = run(tmp_path / "part", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed_opt.global_step == whole_opt.global_step == 6
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(whole_opt.state[p]["exp_hessian_diag"], resumed_opt.state[q]["exp_hessian_diag"])


def test_misuse_is_refused(tmp_path):
    model = gpt2()
    with pytest.raises(ValueError, match="pass the optimizer"):
        SasshaTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset())
    with pytest.raises(ValueError, match="finite differences"):
        SasshaTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset(),
                      optimizers=(SASSHA(model.parameters(), hvp="autograd"), None))


def test_finite_difference_passes_replay_the_dropout_masks(tmp_path):
    """With dropout, each finite-difference pass draws the masks of the perturbed pass it differs
    from (otherwise the difference quotient measures the masks); the first pass and the
    perturbed pass draw fresh ones, as with any optimizer."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ, embd_pdrop=0.3)
    model = GPT2LMHeadModel(cfg)
    masks = []
    model.transformer.drop.register_forward_hook(lambda m, i, o: masks.append(o == 0))
    opt = make_optimizer(SASSHA, model)  # lazy_hessian=2: step 1 refreshes
    args = arguments(tmp_path, max_steps=1, gradient_accumulation_steps=2)
    SasshaTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None)).train()
    assert len(masks) == 6  # 2 micro-batches x (first, perturbed, finite-difference pass)
    first, perturbed, difference = masks[0:2], masks[2:4], masks[4:6]
    for f, p, d in zip(first, perturbed, difference):
        assert torch.equal(d, p) and not torch.equal(f, p)


def test_an_error_inside_the_step_leaves_the_model_at_x_t(tmp_path):
    class Failing(SasshaTrainer):
        calls = 0

        def compute_loss(self, *a, **kw):
            Failing.calls += 1
            if Failing.calls == 2:  # the pass at the perturbed point
                raise RuntimeError("out of memory (simulated)")
            return super().compute_loss(*a, **kw)

    model = gpt2()
    before = params(model)
    opt = make_optimizer(SASSHA, model)
    trainer = Failing(model=model, args=arguments(tmp_path), train_dataset=dataset(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert not opt.is_perturbed and opt.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_msassha_load_best_model_at_end_keeps_the_best_weights(tmp_path):
    from safetensors.torch import load_file

    model = gpt2()
    opt = make_optimizer(MSASSHA, model)
    args = arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = SasshaTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(8),
                            optimizers=(opt, None))
    trainer.train()  # greater_is_better on a loss: the worst step is "best", not the last
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")
    saved = load_file(f"{best}/model.safetensors")
    now = model.state_dict()
    assert saved and all(torch.equal(now[k], v) for k, v in saved.items())
    assert not opt.is_perturbed


def test_ddp_on_two_ranks_equals_one_process_accumulating(tmp_path):
    """torchrun, 2 gloo ranks x 1 micro-batch of 4 = one process x 2 micro-batches of 4 (the
    ranks take alternate batches of the same order): every pass is averaged by DDP, and the
    optimizer, set to distributed=False by the trainer, adds no collective of its own."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    worker = os.path.join(here, "hf_ddp_worker.py")
    runs = [[sys.executable, worker, str(tmp_path), "2"],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
             str(tmp_path), "1"]]
    for cmd in runs:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(here))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = torch.load(tmp_path / "result_1.pt"), torch.load(tmp_path / "result_2.pt")
    assert one["steps"] == two["steps"] == 3
    assert two["distributed"] is False and two["collectives"] == 0
    close(one["params"], two["params"], 1e-6)  # float64; all-reduce order: ~3e-8 apart
