"""The GPU benches in one prepared script: SFT on a 1B-class decoder and classification, ours vs Trainer + peft.

    python bench/gpu.py [--model smollm2-1.7b] [--max-length 1024] [--batch-size 8] [--steps 40] [--rounds 1]
                        [--no-ablation] [--no-classification] [--dry-run]

On a machine with a CUDA GPU (weights cannot be carried there):
1. a randomly initialised checkpoint of SmolLM2-1.7B's architecture (its config, written out below) with the
   SmolLM2 tokenizer (the whole family shares it; taken from the offline SmolLM2-135M-Instruct package), saved
   once into ``--work-dir``;
2. bench/generation.py on it (ChatterBot SFT): ours with the recipe's defaults (bf16, SDPA, packing, chunked
   loss, fused LoRA) against ``Trainer`` + peft with its best settings here: the model loaded in bf16, bf16
   autocast, SDPA, ``DataCollatorWithFlattening`` (padding-free); an ablation of ours (each option off, or
   ``torch.compile`` and activation checkpointing on) as extra columns of the same table; MFU and peak GPU
   memory are rows of it;
3. bench/classification.py (MiniLM-L6, the recipe's shape) and the quick grid cell (bench/grid.py --quick).

A random model's speed and memory are a real model's (the values of the weights do not change the work); its
held-out loss compares the sides with each other only. ``--dry-run`` checks the arguments and the recipe
overrides, builds the model's config (no weights) and prints the commands without running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    # HuggingFaceTB/SmolLM2-1.7B(-Instruct) config.json
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=130000, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2),
    # for a smoke run of the script itself (CPU, seconds)
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
ABLATION = {
    "no-packing": "data.packing=false",
    "no-chunked-loss": "train.chunked_loss=false",
    "no-fused-lora": "train.fused_lora=false",
    "compile": "train.compile=true",
    "checkpointing": "train.gradient_checkpointing=true",
}


def model_config(name: str):
    from transformers import AutoConfig

    values = dict(CONFIGS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_checkpoint(name: str, folder: Path) -> Path:
    """A random-initialised model of ``name``'s config with the SmolLM2 tokenizer and chat template, once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import resolve_checkpoint
    from finetune.recipes import RECIPES_DIR, load_config

    if (folder / "config.json").is_file():
        return folder
    source = resolve_checkpoint(load_config(RECIPES_DIR / "generate.yaml").model)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(name), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, random -> {folder}", flush=True)
    return folder


def commands(args: argparse.Namespace, checkpoint: Path) -> list[list[str]]:
    python = [sys.executable]
    sft = [*python, str(BENCH / "generation.py"), "--rounds", str(args.rounds), "--warmup-steps", "3",
           "--baseline-precision", "bf16", "--baseline-dtype", "bf16", "--baseline-collator", "flatten",
           "--set", f"model.name_or_path={checkpoint}", "--set", f"data.max_length={args.max_length}",
           "--set", f"train.batch_size={args.batch_size}", "--set", "train.mixed_precision=bf16",
           "--set", "data.system_prompt=null"]
    if args.steps:
        sft += ["--steps", str(args.steps)]
    if args.ablation:
        for name, setting in ABLATION.items():
            sft += ["--variant", f"{name}:{setting}"]
    out = [sft]
    if args.classification:
        out.append([*python, str(BENCH / "classification.py"), "--rounds", str(args.rounds),
                    "--baseline-precision", "bf16"])
        out.append([*python, str(BENCH / "grid.py"), "--quick", "--baseline-precision", "bf16"])
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(CONFIGS), default="smollm2-1.7b")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: one epoch)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--no-classification", dest="classification", action="store_false")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/finetune-gpu-bench"))
    parser.add_argument("--dry-run", action="store_true", help="check and print, run nothing")
    args = parser.parse_args(argv)
    if args.max_length < 16 or args.batch_size < 1 or args.rounds < 1:
        parser.error("--max-length >= 16, --batch-size >= 1 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from finetune.recipes import RECIPES_DIR, load_config

    checkpoint = args.work_dir / f"{args.model}-random"
    config = model_config(args.model)
    todo = commands(args, checkpoint)
    # the SFT overrides must make a valid recipe (a typo fails here, not after the checkpoint is built)
    sft = todo[0]
    load_config(RECIPES_DIR / "generate.yaml", [sft[i + 1] for i, a in enumerate(sft) if a == "--set"])
    print(f"GPU bench: {args.model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), "
          f"max_length {args.max_length}, batch {args.batch_size}", flush=True)
    if args.dry_run:
        for command in todo:
            print("would run: " + shlex.join(command))
        return 0
    if not torch.cuda.is_available():
        print("error: bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is false); --dry-run checks it "
              "without one", file=sys.stderr)
        return 2
    build_checkpoint(args.model, checkpoint)
    status = 0
    for command in todo:
        print("\n$ " + shlex.join(command), flush=True)
        status |= subprocess.run(command, cwd=REPO, check=False).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
