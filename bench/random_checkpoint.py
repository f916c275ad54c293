"""A randomly initialised copy of a checkpoint: same architecture, config and tokenizer, no trained weights.

    python bench/random_checkpoint.py SOURCE_FOLDER OUTPUT_FOLDER [--causal-lm]

For timing on a machine where the real weights cannot be carried (the GPU run in BENCHMARKS.md): the speed
of a training step does not depend on the weights' values. Held-out metrics of such runs compare the two
sides with each other only; they say nothing about the real checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a folder with config.json and the tokenizer's files")
    parser.add_argument("output", type=Path)
    parser.add_argument("--causal-lm", action="store_true", help="build the model with its language-model head")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.source)
    model = (AutoModelForCausalLM if args.causal_lm else AutoModel).from_config(config, dtype=torch.float32)
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(args.source).save_pretrained(args.output)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (args.source / extra).is_file():
            shutil.copy(args.source / extra, args.output / extra)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, random -> {args.output}")


if __name__ == "__main__":
    main()
