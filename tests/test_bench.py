"""The side-by-side benchmark runs end to end (tiny sizes) and prints its table; the baseline's counts are real."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.real
@pytest.mark.slow
def test_classification_bench_prints_the_side_by_side_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "classification.py"), "--steps", "3", "--rounds", "1",
         "--warmup-steps", "1", "--test-samples", "64", "--baseline-precision", "fp32", "--threads", "1",
         "--output-dir", str(tmp_path), "--set", "data.max_train_samples=400"],
        capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path)
    # exit 1 only reports worse quality, which three steps cannot settle; anything else is a failure
    assert done.returncode in (0, 1), done.stderr[-3000:]
    out = done.stdout
    for row in ("non-pad tokens/s", "samples/s", "wall time s", "peak RSS MiB", "test accuracy"):
        assert re.search(rf"^{re.escape(row)}\s+\S+\s+\S+\s+[0-9.]+$", out, re.M), (row, out)
    assert re.search(r"^MFU \(useful FLOPs\)\s+[\d.]+% of \w+\s+[\d.]+% of \w+$", out, re.M), out
    tokens = re.search(r"^non-pad tokens/s\s+([\d,]+)\s+([\d,]+)", out, re.M)
    assert all(int(value.replace(",", "")) > 0 for value in tokens.groups()), out
    assert "matmul peak: fp32" in out and "quality ours accuracy" in out


def test_gpu_bench_dry_run_checks_its_arguments_and_prints_its_commands(capsys: pytest.CaptureFixture) -> None:
    """bench/gpu.py is for a GPU machine; here its argument parsing, the recipe overrides it builds and the
    1.7B model's config are checked, and without a GPU a real run stops with one line."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    assert gpu.main(["--dry-run", "--max-length", "512", "--batch-size", "4", "--no-classification"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-1.7b (24 layers, hidden 2048), max_length 512, batch 4" in out
    runs = [line for line in out.splitlines() if line.startswith("would run: ")]
    assert len(runs) == 1 and "generation.py" in runs[0] and "--baseline-collator flatten" in runs[0]
    assert "data.max_length=512" in runs[0] and "compile:train.compile=true" in runs[0]
    with pytest.raises(SystemExit) as bad:
        gpu.main(["--dry-run", "--max-length", "4"])
    assert bad.value.code == 2 and "--max-length >= 16" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu.main(["--no-classification"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: bench/gpu.py needs a CUDA GPU") and len(err.splitlines()) == 1
