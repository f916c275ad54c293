"""Run under torchrun by tests/test_streaming.py: the training run's own stream batches (TrainingRun.setup, then
``StreamBatches.epoch``) for epochs 0 and 1, decoded back to the example ids the test data encodes in its texts
(see test_streaming.id_words). Writes ``<out>/ids-<rank>.json``: {epoch: [ids in order]}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune.recipes import load_config, resolve_recipe
from finetune.train import TrainingRun

sys.path.insert(0, str(Path(__file__).parent))
from test_streaming import ids_of  # noqa: E402


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    path, recipe = resolve_recipe("classify")
    run = TrainingRun(load_config(path, overrides), recipe)
    try:
        run.setup()
        rank, tokenizer = run.accelerator.process_index, run.task.tokenizer
        seen = {epoch: [i for batch in run.train_dl.epoch(epoch) for i in ids_of(tokenizer, batch["input_ids"])]
                for epoch in (0, 1)}
        (out / f"ids-{rank}.json").write_text(json.dumps(seen))
    finally:
        run.cleanup()


if __name__ == "__main__":
    main()
