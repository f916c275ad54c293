"""Export a merged model for other runtimes: GGUF for llama.cpp, ONNX for encoders with a task head.

Both work on an in-memory model + tokenizer (what ``merge`` produces) and know nothing of run folders.
Each export has a ``verify_*`` twin that loads the file back with an independent reader and returns the
largest absolute difference of its outputs from the PyTorch model's, so a broken export is caught by
numbers, not by file size.

GGUF (``export_gguf``) follows the conventions of llama.cpp's ``convert_hf_to_gguf.py``: gguf-py's tensor
name map, q/k rows permuted for llama.cpp's rotary layout, hyper-parameters and a byte-level BPE
("gpt2") tokenizer with its special ids, ``add_bos`` flag and chat template in the metadata. The file is
checked by reading it back with transformers' own GGUF loader, the one finetune uses for GGUF inputs.

Runs (``export_run``, ``load_onnx_run``) are the bottom section: ``finetune export`` merges a finished
run's adapter into a float copy of its base, writes the file and verifies it; an ONNX export also gets the
run's config and task file beside it, so that ``finetune predict``/``serve`` on the ``.onnx`` file run the
task's own pre- and post-processing around onnxruntime.

ONNX (``export_onnx``) traces the model with torch's TorchScript-based exporter (``dynamo=False``): the
newer dynamo exporter needs the ``onnxscript`` package, the TorchScript one needs nothing beyond
``onnx`` (torch 2.13 still ships it, deprecated). Tracing freezes the Python-side branches it meets;
in these encoders those are attention-mask shape checks that go the same way at every shape, and the
tests run the graphs in onnxruntime at other batch sizes and lengths than the traced ones.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.config import dump_config
from finetune.errors import ConfigError, FinetuneError, ModelError, RunFolderError
from finetune.run_folder import RunFolder

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Prompts for the verification: plain text, digits, punctuation and a chat-formatted turn.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in 2024, there were 3 little cats.",
    "<|im_start|>user\nwhat color is the sky?<|im_end|>\n<|im_start|>assistant\n",
)


def _require(module: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FinetuneError(f"this export needs the {module!r} package: pip install 'finetune[{extra}]'") from None


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


# --------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class _GgufArch:
    """How one transformers ``model_type`` maps onto a llama.cpp architecture."""

    gguf_name: str
    """gguf-py's name of the architecture (``general.architecture``)."""
    permute_qk: bool
    """llama.cpp's ``llama`` graph rotates interleaved pairs (GPT-J style) while transformers' Llama
    rotates the two halves of each head (NeoX style); llama.cpp's converter permutes the q/k rows so
    that its rotation sees the same pairs. Its ``qwen2`` graph rotates halves, so Qwen2 needs none."""


# Mistral is Llama with an optional sliding window: llama.cpp converts it as ``llama`` too.
GGUF_ARCHS: dict[str, _GgufArch] = {
    "llama": _GgufArch("llama", permute_qk=True),
    "mistral": _GgufArch("llama", permute_qk=True),
    "qwen2": _GgufArch("qwen2", permute_qk=False),
}


def export_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, dtype: str = "f16") -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file for llama.cpp (and transformers' GGUF loader).

    ``out`` is the ``.gguf`` file, or a folder that receives ``model-<dtype>.gguf``. ``dtype`` is the
    type of the 2-D weights: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (gguf's own Q8_0 blocks of 32);
    1-D tensors (norms, biases) stay f32, as in llama.cpp. Supported: Llama-family causal LMs (Llama,
    SmolLM2, Mistral without an active sliding window, Qwen2) with a byte-level BPE tokenizer.
    Returns the file written."""
    gguf = _require("gguf", "gguf")
    if dtype not in GGUF_DTYPES:
        raise ModelError(f"GGUF dtype {dtype!r} is not supported: use one of {', '.join(GGUF_DTYPES)}")
    arch = _gguf_arch(model)
    vocab = _gguf_vocab(tokenizer, model.config.vocab_size)
    path = Path(out) / f"model-{dtype}.gguf" if Path(out).suffix != ".gguf" else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)

    # Written under a temporary name and renamed when complete: a failure never leaves a truncated .gguf.
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch.gguf_name)
    try:
        _add_gguf_hparams(writer, model, dtype)
        vocab.add_to(writer)
        for name, array in _gguf_tensors(model, arch):
            _add_gguf_tensor(writer, name, array, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)
    return path


def _refuse_unmerged(model: Any, what: str) -> None:
    """Exports take the merged model: a peft wrapper would export its base without the adapter."""
    if hasattr(model, "peft_config"):
        raise ModelError(f"{what} needs a merged model; {type(model).__name__} still holds an adapter "
                         "(merge it first: finetune merge, or model.merge_and_unload())")


def _gguf_arch(model: PreTrainedModel) -> _GgufArch:
    """The llama.cpp architecture for ``model``, or a one-line refusal naming what is supported."""
    _refuse_unmerged(model, "GGUF export")
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    supported = "Llama-family causal LMs (LlamaForCausalLM e.g. SmolLM2, MistralForCausalLM, Qwen2ForCausalLM)"
    if model_type not in GGUF_ARCHS or not type(model).__name__.endswith("ForCausalLM"):
        raise ModelError(f"GGUF export does not support {type(model).__name__} ({model_type}): only {supported}")
    # What llama.cpp's graph for these architectures (and transformers' GGUF reader) cannot express:
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export does not support rope scaling {rope.get('rope_type')!r} "
                         f"({type(model).__name__}): only the default rotary embedding, which transformers' "
                         "GGUF loader reads back")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelError(f"GGUF export needs a SiLU MLP; {type(model).__name__} uses {config.hidden_act!r}")
    if model_type != "qwen2" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ModelError(f"GGUF export does not support {type(model).__name__} with attention/MLP biases")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < config.max_position_embeddings:
        raise ModelError(f"GGUF export does not support a sliding attention window ({window} < context "
                         f"{config.max_position_embeddings}): llama.cpp would attend to the whole context")
    return GGUF_ARCHS[model_type]


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope theta and scaling in ``config.rope_parameters``; older configs had
    ``rope_theta`` / ``rope_scaling`` attributes."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return params


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_gguf_hparams(writer: gguf.GGUFWriter, model: PreTrainedModel, dtype: str) -> None:
    """The hyper-parameters llama.cpp reads (and transformers maps back onto the config)."""
    import gguf

    config = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_gguf_model_name(model))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # transformers reads rope.dimension_count back as head_dim: it also covers head_dim != hidden / heads.
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gguf_model_name(model: PreTrainedModel) -> str:
    """``general.name``: the checkpoint folder's name, else the model class. transformers' GGUF reader
    takes a ``llama`` file whose name is exactly "mistral" for a "mistral" file it cannot read: avoid it."""
    name = Path(str(getattr(model.config, "_name_or_path", "") or "")).name or type(model).__name__
    return "Mistral" if name == "mistral" else name


def _gguf_tensors(model: PreTrainedModel, arch: _GgufArch) -> list[tuple[str, np.ndarray]]:
    """Every weight under its GGUF name, as float32 in llama.cpp's layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name),
                                     config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    # Tied embeddings: the file has no output.weight, and its readers reuse token_embd.weight.
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if tied and tensor.data_ptr() == output.weight.data_ptr() and hf_name != _input_embedding_name(model):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: tensor {hf_name} of {type(model).__name__} has no {arch.gguf_name} "
                             "name in llama.cpp's tensor map")
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if arch.permute_qk and name.startswith("blk.") and name.endswith(".attn_q.weight"):
            array = _permute_rotary_rows(array, n_head)
        elif arch.permute_qk and name.startswith("blk.") and name.endswith(".attn_k.weight"):
            array = _permute_rotary_rows(array, n_kv_head)
        tensors.append((name, array))
    return tensors


def _input_embedding_name(model: PreTrainedModel) -> str:
    embedding = model.get_input_embeddings()
    return next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)


def _permute_rotary_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from halves (``[x0..x(d/2-1), y0..]``, transformers' rotate_half) to
    interleaved pairs (``[x0, y0, x1, y1, ...]``, llama.cpp's ``llama`` rope), so that both rotate the
    same pairs of query/key features. transformers' GGUF loader applies the inverse on reading."""
    rows = weights.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(
        weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape))


def _add_gguf_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, dtype: str) -> None:
    """Encode one tensor in the file's dtype with gguf's own quantizers (as llama.cpp's converter does)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    if array.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = Q.F32  # norms and biases are tiny and precision-sensitive: llama.cpp keeps them f32
    try:
        data = gguf.quants.quantize(array, qtype)
    except gguf.QuantError:
        # Q8_0 packs rows in blocks of 32: a row length that is not a multiple falls back to f16.
        logger.info("GGUF export: %s %s cannot be %s, written as f16", name, array.shape, qtype.name)
        qtype, data = Q.F16, gguf.quants.quantize(array, Q.F16)
    writer.add_tensor(name, data, raw_dtype=qtype)


@dataclass(frozen=True)
class _GgufVocab:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer metadata."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> _GgufVocab:
    import gguf

    state = _backend_state(tokenizer)
    pre = _bpe_pre_tokenizer_name(state, tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model's "
                         f"vocab_size is {vocab_size}")
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            # Rows of the embedding no token uses (vocab padded to a multiple): a placeholder that never
            # matches text. llama.cpp marks these USER_DEFINED; UNUSED keeps readers from matching "[PADn]".
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in state["model"]["merges"]]
    special_ids = {kind: getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _added_special_tokens(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: gguf-py takes them as a list
        template = [{"name": name, "template": text} for name, text in template.items()]
    return _GgufVocab(tokens, [int(t) for t in types], merges, pre,
                      {kind: token_id for kind, token_id in special_ids.items() if token_id is not None},
                      add_bos, add_eos, template)


def _backend_state(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    state = json.loads(backend.to_str())
    if state["model"]["type"] != "BPE":
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers only; this one is "
                         f"{state['model']['type']} (e.g. SentencePiece Llama 2 / Mistral tokenizers are not)")
    return state


def _bpe_pre_tokenizer_name(state: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how this tokenizer splits text before BPE.

    llama.cpp's converter recognises a tokenizer by hashing its output on a test text; here the
    pre-tokenizer itself is read: GPT-2's ByteLevel regex (``gpt-2``), digits split first then
    GPT-2's regex (``smollm``), or a Split regex that transformers' GGUF reader knows by name
    (Llama 3's ``llama-bpe``, ``qwen2``, ...). Anything else is refused rather than written as a
    tokenizer that would split text differently after loading."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    others = [step for step in steps if step.get("type") != "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers without a prefix space; "
                         f"{type(tokenizer).__name__} pre-tokenizes with {[s.get('type') for s in steps]}")
    gpt2_regex = byte_level[0].get("use_regex", True)
    if gpt2_regex and not others:
        return "gpt-2"
    if gpt2_regex and others == [{"type": "Digits", "individual_digits": True}]:
        return "smollm"
    if not gpt2_regex and len(others) == 1 and others[0].get("type") == "Split":
        regex = others[0].get("pattern", {}).get("Regex")
        name = _known_split_names().get(regex)
        if name is not None:
            return name
    raise ModelError(f"GGUF export does not recognise this tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}): "
                     "supported are GPT-2's byte-level regex, SmolLM's, Llama 3's and Qwen2's")


def _known_split_names() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, from the table transformers' GGUF reader rebuilds
    tokenizers with (so that what we write reads back the same). llama.cpp's usual names first."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers: only the plain GPT-2 / SmolLM splits are known
        return {}
    names: dict[str, str] = {}
    for name in ("llama-bpe", "qwen2", *GGUF_PRE_TOKENIZER_SPLITS):
        if name in GGUF_PRE_TOKENIZER_SPLITS:
            names.setdefault(GGUF_PRE_TOKENIZER_SPLITS[name], name)
    return names


def _added_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front / EOS at the end, found by encoding a probe: the post-processor
    decides this and no single attribute says it for every tokenizer class."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None:
        raise ModelError("GGUF export: the tokenizer's special tokens change the text's ids; cannot describe it")
    front, back = full[:start], full[start + len(plain):]
    if front not in ([], [tokenizer.bos_token_id]) or back not in ([], [tokenizer.eos_token_id]):
        raise ModelError(f"GGUF export: the tokenizer adds {tokenizer.convert_ids_to_tokens(front + back)}; "
                         "GGUF can only say 'add BOS' and 'add EOS'")
    return bool(front), bool(back)


@dataclass(frozen=True)
class LogitComparison:
    """How an exported model's outputs compare with the PyTorch model's on the same inputs."""

    max_abs_diff: float
    """Largest absolute difference over every output value (padding positions included)."""
    argmax_agreement: float
    """Share of positions (next tokens, classes, span starts/ends) where both pick the same argmax."""
    max_abs_value: float
    """Largest absolute PyTorch output value: the scale ``max_abs_diff`` is to be read against."""


def compare_gguf(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 texts: Sequence[str] = DEFAULT_PROMPTS) -> LogitComparison:
    """Load ``path`` with transformers' GGUF loader and compare its next-token logits with ``model``'s
    on ``texts`` (each prompt alone, every position). Raises ``ModelError`` when the tokenizer read from
    the file encodes a prompt to other ids than ``tokenizer``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise FinetuneError("GGUF verification needs at least one prompt")
    try:
        loaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load GGUF file {path} back: {first}") from None
    loaded.eval()
    diffs, agree, total, scale = [], 0, 0, 0.0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        reloaded_ids = loaded_tokenizer(text)["input_ids"]
        if list(reloaded_ids) != list(ids):
            raise ModelError(f"GGUF tokenizer encodes {text!r} as {list(reloaded_ids)[:12]}..., "
                             f"the model's tokenizer as {list(ids)[:12]}...")
        expected = _causal_logits(model, ids)
        actual = _causal_logits(loaded, ids)
        diffs.append(_max_abs_diff(expected, actual))
        agree += int((expected.argmax(-1) == actual.argmax(-1)).sum())
        total += expected.shape[0]
        scale = max(scale, float(np.abs(expected).max()))
    return LogitComparison(max(diffs), agree / total, scale)


def verify_gguf(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                texts: Sequence[str] = DEFAULT_PROMPTS) -> float:
    """Max abs difference of the logits of the GGUF file (read back by transformers) from ``model``'s on
    ``texts``; raises ``ModelError`` if the file's tokenizer encodes them differently."""
    return compare_gguf(path, model, tokenizer, texts).max_abs_diff


@torch.no_grad()
def _causal_logits(model: PreTrainedModel, ids: Sequence[int]) -> np.ndarray:
    """Logits at every position of one unpadded sequence, as float32 numpy (the model as given)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits
    finally:
        model.train(was_training)
    return logits[0].float().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------

ONNX_OPSET = 17  # LayerNormalization is one op from opset 17 on; onnxruntime 1.1x+ runs it
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class _OnnxKind:
    """One task head: the model class suffix that carries it and the outputs it returns."""

    class_suffix: str
    outputs: tuple[str, ...]
    per_token: bool
    """Outputs have a sequence axis (QA spans, token labels) besides the batch axis."""


# Named like finetune's tasks. Multi-label and regression classifiers share the classification graph.
ONNX_KINDS: dict[str, _OnnxKind] = {
    "classification": _OnnxKind("ForSequenceClassification", ("logits",), per_token=False),
    "question-answering": _OnnxKind("ForQuestionAnswering", ("start_logits", "end_logits"), per_token=True),
    "token-classification": _OnnxKind("ForTokenClassification", ("logits",), per_token=True),
}
# Encoder families whose graphs were checked against onnxruntime at other shapes than the traced one.
ONNX_MODEL_TYPES = ("bert", "distilbert", "roberta")


class _TracedHead(torch.nn.Module):
    """Positional tensors in, a tuple of the head's outputs out: the signature the exporter traces."""

    def __init__(self, model: PreTrainedModel, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, tensors)), return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def export_onnx(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, kind: str,
                input_names: Sequence[str] | None = None) -> Path:
    """Write ``model`` (an encoder with a ``kind`` head) as ONNX with dynamic batch and sequence axes.

    ``kind``: ``classification`` (also multi-label and regression heads), ``question-answering``
    (``start_logits``/``end_logits``) or ``token-classification``. ``out`` is the ``.onnx`` file or a
    folder that receives ``model.onnx``; the tokenizer and the model's config (labels) are saved beside
    it, and the ONNX metadata records the kind, the opset and the exporter. ``input_names`` narrows the
    graph's inputs (default: what the tokenizer produces and the model takes). Returns the ``.onnx`` path."""
    onnx = _require("onnx", "export")
    head = _onnx_kind(model, kind)
    path = Path(out) / ONNX_FILE if Path(out).suffix != ".onnx" else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = list(input_names) if input_names is not None else _onnx_input_names(model, tokenizer)
    dummy = _dummy_batch(tokenizer)
    args = tuple(dummy[name].to(next(model.parameters()).device) for name in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes.update({name: {0: "batch", 1: "sequence"} if head.per_token else {0: "batch"} for name in head.outputs})

    was_training = model.training  # before eval() below: the exporter and eval() both flip modes
    traced = _TracedHead(model, input_names, head.outputs).eval()
    try:
        with warnings.catch_warnings():
            # Known and checked: the TorchScript exporter is deprecated (chosen: see the module docstring);
            # the tracer notes Python-side shape checks in the attention-mask code, and indexing the mask with
            # aranges (never negative). verify_onnx compares the graph with PyTorch at other shapes.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            # dynamo=False: the TorchScript exporter; the dynamo one needs onnxscript (see module docstring).
            torch.onnx.export(traced, args, str(path), input_names=input_names, output_names=list(head.outputs),
                              dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    finally:
        model.train(was_training)  # the exporter toggles modes: leave the caller's model as it was

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    onnx.helper.set_model_props(graph, {"finetune.kind": kind, "finetune.opset": str(ONNX_OPSET),
                                        "finetune.exporter": f"torch.onnx TorchScript (torch {torch.__version__})"})
    onnx.save(graph, str(path))
    tokenizer.save_pretrained(str(path.parent))
    model.config.save_pretrained(str(path.parent))
    return path


def _onnx_kind(model: PreTrainedModel, kind: str) -> _OnnxKind:
    _refuse_unmerged(model, "ONNX export")
    if kind not in ONNX_KINDS:
        raise ModelError(f"ONNX export kind {kind!r} is not supported: use one of {', '.join(ONNX_KINDS)}")
    head = ONNX_KINDS[kind]
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ONNX_MODEL_TYPES:
        raise ModelError(f"ONNX export does not support {type(model).__name__} ({model_type}): only encoder "
                         f"models ({', '.join(ONNX_MODEL_TYPES)}) with a task head")
    if not type(model).__name__.endswith(head.class_suffix):
        raise ModelError(f"ONNX export of kind {kind!r} needs a *{head.class_suffix} model; "
                         f"got {type(model).__name__}")
    return head


def _onnx_input_names(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What the tokenizer produces and the model takes (DistilBERT takes no token_type_ids)."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in tokenizer.model_input_names if name in accepted]


def _dummy_batch(tokenizer: PreTrainedTokenizerBase) -> Mapping[str, torch.Tensor]:
    """Two text pairs of different lengths: padding and both segment ids appear in the traced inputs."""
    return tokenizer(["what is it?", "a"], ["it is a much longer second text than the first one", "b"],
                     padding=True, return_tensors="pt")


class OnnxPredictor:
    """An exported ONNX model and the tokenizer saved beside it, run with onnxruntime.

    ``predictor(predictor.tokenizer(texts, padding=True, return_tensors="np"))`` returns the head's
    outputs by name (``logits``, or ``start_logits``/``end_logits``) as numpy arrays."""

    def __init__(self, path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
        ort = _require("onnxruntime", "export")
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"ONNX file not found: {path}")
        self.path = path
        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.kind = self.session.get_modelmeta().custom_metadata_map.get("finetune.kind")

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise FinetuneError(f"ONNX model {self.path} needs inputs {missing}; the batch has {sorted(batch)}")
        feeds = {name: _as_int64(batch[name]) for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def _as_int64(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)


def compare_onnx(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 texts: Sequence[str] | Sequence[tuple[str, str]]) -> LogitComparison:
    """Run the ONNX file (onnxruntime) and ``model`` (PyTorch) on one padded batch of ``texts`` (strings,
    or (question, context) pairs for QA) and compare every output."""
    predictor = OnnxPredictor(path)
    pairs = [t for t in texts if not isinstance(t, str)]
    if pairs and len(pairs) != len(texts):
        raise FinetuneError("texts must be all strings or all (text, text_pair) tuples")
    first, second = ([a for a, _ in texts], [b for _, b in texts]) if pairs else (list(texts), None)
    batch = tokenizer(first, second, padding=True, truncation=True, return_tensors="pt")
    actual = predictor(batch)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(**{name: batch[name].to(device) for name in predictor.input_names}, return_dict=True)
    finally:
        model.train(was_training)
    diff, agree, total, scale = 0.0, 0, 0, 0.0
    for name in predictor.output_names:
        expected = outputs[name].float().cpu().numpy()
        diff = max(diff, _max_abs_diff(expected, actual[name]))
        scale = max(scale, float(np.abs(expected).max()))
        same = expected.argmax(-1) == actual[name].argmax(-1)
        agree, total = agree + int(same.sum()), total + same.size
    return LogitComparison(diff, agree / total, scale)


def verify_onnx(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                texts: Sequence[str] | Sequence[tuple[str, str]]) -> float:
    """Max abs difference between onnxruntime's outputs for the ONNX file and ``model``'s on ``texts``."""
    return compare_onnx(path, model, tokenizer, texts).max_abs_diff


# --------------------------------------------------------------------------------------------------
# Runs: `finetune export` and prediction with an exported ONNX file
# --------------------------------------------------------------------------------------------------

EXPORT_FORMATS = ("gguf", "onnx")
# Inputs the ONNX check runs besides the run's own test texts: short and long, punctuation and digits.
ONNX_CHECK_TEXTS = ("the movie was really quite good", "bad", "What a wonderful, surprising film: 10/10!",
                    "a chair by the window, near the river and the street, on a quiet day in 1990")
ONNX_CHECK_PAIRS = (("where is the chair?", "a chair by the window, near the river and the street"),
                    ("who wrote it?", "It was written by Jane in 1990, in Paris."),
                    ("what is it?", "it"))
ONNX_CHECK_RUN_ROWS = 8  # test predictions of the run added to the ONNX check


@dataclass(frozen=True)
class ExportResult:
    """A written export and how its read-back outputs compare with the merged PyTorch model's."""

    path: Path
    format: str
    comparison: LogitComparison
    checked: str
    """What was compared, in words (e.g. ``next-token logits of 3 prompts``)."""

    def describe(self) -> str:
        c = self.comparison
        reader = "transformers' GGUF loader" if self.format == "gguf" else "onnxruntime"
        size = self.path.stat().st_size / 2**20
        return (f"wrote {self.path} ({size:.1f} MiB)\nread back with {reader}: max abs diff {c.max_abs_diff:.3g} "
                f"from the merged PyTorch model ({self.checked}; largest |value| {c.max_abs_value:.3g}), "
                f"argmax agreement {c.argmax_agreement:.0%}")


def export_run(ref: str | Path, fmt: str, out: Path | None = None, dtype: str | None = None,
               revision: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export a finished run (folder or Hub id): its adapter merged into a float copy of the base, written
    as GGUF (decoder LMs of the Llama family; ``dtype`` f16 by default) or ONNX (encoder classification
    and QA runs; float32), then read back and compared with the merged model.

    Without ``out`` the file goes to the run folder's ``export/`` (``model-<dtype>.gguf``, or ``onnx/``
    holding ``model.onnx`` with the tokenizer, the run's config and task file)."""
    from finetune.trained_run import load_run, locate_run  # late: loading runs needs the tasks, not exports

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    if fmt == "onnx" and dtype not in (None, "f32"):
        raise ConfigError(f"--dtype {dtype} applies to GGUF; an ONNX export keeps the model's float32 weights")
    dtype = dtype or ("f16" if fmt == "gguf" else "f32")
    if fmt == "gguf" and dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(GGUF_DTYPES)} for GGUF; got {dtype!r}")
    if out is None and not Path(ref).expanduser().is_dir():
        from finetune.hub import looks_like_hub_id

        if looks_like_hub_id(str(ref)):  # checked before pulling it
            raise ConfigError(f"--out is needed: {ref} is a Hub id, and its pulled copy lives in the Hub cache")
    run_folder = locate_run(ref, revision)  # a folder that does not exist: one line saying so
    if out is None:  # the run folder's export/: GGUF files side by side, the ONNX folder in onnx/
        out = run_folder.exports if fmt == "gguf" else run_folder.exports / "onnx"
    target = _export_target(out, fmt, dtype)
    if target.exists() and not overwrite:
        raise RunFolderError(f"{target} exists; choose another --out or pass --overwrite")

    run = load_run(run_folder.path)
    _check_exportable(run, ref, fmt)
    # Probed before merging: the merge changes the run's model in place.
    onnx_inputs = _inputs_the_run_reads(run.model, run.tokenizer) if fmt == "onnx" else None
    model = _merged(run.model, f"{ref} (base {run.config.model.name_or_path})")
    if fmt == "gguf":
        path = export_gguf(model, run.tokenizer, target, dtype)
        comparison = compare_gguf(path, model, run.tokenizer, DEFAULT_PROMPTS)
        return ExportResult(path, fmt, comparison, f"next-token logits at every position of {len(DEFAULT_PROMPTS)} "
                                                   "prompts")
    path = export_onnx(model, run.tokenizer, target, kind=run.task.name, input_names=onnx_inputs)
    run.task.save(path.parent)  # task.json: labels, QA settings learned in training
    dump_config(run.config, RunFolder(path.parent).config)
    inputs = _onnx_check_inputs(run_folder, run.task.name)
    comparison = compare_onnx(path, model, run.tokenizer, inputs)
    names = ", ".join(ONNX_KINDS[run.task.name].outputs)
    return ExportResult(path, fmt, comparison, f"{names} of {len(inputs)} inputs in one padded batch")


def _export_target(out: Path, fmt: str, dtype: str) -> Path:
    """The file ``export_gguf``/``export_onnx`` will write for ``out`` (a file, or a folder)."""
    out = Path(out)
    if fmt == "gguf":
        return out if out.suffix == ".gguf" else out / f"model-{dtype}.gguf"
    return out if out.suffix == ".onnx" else out / ONNX_FILE


def _check_exportable(run: Any, ref: str | Path, fmt: str) -> None:
    """Refuse, in one line, a run whose model the format cannot hold, naming the format that can."""
    base = run.model.get_base_model() if hasattr(run.model, "peft_config") else run.model
    model_class = type(base).__name__
    decoder_lm = base.can_generate() and not getattr(base.config, "is_encoder_decoder", False)
    if fmt == "gguf" and not decoder_lm:  # the architecture itself is checked by export_gguf
        hint = "; export it with --format onnx" if run.task.name in ONNX_KINDS else ""
        raise ModelError(f"GGUF export writes decoder-only language models (generation runs); {ref} is a "
                         f"{run.task.name} run ({model_class}){hint}")
    if fmt == "onnx" and run.task.name not in ONNX_KINDS:
        hint = "; export it with --format gguf" if decoder_lm else ""
        raise ModelError(f"ONNX export writes encoder models with a task head ({', '.join(ONNX_KINDS)} runs); "
                         f"{ref} is a {run.task.name} run ({model_class}){hint}")


def _merged(model: torch.nn.Module, name: str) -> PreTrainedModel:
    """The run's model as one plain float32 model: the adapter merged (``finetune merge``'s way), or a
    fully fine-tuned model as it is."""
    if hasattr(model, "peft_config"):
        from finetune.merge import merge_adapter

        model = merge_adapter(model, name)
    return model.to(torch.float32).eval()


@torch.no_grad()
def _inputs_the_run_reads(run_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The model inputs (of those the tokenizer makes) that the run's own model reacts to. peft's QA
    wrapper (0.21) does not pass ``token_type_ids`` on to a LoRA model: such a run trained and predicts
    without segment ids, while its merged model would read them. The export leaves out an input the run
    ignores, so that the graph computes what the run computes. Found by probing (with and without it), not
    by peft's version."""
    base = run_model.get_base_model() if hasattr(run_model, "peft_config") else run_model
    names = _onnx_input_names(base, tokenizer)
    if "token_type_ids" not in names:
        return names
    batch = _dummy_batch(tokenizer)
    device = next(run_model.parameters()).device
    inputs = {name: batch[name].to(device) for name in names}
    was_training = run_model.training
    run_model.eval()
    try:
        with_ids = run_model(**inputs, return_dict=True)
        without = run_model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, return_dict=True)
    finally:
        run_model.train(was_training)
    outputs = [key for key in with_ids.keys() if isinstance(with_ids[key], torch.Tensor) and key != "loss"]
    if all(torch.equal(with_ids[key], without[key]) for key in outputs):
        logger.info("the run's model ignores token_type_ids (peft's QA wrapper drops them): exported without")
        return [name for name in names if name != "token_type_ids"]
    return names


def _onnx_check_inputs(run_folder: Any, kind: str) -> list[str] | list[tuple[str, str]]:
    """Fixed check inputs plus, for classification, the first texts of the run's test predictions (the
    domain it was trained on). QA prediction rows hold no context, so QA uses the fixed pairs."""
    if kind == "question-answering":
        return list(ONNX_CHECK_PAIRS)
    rows: list[dict[str, Any]] = []
    if run_folder.predictions.is_file():
        with run_folder.predictions.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if isinstance(row.get("text"), str):
                    rows.append(row)
                if len(rows) == ONNX_CHECK_RUN_ROWS:
                    break
    if rows and all(isinstance(row.get("text_pair"), str) for row in rows):
        return list(ONNX_CHECK_PAIRS) + [(row["text"], row["text_pair"]) for row in rows]
    return list(ONNX_CHECK_TEXTS) + [row["text"] for row in rows]


class OnnxModel(torch.nn.Module):
    """An exported ONNX graph behind the interface a task's ``predict`` uses: ``model(**batch)`` returns
    the head's outputs (``.logits``, ``.start_logits``/``.end_logits``) as torch tensors."""

    def __init__(self, predictor: OnnxPredictor):
        super().__init__()
        self.predictor = predictor
        # Tasks put their batches on the device of the model's first parameter: onnxruntime's is the CPU.
        self.device_anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, **batch: torch.Tensor) -> Any:
        from transformers.modeling_outputs import ModelOutput

        outputs = self.predictor(batch)
        return ModelOutput({name: torch.from_numpy(value) for name, value in outputs.items()})


def load_onnx_run(path: str | Path, overrides: list[str] | None = None) -> Any:
    """An ONNX export of a run (``finetune export RUN --format onnx``) as a ``TrainedRun`` whose model runs in
    onnxruntime: the task comes from the config and task file written beside the ``.onnx`` file."""
    from finetune.recipes import load_config
    from finetune.tasks import load_task
    from finetune.trained_run import TrainedRun, without_code_settings

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX file not found: {path}")
    folder = RunFolder(path.parent)
    if not folder.config.is_file():
        raise RunFolderError(f"{path.parent} has no {folder.config.name} beside {path.name}: predict and serve need "
                             f"an export made by `finetune export RUN --format onnx` (it writes the run's config "
                             f"and task file next to the model)")
    # The config beside an export is data like a run's own: it never turns on code execution.
    config = without_code_settings(load_config(folder.config, overrides), overrides or [], folder)
    task = load_task(config, folder.path)
    predictor = OnnxPredictor(path)
    if predictor.kind != task.name:
        raise RunFolderError(f"{path} holds a {predictor.kind or 'unknown'} graph, but the config beside it is for "
                             f"task {task.name}")
    return TrainedRun(config, task, OnnxModel(predictor).eval())
