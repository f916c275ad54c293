"""Two "machines" on loopback: two torchrun launches (--nnodes 2, one process each) give the same run as
one torchrun launch of two processes (CPU, gloo). Same world size, same ranks, same gloo all-reduce: the
arithmetic is the same, so the tolerance is that of the resume test in test_distributed.py (1e-6 on
every weight, the same test accuracy), not the looser one of 1 vs 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import build_tiny_bert, synthetic_reviews, tiny_overrides, write_csv
from launching import cpu_env, run_with_free_port, tail, torchrun
from test_distributed import SETTINGS

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
TIMEOUT = 600


def single_node(args: list[str], **env: str):
    """``torchrun --nproc_per_node 2``: the layout of test_distributed.py and `make finetune NPROC=2`."""
    return run_with_free_port(lambda port: [torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                                     "--master_port", str(port), "-m", "finetune", "train",
                                                     "classify", *args)], cpu_env(**env), TIMEOUT)


def two_nodes(args: list[str], **env: str):
    """Node 0 and node 1, each `torchrun --nnodes 2 --node_rank R --nproc_per_node 1`, started together;
    node 0 holds the rendezvous (static, at master_addr:master_port) and global rank 0."""
    def commands(port: int) -> list[list[str]]:
        return [torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr",
                         "127.0.0.1", "--master_port", str(port), "-m", "finetune", "train", "classify", *args)
                for rank in (0, 1)]
    return run_with_free_port(commands, cpu_env(**env), TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The data and settings of test_distributed.py (600 rows -> 480 train, 30 steps of 2 x 8 per epoch,
    5 epochs; 21 test rows), once on one node with two processes and once on two nodes of one."""
    folder = tmp_path_factory.mktemp("multinode")
    model = build_tiny_bert(folder / "tiny-bert", dropout=0.0)
    data = write_csv(folder / "reviews.csv", synthetic_reviews(600))
    test = write_csv(folder / "test.csv", synthetic_reviews(21, seed=5))
    extra = {**SETTINGS, "data.test_file": test, "data.validation_size": 0.2, "train.batch_size": 8}
    args = {name: tiny_overrides(model, data, folder / name, **extra) for name in ("single", "nodes")}
    (single,) = single_node(args["single"])
    assert single.returncode == 0, tail(single)
    nodes = two_nodes(args["nodes"])
    for rank, result in enumerate(nodes):
        assert result.returncode == 0, f"node {rank}:\n{tail(result)}"
    return {"single": folder / "single" / "tiny", "nodes": folder / "nodes" / "tiny", "node_out": nodes,
            "args": args, "folder": folder, "model": model, "data": data, "extra": extra}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def worst_difference(a: Path, b: Path) -> float:
    left, right = load_file(str(a)), load_file(str(b))
    assert set(left) == set(right)
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def test_two_nodes_train_like_two_processes_of_one_node(runs: dict) -> None:
    single, nodes = runs["single"], runs["nodes"]
    assert metrics(nodes)["global_step"] == metrics(single)["global_step"] == 150
    worst = worst_difference(single / "model" / "model.safetensors", nodes / "model" / "model.safetensors")
    assert worst <= 1e-6, worst  # measured: 0.0 (bit-identical)
    # Each optimizer step's loss (the log rounds to 6 decimals), each validation, the best step.
    steps = lambda run: [(r["step"], r.get("split"), r["loss"]) for r in log(run)]
    assert [s[:2] for s in steps(nodes)] == [s[:2] for s in steps(single)]
    assert all(abs(a[2] - b[2]) <= 1e-6 for a, b in zip(steps(single), steps(nodes)))
    assert metrics(nodes)["best_step"] == metrics(single)["best_step"]
    one, two = metrics(single)["test"], metrics(nodes)["test"]
    assert two["accuracy"] == one["accuracy"] and two["per_class"] == one["per_class"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert two["accuracy"] >= metrics(nodes)["baseline"]["accuracy"] + 0.15  # it did learn
    # Only global rank 0 writes: each step once in the log.
    assert [r["step"] for r in log(nodes) if "split" not in r] == list(range(1, 151))


def test_each_node_reports_the_whole_job(runs: dict) -> None:
    """Accelerate prints on each node's local main process: node 1 shows the same effective batch."""
    for result in runs["node_out"]:
        assert "effective batch 16 = 8 per device x 2 process(es) x 1 accumulation" in result.stdout


def test_two_nodes_killed_and_resumed_finish_like_uninterrupted(runs: dict) -> None:
    """Every process of both nodes is killed after step 50; both nodes relaunched with --resume auto
    continue from step 48 and end where the uninterrupted two-node run ended."""
    args = tiny_overrides(runs["model"], runs["data"], runs["folder"] / "killed", **runs["extra"])
    killed = two_nodes(args, FINETUNE_FAULT="kill-after-step:50")
    assert all(r.returncode != 0 for r in killed)
    run_dir = runs["folder"] / "killed" / "tiny"
    assert not (run_dir / "metrics.json").exists()
    resumed = two_nodes(args + ["--resume", "auto"])
    for rank, result in enumerate(resumed):
        assert result.returncode == 0, f"node {rank}:\n{tail(result)}"
    assert "resumed from" in resumed[0].stdout and "step-00000048" in resumed[0].stdout
    worst = worst_difference(runs["nodes"] / "model" / "model.safetensors", run_dir / "model" / "model.safetensors")
    assert worst <= 1e-6, worst
    assert metrics(run_dir)["test"]["accuracy"] == metrics(runs["nodes"])["test"]["accuracy"]


def test_every_checkpoint_holds_every_process_state(runs: dict) -> None:
    """save_checkpoint waits for every process after save_state: no checkpoint lacks a process's RNG state and
    no stray step-N.tmp is left (before that barrier, 6 two-node runs left 0, 3, 1, 1, 0, 0 of them)."""
    for run in (runs["single"], runs["nodes"]):
        folder = run / "checkpoints"
        assert sorted(p.name for p in folder.iterdir()) == ["step-00000144", "step-00000150"]
        for checkpoint in folder.iterdir():
            assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
