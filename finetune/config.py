"""Typed run configuration: the schema of a recipe, its parsing and its checks. It knows no task.

A recipe has one section per dataclass below (``run``, ``model``, ``data``, ``lora``, ``train``,
``eval``). ``data`` and ``eval`` hold what every task uses; a task adds its own keys (its columns, its
evaluation knobs) by subclassing :class:`DataConfig` / :class:`EvalConfig` in its own file, and
:func:`build_config` is given those classes by whoever knows the task (``finetune.recipes``).

Every key is checked: an unknown key, a value of the wrong type or an impossible value raises
:class:`ConfigError` naming the dotted key and what is allowed. Each section checks its own values in
``validate`` with :func:`check`, so every such error reads the same.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from finetune.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


def check(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise the one-line error for config key ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected}; got {value!r}")


@dataclass
class RunConfig:
    """What the run is and where it goes."""

    task: str = "classification"
    """Task name from the registry in ``finetune.tasks``."""
    name: str | None = None
    """Run folder name under ``output_dir``; default ``<recipe>-<data name>-<timestamp>``."""
    output_dir: str = "runs"
    seed: int = 42
    """Seeds every random draw (splits, initialisation, dropout, batch order); 0 to 2**32 - 1."""

    def validate(self) -> None:
        check(0 <= self.seed < 2**32, "run.seed", "an integer from 0 to 2**32 - 1", self.seed)
        if self.name is not None:
            check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "run.name",
                  "a plain folder name", self.name)


@dataclass
class ModelConfig:
    """Which pretrained checkpoint to start from."""

    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    """A Hub id, a local folder, or a GGUF file; Hub ids that an installed package ships resolve offline."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside ``name_or_path`` (a folder or Hub repo)."""
    revision: str | None = None
    trust_remote_code: bool = False
    """Run code shipped with a checkpoint; only when the recipe says so."""
    allow_pickle: bool = False
    """Allow ``*.bin`` (pickle) weights; safetensors only by default."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ...); null keeps the model's default."""

    def validate(self) -> None:
        pass


@dataclass
class DataConfig:
    """Where the examples come from and how held-out splits are made; a task subclasses it to add its
    columns."""

    measures_lengths: ClassVar[bool] = False
    """Whether the task measures its inputs' token lengths (then ``max_length: auto`` works)."""
    keeps_groups: ClassVar[bool] = False
    """Whether the task keeps ``group_column`` in its prepared examples (then group-aware splits work)."""

    source: str = "builtin:tweet-sentiment"
    """``builtin:<name>``, a Hub dataset id, or ``files`` (then ``train_file`` and friends)."""
    hub_config: str | None = None
    """Hub dataset configuration name (second argument of ``load_dataset``)."""
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    validation_size: float = 0.1
    """Share of train held out for validation when the data has no validation split."""
    test_size: float = 0.1
    """Share of train held out for testing when the data has no test split."""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    """Cap on validation examples used for evaluation during training."""
    max_test_samples: int | None = None
    max_length: int | Literal["auto"] = 128
    """Tokens per example; longer inputs are truncated. ``auto`` (tasks that measure their inputs): the smallest
    multiple of 8 that covers the 95th percentile of the training inputs, capped by the model's limit."""
    group_column: str | None = None
    """A column naming each row's group (a document, a user): every held-out split carved from train keeps all rows
    of a group on one side (stratified by label where the task stratifies)."""
    streaming: bool = False
    """Read the training data as a stream (``datasets`` IterableDataset), tokenized on the fly and dealt out to
    the processes, never loaded whole: for data larger than memory or disk. Needs ``train.max_steps``; held-out
    splits come from ``validation_file``/``test_file`` (or the Hub data set's own splits), else from the first
    ``streaming_holdout`` examples of the stream (see ``finetune.data.load_stream``)."""
    shuffle_buffer: int = 10_000
    """Streaming: examples held in the shuffle buffer (0: the stream's own order)."""
    streaming_holdout: int = 1000
    """Streaming without a validation/test file or split: the first N streamed examples are the test split, the
    next N the validation split, and training starts after them."""

    def validate(self) -> None:
        check(0 <= self.validation_size < 1, "data.validation_size", "in [0, 1)", self.validation_size)
        check(0 <= self.test_size < 1, "data.test_size", "in [0, 1)", self.test_size)
        check(self.validation_size + self.test_size < 1, "data.test_size",
              "such that validation_size + test_size < 1", self.test_size)
        if self.max_length == "auto":
            check(self.measures_lengths, "data.max_length", "a number of tokens for this run's task (run.task does not "
                  "measure its inputs, so it cannot choose one: auto is for classification)", self.max_length)
        else:
            check(self.max_length >= 8, "data.max_length", ">= 8 or auto", self.max_length)
        if self.group_column is not None:
            check(self.keeps_groups, "data.group_column", "null for this run's task (run.task does not keep a group "
                  "column through its preparation: group-aware splits are for classification)", self.group_column)
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", self.shuffle_buffer)
        check(self.streaming_holdout > 0, "data.streaming_holdout", "> 0", self.streaming_holdout)
        if self.streaming:
            check(not self.source.startswith("builtin:"), "data.streaming",
                  "false for a built-in data set (they are small; stream files or Hub data sets)", self.streaming)
        for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key}", "a positive integer or null", value)
        if self.source == "files":
            check(self.train_file is not None or self.test_file is not None, "data.train_file",
                  "a file path when data.source is 'files'", self.train_file)
        else:
            # Files are read only with source 'files': silently training on the built-in or Hub data while the
            # user named a file would be worse than stopping.
            for key in ("train_file", "validation_file", "test_file"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"config key 'data.{key}' is set ({getattr(self, key)!r}) but data.source is "
                                      f"{self.source!r}, which does not read files; add data.source=files to train "
                                      f"on your files, or drop data.{key}")


@dataclass
class LoraSettings:
    """Parameter-efficient fine-tuning with peft's LoRA, or full fine-tuning."""

    method: Literal["lora", "full"] = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] | None = None
    """Module names to adapt; null picks a default for the architecture."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA): a trained magnitude per output feature on top of LoRA's direction; slower
    per step than LoRA (the fused LoRA layer does not apply to it)."""
    use_rslora: bool = False
    """rsLoRA: scale the adapter by ``alpha / sqrt(r)`` instead of ``alpha / r`` (keeps high ranks learning)."""
    quantize: Literal["4bit"] | None = None
    """QLoRA: ``4bit`` loads the frozen base in 4-bit NF4 (bitsandbytes, CUDA GPUs only) and trains LoRA on it."""

    def validate(self) -> None:
        check(self.r > 0, "lora.r", "> 0", self.r)
        check(self.alpha > 0, "lora.alpha", "> 0", self.alpha)
        check(0 <= self.dropout < 1, "lora.dropout", "in [0, 1)", self.dropout)
        if self.method == "full":
            for key in ("use_dora", "use_rslora", "quantize"):
                check(not getattr(self, key), f"lora.{key}", "unset with lora.method=full (it is a LoRA setting)",
                      getattr(self, key))


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: float | Literal["auto"] = 1.0
    """Passes over the training split. ``auto`` sizes the run from the data (``finetune.train.auto_length``): a
    floor of optimizer steps for small sets, a cap for large ones, validation and early stopping in between."""
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = 32
    """Examples per device per micro-batch."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    on_nonfinite_loss: Literal["error", "skip"] = "error"
    """A NaN/inf loss stops the run naming the step (``error``) or skips that batch, counted (``skip``)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 where the hardware has it (CPUs with AVX512-BF16 or AMX included), else fp32."""
    eval_every_steps: int | None = None
    """Evaluate on validation every N optimizer steps (and at each epoch end)."""
    save_every_steps: int | None = None
    """Write a resumable checkpoint every N optimizer steps (and at each epoch end)."""
    keep_checkpoints: int = 0
    """Resumable checkpoints a finished run keeps (the newest N; the best weights stay in ``best/`` anyway). While
    training, the newest max(N, 2) are kept, so that resuming can fall back past a damaged newest one."""
    metric_for_best: str = "loss"
    """Validation metric that picks the best checkpoint (``loss`` or a task metric)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement."""
    log_every_steps: int = 10
    group_by_length: bool = True
    """Batch examples of similar length together (less padding); shuffled across groups."""
    pad_to_multiple_of: int | None = 8
    num_workers: int | None = None
    """Dataloader worker processes that collate batches ahead of the step (prefetching). null: 2 on a GPU, 0 on
    CPUs, where the workers would take cores from the matmuls (measured slower on 2 cores)."""
    fast_dropout: bool = True
    """On CPU, dropout masks from 16-bit random numbers (``p`` rounded to 1/65536), ~4x cheaper than torch's."""
    base_in_bf16: bool = True
    """With bf16 mixed precision and LoRA, keep the frozen base Linear weights in bf16 (autocast would round
    them to bf16 on every forward anyway); trainable weights stay fp32."""
    fast_attention: bool = True
    """On CPU, train with attention as two matmuls + fp32 softmax + fast dropout where torch's SDPA kernels are
    slow (any dropout, or keys up to 128 tokens); evaluation and GPUs keep SDPA. Needs attn_implementation sdpa."""
    fused_lora: bool = True
    """Compute each LoRA layer (base + dropout + A + B) as one autograd operation instead of peft's ~15."""
    fused_optimizer: bool = True
    """torch's fused AdamW kernel where the parameters' device supports it."""
    compile: bool = False
    """``torch.compile`` the model (slow to start; pays off only on long runs, mostly on GPUs)."""
    chunked_loss: bool = True
    """Decoder LMs: the loss from the final hidden states and the output layer a chunk of target tokens at a time,
    never the logits of every position (less memory; the same loss and gradients to rounding)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input in the forward pass and recompute the rest in the backward pass: much less
    activation memory (longer sequences, larger batches) for about a third more compute."""
    max_tokens_per_pass: int | Literal["auto"] | None = "auto"
    """Split each training batch into forward/backward passes of at most this many tokens (rows x padded length)
    whose gradients add up before the optimizer step: the same update as one pass (each part's loss is weighted
    by its share of what the task's loss averages over, e.g. target tokens), with activation memory bounded by
    this budget instead of the batch. ``auto``: 512 on CPUs (measured on SmolLM2-135M SFT: ~10% slower than one
    pass, at less than half its peak memory) and one pass on GPUs; ``null``: one pass per batch. Applies to tasks that say what their loss averages over (text
    generation) and not with DeepSpeed or ``on_nonfinite_loss=skip``."""
    tf32: bool = True
    """On CUDA, TF32 tensor cores for the matmuls that stay in fp32."""
    trackers: list[str] = field(default_factory=list)
    """accelerate trackers, e.g. ``[tensorboard]``."""

    def validate(self) -> None:
        check(self.epochs == "auto" or self.epochs > 0, "train.epochs", "> 0 or auto", self.epochs)
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "a positive integer or null",
              self.max_steps)
        check(self.batch_size > 0, "train.batch_size", "> 0", self.batch_size)
        check(self.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "> 0",
              self.gradient_accumulation_steps)
        check(self.learning_rate > 0, "train.learning_rate", "> 0", self.learning_rate)
        check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", self.warmup_ratio)
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", "> 0 or null",
              self.max_grad_norm)
        for key in ("eval_every_steps", "save_every_steps", "early_stopping_patience"):
            value = getattr(self, key)
            check(value is None or value > 0, f"train.{key}", "a positive integer or null", value)
        check(self.keep_checkpoints >= 0, "train.keep_checkpoints", ">= 0", self.keep_checkpoints)
        check(self.log_every_steps > 0, "train.log_every_steps", "> 0", self.log_every_steps)
        check(self.pad_to_multiple_of is None or self.pad_to_multiple_of > 0, "train.pad_to_multiple_of",
              "> 0 or null", self.pad_to_multiple_of)
        check(self.num_workers is None or self.num_workers >= 0, "train.num_workers", ">= 0 or null",
              self.num_workers)
        check(self.max_tokens_per_pass in ("auto", None) or (isinstance(self.max_tokens_per_pass, int)
                                                             and self.max_tokens_per_pass > 0),
              "train.max_tokens_per_pass", "a positive integer, auto or null", self.max_tokens_per_pass)
        if isinstance(self.max_tokens_per_pass, int):
            check(self.on_nonfinite_loss == "error", "train.on_nonfinite_loss",
                  "error when train.max_tokens_per_pass is set (a skipped part would leave the others' gradients)",
                  self.on_nonfinite_loss)
        for tracker in self.trackers:
            check(tracker in TRACKERS, "train.trackers",
                  "a list of accelerate trackers (tensorboard, wandb, mlflow, ...)", tracker)


@dataclass
class EvalConfig:
    """Held-out evaluation; a task subclasses it to add its own knobs."""

    batch_size: int = 64
    before_training: bool = False
    """Also evaluate the untouched base model on the test split before training (a zero-shot reference)."""

    def validate(self) -> None:
        check(self.batch_size > 0, "eval.batch_size", "> 0", self.batch_size)


@dataclass
class Config:
    """A whole run. ``data`` and ``eval`` are instances of the task's subclasses of :class:`DataConfig`
    and :class:`EvalConfig`."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# --- reading recipes ------------------------------------------------------------------------------
def read_recipe(recipe: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A recipe YAML (or nothing) with ``key=value`` overrides applied: nested dicts, not yet checked."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = read_yaml(Path(recipe))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping safely; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``train.epochs=3`` -> ("train.epochs", 3); the value is parsed as YAML (typed)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # an unparsable value stays a string; type checking judges it
    if value == "" and text.strip() not in ('""', "''"):
        value = text.strip()  # YAML reads a bare | or > as an empty block: keep the character (a separator)
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for key ``a.b``."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def task_name(raw: dict[str, Any]) -> str:
    """``run.task`` of a raw recipe (the default when it has none): which task's sections to build."""
    run = raw.get("run")
    value = run.get("task", RunConfig.task) if isinstance(run, dict) else RunConfig.task
    return _coerce("run.task", str, value)


def build_config(raw: dict[str, Any], sections: dict[str, type] | None = None,
                 foreign_keys: dict[str, str] | None = None) -> Config:
    """Build and validate a :class:`Config` from nested dicts. ``sections`` replaces section classes
    (a task's ``data`` and ``eval``); ``foreign_keys`` maps ``section.key`` of other tasks to the task that
    owns it, so that such a key gets an error saying so."""
    classes = {**SECTIONS, **(sections or {})}
    values: dict[str, Any] = {}
    for name, section in raw.items():
        if name not in classes:
            raise ConfigError(f"unknown config section {name!r}; known sections: {', '.join(classes)}")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {section!r}")
        values[name] = _build_section(name, classes[name], section, foreign_keys or {})
    for name, cls in classes.items():
        values.setdefault(name, cls())
    config = Config(**values)
    config.validate()
    return config


def _build_section(section: str, cls: type, raw: dict[str, Any], foreign_keys: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            owner = foreign_keys.get(f"{section}.{key}")
            if owner is not None:
                raise ConfigError(f"config key '{section}.{key}' belongs to task {owner}, not to this run's task "
                                  f"(run.task); keys in '{section}' here: {', '.join(sorted(known))}")
            raise ConfigError(
                f"unknown config key '{section}.{key}'; known keys in '{section}': {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a type annotation; convert the few safe cases (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, args[0], v) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a label column named 2019
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {annotation}")  # pragma: no cover


def dump_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML that ``finetune.recipes.load_config`` reads back to the same values."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
