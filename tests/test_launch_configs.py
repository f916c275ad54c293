"""The shipped accelerate configs parse with accelerate's own loader and say what they launch."""

from __future__ import annotations

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
