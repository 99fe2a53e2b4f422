"""SasshaTrainer in one process or under torchrun (DDP on gloo ranks): tests/test_hf.py runs it.

    python tests/hf_ddp_worker.py OUT GRADIENT_ACCUMULATION
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_ddp_worker.py OUT 1

Trains 3 steps of the float64 GPT-2 of test_hf.py and saves rank 0's parameters and
the optimizer's collectives of the last step to OUT/result_<world>.pt.
"""

import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_hf import arguments, dataset, gpt2, make_optimizer  # noqa: E402

from sassha_fused import SASSHA  # noqa: E402
from sassha_fused.integrations.hf import SasshaTrainer  # noqa: E402


def main() -> None:
    out, accumulation = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = gpt2(torch.float64)
    opt = make_optimizer(SASSHA, model, fd_eps=1e-3)
    args = arguments(out / f"run{world}", gradient_accumulation_steps=accumulation, max_steps=3,
                     ddp_backend="gloo" if world > 1 else None)
    SasshaTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None)).train()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"params": [p.detach() for p in model.parameters()], "distributed": opt.distributed,
                    "collectives": opt.last_step_collectives, "steps": opt.global_step}, out / f"result_{world}.pt")
    if torch.distributed.is_initialized():
        # leave together and tear gloo down before the interpreter exits: a process group left to
        # the exit's destructors aborts now and then ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
