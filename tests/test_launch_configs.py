"""The shipped accelerate configs parse with accelerate's own loader and say what they launch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {"ddp-2gpu": ("MULTI_GPU", 2, 1), "fsdp": ("FSDP", 2, 1), "deepspeed-zero2": ("DEEPSPEED", 2, 1),
            "deepspeed-zero3": ("DEEPSPEED", 2, 1), "multi-node": ("MULTI_GPU", 4, 2)}


def test_every_layout_is_shipped() -> None:
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path: Path) -> None:
    config = ClusterConfig.from_yaml_file(str(path))
    kind, processes, machines = EXPECTED[path.stem]
    assert str(config.distributed_type).endswith(kind)
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert path.read_text().startswith("#"), "the first lines say what it is for and how to launch it"


def launch_environment(path: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file PATH` exports to the processes it starts (the same
    functions, without starting anything); os.environ is left as it was."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "finetune", "train", "classify"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launched_processes_can_build_their_accelerator(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Accelerator() reads from those variables parses: the gradient accumulation steps as an int
    (`gradient_accumulation_steps: auto` exported `auto` and failed), the FSDP and DeepSpeed plugins."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    env = launch_environment(path)
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # Accelerator.__init__: int(parse_choice_from_env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", steps)); the
    # variable must be absent so that the recipe's train.gradient_accumulation_steps counts.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    if path.stem == "fsdp":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert plugin.auto_wrap_policy is not None and plugin.transformer_cls_names_to_wrap is None
        assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
        assert plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading is True
    elif path.stem.startswith("deepspeed"):
        plugin = DeepSpeedPlugin()
        stage = int(path.stem[-1])
        assert plugin.zero_stage == stage and plugin.deepspeed_config["zero_optimization"]["stage"] == stage
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # filled from the Accelerator
        assert plugin.zero3_init_flag is (stage == 3)
    else:
        assert env.get("ACCELERATE_USE_FSDP") is None and env.get("ACCELERATE_USE_DEEPSPEED") is None
