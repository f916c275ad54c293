"""The speed margin on every LoRA shape: classification (MiniLM-L6 + LoRA), ours vs transformers' Trainer + peft,
over a grid of LoRA rank x target modules x sequence length x batch size.

    python bench/grid.py [--ranks 8 16 64] [--targets attention all-linear] [--lengths 64 128 256]
                         [--batches 16 32] [--steps 20] [--rounds 1] [--threads N]
    python bench/grid.py --quick          # one cell (rank 8, attention, length 64, batch 16), 4 steps: a smoke run

Each cell is the side-by-side run of bench/classification.py (same features, checkpoint, LoRA settings, schedule,
steps; the Trainer in its faster precision here, picked once on the first cell) with the cell's overrides, and
prints the ratio of our non-pad tokens/s to the Trainer's, measured in the same round. Tweets are short (most
under 64 tokens), so for a cell of length L each text is several tweets of one label joined until about L
tokens: the sequence length of the cell is the length trained on. ``attention`` adapts the attention
projections (query, key, value); ``all-linear`` every linear layer of the encoder (also the attention output
and the feed-forward layers). A cell trains a few dozen steps, too few to compare held-out quality, so the grid
reports speed only; bench/classification.py compares quality on the recipe's shape.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from classification import collator  # noqa: E402

RECIPE = common.REPO / "recipes" / "classify.yaml"
TARGETS = {"attention": ["query", "key", "value"], "all-linear": ["query", "key", "value", "dense"]}
"""BERT module names (MiniLM-L6 is a BERT); ``dense`` is every other linear layer of the encoder."""


def long_texts(output: Path, length: int, tokenizer, examples: int, seed: int) -> Path:
    """A csv of texts of about ``length`` tokens: tweets of one label joined (label kept), from the builtin
    tweet-sentiment training split."""
    from finetune.config import DataConfig
    from finetune.data import load_raw

    path = output / f"tweets-{length}.csv"
    if path.is_file():
        return path
    train = load_raw(DataConfig(source="builtin:tweet-sentiment"), seed)["train"].shuffle(seed=seed)
    by_label: dict[str, list[str]] = {}
    for row in train:
        by_label.setdefault(str(row["label"]), []).append(row["text"])
    rows = []
    for label, texts in itertools.cycle(by_label.items()):
        joined, tokens = [], 0
        while texts and tokens < length:
            text = texts.pop()
            joined.append(text)
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if joined:
            rows.append({"text": " ".join(joined), "label": label})
        if len(rows) >= examples or not any(by_label.values()):
            break
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def cell_overrides(rank: int, target: str, length: int, batch: int, steps: int, data: Path) -> list[str]:
    return [f"train.max_steps={steps}", "train.eval_every_steps=null", "train.log_every_steps=1000000",
            "data.source=files", f"data.train_file={data}", "data.max_train_samples=null",
            "data.max_test_samples=64", "data.max_eval_samples=64", f"data.max_length={length}",
            f"train.batch_size={batch}", f"lora.r={rank}", f"lora.alpha={2 * rank}",
            f"lora.target_modules=[{','.join(TARGETS[target])}]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser, steps=20, rounds=1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--quick", action="store_true", help="one cell, 4 steps, 1 warm-up step: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.targets, args.lengths, args.batches = [8], ["attention"], [64], [16]
        args.steps, args.warmup_steps = 4, 1
    common.start(args, "classification grid: MiniLM-L6 + LoRA, ours vs Trainer + peft, non-pad tokens/s per cell")

    from transformers import AutoTokenizer

    from finetune.models import resolve_checkpoint
    from finetune.recipes import load_config

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(load_config(RECIPE).model).path)
    cells = list(itertools.product(args.ranks, args.targets, args.lengths, args.batches))
    print(f"  {len(cells)} cells x {args.rounds} round(s) x 2 sides, {args.steps} steps each", flush=True)
    baseline_precision = None
    table = []
    for rank, target, length, batch in cells:
        # enough examples for every step of the cell, plus the held-out splits
        data = long_texts(args.output, length, tokenizer, examples=max(400, 2 * batch * args.steps + 200),
                          seed=42)
        overrides = [*cell_overrides(rank, target, length, batch, args.steps, data), *args.overrides]
        name = f"r{rank}-{target}-len{length}-b{batch}"
        print(f"cell {name}", flush=True)
        bench = common.Bench(load_config(RECIPE, overrides), collator)
        bench.baseline_dtype = args.baseline_dtype
        lengths = bench.features["train"]["length"]
        if baseline_precision is None:  # warm-up of both sides, once
            common.run_ours(RECIPE, [*overrides, f"train.max_steps={args.warmup_steps}"], args.output, "warmup")
            baseline_precision = bench.pick_baseline_precision(args.baseline_precision, args.warmup_steps)
        sides = {"ours": lambda r: common.measure("ours", r, lambda: common.run_ours(RECIPE, overrides, args.output,
                                                                                   f"{name}-{r}")),
                 "baseline": lambda r: common.measure("baseline", r,
                                                      lambda: bench.run_baseline(args.steps, baseline_precision))}
        results = common.alternate(sides, args.rounds)
        ours = [r for r in results if r.side == "ours"]
        base = [r for r in results if r.side == "baseline"]
        ratio = statistics.median(o.tokens_per_second / b.tokens_per_second
                                  for o in ours for b in base if o.round == b.round)
        table.append((rank, target, length, batch, statistics.median(lengths),
                      statistics.median(r.tokens_per_second for r in ours),
                      statistics.median(r.tokens_per_second for r in base), ratio,
                      statistics.median(r.peak_rss for r in ours) / 2**20,
                      statistics.median(r.peak_rss for r in base) / 2**20))

    header = (f"{'rank':>5} {'targets':>11} {'len':>5} {'batch':>6} {'median len':>11} {'ours tok/s':>11} "
              f"{'Trainer tok/s':>14} {'ratio':>7} {'ours RSS MiB':>13} {'Trainer RSS MiB':>16}")
    print("\n" + header + "\n" + "-" * len(header))
    for rank, target, length, batch, median_length, ours, base, ratio, ours_rss, base_rss in table:
        print(f"{rank:>5} {target:>11} {length:>5} {batch:>6} {median_length:>11.0f} {ours:>11,.0f} {base:>14,.0f} "
              f"{ratio:>7.2f} {ours_rss:>13,.0f} {base_rss:>16,.0f}")
    worst = min(table, key=lambda row: row[7])
    print(f"\nsmallest ratio: {worst[7]:.2f} (rank {worst[0]}, {worst[1]}, length {worst[2]}, batch {worst[3]}); "
          f"ratios: median over {args.rounds} round(s) of ours/Trainer in the same round; Trainer precision "
          f"{baseline_precision}")
    print(f"load average at end: {common.load_average()}")
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
