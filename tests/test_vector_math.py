"""exp and tanh of llmpy.kernels.vector_math against float64 numpy, and the kernels' vectorisation."""

import numpy as np
from numba import njit

from llmpy.kernels.vector_math import exp_nonpositive, tanh_float32


@njit(error_model="numpy")
def _exp_all(out, x):
    for i in range(x.shape[0]):
        out[i] = exp_nonpositive(x[i])


@njit(error_model="numpy")
def _tanh_all(out, x):
    for i in range(x.shape[0]):
        out[i] = tanh_float32(x[i])


def _ulps(values: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(values.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)


def test_exp_within_two_ulp_over_the_normal_range():
    x = np.concatenate([np.linspace(-87.0, 0.0, 1_000_001), -np.logspace(-8, 0, 1001), [0.0, -0.0]]).astype(np.float32)
    out = np.empty_like(x)
    _exp_all(out, x)
    assert _ulps(out, np.exp(x.astype(np.float64))).max() <= 2.0
    assert out[-1] == 1.0


def test_exp_below_the_range_clamps_to_a_tiny_normal_and_keeps_nan():
    x = np.array([-88.0, -1e4, -np.inf, np.nan], dtype=np.float32)
    out = np.empty_like(x)
    _exp_all(out, x)
    assert np.all((out[:3] > 0) & (out[:3] < 2e-38))
    assert np.isnan(out[3])


def test_tanh_close_to_float64_everywhere():
    x = np.concatenate([np.linspace(-30, 30, 600_001), np.logspace(-10, 1, 1001), [np.inf, -np.inf]]).astype(np.float32)
    out = np.empty_like(x)
    _tanh_all(out, x)
    exact = np.tanh(x.astype(np.float64))
    assert np.abs(out - exact).max() <= 2e-7  # libm's float32 tanhf: ~6e-8
    # 1 - exp(-2|u|) cancels for small |u|: relative error grows there (GELU adds 1 to it, so only the
    # absolute error above matters to the kernels)
    small = (np.abs(x) > 1e-3) & (np.abs(x) < 1)
    assert (np.abs(out[small] - exact[small]) / np.abs(exact[small])).max() < 1e-4
    assert out[-2] == 1.0 and out[-1] == -1.0
    assert np.all((np.sign(out) == np.sign(x)) | (out == 0))
