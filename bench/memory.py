"""Peak memory of a classification run does not grow with the number of steps.

    python bench/memory.py [--steps 40 160] [--threads N]

Trains the classify recipe for each number of steps in a fresh process (so each peak is its own) with small
validation and test sets (so training, not evaluation, sets the peak), and prints each run's peak resident
memory (the process's ru_maxrss) and, on a GPU, its peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

RECIPE = common.REPO / "recipes" / "classify.yaml"
# A longer run may peak a little higher only through allocator noise; a leak of even a few kilobytes per
# step would show as megabytes over the extra steps.
TOLERANCE = 0.05


def child(steps: int, output: Path, overrides: list[str]) -> None:
    """One run; prints its peaks as JSON on the last line."""
    import torch

    result = common.run_ours(RECIPE, [f"train.max_steps={steps}", "train.eval_every_steps=null",
                                      "data.max_eval_samples=64", "data.max_test_samples=64", *overrides],
                             output, f"memory-{steps}")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"steps": result["steps"], "peak_rss": peak_kib * 1024, "peak_gpu": gpu,
                      "train_seconds": result["train_seconds"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 160])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.output, args.overrides)
        return

    print(f"memory: classify recipe, peak memory per run length (fresh process each)\n"
          f"  load average at start: {common.load_average()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="finetune-memory-") as tmp:
        for steps in args.steps:
            command = [sys.executable, __file__, "--child", str(steps), "--output", tmp]
            command += [f"--threads={args.threads}"] if args.threads else []
            command += [f"--set={o}" for o in args.overrides]
            env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"run of {steps} steps failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\n{'steps':>8} {'peak RSS MiB':>14} {'peak GPU MiB':>14} {'train s':>9}")
    for row in rows:
        gpu = f"{row['peak_gpu'] / 2**20:,.0f}" if row["peak_gpu"] is not None else "-"
        print(f"{row['steps']:>8} {row['peak_rss'] / 2**20:>14,.0f} {gpu:>14} {row['train_seconds']:>9.1f}")
    growth = rows[-1]["peak_rss"] / rows[0]["peak_rss"] - 1
    ok = growth <= TOLERANCE
    print(f"peak RSS growth from {rows[0]['steps']} to {rows[-1]['steps']} steps: {100 * growth:+.1f}% "
          f"(tolerance {100 * TOLERANCE:.0f}%) {'ok' if ok else 'GROWS'}")
    print(f"load average at end: {common.load_average()}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
