"""exp and tanh of llmpy.kernels.vector_math against float64 numpy, and the kernels' vectorisation."""

import numpy as np
from numba import njit

from llmpy.kernels.vector_math import LANES, exp_nonpositive, lanes_head, lanes_load, lanes_store, tanh_float32


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


@njit(error_model="numpy")
def _exp_lanes(out, x, heads):
    for k in range(x.shape[0] // LANES):
        e = exp_nonpositive(lanes_load(x, k * LANES))
        lanes_store(out, k * LANES, lanes_head(e, heads[k]))


def test_exp_of_lanes_is_the_scalar_exp_lane_by_lane_and_lanes_head_zeroes_the_rest():
    special = [np.nan, -np.inf, -0.0, -1e-30, -87.0, -88.0, -86.99, np.nan]
    x = np.concatenate([special * 4, np.linspace(-90.0, 0.0, 100_000)]).astype(np.float32)
    rng = np.random.default_rng(0)
    heads = rng.integers(-2, LANES + 3, size=x.size // LANES)
    heads[:3] = (LANES, 0, LANES)
    lanes, scalars = np.empty_like(x), np.empty_like(x)
    _exp_lanes(lanes, x, heads)
    _exp_all(scalars, x)
    kept = np.arange(x.size) % LANES < np.repeat(heads, LANES)
    assert np.array_equal(lanes[kept].view(np.int32), scalars[kept].view(np.int32))  # NaN too
    assert np.all(lanes[~kept].view(np.int32) == 0)  # +0.0
