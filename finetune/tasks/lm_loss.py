"""The language-model loss of decoder-only models without the full-vocabulary logits.

A causal LM computes ``logits = lm_head(hidden)`` for every position (rows x length x vocabulary; for SmolLM2
that is 49,152 numbers per token, kept in bf16, again in fp32 for the loss, and again for its gradient) and
then the cross-entropy over the few positions that are targets. Here the model runs with its head on the last
position only; the final hidden states are taken from the head's input, the target positions (labels not
-100) are picked out, and the head's matmul, log-softmax and gradient run over them in chunks of rows
(:class:`ChunkedLinearCrossEntropy`). At most one chunk of logits exists at a time; prompt and padding
positions cost nothing.

The gradient of each chunk is computed in the forward pass (the softmax is at hand there) and kept: the
gradient of the hidden states (targets x hidden, small) and, when the head is trained, of its weight. So
the head costs the same three matmuls as the plain loss, not four.

Numerically this is the plain loss: the same matmul in the same precision (the autocast state of the model's
forward is captured with the hidden states), logits upcast to fp32 before the log-softmax, the mean over target
tokens. Values and gradients agree to rounding (tests/test_lm_loss.py).

It applies when the head is a plain ``nn.Linear`` whose output the model returns unchanged as logits and the
loss is transformers' plain causal-LM cross-entropy; every call checks the first condition on the last
position (logits softcapping or scaling, as in Gemma 2 or Cohere, would show), and a model that fails any of
them gets its own loss from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from finetune.tasks.base import model_inputs

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOGITS_PER_CHUNK = 2**24
"""Logits computed at once (rows x vocabulary): 64 MiB in fp32, whatever the batch."""
MIN_ROWS_PER_CHUNK = 64
"""Fewer rows per matmul would waste the hardware; reached only with vocabularies above 262k."""


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` (no ignored rows), computed
    ``rows`` at a time; the gradients are made in the same pass and scaled by the incoming gradient later."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                compute_dtype: torch.dtype, rows: int) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(compute_dtype)
            t = targets[start:start + rows]
            logits = F.linear(h, w, b).float()  # what the plain loss upcasts
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(sum of losses)/d(logits) = softmax - one-hot, made in place in the logits' buffer
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(compute_dtype)  # as autocast hands it to the matmul's backward
            if need_hidden:
                grad_hidden[start:start + rows] = (grad_logits @ w).to(hidden.dtype)
            if need_weight:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grads: list[torch.Tensor | None] = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            grads.append((saved.pop(0) * grad_output).to(dtype) if has else None)
        return grads[0], grads[1], grads[2], None, None, None


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """Per-token cross-entropy (no gradient), computed ``rows_per_chunk`` rows at a time."""
    rows = rows_per_chunk(weight.shape[0])
    w = weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    parts = []
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows].to(compute_dtype), w, b).float()
        t = targets[start:start + rows]
        parts.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def rows_per_chunk(vocab_size: int) -> int:
    return max(MIN_ROWS_PER_CHUNK, LOGITS_PER_CHUNK // max(vocab_size, 1))


# --- the model's hidden states ----------------------------------------------------------------------------
@dataclass
class _HeadCapture:
    """Hooks on a causal LM's head: while ``active``, the head's input (the final hidden states) is kept and
    the head is applied to the last position only; its output is kept to check that the model returns it
    unchanged as its logits. Inactive (generation, another loss), the hooks change nothing."""

    active: bool = False
    supported: bool = True
    hidden: torch.Tensor | None = None
    head_output: torch.Tensor | None = None
    autocast: tuple[bool, torch.dtype] = (False, torch.float32)
    handles: list[Any] = field(default_factory=list)

    def before(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self.active:
            return None
        hidden = args[0]
        device = hidden.device.type
        self.hidden = hidden
        self.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return (hidden[:, -1:],) + tuple(args[1:])

    def after(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.active:
            self.head_output = output

    def take(self) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, torch.dtype]]:
        hidden, head_output, self.hidden, self.head_output = self.hidden, self.head_output, None, None
        return hidden, head_output, self.autocast


CAPTURE_ATTRIBUTE = "_finetune_head_capture"


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP, ``torch.compile`` and peft wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


def _capture_for(model: torch.nn.Module) -> tuple[_HeadCapture, torch.nn.Linear] | None:
    """The head's capture hooks (installed once), or None when the model does not qualify."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    capture = getattr(head, CAPTURE_ATTRIBUTE, None)
    if capture is not None:
        return (capture, head) if capture.supported else None
    config = getattr(lm, "config", None)
    reason = None
    if type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
        reason = f"its output layer is a {type(head).__name__}, not a plain Linear"
    elif getattr(config, "is_encoder_decoder", False):
        reason = "it is an encoder-decoder"
    elif getattr(config, "output_router_logits", False):
        reason = "its loss adds a router loss"
    elif getattr(lm, "loss_type", None) not in (None, "ForCausalLM") or hasattr(lm, "_loss_function"):
        reason = f"its loss is {getattr(lm, 'loss_type', None) or 'custom'}, not the plain causal-LM loss"
    capture = _HeadCapture(supported=reason is None)
    if head is not None:
        setattr(head, CAPTURE_ATTRIBUTE, capture)
    if reason is not None:
        logger.warning("chunked loss (train.chunked_loss) not used for %s: %s; the model's own loss is used",
                       type(lm).__name__, reason)
        return None
    capture.handles = [head.register_forward_pre_hook(capture.before), head.register_forward_hook(capture.after)]
    return capture, head


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """Label of the next token at each position (-100 where none), as transformers shifts them."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _hidden_at_targets(model: torch.nn.Module, batch: dict[str, Any]):
    """(hidden states at target positions, their targets, row of each, head, compute dtype), or None when the
    model does not qualify (then nothing was computed)."""
    found = _capture_for(model)
    if found is None:
        return None
    capture, head = found
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    capture.active = True
    try:
        outputs = model(**inputs)
    finally:
        capture.active = False
    hidden, head_output, (autocast, autocast_dtype) = capture.take()
    logits = getattr(outputs, "logits", None)
    if hidden is None or logits is None or not torch.equal(logits.detach().float(), head_output.detach().float()):
        capture.supported = False  # e.g. softcapped or scaled logits: the head's output is not the logits
        logger.warning("chunked loss (train.chunked_loss) not used for %s: its logits are not the output "
                       "layer's output; the model's own loss is used", type(unwrap_causal_lm(model)).__name__)
        return None
    targets = _targets(batch["labels"])
    where = targets != IGNORE_INDEX
    dtype = autocast_dtype if autocast else hidden.dtype
    return hidden[where], targets[where], where.nonzero()[:, 0], head, dtype


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The mean cross-entropy over target tokens (``model(**batch).loss``), without full logits."""
    picked = _hidden_at_targets(model, batch)
    if picked is None:
        return model(**model_inputs(batch)).loss
    hidden, targets, _, head, dtype = picked
    total = ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, dtype,
                                            rows_per_chunk(head.weight.shape[0]))
    return total / len(targets)  # no targets: nan, as the plain loss


def causal_lm_nll(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(summed NLL, target tokens) per row, without full logits (no gradient); None when the model does not
    qualify."""
    picked = _hidden_at_targets(model, batch)
    if picked is None:
        return None
    hidden, targets, rows, head, dtype = picked
    losses = chunked_token_losses(hidden, head.weight, head.bias, targets, dtype)
    count = batch["input_ids"].shape[0]
    sums = torch.zeros(count, dtype=torch.float32, device=losses.device).index_add_(0, rows, losses)
    return sums, torch.bincount(rows, minlength=count)
