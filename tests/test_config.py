"""Recipes and overrides: typed values, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import parse_override
from finetune.recipes import RECIPES_DIR, load_config
from finetune.errors import ConfigError


def test_overrides_are_typed() -> None:
    config = load_config(None, ["train.epochs=3", "train.learning_rate=1e-4", "data.max_train_samples=null",
                                "lora.target_modules=query,value", "train.group_by_length=false",
                                "data.label_column=2019"])
    assert config.train.epochs == 3.0 and isinstance(config.train.epochs, float)
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.data.max_train_samples is None
    assert config.lora.target_modules == ["query", "value"]
    assert config.train.group_by_length is False
    assert config.data.label_column == "2019"


def test_yaml_no_means_no_mixed_precision() -> None:
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize(("override", "message"), [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("trian.epochs=3", "unknown config section 'trian'"),
    ("train.epochs=three", "'train.epochs' expects a number"),
    ("train.batch_size=2.5", "'train.batch_size' expects an integer"),
    ("train.scheduler=exponential", "'train.scheduler' must be one of linear, cosine, constant"),
    ("train.learning_rate=-1", "'train.learning_rate' must be > 0"),
    ("data.test_size=1.5", "'data.test_size' must be in [0, 1)"),
    ("lora.method=qlora", "'lora.method' must be one of lora, full"),
    ("run.task=segmentation", "'run.task' must be one of"),
    ("train.metric_for_best=bleu", "'train.metric_for_best' must be one of"),
    ("train.group_by_length=maybe", "'train.group_by_length' expects true or false"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(RECIPES_DIR / "classify.yaml", [override])
    assert message in str(info.value)


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("train.epochs")


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_config(recipe)


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(recipe)


@pytest.mark.parametrize("recipe", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe: Path) -> None:
    import yaml

    data = (yaml.safe_load(recipe.read_text(encoding="utf-8")).get("data") or {})
    # A recipe for the user's own file (source: files) is validated with the file it asks for.
    needs_file = data.get("source") == "files" and not data.get("train_file")
    config = load_config(recipe, ["data.train_file=your.txt"] if needs_file else [])
    assert config.run.task
    assert recipe.read_text(encoding="utf-8").startswith("#"), "first line describes the recipe"


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    from finetune.config import dump_config

    config = load_config(RECIPES_DIR / "classify.yaml", ["train.epochs=2", "lora.target_modules=[query]"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
