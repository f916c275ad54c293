"""Bad input, as a user meets it: every case runs the real CLI in a fresh process and must end with exactly
one ``error:`` line naming what is wrong, a non-zero exit code, no traceback, and no file outside the case's
own run folder changed (the user's data, a finished run, a user's own folder are left exactly as they were).

The cases run two at a time (each process pays the import of torch and transformers); one session fixture
runs them all, and each case is its own test that reads its result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from conftest import synthetic_reviews, tiny_overrides, write_csv

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~75 fresh processes: minutes; `make test-slow`, which CI runs
Args = Callable[[Path], list[str]]


def train(ws: Path, case: str, *extra: str, data: str = "good.csv") -> list[str]:
    """``finetune train classify`` on a tiny model, into the case's own run folder ``runs/<case>``."""
    overrides = tiny_overrides(ws / "bert", ws / data, ws / "runs", **{"train.epochs": 1})
    return ["train", "classify", *[o for o in overrides if not o.startswith("run.name=")], f"run.name={case}",
            *extra]


def recipe(ws: Path, name: str, *extra: str) -> list[str]:
    """A shipped recipe pointed at a file of the workspace and the tiny models."""
    model = ws / ("llama" if name in ("generate", "translate") else "bert")
    return ["train", name, f"model.name_or_path={model}", "data.source=files", f"run.output_dir={ws / 'runs'}",
            "train.max_steps=1", "train.mixed_precision=no", *extra]


# (arguments, fragments the error line must contain). Keys are the case names (and run names).
CASES: dict[str, tuple[Args, list[str]]] = {
    # --- recipe keys and values ---
    "epochs-infinite": (lambda ws: train(ws, "epochs-infinite", "train.epochs=.inf"),
                        ["'train.epochs' expects a finite number"]),
    "seed-negative": (lambda ws: train(ws, "seed-negative", "run.seed=-1"), ["'run.seed' must be an integer from 0"]),
    "unknown-key": (lambda ws: train(ws, "unknown-key", "train.epoch=3"), ["unknown config key 'train.epoch'"]),
    "unknown-section": (lambda ws: train(ws, "unknown-section", "trian.epochs=3"), ["unknown config section 'trian'"]),
    "not-a-number": (lambda ws: train(ws, "not-a-number", "train.epochs=three"), ["'train.epochs' expects a number"]),
    "not-an-integer": (lambda ws: train(ws, "not-an-integer", "train.batch_size=2.5"),
                       ["'train.batch_size' expects an integer"]),
    "unknown-choice": (lambda ws: train(ws, "unknown-choice", "train.scheduler=exponential"),
                       ["'train.scheduler' must be one of linear, cosine, constant"]),
    "negative-lr": (lambda ws: train(ws, "negative-lr", "train.learning_rate=-1"), ["'train.learning_rate' must be > 0"]),
    "test-size": (lambda ws: train(ws, "test-size", "data.test_size=1.5"), ["'data.test_size' must be in [0, 1)"]),
    "sizes-sum": (lambda ws: train(ws, "sizes-sum", "data.validation_size=0.6", "data.test_size=0.6"),
                  ["validation_size + test_size < 1"]),
    "lora-method": (lambda ws: train(ws, "lora-method", "lora.method=qlora"), ["'lora.method' must be one of"]),
    "lora-rank": (lambda ws: train(ws, "lora-rank", "lora.r=0"), ["'lora.r' must be > 0"]),
    "lora-dropout": (lambda ws: train(ws, "lora-dropout", "lora.dropout=1.5"), ["'lora.dropout' must be in [0, 1)"]),
    "grad-norm": (lambda ws: train(ws, "grad-norm", "train.max_grad_norm=0"), ["'train.max_grad_norm' must be > 0"]),
    "unknown-task": (lambda ws: train(ws, "unknown-task", "run.task=segmentation"), ["'run.task' must be one of"]),
    "metric-for-best": (lambda ws: train(ws, "metric-for-best", "train.metric_for_best=bleu"),
                        ["'train.metric_for_best' must be one of"]),
    "not-a-bool": (lambda ws: train(ws, "not-a-bool", "train.group_by_length=maybe"),
                   ["'train.group_by_length' expects true or false"]),
    "other-tasks-key": (lambda ws: train(ws, "other-tasks-key", "data.question_column=q"),
                        ["'data.question_column' belongs to task question-answering"]),
    "override-without-equals": (lambda ws: train(ws, "override-without-equals", "train.epochs"),
                                ["override 'train.epochs' is not of the form"]),
    "run-name-path": (lambda ws: train(ws, "run-name-path", "run.name=a/b"), ["'run.name' must be a plain folder name"]),
    "unknown-tracker": (lambda ws: train(ws, "unknown-tracker", "train.trackers=[nosuch]"),
                        ["'train.trackers' must be a list of accelerate trackers"]),
    "tracker-not-installed": (lambda ws: train(ws, "tracker-not-installed", "train.trackers=[comet_ml]"),
                              ["train.trackers: comet_ml is not installed"]),
    "eval-batch": (lambda ws: train(ws, "eval-batch", "eval.batch_size=0"), ["'eval.batch_size' must be > 0"]),
    "max-length-small": (lambda ws: train(ws, "max-length-small", "data.max_length=4"), ["'data.max_length' must be >= 8"]),
    "qa-stride": (lambda ws: recipe(ws, "qa", f"data.train_file={ws / 'qa.jsonl'}", "data.max_length=32",
                                    "data.doc_stride=32", "run.name=qa-stride"),
                  ["'data.doc_stride' must be below data.max_length (32)"]),
    "translate-same-language": (lambda ws: recipe(ws, "translate", f"data.train_file={ws / 'pairs.jsonl'}",
                                                  "data.target_lang=en", "run.name=translate-same-language"),
                                ["'data.target_lang' must be another language than data.source_lang"]),
    # --- recipes ---
    "unknown-recipe": (lambda ws: ["train", "sentiment"], ["unknown recipe 'sentiment'; shipped recipes:"]),
    "malformed-yaml": (lambda ws: ["train", str(ws / "bad.yaml")], ["bad.yaml: malformed YAML at line"]),
    "recipe-is-a-list": (lambda ws: ["train", str(ws / "list.yaml")], ["list.yaml: a recipe must be a mapping"]),
    "recipe-missing": (lambda ws: ["train", str(ws / "nothere.yaml")], ["recipe file not found"]),
    # --- data ---
    "unknown-builtin": (lambda ws: train(ws, "unknown-builtin", "data.source=builtin:imdb", "data.train_file=null"),
                        ["unknown built-in dataset 'imdb'"]),
    "empty-file": (lambda ws: train(ws, "empty-file", data="empty.csv"), ["empty.csv: the file is empty"]),
    "latin-1": (lambda ws: train(ws, "latin-1", data="latin.csv"), ["latin.csv: not UTF-8"]),
    "header-only": (lambda ws: train(ws, "header-only", data="header.csv"), ["header.csv: no rows"]),
    "blank-text": (lambda ws: train(ws, "blank-text", data="blank.csv"),
                   ["blank.csv", "row 2, column 'text': empty or missing text"]),
    "unknown-test-label": (lambda ws: train(ws, "unknown-test-label", f"data.test_file={ws / 'test.csv'}"),
                           ["test.csv: row 2, column 'label': label 'sarcastic' is not among the training labels"]),
    "missing-column": (lambda ws: train(ws, "missing-column", "data.label_column=stars"),
                       ["good.csv: no column 'stars' (data.label_column); it has: text, label"]),
    "one-class": (lambda ws: train(ws, "one-class", data="one.csv"), ["has 1 class (positive); need at least 2"]),
    "list-label": (lambda ws: train(ws, "list-label", data="lists.jsonl"),
                   ["lists.jsonl: row 2, column 'label': a label must be one value"]),
    "bad-json-line": (lambda ws: train(ws, "bad-json-line", data="broken.jsonl"),
                      ["broken.jsonl: line 3: not a JSON object"]),
    "folder-as-file": (lambda ws: train(ws, "folder-as-file", data="afolder"), ["afolder is a folder"]),
    "missing-file": (lambda ws: train(ws, "missing-file", data="nothere.csv"), ["data file not found"]),
    "unsupported-type": (lambda ws: train(ws, "unsupported-type", data="sheet.xlsx"),
                         ["sheet.xlsx: unsupported file type '.xlsx'"]),
    "files-without-file": (lambda ws: train(ws, "files-without-file", "data.train_file=null"),
                           ["'data.train_file' must be a file path when data.source is 'files'"]),
    "qa-bad-answer": (lambda ws: recipe(ws, "qa", f"data.train_file={ws / 'qa_bad.jsonl'}", "data.max_length=32",
                                        "data.doc_stride=8", "run.name=qa-bad-answer"),
                      ["qa_bad.jsonl: row 3, id 'b1': answer_start 3 does not match"]),
    "generate-missing-response": (lambda ws: recipe(ws, "generate", f"data.train_file={ws / 'sft_bad.jsonl'}",
                                                    "data.system_prompt=null", "run.name=generate-missing-response"),
                                  ["sft_bad.jsonl: row 2, column 'response': missing"]),
    "translate-missing-language": (lambda ws: recipe(ws, "translate", f"data.train_file={ws / 'pairs.jsonl'}",
                                                     "data.target_lang=fr", "run.name=translate-missing-language"),
                                   ["pairs.jsonl", "has no language 'fr' (data.target_lang)"]),
    # --- the model ---
    "model-missing": (lambda ws: train(ws, "model-missing", "model.name_or_path=/no/such/model"),
                      ["model path does not exist: /no/such/model"]),
    "attention-kernel": (lambda ws: train(ws, "attention-kernel", "model.attn_implementation=flash_attention_2"),
                         ["model.attn_implementation='flash_attention_2'"]),
    "beyond-positions": (lambda ws: train(ws, "beyond-positions", "data.max_length=512"),
                         ["'data.max_length' must be at most 128, the positions this model has"]),
    "pickle-only": (lambda ws: train(ws, "pickle-only", f"model.name_or_path={ws / 'pickled'}"),
                    ["only pickle weights (*.bin)", "model.allow_pickle=true"]),
    # --- the run folder ---
    "overwrite-a-user-folder": (lambda ws: train(ws, "x", f"run.output_dir={ws}", "run.name=mine", "--overwrite"),
                                ["is not a finetune run folder (notes.txt, photos/)"]),
    "resume-a-user-folder": (lambda ws: train(ws, "x", f"run.output_dir={ws}", "run.name=mine", "--resume", "auto"),
                             ["is not a finetune run folder"]),
    "resume-nothing": (lambda ws: train(ws, "resume-nothing", "--resume", "auto"),
                       ["--resume: there is no run at", "to resume"]),
    "finished-run-again": (lambda ws: train(ws, "done"), ["holds a finished run; choose another run.name"]),
    "output-dir-is-a-file": (lambda ws: train(ws, "x", f"run.output_dir={ws / 'good.csv'}"),
                             ["cannot create the run folder", "(run.output_dir)"]),
    "resume-from-non-checkpoint": (lambda ws: train(ws, "resume-from-non-checkpoint", "--resume", str(ws / "afolder")),
                                   ["not a complete checkpoint (no trainer_state.json)"]),
    # --- finished runs: eval, predict, merge, push ---
    "eval-unfinished": (lambda ws: ["eval", str(ws / "runs" / "half")], ["is not a finished run"]),
    "eval-not-a-run": (lambda ws: ["eval", str(ws / "afolder")], ["is not a run folder"]),
    "eval-file-unknown-label": (lambda ws: ["eval", str(ws / "runs" / "done"), "--file", str(ws / "test.csv")],
                                ["test.csv: row 2, column 'label': label 'sarcastic'"]),
    "predict-empty-text": (lambda ws: ["predict", str(ws / "runs" / "done"), "--text", "  "],
                           ["input 1: a classification input needs a non-empty 'text'"]),
    "predict-output-folder-missing": (lambda ws: ["predict", str(ws / "runs" / "done"), "--text", "hi", "--output",
                                                  str(ws / "nofolder" / "out.jsonl")],
                                      ["--output", "nofolder does not exist"]),
    "predict-nothing": (lambda ws: ["predict", str(ws / "runs" / "done")], ["nothing to predict"]),
    "predict-two-inputs": (lambda ws: ["predict", str(ws / "runs" / "done"), "--text", "a", "--input",
                                       str(ws / "good.csv")], ["give either --input or --text"]),
    "predict-truncated-adapter": (lambda ws: ["predict", str(ws / "runs" / "truncated"), "--text", "hi"],
                                  ["could not be loaded (damaged or incomplete files?)"]),
    "predict-adapter-config-not-json": (lambda ws: ["predict", str(ws / "runs" / "badjson"), "--text", "hi"],
                                        ["could not be loaded"]),
    "predict-without-task-file": (lambda ws: ["predict", str(ws / "runs" / "notask"), "--text", "hi"],
                                  ["has no task.json"]),
    "predict-labels-do-not-fit": (lambda ws: ["predict", str(ws / "runs" / "fivelabels"), "--text", "hi"],
                                  ["does not fit the model", "size mismatch"]),
    "predict-killed-in-final-save": (lambda ws: ["predict", str(ws / "runs" / "killed"), "--text", "hi"],
                                     ["is not a finished run (no metrics.json)"]),
    "predict-missing-run": (lambda ws: ["predict", str(ws / "nowhere"), "--text", "hi"], ["run folder not found"]),
    "merge-into-a-full-folder": (lambda ws: ["merge", str(ws / "runs" / "done"), "--out", str(ws / "mine")],
                                 ["exists and is not empty"]),
    "push-unfinished": (lambda ws: ["push", str(ws / "runs" / "half"), "--repo", "org/x"],
                        ["is not a finished run"]),
    "push-bad-repo-id": (lambda ws: ["push", str(ws / "runs" / "done"), "--repo", "not a repo"],
                         ["--repo must be ORG/NAME"]),
}


def workspace(root: Path) -> Path:
    """Tiny models, data files good and bad, a finished run and damaged copies of it, a user's own folder."""
    from conftest import build_tiny_bert
    from tiny_decoder import build_checkpoint
    from tiny_translation import toy_pairs, write_pairs_jsonl

    ws = root / "ws"
    ws.mkdir()
    build_tiny_bert(ws / "bert")
    build_checkpoint(ws / "llama")
    write_csv(ws / "good.csv", synthetic_reviews(60))
    (ws / "empty.csv").write_text("", encoding="utf-8")
    (ws / "header.csv").write_text("text,label\n", encoding="utf-8")
    (ws / "latin.csv").write_bytes("text,label\ncaf\xe9,a\nol\xe9,b\n".encode("latin-1"))
    write_csv(ws / "test.csv", [("good movie", "positive"), ("meh", "sarcastic")])
    write_csv(ws / "blank.csv", [("fine", "positive"), ("", "negative"), ("bad", "negative")])
    write_csv(ws / "one.csv", [(text, "positive") for text, _ in synthetic_reviews(20)])
    (ws / "lists.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": ["neg"]}\n',
                                    encoding="utf-8")
    (ws / "broken.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'
                                     '{"text": "oops", "label": \n', encoding="utf-8")
    (ws / "afolder").mkdir()
    (ws / "sheet.xlsx").write_bytes(b"PK\x03\x04")
    (ws / "bad.yaml").write_text("run:\n  task: classification\n train: [\n", encoding="utf-8")
    (ws / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    good_qa = {"context": "Paris is in France.", "question": "Where is Paris?",
               "answers": {"text": ["France"], "answer_start": [12]}}
    bad_qa = dict(good_qa, id="b1", answers={"text": ["France"], "answer_start": [3]})
    (ws / "qa.jsonl").write_text("".join(json.dumps(dict(good_qa, id=f"g{i}")) + "\n" for i in range(8)),
                                 encoding="utf-8")
    (ws / "qa_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                             [dict(good_qa, id="g1"), dict(good_qa, id="g2"), bad_qa]),
                                     encoding="utf-8")
    (ws / "sft_bad.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "hey"}\n',
                                      encoding="utf-8")
    write_pairs_jsonl(ws / "pairs.jsonl", toy_pairs(20))
    pickled = ws / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ws / "bert" / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    mine = ws / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("my own notes\n", encoding="utf-8")
    (mine / "config.yaml").write_text("run:\n  task: classification\n", encoding="utf-8")

    done = cli(*train(ws, "done"))
    assert done.returncode == 0, done.stderr
    runs = ws / "runs"
    (runs / "half").mkdir()
    (runs / "half" / "config.yaml").write_text("run:\n  task: classification\n", encoding="utf-8")

    def damaged(name: str, damage: Callable[[Path], None]) -> None:
        shutil.copytree(runs / "done", runs / name)
        damage(runs / name)

    damaged("truncated", lambda run: (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 16))
    damaged("badjson", lambda run: (run / "adapter" / "adapter_config.json").write_text("{not json", encoding="utf-8"))
    damaged("notask", lambda run: (run / "adapter" / "task.json").unlink())
    damaged("fivelabels", lambda run: five_labels(run / "adapter" / "task.json"))
    damaged("killed", lambda run: (run / "metrics.json").unlink())
    return ws


def five_labels(task_file: Path) -> None:
    """A task.json that is well formed but names five labels for a three-label head."""
    saved = json.loads(task_file.read_text(encoding="utf-8"))
    saved["learned"]["labels"] = ["a", "b", "c", "d", "e"]
    task_file.write_text(json.dumps(saved), encoding="utf-8")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` but the run folders of the cases: relative path -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not _case_run(str(p.relative_to(folder)))}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """Every case run once, two at a time; for each, the files outside its run folder that changed."""
    ws = workspace(tmp_path_factory.mktemp("bad-input"))
    # Cases run concurrently, so each is checked against the whole workspace but the run folders of the
    # train cases (runs/<case>, where only that case writes).
    before = snapshot(ws)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(CASES, pool.map(lambda case: cli(*CASES[case][0](ws)), CASES)))
    after = snapshot(ws)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    # A change outside every case's run folder cannot be told apart between cases: it fails them all.
    return {case: (result, changed) for case, result in done.items()}


def _case_run(relative: str) -> bool:
    parts = Path(relative).parts
    return len(parts) > 1 and parts[0] == "runs" and parts[1] in CASES


def test_there_are_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case: str, results: dict) -> None:
    result, changed = results[case]
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in CASES[case][1]:
        assert fragment in errors[0], errors[0]
    assert changed == [], f"files outside the run folder changed: {changed}"
