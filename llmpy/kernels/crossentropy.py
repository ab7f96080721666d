"""Softmax over the real vocabulary and cross-entropy loss, with the backward fused in (llm.c's fused classifier).

The row max and the softmax's sum run in the fixed lane order of vector_math (`lane_max`, `lane_sum`).
"""

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import exp_nonpositive, lane_max, lane_sum


@kernel
def crossentropy_forward_backward(logits, losses, targets, dloss, vocab_size):
    """llm.c's fused classifier, in place: logits (N, Vp) on entry; on exit their gradient
    (softmax(logits[:, :V]) - onehot(targets)) * dloss, 0 in the padded columns. losses (N,) =
    -log softmax(logits)[n, targets[n]]; targets (N,) int32; dloss the gradient of the mean loss w.r.t. each
    row's loss (1 / (B*T)). The probabilities never get a buffer of their own."""
    N, Vp = logits.shape
    scale = np.float32(dloss)
    for n in prange(N):
        row = logits[n]  # a row view indexed from 0: numba drops negative-index handling, LLVM vectorises
        maxval = lane_max(row[:vocab_size], np.float32(-3.4e38))
        target_logit = row[targets[n]]
        for v in range(vocab_size):  # element-wise (vectorises), then the sum in lane order
            row[v] = exp_nonpositive(row[v] - maxval)
        total = lane_sum(row[:vocab_size])
        inv = np.float32(1.0) / total
        prob_target = exp_nonpositive(target_logit - maxval) * inv
        losses[n] = -np.log(prob_target)
        factor = inv * scale
        for v in range(vocab_size):
            row[v] *= factor
        row[targets[n]] -= scale
        for v in range(vocab_size, Vp):
            row[v] = 0.0
