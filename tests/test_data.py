"""Sources and held-out splits."""

from __future__ import annotations

import collections
from pathlib import Path

import datasets
import pytest

from conftest import bound_task, synthetic_reviews, write_csv
from finetune.data import load_splits, make_splits
from finetune.errors import DataError
from finetune.recipes import load_config


def splits_for(csv_path: Path, *overrides: str) -> tuple[datasets.DatasetDict, object]:
    config = load_config(None, ["data.source=files", f"data.train_file={csv_path}", *overrides])
    task = bound_task(config)
    return load_splits(task, config), task


def test_held_out_splits_are_seeded_stratified_and_disjoint(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", synthetic_reviews(1000))
    splits, task = splits_for(path, "data.validation_size=0.1", "data.test_size=0.2")
    assert {n: len(s) for n, s in splits.items()} == {"train": 700, "validation": 100, "test": 200}
    texts = [set(zip(s["text"], range(len(s)))) for s in splits.values()]
    # Each original row lands in exactly one split.
    assert sum(len(s) for s in splits.values()) == 1000
    overall = collections.Counter(r[1] for r in synthetic_reviews(1000))
    for name in ("train", "test"):
        counts = collections.Counter(task.learned.labels[i] for i in splits[name]["label"])
        for label, n in overall.items():  # stratified: shares within one example of the overall share
            assert abs(counts[label] - n * len(splits[name]) / 1000) <= 1.0
    again, _ = splits_for(path, "data.validation_size=0.1", "data.test_size=0.2")
    assert again["test"]["text"] == splits["test"]["text"]
    other, _ = splits_for(path, "data.validation_size=0.1", "data.test_size=0.2", "run.seed=7")
    assert other["test"]["text"] != splits["test"]["text"]
    assert texts  # silence unused


def test_own_splits_are_used_when_present(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", synthetic_reviews(100, seed=1))
    test = write_csv(tmp_path / "test.csv", synthetic_reviews(30, seed=2))
    splits, _ = splits_for(train, f"data.test_file={test}")
    assert len(splits["test"]) == 30
    assert len(splits["train"]) + len(splits["validation"]) == 100


def test_label_names_are_kept_and_numbers_sort_numerically(tmp_path: Path) -> None:
    rows = [(f"text {i}", str([2, 10, 1][i % 3])) for i in range(30)]
    splits, task = splits_for(write_csv(tmp_path / "n.csv", rows))
    assert task.learned.labels == ("1", "2", "10")
    assert splits["train"].features["label"].names == ["1", "2", "10"]


def test_missing_file() -> None:
    with pytest.raises(DataError, match="data file not found: /nope.csv"):
        splits_for(Path("/nope.csv"))


def test_missing_column_names_file_and_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", synthetic_reviews(20), header=("review", "stars"))
    with pytest.raises(DataError, match=r"r.csv: no column 'text' \(data.text_column\), 'label' \(data.label_column\); it has: review, stars"):
        splits_for(path)


def test_one_class_only(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "one.csv", [(f"t {i}", "pos") for i in range(20)])
    with pytest.raises(DataError, match="label column 'label' has 1 class"):
        splits_for(path)


def test_empty_text_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", [("good", "a"), ("  ", "b"), ("bad", "a")])
    with pytest.raises(DataError, match=r"row 2, column 'text': empty or missing text"):
        splits_for(path)


def test_unknown_label_in_test_file(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", synthetic_reviews(50))
    test = write_csv(tmp_path / "test.csv", [("x y", "positive"), ("z", "sarcastic")])
    with pytest.raises(DataError, match=r"test.csv: row 2, column 'label': label 'sarcastic' is not among"):
        splits_for(train, f"data.test_file={test}")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 ol\xe9,a\nbien,b\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv: not UTF-8"):
        splits_for(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        splits_for(path)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", synthetic_reviews(50))
    test = tmp_path / "test.csv"
    test.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="test.csv: no rows"):
        splits_for(train, f"data.test_file={test}")


def test_too_few_rows_to_hold_out() -> None:
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})})
    config = load_config(None)
    with pytest.raises(DataError, match="too few to hold out"):
        make_splits(raw, config.data, 0)


def test_builtin_tweet_sentiment_is_cached(tmp_path: Path) -> None:
    config = load_config(None, ["data.max_train_samples=50"])
    task = bound_task(config)
    splits = load_splits(task, config)
    assert task.learned.labels == ("negative", "neutral", "positive")
    assert len(splits["test"]) == 3816  # 10% of 38,158 tweets
    # The second load comes from the on-disk cache (memory-mapped arrow files).
    again = load_splits(bound_task(config), config)
    assert again["test"].cache_files and again["test"]["text"] == splits["test"]["text"]


@pytest.mark.parametrize("source", ["builtin:chatterbot", "some-org/some-dataset"])
@pytest.mark.parametrize("key", ["train_file", "validation_file", "test_file"])
def test_a_file_key_with_a_builtin_or_hub_source_is_an_error_naming_both_keys(source: str, key: str) -> None:
    """A file is read only with data.source=files; anything else would silently train on other data."""
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_config(Path("recipes/generate-text.yaml").resolve(), [f"data.source={source}", f"data.{key}=story.txt"])
    message = str(raised.value)
    assert f"data.{key}" in message and "data.source" in message and source in message
    assert "data.source=files" in message  # says what to do


def test_the_readme_recipe_table_matches_the_recipes(capsys: pytest.CaptureFixture) -> None:
    """Each row of the README's recipe table names the recipe's task, model and data source as the YAML has
    them (the table once promised a .txt file for a recipe that trains on a built-in set)."""
    import re

    import yaml

    from finetune.recipes import RECIPES_DIR

    readme = (RECIPES_DIR.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("| recipe | task | model | data |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([\w-]+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    table = {name: (task, model, data) for name, task, model, data in rows if (RECIPES_DIR / f"{name}.yaml").is_file()}
    assert set(table) == {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    for name, (task, model, data) in table.items():
        recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        assert task.strip().startswith(recipe["run"]["task"]), name
        assert recipe["model"]["name_or_path"] in model, name
        assert f"`{recipe['data']['source']}`" in data, (name, data)
    # `finetune recipes` prints the same task, model and source for each recipe.
    from finetune.cli import main

    assert main(["recipes"]) == 0
    listed = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in table:
        recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        assert listed[name] == [recipe["run"]["task"], recipe["model"]["name_or_path"], recipe["data"]["source"]]
