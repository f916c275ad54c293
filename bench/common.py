"""Shared parts of the side-by-side benchmarks: our pipeline against transformers' Trainer + peft.

Every benchmark trains both sides in this one process on the same checkpoint, data (the same tokenized
features), LoRA configuration, batch size, sequence limit, learning rate, schedule and number of optimizer
steps; then both trained models are scored by the same held-out evaluation code. The sides run in rounds
that alternate their order (ours, baseline | baseline, ours | ...), each after an unmeasured warm-up run
of both, so background load on a shared machine hits both alike; the ratio is taken per round.

Throughput counts training only (forward, backward, optimizer), not evaluation, checkpoints or loading:
our loop excludes its evaluation and checkpoint time itself (``metrics.json`` ``throughput``); the
baseline is timed from the first to the last optimizer step by a callback, with evaluation and saving
turned off. Wall time is the whole run: loading, tokenization, training, final evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent


# --- the machine --------------------------------------------------------------------------------------
def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best measured FLOP/s of square matmuls in ``dtype`` on the training device (the MFU denominator)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # first call sets up the kernel (outside the timed window: it can take longer than the window)
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:  # at least one timed call
        synchronize()
        start = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            a @ b
        synchronize()
        best = max(best, (4 if device == "cuda" else 1) * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Give freed memory back to the OS between runs, so each run's peak RSS is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 10 ms), and peak CUDA memory."""

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_gpu: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        release_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        process = psutil.Process()
        self.peak_rss = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.01):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.peak_gpu = torch.cuda.max_memory_allocated()


# --- one measured run -------------------------------------------------------------------------------
@dataclass
class Result:
    """One training run of one side."""

    side: str
    round: int
    steps: int
    train_seconds: float
    cpu_seconds: float
    """Process CPU time over the training span: what the run got of the machine's cores."""
    tokens: int
    samples: int
    wall_seconds: float
    peak_rss: int
    peak_gpu: int | None
    metrics: dict[str, float]
    load: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.tokens / self.cpu_seconds


def measure(side: str, round_: int, run: Callable[[], dict[str, Any]]) -> Result:
    """Run one side; ``run`` returns steps, train_seconds, tokens, samples and held-out metrics."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        out = run()
        wall = time.perf_counter() - start
    result = Result(side, round_, out["steps"], out["train_seconds"], out["cpu_seconds"], out["tokens"],
                    out["samples"], wall, memory.peak_rss, memory.peak_gpu, out["metrics"])
    print(f"  [{side}, round {round_}] {result.tokens_per_second:,.0f} tokens/s, {result.train_seconds:.1f} s "
          f"training, {wall:.1f} s wall, peak RSS {result.peak_rss / 2**20:,.0f} MiB, "
          f"load {result.load:.2f}, metrics {json.dumps(result.metrics)}", flush=True)
    release_memory()
    return result


def alternate(sides: dict[str, Callable[[int], Result]], rounds: int) -> list[Result]:
    """Run every side once per round, reversing the order every other round (A B | B A | A B ...)."""
    results = []
    names = list(sides)
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            results.append(sides[name](round_))
    return results


# --- our side --------------------------------------------------------------------------------------
def run_ours(recipe: str | Path, overrides: list[str], output_dir: Path, name: str) -> dict[str, Any]:
    """Train with the pipeline (``finetune train``) and read back its throughput and test metrics."""
    from finetune.recipes import load_config
    from finetune.train import train

    config = load_config(recipe, [*overrides, f"run.output_dir={output_dir}", f"run.name={name}"])
    with quiet():
        run_dir = train(config, Path(recipe).stem, overwrite=True)
    from finetune.run_folder import RunFolder

    summary = json.loads(RunFolder(run_dir).metrics.read_text(encoding="utf-8"))
    throughput = summary["throughput"]
    return {"steps": summary["global_step"], "train_seconds": throughput["train_seconds"],
            "cpu_seconds": throughput["train_cpu_seconds"],
            "tokens": throughput["tokens"], "samples": throughput["samples"],
            "metrics": {k: v for k, v in summary["test"].items() if isinstance(v, float)}}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence progress bars and per-run chatter (the bench prints its own lines)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


# --- the baseline's timing -------------------------------------------------------------------------
def baseline_timer():
    """A TrainerCallback timing the optimizer steps (first step start to last step end)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.end = 0.0
            self.steps = 0
            self.durations: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.step_start = time.perf_counter()
            if self.start is None:
                self.start, self.cpu_start = self.step_start, time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.durations.append(self.end - self.step_start)
            self.steps = state.global_step

        @property
        def seconds(self) -> float:
            return self.end - (self.start or self.end)

        @property
        def cpu_seconds(self) -> float:
            return self.cpu_end - self.cpu_start

        @property
        def median_step(self) -> float:
            """Median step time after the first (which sets up kernels)."""
            return statistics.median(self.durations[1:] or self.durations)

    return StepTimer()


def counting_trainer():
    """A ``Trainer`` subclass that counts the non-pad tokens and examples of every batch it trains on. It
    counts where the batch arrives, not in the collator: with dataloader workers the collator runs in other
    processes. Counts stay on the device until read, so counting adds no synchronisation per step."""
    from transformers import Trainer

    class CountingTrainer(Trainer):
        tokens: torch.Tensor | int = 0
        samples = 0

        def training_step(self, model, inputs, *args, **kwargs):
            # a padding-free collator (DataCollatorWithFlattening) sends one row without padding or mask
            real = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
            self.tokens = self.tokens + real
            self.samples += inputs["input_ids"].shape[0]
            return super().training_step(model, inputs, *args, **kwargs)

    return CountingTrainer


# --- the shared setup -------------------------------------------------------------------------------
class Bench:
    """Data, checkpoint, baseline and evaluation shared by both sides of one benchmark (built once, outside
    every measured run). ``collator`` is the data collator a Trainer user would pick for the task."""

    def __init__(self, config, collator: Callable[[Any, int | None], Callable],
                 baseline_train: Any = None) -> None:
        import datasets
        from transformers import logging as hf_logging

        from finetune.data import load_raw, load_splits
        from finetune.models import resolve_checkpoint
        from finetune.tasks import new_task

        datasets.disable_progress_bars()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.config = config
        self.make_collator = collator
        self.checkpoint = resolve_checkpoint(config.model)
        raw = load_raw(config.data, config.run.seed)
        self.task = new_task(config, self.checkpoint, raw)
        self.tokenizer = self.task.tokenizer
        self.splits = load_splits(self.task, config, raw)
        self.features = datasets.DatasetDict({name: self.task.features(split, name)
                                              for name, split in self.splits.items()})
        self.baseline_train = self.features["train"] if baseline_train is None else baseline_train
        """The baseline's training features: ours, or (SFT) the unpacked ones a Trainer user starts from."""
        self.baseline_batch_size: int | None = None
        """The baseline's batch size when not the recipe's (SFT: as many samples per step as our packed rows)."""

    def describe(self, steps: int) -> str:
        t, d = self.config.train, self.config.data
        return (f"  data: {len(self.features['train'])} train / {len(self.features['test'])} test features; "
                f"{steps} steps of batch {t.batch_size} x {t.gradient_accumulation_steps}; max_length "
                f"{d.max_length}; pad to multiple of {t.pad_to_multiple_of}; group by length {t.group_by_length}")

    def build_model(self) -> torch.nn.Module:
        """What a Trainer user writes: the task's Auto class (same head arguments), then peft's
        ``get_peft_model`` with the recipe's LoRA settings."""
        from peft import LoraConfig, get_peft_model

        from finetune.models import DEFAULT_TARGET_MODULES

        dtype = {"bf16": torch.bfloat16}.get(getattr(self, "baseline_dtype", "auto"), "auto")
        model = self.task.auto_class.from_pretrained(self.checkpoint.path, gguf_file=self.checkpoint.gguf_file,
                                                     dtype=dtype, **self.task.model_kwargs())
        lora = self.config.lora
        targets = lora.target_modules or DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")
        return get_peft_model(model, LoraConfig(task_type=self.task.peft_task_type, r=lora.r,
                                                lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets))

    def flops_per_token(self) -> float:
        """Training FLOPs per token on a batch of equally long examples (no padding) of the median length."""
        train = self.baseline_train  # unpacked: each row one example with its attention mask
        lengths = sorted(train["length"])
        median = lengths[len(lengths) // 2]
        rows = train.filter(lambda r: r["length"] == median)
        batch = self.task.collate(list(rows.select(range(min(8, len(rows))))))
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return training_flops_per_token(self.build_model(), batch)

    def pick_baseline_precision(self, choice: str, steps: int) -> str:
        """The baseline's faster precision on this machine (bf16 autocast vs fp32), from short warm-up runs."""
        if choice != "auto":
            self.run_baseline(steps, choice, score=False)
            return choice
        has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() or \
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if not has_bf16:
            self.run_baseline(steps, "fp32", score=False)
            return "fp32"
        speed: dict[str, list[float]] = {}
        for precision in ("bf16", "fp32", "bf16", "fp32"):
            speed.setdefault(precision, []).append(self.run_baseline(steps, precision, score=False)["step_seconds"])
        best = {p: min(v) for p, v in speed.items()}
        choice = min(best, key=best.get)
        print(f"  baseline precision: {choice} (median step after the first: bf16 {best['bf16']:.3f} s, "
              f"fp32 {best['fp32']:.3f} s)", flush=True)
        return choice

    def run_baseline(self, steps: int, precision: str, score: bool = True) -> dict[str, Any]:
        """transformers' Trainer on the same features and settings; its own evaluation and saving off.
        ``score``: evaluate the trained model on the test split (not for warm-up runs)."""
        from transformers import TrainingArguments, set_seed

        from finetune.accelerator import reset_accelerator_state
        from finetune.batching import dataloader_workers

        reset_accelerator_state()  # the Trainer makes its own Accelerator
        t = self.config.train
        set_seed(self.config.run.seed)  # the LoRA initialisation too, as our loop seeds it
        model = self.build_model()
        collator = self.make_collator(self.tokenizer, t.pad_to_multiple_of)
        timer = baseline_timer()
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, max_steps=steps, per_device_train_batch_size=self.baseline_batch_size or t.batch_size,
                gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
                weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * steps), lr_scheduler_type=t.scheduler,
                max_grad_norm=t.max_grad_norm or 0.0, bf16=precision == "bf16",
                train_sampling_strategy="group_by_length" if t.group_by_length else "random",
                dataloader_num_workers=dataloader_workers(self.config), seed=self.config.run.seed, eval_strategy="no",
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), tf32=True if torch.cuda.is_available() else None)
            trainer = counting_trainer()(model=model, args=args, train_dataset=self.baseline_train,
                                         data_collator=collator, processing_class=self.tokenizer, callbacks=[timer])
            with quiet():
                trainer.train()
        metrics = self.evaluate(trainer.model) if score else {}
        return {"steps": timer.steps, "train_seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
                "tokens": int(trainer.tokens), "samples": trainer.samples, "metrics": metrics,
                "step_seconds": timer.median_step}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Our held-out evaluation (the same code that scores our runs) on the baseline's trained model."""
        from finetune.accelerator import make_accelerator
        from finetune.batching import eval_dataloader
        from finetune.evaluation import evaluate

        accelerator = make_accelerator(self.config.train.mixed_precision)
        loader = eval_dataloader(self.task, self.features["test"], self.config.eval.batch_size)
        model, loader = accelerator.prepare(model, loader)
        result = evaluate(self.task, model, loader, accelerator, self.splits["test"], self.features["test"])
        return {k: v for k, v in result.metrics.items() if isinstance(v, float)}


def compare(bench: Bench, recipe: Path, args: argparse.Namespace, overrides: list[str], headline: list[str],
            higher_is_better: dict[str, bool], tolerance: dict[str, float]) -> bool:
    """Warm-up, the baseline's precision, measured rounds of every side, the table. Returns whether our
    held-out metrics are within tolerance of the baseline's."""
    from finetune.accelerator import resolve_mixed_precision
    from finetune.recipes import load_config

    peaks = args.peaks
    bench.baseline_dtype = args.baseline_dtype
    baseline_steps = getattr(args, "baseline_steps", None) or args.steps
    print(bench.describe(args.steps), flush=True)
    if bench.baseline_train is not bench.features["train"]:
        print(f"  baseline: {len(bench.baseline_train)} train features (unpacked), {baseline_steps} steps of batch "
              f"{bench.baseline_batch_size or bench.config.train.batch_size}", flush=True)
    flops = bench.flops_per_token()
    warm = [f"train.max_steps={args.warmup_steps}", "data.max_eval_samples=64", "data.max_test_samples=64"]
    print(f"warm-up ({args.warmup_steps} steps per side, not measured)", flush=True)
    run_ours(recipe, [*overrides, *warm], args.output, "warmup")
    baseline_precision = bench.pick_baseline_precision(args.baseline_precision, args.warmup_steps)

    variants = parse_variants(args.variant)
    sides = {"ours": lambda r: measure("ours", r, lambda: run_ours(recipe, overrides, args.output, f"ours-{r}")),
             "baseline": lambda r: measure("baseline", r, lambda: bench.run_baseline(baseline_steps, baseline_precision))}
    for name, extra in variants.items():
        sides[name] = lambda r, n=name, e=extra: measure(n, r, lambda: run_ours(recipe, [*overrides, *e],
                                                                                args.output, f"{n}-{r}"))
    print(f"measured rounds ({args.rounds}), order alternating", flush=True)
    results = alternate(sides, args.rounds)

    precisions = {name: resolve_mixed_precision(load_config(recipe, [*overrides, *extra]).train.mixed_precision)
                  for name, extra in {"ours": [], **variants}.items()}
    precisions["baseline"] = baseline_precision
    ok = summarize(results, "baseline", headline, higher_is_better, tolerance, flops, peaks, precisions)
    print(f"load average at end: {load_average()}")
    print(f"command: python {' '.join(sys.argv)}")
    return ok


# --- FLOPs -----------------------------------------------------------------------------------------
def training_flops_per_token(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one training step (forward + backward) per token, counted by torch's FlopCounterMode
    on a batch without padding (so the figure is per useful token; the optimizer's FLOPs are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    batch = {k: v for k, v in batch.items() if k not in ("non_pad_tokens", "packed_samples")}
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / int(batch["attention_mask"].sum())


# --- report ----------------------------------------------------------------------------------------
def summarize(results: list[Result], baseline: str, headline: list[str], higher_is_better: dict[str, bool],
              tolerance: dict[str, float], flops_per_token: float, peaks: dict[str, float],
              precisions: dict[str, str]) -> bool:
    """Print the side-by-side table; return whether every side's held-out metrics are within tolerance
    of the baseline's."""
    sides = list(dict.fromkeys(r.side for r in results))
    by_side = {s: [r for r in results if r.side == s] for s in sides}
    base = by_side[baseline]

    def median(side: str, key: Callable[[Result], float]) -> float:
        return statistics.median(key(r) for r in by_side[side])

    def round_ratio(side: str, key: Callable[[Result], float]) -> float:
        """Median over rounds of (side / baseline) measured in the same round."""
        pairs = [(r, b) for r in by_side[side] for b in base if b.round == r.round]
        return statistics.median(key(r) / key(b) for r, b in pairs)

    rows = [("non-pad tokens/s", lambda r: r.tokens_per_second, "{:,.0f}"),
            ("tokens per CPU-second", lambda r: r.tokens_per_cpu_second, "{:,.0f}"),
            ("samples/s", lambda r: r.samples_per_second, "{:,.2f}"),
            ("train time s", lambda r: r.train_seconds, "{:,.1f}"),
            ("wall time s", lambda r: r.wall_seconds, "{:,.1f}"),
            ("peak RSS MiB", lambda r: r.peak_rss / 2 ** 20, "{:,.0f}")]
    if base[0].peak_gpu is not None:
        rows.append(("peak GPU MiB", lambda r: (r.peak_gpu or 0) / 2 ** 20, "{:,.0f}"))
    for name in headline:
        rows.append((f"test {name}", lambda r, n=name: r.metrics[n], "{:.4f}"))
    others = [s for s in sides if s != baseline]
    columns = sides + [f"{s} / {baseline}" for s in others]
    widths = [max(16, len(c) + 2) for c in columns]

    def line(label: str, cells: list[str]) -> str:
        return f"{label:24}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths))

    header = line("", columns)
    print("\n" + header + "\n" + "-" * len(header))
    for label, key, fmt in rows:
        print(line(label, [fmt.format(median(s, key)) for s in sides] + [f"{round_ratio(s, key):.2f}" for s in others]))
    mfu = []
    for side in sides:
        peak_name = "bf16" if precisions[side] == "bf16" else "fp32"
        value = median(side, lambda r: r.tokens_per_second) * flops_per_token / peaks[peak_name]
        mfu.append(f"{100 * value:.1f}% of {peak_name}")
    print(line("MFU (useful FLOPs)", mfu))
    print(line("precision", [precisions[s] for s in sides]))
    print(f"\nratios: median over {len(base)} round(s) of ours/baseline measured in the same round; other columns: "
          f"medians. Training FLOPs per non-pad token {flops_per_token / 1e6:,.1f} M (FlopCounterMode, forward + "
          f"backward); matmul peak fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s.")
    ok = True
    for side in others:
        for name in [n for n in headline if n in tolerance]:
            ours_value, base_value = median(side, lambda r: r.metrics[name]), median(baseline, lambda r: r.metrics[name])
            worse_by = (base_value - ours_value) if higher_is_better[name] else (ours_value - base_value)
            passed = worse_by <= tolerance[name]
            ok &= passed
            print(f"quality {side} {name}: {ours_value:.4f} vs {base_value:.4f} ({'+' if worse_by <= 0 else '-'}"
                  f"{abs(worse_by):.4f}; tolerance {tolerance[name]}) {'ok' if passed else 'WORSE'}")
    return ok


def common_arguments(parser: argparse.ArgumentParser, steps: int | None, rounds: int) -> None:
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"optimizer steps per measured run (default: {steps or 'one epoch'})")
    parser.add_argument("--rounds", type=int, default=rounds, help="measured runs per side, order alternating")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps of the unmeasured warm-up run per side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--baseline-precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: time a short Trainer run in each and keep its faster one")
    parser.add_argument("--baseline-dtype", choices=["auto", "bf16"], default="auto",
                        help="the baseline model's weights: as saved (auto), or loaded in bf16 (a GPU user's pick)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both sides (e.g. train.batch_size=16)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="an extra side: our pipeline with these overrides (e.g. slow-dropout:train.fast_dropout=false)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where run folders go (default: a temp dir)")


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    variants = {}
    for spec in specs:
        name, _, settings = spec.partition(":")
        if not name or not settings:
            raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
        variants[name] = [s for s in settings.split(",") if s]
    return variants


def start(args: argparse.Namespace, title: str) -> None:
    """Threads, banner, matmul peaks (``args.peaks``), output folder (``args.output``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"{title}\n  torch {torch.__version__}, {device_name()}\n  load average at start: {load_average()}",
          flush=True)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"  matmul peak: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s", flush=True)
    args.peaks = peaks
    args.output = args.output_dir or Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    args.output.mkdir(parents=True, exist_ok=True)
