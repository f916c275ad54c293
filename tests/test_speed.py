"""The training loop's speed options (finetune.speed) keep results: same outputs, gradients and dtypes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from finetune import speed
from finetune.recipes import load_config
from finetune.train import train
from tests.conftest import tiny_overrides

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "classify.yaml"


def tiny_bert_classifier(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        num_labels=3, attn_implementation="sdpa")
    return BertForSequenceClassification(config)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def with_lora(model: torch.nn.Module, dropout: float = 0.0) -> torch.nn.Module:
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=dropout,
                      target_modules=["query", "key", "value", "dense"])
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter do something
            torch.nn.init.normal_(param, std=0.5)
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- dropout -----------------------------------------------------------------------------------------
def test_fast_dropout_keeps_one_minus_p_and_preserves_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    out = speed.FastDropout(0.1)(x)
    assert (out == 0).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert out.mean().item() == pytest.approx(1.0, abs=0.005)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]


def test_fast_dropout_is_reproducible_from_the_seed_and_off_in_eval() -> None:
    layer = speed.FastDropout(0.3)
    x = torch.randn(64, 32)
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    assert torch.equal(first, layer(x))
    assert torch.equal(layer.eval()(x), x)


def test_use_fast_dropout_replaces_model_and_lora_dropout() -> None:
    model = with_lora(tiny_bert_classifier(dropout=0.1), dropout=0.1)
    plain = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert speed.use_fast_dropout(model) == plain > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())


# --- fused LoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lora_matches_peft_outputs_and_gradients(autocast: bool) -> None:
    reference = with_lora(tiny_bert_classifier())
    fused = copy.deepcopy(reference)
    assert speed.fuse_lora_layers(fused) == 2 * 6 + 1  # q, k, v, 3 dense per layer, and the pooler's dense
    results = []
    for model in (reference, fused):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch())
        out.loss.backward()
        results.append((out.logits.float(), gradients(model)))
    (logits, grads), (fused_logits, fused_grads) = results
    assert grads.keys() == fused_grads.keys() and any("lora_A" in k for k in grads)
    # fp32: the same expression in another order; bf16: within bf16 rounding (2^-8 relative)
    rtol, atol = (1e-4, 1e-5) if not autocast else (0.05, 0.02)
    torch.testing.assert_close(fused_logits, logits, rtol=rtol, atol=atol)
    for name in grads:
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=rtol, atol=atol * max(scale, 1.0))


def test_fused_lora_dropout_is_unbiased() -> None:
    """Averaged over many masks, training-mode outputs equal the dropout-free (eval) output."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 8)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    assert speed.fuse_lora_layers(model) == 1
    x = torch.randn(4, 64)
    expected = model.eval()(x)
    with torch.no_grad():
        average = torch.stack([model.train()(x) for _ in range(4000)]).mean(0)
    lora_part = (expected - model.get_base_model()[0].base_layer(x)).abs().mean()
    assert (average - expected).abs().mean() < 0.05 * lora_part


def test_fused_lora_falls_back_to_peft_when_adapters_are_disabled_or_merged() -> None:
    reference = with_lora(tiny_bert_classifier())
    fused = copy.deepcopy(reference)
    speed.fuse_lora_layers(fused)
    for model in (reference, fused):
        model.eval()
    with torch.no_grad():
        with reference.disable_adapter(), fused.disable_adapter():
            disabled = reference(**batch()).logits
            torch.testing.assert_close(fused(**batch()).logits, disabled)
        adapted = reference(**batch()).logits
        assert not torch.allclose(adapted, disabled)
        fused.merge_adapter()
        torch.testing.assert_close(fused(**batch()).logits, adapted, rtol=1e-4, atol=1e-5)


# --- frozen base in bf16 -------------------------------------------------------------------------------
def test_frozen_base_in_bf16_keeps_trainable_fp32_and_autocast_results_identical() -> None:
    reference = with_lora(tiny_bert_classifier())
    stored = copy.deepcopy(reference)
    cast = speed.store_frozen_linear_in_bf16(stored)
    assert cast > 0
    for name, param in stored.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
    assert stored.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype \
        == torch.bfloat16
    assert stored.get_base_model().bert.embeddings.word_embeddings.weight.dtype == torch.float32
    outputs = []
    for model in (reference, stored):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch())
        out.loss.backward()
        outputs.append((out.logits, gradients(model)))
    # autocast rounds fp32 weights to the same bf16 values on every forward: nothing changes
    assert torch.equal(outputs[0][0], outputs[1][0])
    for name, grad in outputs[0][1].items():
        assert torch.equal(grad, outputs[1][1][name]), name


def test_frozen_base_in_bf16_leaves_tied_embeddings_alone() -> None:
    model = tiny_llama()
    for param in model.parameters():
        param.requires_grad_(False)
    speed.store_frozen_linear_in_bf16(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


# --- attention -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_bert_classifier, tiny_llama])
def test_cpu_training_attention_matches_sdpa(build) -> None:
    """Padding masks, causal masks and grouped-query heads: the same outputs as torch's SDPA."""
    reference = build()
    switched = copy.deepcopy(reference)
    assert speed.use_cpu_training_attention(switched)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    inputs["attention_mask"][1, :3] = 0  # left padding too
    keep = inputs["attention_mask"].bool()
    for model in (reference, switched):
        model.train()
    expected = reference(**inputs).logits
    actual = switched(**inputs).logits
    if expected.dim() == 3:  # per-token logits: padded positions are undefined
        expected, actual = expected[keep], actual[keep]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not speed.use_cpu_training_attention(switched)  # already switched: left as it is


def test_cpu_training_attention_keeps_t5s_relative_position_bias() -> None:
    """T5 passes its relative position bias to the attention function (``position_bias``): the math path does
    not add it, so such calls go to SDPA (they used to drop it: logits off by 0.24)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0, attn_implementation="sdpa")
    reference = T5ForConditionalGeneration(config).train()
    switched = copy.deepcopy(reference)
    assert speed.use_cpu_training_attention(switched)
    inputs = {"input_ids": batch()["input_ids"], "labels": batch()["input_ids"][:, :6].contiguous()}
    torch.testing.assert_close(switched(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_cpu_training_attention_only_replaces_sdpa() -> None:
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, attn_implementation="eager")
    assert not speed.use_cpu_training_attention(BertForSequenceClassification(config))


# --- the whole loop ------------------------------------------------------------------------------------
def test_speed_options_train_to_the_same_quality(tiny_bert: Path, reviews_csv: Path, tmp_path: Path) -> None:
    """A tiny LoRA run with every speed option on and one with all off reach close validation and test
    metrics (the options change rounding and the random draws, not the computation), and the fast run
    reports its training throughput."""
    off = ["train.fast_dropout=false", "train.fused_lora=false", "train.fast_attention=false",
           "train.base_in_bf16=false", "train.fused_optimizer=false"]
    summaries = {}
    # 8 epochs: after 4 (with the pooler trained beside the head) both tiny runs were still near chance on the 24
    # test examples (0.33 and 0.46), a comparison of noise rather than of the two computations.
    for name, extra in (("fast", []), ("plain", off)):
        # The best checkpoint by validation loss: by macro-F1 on 12 validation examples the two runs could pick
        # checkpoints far apart in training, and compare those rather than the computations.
        overrides = tiny_overrides(tiny_bert, reviews_csv, tmp_path, **{
            "run.name": name, "train.epochs": 8, "train.metric_for_best": "loss", "train.mixed_precision": "bf16"})
        run_dir = train(load_config(RECIPE, overrides + extra), "classify")
        summaries[name] = json.loads((run_dir / "metrics.json").read_text())
    fast, plain = summaries["fast"], summaries["plain"]
    assert fast["test"]["accuracy"] == pytest.approx(plain["test"]["accuracy"], abs=0.1)
    assert fast["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=0.15)
    throughput = fast["throughput"]
    assert throughput["tokens"] > throughput["samples"] > 0
    assert throughput["tokens_per_second"] == pytest.approx(throughput["tokens"] / throughput["train_seconds"],
                                                            rel=0.01)
