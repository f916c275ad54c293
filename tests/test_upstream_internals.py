"""The private parts of torch, peft, transformers and accelerate that finetune relies on are still there, with
the shape it expects.

``finetune/speed.py`` patches peft's LoRA layers and transformers' attention dispatch and calls private torch
helpers; ``finetune/accelerator.py`` resets Accelerate's singletons and probes torch's CPU features. An upstream
release that renames one of them would, at best, crash mid-training and, at worst, silently switch a speed
option off (the run still works, only slower) or change its results. These tests fail first, each naming the
internal that moved and who uses it. The versions they pass with are pinned in ``constraints.txt``.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from finetune import speed


def gone(what: str, used_by: str) -> str:
    """The assertion message: which internal, who needs it, what to do."""
    return (f"upstream internal changed: {what} (used by {used_by}); adapt {used_by} or install the tested "
            f"versions (pip install -c constraints.txt ...)")


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


# --- peft: the LoRA layer that fused_lora replaces the forward of ----------------------------------------------
LORA_LAYER_ATTRIBUTES = {
    "base_layer": torch.nn.Linear, "fan_in_fan_out": bool, "active_adapters": list, "disable_adapters": bool,
    "merged": bool, "lora_A": torch.nn.ModuleDict, "lora_B": torch.nn.ModuleDict,
    "lora_dropout": torch.nn.ModuleDict, "scaling": dict, "lora_variant": dict,
}


@pytest.fixture()
def lora_layer() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        pytest.fail(gone(f"peft.tuners.lora.layer.Linear cannot be imported ({exc})",
                         "finetune.speed.fuse_lora_layers"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["0"]))
    layers = [m for m in peft_model.modules() if isinstance(m, Linear)]
    assert len(layers) == 1, gone("get_peft_model no longer wraps nn.Linear in peft.tuners.lora.layer.Linear",
                                  "finetune.speed.fuse_lora_layers")
    return layers[0]


def test_peft_lora_linear_has_what_fused_lora_reads(lora_layer: torch.nn.Module) -> None:
    used_by = "finetune.speed._fused_lora_forward"
    for name, kind in LORA_LAYER_ATTRIBUTES.items():
        assert hasattr(lora_layer, name), gone(f"peft LoRA Linear has no attribute {name!r}", used_by)
        found = type(getattr(lora_layer, name)).__name__
        assert isinstance(getattr(lora_layer, name), kind), gone(
            f"peft LoRA Linear.{name} is a {found}, not a {kind.__name__}", used_by)
    name = lora_layer.active_adapters[0]
    for matrices in (lora_layer.lora_A, lora_layer.lora_B):
        assert isinstance(matrices[name], torch.nn.Linear), gone(
            "lora_A[adapter] / lora_B[adapter] are no longer nn.Linear (their .weight is read)", used_by)
    assert isinstance(lora_layer.lora_dropout[name], torch.nn.Dropout), gone(
        "lora_dropout[adapter] is no longer an nn.Dropout (its .p is read)", used_by)
    assert isinstance(lora_layer.scaling[name], float), gone("scaling[adapter] is no longer a float", used_by)
    forward = type(lora_layer).forward
    assert parameters(forward)[:2] == ["self", "x"], gone(
        f"peft LoRA Linear.forward{inspect.signature(forward)} no longer takes (self, x, ...)", used_by)
    # fuse_lora_layers skips a layer whose forward is already set on the instance: peft must not set one itself.
    assert "forward" not in lora_layer.__dict__, gone("peft sets forward on LoRA layer instances",
                                                      "finetune.speed.fuse_lora_layers")


def test_fused_lora_really_runs_fused(lora_layer: torch.nn.Module) -> None:
    """Not a silent fallback to peft's path: the output comes from LoraLinearFunction."""
    model = torch.nn.Sequential(lora_layer).train()
    assert speed.fuse_lora_layers(model) == 1, gone("fuse_lora_layers found no peft LoRA layer to fuse",
                                                    "finetune.speed.fuse_lora_layers")
    out = model(torch.randn(3, 8, requires_grad=True))
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward", gone(
        f"a fused LoRA layer computed its output through {type(out.grad_fn).__name__}, not LoraLinearFunction "
        f"(peft's own path: the fused_lora speed option is silently off)", "finetune.speed._fused_lora_forward")


# --- transformers: attention dispatch --------------------------------------------------------------------------
SDPA_PARAMETERS = ["module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal",
                   "position_bias", "kwargs"]
"""What cpu_training_attention mirrors. A new parameter may change the result: handle it or hand it to SDPA
(speed.SDPA_ONLY_ARGUMENTS)."""


def test_transformers_sdpa_attention_function_keeps_its_signature() -> None:
    used_by = "finetune.speed.cpu_training_attention"
    try:
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    except ImportError as exc:
        pytest.fail(gone(f"transformers.integrations.sdpa_attention: {exc}", used_by))
    assert parameters(sdpa_attention_forward) == SDPA_PARAMETERS, gone(
        f"sdpa_attention_forward{inspect.signature(sdpa_attention_forward)}; expected the parameters "
        f"{SDPA_PARAMETERS}", used_by)
    assert parameters(repeat_kv) == ["hidden_states", "n_rep"], gone(
        f"repeat_kv{inspect.signature(repeat_kv)}", used_by)
    assert repeat_kv(torch.zeros(1, 2, 3, 4), 2).shape == (1, 4, 3, 4), gone("repeat_kv no longer repeats heads",
                                                                               used_by)
    for name in speed.SDPA_ONLY_ARGUMENTS:
        assert name in SDPA_PARAMETERS or name in inspect.getsource(sdpa_attention_forward), gone(
            f"sdpa_attention_forward no longer knows {name!r}", "finetune.speed.SDPA_ONLY_ARGUMENTS")


def test_transformers_mask_and_attention_registries_exist() -> None:
    used_by = "finetune.speed.use_cpu_training_attention"
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as exc:
        pytest.fail(gone(f"transformers attention/mask registries: {exc}", used_by))
    assert callable(getattr(AttentionInterface, "register", None)), gone("AttentionInterface.register", used_by)
    assert callable(getattr(ALL_MASK_ATTENTION_FUNCTIONS, "register", None)), gone(
        "masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register", used_by)
    assert callable(sdpa_mask), gone("masking_utils.sdpa_mask", used_by)


def test_models_call_the_attention_function_their_config_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch is config._attn_implementation: the model must route every layer's attention through the
    function registered under that name, with the arguments cpu_training_attention expects."""
    from transformers import BertConfig, BertForSequenceClassification

    calls: list[dict[str, Any]] = []
    real = speed.cpu_training_attention

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append({"dropout": kwargs.get("dropout"), "scaling": kwargs.get("scaling"), "shape": query.shape})
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(speed, "cpu_training_attention", counting)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, attn_implementation="sdpa")
    model = BertForSequenceClassification(config).train()
    assert speed.use_cpu_training_attention(model), gone("the model's config no longer has "
                                                         "_attn_implementation == 'sdpa'",
                                                         "finetune.speed.use_cpu_training_attention")
    model(input_ids=torch.randint(0, 50, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert len(calls) == 2, gone(f"after setting config._attn_implementation the model called the registered "
                                 f"attention function {len(calls)} times, not once per layer (the fast_attention "
                                 f"speed option is silently off)", "finetune.speed.use_cpu_training_attention")
    assert all(call["dropout"] is not None and len(call["shape"]) == 4 for call in calls), gone(
        f"the attention function is called with other arguments: {calls}", "finetune.speed.cpu_training_attention")


# --- torch -----------------------------------------------------------------------------------------------------
def test_torch_private_helpers() -> None:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError as exc:
        pytest.fail(gone(f"torch.utils._foreach_utils._get_fused_kernels_supported_devices: {exc}",
                         "finetune.speed.make_adamw"))
    devices = _get_fused_kernels_supported_devices()
    assert "cpu" in devices and "cuda" in devices, gone(f"fused optimizer devices are {devices}",
                                                        "finetune.speed.make_adamw")
    param = torch.nn.Parameter(torch.zeros(2))
    assert speed.make_adamw([{"params": [param]}], lr=0.1, fused=True).defaults["fused"] is True, gone(
        "make_adamw did not build torch's fused AdamW on CPU", "finetune.speed.make_adamw")

    x = torch.zeros(3)
    before = x._version
    x.add_(1)
    assert x._version == before + 1, gone("Tensor._version no longer counts in-place changes",
                                          "finetune.speed._LastCast")
    assert callable(torch.get_autocast_dtype) and callable(torch.is_autocast_enabled), gone(
        "torch.get_autocast_dtype / torch.is_autocast_enabled", "finetune.speed._fused_lora_forward")
    assert hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn.conv,
                                                                             "fp32_precision"), gone(
        "torch.backends.{cuda.matmul,cudnn.conv}.fp32_precision", "finetune.speed.enable_tf32")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        assert callable(getattr(torch.cpu, probe, None)), gone(
            f"torch.cpu.{probe} (without it bf16 autocast is silently off on CPUs that have it)",
            "finetune.accelerator.resolve_mixed_precision")


# --- accelerate ------------------------------------------------------------------------------------------------
def test_accelerate_singletons_can_be_reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    used_by = "finetune.accelerator.reset_accelerator_state"
    assert "reset_partial_state" in parameters(getattr(AcceleratorState, "_reset_state", lambda: None)), gone(
        "AcceleratorState._reset_state(reset_partial_state=...)", used_by)
    assert callable(getattr(GradientState, "_reset_state", None)), gone("GradientState._reset_state", used_by)


# --- the pins ---------------------------------------------------------------------------------------------------
def test_constraints_pin_every_dependency_within_its_range() -> None:
    """constraints.txt (what `make install` uses) pins each dependency of pyproject.toml but torch (pinned by the
    Makefile's TORCH) to one version that pyproject allows."""
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (root / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = specifier.version
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name]), f"{requirement.name}=={pins[name]} outside {requirement}"
