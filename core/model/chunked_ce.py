"""Causal-LM cross-entropy over chunks of tokens, so the (tokens x vocab) logits never exist whole.

Only torch is imported here (the peak-memory test runs it in a bare process).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 2 ** 27  # fp32 logits of one chunk: 128 MiB (128 tokens of a 262k vocabulary)


def chunked_lm_loss(hidden, labels, head, *, num_items_in_batch=None, softcap=None, chunk_tokens=None):
    """Causal-LM cross-entropy of hidden (B, T, H) through head, equal to the model's own loss:
    position t predicts labels[t + 1]; IGNORE_INDEX tokens do not count. The sum over trained
    tokens is divided by num_items_in_batch (the Trainer's count over the accumulated batches)
    or, without it, by this batch's count. Only trained positions go through the head."""
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    vocab = head.weight.shape[0]
    chunk = chunk_tokens or max(16, CHUNK_LOGIT_BYTES // (4 * vocab))

    def piece(hc, yc):
        logits = head(hc).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, yc, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        # checkpoint: the chunk's logits are freed now and recomputed in backward
        total = total + checkpoint(piece, h[start:start + chunk], y[start:start + chunk], use_reentrant=False)
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count
