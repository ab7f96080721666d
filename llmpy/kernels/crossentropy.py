"""Softmax over the real vocabulary and cross-entropy loss, with the backward fused."""

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel


@kernel
def crossentropy_forward(probs, losses, logits, targets, vocab_size):
    """probs (N, Vp) = softmax(logits (N, Vp)[:, :V]) (zero in the padded columns); losses (N,) =
    -log probs[n, targets[n]]; targets (N,) int32. Writes probs and losses."""
    N, Vp = logits.shape
    for n in prange(N):
        maxval = np.float32(-3.4e38)
        for v in range(vocab_size):
            if logits[n, v] > maxval:
                maxval = logits[n, v]
        total = np.float32(0.0)
        for v in range(vocab_size):
            e = np.exp(logits[n, v] - maxval)
            probs[n, v] = e
            total += e
        inv = np.float32(1.0) / total
        for v in range(vocab_size):
            probs[n, v] *= inv
        for v in range(vocab_size, Vp):
            probs[n, v] = 0.0
        losses[n] = -np.log(probs[n, targets[n]])


@kernel(fastmath=False)
def crossentropy_backward(dlogits, probs, targets, dloss, vocab_size):
    """dlogits (N, Vp) = (probs - onehot(targets)) * dloss for the real vocabulary, 0 in the padding.
    dloss is the scalar gradient of the mean loss w.r.t. each row's loss (1 / (B*T)). Writes."""
    N, Vp = probs.shape
    scale = np.float32(dloss)
    for n in prange(N):
        for v in range(vocab_size):
            dlogits[n, v] = probs[n, v] * scale
        dlogits[n, targets[n]] -= scale
        for v in range(vocab_size, Vp):
            dlogits[n, v] = 0.0
