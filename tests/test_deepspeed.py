"""DeepSpeed (the optional `distributed` extra): the shipped ZeRO configs validate with DeepSpeed's own
parser; ZeRO trains on CPU processes (DeepSpeed's CPU accelerator, gloo); finetune's CLI under
accelerate's DeepSpeed path on CPU (tests/accelerate_cpu.py) trains like DDP. docs/distributed-findings.md
has the details and timings."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_bert, synthetic_reviews, tiny_overrides, write_csv
from launching import ROOT, cpu_env, run_with_free_port, tail, torchrun
from test_distributed import SETTINGS
from test_launch_configs import launch_environment

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install -e '.[distributed]'")

CONFIGS = {stage: ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml" for stage in (2, 3)}
TIMEOUT = 600  # the first DeepSpeed launch on a machine JIT-compiles its CPU comm op (~2 min on 2 cores)


def ds_env(**extra: str) -> dict[str, str]:
    """DeepSpeed on CPU: its CPU accelerator, and no ACCELERATE_USE_CPU (with it accelerate skips DeepSpeed)."""
    return cpu_env(DS_ACCELERATOR="cpu", ACCELERATE_USE_CPU=None, **extra)


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_shipped_config_validates_with_deepspeed(stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DeepSpeed config accelerate builds from the shipped YAML, with its `auto` values filled as
    Accelerator.prepare fills them (micro batch from the DataLoader, accumulation from the Accelerator,
    clipping 1.0), is accepted by deepspeed.runtime.config.DeepSpeedConfig."""
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    for key, value in launch_environment(CONFIGS[stage]).items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])
    plugin.deepspeed_config_process(must_match=True, train_micro_batch_size_per_gpu=8, train_batch_size=8 * 4 * 1,
                                    gradient_accumulation_steps=4, gradient_clipping=1.0)
    config = plugin.deepspeed_config
    assert not [k for k, v in config.items() if v == "auto"]
    parsed = DeepSpeedConfig(copy.deepcopy(config))
    assert parsed.zero_enabled and parsed.zero_optimization_stage == stage
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (8, 4)
    assert parsed.gradient_clipping == 1.0 and parsed.bfloat16_config.enabled  # mixed_precision: bf16
    assert parsed.zero_config.offload_optimizer is None or parsed.zero_config.offload_optimizer.device == "none"
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save  # zero3_save_16bit_model: true


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_on_cpu_processes(stage: int, tmp_path: Path) -> None:
    """DeepSpeed alone, 2 CPU processes: 10 ZeRO steps equal the same steps in one process (measured:
    5.96e-8, one float32 rounding), and the engine writes its sharded checkpoint."""
    def command(port: int) -> list[list[str]]:
        return [torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                         str(ROOT / "tests" / "deepspeed_zero_cpu.py"), str(stage), str(tmp_path))]
    (result,) = run_with_free_port(command, ds_env(), TIMEOUT)
    assert result.returncode == 0, tail(result)
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["max_difference"] <= 1e-6, report
    shards = {p.name for p in (tmp_path / f"zero{stage}").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("deepspeed")
    model = build_tiny_bert(folder / "tiny-bert", dropout=0.0)
    data = write_csv(folder / "reviews.csv", synthetic_reviews(600))
    test = write_csv(folder / "test.csv", synthetic_reviews(21, seed=5))
    extra = {**SETTINGS, "data.test_file": test, "data.validation_size": 0.2, "train.batch_size": 8}
    extra["train.max_steps"] = 48
    return {"folder": folder, "args": lambda name: tiny_overrides(model, data, folder / name, **extra)}


def normalized_weights(run_dir: Path) -> dict:
    """ZeRO-3's gathered state dict came out with BERT's legacy LayerNorm names (gamma/beta)."""
    tensors = load_file(str(run_dir / "model" / "model.safetensors"))
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in tensors.items()}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (tests/accelerate_cpu.py)")
@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_cli_under_deepspeed_on_cpu_matches_ddp(stage: int, cli_setup: dict) -> None:
    """The whole loop under accelerate's DeepSpeed path (micro batch and clipping from the recipe, best and final
    weights gathered from ZeRO-3 partitions, parameters counted by ds_numel): 48 steps equal DDP's within 2e-3
    (measured after 150 steps: ZeRO-2 1.2e-4, ZeRO-3 9e-4: sums reduced in another order), the same test
    accuracy."""
    folder, args = cli_setup["folder"], cli_setup["args"]
    ddp_dir = folder / "ddp" / "tiny"
    if not (ddp_dir / "metrics.json").exists():
        (ddp,) = run_with_free_port(lambda port: [torchrun("--nproc_per_node", "2", "--master_port", str(port),
                                                           "-m", "finetune", "train", "classify", *args("ddp"))],
                                    cpu_env(), TIMEOUT)
        assert ddp.returncode == 0, tail(ddp)

    def command(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[stage]),
                 "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 str(ROOT / "tests" / "accelerate_cpu.py"), "deepspeed", "train", "classify", *args(f"zero{stage}")]]
    (result,) = run_with_free_port(command, ds_env(), TIMEOUT)
    assert result.returncode == 0, tail(result)
    ours, reference = normalized_weights(folder / f"zero{stage}" / "tiny"), normalized_weights(ddp_dir)
    assert max(float((ours[k] - reference[k]).abs().max()) for k in reference) <= 2e-3
    accuracy = lambda run: json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert accuracy(folder / f"zero{stage}" / "tiny") == accuracy(ddp_dir)
