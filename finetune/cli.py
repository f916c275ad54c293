"""Command line: ``finetune train | eval | predict | push | merge | recipes`` (also ``python -m finetune``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, FinetuneError

# Inputs `finetune predict` takes on the command line; each task reads the fields it needs.
INPUT_FIELDS = {
    "text": "a text to classify or translate",
    "text_pair": "second text of a sentence pair, one per --text",
    "prompt": "a prompt to complete",
    "question": "a question, one per --context",
    "context": "the passage that answers a --question",
}
RUN_HELP = "a finished run folder, or the ORG/NAME id of a run pushed to the Hub"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a positional list only before the first option, so `train classify --overwrite a=b`
    # leaves a=b over; key=value words after options are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    configure_logging(args.debug)
    try:
        return args.handler(args)
    except FinetuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained models with LoRA, offline.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", parents=[common], help="train from a recipe",
                       description="Train from a recipe (a shipped name or a YAML path) with key=value overrides.")
    p.add_argument("recipe", help="recipe name (see `finetune recipes`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=2 data.max_length=64")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run folder of the same name")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint of the run (auto) or from PATH")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", parents=[common], help="evaluate a finished run on a held-out split or a file")
    p.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    p.add_argument("--revision", help="branch, tag or commit of a Hub run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data overrides, e.g. data.text_column=review")
    p.add_argument("--split", choices=["test", "validation"], default="test")
    p.add_argument("--file", type=Path, help="evaluate on this labelled file instead of the run's data")
    p.add_argument("--output", type=Path, help="write one prediction per row (jsonl) here")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("predict", parents=[common], help="predict with a finished run")
    p.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    p.add_argument("--revision", help="branch, tag or commit of a Hub run")
    for field, about in INPUT_FIELDS.items():
        p.add_argument(f"--{field.replace('_', '-')}", action="append", help=f"{about} (repeatable)")
    p.add_argument("--input", type=Path, help="csv/json/jsonl/parquet/txt file of inputs, one per row, in the run's "
                                              "training format (its own column names), or - for standard input "
                                              "(JSON lines, or one text per line)")
    p.add_argument("--output", type=Path, help="write predictions as jsonl here (default: stdout)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="write generated tokens to stderr as they come (default: when stderr is a terminal); "
                        "the JSON rows still go to stdout or --output")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("push", parents=[common], help="upload a finished run to the Hugging Face Hub",
                       description="Upload a run's adapter (or model), tokenizer, label map, config, metrics and "
                                   "model card to a Hub repo (created if needed). Token: HF_TOKEN or `hf auth "
                                   "login`; HF_ENDPOINT picks the Hub.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="Hub repo id")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main if needed)")
    p.add_argument("--message", help="commit message (default: run name and test metrics)")
    p.set_defaults(handler=cmd_push)

    p = sub.add_parser("merge", parents=[common], help="merge a run's LoRA adapter into its base model",
                       description="Merge the adapter into a float copy of the base and save a plain transformers "
                                   "model (safetensors) + tokenizer that loads without peft.")
    p.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    p.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    p.add_argument("--revision", help="branch, tag or commit of a Hub run")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the merged weights are saved in (the merge itself is float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("recipes", parents=[common], help="list the shipped recipes")
    p.set_defaults(handler=cmd_recipes)
    return parser


def configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("transformers", "datasets", "accelerate", "peft", "evaluate", "huggingface_hub", "urllib3",
                     "filelock", "fsspec", "matplotlib", "httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.ERROR)
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def cmd_train(args: argparse.Namespace) -> int:
    from finetune.recipes import load_config, resolve_recipe
    from finetune.train import train

    path, recipe_name = resolve_recipe(args.recipe)
    config = load_config(path, args.overrides)
    train(config, recipe_name, overwrite=args.overwrite, resume=args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from finetune.evaluation import evaluate_run
    from finetune.report import format_metrics
    from finetune.trained_run import load_run

    run = load_run(args.run_dir, args.overrides, revision=args.revision)
    result = evaluate_run(run, split=args.split, file=args.file)
    print(f"{args.file or args.split}: {format_metrics(result.metrics)}")
    print(json.dumps({k: v for k, v in result.metrics.items() if k != "eval_seconds"}, indent=2))
    if args.output:
        write_rows(args.output, result.predictions)
        print(f"{len(result.predictions)} predictions written to {args.output}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from finetune.trained_run import load_run

    inputs = read_inputs(args)
    run = load_run(args.run_dir, revision=args.revision)
    if args.input:
        inputs = match_input_columns(inputs, run.task.input_columns(), str(args.input))
    stream = sys.stderr if args.stream or (args.stream is None and sys.stderr.isatty()) else None
    predictions = run.task.predict(run.model, inputs, stream=stream)
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row in predictions:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def read_inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--text/--prompt/--question/... or --input FILE -> a list of input rows (dicts)."""
    given = {field: getattr(args, field) for field in INPUT_FIELDS if getattr(args, field)}
    if args.input and given:
        raise ConfigError(f"give either --input or --{'/--'.join(given)}, not both")
    if given:
        counts = {field: len(values) for field, values in given.items()}
        if len(set(counts.values())) != 1:
            raise ConfigError("each input needs one value per field; got "
                              + ", ".join(f"{n} --{f.replace('_', '-')}" for f, n in counts.items()))
        count = next(iter(counts.values()))
        return [{field: values[i] for field, values in given.items()} for i in range(count)]
    if args.input:
        return read_input_file(args.input)
    raise ConfigError("nothing to predict: give --input FILE or " + " / ".join(f"--{f}" for f in INPUT_FIELDS))


def read_input_file(path: Path) -> list[dict[str, Any]]:
    """``--input``: a csv/json/jsonl/parquet/txt file, or ``-``: standard input as JSON lines (one object per line)
    or, when its first line is not a JSON object, one text per line."""
    if str(path) != "-":
        from finetune.data import load_file

        return [dict(row) for row in load_file(path)]
    lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not lines:
        raise ConfigError("--input -: standard input is empty")
    if not lines[0].lstrip().startswith("{"):
        return [{"text": line} for line in lines]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"--input -: line {number} is not JSON ({exc}); give JSON lines or one text per line")
        if not isinstance(row, dict):
            raise ConfigError(f"--input -: line {number} is not a JSON object")
        rows.append(row)
    return rows


def match_input_columns(rows: list[dict[str, Any]], columns: dict[str, str], where: str) -> list[dict[str, Any]]:
    """Read each input field from the run's own column (``columns``: field -> column, e.g. text -> review), or
    from a column named like the field; say on stderr which column was used."""
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    renames = {}
    for field, column in columns.items():
        if column in present:
            renames[column] = field
            print(f"{where}: {field} from column {column!r} (the run's own column)", file=sys.stderr)
        elif field in present:
            print(f"{where}: {field} from column {field!r} (the run's column {column!r} is absent)", file=sys.stderr)
        elif field == "text":
            raise ConfigError(f"{where}: no column {column!r} (the run's text column) nor {field!r}; it has: "
                              f"{', '.join(sorted(present)) or 'none'}")
    if not renames:
        return rows
    # A column named like a field that another column is read into is dropped (the run's own column wins).
    return [{renames.get(k, k): v for k, v in row.items() if k in renames or k not in renames.values()}
            for row in rows]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line."""
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def cmd_push(args: argparse.Namespace) -> int:
    from finetune.hub import describe_push, push

    result = push(args.run_dir, args.repo, private=args.private, revision=args.revision, message=args.message)
    print(describe_push(result))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from finetune.merge import merge_run

    out = merge_run(args.run_dir, args.out, revision=args.revision, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out}: it loads with transformers' from_pretrained alone, no peft")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    from finetune.recipes import RECIPES_DIR

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        first = path.read_text(encoding="utf-8").splitlines()[0]
        about = first.lstrip("# ").strip() if first.startswith("#") else ""
        task = (raw.get("run") or {}).get("task", "?")
        model = (raw.get("model") or {}).get("name_or_path", "?")
        print(f"{path.stem:<24} {task:<20} {model:<45} {about}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
