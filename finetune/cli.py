"""Command line: ``finetune train | eval | predict | push | merge | export | serve | recipes | runs | compare |
report`` (also
``python -m finetune``)."""

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
RUN_OVERRIDES_HELP = ("settings of the run to change, e.g. eval.batch_size=8, or model.name_or_path=PATH for a Hub run "
                      "trained from a local base; model.trust_remote_code=true and model.allow_pickle=true only ever "
                      "come from here, never from the run's own config")
ONNX_RUN_HELP = RUN_HELP + ", or the model.onnx of an ONNX export (finetune export RUN --format onnx)"


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
    except OSError as exc:  # the machine said no: a full disk, a permission, a vanished file
        if args.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
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
    p.add_argument("overrides", nargs="*", metavar="key=value", help=RUN_OVERRIDES_HELP)
    p.add_argument("--split", choices=["test", "validation"], default="test")
    p.add_argument("--file", type=Path, help="evaluate on this labelled file instead of the run's data")
    p.add_argument("--output", type=Path, help="write one prediction per row (jsonl) here")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("predict", parents=[common], help="predict with a finished run")
    p.add_argument("run_dir", metavar="RUN", help=ONNX_RUN_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=RUN_OVERRIDES_HELP)
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
    g = p.add_argument_group("generation runs (they override the run's eval.* / data.system_prompt)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="cap on new tokens per answer")
    g.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (0: greedy)")
    g.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest token set of probability P")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="above 1, repeated tokens are less likely")
    g.add_argument("--system", metavar="TEXT", help="system prompt put before each prompt (chat models)")
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
    p.add_argument("overrides", nargs="*", metavar="key=value", help=RUN_OVERRIDES_HELP)
    p.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    p.add_argument("--revision", help="branch, tag or commit of a Hub run")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the merged weights are saved in (the merge itself is float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("export", parents=[common], help="export a run's merged model to GGUF or ONNX",
                       description="Merge the adapter into a float copy of the base, write GGUF (llama.cpp, Ollama; "
                                   "decoder runs of the Llama family) or ONNX (onnxruntime; classification and QA "
                                   "runs), read the file back and print the largest difference of its outputs.")
    p.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    p.add_argument("--format", required=True, choices=["gguf", "onnx"])
    p.add_argument("--out", type=Path, help="file (.gguf / .onnx) or folder to write (default: RUN/export/)")
    p.add_argument("--dtype", help="GGUF weight type: f16 (default), bf16, f32 or q8_0; ONNX is float32")
    p.add_argument("--revision", help="branch, tag or commit of a Hub run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export file")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("serve", parents=[common], help="serve a run over HTTP (OpenAI-compatible for generation)",
                       description="Serve a finished run: /v1/chat/completions, /v1/completions and /v1/models for "
                                   "generation runs, /v1/predict for every task, /health. Requests that arrive "
                                   "together are batched in one model worker.")
    p.add_argument("run_dir", metavar="RUN", help=ONNX_RUN_HELP)
    p.add_argument("--revision", help="branch, tag or commit of a Hub run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at startup)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request "
                                     "(default: $FINETUNE_API_KEY)")
    p.add_argument("--name", help="model id in /v1/models and responses (default: the run folder's name)")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="how long a request waits for others to share its batch (default 2)")
    p.add_argument("--max-batch-size", type=int, default=16, help="inputs (or sequences) per batch")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 503")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per /v1/predict request at most")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="request body size limit")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: one per core)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("recipes", parents=[common], help="list the shipped recipes")
    p.set_defaults(handler=cmd_recipes)

    p = sub.add_parser("runs", parents=[common], help="list the runs of a folder: finished, stopped, failed",
                       description="A table of the runs in DIR (default: runs): task, model, data, headline test "
                                   "metric beside its baseline, steps, wall time, size on disk and status, with the "
                                   "command that resumes a stopped or failed run.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("runs"), metavar="DIR")
    p.add_argument("--sort", default="time", help="time (default), name, status, task, model, data, metric, wall "
                                                  "or size")
    p.add_argument("--reverse", action="store_true", help="sort in descending order")
    p.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("compare", parents=[common], help="compare runs: metrics side by side, config differences")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN", help="two or more run folders")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("report", parents=[common], help="write a finished run's report.html",
                       description="Write report.html into the run folder: one self-contained page (no network) "
                                   "with curves, metrics beside baselines, per-class results, the worst errors, the "
                                   "data, the config and the environment. Training writes it too.")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="a finished run folder")
    p.set_defaults(handler=cmd_report)
    return parser


def configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("transformers", "datasets", "accelerate", "peft", "evaluate", "huggingface_hub", "urllib3",
                     "filelock", "fsspec", "matplotlib", "httpx", "httpx2", "gguf"):
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
    inputs = read_inputs(args)
    if args.output is not None:
        check_writable(args.output, "--output")
    run = load_for_inference(args.run_dir, [*args.overrides, *generation_overrides(args)], revision=args.revision)
    if args.input:
        inputs = match_input_columns(inputs, run.task.predict_columns(), str(args.input))
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


def check_writable(path: Path, option: str) -> None:
    """Before any work: ``path`` can be written (its folder exists, it is not a folder itself)."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {path.parent} does not exist")


def generation_overrides(args: argparse.Namespace) -> list[str]:
    """``--max-new-tokens`` and friends as ``key=value`` overrides of the run's config (values quoted as YAML
    strings where text). ``--temperature`` or ``--top-p`` turn sampling on; ``--temperature 0`` is greedy."""
    overrides = []
    if args.max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.temperature is not None:
        overrides += ["eval.do_sample=false"] if args.temperature == 0 else \
            [f"eval.temperature={args.temperature}", "eval.do_sample=true"]
    if args.top_p is not None:
        overrides += [f"eval.top_p={args.top_p}"] + ([] if args.temperature == 0 else ["eval.do_sample=true"])
    if args.repetition_penalty is not None:
        overrides.append(f"eval.repetition_penalty={args.repetition_penalty}")
    if args.system is not None:
        overrides.append(f"data.system_prompt={json.dumps(args.system)}")
    return overrides


def load_for_inference(ref: str, overrides: list[str], revision: str | None = None) -> Any:
    """A finished run (folder or Hub id), or an ONNX export of one (its ``.onnx`` file) run by onnxruntime."""
    if str(ref).endswith(".onnx"):
        from finetune.export import load_onnx_run

        if revision is not None:
            raise ConfigError(f"--revision applies to Hub ids; {ref} is an ONNX file")
        return load_onnx_run(Path(ref), overrides)
    from finetune.trained_run import load_run

    return load_run(ref, overrides, revision=revision)


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

    out = merge_run(args.run_dir, args.out, revision=args.revision, dtype=args.dtype, overwrite=args.overwrite,
                    overrides=args.overrides)
    print(f"merged model written to {out}: it loads with transformers' from_pretrained alone, no peft")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import export_run

    result = export_run(args.run_dir, args.format, out=args.out, dtype=args.dtype, revision=args.revision,
                        overwrite=args.overwrite)
    print(result.describe())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from finetune.serve import ServeSettings, serve

    api_key = args.api_key or os.environ.get("FINETUNE_API_KEY") or None
    settings = ServeSettings(host=args.host, port=args.port, api_key=api_key, name=args.name,
                             batch_window_ms=args.batch_window_ms, max_batch_size=args.max_batch_size,
                             max_queue=args.max_queue, max_tokens=args.max_tokens, max_inputs=args.max_inputs,
                             max_request_bytes=args.max_request_bytes, threads=args.threads)
    settings.validate()  # before the model loads
    serve(load_for_inference(args.run_dir, [], revision=args.revision), args.run_dir, settings)
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
        source = (raw.get("data") or {}).get("source", "?")
        print(f"{path.stem:<20} {task:<20} {model:<40} {source:<26} {about}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from finetune.runs import format_runs, list_runs

    infos = list_runs(args.dir, sort=args.sort, reverse=args.reverse)
    print(json.dumps([asdict(i) for i in infos], indent=2) if args.json else format_runs(infos))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from finetune.runs import compare, format_comparison

    comparison = compare(args.run_dirs)
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from finetune.report_page import write_report
    from finetune.run_folder import RunFolder

    if not args.run_dir.is_dir():
        raise ConfigError(f"run folder not found: {args.run_dir}")
    print(f"report written to {write_report(RunFolder(args.run_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
