"""Load test of `finetune serve` on loopback: N concurrent clients against the same requests sent one at a time.

    python bench/serve.py [--model small|minilm|both] [--run RUN] [--requests 256] [--clients 16] [--rounds 3]

Without ``--run`` it first trains short classification runs with the ``classify`` recipe (LoRA on tweet
sentiment, a few steps: the weights' quality does not change the serving speed) and uses their held-out
test tweets as requests: ``minilm`` is the recipe's all-MiniLM-L6-v2 (22.7M parameters, 6 layers of 384),
``small`` a 2-layer BERT of width 64 with MiniLM's tokenizer (randomly initialised, 2.1M parameters, most
of them the embedding table), a model whose forward pass costs little next to the rest of a request. The
server is ``finetune serve RUN --port 0`` in a subprocess on 127.0.0.1 with its default batching
(``--serve-args`` passes other flags). Each round sends the same ``--requests`` ``/v1/predict`` requests
(one tweet each) twice: by one client, each request after the answer to the previous one, and by
``--clients`` clients at once (each one request at a time on its own keep-alive connection); the order of
the two alternates between rounds, after an unmeasured warm-up. Printed per phase: throughput, p50/p99
latency, failed requests, and the batches the server formed (from ``/health``); then the throughput ratio
per round and its median. Then, in this process and with no server, the model alone: the run's
``task.predict`` on the same texts one at a time and in batches of ``--clients``, which shows how much of
the gain the forward pass itself leaves to batching (the rest is what a request costs besides the model:
HTTP, JSON, tokenizing, the hand-over to the model's thread). Bounded: requests per phase, and
``--time-limit`` seconds for the whole bench (a phase cut short says so). Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only
STARTUP_SECONDS = 300


@dataclass
class Phase:
    mode: str
    clients: int
    sent: int
    failed: int
    seconds: float
    latencies: list[float]
    batches: int
    cut_short: bool

    @property
    def throughput(self) -> float:
        return (self.sent - self.failed) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def train_run(folder: Path, model: str) -> Path:
    """A short run of the classify recipe (LoRA on tweet sentiment), offline, on ``model``."""
    overrides = ["train.max_steps=4", "data.max_train_samples=256", "data.max_eval_samples=64",
                 "data.max_test_samples=512", "train.eval_every_steps=null", "eval.before_training=false",
                 f"run.output_dir={folder}", f"run.name=serve-bench-{model}"]
    if model == "small":
        overrides.append(f"model.name_or_path={small_checkpoint(folder / 'small-bert')}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    subprocess.run([sys.executable, "-m", "finetune", "train", "classify", *overrides], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder / f"serve-bench-{model}"


def small_checkpoint(folder: Path) -> Path:
    """A 2-layer BERT of width 64 with all-MiniLM-L6-v2's tokenizer, randomly initialised."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from finetune.config import ModelConfig
    from finetune.models import resolve_checkpoint

    minilm = resolve_checkpoint(ModelConfig(name_or_path="sentence-transformers/all-MiniLM-L6-v2")).path
    config = AutoConfig.from_pretrained(minilm)
    config.update({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256})
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def request_texts(run: Path, count: int) -> list[str]:
    """``count`` texts from the run's held-out test predictions (repeated if there are fewer)."""
    texts = [json.loads(line)["text"] for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    if not texts:
        raise SystemExit(f"{run} has no test predictions to take request texts from")
    return [texts[i % len(texts)] for i in range(count)]


class Server:
    def __init__(self, run: Path, extra: list[str]):
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        self.process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(run), "--host", HOST,
                                         "--port", "0", *extra], stdout=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        try:
            first = lines.get(timeout=STARTUP_SECONDS)
        except queue.Empty:
            self.close()
            raise SystemExit(f"finetune serve did not start within {STARTUP_SECONDS} s") from None
        match = re.search(r" at http://127\.0\.0\.1:(\d+): ", first)
        if not match:
            self.close()
            raise SystemExit(f"unexpected output from finetune serve: {first!r}")
        self.port = int(match.group(1))
        self.banner = first.strip()

    def health(self) -> dict:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_phase(server: Server, texts: list[str], clients: int, deadline: float, mode: str) -> Phase:
    """Send every text once by ``clients`` clients, each one request at a time on its own connection."""
    work: queue.Queue[str] = queue.Queue()
    for text in texts:
        work.put(text)
    latencies: list[float] = []
    counts = {"sent": 0, "failed": 0}
    lock = threading.Lock()
    cut_short = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection(HOST, server.port, timeout=120)
        try:
            while True:
                if time.monotonic() > deadline:
                    cut_short.set()
                    return
                try:
                    text = work.get_nowait()
                except queue.Empty:
                    return
                body = json.dumps({"text": text})
                start = time.perf_counter()
                ok = False
                try:
                    connection.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    answer = json.loads(response.read())
                    ok = response.status == 200 and "label" in answer
                except (OSError, http.client.HTTPException, ValueError):
                    connection.close()  # reconnects on the next request
                elapsed = time.perf_counter() - start
                with lock:
                    counts["sent"] += 1
                    counts["failed"] += not ok
                    if ok:
                        latencies.append(elapsed)
        finally:
            connection.close()

    before = server.health()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    after = server.health()
    return Phase(mode, clients, counts["sent"], counts["failed"], seconds, latencies,
                 after["batches"] - before["batches"], cut_short.is_set())


def bench(run: Path, args: argparse.Namespace, deadline: float) -> tuple[str, list[tuple[int, Phase, Phase]],
                                                                       tuple[float, float]]:
    """(the server's banner, the measured rounds, the model alone's rates) for one run."""
    texts = request_texts(run, args.requests)
    server = Server(run, args.serve_args.split())
    try:
        run_phase(server, request_texts(run, args.warmup), args.clients, deadline, "warm-up")
        rounds: list[tuple[int, Phase, Phase]] = []
        for round_ in range(1, args.rounds + 1):
            order = [1, args.clients] if round_ % 2 else [args.clients, 1]
            measured = {clients: run_phase(server, texts, clients, deadline,
                                           "one at a time" if clients == 1 else "concurrent")
                        for clients in order}
            rounds.append((round_, measured[1], measured[args.clients]))
    finally:
        server.close()
    return server.banner.split(" at ")[0], rounds, model_alone(run, texts, args.clients)


def model_alone(run: Path, texts: list[str], batch: int) -> tuple[float, float]:
    """Inputs per second of the run's ``task.predict`` alone: one input per call, and ``batch`` per call."""
    sys.path.insert(0, str(REPO))
    import torch

    from finetune.trained_run import load_run

    loaded = load_run(str(run), [])
    inputs = [{"text": text} for text in texts]
    rates = []
    with torch.inference_mode():
        loaded.task.predict(loaded.model, inputs[:batch])  # warm-up
        for size in (1, batch):
            start = time.perf_counter()
            for i in range(0, len(inputs), size):
                loaded.task.predict(loaded.model, inputs[i:i + size])
            rates.append(len(inputs) / (time.perf_counter() - start))
    return rates[0], rates[1]


def report(banner: str, rounds: list[tuple[int, Phase, Phase]], model_rates: tuple[float, float],
           clients: int) -> int:
    """Print one run's table; returns its failed requests."""
    print(f"\n{banner}")
    header = f"{'round':>5}  {'mode':<14} {'clients':>7} {'sent':>5} {'failed':>6} {'req/s':>8} {'p50 ms':>8} " \
             f"{'p99 ms':>8} {'batches':>8} {'per batch':>9}"
    print(header)
    print("-" * len(header))
    ratios, failed = [], 0
    for round_, alone, together in rounds:
        for phase in (alone, together):
            failed += phase.failed
            note = "  (cut short by --time-limit)" if phase.cut_short else ""
            print(f"{round_:>5}  {phase.mode:<14} {phase.clients:>7} {phase.sent:>5} {phase.failed:>6} "
                  f"{phase.throughput:>8.1f} {phase.percentile(0.5):>8.1f} {phase.percentile(0.99):>8.1f} "
                  f"{phase.batches:>8} {phase.sent / max(phase.batches, 1):>9.1f}{note}")
        ratios.append(together.throughput / alone.throughput if alone.throughput else float("nan"))
    print(f"throughput, {clients} concurrent clients / one at a time: "
          + ", ".join(f"{r:.2f}x" for r in ratios) + f" (median {statistics.median(ratios):.2f}x); "
          f"failed requests: {failed}")
    print(f"the model alone (task.predict in one process, no server): one input per call {model_rates[0]:.1f} "
          f"inputs/s, {clients} per call {model_rates[1]:.1f} inputs/s ({model_rates[1] / model_rates[0]:.2f}x)")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["small", "minilm", "both"], default="both",
                        help="the classifier(s) to train and serve (without --run)")
    parser.add_argument("--run", type=Path, help="serve this finished classification run instead")
    parser.add_argument("--requests", type=int, default=256, help="requests per phase")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the concurrent phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=32, help="unmeasured requests before the first round")
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole bench at most")
    parser.add_argument("--serve-args", default="", help="more flags for finetune serve, e.g. '--batch-window-ms 5'")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit

    results = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        runs = [args.run] if args.run else [train_run(Path(scratch), model) for model in
                                             (["small", "minilm"] if args.model == "both" else [args.model])]
        for run in runs:
            results.append(bench(run, args, deadline))

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"serve bench: {args.requests} /v1/predict requests (one tweet each) per phase, {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs, load average {load} (1/5/15 min); server flags: defaults"
          f"{(' + ' + args.serve_args) if args.serve_args else ''}")
    failed = sum(report(banner, rounds, model_rates, args.clients) for banner, rounds, model_rates in results)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
