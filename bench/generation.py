"""SFT generation (ChatterBot prompt/response pairs, SmolLM2-135M-Instruct + LoRA): our pipeline against
transformers' Trainer + peft.

    python bench/generation.py [--steps N (default: one epoch)] [--rounds 2] [--threads N] [--set train.batch_size=8]

Both sides get the same tokenized features (our task's chat-template formatting, prompt tokens masked out of
the labels, EOS appended), checkpoint (the GGUF dequantized once into the finetune cache), LoRA configuration,
batch size, learning rate, schedule, gradient clipping, optimizer steps, length-grouped batches and padding
multiple. The baseline is what a Trainer user writes: ``AutoModelForCausalLM`` + ``get_peft_model`` +
``Trainer`` with ``DataCollatorForSeq2Seq`` (pads labels with -100), ``train_sampling_strategy=
"group_by_length"``, the default (fused) AdamW and its faster precision here (bf16 autocast or fp32).
Both trained models are scored by the same evaluation code: held-out loss and perplexity on the test split
(no generation, so the comparison is of the training alone).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

RECIPE = common.REPO / "recipes" / "generate.yaml"
# Held-out loss (mean per target token, nats) may be at most this much higher than the baseline's: 0.02 nats is
# 2% of perplexity. By default both sides train one whole epoch, so each sees every training sample once and
# only the order and the random draws differ (a part of an epoch would also differ in which samples are seen).
TOLERANCE = {"loss": 0.02}


def collator(tokenizer, pad_to_multiple_of: int | None):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser, steps=None, rounds=2)
    args = parser.parse_args()
    common.start(args, "SFT generation: SmolLM2-135M-Instruct + LoRA on ChatterBot, ours vs Trainer + peft")

    from finetune.recipes import load_config

    overrides = ["train.eval_every_steps=null", "train.log_every_steps=1000000", "eval.before_training=false",
                 "eval.generate_samples=0", *args.overrides]
    if args.steps is None:  # one epoch, counted as our loop counts it
        features = common.Bench(load_config(RECIPE, overrides), collator).features["train"]
        t = load_config(RECIPE, overrides).train
        args.steps = -(-len(features) // (t.batch_size * t.gradient_accumulation_steps))
    overrides.insert(0, f"train.max_steps={args.steps}")
    bench = common.Bench(load_config(RECIPE, overrides), collator)
    ok = common.compare(bench, RECIPE, args, overrides, ["loss", "perplexity"], {"loss": False, "perplexity": False},
                        TOLERANCE)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
