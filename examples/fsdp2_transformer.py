"""Train a small character-level transformer with SASSHA under FSDP2 (``fully_shard``).

Runs on CPUs with the gloo backend (or on GPUs with NCCL), started by torchrun:

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_transformer.py --steps 60

Every block and the root module are sharded with ``fully_shard``; each rank holds half
of every parameter and of SASSHA's state. The attention is PyTorch's fused
``scaled_dot_product_attention``, which has no double backward, so the Hessian is
refreshed by finite differences: every pass is an ordinary forward and backward, and
FSDP gathers and reduce-scatters it as usual. Each rank reads its own half of every
batch; FSDP averages the gradients of every pass, so the run equals one process
training on the whole batch. At the end the model and optimizer are saved with
``torch.distributed.checkpoint`` (``--checkpoint DIR``) and, to show the round trip,
loaded back into a fresh sharded model and optimizer that take one more step exactly
as the original does.

The data is the text of Python's own help topics (``pydoc_data``, part of the
standard library), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sassha_fused import SASSHA

VOCAB = 95  # printable ASCII


def text() -> torch.Tensor:
    from pydoc_data.topics import topics

    raw = "".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")
    return torch.tensor(list(raw), dtype=torch.long).clamp(32, 126) - 32


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused: no double backward
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        # logits of shape (batch * seq, vocab): the head on a 2-D input returns a fresh
        # tensor (FSDP2 warns about a root module that returns a view)
        return self.head(self.ln(h).reshape(-1, h.shape[-1]))


def build(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = CharTransformer(args.width, args.layers, args.heads, args.seq).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)  # the root: embedding, positions, final norm and head
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="global batch; each rank takes batch / world")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="directory for the DCP checkpoint (default: a temporary one)")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world}")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    data = text()
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    model = build(args, device)
    opt = SASSHA(model.parameters(), lr=args.lr, rho=0.02, weight_decay=1e-2, lazy_hessian=10)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same global batches on every rank

    def batch_of(source: torch.Tensor, g: torch.Generator):
        starts = torch.randint(0, len(source) - args.seq - 1, (args.batch,), generator=g)
        mine = starts[rank * args.batch // world:(rank + 1) * args.batch // world]  # this rank's half
        chunk = torch.stack([source[s:s + args.seq + 1] for s in mine]).to(device)
        return chunk[:, :-1], chunk[:, 1:]

    def loss_on(x, y):
        return F.cross_entropy(model(x), y.reshape(-1))

    def global_mean(value: torch.Tensor) -> float:
        value = value.detach().clone()
        dist.all_reduce(value)
        return float(value) / world

    if rank == 0:
        shard = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        print(f"{world} ranks ({'cuda' if use_cuda else 'cpu/gloo'}), {total} parameters, {shard} on rank 0")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch_of(train, gen)
        loss = opt.step(lambda: loss_on(x, y))
        if step == 1 or step % 10 == 0 or step == args.steps:
            mean = global_mean(loss)
            if rank == 0:
                print(f"step {step:4d}  loss {mean:.4f}  ({opt.hvp_method} HVPs, {opt.backends})")
    elapsed = time.perf_counter() - start
    held_gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        held_loss = global_mean(torch.stack([loss_on(*batch_of(held, held_gen)) for _ in range(10)]).mean())
    state_bytes = sum(t.to_local().numel() * t.element_size() for s in opt.state.values()
                      for k, t in s.items() if k in ("exp_avg", "exp_hessian_diag"))
    if rank == 0:
        print(f"held-out loss {held_loss:.4f}; {args.steps / elapsed:.2f} steps/s; "
              f"optimizer state on rank 0: {state_bytes / 2**10:.1f} KiB")

    checkpoint_round_trip(args, model, opt, batch_of, train, rank, device)
    dist.barrier()  # leave together: tearing down gloo mid-collective can abort the other rank
    dist.destroy_process_group()


def checkpoint_round_trip(args, model, opt, batch_of, train, rank, device) -> None:
    """Save with DCP, load into a fresh sharded model and optimizer, and check one step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = args.checkpoint
    holder = None
    if directory is None:
        holder = [tempfile.mkdtemp(prefix="sassha-fsdp2-")] if rank == 0 else [None]
        dist.broadcast_object_list(holder, src=0)
        directory = holder[0]
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)

    fresh = build(args, device)
    fresh_opt = SASSHA(fresh.parameters(), lr=args.lr, rho=0.02, weight_decay=1e-2, lazy_hessian=10)
    msd2, osd2 = get_state_dict(fresh, fresh_opt)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    x, y = batch_of(train, torch.Generator().manual_seed(99))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.step(lambda: F.cross_entropy(m(x), y.reshape(-1)))
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), fresh.parameters()))
    if rank == 0:
        where = "a temporary directory" if holder else directory
        print(f"checkpoint saved to {where} with torch.distributed.checkpoint and loaded into a fresh model: "
              f"its next step is {'identical' if same else 'DIFFERENT'} to the original's")
    dist.barrier()
    if holder and rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
    if not same:
        raise SystemExit("the resumed run differs from the original")


if __name__ == "__main__":
    main()
