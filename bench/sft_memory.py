"""SFT memory: the longest sequence that trains within a fixed memory budget, ours vs transformers' Trainer + peft
(SmolLM2-135M-Instruct + LoRA, one sample of that many tokens per step).

    python bench/sft_memory.py [--budget-mib 4096] [--lengths 256 512 1024 2048 4096] [--steps 2] [--threads N]
                               [--variant NAME:KEY=VALUE[,KEY=VALUE]]   # e.g. ckpt:train.gradient_checkpointing=true

For each side and length, in a fresh process (so each peak is its own): train ``--steps`` optimizer steps on
samples that fill ``data.max_length`` (a short prompt, a response of random words cut at the limit: nearly every
token a target), batch 1, and print the process's peak resident memory (ru_maxrss, loading included) and, on a
GPU, its peak allocated GPU memory. Lengths go up until a side's peak passes the budget; the longest length
under it is that side's answer. The baseline is what bench/generation.py runs: ``AutoModelForCausalLM`` +
``get_peft_model`` + ``Trainer`` with ``DataCollatorForSeq2Seq``, in fp32 or bf16 as ``--baseline-precision``
says (default: ours' precision, so the comparison is of memory, not of number formats).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from generation import collator  # noqa: E402

RECIPE = common.REPO / "recipes" / "generate.yaml"
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches under "
         "pale moonlight near old harbours and distant mountains").split()


def long_pairs(path: Path, length: int, count: int) -> Path:
    """``count`` prompt/response pairs whose response alone is longer than ``length`` tokens (words are >= 1)."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            response = " ".join(rng.choice(WORDS) for _ in range(length))
            handle.write(json.dumps({"prompt": f"tell me story number {i}", "response": response}) + "\n")
    return path


def overrides(length: int, steps: int, data: Path) -> list[str]:
    return [f"train.max_steps={steps}", "train.batch_size=1", f"data.max_length={length}", "data.source=files",
            f"data.train_file={data}", "data.validation_size=0.2", "data.test_size=0.2",
            "data.max_train_samples=null", "data.max_eval_samples=2", "data.max_test_samples=2",
            "train.eval_every_steps=null", "train.log_every_steps=1000000", "eval.before_training=false",
            "eval.generate_samples=0", "eval.batch_size=1"]


def child(side: str, length: int, steps: int, output: Path, extra: list[str], precision: str) -> None:
    """One run; prints its peaks as JSON on the last line."""
    import torch

    from finetune.accelerator import resolve_mixed_precision
    from finetune.recipes import load_config

    data = long_pairs(output / f"pairs-{length}.jsonl", length, count=steps + 4)
    settings = [*overrides(length, steps, data), *extra]
    if side == "baseline":
        bench = common.Bench(load_config(RECIPE, settings), collator)
        if precision == "ours":
            precision = "bf16" if resolve_mixed_precision(bench.config.train.mixed_precision) == "bf16" else "fp32"
        with common.quiet():
            bench.run_baseline(steps, precision, score=False)
    else:
        common.run_ours(RECIPE, settings, output, f"{side}-{length}")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"peak_rss": peak_kib * 1024, "peak_gpu": gpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-mib", type=float, default=4096, help="memory budget (peak RSS, MiB)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline-precision", choices=["ours", "bf16", "fp32"], default="ours")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="an extra side: our pipeline with these overrides")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), args.steps, args.output_dir, args.extra, args.baseline_precision)
        return
    import tempfile

    output = args.output_dir or Path(tempfile.mkdtemp(prefix="finetune-sft-memory-"))
    print(f"SFT memory: SmolLM2-135M-Instruct + LoRA, batch 1, {args.steps} steps per run, budget "
          f"{args.budget_mib:,.0f} MiB peak RSS\n  {common.device_name()}; load average at start: "
          f"{common.load_average()}", flush=True)
    sides = {"ours": [], "baseline": [], **common.parse_variants(args.variant)}
    rows: dict[str, dict[int, dict]] = {}
    for side, extra in sides.items():
        rows[side] = {}
        for length in sorted(args.lengths):
            command = [sys.executable, __file__, "--child", "ours" if side != "baseline" else "baseline", str(length),
                       "--steps", str(args.steps), "--output-dir", str(output),
                       "--baseline-precision", args.baseline_precision,
                       *(["--threads", str(args.threads)] if args.threads else []),
                       *(f"--extra={e}" for e in extra)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:  # killed for memory, or failed: the length does not train here
                print(f"  [{side}, length {length}] failed (exit {done.returncode}): "
                      f"{done.stderr.strip().splitlines()[-1:] or ''}", flush=True)
                rows[side][length] = {"peak_rss": None, "peak_gpu": None}
                break
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows[side][length] = result
            gpu = f", peak GPU {result['peak_gpu'] / 2**20:,.0f} MiB" if result["peak_gpu"] is not None else ""
            print(f"  [{side}, length {length}] peak RSS {result['peak_rss'] / 2**20:,.0f} MiB{gpu}", flush=True)
            if result["peak_rss"] > args.budget_mib * 2**20:
                break

    print(f"\n{'length':>8}" + "".join(f"{side + ' MiB':>16}" for side in sides))
    for length in sorted(args.lengths):
        cells = []
        for side in sides:
            peak = rows[side].get(length, {}).get("peak_rss")
            cells.append(f"{peak / 2**20:>16,.0f}" if peak else f"{'-':>16}")
        print(f"{length:>8}" + "".join(cells))
    for side in sides:
        fits = [length for length, r in rows[side].items() if r["peak_rss"] and r["peak_rss"] <= args.budget_mib * 2**20]
        print(f"longest sequence within {args.budget_mib:,.0f} MiB, {side}: {max(fits) if fits else 'none'} "
              f"(of the lengths tried: {', '.join(map(str, sorted(rows[side])))})")
    print(f"load average at end: {common.load_average()}")
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
