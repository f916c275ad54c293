"""Classification (tweet sentiment, all-MiniLM-L6-v2 + LoRA): our pipeline against transformers' Trainer + peft.

    python bench/classification.py [--steps 100] [--rounds 2] [--threads N] [--set train.batch_size=16]

Both sides get the same tokenized features (one ``map`` of our task's preprocessing), checkpoint, LoRA
configuration (r, alpha, dropout, target modules, trained head), batch size, learning rate, weight decay,
warm-up, linear schedule, gradient clipping, optimizer steps, length-grouped batches and padding multiple.
The baseline is what a Trainer user writes: ``AutoModelForSequenceClassification`` + ``get_peft_model`` +
``Trainer`` with ``DataCollatorWithPadding``, ``train_sampling_strategy="group_by_length"``, the default
(fused) AdamW and its faster precision on this machine (bf16 autocast or fp32, timed at the start).
Both trained models are scored by the same evaluation code on the same held-out test examples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

RECIPE = common.REPO / "recipes" / "classify.yaml"
# Held-out metrics may be at most this much worse than the baseline's (absolute, on a 0-1 scale): about one
# standard error of accuracy on 2,000 test examples; two runs that differ only in their random draws differ
# by about that much.
TOLERANCE = {"accuracy": 0.01, "macro_f1": 0.01}


def collator(tokenizer, pad_to_multiple_of: int | None):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser, steps=100, rounds=2)
    parser.add_argument("--test-samples", type=int, default=2000, help="held-out test examples scored")
    args = parser.parse_args()
    common.start(args, "classification: MiniLM-L6 + LoRA on tweet-sentiment, ours vs Trainer + peft")

    from finetune.recipes import load_config

    overrides = [f"train.max_steps={args.steps}", f"data.max_test_samples={args.test_samples}",
                 "train.eval_every_steps=null", "train.log_every_steps=1000000", *args.overrides]
    bench = common.Bench(load_config(RECIPE, overrides), collator)
    ok = common.compare(bench, RECIPE, args, overrides, ["accuracy", "macro_f1"],
                        {"accuracy": True, "macro_f1": True}, TOLERANCE)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
