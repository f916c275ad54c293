"""FSDP on CPU processes (gloo), as far as accelerate 1.16 + torch 2.13 go. docs/distributed-findings.md
has the whole story; in short:

* `accelerate launch --config_file configs/accelerate/fsdp.yaml` without GPUs: finetune stops (each
  process would see a world of one); with ACCELERATE_USE_CPU=1 the launch runs, but accelerate
  ignores FSDP on MULTI_CPU and wraps the model in DDP, while transformers, which reads the same
  variables, loads the weights of every process but the first on the meta device
  (fsdp_cpu_ram_efficient_loading): "Cannot copy out of meta tensor".
* With that option off, the launch trains, as plain data parallelism: the same weights as torchrun.
* FSDP2 itself (torch's fully_shard) runs on CPU with gloo: tests/accelerate_cpu.py promotes accelerate's
  MULTI_CPU state to FSDP. Then the default TRANSFORMER_BASED_WRAP fails on BERT (an accelerate bug, not
  CPU-specific); with BertLayer named the whole loop runs under FSDP2 and equals DDP within rounding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import build_tiny_bert, synthetic_reviews, tiny_overrides, write_csv
from launching import ROOT, cpu_env, run_with_free_port, tail, torchrun
from test_distributed import SETTINGS

import torch

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="what accelerate does on a machine without GPUs")]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
TIMEOUT = 600
# What `accelerate launch --config_file fsdp.yaml` exports (test_launch_configs.launch_environment),
# for launches through torchrun and the shim.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_SYNC_MODULE_STATES": "true"}


def accelerate_launch(config_args: list[str], args: list[str], **env: str):
    def command(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), *config_args,
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", "finetune", "train",
                 "classify", *args]]
    return run_with_free_port(command, cpu_env(**env), TIMEOUT)[0]


def torchrun_two(args: list[str], script: list[str] | None = None, **env: str):
    def command(port: int) -> list[list[str]]:
        return [torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                         *(script or ["-m", "finetune"]), "train", "classify", *args)]
    return run_with_free_port(command, cpu_env(**env), TIMEOUT)[0]


def shim(mode: str) -> list[str]:
    return [str(ROOT / "tests" / "accelerate_cpu.py"), mode]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The classification setup of test_distributed.py, and its two-process DDP run (torchrun)."""
    folder = tmp_path_factory.mktemp("fsdp")
    model = build_tiny_bert(folder / "tiny-bert", dropout=0.0)
    data = write_csv(folder / "reviews.csv", synthetic_reviews(600))
    test = write_csv(folder / "test.csv", synthetic_reviews(21, seed=5))
    extra = {**SETTINGS, "data.test_file": test, "data.validation_size": 0.2, "train.batch_size": 8}
    args = lambda name, **more: tiny_overrides(model, data, folder / name, **{**extra, **more})
    return {"folder": folder, "args": args}


STEPS = {"train.max_steps": 24}
"""Launches that train: 24 steps (validation at 15 and 24, checkpoints every 8)."""


@pytest.fixture(scope="module")
def ddp(setup: dict) -> Path:
    """24 steps of DDP through torchrun: the reference of the launches below."""
    result = torchrun_two(setup["args"]("ddp", **STEPS))
    assert result.returncode == 0, tail(result)
    return setup["folder"] / "ddp" / "tiny"


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def worst_difference(a: Path, b: Path) -> float:
    left, right = weights(a), weights(b)
    assert set(left) == set(right)
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_shipped_config_without_gpus_stops_with_the_torchrun_command(setup: dict) -> None:
    """No GPU and no ACCELERATE_USE_CPU: accelerate gives each process a world of one; finetune refuses."""
    result = accelerate_launch([], setup["args"]("no-gpu", **{"train.max_steps": 1}), ACCELERATE_USE_CPU=None)
    assert result.returncode != 0
    assert "launched as 2 processes but Accelerate runs 1" in result.stderr + result.stdout


def test_shipped_config_on_cpu_loads_meta_weights(setup: dict) -> None:
    """ACCELERATE_USE_CPU=1: accelerate runs MULTI_CPU (FSDP ignored) and prepares the model for DDP, but
    transformers saw ACCELERATE_USE_FSDP + FSDP_CPU_RAM_EFFICIENT_LOADING and left process 1's weights on
    the meta device for FSDP to broadcast: DDP's model.to(device) fails there."""
    result = accelerate_launch([], setup["args"]("meta", **{"train.max_steps": 1}))
    assert result.returncode != 0
    assert "Cannot copy out of meta tensor" in result.stderr, tail(result)


def test_fsdp_launch_on_cpu_trains_as_plain_data_parallel(setup: dict, ddp: Path) -> None:
    """With cpu_ram_efficient_loading off the shipped config runs on CPU processes, but as DDP: the
    checkpoint is DDP's (model.safetensors, no pytorch_model_fsdp_0 shards) and the weights equal the
    torchrun run's (measured: bit-identical)."""
    result = accelerate_launch(["--fsdp_cpu_ram_efficient_loading", "false"],
                               setup["args"]("fsdp-as-ddp", **STEPS))
    assert result.returncode == 0, tail(result)
    run_dir = setup["folder"] / "fsdp-as-ddp" / "tiny"
    checkpoint = run_dir / "checkpoints" / "step-00000024"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "pytorch_model_fsdp_0").exists()
    assert worst_difference(ddp, run_dir) <= 1e-6
    assert metrics(run_dir)["test"]["accuracy"] == metrics(ddp)["test"]["accuracy"]


def test_fsdp2_default_auto_wrap_fails_on_bert(setup: dict) -> None:
    """accelerate 1.16's fsdp2_prepare_model shards every class of model._no_split_modules (BERT:
    BertEmbeddings and BertLayer), then shards get_input_embeddings() (word_embeddings, inside
    BertEmbeddings) once more: its weight is already a DTensor and fully_shard takes the tensor-parallel
    path. Device-independent (it fails before any computation); FSDP_TRANSFORMER_CLS_TO_WRAP=BertLayer
    (--fsdp_transformer_layer_cls_to_wrap BertLayer) avoids it."""
    result = torchrun_two(setup["args"]("wrap", **{"train.max_steps": 1}), shim("fsdp"), **FSDP_ENV)
    assert result.returncode != 0
    assert "_init_sharding_spec_tp" in result.stderr and "Invariant encountered" in result.stderr, tail(result)


def test_fsdp2_through_the_cli_matches_ddp_and_resumes(setup: dict, ddp: Path) -> None:
    """FSDP2 (torch's fully_shard, gloo) drives the whole loop: best weights gathered from the shards on every
    process, loaded back into them for the test split, the run folder's model written from the gathered state,
    sharded (DCP) checkpoints. 24 steps: weights within 5e-4 of DDP (measured: 0.0; after 150 steps 1.0e-4), the
    same test accuracy; killed after step 12 and resumed from the sharded checkpoint of step 8: bit-identical to
    the uninterrupted FSDP run."""
    env = {**FSDP_ENV, "FSDP_TRANSFORMER_CLS_TO_WRAP": "BertLayer"}
    fsdp = torchrun_two(setup["args"]("fsdp", **STEPS), shim("fsdp"), **env)
    assert fsdp.returncode == 0, tail(fsdp)
    ddp_dir, fsdp_dir = ddp, setup["folder"] / "fsdp" / "tiny"
    assert (fsdp_dir / "checkpoints" / "step-00000024" / "pytorch_model_fsdp_0").is_dir()
    # Reduce-scatter and all-reduce sum in different orders, and the gradient norm for clipping is
    # computed from shards: the weights drift apart by rounding, step after step.
    worst = worst_difference(ddp_dir, fsdp_dir)
    print(f"FSDP2 vs DDP after 24 steps: max |weight difference| {worst:.2e}")
    assert worst <= 5e-4
    assert metrics(fsdp_dir)["test"]["accuracy"] == metrics(ddp_dir)["test"]["accuracy"]
    assert metrics(fsdp_dir)["best_step"] == metrics(ddp_dir)["best_step"]
    killed = torchrun_two(setup["args"]("fsdp-killed", **STEPS), shim("fsdp"), **env,
                          FINETUNE_FAULT="kill-after-step:12")
    assert killed.returncode != 0
    resumed = torchrun_two(setup["args"]("fsdp-killed", **STEPS) + ["--resume", "auto"], shim("fsdp"), **env)
    assert resumed.returncode == 0, tail(resumed)
    assert "step-00000008" in resumed.stdout
    assert worst_difference(fsdp_dir, setup["folder"] / "fsdp-killed" / "tiny") <= 1e-6
