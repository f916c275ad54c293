"""Speed options of the training loop that leave the results unchanged (each one a recipe key under ``train``).

Measured side by side with transformers' Trainer + peft in ``bench/`` (see BENCHMARKS.md):

- ``fast_dropout``: on CPU, torch draws one 32-bit Mersenne-Twister number per dropout element, serially;
  with LoRA dropout in front of every adapted projection that was about a third of a step. Here one 64-bit
  draw decides four elements (16 bits each), so ``p`` is rounded to a multiple of 1/65536. CUDA keeps torch's
  fused dropout kernel.
- ``base_in_bf16``: under bf16 autocast every matmul rounds its fp32 weight to bf16 on every forward. The frozen
  base weights never change, so they are stored in bf16 once (half the memory, no per-step cast; the matmuls
  see exactly the same bf16 values). Trainable LoRA and head weights stay fp32 and autocast runs as before.
- ``fused_optimizer``: torch's single-kernel AdamW (CPU and CUDA) instead of a loop over parameters.
- ``tf32``: TF32 tensor cores for the fp32 matmuls that remain on CUDA (autocast keeps some in fp32).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from finetune.config import LoraSettings, TrainConfig

_INT16_OFFSET = 32768


class FastDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from 16-bit slices of 64-bit random words (4 elements per draw).

    Same distribution as ``nn.Dropout`` up to rounding ``p`` to a multiple of 1/65536; drawn from torch's
    default generator, so ``torch.manual_seed`` and checkpointed RNG states reproduce it exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        return x * keep_mask(x.shape, self.p, x.dtype, x.device).mul_(1 / (1 - self.p))


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 (kept, probability ``1 - p``) or 0 (dropped), unscaled, in ``dtype`` on ``device``."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p)
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
    bits = words.view(torch.int16)[:count].view(shape)
    # Uniform int16 in [-32768, 32767]; kept when >= threshold. Clamping to [threshold - 1, threshold] and
    # subtracting gives 0/1 in vectorised int16 arithmetic (comparisons producing bool are not vectorised).
    threshold = round(p * 65536) - _INT16_OFFSET
    return bits.clamp(threshold - 1, threshold).sub_(threshold - 1).to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """``base(x) + scaling * B(A(dropout(x)))`` for a frozen base ``nn.Linear``, as one autograd node.

    peft computes this as about fifteen separate operations, each with its own autocast casts and autograd
    bookkeeping; on CPUs and small batches that overhead is a large share of a step. Here the input is cast
    to the compute dtype once, the dropout mask is 0/1 with ``1 / (1 - p)`` folded into the LoRA scaling,
    and the LoRA product is added by the same ``addmm``. Gradients are those of the unfused expression
    (exactly in fp32; within bf16 rounding under autocast); the frozen base gets none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_compute: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        dtype = x_compute.dtype
        flat = x_compute.reshape(-1, x_compute.shape[-1])
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        out = F.linear(flat, w, None if bias is None else bias.to(dtype))
        mask = keep_mask(flat.shape, p, dtype, flat.device) if p > 0 else None
        dropped = flat * mask if mask is not None else flat
        hidden = dropped @ a.t()
        scale = scaling / (1 - p)
        out = torch.addmm(out, hidden, b.t(), alpha=scale)
        ctx.save_for_backward(w, a, b, dropped, hidden, mask)
        ctx.scale, ctx.x_dtype, ctx.x_shape = scale, x.dtype, x.shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w, a, b, dropped, hidden, mask = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
        grad_hidden = torch.mm(g, b).mul_(ctx.scale)
        grad_b = torch.mm(g.t(), hidden).mul_(ctx.scale).to(ctx.param_dtypes[1])
        grad_a = torch.mm(grad_hidden.t(), dropped).to(ctx.param_dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:  # not for the first layer's input, which comes from frozen embeddings
            grad_x = torch.mm(g, w)
            lora_grad = torch.mm(grad_hidden, a)
            grad_x = grad_x.addcmul_(lora_grad, mask) if mask is not None else grad_x.add_(lora_grad)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, None, grad_a, grad_b, None, None


class _LastCast:
    """The compute-dtype copy of the last input: query, key and value projections share one input, so it is
    cast once instead of three times."""

    source: torch.Tensor | None = None
    version = -1
    cast: torch.Tensor | None = None

    @classmethod
    def get(cls, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x.detach()
        if cls.source is not x or cls.version != x._version or cls.cast.dtype != dtype:
            cls.source, cls.version, cls.cast = x, x._version, x.detach().to(dtype)
        return cls.cast


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route peft LoRA ``Linear`` layers through :class:`LoraLinearFunction`; returns how many.

    Only plain LoRA on an ``nn.Linear`` of floating-point weights qualifies (no DoRA or other variant, which
    changes the forward; no quantized base; no ``fan_in_fan_out``); at each call the layer falls back to peft's own
    forward when it is merged, disabled, has several active adapters, gets per-example adapter names, uses a
    variant, or its base weights require gradients."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.base_layer, torch.nn.Linear) \
                and module.base_layer.weight.is_floating_point() and not module.lora_variant \
                and not module.fan_in_fan_out and "forward" not in module.__dict__:
            module.forward = types.MethodType(_fused_lora_forward, module)
            fused += 1
    return fused


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.base_layer
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A \
            or name in self.lora_variant or base.weight.requires_grad \
            or (base.bias is not None and base.bias.requires_grad):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):  # dtypes are handled inside
        return LoraLinearFunction.apply(x, _LastCast.get(x, dtype), base.weight, base.bias,
                                        self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)


ATTENTION_NAME = "finetune_cpu_training"
SDPA_ONLY_ARGUMENTS = ("position_bias", "softcap")
"""Arguments of transformers' attention functions that change the result and that only its SDPA function
handles (T5's relative position bias; softcap, which it refuses): given any, the call goes to SDPA."""
MATH_ATTENTION_MAX_LENGTH = 128
"""Longest key sequence for which explicit matmuls beat torch's CPU flash kernel without dropout (measured
forward + backward: 2x faster at 64 tokens, 1.7x at 128, slower from 256 on)."""


def cpu_training_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: SDPA's semantics, computed as two matmuls around an fp32 softmax
    with :func:`keep_mask` dropout when training on CPU. There torch's SDPA either runs its flash kernel
    (no dropout; slow to backpropagate through short sequences) or, with dropout, a math fallback whose
    dropout mask is drawn element by element. Evaluation, other devices, long sequences and calls with a
    position bias (T5) use SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not module.training or query.device.type != "cpu" \
            or (dropout == 0 and key.shape[-2] > MATH_ATTENTION_MAX_LENGTH) \
            or any(kwargs.get(name) is not None for name in SDPA_ONLY_ARGUMENTS):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    repeats = query.shape[1] // key.shape[1]  # grouped-query attention: share each key/value head
    key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    scores = torch.matmul(query, key.transpose(2, 3)).float().mul_(scaling or query.shape[-1] ** -0.5)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend; a fully masked row attends uniformly, not NaN
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0:
        probs = probs * keep_mask(probs.shape, dropout, probs.dtype, probs.device).mul_(1 / (1 - dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_cpu_training_attention(model: torch.nn.Module) -> bool:
    """Switch a model that uses SDPA to :func:`cpu_training_attention` (same masks as SDPA); returns whether
    it did. Only the runtime choice changes: a saved config still says ``sdpa``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    configs = list({id(c): c for c in configs}.values())
    if not configs or any(c._attn_implementation != "sdpa" for c in configs):
        return False
    AttentionInterface.register(ATTENTION_NAME, cpu_training_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    for config in configs:
        config._attn_implementation = ATTENTION_NAME
    return True


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` (the model's and LoRA's) by :class:`FastDropout`; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(module, name, fast)  # ModuleDict (peft's lora_dropout) supports setattr too
                replaced += 1
    return replaced


def store_frozen_linear_in_bf16(model: torch.nn.Module) -> int:
    """Cast frozen weights and biases of ``nn.Linear`` layers to bf16; returns how many parameters.

    A parameter also used by another kind of module (an embedding tied to the output layer) keeps its dtype:
    the embedding lookup is not autocast, so bf16 there would change the results."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    cast = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or param.dtype != torch.float32:
                continue
            if all(isinstance(owner, torch.nn.Linear) for owner in owners[id(param)]):
                param.data = param.data.to(torch.bfloat16)
                cast += param.numel()
    return cast


def make_adamw(groups: list[dict], lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW, fused into one kernel when asked and every parameter lives on a device torch fuses for."""
    devices = {p.device.type for group in groups for p in group["params"]}
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    fusable = fused and devices <= set(_get_fused_kernels_supported_devices())
    return torch.optim.AdamW(groups, lr=lr, fused=True if fusable else None)


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (no effect elsewhere)."""
    if not torch.cuda.is_available():
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
        conv.conv.fp32_precision = "tf32"
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = True
        conv.allow_tf32 = True


def apply_speed_options(model: torch.nn.Module, train: TrainConfig, lora: LoraSettings, mixed_precision: str,
                        on_gpu: bool) -> list[str]:
    """The result-preserving speed options of ``train`` applied to ``model``; returns what was done, in words.

    DoRA and a 4-bit base (QLoRA) keep peft's own layers: DoRA's forward normalises the adapted weight (a fused
    LoRA layer would compute another function), and its weight norm would see bf16-rounded base weights."""
    notes = []
    plain_lora = lora.method == "lora" and not lora.use_dora and not lora.quantize
    if train.fast_dropout and not on_gpu:
        notes.append(f"fast dropout ({use_fast_dropout(model)} layers)")
    if train.base_in_bf16 and mixed_precision == "bf16" and plain_lora:
        notes.append(f"frozen base in bf16 ({store_frozen_linear_in_bf16(model) / 1e6:.1f}M weights)")
    if train.fast_attention and not on_gpu and use_cpu_training_attention(model):
        notes.append("CPU training attention")
    if train.fused_lora and lora.method == "lora":
        notes.append(f"fused LoRA ({fuse_lora_layers(model)} layers)" if plain_lora else
                     "fused LoRA and bf16 base off (peft's own layers for DoRA / a 4-bit base)")
    if train.compile:
        notes.append("torch.compile")
    return notes
