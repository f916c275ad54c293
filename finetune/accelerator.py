"""The Accelerate side of a run: the process group, the precision, and a fresh Accelerator."""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env

from finetune.errors import FinetuneError


def process_group() -> PartialState:
    """The processes of this launch, checked: every process must agree on them before anything is written.

    ``cpu=``: PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU itself (accelerate 1.15), and
    without it a torchrun launch on CPUs is a single process each."""
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes.num_processes:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: every process would train alone
        # and all of them would write the same run folder.
        raise FinetuneError(f"launched as {launched} processes but Accelerate runs {processes.num_processes}: "
                            f"without GPUs use ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} -m finetune "
                            f"train ... (or make finetune NPROC={launched})")
    return processes


def resolve_mixed_precision(setting: str) -> str:
    """``auto``: bf16 on GPUs that support it and on CPUs with AVX512-BF16 or AMX, else fp32."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu = torch.cpu
    has_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if has_bf16 else "no"


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """A fresh Accelerator (see :func:`reset_accelerator_state`)."""
    reset_accelerator_state()
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), **kwargs)


def reset_accelerator_state() -> None:
    """Accelerate keeps its settings in process-wide singletons that refuse a second mixed-precision mode,
    so a second run in one process (tests, notebooks, the bench's Trainer) clears them first; the process
    group of a distributed launch (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
