"""Softmax over the real vocabulary and cross-entropy loss, with the backward fused.

The row max and the softmax's sum run in the fixed lane order of vector_math (`lane_max`, `lane_sum`).
"""

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import exp_nonpositive, lane_max, lane_sum


@kernel
def crossentropy_forward(probs, losses, logits, targets, vocab_size):
    """probs (N, Vp) = softmax(logits (N, Vp)[:, :V]) (zero in the padded columns); losses (N,) =
    -log probs[n, targets[n]]; targets (N,) int32. Writes probs and losses."""
    N, Vp = logits.shape
    for n in prange(N):
        # row views indexed from 0: numba drops negative-index handling and LLVM vectorises the loops
        logits_row = logits[n, :vocab_size]
        probs_row = probs[n]
        maxval = lane_max(logits_row, np.float32(-3.4e38))
        for v in range(vocab_size):  # element-wise (vectorises), then the sum in lane order
            probs_row[v] = exp_nonpositive(logits_row[v] - maxval)
        inv = np.float32(1.0) / lane_sum(probs_row[:vocab_size])
        for v in range(vocab_size):
            probs_row[v] *= inv
        for v in range(vocab_size, Vp):
            probs_row[v] = 0.0
        losses[n] = -np.log(probs_row[targets[n]])


@kernel
def crossentropy_backward(dlogits, probs, targets, dloss, vocab_size):
    """dlogits (N, Vp) = (probs - onehot(targets)) * dloss for the real vocabulary, 0 in the padding.
    dloss is the scalar gradient of the mean loss w.r.t. each row's loss (1 / (B*T)). Writes."""
    N, Vp = probs.shape
    scale = np.float32(dloss)
    for n in prange(N):
        dlogits_row, probs_row = dlogits[n], probs[n]
        for v in range(vocab_size):
            dlogits_row[v] = probs_row[v] * scale
        dlogits_row[targets[n]] -= scale
        for v in range(vocab_size, Vp):
            dlogits_row[v] = 0.0
