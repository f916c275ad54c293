"""Do two versions of finetune give the same results? Trains tiny models of every task through the CLI
with fixed seeds, once with this checkout and once with another commit, and compares metrics.json (timing
fields left out) to 1e-6 and the test predictions exactly.

    python scripts/same_results.py --base 7486800            # a commit before a refactor
    python scripts/same_results.py --base HEAD~3 --only classify qa

The other commit is checked out into a temporary git worktree; both sides build the same tiny models from
configs (tests/conftest.py, tests/tiny_decoder.py, tests/tiny_translation.py) and the same data files.
Prints one line per run and exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING = ("eval_seconds", "generation_tokens_per_second")


def build_inputs(folder: Path) -> dict[str, Path]:
    """Tiny checkpoints and data files, built once and shared by both sides."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest
    import tiny_decoder
    import tiny_translation
    from test_question_answering import synthetic_qa

    paths = {name: folder / name for name in ("bert", "llama", "t5", "tllama")}
    conftest.build_tiny_bert(paths["bert"])
    tiny_decoder.build_checkpoint(paths["llama"])
    tiny_translation.build_tiny_t5(paths["t5"])
    tiny_translation.build_tiny_llama(paths["tllama"])
    paths["reviews"] = conftest.write_csv(folder / "reviews.csv", conftest.synthetic_reviews(240))
    paths["qa"] = folder / "qa.jsonl"
    paths["qa"].write_text("".join(json.dumps(r) + "\n" for r in synthetic_qa(80, True)), encoding="utf-8")
    paths["sft"] = folder / "sft.jsonl"
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in tiny_decoder.synthetic_pairs(160, seed=1)),
                            encoding="utf-8")
    paths["pairs"] = tiny_translation.write_pairs_jsonl(folder / "pairs.jsonl", tiny_translation.toy_pairs(60))
    return paths


def runs(p: dict[str, Path]) -> dict[str, list[str]]:
    """Recipe and overrides of each tiny run."""
    fp32 = ["train.mixed_precision=no"]
    classify = [f"model.name_or_path={p['bert']}", "data.source=files", f"data.train_file={p['reviews']}",
                "data.max_length=32", "train.batch_size=16", "train.epochs=2", "train.learning_rate=0.005",
                "train.eval_every_steps=5", "lora.r=4", "lora.alpha=8", "data.max_train_samples=null",
                "data.max_eval_samples=null", "eval.batch_size=32"]
    translate = ["data.source=files", f"data.train_file={p['pairs']}", "data.validation_size=0.1",
                 "data.test_size=0.2", "data.max_train_samples=null", "data.max_eval_samples=null",
                 "data.max_test_samples=null", "data.max_length=32", "train.batch_size=8", "train.epochs=1",
                 "train.eval_every_steps=null", "eval.max_new_tokens=8", "eval.batch_size=16", *fp32]
    sft = [f"model.name_or_path={p['llama']}", "data.source=files", f"data.train_file={p['sft']}",
           "data.system_prompt=null", "data.max_length=48", *fp32]
    return {
        "classify": ["classify", *classify, *fp32],
        "classify-bf16": ["classify", *classify, "train.mixed_precision=bf16"],
        "qa": ["qa", f"model.name_or_path={p['bert']}", "data.source=files", f"data.train_file={p['qa']}",
               "data.validation_size=0.2", "data.test_size=0.2", "data.max_length=32", "data.doc_stride=8",
               "train.epochs=1", "train.batch_size=8", "train.eval_every_steps=3", "lora.r=4", "lora.alpha=8",
               "eval.batch_size=16", *fp32],
        "sft-packed-full": ["generate", *sft, "data.shape=auto", "data.packing=true", "lora.method=full",
                            "train.epochs=2", "train.batch_size=16", "train.learning_rate=0.003",
                            "train.eval_every_steps=10", "eval.generate_samples=8", "eval.max_new_tokens=12",
                            "eval.batch_size=16"],
        "sft-lora": ["generate", *sft, "train.epochs=1", "train.batch_size=16", "eval.generate_samples=4",
                     "eval.max_new_tokens=8"],
        "plain-text": ["generate-text", f"model.name_or_path={p['llama']}", "data.source=files",
                       f"data.train_file={p['sft']}", "data.text_column=response", "data.max_length=32",
                       "train.epochs=1", "train.batch_size=8", *fp32],
        "translate-t5": ["translate-seq2seq", f"model.name_or_path={p['t5']}", *translate],
        "translate-llama": ["translate", f"model.name_or_path={p['tllama']}", *translate],
    }


def train_all(checkout: Path, out: Path, plan: dict[str, list[str]]) -> dict[str, dict]:
    results = {}
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1",
           "FINETUNE_CACHE": str(out / "cache")}
    for name, (recipe, *overrides) in plan.items():
        done = subprocess.run([sys.executable, "-m", "finetune", "train", recipe, *overrides,
                               f"run.output_dir={out}", f"run.name={name}"], cwd=checkout, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            results[name] = {"error": done.stderr.strip().splitlines()[-1]}
            continue
        metrics = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
        metrics.pop("throughput", None)
        for split in ("test", "before_training"):
            for key in TIMING:
                metrics.get(split, {}).pop(key, None)
        results[name] = {"metrics": metrics,
                         "predictions": (out / name / "predictions_test.jsonl").read_text(encoding="utf-8")}
    return results


def differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}.{k}: only on one side" for k in set(a) ^ set(b)]
        for key in set(a) & set(b):
            found += differences(a[key], b[key], f"{path}.{key}")
        return found
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-6 else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {str(a)[:80]!r} vs {str(b)[:80]!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the other commit (e.g. a commit before a refactor)")
    parser.add_argument("--only", nargs="*", help="run names to compare (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="finetune-same-") as tmp:
        tmp_path = Path(tmp)
        base = tmp_path / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            plan = runs(build_inputs(tmp_path / "inputs"))
            plan = {k: v for k, v in plan.items() if not args.only or k in args.only}
            theirs = train_all(base, tmp_path / "runs-base", plan)
            ours = train_all(REPO, tmp_path / "runs-this", plan)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    failed = 0
    for name in plan:
        diff = differences(theirs[name], ours[name])
        failed += bool(diff)
        test = ours[name].get("metrics", {}).get("test", {})
        shown = ", ".join(f"{k} {v:.6f}" for k, v in test.items() if isinstance(v, float))[:110]
        print(f"{name:18} {'SAME' if not diff else 'DIFFERENT'}  {shown or ours[name].get('error', '')}")
        for line in diff[:5]:
            print(f"    {line}")
    print(f"{len(plan) - failed} of {len(plan)} runs give the same metrics (1e-6) and predictions as {args.base}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
