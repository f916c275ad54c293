"""DeepSpeed alone (no accelerate, no finetune) on CPU processes with gloo: a small network trained for 10
steps with ZeRO stage N, checkpointed, and compared on rank 0 with the same steps in one process.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/deepspeed_zero_cpu.py STAGE OUT_DIR

Prints one JSON line: {"stage": N, "max_difference": ..., "seconds": ...}.
"""

from __future__ import annotations

import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import cross_entropy


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def batch(x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = step % 8 * 8
    return x[start:start + 8], y[start:start + 8]


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"train_micro_batch_size_per_gpu": 8 // world, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0}
    started = time.perf_counter()
    model = network()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    torch.manual_seed(1)
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    for step in range(10):
        xb, yb = batch(x, y, step)
        loss = cross_entropy(engine(xb.chunk(world)[rank]), yb.chunk(world)[rank])
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag=f"zero{stage}")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    seconds = time.perf_counter() - started
    if rank == 0:
        reference = network()
        optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
        for step in range(10):
            cross_entropy(reference(batch(x, y, step)[0]), batch(x, y, step)[1]).backward()
            nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        worst = max(float((trained[k] - v).abs().max()) for k, v in reference.state_dict().items())
        print(json.dumps({"stage": stage, "max_difference": worst, "seconds": round(seconds, 2)}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
