"""`finetune predict` on a generation run takes --max-new-tokens, --temperature, --top-p, --repetition-penalty and
--system; they reach the model's generate call (checked there), and a run of another task refuses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers.generation.utils import GenerationMixin

from finetune.cli import main
from tiny_runs import train_task_run


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_task_run("generation", tmp_path_factory.mktemp("predict-controls"))


@pytest.fixture()
def generate_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every call of transformers' generate: its keyword arguments (the call itself still runs)."""
    calls: list[dict] = []
    real = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    return calls


def predict(run: Path, capsys: pytest.CaptureFixture, *options: str) -> dict:
    capsys.readouterr()
    assert main(["predict", str(run), "--prompt", "what color is the sky?", "--no-stream", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_defaults_are_the_runs_greedy_settings(generation_run: Path, generate_calls: list[dict],
                                               capsys: pytest.CaptureFixture) -> None:
    predict(generation_run, capsys)
    assert generate_calls[-1]["do_sample"] is False and generate_calls[-1]["max_new_tokens"] == 8
    assert "repetition_penalty" not in generate_calls[-1]


def test_sampling_controls_reach_generate(generation_run: Path, generate_calls: list[dict],
                                          capsys: pytest.CaptureFixture) -> None:
    row = predict(generation_run, capsys, "--max-new-tokens", "3", "--temperature", "0.7", "--top-p", "0.9",
                  "--repetition-penalty", "1.3")
    call = generate_calls[-1]
    assert call["max_new_tokens"] == 3 and row["new_tokens"] <= 3
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["top_p"] == 0.9
    assert call["repetition_penalty"] == 1.3
    predict(generation_run, capsys, "--temperature", "0")
    assert generate_calls[-1]["do_sample"] is False  # temperature 0: greedy


def test_system_prompt_goes_before_the_prompt(generation_run: Path, generate_calls: list[dict],
                                              capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    predict(generation_run, capsys, "--system", "Answer: briefly, in one line.")
    tokenizer = AutoTokenizer.from_pretrained(generation_run / "adapter")
    prompt = tokenizer.decode(generate_calls[-1]["input_ids"][0])
    assert "<|im_start|>system\nAnswer: briefly, in one line.<|im_end|>" in prompt  # a colon stays text
    assert prompt.index("system") < prompt.index("what color is the sky?")


def test_another_task_refuses_generation_controls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = train_task_run("classification", tmp_path)
    capsys.readouterr()
    assert main(["predict", str(run), "--text", "a good day", "--temperature", "0.7"]) == 2
    assert "'eval.temperature' belongs to task generation" in capsys.readouterr().err
