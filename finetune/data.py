"""Data sources (built-in, Hub, local files) and held-out splits.

The flow: :func:`load_raw` returns whatever splits the source has; the task learns from its training split
(:func:`training_split`) and checks every row (``Task.prepare``); :func:`make_splits` returns exactly
``train`` / ``validation`` / ``test``, carving the missing held-out splits from train with a seeded
(optionally stratified) split, group-aware when ``data.group_column`` is set (:func:`group_split`).

Token lengths (:func:`length_summary`, :func:`auto_max_length`) serve ``data.max_length: auto`` and the length
report printed before training, for tasks that measure their inputs.

Streaming (``data.streaming``): :func:`load_stream` opens the training data as a ``datasets`` IterableDataset
that is never loaded whole, and returns the small held-out splits (and a sample the task learns from) as
ordinary datasets beside it.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from finetune.builtin import BUILTIN_SOURCES, load_builtin
from finetune.config import Config, DataConfig
from finetune.conll import read_conll
from finetune.errors import DataError

logger = logging.getLogger(__name__)

# file extension -> datasets builder ("conll": finetune.conll's reader; .txt stays plain text, one row per line)
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".txt": "text", ".conll": "conll", ".conllu": "conll"}
GROUP = "group"
"""The column of prepared examples holding ``data.group_column`` (tasks with ``keeps_groups``)."""
INPUT_LENGTH = "input_length"
"""A feature column of tasks that measure their inputs: the token count before truncation."""


def cache_root() -> Path:
    """Where finetune caches derived data (built-in sets, converted checkpoints)."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def load_raw(cfg: DataConfig, seed: int) -> datasets.DatasetDict:
    """Load the splits a source has, as a DatasetDict (possibly only ``train``)."""
    if cfg.source.startswith("builtin:"):
        return _load_builtin_cached(cfg.source.removeprefix("builtin:"), seed)
    if cfg.source == "files":
        return _load_files(cfg)
    return _load_hub(cfg)


def _load_builtin_cached(name: str, seed: int) -> datasets.DatasetDict:
    """Build a built-in set once and keep it on disk: memory-mapped, with stable fingerprints so
    that ``map`` (tokenization) is cached across runs."""
    if name not in BUILTIN_SOURCES:
        raise DataError(f"unknown built-in dataset {name!r} (data.source); known: "
                        f"{', '.join('builtin:' + n for n in sorted(BUILTIN_SOURCES))}")
    import importlib

    module = importlib.import_module(f"finetune.builtin.{BUILTIN_SOURCES[name]}")
    # The cache key covers the builder's code, so editing a builder rebuilds its data.
    code_hash = hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:12]
    folder = cache_root() / "builtin" / f"{name}-seed{seed}-{code_hash}"
    if (folder / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(folder))
    try:
        built = load_builtin(name, seed=seed)
    except (RuntimeError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise DataError(f"built-in dataset {name!r} is unavailable: {exc}") from None
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    built.save_to_disk(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; use its copy
        pass
    return datasets.load_from_disk(str(folder))


def _load_files(cfg: DataConfig) -> datasets.DatasetDict:
    files = {cfg.train_split: ("train_file", cfg.train_file), cfg.validation_split: ("validation_file",
             cfg.validation_file), cfg.test_split: ("test_file", cfg.test_file)}
    splits = {}
    for split, (key, path) in files.items():
        if path is None:
            continue
        if not Path(path).exists():  # e.g. a run pulled from the Hub names its data files without directories
            raise DataError(f"data file not found: {path} (data.{key}; give data.{key}=PATH to where it is)")
        splits[split] = load_file(Path(path))
    return datasets.DatasetDict(splits)


def load_file(path: Path) -> datasets.Dataset:
    """Load one csv/tsv/json/jsonl/parquet/txt file; errors name the file."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; expected a data file ({', '.join(FILE_BUILDERS)})")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder == "conll":
        return _read_conll_file(path)
    if path.suffix.lower() == ".json":
        squad = _read_squad_layout(path)
        if squad is not None:
            return squad
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files={"data": str(path.resolve())}, split="data", **kwargs)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
    except Exception as exc:  # datasets wraps parser errors in many types; keep the first line
        cause = exc.__cause__ or exc
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{path}: not UTF-8 text (byte {cause.start}); convert it, e.g. "
                            f"iconv -f latin1 -t utf-8") from None
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in message:  # what datasets says of a header-only csv
            raise DataError(f"{path}: no rows") from None
        if builder == "json":
            bad = _first_bad_json_line(path)
            if bad is not None:
                raise DataError(f"{path}: line {bad[0]}: not a JSON object ({bad[1]}); JSON lines hold one object "
                                f"per line") from None
        raise DataError(f"{path}: could not parse as {builder}: {message}") from None
    if len(loaded) == 0:
        raise DataError(f"{path}: no rows")
    return loaded


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first line of a JSON-lines file that is not a JSON object; datasets'
    own message counts rows, not lines."""
    if path.suffix.lower() != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return number, str(exc)
            if not isinstance(value, dict):
                return number, f"got {type(value).__name__}"
    return None


def _read_conll_file(path: Path) -> datasets.Dataset:
    """A CoNLL column file (``.conll``: word ... tag per line) or a CoNLL-U treebank (``.conllu``: UPOS tags) as
    one row per sentence, columns ``tokens`` and ``tags`` (see ``finetune.conll``)."""
    rows = read_conll(path)
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "tags": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"tokens": [r["tokens"] for r in rows], "tags": [r["tags"] for r in rows]},
                                      features=features)


def _read_squad_layout(path: Path) -> datasets.Dataset | None:
    """A .json file in the SQuAD layout (``data -> paragraphs -> qas``) flattened to one row per question
    (``id, title, context, question, answers {text, answer_start}``); None for any other JSON shape."""
    with path.open("rb") as handle:
        if not handle.read(4096).lstrip().startswith(b"{"):
            return None  # a JSON array: records, not the SQuAD layout
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return None  # load_file reports the encoding
    except ValueError:
        return None  # JSON lines in a .json file, or malformed: the json builder reports it
    articles = document.get("data") if isinstance(document, dict) else None
    if not (isinstance(articles, list) and articles and isinstance(articles[0], dict)
            and "paragraphs" in articles[0]):
        return None
    rows = []
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise DataError(f"{where}: a paragraph needs a 'context' string")
            for q, qa in enumerate(paragraph.get("qas") or []):
                if not isinstance(qa, dict) or "id" not in qa or "question" not in qa:
                    raise DataError(f"{where}.qas[{q}]: a question needs 'id' and 'question'")
                # SQuAD v2 marks unanswerable questions with is_impossible (their answers list is empty).
                answers = [] if qa.get("is_impossible") else qa.get("answers") or []
                if not all(isinstance(x, dict) and "text" in x and "answer_start" in x for x in answers):
                    raise DataError(f"{where}.qas[{q}] (id {qa['id']}): each answer needs 'text' and 'answer_start'")
                rows.append({"id": str(qa["id"]), "title": str(article.get("title") or ""),
                             "context": paragraph["context"], "question": qa["question"],
                             "answers": {"text": [x["text"] for x in answers],
                                         "answer_start": [x["answer_start"] for x in answers]}})
    if not rows:
        raise DataError(f"{path}: SQuAD layout without any question")
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))}})
    try:
        return datasets.Dataset.from_list(rows, features=features)
    except (TypeError, ValueError) as exc:  # e.g. an answer_start that is not a number
        raise DataError(f"{path}: SQuAD layout with a value of the wrong type: {exc}") from None


def _load_hub(cfg: DataConfig) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(cfg.source, cfg.hub_config)
    except Exception as exc:  # offline, unknown id, bad config name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load Hub dataset {cfg.source!r} (data.source): {first}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({cfg.train_split: loaded})
    return loaded


def require_columns(dataset: datasets.Dataset, columns: dict[str, str] | list[str], where: str) -> None:
    """Raise a DataError naming the missing columns (and the config keys that name them, when
    ``columns`` maps column -> key) and the columns the data has."""
    keys = columns if isinstance(columns, dict) else {c: "" for c in columns}
    missing = [c for c in keys if c not in dataset.column_names]
    if missing:
        named = ", ".join(f"{c!r}" + (f" ({keys[c]})" if keys[c] else "") for c in missing)
        raise DataError(f"{where}: no column {named}; it has: {', '.join(dataset.column_names)}")


def training_split(raw: datasets.DatasetDict, cfg: DataConfig) -> tuple[datasets.Dataset, str]:
    """The source's training split and its name for messages (what a task learns from)."""
    if cfg.train_split not in raw:
        raise DataError(f"{cfg.source}: no {cfg.train_split!r} split (data.train_split); "
                        f"it has: {', '.join(raw) or 'none'}")
    return raw[cfg.train_split], describe_split(raw, cfg.train_split, cfg)


def describe_split(raw: datasets.DatasetDict, split: str, cfg: DataConfig) -> str:
    """Name of a split for messages: the file it came from or the source and split name."""
    files = {cfg.train_split: cfg.train_file, cfg.validation_split: cfg.validation_file,
             cfg.test_split: cfg.test_file}
    if cfg.source == "files" and files.get(split):
        return str(files[split])
    return f"{cfg.source} [{split}]"


def make_splits(raw: datasets.DatasetDict, cfg: DataConfig, seed: int,
                stratify_column: str | None = None) -> datasets.DatasetDict:
    """Return ``train``/``validation``/``test``: the source's own splits where it has them,
    otherwise seeded (stratified when ``stratify_column`` is a ClassLabel) held-out parts of train."""
    train, _ = training_split(raw, cfg)
    splits: dict[str, datasets.Dataset] = {}
    carved = 0.0  # share of the original train already held out
    for name, own, size in (("test", cfg.test_split, cfg.test_size),
                            ("validation", cfg.validation_split, cfg.validation_size)):
        if own in raw:
            splits[name] = raw[own]
            continue
        if size == 0:
            raise DataError(f"{cfg.source} has no {own!r} split and data.{name}_size is 0")
        # Both sizes are shares of the original train, so rescale to what is left of it.
        if cfg.group_column is not None:
            parts = group_split(train, size / (1.0 - carved), seed, stratify_column, name)
        else:
            parts = _split(train, size / (1.0 - carved), seed, stratify_column, name)
        train, splits[name] = parts["train"], parts["test"]
        carved += size
    splits["train"] = train
    result = datasets.DatasetDict({k: splits[k] for k in ("train", "validation", "test")})
    for name, split in result.items():
        if len(split) == 0:
            raise DataError(f"{cfg.source}: the {name} split is empty")
    return result


def _split(dataset: datasets.Dataset, share: float, seed: int, stratify_column: str | None,
           name: str) -> datasets.DatasetDict:
    if len(dataset) < 2:
        raise DataError(f"only {len(dataset)} training example(s): too few to hold out a {name} split")
    stratify = stratify_column if stratify_column and isinstance(
        dataset.features.get(stratify_column), datasets.ClassLabel) else None
    try:
        return dataset.train_test_split(test_size=share, seed=seed, stratify_by_column=stratify)
    except ValueError:
        # Stratification needs >= 2 examples per class in each part; fall back to a plain split.
        logger.warning("stratified %s split impossible (a class is too rare); using a random split", name)
        return dataset.train_test_split(test_size=share, seed=seed)


def shared_inputs(train: datasets.Dataset, test: datasets.Dataset, columns: tuple[str, ...]) -> int:
    """How many test examples have exactly the input (``columns``) of some training example."""
    columns = tuple(c for c in columns if c in train.column_names and c in test.column_names)
    if not columns:
        return 0

    def key(row: dict[str, Any]) -> str:
        return json.dumps([row[c] for c in columns], sort_keys=True, ensure_ascii=False)

    seen = {key(row) for row in train.select_columns(list(columns))}
    return sum(key(row) in seen for row in test.select_columns(list(columns)))


def group_split(dataset: datasets.Dataset, share: float, seed: int, stratify_column: str | None,
                name: str) -> datasets.DatasetDict:
    """Hold out about ``share`` of the rows as whole groups (the ``GROUP`` column): no group has rows on both sides.

    Stratified where possible: groups are bucketed by their most common ``stratify_column`` class (a ClassLabel),
    and each bucket gives about ``share`` of its rows, taking seeded-shuffled groups while that brings the held-out
    rows closer to the target. Returns ``train`` and ``test`` like ``Dataset.train_test_split``."""
    if GROUP not in dataset.column_names:
        raise DataError(f"data.group_column is set but the prepared examples have no {GROUP!r} column")
    groups = dataset[GROUP][:]  # a list: per-row access to a lazy column of split data is slow
    if any(g is None or (isinstance(g, str) and not g.strip()) for g in groups):
        row = next(i for i, g in enumerate(groups) if g is None or (isinstance(g, str) and not g.strip()))
        raise DataError(f"row {row + 1}, data.group_column: empty group; every row needs one")
    rows_of: dict[Any, list[int]] = collections.defaultdict(list)
    for row, group in enumerate(groups):
        rows_of[group].append(row)
    if len(rows_of) < 2:
        raise DataError(f"data.group_column: only {len(rows_of)} group; need at least 2 to hold out a {name} split")
    classes = dataset[stratify_column][:] if stratify_column and isinstance(
        dataset.features.get(stratify_column), datasets.ClassLabel) else None
    buckets: dict[Any, list[Any]] = collections.defaultdict(list)
    for group, rows in rows_of.items():
        key = collections.Counter(classes[r] for r in rows).most_common(1)[0][0] if classes is not None else None
        buckets[key].append(group)
    rng = random.Random(seed)
    held: set[Any] = set()
    for key in sorted(buckets, key=str):
        members = sorted(buckets[key], key=str)
        rng.shuffle(members)
        target = share * sum(len(rows_of[g]) for g in members)
        taken = 0
        for group in members:
            size = len(rows_of[group])
            if abs(taken + size - target) < abs(taken - target):
                held.add(group)
                taken += size
    if not held:  # every group is larger than the share: hold out the smallest one
        held.add(min(rows_of, key=lambda g: (len(rows_of[g]), str(g))))
    if len(held) == len(rows_of):
        held.discard(max(held, key=lambda g: (len(rows_of[g]), str(g))))
    test_rows = sorted(r for g in held for r in rows_of[g])
    train_rows = sorted(r for g in rows_of if g not in held for r in rows_of[g])
    return datasets.DatasetDict({"train": dataset.select(train_rows), "test": dataset.select(test_rows)})


def length_summary(lengths: list[int] | np.ndarray, max_length: int | None = None) -> dict[str, Any]:
    """Median, 95th percentile and maximum of token counts, and how many exceed ``max_length`` (are cut)."""
    values = np.asarray(lengths)
    if len(values) == 0:
        return {"examples": 0}
    summary: dict[str, Any] = {"examples": int(len(values)), "median": float(np.median(values)),
                               "p95": float(np.percentile(values, 95)), "max": int(values.max())}
    if max_length is not None:
        summary["max_length"] = int(max_length)
        summary["truncated"] = int((values > max_length).sum())
    return summary


def auto_max_length(lengths: list[int] | np.ndarray, model_limit: int, multiple: int = 8,
                    quantile: float = 95) -> int:
    """``data.max_length: auto``: the smallest multiple of ``multiple`` covering the ``quantile``-th percentile of
    the token counts, at least ``multiple`` and at most ``model_limit``."""
    covered = float(np.percentile(np.asarray(lengths), quantile)) if len(lengths) else multiple
    chosen = max(multiple, math.ceil(covered / multiple) * multiple)
    return int(min(chosen, model_limit))


def cap(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of at most ``limit`` rows (all rows when ``limit`` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit)).flatten_indices()


def load_splits(task: Any, config: Config, raw: datasets.DatasetDict | None = None) -> datasets.DatasetDict:
    """Raw source (``raw``, or loaded here) -> examples checked by the bound task (``Task.prepare``) ->
    train/validation/test, capped as the recipe asks."""
    raw = task.prepare(raw if raw is not None else load_raw(config.data, config.run.seed))
    splits = make_splits(raw, config.data, config.run.seed, task.stratify_column)
    d, seed = config.data, config.run.seed
    return datasets.DatasetDict({
        "train": cap(splits["train"], d.max_train_samples, seed),
        "validation": cap(splits["validation"], d.max_eval_samples, seed),
        "test": cap(splits["test"], d.max_test_samples, seed),
    })


STREAM_SAMPLE_ROWS = 1000
"""Streaming: the task learns (e.g. the label names) from the first this-many training examples."""
STREAM_CHUNK_BYTES = 1 << 20
"""Streaming json/txt: bytes parsed at a time (datasets' default, 10 MB, would be most of a stream's memory)."""


def load_stream(cfg: DataConfig) -> tuple[datasets.DatasetDict, datasets.IterableDataset]:
    """``data.streaming``: (raw splits, training stream). The raw splits are what the task learns from and
    evaluates on, in memory: ``train`` is a sample (the first :data:`STREAM_SAMPLE_ROWS` examples the training
    stream yields), ``validation`` and ``test`` are the validation/test files (or the Hub data set's own splits)
    when there are any, otherwise the first ``streaming_holdout`` streamed examples are ``test`` and the next
    ``streaming_holdout`` ``validation``; the training stream then starts after them, so no held-out example
    is trained on. The stream yields the source's rows, unshuffled and unsharded (``finetune.batching`` does
    that per epoch)."""
    if cfg.source == "files":
        if cfg.train_file is None:
            raise DataError("data.streaming needs data.train_file (the stream to train on)")
        stream = open_stream(Path(cfg.train_file), "data.train_file")
        own = {name: load_file(Path(path)) for name, path in (("validation", cfg.validation_file),
                                                              ("test", cfg.test_file)) if path is not None}
    else:
        try:
            streams = datasets.load_dataset(cfg.source, cfg.hub_config, streaming=True)
        except Exception as exc:  # offline, unknown id, bad config name
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"could not stream Hub dataset {cfg.source!r} (data.source): {first}") from None
        if cfg.train_split not in streams:
            raise DataError(f"{cfg.source}: no {cfg.train_split!r} split (data.train_split); it has: "
                            f"{', '.join(streams) or 'none'}")
        stream = streams[cfg.train_split]
        # The Hub data set's own held-out splits, read whole (capped by max_eval/test_samples).
        own = {name: _materialize(streams[split], cap_rows)
               for name, split, cap_rows in (("validation", cfg.validation_split, cfg.max_eval_samples),
                                             ("test", cfg.test_split, cfg.max_test_samples)) if split in streams}
    carved = 0
    for name in ("test", "validation"):
        if name not in own:
            own[name] = _materialize(stream.skip(carved), cfg.streaming_holdout)
            carved += cfg.streaming_holdout
            if len(own[name]) == 0:
                raise DataError(f"{describe_stream(cfg)}: too few rows to hold out a {name} split of "
                                f"data.streaming_holdout={cfg.streaming_holdout}")
    train = stream.skip(carved) if carved else stream
    sample = _materialize(train, STREAM_SAMPLE_ROWS)
    if len(sample) == 0:
        raise DataError(f"{describe_stream(cfg)}: no training rows after the {carved} held out "
                        f"(data.streaming_holdout)")
    return datasets.DatasetDict({cfg.train_split: sample, cfg.validation_split: own["validation"],
                                 cfg.test_split: own["test"]}), train


def open_stream(path: Path, key: str) -> datasets.IterableDataset:
    """One csv/tsv/json/jsonl/parquet/txt file as a stream (read as iterated; nothing is cached)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path} ({key}; give {key}=PATH to where it is)")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None or builder == "conll":
        raise DataError(f"{path}: cannot stream a {path.suffix!r} file ({key}); stream csv, tsv, json, jsonl, "
                        f"parquet or txt")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    if builder in ("json", "text"):
        kwargs["chunksize"] = STREAM_CHUNK_BYTES
    return datasets.load_dataset(builder, data_files={"data": str(path.resolve())}, split="data", streaming=True,
                                 **kwargs)


def describe_stream(cfg: DataConfig) -> str:
    """The training stream's name for messages: its file, or the Hub data set and split."""
    return str(cfg.train_file) if cfg.source == "files" else f"{cfg.source} [{cfg.train_split}]"


def _materialize(stream: datasets.IterableDataset, rows: int | None) -> datasets.Dataset:
    """The first ``rows`` examples of a stream (all when None) as an in-memory dataset."""
    part = stream.take(rows) if rows is not None else stream
    try:
        examples = list(part)
    except Exception as exc:  # a parser error while reading
        cause = exc.__cause__ or exc
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"could not read the stream: {message}") from None
    return datasets.Dataset.from_list(examples, features=stream.features) if stream.features is not None \
        else datasets.Dataset.from_list(examples)
