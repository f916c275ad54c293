"""data.streaming: the training data read as a ``datasets`` stream, never loaded whole, dealt out to the
processes, with exact mid-stream resume. Two CPU processes (torchrun, gloo) over generated JSON-lines files whose
texts encode their row ids (so batches can be traced back to rows)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FILLER, NEGATIVE, NEUTRAL, POSITIVE, build_tiny_bert
from launching import ROOT, Result, cpu_env, run_with_free_port, tail, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
TIMEOUT = 600
BIG_ROWS = 200_000
SMALL_ROWS = BIG_ROWS // 10
HOLDOUT = 50
"""data.streaming_holdout: rows 0-49 are the test split, 50-99 the validation split; training starts at row 100."""
DIGITS = FILLER[:10]
"""Words that spell a row id, one per decimal digit (words of the tiny tokenizer's vocabulary)."""


def id_words(row_id: int) -> str:
    return " ".join(DIGITS[int(d)] for d in f"{row_id:06d}")


def ids_of(tokenizer, input_ids) -> list[int]:
    """The row ids a batch's texts spell (the six tokens after [CLS])."""
    ids = []
    for row in input_ids.tolist():
        words = tokenizer.convert_ids_to_tokens(row[1:7])
        ids.append(int("".join(str(DIGITS.index(w)) for w in words)))
    return ids


def write_rows(path: Path, count: int) -> Path:
    """``count`` JSON lines of ~110 bytes: the id, a cue word giving the label, and a note the task ignores."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            label, words = rng.choice([("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)])
            note = "".join(rng.choice("abcdefghij") for _ in range(40))
            handle.write(json.dumps({"text": f"{id_words(i)} {rng.choice(words)}", "label": label, "note": note})
                         + "\n")
    return path


def overrides(model: Path, data: Path, out: Path, name: str, **extra: object) -> list[str]:
    values = {"model.name_or_path": model, "data.source": "files", "data.train_file": data, "data.streaming": "true",
              "data.streaming_holdout": HOLDOUT, "data.shuffle_buffer": 256, "data.max_length": 16,
              "train.max_steps": 24, "train.batch_size": 8, "train.eval_every_steps": 12, "train.save_every_steps": 8,
              "train.log_every_steps": 4, "train.learning_rate": 0.003, "train.warmup_ratio": 0,
              "train.mixed_precision": "no", "lora.method": "full", "eval.batch_size": 50,
              "data.max_eval_samples": None, "run.output_dir": out, "run.name": name, **extra}
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def launch(args: list[str], cache: Path, script: list[str] | None = None, **env: str) -> tuple[Result, float]:
    """Two processes through torchrun, from a wrapper that reports the peak RSS (MiB) of the largest of them
    (``RUSAGE_CHILDREN``: torchrun waits for its workers, so their peaks count)."""
    program = script or ["-m", "finetune", "train", "classify"]
    wrapper = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
               "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(code)")

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-c", wrapper, *torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                                          "--master_port", str(port), *program, *args)]]
    result = run_with_free_port(commands, cpu_env(HF_DATASETS_CACHE=str(cache), **env), TIMEOUT)[0]
    peaks = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("peak-rss-kib")]
    return result, int(peaks[-1]) / 1024 if peaks else float("nan")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("streaming")
    return {"folder": folder, "model": build_tiny_bert(folder / "tiny-bert"),
            "big": write_rows(folder / "big.jsonl", BIG_ROWS), "small": write_rows(folder / "small.jsonl", SMALL_ROWS)}


@pytest.fixture(scope="module")
def uninterrupted(setup: dict) -> dict:
    """24 steps over the big file and over the one of a tenth its size; each launch's peak RSS."""
    runs = {}
    for size in ("small", "big"):
        cache = setup["folder"] / f"cache-{size}"
        result, peak = launch(overrides(setup["model"], setup[size], setup["folder"], size), cache)
        assert result.returncode == 0, tail(result)
        runs[size] = {"dir": setup["folder"] / size, "peak_mib": peak, "cache": cache}
    print(f"peak RSS of a 2-process streamed run: {runs['small']['peak_mib']:.0f} MiB over {SMALL_ROWS} rows, "
          f"{runs['big']['peak_mib']:.0f} MiB over {BIG_ROWS} rows ({setup['big'].stat().st_size / 2**20:.0f} MiB)")
    return runs


def test_memory_does_not_grow_with_the_file(setup: dict, uninterrupted: dict) -> None:
    """The big file is streamed, not loaded: nothing of it lands in the datasets cache (a loaded file becomes
    Arrow files there), and peak RSS is that of the run over a tenth of it (measured: 607 and 607 MiB; holding
    the 200k rows as Python rows, ``list(open_stream(...))``, takes 163 MiB more)."""
    small, big = uninterrupted["small"], uninterrupted["big"]
    assert not list(big["cache"].rglob("*.arrow")), "the training file was loaded into the datasets cache"
    assert big["peak_mib"] - small["peak_mib"] < 30
    assert json.loads((big["dir"] / "metrics.json").read_text())["global_step"] == 24


def test_each_example_once_per_epoch_across_processes(setup: dict) -> None:
    """Two epochs of the training run's own stream batches, on both processes: every training row exactly once
    per epoch over both processes, none of the held-out rows, in another order each epoch; only the last few
    rows that do not fill a round of batches (< 2 processes x 8) are left out of an epoch."""
    folder = setup["folder"] / "ids"
    folder.mkdir()
    data = write_rows(folder / "rows.jsonl", 1100)
    result, _ = launch(overrides(setup["model"], data, folder, "ids"), folder / "cache",
                       script=[str(ROOT / "tests" / "stream_epoch_ids.py"), str(folder)])
    assert result.returncode == 0, tail(result)
    per_rank = [json.loads((folder / f"ids-{rank}.json").read_text()) for rank in (0, 1)]
    training_rows = set(range(2 * HOLDOUT, 1100))
    orders = []
    for epoch in ("0", "1"):
        seen = per_rank[0][epoch] + per_rank[1][epoch]
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch])  # the same number of batches each
        assert len(seen) == len(set(seen)), "an example was seen twice in an epoch"
        assert set(seen) <= training_rows, "a held-out example was trained on"
        assert len(training_rows - set(seen)) < 2 * 8
        orders.append(seen)
    assert orders[0] != orders[1], "the stream was not reshuffled for the second epoch"


def test_killed_and_resumed_ends_with_the_same_weights(setup: dict, uninterrupted: dict) -> None:
    """SIGKILL after step 13 (checkpoint of step 8, mid-stream and mid-shuffle-buffer), then --resume auto:
    the resumed run skips exactly the examples each process trained on and ends with the uninterrupted run's
    weights (1e-6; dropout on, so the restored RNG states count too)."""
    args = overrides(setup["model"], setup["big"], setup["folder"], "killed")
    killed, _ = launch(args, setup["folder"] / "cache-killed", FINETUNE_FAULT="kill-after-step:13")
    assert killed.returncode != 0
    resumed, _ = launch(args + ["--resume", "auto"], setup["folder"] / "cache-killed")
    assert resumed.returncode == 0, tail(resumed)
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    reference = load_file(str(uninterrupted["big"]["dir"] / "model" / "model.safetensors"))
    weights = load_file(str(setup["folder"] / "killed" / "model" / "model.safetensors"))
    assert set(reference) == set(weights)
    worst = max(float((reference[k] - weights[k]).abs().max()) for k in reference)
    print(f"killed at step 13, resumed from step 8: max |weight difference| {worst:.1e}")
    assert worst <= 1e-6


@pytest.mark.parametrize(("overrides_", "message"), [
    (["data.streaming=true"], "config key 'train.max_steps' must be a number of optimizer steps"),
    (["data.streaming=true", "train.max_steps=10", "data.shuffle_buffer=-1"], "config key 'data.shuffle_buffer'"),
    (["data.streaming=true", "train.max_steps=10", "data.streaming_holdout=0"], "config key 'data.streaming_holdout'"),
])
def test_streaming_settings_are_checked(overrides_: list[str], message: str) -> None:
    from finetune.errors import ConfigError
    from finetune.recipes import load_config, resolve_recipe

    path, _ = resolve_recipe("classify")
    with pytest.raises(ConfigError, match=message):
        load_config(path, ["data.source=files", "data.train_file=x.jsonl", *overrides_])
    generate, _ = resolve_recipe("generate")
    with pytest.raises(ConfigError, match="config key 'data.streaming' must be false: task generation"):
        load_config(generate, ["data.source=files", "data.train_file=x.jsonl", "data.streaming=true",
                               "train.max_steps=10"])
