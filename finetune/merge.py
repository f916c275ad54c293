"""Merge a run's LoRA adapter into its base model: one plain transformers model that loads with no peft.

Its own module rather than ``models.py``: merging needs a whole trained run (config, task, label map, and
the Hub pull), loaded by ``finetune.trained_run``, which imports ``models.py``.

The merge happens in float32 on a float copy of the base. Merging into quantized weights would round
the small LoRA delta away (and bitsandbytes/GGUF blocks cannot be saved as a plain model anyway), so a
base that is still quantized is refused, naming what was found.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from finetune.errors import ModelError, RunFolderError
from finetune.run_folder import is_adapter
from finetune.trained_run import load_run, locate_run

# Module classes that hold quantized weights (bitsandbytes, GGUF blocks, GPTQ/AWQ kernels).
QUANTIZED_MODULES = ("Linear4bit", "Linear8bitLt", "GgufLinear", "GgufExperts", "QuantLinear", "WQLinear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantization_of(model: torch.nn.Module) -> str | None:
    """What makes ``model`` a quantized model, in words; None for a plain float model.

    A GGUF checkpoint that transformers dequantized at load time (the legacy loader always does; the
    packed loader does without a GGUF kernel) is a float model, although it keeps its ``GgufConfig``:
    what counts for GGUF is whether weights are still packed (``GgufLinear``, uint8 blocks).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(getattr(model, "config", None),
                                                                        "quantization_config", None)
    if config is not None:
        method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
        method = str(getattr(method, "value", method))
        if method != "gguf":
            return f"the base was loaded with a quantization_config (quant_method={method})"
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__name__ in QUANTIZED_MODULES or kind.__module__.startswith(("bitsandbytes", "auto_gptq", "awq")):
            packed = " (GGUF weights left packed in GGUF blocks, not dequantized)" if "Gguf" in kind.__name__ else ""
            return f"module {name} is a quantized layer ({kind.__module__}.{kind.__name__}){packed}"
    for name, parameter in model.named_parameters():
        if not parameter.dtype.is_floating_point or parameter.dtype.itemsize < 2:  # int8/uint8 blocks, fp8
            return f"parameter {name} is stored as {parameter.dtype}, not a 16/32-bit float"
    return None


def merge_adapter(model: PeftModel, name: str = "the adapter") -> PreTrainedModel:
    """Base + LoRA -> one plain float32 transformers model. Refuses a quantized base."""
    found = quantization_of(model.get_base_model())
    if found:
        raise ModelError(f"refusing to merge {name} into a quantized base: {found}. Merging into quantized "
                         f"weights rounds the LoRA update away; load the base in float (without quantization, "
                         f"or with the GGUF dequantized) and merge again")
    merged = model.to(torch.float32).merge_and_unload()  # base and LoRA in one float dtype for the addition
    if getattr(merged, "hf_quantizer", None) is not None:
        merged = _plain_copy(merged)  # a dequantized GGUF base: transformers will not save it as it is
    return merged


def merge_run(ref: str | Path, out: Path, *, revision: str | None = None, dtype: str = "float32",
              overwrite: bool = False, overrides: list[str] | None = None) -> Path:
    """Merge the adapter of a run (folder or Hub id) into a float copy of its base; save a plain
    transformers model (safetensors), its tokenizer and task files (label map in ``config.id2label``).
    ``overrides``: config keys, e.g. ``model.name_or_path=PATH`` for a Hub run trained from a local base."""
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    run_folder = locate_run(ref, revision)
    folder = run_folder.weights()
    if not is_adapter(folder):
        raise RunFolderError(f"{ref} was fully fine-tuned: {folder} already holds a plain transformers model, "
                             f"there is no adapter to merge")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RunFolderError(f"{out} exists and is not empty; choose another --out or pass --overwrite")

    run = load_run(run_folder.path, overrides)
    merged = merge_adapter(run.model, f"{ref} (base {run.config.model.name_or_path})").to(DTYPES[dtype])

    # Written next to the destination, then moved: an interrupted merge leaves no half model at --out.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(str(partial), safe_serialization=True)
    run.tokenizer.save_pretrained(str(partial))
    run.task.save(partial)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(partial, out)
    return out


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model built from its config without the quantization settings."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain
