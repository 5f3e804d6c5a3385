"""Causal-LM cross-entropy over chunks of tokens, so the (tokens x vocab) logits never exist whole.

Two ways, the same loss and gradients:
- fused (a plain nn.Linear head, the usual case): one pass per chunk computes the logits, the
  loss and at once the gradients of the hidden states (and of the head's weight when it trains);
  the chunk's logits are freed before the next. No logits are kept and none are recomputed.
- checkpointed (any other head: LoRA-wrapped, quantized, sharded): each chunk runs under
  torch.utils.checkpoint and its logits are recomputed in the backward pass.

Only trained positions (label != -100) go through the head: the prompt tokens of an SFT batch
cost no head matmul at all. Only torch is imported here (the peak-memory test runs it bare).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 2 ** 26  # fp32 logits of one chunk: 64 MiB (64 tokens of a 262k vocabulary)
AUTO_VOCAB = 100_000         # unset --chunked-ce: on from this vocabulary size (Gemma 262k, Qwen 151k) ...
AUTO_LOGIT_BYTES = 2 ** 28   # ... or when one micro-batch's fp32 logits would take 256 MiB or more


def wanted(vocab: int, tokens: int) -> bool:
    """Whether --chunked-ce (unset) turns on: a big vocabulary, or big logits for this batch."""
    return vocab >= AUTO_VOCAB or tokens * vocab * 4 >= AUTO_LOGIT_BYTES


def chunk_size(vocab: int) -> int:
    return max(16, CHUNK_LOGIT_BYTES // (4 * max(1, vocab)))


def chunked_lm_loss(hidden, labels, head, *, num_items_in_batch=None, softcap=None, logit_scale=None,
                    chunk_tokens=None):
    """Causal-LM cross-entropy of hidden (B, T, H) through head, equal to the model's own loss:
    position t predicts labels[t + 1]; IGNORE_INDEX tokens do not count. The sum over trained
    tokens is divided by num_items_in_batch (the Trainer's count over the accumulated batches)
    or, without it, by this batch's count. logit_scale multiplies the logits (before softcap)."""
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    weight = getattr(head, "weight", None)
    chunk = chunk_tokens or chunk_size(weight.shape[0] if weight is not None else 0)
    if _fusable(head):
        total = _FusedLinearCE.apply(h, head.weight, head.bias, y, chunk, softcap, logit_scale)
    else:
        total = _checkpointed(h, y, head, chunk, softcap, logit_scale)
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def _fusable(head) -> bool:
    w = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.numel() > 0
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _checkpointed(h, y, head, chunk, softcap, logit_scale):
    from torch.utils.checkpoint import checkpoint

    def piece(hc, yc):
        logits = head(hc).float()
        if logit_scale:
            logits = logits * logit_scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, yc, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + checkpoint(piece, h[start:start + chunk], y[start:start + chunk], use_reentrant=False)
    return total


class _FusedLinearCE(torch.autograd.Function):
    """sum_t CE(softcap(scale * h_t W^T + b), y_t), with the gradients made chunk by chunk in forward.

    dloss/dlogits = softmax(z) - onehot(y), times the softcap's derivative 1 - tanh^2 and the scale;
    grad_h = g W, grad_W = g^T h, grad_b = sum g. Each chunk's fp32 logits are one buffer that
    becomes the softmax in place."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk, softcap, logit_scale):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
        w = weight.to(dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk].to(dtype), y[s:s + chunk]
            z = (hc @ w.t()).float()
            if bias is not None:
                z += bias.float()
            if logit_scale:
                z *= logit_scale
            t = None
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
            g[torch.arange(g.shape[0], device=g.device), yc] -= 1
            if t is not None:
                g *= 1 - t * t
            if logit_scale:
                g *= logit_scale
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if need_h:
                grad_h[s:s + chunk] = (g @ w).to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t().float(), hc.float())
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dt: None if g is None else (g * grad_out).to(dt)  # noqa: E731
        return (scale(grad_h, grad_h.dtype if grad_h is not None else None), scale(grad_w, ctx.weight_dtype),
                scale(grad_b, ctx.weight_dtype), None, None, None, None)
