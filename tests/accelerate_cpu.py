"""Runs the finetune CLI with Accelerate's FSDP or DeepSpeed path on CPU processes, which accelerate 1.16
never selects by itself. Only accelerate is patched, in this process; finetune runs unchanged.

    torchrun --nproc_per_node 2 tests/accelerate_cpu.py fsdp train RECIPE key=value ...
    accelerate launch --config_file deepspeed-zero2.yaml tests/accelerate_cpu.py deepspeed train RECIPE ...

fsdp: with ACCELERATE_USE_CPU=1 the process group is MULTI_CPU, and AcceleratorState switches to FSDP
  only from MULTI_GPU/XPU/NPU/HPU/... (state.py): ACCELERATE_USE_FSDP is silently ignored and the model is
  wrapped in DDP. Here MULTI_CPU is promoted to FSDP as a MULTI_GPU state would be; torch's FSDP2
  (fully_shard) itself runs on CPU with gloo.
deepspeed: with ACCELERATE_USE_CPU=1 DeepSpeed is skipped (`... and not cpu`); without it a CPU device
  has no distributed backend (PartialState._prepare_backend returns none) and the state is one process.
  Here the CPU gets gloo as if it were an accelerator, so PartialState initialises deepspeed.comm and
  selects DEEPSPEED (run it without ACCELERATE_USE_CPU, with DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType


def promote_cpu_to_fsdp() -> None:
    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


def gloo_for_cpu_devices() -> None:
    original = state.PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    state.PartialState._prepare_backend = prepare_backend


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    {"fsdp": promote_cpu_to_fsdp, "deepspeed": gloo_for_cpu_devices}[mode]()
    sys.argv = ["finetune", *arguments]
    runpy.run_module("finetune", run_name="__main__", alter_sys=True)
