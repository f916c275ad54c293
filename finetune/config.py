"""Typed run configuration: a recipe YAML plus ``key=value`` overrides, validated before any model loads.

A recipe has one section per dataclass below (``run``, ``model``, ``data``, ``lora``, ``train``,
``eval``). Every key is checked: an unknown key, a value of the wrong type or an impossible value
raises :class:`ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import ConfigError


@dataclass
class RunConfig:
    """What the run is and where it goes."""

    task: str = "classification"
    """Task name from the registry in ``finetune.tasks``."""
    name: str | None = None
    """Run folder name under ``output_dir``; default ``<recipe>-<timestamp>``."""
    output_dir: str = "runs"
    seed: int = 42


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


@dataclass
class DataConfig:
    """Where the examples come from and which columns hold what."""

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
    text_column: str = "text"
    text_pair_column: str | None = None
    """Second text for sentence-pair classification."""
    label_column: str = "label"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    """Cap on validation examples used for evaluation during training."""
    max_test_samples: int | None = None
    max_length: int = 128
    """Tokens per example; longer inputs are truncated."""
    shape: Literal["auto", "text", "prompt_response", "messages"] = "auto"
    """Generation: plain ``text`` (language modelling), ``prompt_response`` pairs or chat ``messages`` lists
    (supervised fine-tuning); ``auto`` picks from the columns: messages, else prompt + response, else text."""
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    """Generation: a list of ``{role, content}`` turns; the last (assistant) turn is the response."""
    use_chat_template: bool = True
    """Generation: format prompts with the tokenizer's chat template when it has one (else ``prompt_template``)."""
    system_prompt: str | None = None
    """Generation with a chat template: a system turn put before each prompt; null keeps the template's
    own default (some templates insert a long one: a short one saves tokens on every sample)."""
    prompt_template: str = "### Prompt:\n{prompt}\n### Response:\n"
    """Generation without a chat template: the text the response follows; ``{prompt}`` is replaced."""
    packing: bool = False
    """Generation SFT: pack several training samples into each row of up to ``max_length`` tokens; attention
    and positions stay inside each sample. Plain text is always concatenated and cut into blocks."""
    overlength: Literal["truncate", "drop"] = "truncate"
    """Generation SFT samples longer than ``max_length``: ``truncate`` (the prompt loses its start, the
    response its end; EOS is kept only with a whole response) or ``drop``; counted in the log."""
    question_column: str = "question"
    """Question answering: the question."""
    context_column: str = "context"
    """Question answering: the passage that holds the answer."""
    answers_column: str = "answers"
    """Question answering: SQuAD-form answers ``{text: [...], answer_start: [...]}`` (character offsets)."""
    id_column: str | None = "id"
    """Question answering: a unique id per example; null numbers the rows."""
    unanswerable: bool | None = None
    """Question answering: questions may have no answer (SQuAD v2); null: yes when the data has one."""
    doc_stride: int = 128
    """Question answering: tokens shared by consecutive windows of a context longer than max_length (below it)."""
    on_bad_example: Literal["error", "skip"] = "error"
    """An example the task rejects (e.g. an answer not at its answer_start): stop with an error, or skip and
    count it."""
    source_lang: str | None = None
    """Translation: source language code (``en``); the key in ``translation_column`` and the prompt's language."""
    target_lang: str | None = None
    """Translation: target language code (``es``)."""
    translation_column: str = "translation"
    """Translation: column of ``{source_lang: ..., target_lang: ...}`` pairs (the Hub's usual shape)."""
    source_column: str | None = None
    """Translation: a plain column of source texts, instead of ``translation_column`` (with ``target_column``)."""
    target_column: str | None = None
    """Translation: a plain column of reference translations (with ``source_column``)."""
    source_prefix: str | None = None
    """Translation, encoder-decoder: text put before each source; null: T5's ``translate English to Spanish: ``."""
    source_lang_code: str | None = None
    """Translation: the tokenizer's source language token (mBART ``en_XX``, NLLB ``eng_Latn``); null: found."""
    target_lang_code: str | None = None
    """Translation: the tokenizer's target language token (forced as first generated token)."""


@dataclass
class LoraSettings:
    """Parameter-efficient fine-tuning with peft's LoRA, or full fine-tuning."""

    method: Literal["lora", "full"] = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] | None = None
    """Module names to adapt; null picks a default for the architecture."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: float = 1.0
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
    keep_checkpoints: int = 2
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
    tf32: bool = True
    """On CUDA, TF32 tensor cores for the matmuls that stay in fp32."""
    trackers: list[str] = field(default_factory=list)
    """accelerate trackers, e.g. ``[tensorboard]``."""


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    batch_size: int = 64
    before_training: bool = False
    """Also evaluate the untouched base model on the test split before training (a zero-shot reference)."""
    generate_samples: int = 32
    """Generation: held-out test prompts to generate for (the first N of the test split); 0 skips generation."""
    max_new_tokens: int = 64
    """Generation and translation: cap on new tokens per generated answer."""
    do_sample: bool = False
    """Generation: sample (with ``temperature`` and ``top_p``) instead of greedy decoding."""
    temperature: float = 1.0
    top_p: float = 1.0
    n_best_size: int = 20
    """Question answering: start and end candidates per window considered for the answer span."""
    max_answer_length: int = 30
    """Question answering: the longest answer span, in tokens."""
    null_score_threshold: float = 0.0
    """Question answering with unanswerable questions: answer nothing when the no-answer score beats the
    best span's by more than this (raise it for fewer empty answers)."""
    num_beams: int = 1
    """Translation: 1 = greedy decoding, more = beam search."""


@dataclass
class Config:
    """A whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe YAML (or start from defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = read_yaml(Path(recipe))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return config_from_dict(raw)


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


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for name, section in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; known sections: {', '.join(sections)}")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {section!r}")
        values[name] = _build_section(name, _section_class(sections[name]), section)
    config = Config(**values)
    validate(config)
    return config


def _section_class(f: dataclasses.Field) -> type:
    return typing.get_type_hints(Config)[f.name]


def _build_section(section: str, cls: type, raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a label column named 2019
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {annotation}")  # pragma: no cover


def validate(config: Config) -> None:
    """Reject impossible values with the key that holds them."""
    from finetune.tasks import TASKS  # late import: tasks import this module

    def need(ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {expected}; got {value!r}")

    need(config.run.task in TASKS, "run.task", f"one of {', '.join(sorted(TASKS))}", config.run.task)
    if config.run.name is not None:
        need(bool(config.run.name) and "/" not in config.run.name and config.run.name not in (".", ".."),
             "run.name", "a plain folder name", config.run.name)
    d, t, lo = config.data, config.train, config.lora
    need(0 <= d.validation_size < 1, "data.validation_size", "in [0, 1)", d.validation_size)
    need(0 <= d.test_size < 1, "data.test_size", "in [0, 1)", d.test_size)
    need(d.validation_size + d.test_size < 1, "data.test_size", "such that validation_size + test_size < 1",
         d.test_size)
    need(d.max_length >= 8, "data.max_length", ">= 8", d.max_length)
    need(d.doc_stride >= 0, "data.doc_stride", ">= 0", d.doc_stride)
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        value = getattr(d, key)
        need(value is None or value > 0, f"data.{key}", "a positive integer or null", value)
    if d.source == "files":
        need(d.train_file is not None or d.test_file is not None, "data.train_file",
             "a file path when data.source is 'files'", d.train_file)
    need(lo.r > 0, "lora.r", "> 0", lo.r)
    need(lo.alpha > 0, "lora.alpha", "> 0", lo.alpha)
    need(0 <= lo.dropout < 1, "lora.dropout", "in [0, 1)", lo.dropout)
    need(t.epochs > 0, "train.epochs", "> 0", t.epochs)
    need(t.max_steps is None or t.max_steps > 0, "train.max_steps", "a positive integer or null", t.max_steps)
    need(t.batch_size > 0, "train.batch_size", "> 0", t.batch_size)
    need(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "> 0",
         t.gradient_accumulation_steps)
    need(t.learning_rate > 0, "train.learning_rate", "> 0", t.learning_rate)
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", t.warmup_ratio)
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "> 0 or null", t.max_grad_norm)
    for key in ("eval_every_steps", "save_every_steps", "early_stopping_patience"):
        value = getattr(t, key)
        need(value is None or value > 0, f"train.{key}", "a positive integer or null", value)
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", t.keep_checkpoints)
    need(t.log_every_steps > 0, "train.log_every_steps", "> 0", t.log_every_steps)
    need(t.pad_to_multiple_of is None or t.pad_to_multiple_of > 0, "train.pad_to_multiple_of", "> 0 or null",
         t.pad_to_multiple_of)
    need(t.num_workers is None or t.num_workers >= 0, "train.num_workers", ">= 0 or null", t.num_workers)
    for tracker in t.trackers:
        need(tracker in ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"),
             "train.trackers", "a list of accelerate trackers (tensorboard, wandb, mlflow, ...)", tracker)
    need(config.eval.batch_size > 0, "eval.batch_size", "> 0", config.eval.batch_size)
    need(config.eval.n_best_size > 0, "eval.n_best_size", "> 0", config.eval.n_best_size)
    need(config.eval.max_answer_length > 0, "eval.max_answer_length", "> 0", config.eval.max_answer_length)
    TASKS[config.run.task].validate_config(config)


def dump_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back to the same values."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def resolve_mixed_precision(setting: str) -> str:
    """``auto``: bf16 on GPUs that support it and on CPUs with AVX512-BF16 or AMX, else fp32."""
    if setting != "auto":
        return setting
    import torch  # late: validating a recipe should not pay for importing torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu = torch.cpu
    has_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if has_bf16 else "no"
