"""SFT generation (ChatterBot prompt/response pairs, SmolLM2-135M-Instruct + LoRA): our pipeline against
transformers' Trainer + peft.

    python bench/generation.py [--steps N (default: one epoch)] [--rounds 2] [--threads N] [--set train.batch_size=8]
                               [--baseline-collator seq2seq|flatten]

Both sides get the same tokenized features (our task's chat-template formatting, prompt tokens masked out of
the labels, EOS appended), checkpoint (the GGUF dequantized once into the finetune cache), LoRA configuration,
batch size, learning rate, schedule, gradient clipping, optimizer steps, length-grouped batches and padding
multiple. The baseline is what a Trainer user writes: ``AutoModelForCausalLM`` + ``get_peft_model`` +
``Trainer`` with ``DataCollatorForSeq2Seq`` (pads labels with -100), ``train_sampling_strategy=
"group_by_length"``, the default (fused) AdamW and its faster precision here (bf16 autocast or fp32).
Both trained models are scored by the same evaluation code: held-out loss and perplexity on the test split
(no generation, so the comparison is of the training alone).

Our side packs samples into rows by default (``data.packing=auto``: exact for SmolLM2's Llama architecture), so
one epoch is fewer, fuller rows; the baseline trains the unpacked samples (padded, or flattened without padding
by ``--baseline-collator flatten``) in batches of as many samples as our packed rows hold on average, so both
sides take about as many steps of about as many tokens. By default each side trains one epoch: the same target
tokens, each once. ``--set data.packing=false`` trains both sides on the same padded rows and steps.
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


def flattening_collator(tokenizer, pad_to_multiple_of: int | None):
    """transformers' padding-free collator: a batch's samples in one row, positions restarting per sample."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening()


def sft_bench(overrides: list[str], baseline_collator: str) -> tuple["common.Bench", int, int]:
    """The bench, and one epoch in optimizer steps for each side: ours trains the recipe's rows (packed by
    default, ``data.packing=auto``), the baseline the unpacked samples a Trainer user starts from."""
    from finetune.recipes import load_config

    unpacked = common.Bench(load_config(RECIPE, [*overrides, "data.packing=false"]), collator).features["train"]
    bench = common.Bench(load_config(RECIPE, overrides),
                         flattening_collator if baseline_collator == "flatten" else collator, baseline_train=unpacked)
    t = bench.config.train
    packed = bench.features["train"]
    if len(packed) < len(unpacked):  # packed: give the baseline as many samples per step as our rows hold
        bench.baseline_batch_size = max(1, round(t.batch_size * len(unpacked) / len(packed)))
    baseline_batch = bench.baseline_batch_size or t.batch_size
    accumulation = t.gradient_accumulation_steps
    return bench, -(-len(packed) // (t.batch_size * accumulation)), -(-len(unpacked) // (baseline_batch * accumulation))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser, steps=None, rounds=2)
    parser.add_argument("--baseline-collator", choices=["seq2seq", "flatten"], default="seq2seq",
                        help="seq2seq: DataCollatorForSeq2Seq (padded rows); flatten: DataCollatorWithFlattening "
                             "(padding-free, the Trainer's packing)")
    args = parser.parse_args()
    common.start(args, "SFT generation: SmolLM2-135M-Instruct + LoRA on ChatterBot, ours vs Trainer + peft")

    from finetune.recipes import load_config

    overrides = ["train.eval_every_steps=null", "train.log_every_steps=1000000", "eval.before_training=false",
                 "eval.generate_samples=0", *args.overrides]
    bench, ours_epoch, baseline_epoch = sft_bench(overrides, args.baseline_collator)
    if args.steps is None:  # one epoch of each side's own rows, counted as each loop counts it
        args.steps, args.baseline_steps = ours_epoch, baseline_epoch
    overrides.insert(0, f"train.max_steps={args.steps}")
    ok = common.compare(bench, RECIPE, args, overrides, ["loss", "perplexity"], {"loss": False, "perplexity": False},
                        TOLERANCE)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
