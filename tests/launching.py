"""Launching the CLI in several processes for the multi-process tests: a free loopback port, launchers
started together, every one bounded by a timeout, and every process they started ended on failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PORT_IN_USE = ("EADDRINUSE", "address already in use", "Address already in use")


def free_port() -> int:
    """A port nothing listens on now (the kernel picks it); the launch retries should it be taken before
    the rendezvous binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU launch: this checkout first on the path, gloo through ACCELERATE_USE_CPU,
    one thread per process (2 cores), no fault injection unless asked."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_FAULT", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _stop(process: subprocess.Popen) -> None:
    """End a launcher and every worker it started, by pid. torchrun starts each worker in a session of its
    own, so the launcher's process group does not hold them: the descendants are listed first, the
    launcher is asked to stop (it stops its workers), then whatever is left is killed."""
    if process.poll() is not None:
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    if process.poll() is None:
        process.kill()
    for leftover in descendants:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        pass


def run_together(commands: list[list[str]], env: dict[str, str], timeout: float = 600,
                 grace: float = 60) -> list[Result]:
    """Start every command at once (each in its own session) and wait for all of them. Past ``timeout``
    seconds, or ``grace`` seconds after one of them failed (the others may wait forever for a peer that
    is gone), every process still running is ended."""
    processes: list[subprocess.Popen] = []
    outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    try:
        for command, (out, err) in zip(commands, outputs):
            processes.append(subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT, text=True,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.poll() is None for p in processes):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in processes):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            time.sleep(0.2)
        results = []
        for process, (out, err) in zip(processes, outputs):
            timed_out = process.poll() is None
            _stop(process)
            out.seek(0)
            err.seek(0)
            stderr = err.read() + ("\n[run_together: ended after the timeout]" if timed_out else "")
            results.append(Result(process.returncode if not timed_out else -9, out.read(), stderr))
        return results
    finally:
        for process in processes:
            _stop(process)
        for pair in outputs:
            for handle in pair:
                handle.close()


def run_with_free_port(build, env: dict[str, str], timeout: float = 600, tries: int = 3) -> list[Result]:
    """``build(port)`` gives the commands of one launch; a launch whose rendezvous port was taken in the
    meantime is retried on another port."""
    for _ in range(tries):
        results = run_together(build(free_port()), env, timeout)
        if not any(r.returncode and any(s in r.stderr for s in PORT_IN_USE) for r in results):
            return results
    return results


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def tail(result: Result, n: int = 3000) -> str:
    """The error lines of every worker first (the root cause is often not at the end), then the end of
    stderr, without tqdm's progress lines (they fill it)."""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if "training:" not in line]
    errors = [line for line in lines if line.lstrip("[rank0123456789]: ").startswith(
        ("RuntimeError", "ValueError", "TypeError", "KeyError", "NotImplementedError", "error:", "ZeroDivisionError"))]
    return "\n".join(errors[:10]) + "\n...\n" + "\n".join(lines)[-n:]
