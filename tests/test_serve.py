"""`finetune serve` on 127.0.0.1, driven by the real `openai` client and by raw HTTP: a tiny chat run (LoRA on
a tiny Llama) and a tiny classifier run, each served by the command in a subprocess. Answers are checked
against `finetune predict`'s (the task's own predict on the same run), not just for their shape."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

import tiny_serve_runs as tiny_runs

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

STARTUP_SECONDS = 120
API_KEY = "test-key-1234"
CHAT = [{"role": "user", "content": "what color is the sky?"}]


class Server:
    """`finetune serve RUN --port 0 ...` in a subprocess; the port is read from its first line of output."""

    def __init__(self, run: Path, *args: str, env: dict[str, str] | None = None):
        environment = {**os.environ, "PYTHONPATH": str(tiny_runs.ROOT), **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(run), "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        lines: queue.Queue[str | None] = queue.Queue()
        # None marks the end of stdout: a server that died at start fails the test at once, not after the timeout.
        threading.Thread(target=lambda: [*map(lines.put, self.process.stdout), lines.put(None)], daemon=True).start()
        self.stderr: list[str] = []
        stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)
        stderr_reader.start()
        try:
            first = lines.get(timeout=STARTUP_SECONDS)
        except queue.Empty:
            self.close()
            pytest.fail(f"finetune serve printed nothing within {STARTUP_SECONDS} s: {''.join(self.stderr)[-2000:]}")
        if first is None:
            stderr_reader.join(timeout=10)
            self.close()
            pytest.fail(f"finetune serve exited at start: {''.join(self.stderr)[-2000:]}")
        if not first.startswith("serving "):
            self.close()
            pytest.fail(f"unexpected first line {first!r}; stderr: {''.join(self.stderr)[-2000:]}")
        # "serving NAME (TASK) at http://127.0.0.1:PORT: endpoints..."
        self.name, self.url = re.match(r"serving (\S+) \(.*?\) at (http://127\.0\.0\.1:\d+): ", first).groups()

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None,
                key: str | None = None) -> tuple[int, dict]:
        """(status, JSON body) of one request, whatever the status."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert) -> SimpleNamespace:
    return SimpleNamespace(chat=tiny_runs.shared_run(tmp_path_factory, "chat"),
                           classifier=tiny_runs.shared_run(tmp_path_factory, "classifier", tiny_bert))


@pytest.fixture(scope="module")
def chat_server(runs):
    # A wide batching window, so that the concurrent requests of the batching test surely share a batch.
    server = Server(runs.chat, "--batch-window-ms", "150")
    yield server
    server.close()


@pytest.fixture(scope="module")
def classifier_server(runs):
    server = Server(runs.classifier, "--batch-window-ms", "150", "--max-inputs", "8",
                    "--max-request-bytes", "4000", env={"FINETUNE_API_KEY": API_KEY})
    yield server
    server.close()


@pytest.fixture(scope="module")
def loaded(runs) -> SimpleNamespace:
    """The same runs loaded in this process, for the answers `finetune predict` gives."""
    from finetune.trained_run import load_run

    return SimpleNamespace(chat=load_run(runs.chat), classifier=load_run(runs.classifier))


def predicted(run, inputs: list[dict]) -> list[dict]:
    return run.task.predict(run.model, inputs)


# --- chat run -------------------------------------------------------------------------------------------
def test_chat_completion_answers_like_finetune_predict(chat_server, loaded):
    expected = predicted(loaded.chat, [{"messages": CHAT}])[0]
    response = chat_server.client().chat.completions.create(model=chat_server.name, messages=CHAT)

    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny-chat"
    assert choice.message.role == "assistant" and choice.message.content.strip() == expected["generation"]
    assert choice.finish_reason == ("stop" if expected["ended_with_eos"] else "length")
    assert response.usage.prompt_tokens == len(loaded.chat.task.prompt_ids(CHAT))
    assert response.usage.completion_tokens == expected["new_tokens"]
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer(chat_server):
    client = chat_server.client()
    whole = client.chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=10)
    chunks = list(client.chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) > 1  # streamed
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # A client that leaves mid-stream does not stop the server.
    stream = client.chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()
    assert client.chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=2).choices


def test_completions_max_tokens_stop_and_stream(chat_server):
    client = chat_server.client()
    full = client.completions.create(model=chat_server.name, prompt="what color is the grass?", max_tokens=8,
                                     temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and full.usage.completion_tokens == 8 <= len(text)
    assert full.choices[0].finish_reason == "length"

    stop = text[len(text) // 2:][:2]  # a stop string inside the answer: the answer ends before it
    cut = client.completions.create(model=chat_server.name, prompt="what color is the grass?", max_tokens=8,
                                    temperature=0, stop=[stop, "never-generated"])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"

    streamed = client.completions.create(model=chat_server.name, prompt="what color is the grass?", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text

    several = client.completions.create(model=chat_server.name, prompt=["what color is the grass?", "hey"],
                                        max_tokens=3, temperature=0)
    assert [c.index for c in several.choices] == [0, 1] and several.usage.completion_tokens == 6


def test_sampling_settings_are_used(chat_server):
    client = chat_server.client()
    greedy = {client.chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=6,
                                             temperature=0).choices[0].message.content for _ in range(2)}
    assert len(greedy) == 1
    # At temperature 2 with top_p 1 the tiny model's flat next-token distribution gives different answers.
    sampled = {client.chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=6, temperature=2.0,
                                              top_p=1.0).choices[0].message.content for _ in range(4)}
    assert len(sampled) > 1


def test_models_lists_the_run(chat_server):
    client = chat_server.client()
    assert [model.id for model in client.models.list()] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").owned_by == "finetune"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny-chat"}, 400, "messages"),                                          # missing messages
    ({"messages": "what color is the sky?"}, 400, "messages"),                          # wrong type
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 100_000}, 400, "max_tokens"),                     # above --max-tokens
    ({"messages": CHAT, "max_tokens": 1000}, 400, "messages"),                          # beyond the context
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"messages": CHAT, "temperature": 3}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": CHAT, "stream": "yes"}, 400, "stream"),
    ({"messages": CHAT, "n": 2}, 400, "n"),
    ({"messages": CHAT, "model": "gpt-4"}, 404, "model"),
])
def test_bad_chat_requests_get_openai_errors(chat_server, body, status, param):
    code, answer = chat_server.request("POST", "/v1/chat/completions", body)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert "\n" not in answer["error"]["message"]


def test_malformed_requests_and_the_server_keeps_serving(chat_server):
    code, answer = chat_server.request("POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    code, answer = chat_server.request("POST", "/v1/chat/completions", body=["not", "an", "object"])
    assert code == 400 and "JSON object" in answer["error"]["message"]
    code, answer = chat_server.request("POST", "/v1/completions", {"prompt": "x" * 2000, "max_tokens": 2})
    assert code == 400 and answer["error"]["code"] == "context_length_exceeded"
    code, answer = chat_server.request("GET", "/v1/nothing")
    assert code == 404 and "no such endpoint" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError) as error:  # the openai client sees the same errors
        chat_server.client().chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=100_000)
    assert error.value.status_code == 400 and error.value.body["param"] == "max_tokens"

    response = chat_server.client().chat.completions.create(model=chat_server.name, messages=CHAT, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert chat_server.request("GET", "/health")[1]["status"] == "ok"


def test_concurrent_chats_share_a_batch_and_answer_as_alone(chat_server, loaded):
    prompts = ["what color is the sky?", "hey", "what color is the snow?", "good morning"]
    expected = [row["generation"] for row in predicted(loaded.chat, [{"prompt": p} for p in prompts])]
    batches_before = chat_server.request("GET", "/health")[1]["batches"]
    client = chat_server.client()

    def ask(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(model=chat_server.name, messages=messages).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert [answer.strip() for answer in answers] == expected  # left-padded together, greedy: the same answers
    health = chat_server.request("GET", "/health")[1]
    assert health["largest_batch"] > 1 and health["batches"] - batches_before < len(prompts)


# --- classifier run --------------------------------------------------------------------------------------
def test_predict_answers_like_finetune_predict(classifier_server, loaded):
    texts = ["the movie was great", "awful day", "a chair by the window"]
    expected = predicted(loaded.classifier, [{"text": t} for t in texts])  # one batch, as the server's
    code, answer = classifier_server.request("POST", "/v1/predict", {"text": texts[0]}, key=API_KEY)
    assert code == 200 and answer == predicted(loaded.classifier, [{"text": texts[0]}])[0]
    code, answer = classifier_server.request("POST", "/v1/predict", {"inputs": [{"text": t} for t in texts]},
                                             key=API_KEY)
    assert code == 200 and answer == {"predictions": expected}


@pytest.mark.parametrize("body, message", [
    ({"text": ""}, "input 1: a classification input needs a non-empty 'text'"),
    ({"inputs": [{"text": "good"}, {"text": 3}]}, "input 2: a classification input needs a non-empty 'text'"),
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": [{"text": "good"}] * 9}, "9 inputs in one request; at most 8 (--max-inputs)"),
    ({"text": "good " * 1000}, "larger than 4000 bytes"),
])
def test_bad_predict_requests(classifier_server, body, message):
    code, answer = classifier_server.request("POST", "/v1/predict", body, key=API_KEY)
    assert code in (400, 413) and message in answer["error"]["message"]


def test_completions_on_a_classifier_are_refused(classifier_server):
    with pytest.raises(openai.BadRequestError, match="classification run.*POST /v1/predict"):
        classifier_server.client(API_KEY).chat.completions.create(model=classifier_server.name, messages=CHAT)


def test_concurrent_predictions_are_batched_and_a_bad_one_fails_alone(classifier_server, loaded):
    texts = [f"the movie was {word}" for word in ("good", "bad", "fine", "awful", "nice", "sad", "ok", "poor")]
    expected = predicted(loaded.classifier, [{"text": t} for t in texts])
    before = classifier_server.request("GET", "/health", key=API_KEY)[1]

    def ask(text: str) -> tuple[int, dict]:
        return classifier_server.request("POST", "/v1/predict", {"text": text}, key=API_KEY)

    with ThreadPoolExecutor(len(texts) + 1) as pool:
        bad = pool.submit(ask, "")
        answers = list(pool.map(ask, texts))
    assert bad.result()[0] == 400
    assert [code for code, _ in answers] == [200] * len(texts)
    for (_, answer), want in zip(answers, expected):  # padded with other inputs: the same label and scores
        assert answer["label"] == want["label"]
        assert answer["scores"] == pytest.approx(want["scores"], abs=1e-5)
    after = classifier_server.request("GET", "/health", key=API_KEY)[1]
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < len(texts) + 1


def test_api_key_is_checked_on_every_request(classifier_server):
    with pytest.raises(openai.AuthenticationError) as error:
        classifier_server.client("wrong-key").models.list()
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    for path in ("/health", "/v1/models"):
        code, answer = classifier_server.request("GET", path)
        assert code == 401 and answer["error"]["message"].startswith("missing API key")
    code, _ = classifier_server.request("POST", "/v1/predict", {"text": "good"}, key="wrong-key")
    assert code == 401
    assert [model.id for model in classifier_server.client(API_KEY).models.list()] == ["tiny-classifier"]


# --- the worker and the command's own checks ----------------------------------------------------------------
def test_the_queue_is_bounded_and_batches_are_bounded():
    import torch

    from finetune.serve import ApiError, ModelWorker, PredictJob, ServeSettings

    run = SimpleNamespace(model=torch.nn.Linear(1, 1), task=None)
    worker = ModelWorker(run, ServeSettings(max_queue=5, max_batch_size=4, batch_window_ms=0))  # not started
    loop = asyncio.new_event_loop()
    try:
        jobs = [PredictJob(loop, [{"text": "a"}] * size) for size in (1, 2, 1, 1, 3)]
        for job in jobs:
            worker.submit(job)
        with pytest.raises(ApiError) as error:
            worker.submit(PredictJob(loop, [{"text": "a"}]))
        assert error.value.status == 503
        # 1 + 2 + 1 inputs fill a batch of 4; the next job waits for the next batch, which holds 1 + 3.
        assert worker._collect() == jobs[:3]
        assert worker._collect() == jobs[3:]
        assert worker._collect() == []
    finally:
        loop.close()


def test_serve_flags_and_a_busy_port_are_one_line_errors(runs, capsys):
    import socket

    from finetune.cli import main

    assert main(["serve", str(runs.classifier), "--max-batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-batch-size must be at least 1; got 0"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(runs.classifier), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


def test_the_load_test_runs_and_prints_its_table(runs):
    """bench/serve.py end to end at a tiny size (the numbers are BENCHMARKS.md's business, not a test's)."""
    result = subprocess.run([sys.executable, str(tiny_runs.ROOT / "bench" / "serve.py"), "--run", str(runs.classifier),
                             "--requests", "24", "--clients", "4", "--rounds", "1", "--warmup", "4",
                             "--time-limit", "300"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(tiny_runs.ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+1\s+(one|concurrent)", line)]
    assert [(row[1], row[-7:-5]) for row in rows] == [("one", ["24", "0"]), ("concurrent", ["24", "0"])]
    assert "4 concurrent clients / one at a time" in result.stdout and "failed requests: 0" in result.stdout
